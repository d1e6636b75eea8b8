"""stdout is for results only, and what a user's pipe or code does to it never costs a file or a clean exit:
a reader that stops early (``diag ... | head``), a factory that prints or calls ``sys.exit``, the notes of a
sweep on stderr, and ``diag report --format json``."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import typer
from typer.testing import CliRunner

import tinymodels as tm
from cliutils import one_line_error
from diag_cli.commands.run import as_sweep_hint, sweep_notes
from diag_cli.errors import SIGPIPE_STATUS, stdout_reader_gone
from diag_cli.main import app
from diagnostics.checkpoint import save_checkpoint

runner = CliRunner()
TESTS = Path(tm.__file__).parent
DATA = ["--data", "tinymodels:tiny_data"]
TINY = ["--model", "tinymodels:build_tiny", *DATA, "--top-k", "2"]  # a single command
SWEEP = [*DATA, "--analyzers", "hessian", "--set", "hessian.top_k=2"]  # diag run / diag report
USER_CODE = """
import sys
import tinymodels


def exits(**kw):
    sys.exit(3)


def noisy(**kw):
    print("FACTORY NOISE")
    return tinymodels.build_tiny(**kw)


class Loud(tinymodels.Tiny):
    def forward(self, x):
        print("FORWARD NOISE")
        return super().forward(x)


class Quitter(tinymodels.Tiny):
    def forward(self, x):
        sys.exit(4)


def quitter(**kw):
    return Quitter()


def loud(**kw):
    tinymodels.build_tiny()
    return Loud()
"""


def diag(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture()
def tiny_ckpt(tmp_path: Path) -> Path:
    return save_checkpoint(tmp_path / "tiny.pt", tm.build_tiny(), step=7)


@pytest.fixture()
def user_code(tmp_path: Path) -> Path:
    path = tmp_path / "usercode.py"
    path.write_text(USER_CODE)
    return path


def run_into_closed_pipe(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The ``diag`` console script with stdout a pipe whose reader is gone before it starts (``| head -0``)."""
    code = f"import sys\nsys.argv = ['diag', *{list(args)!r}]\nfrom diag_cli.main import main\nmain()\n"
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run(
            [sys.executable, "-c", code], stdout=write, stderr=subprocess.PIPE, text=True, timeout=300, cwd=cwd
        )
    finally:
        os.close(write)


# ------------------------------------------------------------------------------------ closed stdout
def test_closed_stdout_keeps_the_out_file_and_exits_quietly(tiny_ckpt: Path, tmp_path: Path) -> None:
    # was: the records were printed before --out was written, and the EPIPE became "unexpected BrokenPipeError", 2
    out = tmp_path / "records.json"
    proc = run_into_closed_pipe("hessian", str(tiny_ckpt), *TINY, "-f", "json", "--out", str(out), cwd=TESTS)
    assert proc.returncode == SIGPIPE_STATUS, proc.stderr
    assert "error" not in proc.stderr and "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr
    assert sum(r["metric"] == "eigenvalue" for r in json.loads(out.read_text())["records"]) == 2


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["hessian", "--help"]])
def test_help_into_a_closed_pipe_is_quiet(args: list[str], tmp_path: Path) -> None:
    # was: exit 1 (Typer's own EPIPE handling), which in diag means "a gate failed"
    proc = run_into_closed_pipe(*args, cwd=tmp_path)
    assert proc.returncode == SIGPIPE_STATUS
    assert proc.stderr == ""


def test_broken_pipe_in_process_writes_out_first(
    tiny_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def closed(*args, **kwargs):
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    monkeypatch.setattr("diag_cli.output.print_records", closed)
    out = tmp_path / "r.csv"
    r = diag("hessian", tiny_ckpt, *TINY, "--out", out)
    assert r.exit_code == SIGPIPE_STATUS, r.output
    assert "unexpected" not in r.output and "Traceback" not in r.output
    assert "eigenvalue" in out.read_text()


def test_stdout_reader_gone_only_for_a_pipe_without_reader(monkeypatch: pytest.MonkeyPatch) -> None:
    read, write = os.pipe()
    with os.fdopen(write, "w") as stream:
        monkeypatch.setattr(sys, "stdout", stream)
        assert not stdout_reader_gone()  # a BrokenPipeError from elsewhere is still reported
        os.close(read)
        assert stdout_reader_gone()


# --------------------------------------------------------------------------------- user factory code
def test_factory_calling_sys_exit_is_a_one_line_error(tiny_ckpt: Path, user_code: Path) -> None:
    # was: diag ended with status 3 and said nothing
    r = diag("hessian", tiny_ckpt, *DATA, "--model", f"{user_code}:exits")
    one_line_error(r, f"'{user_code}:exits'", "called sys.exit(3)")


def test_module_calling_sys_exit_on_import_is_a_one_line_error(tiny_ckpt: Path, tmp_path: Path) -> None:
    # was: diag ended with status 0 and no output at all
    script = tmp_path / "script.py"
    script.write_text("import sys\n\ndef build():\n    pass\n\nsys.exit(0)\n")
    r = diag("hessian", tiny_ckpt, *DATA, "--model", f"{script}:build")
    one_line_error(r, "importing it called sys.exit(0)", "__name__ == '__main__'")


def test_model_calling_sys_exit_during_the_analysis_is_a_one_line_error(tiny_ckpt: Path, user_code: Path) -> None:
    r = diag("hessian", tiny_ckpt, *DATA, "--top-k", "2", "--model", f"{user_code}:quitter")
    assert r.exit_code == 2
    assert "called sys.exit(4) during the analysis" in one_line_error(r)


def test_factory_prints_do_not_corrupt_json(tiny_ckpt: Path, user_code: Path) -> None:
    r = diag("hessian", tiny_ckpt, *DATA, "--top-k", "2", "--model", f"{user_code}:noisy", "-f", "json", "-q")
    assert r.exit_code == 0, r.output
    assert sum(row["metric"] == "eigenvalue" for row in json.loads(r.stdout)) == 2
    assert "FACTORY NOISE" in r.stderr


@pytest.mark.parametrize("command", [["hessian"], ["compare", "--metrics", "overlap"]])
def test_model_prints_do_not_corrupt_a_single_command_in_json(
    command: list[str], tiny_ckpt: Path, user_code: Path
) -> None:
    ckpts = [tiny_ckpt] if command == ["hessian"] else [tiny_ckpt, tiny_ckpt]
    r = diag(command[0], *ckpts, *command[1:], *DATA, "--top-k", "2", "--model", f"{user_code}:loud", "-f", "json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)
    assert "FORWARD NOISE" in r.stderr


def test_model_prints_do_not_corrupt_a_sweep_in_json(tmp_path: Path, user_code: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    save_checkpoint(run / "step_1.pt", tm.build_tiny(), step=1)
    r = diag("run", run, *SWEEP, "--model", f"{user_code}:loud", "--out", tmp_path / "o", "-f", "json", "-q")
    assert r.exit_code == 0, r.output
    assert sum(row["metric"] == "eigenvalue" for row in json.loads(r.stdout)) == 2
    assert "FORWARD NOISE" in r.stderr


# ------------------------------------------------------------------------------------ sweep notes
def _sweep_result(notes: dict[tuple[str, str], list[str]], names: list[str]) -> SimpleNamespace:
    results = {key: SimpleNamespace(metadata={"notes": n}) for key, n in notes.items()}
    return SimpleNamespace(
        checkpoints=[SimpleNamespace(name=n) for n in names],
        settings=SimpleNamespace(analyzers=["hessian", "rankme"]),
        results=results,
    )


def test_sweep_notes_name_checkpoint_and_analyzer_once() -> None:
    names = [f"step_{i}.pt" for i in range(5)]
    notes = {(n, "hessian"): ["not converged: raise --max-iter"] for n in names}
    notes[("step_2.pt", "rankme")] = ["few samples", "few samples"]
    lines = sweep_notes(_sweep_result(notes, names))
    assert lines == [
        "step_0.pt, step_1.pt, step_2.pt and 2 more [hessian]: not converged: raise --set hessian.max_iter=N",
        "step_2.pt [rankme]: few samples",
    ]
    assert sweep_notes(_sweep_result({}, names)) == []


@pytest.mark.parametrize(
    ("note", "hint"),
    [
        (
            "stopped early: raise --max-iter (bounds in stderr)",
            "stopped early: raise --set hessian.max_iter=N (bounds in stderr)",
        ),
        ("use --tol 0.00012 or --dtype float64", "use --set hessian.tol=0.00012 or --dtype float64"),
        ("learning rate unknown: pass --lr", "learning rate unknown: pass --set hessian.lr=N"),
        ("--samples 900 is more than the 23 samples", "--samples 900 is more than the 23 samples"),
        ("no flag here", "no flag here"),
    ],
)
def test_sweep_notes_give_fixes_as_sweep_flags(note: str, hint: str) -> None:
    """In a sweep an analyzer's option is set with --set; diag run's own flags (--dtype, --samples) stay."""
    assert as_sweep_hint(note, "hessian") == hint
    assert as_sweep_hint(note, "no-such-analyzer") == note


def test_run_repeats_result_notes_on_stderr(tmp_path: Path) -> None:
    # was: the sweep's "not converged" notes reached diag-run.json only
    run = tmp_path / "run"
    run.mkdir()
    for step in (1, 2):
        save_checkpoint(run / f"step_{step}.pt", tm.build_tiny(seed=step), step=step)
    stuck = [*SWEEP, "--model", "tinymodels:build_tiny", "--set", "hessian.max_iter=2", "--set", "hessian.tol=1e-12"]
    r = diag("run", run, *stuck, "--out", tmp_path / "o")
    assert r.exit_code == 0, r.output
    noted = [ln for ln in r.stderr.splitlines() if ln.startswith("diag: warning: step_1.pt, step_2.pt [hessian]: ")]
    manifest = json.loads((tmp_path / "o" / "diag-run.json").read_text())
    assert len(noted) >= 1 and manifest["notes"], r.stderr
    assert len(noted) == len(set(noted))
    assert all("--max-iter" not in ln for ln in noted) and any("--set hessian.max_iter=N" in ln for ln in noted)
    quiet = diag("run", run, *stuck, "--out", tmp_path / "o", "-q")
    assert quiet.exit_code == 0 and quiet.stderr == ""


# ------------------------------------------------------------------------------------ report --format
def test_report_format_json_is_json(tmp_path: Path) -> None:
    # was: the text summary whatever --format said
    run = tmp_path / "run"
    run.mkdir()
    save_checkpoint(run / "step_1.pt", tm.build_tiny(), step=1)
    out = tmp_path / "rep"
    r = diag("report", run, *SWEEP, "--model", "tinymodels:build_tiny", "--out", out, "-f", "json", "-q")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert Path(doc["index_html"]) == out / "index.html" and Path(doc["report_md"]).is_file()
    assert doc["records"] > 0 and doc["checkpoints"] == 1 and doc["analyzers"] == ["hessian"]
    assert all(Path(f["path"]).is_file() for f in doc["figures"])


@pytest.mark.parametrize("fmt", ["csv", "md"])
def test_report_refuses_a_format_it_cannot_print(fmt: str, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    save_checkpoint(run / "step_1.pt", tm.build_tiny(), step=1)
    r = diag("report", run, *SWEEP, "--model", "tinymodels:build_tiny", "--out", tmp_path / "rep", "-f", fmt)
    one_line_error(r, "--format json", f"diag run RUN --out OUT --format {fmt}")
    assert not (tmp_path / "rep").exists()


def test_gate_writes_every_file_before_a_closed_stdout(
    tiny_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # was: the GitHub step summary was written after the summary line, so a closed stdout lost it
    baseline = tmp_path / "baseline.json"
    base = diag("baseline", tiny_ckpt, *DATA, "--model", "tinymodels:build_tiny", "--replicates", "2", "--samples", "10",
                "--out", baseline, "-q")  # fmt: skip
    assert base.exit_code == 0, base.output
    echo = typer.echo

    def closed_stdout(message=None, *args, err=False, **kwargs):
        if not err:
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")
        echo(message, *args, err=err, **kwargs)

    monkeypatch.setattr(typer, "echo", closed_stdout)
    files = {"--out": tmp_path / "gate.json", "--junit": tmp_path / "junit.xml"}
    summary = tmp_path / "summary.md"
    env = {"GITHUB_ACTIONS": "true", "GITHUB_STEP_SUMMARY": str(summary)}
    args = ["check", tiny_ckpt, *DATA, "--model", "tinymodels:build_tiny", "-b", baseline, "-q"]
    r = runner.invoke(app, [str(a) for a in [*args, *(x for kv in files.items() for x in kv)]], env=env)
    assert r.exit_code == SIGPIPE_STATUS, r.output
    assert all(path.stat().st_size > 0 for path in files.values()) and summary.read_text()
