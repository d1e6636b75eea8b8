"""From a context to operators: the glue (sharding default, options), the gate measuring through the
same path as ``diag hessian``, and ``--compile`` notes reaching the analyzer's metadata and the CLI."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import tinymodels as tm
from diag_cli.main import app
from diagnostics import distributed, gate
from diagnostics.analyzers.hessian import ANALYZER, SCALE_OPTIONS, HessianConfig, analyze_hessian
from diagnostics.binding import Binding
from diagnostics.checkpoint import load_checkpoint, save_checkpoint
from diagnostics.context import build_context
from diagnostics.errors import DiagnosticsError
from diagnostics.gate import GateSettings, measure_sharpness
from diagnostics.linalg.operator import dense_hessian
from diagnostics.operators import data_loop, hessian_operator
from diagnostics.runner import run_analyzer


def tiny_ctx(tmp_path: Path, seed: int = 0, batch_size: int | None = None):
    p = save_checkpoint(tmp_path / "t.pt", tm.build_tiny(), step=3)
    return build_context(
        load_checkpoint(p),
        Binding(model="tinymodels:build_tiny", data="tinymodels:tiny_data", loss="cross_entropy"),
        dtype="float64",
        seed=seed,
        batch_size_=batch_size,
    )


def failing_compile(fn, **kwargs):
    def fail(*args, **kw):
        raise RuntimeError("inductor unavailable")

    return fail


# -------------------------------------------------------------------------------------- glue
def test_hessian_operator_takes_loop_and_operator_options(tmp_path: Path) -> None:
    ctx = tiny_ctx(tmp_path, batch_size=10)  # 10, 10, 3
    H = dense_hessian(hessian_operator(ctx))
    op = hessian_operator(ctx, micro_batch=4, accumulate_dtype="float64", backend="reverse", max_vectors=3)
    assert [len(b[1]) for b in op.loop.batches] == [4, 4, 2, 4, 4, 2, 3]
    assert op.backend == "reverse" and op.max_vectors == 3 and not op.loop.sharded
    torch.testing.assert_close(dense_hessian(op), H, rtol=1e-12, atol=1e-14)
    with pytest.raises(TypeError):
        hessian_operator(ctx, micro_batches=4)


def test_without_a_process_group_nothing_is_sharded(tmp_path: Path) -> None:
    ctx = tiny_ctx(tmp_path)
    assert not distributed.data_parallel_active()
    assert not data_loop(ctx.batches).sharded
    assert not hessian_operator(ctx).loop.sharded
    with pytest.raises(ValueError, match="weights"):
        data_loop(ctx.batches, shard=True, weights=[1.0])


# -------------------------------------------------------------------------------------- gate
def test_gate_replicates_are_what_diag_hessian_measures(tmp_path: Path) -> None:
    settings = GateSettings(replicates=2, seed=4, tol=1e-6)
    reps = measure_sharpness(tiny_ctx(tmp_path), settings)
    for rep in reps:
        res = analyze_hessian(HessianConfig(top_k=1, tol=1e-6), tiny_ctx(tmp_path, seed=rep.seed))
        assert rep.sharpness == res.records[0].value  # the same path, the same bits
        assert rep.iterations == res.metadata["model"]["lanczos"]["iterations"]


@dataclass
class ScaledGateSettings(GateSettings):
    """Gate settings with some of ``diag hessian``'s scale options (what the gate's declaration may add)."""

    micro_batch: int | None = None
    max_vectors: int = 16
    block_size: int = 1
    accumulate_dtype: str | None = None


def test_gate_applies_the_scale_options_it_is_given(tmp_path: Path, monkeypatch) -> None:
    assert {
        "backend",
        "micro_batch",
        "autocast",
        "accumulate_dtype",
        "max_vectors",
        "basis_device",
        "block_size",
    } <= set(SCALE_OPTIONS)
    ctx = tiny_ctx(tmp_path)
    built = []
    original = gate.build_operator

    def spy(*args, **kwargs):
        built.append(original(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(gate, "build_operator", spy)
    plain = measure_sharpness(ctx, GateSettings(replicates=2, tol=1e-8))
    scaled = measure_sharpness(
        ctx, ScaledGateSettings(replicates=2, tol=1e-8, micro_batch=4, max_vectors=2, accumulate_dtype="float64")
    )
    assert [op.loop.micro_batch for op in built] == [None, None, 4, 4]
    assert built[-1].max_vectors == 2 and built[-1].loop.accumulate_dtype == torch.float64
    exact = float(np.linalg.eigvalsh(dense_hessian(hessian_operator(ctx)).numpy())[-1])
    for a, b in zip(plain, scaled):
        assert a.sharpness == pytest.approx(exact, rel=1e-7)
        assert b.sharpness == pytest.approx(exact, rel=1e-7)
    with pytest.raises(DiagnosticsError, match="--micro-batch"):
        measure_sharpness(ctx, ScaledGateSettings(replicates=2, micro_batch=0))


# ----------------------------------------------------------------------------------- compile
def test_compile_fallback_note_reaches_the_analyzer_metadata(tmp_path: Path, monkeypatch) -> None:
    ctx = tiny_ctx(tmp_path, batch_size=10)  # several batches: auto is forward-over-reverse, which compiles
    eager = analyze_hessian(HessianConfig(top_k=2, tol=1e-8, per_layer=True), ctx)
    monkeypatch.setattr(torch, "compile", failing_compile)
    res = run_analyzer(ANALYZER, HessianConfig(top_k=2, tol=1e-8, per_layer=True, compile=True), ctx)
    notes = [n for n in res.metadata["notes"] if "--compile" in n]
    assert len(notes) == 1 and "RuntimeError: inductor unavailable" in notes[0]  # once, not once per layer
    assert res.metadata["config"]["compile"] is True and res.metadata["backend"] in ("auto", "forward")
    assert [(r.metric, r.group, r.index) for r in res.records] == [(r.metric, r.group, r.index) for r in eager.records]
    for a, b in zip(res.records, eager.records):
        assert a.value == pytest.approx(b.value, rel=1e-8)
    assert not any("--compile" in n for n in eager.metadata["notes"])


def test_cli_compile_flag(tmp_path: Path, monkeypatch) -> None:
    ckpt = save_checkpoint(tmp_path / "tiny.pt", tm.build_tiny(), step=1)
    monkeypatch.setattr(torch, "compile", failing_compile)
    out = tmp_path / "out.json"
    args = ["hessian", str(ckpt), "--model", "tinymodels:build_tiny", "--data", "tinymodels:tiny_data"]
    r = CliRunner().invoke(app, [*args, "--compile", "--dtype", "float64", "--out", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    doc = json.loads(out.read_text())
    assert doc["metadata"]["config"]["compile"] is True
    assert any("--compile does not apply to the cached backend" in n for n in doc["metadata"]["notes"])
    r = CliRunner().invoke(app, [*args, "--compile", "--backend", "forward", "--out", str(out), "--force", "-q"])
    assert r.exit_code == 0, r.output
    notes = json.loads(out.read_text())["metadata"]["notes"]
    assert any("RuntimeError: inductor unavailable" in n for n in notes)
