"""Usage errors found by the command-line parser (a value of the wrong type, an unknown option or command, a
missing argument or option value) follow diag's contract like its own checks: one line on stderr,
``diag: error: <problem>; see 'diag COMMAND --help'``, exit 2, nothing on stdout, no usage box."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from diag_cli.main import app

runner = CliRunner()

CASES = [
    # (arguments, fragments of the error line)
    (["hessian", "t.pt", "--seed", "nan"], ["invalid value for '--seed'", "'nan' is not a valid integer"]),
    (["run", "x", "--replicates", "2.5"], ["'--replicates'", "'2.5' is not a valid integer"]),
    (["hessian", "t.pt", "--samples", ""], ["'--samples'", "'' is not a valid integer"]),
    (["hessian", "t.pt", "--top-k", "x"], ["'--top-k'", "'x' is not a valid integer"]),
    (["hessian", "t.pt", "-k", "x"], ["'--top-k' / '-k'", "'x'"]),
    (["hessian", "t.pt", "--tol", "abc"], ["invalid value for '--tol'", "'abc' is not a valid number"]),
    (["hessian", "t.pt", "--nope"], ["no such option: --nope"]),
    (["hessian", "t.pt", "--sed", "1"], ["no such option: --sed (did you mean --seed?)"]),
    (["hessian"], ["missing argument 'CHECKPOINT'"]),
    (["compare"], ["missing argument 'CHECKPOINT...'"]),
    (["hesian"], ["no such command 'hesian' (did you mean 'hessian'?)"]),
    (["hessian", "t.pt", "--seed"], ["option '--seed' requires an argument"]),
    (["run", "--analyzers"], ["option '--analyzers' requires an argument"]),
    (["hessian", "t.pt", "--compile=yes"], ["option '--compile' does not take a value"]),
    (["hessian", "t.pt", "t2.pt"], ["unexpected extra argument", "t2.pt"]),
    (["--nope"], ["no such option: --nope"]),
    (["--version=yes"], ["option '--version' does not take a value"]),
]


def help_of(args: list[str]) -> str:
    """The help command a usage error should point to: the command's, or diag's own when none was given or
    the command does not exist."""
    command = args[0] if args and not args[0].startswith("-") and args[0] != "hesian" else None
    return f"see 'diag {command} --help'" if command else "see 'diag --help'"


@pytest.mark.parametrize(("args", "fragments"), CASES, ids=[" ".join(a) or "''" for a, _ in CASES])
def test_usage_errors_are_one_line_and_exit_two(args: list[str], fragments: list[str]) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert result.stdout == "", result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("diag: error: "), line
    assert line.endswith(help_of(args)), line
    for fragment in fragments:
        assert fragment in line, line
    assert "Usage:" not in line and "╭" not in line and "Traceback" not in result.output


def test_the_console_script_prints_the_same_line() -> None:
    # main() (the console script) runs the app in standalone mode and ends with os._exit: the line and the
    # status must survive it
    proc = subprocess.run(
        [sys.executable, "-m", "diag_cli.main", "hessian", "t.pt", "--seed", "nan"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [
        "diag: error: invalid value for '--seed': 'nan' is not a valid integer; see 'diag hessian --help'"
    ]


def test_help_is_unchanged() -> None:
    result = runner.invoke(app, ["hessian", "--help"])
    assert result.exit_code == 0
    assert "Usage: diag hessian" in result.stdout and result.stderr == ""
    # diag alone prints its help on stdout (exit 2, click's status for no_args_is_help), not an error line
    result = runner.invoke(app, [])
    assert result.exit_code == 2
    assert "Usage: diag" in result.stdout and "Commands" in result.stdout
    assert "diag: error" not in result.output
