"""``diag --help``, ``diag COMMAND --help`` and argument errors never import the numerical stack, and a command
imports only what it uses (issue 13): the module set is asserted in a fresh interpreter, not a time."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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


def probe(
    *args: str, cwd: Path | None = None, heavy: tuple[str, ...] = HEAVY, env: dict[str, str] | None = None
) -> tuple[int, list[str], str]:
    """``diag ARGS`` in a fresh interpreter -> (exit code, which of ``heavy`` it loaded, what it wrote to stderr)."""
    code = PROBE.format(args=list(args), heavy=heavy)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=cwd, env=env)
    lines = dict(line.split(" ", 1) for line in proc.stderr.splitlines() if line.startswith(("EXIT", "LOADED")))
    assert "LOADED" in lines, proc.stderr
    said = "".join(line + "\n" for line in proc.stderr.splitlines() if not line.startswith(("EXIT", "LOADED")))
    return int(lines["EXIT"]), eval(lines["LOADED"]), said


def loaded_after(*args: str) -> tuple[int, list[str]]:
    code, loaded, _ = probe(*args)
    return code, loaded


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


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("hessian", "ck.pt", "--tol", "5"), "--tol must be in (0, 1), got 5.0; drop it to use the default, 0.001"),
        (("hessian", "gone.pt"), "no such checkpoint: 'gone.pt'"),
        (("compare", "ck.pt", "gone.pt"), "no such checkpoint: 'gone.pt'"),
        (("hessian", "ck.pt", "--data", "gone.py:data"), "data factory 'gone.py:data': no such file 'gone.py'"),
        (("hessian", "ck.pt", "--loss", "gone.py:loss"), "loss 'gone.py:loss': no such file 'gone.py'"),
        (("baseline", "gone.pt", "--out", "b.json"), "no such checkpoint: 'gone.pt'"),
        (("baseline", "ck.pt", "--out", "b.json", "--model", "gone.py:m"), "model factory 'gone.py:m': no such file"),
        (("check", "gone.pt", "--baseline", "ck.pt"), "no such checkpoint: 'gone.pt'"),
        (("run", "gone"), "no such run folder: 'gone'"),
        (("report", "ck.pt"), "'ck.pt' is a file; pass the folder that holds the run's checkpoints"),
        (("run", "run", "--out", "out", "--set", "hessian.tol=abc"), "hessian.tol must be a finite number, got 'abc'"),
        (("report", "run", "--out", "out", "--set", "hessian.tol=5"), "hessian.tol must be in (0, 1), got 5.0"),
        (("run", "run", "--out", "out", "--analyzers", "nope"), "unknown analyzer 'nope'"),
        (("run", "run", "--out", "out", "--data", "gone.py:data"), "no such file 'gone.py'"),
        (("run", "run", "--out", "out", "--pattern", "*.nothing"), "no checkpoint files matching '*.nothing'"),
        (("run", "run", "--out", "run"), "is the input folder itself"),
    ],
)
def test_value_and_file_errors_import_nothing_heavy(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    """Errors in what the arguments say (a range, a missing file or folder, a --set value, an unknown analyzer)
    are found before torch and pandas load: one line, exit 2, and no --out folder made."""
    (tmp_path / "ck.pt").write_bytes(b"not read: the arguments are refused first")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "step_1.pt").write_bytes(b"not read either")
    code, loaded, said = probe(*args, cwd=tmp_path)
    assert (code, loaded) == (2, []), said
    assert said.startswith("diag: error: ") and said.count("\n") == 1 and message in said, said
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pt", "run"]


TESTS = Path(__file__).resolve().parents[1]
TINY = ("--model", "tinymodels:build_tiny", "--data", "tinymodels:tiny_data", "-q")


@pytest.mark.parametrize(
    "args",
    [
        ("hessian", "a.pt", "--top-k", "2"),
        ("hessian", "a.pt", "--top-k", "2", "-f", "table"),
        ("hessian", "a.pt", "--top-k", "2", "-f", "csv"),
        ("hessian", "a.pt", "--top-k", "2", "-f", "md", "--out", "r.csv"),
        ("weights", "a.pt", "-f", "json"),
        ("rankme", "a.pt", "-f", "json"),
        ("collapse", "a.pt", "-f", "json"),
        ("landscape", "a.pt", "--steps", "3", "-f", "json"),
        ("sharpness", "a.pt", "-f", "json"),
        ("hessian", "a.pt", "--top-k", "2", "--density", "-f", "json"),
        ("compare", "a.pt", "b.pt", "--steps", "3", "-f", "json"),
        ("compare", "a.pt", "b.pt", "--metrics", "barrier", "--steps", "3", "-f", "csv"),
        ("gradnoise", "a.pt", "-f", "json"),
        ("dynamics", "a.pt", "-f", "json"),
    ],
)
def test_a_command_that_only_prints_records_imports_no_pandas_or_matplotlib(
    tmp_path: Path, args: tuple[str, ...]
) -> None:
    """Printing records (any format) or writing them as .csv needs neither pandas nor matplotlib; the table
    artifacts of weights, rankme, collapse, landscape, the Hessian's density and compare's interpolation line
    are built only when something reads them."""
    import tinymodels as tm
    from diagnostics.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "a.pt", tm.build_tiny(), step=1)
    save_checkpoint(tmp_path / "b.pt", tm.build_tiny(seed=1), step=2)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    code, loaded, said = probe(*args, *TINY, cwd=tmp_path, heavy=("pandas", "pyarrow", "matplotlib"), env=env)
    assert (code, loaded) == (0, []), said


@pytest.mark.parametrize(
    ("args", "written"),
    [
        (("weights", "a.pt", "--plot", "w.png"), ["w.spectrum.png"]),
        (("hessian", "a.pt", "--top-k", "2", "--density-out", "d"), ["d.csv", "d.png"]),
        (("compare", "a.pt", "b.pt", "--metrics", "barrier", "--steps", "3", "--plot", "c.png"), ["c.png"]),
    ],
)
def test_a_plot_or_a_table_file_still_loads_what_it_needs(
    tmp_path: Path, args: tuple[str, ...], written: list[str]
) -> None:
    """The deferred tables are built when asked for: a plot or a table file loads matplotlib and pandas and
    is written."""
    import tinymodels as tm
    from diagnostics.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "a.pt", tm.build_tiny(), step=1)
    save_checkpoint(tmp_path / "b.pt", tm.build_tiny(seed=1), step=2)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    code, loaded, said = probe(*args, *TINY, cwd=tmp_path, heavy=("pandas", "matplotlib"), env=env)
    assert (code, loaded) == (0, ["matplotlib", "pandas"]), said
    for name in written:
        assert (tmp_path / name).stat().st_size > 1000, name


def test_bos_prints_its_records_without_pandas_or_matplotlib(tmp_path: Path) -> None:
    """``diag bos``'s per-image table is deferred too: printing the records loads neither; ``--per-image``
    builds it."""
    from test_stability_cli import TOY

    from diagnostics.binding import import_callable
    from diagnostics.checkpoint import save_checkpoint

    (tmp_path / "toydet.py").write_text(TOY)
    save_checkpoint(tmp_path / "det.pt", import_callable(f"{tmp_path / 'toydet.py'}:build")())
    args = ("bos", "det.pt", "--model", "toydet.py:build", "--data", "toydet.py:two_images", "-m", "backbone.0", "-q")
    code, loaded, said = probe(*args, "-f", "json", cwd=tmp_path, heavy=("pandas", "pyarrow", "matplotlib"))
    assert (code, loaded) == (0, []), said
    code, loaded, said = probe(*args, "--per-image", "p.csv", cwd=tmp_path, heavy=("pandas",))
    assert (code, loaded) == (0, ["pandas"]), said
    assert (tmp_path / "p.csv").read_text().count("\n") > 2
