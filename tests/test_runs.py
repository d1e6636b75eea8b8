"""Runs: checkpoint discovery, cached and resumable sweeps, output folders."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import torch

from diagnostics.analyzers.registry import get_analyzer
from diagnostics.checkpoint import save_checkpoint
from diagnostics.errors import DiagnosticsError
from diagnostics.examples.digits import build_mlp
from diagnostics.results import read_result
from diagnostics.runs import (
    MANIFEST_NAME,
    SweepSettings,
    cache_inputs,
    cache_key,
    check_pattern,
    discover_checkpoints,
    is_ours,
    last_manifest_kept,
    parse_overrides,
    prepare_out_dir,
    resolve_settings,
    sweep,
    write_sweep,
)
from diagnostics.spec import Analyzer

FAST = {"hessian": {"top_k": 1, "tol": 1e-3}}


def settings(**options) -> SweepSettings:
    return SweepSettings(analyzers=["hessian"], options={"hessian": {**FAST["hessian"], **options}}, samples=300)


class Counting:
    """The registered hessian analyzer with a run() that, counting calls per checkpoint;
    ``interrupt_at=n`` raises KeyboardInterrupt on the n-th call (before computing it)."""

    def __init__(self, interrupt_at: int | None = None) -> None:
        self.real = get_analyzer("hessian")
        self.calls: Counter[str] = Counter()
        self.interrupt_at = interrupt_at
        self.attempts = 0

    def run(self, config, ctx, progress=None, **extras):
        self.attempts += 1
        if self.interrupt_at is not None and self.attempts == self.interrupt_at:
            raise KeyboardInterrupt
        self.calls[ctx.checkpoint] += 1
        return self.real.run(config, ctx, progress, **extras)

    @property
    def specs(self) -> dict[str, Analyzer]:
        return {"hessian": dataclasses.replace(self.real, run=self.run)}


# ---------------------------------------------------------------------------------- discovery
def save_digits(path: Path, *, seed: int, step: int) -> Path:
    """A self-describing digits MLP checkpoint (width 16, MSE, lr 2.0) like the run's, with other weights."""
    return save_checkpoint(
        path,
        build_mlp(width=16, seed=seed),
        step=step,
        lr=2.0,
        model_factory="diagnostics.examples.digits:build_mlp",
        model_kwargs={"width": 16},
        data_factory="diagnostics.examples.digits:train_data",
        loss="mse",
    )


def test_discover_orders_by_step_from_metadata_then_file_name(run_copy: Path) -> None:
    model = build_mlp(width=16)
    # metadata wins over the file name
    save_checkpoint(run_copy / "step_99999.pt", model, step=150)
    # a plain state_dict: the step comes from the file name
    nested = run_copy / "extra"
    nested.mkdir()
    torch.save(model.state_dict(), nested / "iter_250.pt")
    torch.save(model.state_dict(), run_copy / "final.pt")  # no step at all: last
    hidden = run_copy / ".trash"
    hidden.mkdir()
    torch.save(model.state_dict(), hidden / "step_5.pt")
    (run_copy / "notes.txt").write_text("not a checkpoint")
    found = discover_checkpoints(run_copy)
    assert [(c.name, c.step, c.step_source) for c in found] == [
        ("step_00000.pt", 0, "metadata"),
        ("step_00100.pt", 100, "metadata"),
        ("step_99999.pt", 150, "metadata"),
        ("step_00200.pt", 200, "metadata"),
        ("extra/iter_250.pt", 250, "file name"),
        ("final.pt", None, "unknown"),
    ]
    assert all(len(c.sha256) == 64 for c in found)
    only = discover_checkpoints(run_copy, pattern="step_*.pt")
    assert [c.step for c in only] == [0, 100, 150, 200]


def test_discover_errors(tmp_path: Path) -> None:
    with pytest.raises(DiagnosticsError, match="no such run folder"):
        discover_checkpoints(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DiagnosticsError, match="no checkpoint files"):
        discover_checkpoints(tmp_path / "empty")


# -------------------------------------------------------------------------------------- sweeps
def test_interrupted_sweep_resumes_computing_each_checkpoint_once(run_copy: Path, tmp_path: Path) -> None:
    reference = Counting()
    full = sweep(run_copy, settings(), cache_dir=tmp_path / "ref", specs=reference.specs)
    assert sorted(reference.calls.values()) == [1, 1, 1]

    cache = tmp_path / "cache"
    first = Counting(interrupt_at=2)  # Ctrl-C while the second checkpoint is being analysed
    with pytest.raises(KeyboardInterrupt):
        sweep(run_copy, settings(), cache_dir=cache, specs=first.specs)
    assert list(first.calls) == ["step_00000.pt"]
    resumed = Counting()
    again = sweep(run_copy, settings(), cache_dir=cache, specs=resumed.specs)
    assert sorted(resumed.calls) == ["step_00100.pt", "step_00200.pt"]
    total = first.calls + resumed.calls
    assert total == Counter({"step_00000.pt": 1, "step_00100.pt": 1, "step_00200.pt": 1})
    assert again.cached == [("step_00000.pt", "hessian")]
    pd.testing.assert_frame_equal(again.frame, full.frame)

    third = Counting()
    cached = sweep(run_copy, settings(), cache_dir=cache, specs=third.specs)
    assert sum(third.calls.values()) == 0 and len(cached.cached) == 3
    pd.testing.assert_frame_equal(cached.frame, full.frame)


def test_interrupt_between_checkpoints_through_progress(run_copy: Path, tmp_path: Path) -> None:
    def stop_after_two(task: str, done: int, total: int) -> None:
        if task == "checkpoints" and done == 2:
            raise KeyboardInterrupt

    counter = Counting()
    with pytest.raises(KeyboardInterrupt):
        sweep(run_copy, settings(), cache_dir=tmp_path / "c", specs=counter.specs, progress=stop_after_two)
    resumed = Counting()
    res = sweep(run_copy, settings(), cache_dir=tmp_path / "c", specs=resumed.specs)
    assert sorted(counter.calls) == ["step_00000.pt", "step_00100.pt"]
    assert list(resumed.calls) == ["step_00200.pt"]
    assert res.frame["checkpoint"].unique().tolist() == ["step_00000.pt", "step_00100.pt", "step_00200.pt"]


def test_changed_config_or_setting_invalidates_the_cache(run_copy: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    c1 = Counting()
    sweep(run_copy, settings(), cache_dir=cache, specs=c1.specs)
    c2 = Counting()
    two = sweep(run_copy, settings(top_k=2), cache_dir=cache, specs=c2.specs)
    assert sum(c2.calls.values()) == 3
    assert (two.frame.query("metric == 'eigenvalue'").groupby("checkpoint").size() == 2).all()
    c3 = Counting()
    other_samples = SweepSettings(analyzers=["hessian"], options=FAST, samples=200)
    sweep(run_copy, other_samples, cache_dir=cache, specs=c3.specs)
    assert sum(c3.calls.values()) == 3
    c4 = Counting()
    back = sweep(run_copy, settings(), cache_dir=cache, specs=c4.specs)
    assert sum(c4.calls.values()) == 0 and len(back.cached) == 3
    # the key covers config, settings and the checkpoint content
    s = settings()
    cfg = get_analyzer("hessian").make_config(s.options["hessian"])
    base = cache_key(cache_inputs("a" * 64, "hessian", cfg, s))
    assert base != cache_key(cache_inputs("b" * 64, "hessian", cfg, s))
    tighter = get_analyzer("hessian").make_config({**s.options["hessian"], "tol": 1e-4})
    assert base != cache_key(cache_inputs("a" * 64, "hessian", tighter, s))
    assert base != cache_key(cache_inputs("a" * 64, "hessian", cfg, SweepSettings(options=FAST, samples=300, seed=1)))
    assert base != cache_key(
        cache_inputs("a" * 64, "hessian", cfg, SweepSettings(options=FAST, samples=300, dtype="float64"))
    )


def test_changed_checkpoint_is_recomputed_alone(run_copy: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    sweep(run_copy, settings(), cache_dir=cache, specs=Counting().specs)
    save_digits(run_copy / "step_00100.pt", seed=5, step=100)
    counter = Counting()
    res = sweep(run_copy, settings(), cache_dir=cache, specs=counter.specs)
    assert counter.calls == Counter({"step_00100.pt": 1})
    assert ("step_00100.pt", "hessian") in res.computed


def test_corrupt_cache_entry_is_recomputed(run_copy: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = sweep(run_copy, settings(), cache_dir=cache)
    entries = sorted((cache / "hessian").glob("*.json"))
    assert len(entries) == 3
    entries[0].write_text('{"metadata": {"cache": ')  # truncated by hand
    counter = Counting()
    again = sweep(run_copy, settings(), cache_dir=cache, specs=counter.specs)
    assert sum(counter.calls.values()) == 1
    pd.testing.assert_frame_equal(again.frame, first.frame)


def test_table_artifacts_survive_the_cache(run_copy: Path, tmp_path: Path) -> None:
    s = settings(density=True, density_probes=2, density_steps=15, density_points=64)
    fresh = sweep(run_copy, s, cache_dir=tmp_path / "c")
    cached = sweep(run_copy, s, cache_dir=tmp_path / "c")
    assert len(cached.cached) == 3
    a, b = fresh.artifact_frame("hessian", "density"), cached.artifact_frame("hessian", "density")
    assert a is not None and len(a) == 3 * 64
    pd.testing.assert_frame_equal(a, b)
    assert set(a["step"]) == {0, 100, 200}


def test_unknown_analyzer_and_options(run_copy: Path) -> None:
    with pytest.raises(DiagnosticsError, match=r"unknown analyzer 'nope'; available: .*hessian"):
        sweep(run_copy, SweepSettings(analyzers=["hessian", "nope"]))
    with pytest.raises(DiagnosticsError, match=r"unknown option 'bogus' in \[hessian\]"):
        sweep(run_copy, SweepSettings(options={"hessian": {"bogus": 1}}))


def test_bad_checkpoint_is_reported_and_others_analysed(run_copy: Path, tmp_path: Path) -> None:
    (run_copy / "step_00300.pt").write_bytes(b"not a checkpoint at all")
    res = sweep(run_copy, settings(), cache_dir=tmp_path / "c")
    assert [(f.checkpoint, f.analyzer) for f in res.failures] == [("step_00300.pt", "hessian")]
    assert "is a text file, not a PyTorch checkpoint" in res.failures[0].message
    assert sorted(res.frame["checkpoint"].unique()) == ["step_00000.pt", "step_00100.pt", "step_00200.pt"]
    assert res.metadata()["checkpoints"][-1]["status"] == {"hessian": "failed"}
    with pytest.raises(DiagnosticsError, match="is a text file, not a PyTorch checkpoint"):
        sweep(run_copy, settings(), cache_dir=tmp_path / "c", keep_going=False)


def test_every_checkpoint_failing_is_an_error(run_copy: Path) -> None:
    with pytest.raises(DiagnosticsError, match=r"every checkpoint failed.*model factory"):
        sweep(run_copy, SweepSettings(options=FAST, samples=300, model="diagnostics.examples.digits:nothing_here"))


# ------------------------------------------------------------------------------------- settings
def test_overrides_and_settings_from_config() -> None:
    assert parse_overrides(["hessian.top_k=3", "hessian.trace=true", "rankme.layers=['a', 'b']", "x.y=word"]) == {
        "hessian": {"top_k": 3, "trace": True},
        "rankme": {"layers": ["a", "b"]},
        "x": {"y": "word"},
    }
    with pytest.raises(DiagnosticsError, match=r"ANALYZER\.OPTION=VALUE"):
        parse_overrides(["top_k=3"])
    cfg = {"analyzers": ["hessian"], "hessian": {"top_k": 2, "trace": True}, "samples": 100, "seed": 3}
    s = resolve_settings(cfg, overrides={"hessian": {"top_k": 4}}, samples=50)
    assert s.analyzers == ["hessian"] and s.options == {"hessian": {"top_k": 4, "trace": True}}
    assert (s.samples, s.seed) == (50, 3)
    assert resolve_settings({}, analyzers="hessian, rankme,hessian").analyzers == ["hessian", "rankme"]
    with pytest.raises(DiagnosticsError, match="not being run"):
        resolve_settings({}, analyzers="hessian", overrides={"rankme": {"layers": ["x"]}})


@pytest.mark.parametrize("source", ["flag", "file"])
def test_a_sweep_device_is_checked_once_before_any_checkpoint(source: str) -> None:
    given = {"device": "meta"}
    with pytest.raises(DiagnosticsError, match="--device 'meta'"):
        resolve_settings(given if source == "file" else {}, **({} if source == "file" else given))
    assert resolve_settings({}, device="cpu").device == "cpu"
    assert resolve_settings({"device": "auto"}).device == "auto"


# -------------------------------------------------------------------------------- output folders
def test_output_folder_rules_and_files(run_copy: Path, tmp_path: Path) -> None:
    foreign = tmp_path / "theirs"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("user data")
    with pytest.raises(DiagnosticsError, match="not empty and was not written by diag"):
        prepare_out_dir(foreign)
    with pytest.raises(DiagnosticsError, match="input folder itself"):
        prepare_out_dir(run_copy, protected=[run_copy])
    prepare_out_dir(foreign, force=True)
    out = prepare_out_dir(tmp_path / "reports" / "run")
    res = sweep(run_copy, settings(), cache_dir=out / "cache", exclude=[out])
    paths = write_sweep(out, res, invocation={"samples": 300})
    assert is_ours(out) and not is_ours(foreign)
    assert (foreign / "keep.txt").read_text() == "user data"
    prepare_out_dir(out)  # ours: fine although not empty
    table = read_result(paths["parquet"])
    pd.testing.assert_frame_equal(table.frame(), res.frame)
    assert table.metadata["counts"] == {
        "checkpoints": 3,
        "computed": 3,
        "cached": 0,
        "failed": 0,
        "skipped": 0,
        "records": 9,
    }
    csv = read_result(paths["csv"])
    assert len(csv.records) == len(res.frame)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["invocation"] == {"samples": 300}
    assert [c["step"] for c in manifest["checkpoints"]] == [0, 100, 200]
    assert manifest["settings"]["samples"] == 300 and "versions" in manifest


# ------------------------------------------------------------------ trust nothing the disk says
def _edit_json(path: Path, fn) -> None:
    doc = json.loads(path.read_text())
    fn(doc)
    path.write_text(json.dumps(doc, indent=2))


def test_hand_edited_cached_value_is_recomputed_with_a_warning(run_copy: Path, tmp_path: Path) -> None:
    """Issue 10.5: a cached value edited by hand came out as a result."""
    cache = tmp_path / "cache"
    first = sweep(run_copy, settings(), cache_dir=cache)
    entry = next(
        p for p in sorted((cache / "hessian").glob("*.json")) if p.name.startswith(first.checkpoints[1].sha256[:16])
    )

    def tamper(doc):
        doc["records"][0]["value"] = 123.456

    _edit_json(entry, tamper)
    counter = Counting()
    again = sweep(run_copy, settings(), cache_dir=cache, specs=counter.specs)
    assert counter.calls == Counter({"step_00100.pt": 1})
    assert 123.456 not in again.frame["value"].tolist()
    pd.testing.assert_frame_equal(again.frame, first.frame)
    assert any("checksum" in w and entry.name in w for w in again.warnings), again.warnings
    third = sweep(run_copy, settings(), cache_dir=cache, specs=Counting().specs)
    assert len(third.cached) == 3 and not third.warnings  # the recomputed entry is trusted again


def test_hand_edited_cached_step_is_read_again_with_a_warning(run_copy: Path, tmp_path: Path) -> None:
    """Issue 10.5: a hand-edited step (99999) in the cache came out in the table."""
    cache = tmp_path / "cache"
    first = sweep(run_copy, settings(), cache_dir=cache)
    info = cache / "checkpoints" / f"{first.checkpoints[2].sha256}.json"
    assert info.is_file()
    _edit_json(info, lambda doc: doc.update(step=99999))
    again = sweep(run_copy, settings(), cache_dir=cache)
    assert sorted(again.frame["step"].unique().tolist()) == [0, 100, 200]
    assert [c.step for c in again.checkpoints] == [0, 100, 200]
    assert any("checksum" in w and info.name in w for w in again.warnings), again.warnings


def test_checkpoint_completed_after_discovery_is_skipped_then_picked_up(run_copy: Path, tmp_path: Path) -> None:
    """Issue 10.5: a checkpoint being written during a sweep was hashed half-written, analysed complete and
    recorded under the wrong hash and step. Now the bytes analysed are the bytes hashed: a file that changed
    since it was hashed is skipped with a note, and the next run analyses it."""
    cache = tmp_path / "cache"
    src = save_digits(tmp_path / "src.pt", seed=3, step=250)
    full = src.read_bytes()
    late = run_copy / "zz_late.pt"  # no step in its name: only its metadata (step 250) can tell
    late.write_bytes(full[: len(full) // 2])  # the trainer is still writing it

    def finish_writing(task: str, done: int, total: int) -> None:
        if task == "checkpoints" and done == 0:
            late.write_bytes(full)

    res = sweep(run_copy, settings(), cache_dir=cache, progress=finish_writing)
    assert [s.checkpoint for s in res.skipped] == ["zz_late.pt"]
    assert "changed" in res.skipped[0].reason
    assert "zz_late.pt" not in set(res.frame["checkpoint"]) and not res.failures
    status = {c["checkpoint"]: c["status"] for c in res.metadata()["checkpoints"]}
    assert status["zz_late.pt"] == {"hessian": "skipped"}
    counter = Counting()
    nxt = sweep(run_copy, settings(), cache_dir=cache, specs=counter.specs)
    assert counter.calls == Counter({"zz_late.pt": 1}) and not nxt.skipped
    late_rc = next(c for c in nxt.checkpoints if c.name == "zz_late.pt")
    assert late_rc.sha256 == hashlib.sha256(full).hexdigest()
    assert (late_rc.step, late_rc.step_source) == (250, "metadata")
    assert set(nxt.frame.query("checkpoint == 'zz_late.pt'")["step"]) == {250}


def test_checkpoint_changing_while_read_is_skipped(run_copy: Path, tmp_path: Path, monkeypatch) -> None:
    import diagnostics.checkpoint as checkpoint_mod

    real_fstat = os.fstat
    calls = {"n": 0}
    target = (run_copy / "step_00100.pt").stat().st_ino

    def fstat_appending(fd: int):
        st = real_fstat(fd)
        if st.st_ino == target:
            calls["n"] += 1
            if calls["n"] % 2 == 0:  # the fstat after the read sees a grown file
                return os.stat_result((*st[:6], st.st_size + 1, *st[7:]))
        return st

    monkeypatch.setattr(checkpoint_mod.os, "fstat", fstat_appending)
    res = sweep(run_copy, settings(), cache_dir=tmp_path / "c")
    assert [s.checkpoint for s in res.skipped] == ["step_00100.pt"] and "while it was being read" in res.skipped[
        0
    ].reason
    assert sorted(set(res.frame["checkpoint"])) == ["step_00000.pt", "step_00200.pt"]
    monkeypatch.undo()
    nxt = sweep(run_copy, settings(), cache_dir=tmp_path / "c")
    assert not nxt.skipped and len(nxt.computed) == 1 and len(nxt.cached) == 2


def test_warm_start_passes_the_previous_eigenvectors_and_keeps_the_answers(run_copy: Path) -> None:
    # --warm-start: checkpoint t's Lanczos starts from t-1's eigenvectors (held in memory, never stored);
    # the bounds are certified as before, so the eigenvalues agree with a cold sweep within their bounds
    cold = sweep(run_copy, settings(top_k=2))
    warm = sweep(run_copy, settings(top_k=2, warm_start=True))
    for name in ("step_00000.pt", "step_00100.pt", "step_00200.pt"):
        c, w = cold.results[(name, "hessian")], warm.results[(name, "hessian")]
        ce = [r for r in c.records if r.metric == "eigenvalue"]
        we = [r for r in w.records if r.metric == "eigenvalue"]
        for a, b in zip(ce, we):
            assert abs(a.value - b.value) <= a.stderr + b.stderr + 1e-12
            assert abs(a.value - b.value) <= 2e-3 * abs(a.value)
        source = w.metadata["model"]["lanczos"]["warm_start"]
        assert source == {"step_00000.pt": None, "step_00100.pt": "step 0", "step_00200.pt": "step 100"}[name]
        assert c.metadata["model"]["lanczos"]["warm_start"] is None
        if source:
            assert f"warm start from {source} (its eigenvectors start Lanczos)" in w.metadata["notes"]
        assert "tensor(" not in repr(w.metadata) and "tensor(" not in repr(w.records)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"model": 5}, r"'model' entry is an int"),
        ({"metadata": [1, 2]}, r"'metadata' entry is a list"),
        ({"model": {"w": "not a tensor"}}, r"'model' entry holds a str under 'w'"),
        ({"model": {"w": torch.zeros(2, 2).to_sparse()}}, r"'w' is a sparse_coo tensor"),
    ],
)
def test_malformed_diagnostics_checkpoint_fails_alone(run_copy: Path, payload: dict, message: str) -> None:
    from diagnostics.checkpoint import FORMAT_TAG

    good = torch.load(run_copy / "step_00100.pt", weights_only=True)
    torch.save({**good, "format": FORMAT_TAG, **payload}, run_copy / "step_00150.pt")
    res = sweep(run_copy, settings())
    assert [(f.checkpoint, f.analyzer) for f in res.failures] == [("step_00150.pt", "hessian")]
    assert "unexpected" not in res.failures[0].message
    assert re.search(message, res.failures[0].message)
    assert sorted(res.frame["checkpoint"].unique()) == ["step_00000.pt", "step_00100.pt", "step_00200.pt"]
    with pytest.raises(DiagnosticsError, match=message):
        sweep(run_copy, settings(), keep_going=False)


def test_output_folder_of_another_run_needs_force(run_copy: Path, tmp_path: Path) -> None:
    out = prepare_out_dir(tmp_path / "reports" / "run", protected=[run_copy])
    res = sweep(run_copy, settings(), cache_dir=out / "cache", exclude=[out])
    write_sweep(out, res)
    before = (out / MANIFEST_NAME).read_bytes()
    prepare_out_dir(out, protected=[run_copy])  # the same run again: resumes
    other = tmp_path / "elsewhere" / "run"
    other.mkdir(parents=True)
    with pytest.raises(DiagnosticsError, match=r"holds the results and report of another run .*--force") as info:
        prepare_out_dir(out, protected=[other])
    assert str(run_copy) in str(info.value)
    assert (out / MANIFEST_NAME).read_bytes() == before
    prepare_out_dir(out, force=True, protected=[other])


# --------------------------------------------------------------------------- fuzzer findings
@pytest.mark.parametrize(
    ("pattern", "why"),
    [
        ("/dev/null", "is an absolute path"),
        ("/tmp/*.pt", "is an absolute path"),
        ("../*.pt", r"leaves the run folder \('..'\)"),
        ("sub/../step_*.pt", r"leaves the run folder \('..'\)"),
        (".", "names the run folder itself, not files in it"),
        ("**.pt", r"uses '\*\*' inside a name \('\*\*' matches whole folders only, as in '\*\*/\*.pt'\)"),
    ],
)
def test_a_pattern_outside_the_run_folder_is_one_line(run_copy: Path, pattern: str, why: str) -> None:
    """Fuzzer B: --pattern /dev/null raised NotImplementedError from Path.glob ('.' an IndexError, '**.pt' a
    ValueError), and '../*.pt' matched files outside the run that were then skipped: 'no checkpoint files'."""
    message = (
        rf"^--pattern '{re.escape(pattern)}' {why}; pass a glob of checkpoint files relative to the run folder, "
        r"e.g. 'step_\*.pt' or '\*\*/\*.ckpt'$"
    )
    with pytest.raises(DiagnosticsError, match=message):
        discover_checkpoints(run_copy, pattern=pattern)
    with pytest.raises(DiagnosticsError, match=message):
        resolve_settings({}, pattern=pattern)
    with pytest.raises(DiagnosticsError, match=message):
        sweep(run_copy, SweepSettings(pattern=pattern))


def test_relative_patterns_are_accepted(run_copy: Path) -> None:
    for pattern in (None, "step_*.pt", "./step_*.pt", "**/*.pt", "step_00100.pt"):
        check_pattern(pattern)
    assert [c.name for c in discover_checkpoints(run_copy, pattern="**/step_001*.pt")] == ["step_00100.pt"]


def test_an_output_folder_that_contains_the_run_is_refused_even_with_force(run_copy: Path, tmp_path: Path) -> None:
    """Fuzzer C1: --out . (or RUN/..) --force wrote its manifest there and then found no checkpoints in RUN,
    because the sweep skips its output folder, which held the run."""
    before = {p.name: p.read_bytes() for p in run_copy.iterdir()}
    for out in (tmp_path, run_copy / "..", Path(".")):  # the tests run in tmp_path
        for force in (False, True):
            with pytest.raises(DiagnosticsError) as info:
                prepare_out_dir(out, force=force, protected=[run_copy])
            assert str(info.value) == (
                f"--out '{out}' contains the run folder '{run_copy}', and a sweep never looks for checkpoints in its "
                "output folder; choose an --out outside the run folder"
            )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # nothing written beside the run
    assert {p.name: p.read_bytes() for p in run_copy.iterdir()} == before
    with pytest.raises(DiagnosticsError, match="input folder itself"):  # the run folder itself: as before
        prepare_out_dir(run_copy, force=True, protected=[run_copy])
    inside = prepare_out_dir(run_copy / "reports", protected=[run_copy])  # inside the run: skipped by the sweep
    res = sweep(run_copy, settings(), cache_dir=inside / "cache", exclude=[inside])
    assert [c.name for c in res.checkpoints] == ["step_00000.pt", "step_00100.pt", "step_00200.pt"]


def test_a_dangling_link_named_like_a_checkpoint_fails_alone_with_its_reason(run_copy: Path, tmp_path: Path) -> None:
    (run_copy / "step_00300.pt").symlink_to(tmp_path / "gone.pt")  # the target was deleted
    (run_copy / "loop_a.pt").symlink_to(run_copy / "loop_b.pt")
    (run_copy / "loop_b.pt").symlink_to(run_copy / "loop_a.pt")
    res = sweep(run_copy, SweepSettings(analyzers=["weights"]))
    failed = {f.checkpoint: f.message for f in res.failures}
    assert set(failed) == {"step_00300.pt", "loop_a.pt", "loop_b.pt"}  # named, not silently skipped
    assert "no such checkpoint" in failed["step_00300.pt"] and "symbolic links" in failed["loop_a.pt"]
    assert len({r for r in res.frame["checkpoint"]}) == 3  # the real checkpoints were analysed


def test_last_manifest_kept_puts_the_manifest_back_only_when_the_block_raises(tmp_path: Path) -> None:
    path = tmp_path / MANIFEST_NAME
    path.write_text('{"status": "complete"}')
    with pytest.raises(KeyboardInterrupt), last_manifest_kept(tmp_path):
        path.write_text('{"status": "in progress"}')
        raise KeyboardInterrupt
    assert path.read_text() == '{"status": "complete"}'
    with last_manifest_kept(tmp_path):
        path.write_text('{"status": "in progress"}')
    assert path.read_text() == '{"status": "in progress"}'  # a sweep that ends normally writes its own
    path.unlink()
    with pytest.raises(RuntimeError), last_manifest_kept(tmp_path):
        path.write_text('{"status": "in progress"}')
        raise RuntimeError("every checkpoint failed")
    assert path.read_text() == '{"status": "in progress"}'  # no manifest before: a first sweep resumes
