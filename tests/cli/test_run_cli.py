"""``diag run`` and ``diag report`` through Typer's CliRunner on the digits run."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from diag_cli.main import app

runner = CliRunner()
FAST = ["--samples", "300", "--set", "hessian.tol=1e-3"]


def diag(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture()
def run_dir(run_copy: Path) -> Path:
    return run_copy


def test_run_writes_table_and_reruns_from_cache(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "reports" / "digits"
    r = diag("run", run_dir, "--analyzers", "hessian", "--out", out, *FAST)
    assert r.exit_code == 0, r.output
    assert "3 computed, 0 from cache" in r.stdout and "eigenvalue_0" in r.stdout
    assert "[3/3] step_00200.pt (step 200): computed hessian" in r.stderr
    for name in ("records.parquet", "records.csv", "records.csv.meta.json", "diag-run.json"):
        assert (out / name).is_file()
    again = diag("run", run_dir, "--out", out, *FAST)
    assert again.exit_code == 0, again.output
    assert "0 computed, 3 from cache" in again.stdout
    changed = diag("run", run_dir, "--out", out, *FAST, "--set", "hessian.top_k=2", "-q")
    assert "3 computed, 0 from cache" in changed.stdout and changed.stderr == ""
    js = diag("run", run_dir, "--out", out, *FAST, "--set", "hessian.top_k=2", "--format", "json", "-q")
    records = json.loads(js.stdout)
    assert {r["checkpoint"] for r in records} == {"step_00000.pt", "step_00100.pt", "step_00200.pt"}
    assert sum(r["metric"] == "eigenvalue" for r in records) == 6


def test_run_options_from_diag_toml(run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "diag.toml").write_text('samples = 300\nanalyzers = ["hessian"]\n[hessian]\ntop_k = 2\ntol = 1e-3\n')
    r = diag("run", run_dir, "--out", tmp_path / "out", "-q", "--format", "json")
    assert r.exit_code == 0, r.output
    assert sum(x["metric"] == "eigenvalue" for x in json.loads(r.stdout)) == 6
    manifest = json.loads((tmp_path / "out" / "diag-run.json").read_text())
    assert manifest["settings"]["samples"] == 300 and manifest["analyzer_configs"]["hessian"]["top_k"] == 2


def test_report_after_run_reuses_the_sweep(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "rep"
    assert diag("run", run_dir, "--out", out, *FAST, "-q").exit_code == 0
    r = diag("report", run_dir, "--out", out)
    assert r.exit_code == 0, r.output
    assert "0 computed, 3 from cache" in r.stdout
    page = (out / "index.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and 'src="data:image/png;base64,' in page
    assert (out / "report.md").read_text().count("](figures/") == len(list((out / "figures").glob("*.png"))) >= 1
    fresh = diag("report", run_dir, "--out", tmp_path / "fresh", *FAST, "-q", "--title", "My run")
    assert fresh.exit_code == 0, fresh.output
    assert "3 computed" in fresh.stdout and "<title>My run</title>" in (tmp_path / "fresh" / "index.html").read_text()


def test_bad_input_is_one_line_and_exit_2(run_dir: Path, tmp_path: Path) -> None:
    r = diag("run", run_dir, "--analyzers", "hessian,nope", "--out", tmp_path / "o")
    assert r.exit_code == 2
    assert r.stderr.startswith("diag: error: unknown analyzer 'nope'; available: ") and "hessian" in r.stderr
    assert "Traceback" not in r.output and r.stderr.count("\n") == 1
    bad_set = diag("run", run_dir, "--set", "hessian.nonsense=1", "--out", tmp_path / "o2")
    assert bad_set.exit_code == 2 and "unknown option 'nonsense' in --set" in bad_set.stderr
    missing = diag("run", tmp_path / "nowhere", "--out", tmp_path / "o3")
    assert missing.exit_code == 2 and "no such run folder" in missing.stderr
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    refused = diag("report", run_dir, "--out", foreign, *FAST)
    assert refused.exit_code == 2 and "not empty and was not written by diag" in refused.stderr
    forced = diag("run", run_dir, "--out", foreign, *FAST, "--force", "-q")
    assert forced.exit_code == 0, forced.output
    assert (foreign / "thesis.tex").read_text() == "precious"
    into_run = diag("run", run_dir, "--out", run_dir, "--force")
    assert into_run.exit_code == 2 and "input folder itself" in into_run.stderr


def test_list_analyzers() -> None:
    r = diag("run", "--list")
    assert r.exit_code == 0, r.output
    assert any(line.startswith("hessian ") for line in r.stdout.splitlines())


# --------------------------------------------------------------- interrupted first sweeps resume
def _interrupt_hessian_at(monkeypatch: pytest.MonkeyPatch, call: int) -> None:
    import dataclasses

    from diagnostics.analyzers import registry

    everything = registry.all_analyzers()
    spec = everything["hessian"]
    seen = {"n": 0}

    def run(config, ctx, progress=None):
        seen["n"] += 1
        if seen["n"] == call:
            raise KeyboardInterrupt
        return spec.run(config, ctx, progress)

    patched = {**everything, "hessian": dataclasses.replace(spec, run=run)}
    monkeypatch.setattr(registry, "all_analyzers", lambda: patched)


def test_ctrl_c_in_the_first_sweep_resumes_with_the_same_command(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 10.3: after Ctrl-C in a first sweep, the same command said 'not written by diag'."""
    out = tmp_path / "out"
    _interrupt_hessian_at(monkeypatch, 2)
    r = diag("run", run_dir, "--out", out, *FAST)
    assert r.exit_code == 130 and "rerun the same command to resume" in r.stderr
    assert json.loads((out / "diag-run.json").read_text())["status"] == "in progress"
    monkeypatch.undo()
    again = diag("run", run_dir, "--out", out, *FAST)
    assert again.exit_code == 0, again.output
    assert "2 computed, 1 from cache" in again.stdout
    assert json.loads((out / "diag-run.json").read_text())["status"] == "complete"


def test_kill_9_in_the_first_sweep_resumes_with_the_same_command(run_dir: Path, tmp_path: Path) -> None:
    """Issue 10.3 with SIGKILL: the process dies right after its first result is cached."""
    out = tmp_path / "out"
    code = (
        "import dataclasses, os, signal, sys\n"
        "from diagnostics.analyzers import registry\n"
        "everything = registry.all_analyzers()\n"
        "spec = everything['hessian']\n"
        "n = [0]\n"
        "def run(config, ctx, progress=None):\n"
        "    n[0] += 1\n"
        "    if n[0] == 2:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return spec.run(config, ctx, progress)\n"
        "patched = {**everything, 'hessian': dataclasses.replace(spec, run=run)}\n"
        "registry.all_analyzers = lambda: patched\n"
        "from diag_cli.main import app\n"
        f"sys.argv = ['diag', 'run', {str(run_dir)!r}, '--out', {str(out)!r}, {', '.join(map(repr, FAST))}]\n"
        "app()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    again = diag("run", run_dir, "--out", out, *FAST)
    assert again.exit_code == 0, again.output
    assert "2 computed, 1 from cache" in again.stdout


def test_hand_edited_cache_is_recomputed_and_said(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert diag("run", run_dir, "--out", out, *FAST, "-q").exit_code == 0
    entry = sorted((out / "cache" / "hessian").glob("*.json"))[0]
    doc = json.loads(entry.read_text())
    doc["records"][0]["value"] = 123.456
    entry.write_text(json.dumps(doc))
    r = diag("run", run_dir, "--out", out, *FAST, "--format", "json")
    assert r.exit_code == 0, r.output
    assert all(x["value"] != 123.456 for x in json.loads(r.stdout))
    assert "checksum" in r.stderr and entry.name in r.stderr


# --------------------------------------------------------------------------------- fuzzer findings
@pytest.mark.parametrize("command", ["run", "report"])
def test_an_absolute_pattern_is_one_line_before_anything_is_written(run_dir: Path, tmp_path: Path, command) -> None:
    """Fuzzer B: 'unexpected NotImplementedError: Non-relative patterns are unsupported', after the output
    folder and its manifest were written."""
    from cliutils import one_line_error

    out = tmp_path / "o"
    r = diag(command, run_dir, "--pattern", "/dev/null", "--out", out, *FAST)
    one_line_error(
        r,
        "diag: error: --pattern '/dev/null' is an absolute path; pass a glob of checkpoint files relative to the run "
        "folder, e.g. 'step_*.pt' or '**/*.ckpt'",
    )
    assert not out.exists()
    up = diag(command, run_dir, "--pattern", "../*.pt", "--out", out, *FAST)
    one_line_error(up, "--pattern '../*.pt' leaves the run folder")


@pytest.mark.parametrize("command", ["run", "report"])
def test_an_output_folder_holding_the_run_is_one_line_and_writes_nothing(
    run_dir: Path, tmp_path: Path, command
) -> None:
    """Fuzzer C1: --out . --force said 'no checkpoint files' in a run of 3 (the sweep skips its output folder)
    after writing diag-run.json into ."""
    from cliutils import one_line_error

    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    assert Path.cwd() == tmp_path == run_dir.parent
    for out in (".", f"{run_dir}/..", tmp_path):
        r = diag(command, run_dir, "--out", out, "--force", *FAST)
        one_line_error(
            r,
            f"diag: error: --out '{out}' contains the run folder '{run_dir}', and a sweep never looks for "
            "checkpoints in its output folder; choose an --out outside the run folder",
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == [run_dir.name]
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before


@pytest.mark.parametrize("command", ["run", "report"])
@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (["--pattern", "nothing_*.pt"], "diag: error: no checkpoint files matching 'nothing_*.pt' in '{run}'"),
        (["--data", "gone.py:data"], "diag: error: data factory 'gone.py:data': no such file 'gone.py'"),
        (["--model", "gone.py:build"], "diag: error: model factory 'gone.py:build': no such file 'gone.py'"),
    ],
)
def test_a_sweep_refused_before_its_first_checkpoint_leaves_no_output_folder(
    run_dir: Path, tmp_path: Path, command: str, bad: list[str], message: str
) -> None:
    """A glob that matches nothing left an empty --out behind; a missing factory file made the folder and its
    manifest, then failed at every checkpoint."""
    from cliutils import one_line_error

    out = tmp_path / "o"
    one_line_error(diag(command, run_dir, *bad, "--out", out, *FAST), message.format(run=run_dir))
    assert not out.exists()


def test_too_many_replicates_without_samples_says_what_they_need(run_dir: Path, tmp_path: Path) -> None:
    """Fuzzer C2: '--replicates K with --samples 0 needs 0 samples' although --samples was never given."""
    from cliutils import one_line_error

    k = "99999999999999999999"
    r = diag("run", run_dir, "--replicates", k, "--out", tmp_path / "o", "-q")
    line = one_line_error(
        r, f"--replicates {k} splits the data into {k} disjoint subsets", f"which needs at least {k} samples"
    )
    assert "--samples 0" not in line and "needs 0 samples" not in line


def test_a_rerun_refused_before_its_first_checkpoint_keeps_the_last_manifest(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert diag("run", run_dir, "--analyzers", "weights", "--out", out, "-q").exit_code == 0
    before = (out / "diag-run.json").read_bytes()
    for bad in (["--analyzers", "nope"], ["--set", "hessian.top_k=2"], ["--pattern", "nothing_*.pt"]):
        r = diag("run", run_dir, "--analyzers", "weights", "--out", out, "-q", *bad)
        assert r.exit_code == 2 and r.stderr.startswith("diag: error: "), r.output
        assert (out / "diag-run.json").read_bytes() == before  # 'diag report' still reruns the last sweep
    assert diag("report", run_dir, "--out", out, "-q").exit_code == 0


def test_odd_steps_and_symlink_loops_do_not_stop_a_sweep(tmp_path: Path) -> None:
    import tinymodels as tm
    from diagnostics.checkpoint import save_checkpoint

    run = tmp_path / "run"
    run.mkdir()
    save_checkpoint(run / f"step_{10**30}.pt", tm.build_tiny(), lr=0.1)  # beyond int64: the step is unknown
    save_checkpoint(run / "step_5.pt", tm.build_tiny(seed=1), lr=0.1)
    torch.save({"model": tm.build_tiny(seed=2).state_dict(), "step": float("nan")}, run / "nan_step.pt")
    (run / "loop_a.pt").symlink_to(run / "loop_b.pt")
    (run / "loop_b.pt").symlink_to(run / "loop_a.pt")
    r = diag("run", run, "--analyzers", "weights", "--model", "tinymodels:build_tiny", "--out", tmp_path / "o", "-q")
    assert r.exit_code == 0, r.output  # it was 'unexpected OverflowError' after every checkpoint was done
    frame = pd.read_csv(tmp_path / "o" / "records.csv")
    steps = frame.groupby("checkpoint")["step"].first()
    assert steps["step_5.pt"] == 5 and steps.drop("step_5.pt").isna().all() and len(steps) == 3


def test_fail_fast_says_where_it_stopped_and_that_finished_results_are_kept(run_dir: Path, tmp_path: Path) -> None:
    (run_dir / "step_00300.pt").write_bytes(b"")  # the last checkpoint is empty
    out = tmp_path / "o"
    r = diag("run", run_dir, "--analyzers", "weights", "--out", out, "--fail-fast", "-q")
    assert r.exit_code == 2 and r.stderr.count("\n") == 1, r.output
    assert r.stderr.startswith("diag: error: the sweep stopped at step_00300.pt (--fail-fast): ")
    assert "is empty (0 bytes)" in r.stderr and "rerun without --fail-fast" in r.stderr
    again = diag("run", run_dir, "--analyzers", "weights", "--out", out, "-q")
    assert again.exit_code == 0 and "3 from cache" in again.stdout, again.output


def test_an_output_folder_given_as_the_run_names_its_run(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    assert diag("run", run_dir, "--analyzers", "weights", "--out", out, "-q").exit_code == 0
    for command in ("run", "report"):
        r = diag(command, out, "--out", tmp_path / "o2", "-q")
        assert r.exit_code == 2 and r.stderr.count("\n") == 1, r.output
        assert f"'{out}' is an output folder diag wrote from the run '{run_dir}'" in r.stderr
        assert f"pass '{run_dir}' as the run" in r.stderr
        assert not (tmp_path / "o2").exists()


def test_a_rerun_that_fails_at_every_checkpoint_keeps_the_last_manifest(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert diag("run", run_dir, "--analyzers", "weights", "--out", out, "-q").exit_code == 0
    before = (out / "diag-run.json").read_bytes()
    # a factory whose model fits none of the checkpoints: discovered, started, then every checkpoint fails
    r = diag("run", run_dir, "--analyzers", "weights", "--model", "tinymodels:build_tiny", "--out", out, "-q")
    assert r.exit_code == 2 and r.stderr.startswith("diag: error: every checkpoint failed"), r.output
    assert (out / "diag-run.json").read_bytes() == before  # it read "in progress" with the failing command
    (run_dir / "step_00300.pt").write_bytes(b"")
    stopped = diag("run", run_dir, "--analyzers", "weights", "--out", out, "-q", "--fail-fast")
    assert stopped.exit_code == 2 and "(--fail-fast)" in stopped.stderr, stopped.output
    assert (out / "diag-run.json").read_bytes() == before
    report = diag("report", run_dir, "--out", out, "-q")  # reruns the last finished sweep's command
    assert report.exit_code == 0, report.output


def test_a_first_sweep_that_fails_keeps_its_manifest_in_progress(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = diag("run", run_dir, "--analyzers", "weights", "--model", "tinymodels:build_tiny", "--out", out, "-q")
    assert r.exit_code == 2, r.output
    assert json.loads((out / "diag-run.json").read_text())["status"] == "in progress"
