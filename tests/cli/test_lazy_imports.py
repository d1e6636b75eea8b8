"""``diag --help``, ``diag COMMAND --help`` and argument errors never import the numerical stack (issue 13): the
module set is asserted in a fresh interpreter, not a time."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("torch", "pandas", "matplotlib", "scipy", "pyarrow", "numpy", "sklearn", "safetensors")
PROBE = """
import sys
from diag_cli.main import app
try:
    app({args!r}, prog_name="diag")
except SystemExit as exc:
    code = exc.code
else:
    code = 0
print("EXIT", code, file=sys.stderr)
print("LOADED", sorted(m for m in {heavy!r} if m in sys.modules), file=sys.stderr)
"""


def loaded_after(*args: str) -> tuple[int, list[str]]:
    code = PROBE.format(args=list(args), heavy=HEAVY)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    lines = dict(line.split(" ", 1) for line in proc.stderr.splitlines() if line.startswith(("EXIT", "LOADED")))
    assert "LOADED" in lines, proc.stderr
    return int(lines["EXIT"]), eval(lines["LOADED"])


def commands() -> list[str]:
    import typer.main

    from diag_cli.main import app

    return list(typer.main.get_command(app).list_commands(None))  # type: ignore[arg-type]


def test_top_level_help_imports_nothing_heavy() -> None:
    code, loaded = loaded_after("--help")
    assert code == 0 and loaded == []


@pytest.mark.parametrize("command", commands())
def test_command_help_imports_nothing_heavy(command: str) -> None:
    code, loaded = loaded_after(command, "--help")
    assert code == 0 and loaded == []


@pytest.mark.parametrize(
    "args",
    [
        ("hessian",),  # missing argument
        ("hessian", "ck.pt", "--top-k", "abc"),  # wrong type
        ("hessian", "ck.pt", "--no-such-flag"),  # unknown flag
        ("run", "--analyzers"),  # missing value
        ("nope",),  # unknown command
    ],
)
def test_argument_errors_import_nothing_heavy(args: tuple[str, ...]) -> None:
    code, loaded = loaded_after(*args)
    assert code == 2 and loaded == []
