"""The hessian analyzer against exact answers in float64: dense Hessians of tiny models, a quadratic with a
known spectrum, per-layer blocks, per-class decomposition, edge-of-stability figures, and PyHessian."""

from __future__ import annotations

import math
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import tinymodels as tm
from diagnostics.analyzers.hessian import ANALYZER, HessianConfig, analyze_hessian, class_batches
from diagnostics.binding import Binding
from diagnostics.checkpoint import load_checkpoint, save_checkpoint
from diagnostics.context import build_context
from diagnostics.linalg.operator import dense_hessian
from diagnostics.operators import hessian_operator
from diagnostics.runner import run_analyzer


def tiny_ctx(tmp_path: Path, optimizer=None, lr=None, data="tinymodels:tiny_data", seed=0):
    m = tm.build_tiny()
    p = save_checkpoint(tmp_path / "t.pt", m, step=3, optimizer=optimizer, lr=lr)
    return build_context(
        load_checkpoint(p),
        Binding(model="tinymodels:build_tiny", data=data, loss="cross_entropy"),
        dtype="float64",
        seed=seed,
    )


def values(result, metric, group=None):
    rows = [r for r in result.records if r.metric == metric and r.group == group]
    return np.array([r.value for r in sorted(rows, key=lambda r: -1 if r.index is None else r.index)])


def test_top_and_bottom_match_dense_eigenvalues(tmp_path: Path) -> None:
    ctx = tiny_ctx(tmp_path)
    exact = np.linalg.eigvalsh(dense_hessian(hessian_operator(ctx)).numpy())
    res = run_analyzer(ANALYZER, HessianConfig(top_k=3, bottom_k=2, tol=1e-8), ctx)
    np.testing.assert_allclose(values(res, "eigenvalue"), exact[::-1][:3], rtol=1e-6)
    np.testing.assert_allclose(values(res, "bottom_eigenvalue"), exact[:2], rtol=1e-6)
    assert exact[0] < 0  # the tiny random model sits at a saddle: bottom eigenvalues are negative
    r0 = next(r for r in res.records if r.metric == "eigenvalue" and r.index == 0)
    assert r0.analyzer == "hessian" and r0.checkpoint == "t.pt" and r0.step == 3 and r0.stderr <= 1e-8 * abs(r0.value)
    md = res.metadata
    assert md["hvp_count"] == md["model"]["lanczos"]["hvps"] > 0 and md["seconds"] > 0
    assert md["samples"] == 23 and md["dtype"] == "float64" and "torch" in md["versions"]


def test_same_seed_same_numbers(tmp_path: Path) -> None:
    cfg = HessianConfig(top_k=2, trace=True, density=True, density_probes=2, density_steps=10)
    a = analyze_hessian(cfg, tiny_ctx(tmp_path, seed=4))
    b = analyze_hessian(cfg, tiny_ctx(tmp_path, seed=4))
    assert [r.value for r in a.records] == [r.value for r in b.records]


def test_quadratic_with_known_spectrum(tmp_path: Path) -> None:
    # loss = mean((X w - y)^2) over N samples -> H = (2/N) X^T X; choose X with known singular values
    d, n = 12, 40
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(n, d, dtype=torch.float64, generator=g))
    V, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=g))
    sv = torch.linspace(1.0, 6.0, d, dtype=torch.float64)
    X = U @ torch.diag(sv) @ V.T
    y = torch.randn(n, 1, dtype=torch.float64, generator=g)
    spectrum = np.sort((2.0 / n) * sv.numpy() ** 2)[::-1]
    mod = tmp_path / "quad_mod.py"
    mod.write_text(
        "import torch\n"
        f"X = torch.tensor({X.tolist()}, dtype=torch.float64)\n"
        f"Y = torch.tensor({y.tolist()}, dtype=torch.float64)\n"
        f"def build():\n    return torch.nn.Linear({d}, 1, bias=False)\n"
        "def data():\n    return X, Y\n"
    )
    model = nn.Linear(d, 1, bias=False)
    p = save_checkpoint(tmp_path / "q.pt", model)
    ctx = build_context(
        load_checkpoint(p), Binding(model=f"{mod}:build", data=f"{mod}:data", loss="mse"), dtype="float64"
    )
    res = analyze_hessian(
        HessianConfig(
            top_k=4, bottom_k=2, tol=1e-10, trace=True, trace_sketch=d, density=True, density_probes=3, density_steps=d
        ),
        ctx,
    )
    np.testing.assert_allclose(values(res, "eigenvalue"), spectrum[:4], rtol=1e-9)
    np.testing.assert_allclose(values(res, "bottom_eigenvalue"), spectrum[::-1][:2], rtol=1e-9)
    assert values(res, "trace")[0] == pytest.approx(spectrum.sum(), rel=1e-10)
    assert values(res, "negative_mass")[0] == pytest.approx(0.0, abs=1e-12)  # positive definite


def test_trace_converges_to_the_exact_trace(tmp_path: Path) -> None:
    ctx = tiny_ctx(tmp_path)
    exact = float(torch.trace(dense_hessian(hessian_operator(ctx))))
    coarse = analyze_hessian(HessianConfig(trace=True, trace_sketch=2, trace_rtol=0.2, trace_samples=200), ctx)
    fine = analyze_hessian(HessianConfig(trace=True, trace_sketch=2, trace_rtol=0.01, trace_samples=5000), ctx)
    t_c = next(r for r in coarse.records if r.metric == "trace")
    t_f = next(r for r in fine.records if r.metric == "trace")
    assert t_f.stderr < t_c.stderr
    assert t_f.stderr <= 0.01 * abs(t_f.value)
    assert abs(t_f.value - exact) < 4 * t_f.stderr
    assert abs(t_f.value - exact) < 0.05 * abs(exact)


def test_negative_mass_against_exact_fraction(tmp_path: Path) -> None:
    ctx = tiny_ctx(tmp_path)
    exact = np.linalg.eigvalsh(dense_hessian(hessian_operator(ctx)).numpy())
    res = analyze_hessian(HessianConfig(density=True, density_probes=30, density_steps=43), ctx)
    rec = next(r for r in res.records if r.metric == "negative_mass")
    info = res.metadata["model"]["density"]["negative_mass"]
    delta = info["delta"]
    frac = float(np.mean(exact < -delta))
    assert 0 < frac < 1 and delta > 0
    low, high = info["interval"]
    assert low <= frac <= high and high - low < 0.2
    assert rec.value - 2 * rec.stderr <= low and high <= rec.value + 2 * rec.stderr
    dens = res.artifacts["density"]
    assert list(dens.columns) == ["group", "eigenvalue", "density"]
    assert abs(np.trapezoid(dens["density"], dens["eigenvalue"]) - 1) < 1e-3


@pytest.mark.parametrize("sigma, cause", [(1e-320, "below the grid spacing"), (1e-9, "below the grid spacing"),
                                          (1e3, "wider than the spectrum"), (1e308, "wider than the spectrum")])  # fmt: skip
def test_a_density_sigma_the_grid_cannot_resolve_is_noted(tmp_path: Path, sigma: float, cause: str) -> None:
    ctx = tiny_ctx(tmp_path)
    base = HessianConfig(density=True, density_probes=2, density_steps=10, per_layer=True)
    res = analyze_hessian(base, ctx)  # default sigma: 1% of the range, the density integrates to ~1
    assert not [n for n in res.metadata["notes"] if "smoothed density" in n]
    assert abs(res.metadata["model"]["density"]["grid_mass"] - 1) < 1e-3
    res = analyze_hessian(replace(base, density_sigma=sigma), ctx)
    notes = [n for n in res.metadata["notes"] if "smoothed density" in n]
    groups = list(res.metadata["per_layer"])
    assert len(notes) == 1 + len(groups)  # the whole model's and each layer's
    assert cause in notes[0] and "integrates to" in notes[0] and "--density-sigma" in notes[0]
    assert any(f"density of {groups[0]} integrates" in n for n in notes)
    mass = res.metadata["model"]["density"]["grid_mass"]
    dens = res.artifacts["density"]
    whole = dens[dens["group"] == ""]
    assert abs(mass - 1) > 0.1 or not math.isfinite(mass)
    assert mass == pytest.approx(np.trapezoid(whole["density"], whole["eigenvalue"]), nan_ok=True)


def test_per_layer_spectra_are_the_diagonal_blocks(tmp_path: Path) -> None:
    ctx = tiny_ctx(tmp_path)
    H = dense_hessian(hessian_operator(ctx)).numpy()
    res = analyze_hessian(HessianConfig(top_k=2, tol=1e-9, per_layer=True), ctx)
    blocks = {"fc1": slice(0, 25), "fc2": slice(25, 43)}
    for name, sl in blocks.items():
        ref = np.linalg.eigvalsh(H[sl, sl])[::-1][:2]
        np.testing.assert_allclose(values(res, "eigenvalue", name), ref, rtol=1e-6)


def test_per_class_hessians_sum_to_the_full_one(tmp_path: Path) -> None:
    ctx = tiny_ctx(tmp_path)
    H = dense_hessian(hessian_operator(ctx))
    parts = class_batches(ctx.batches)
    total = torch.zeros_like(H)
    res = analyze_hessian(HessianConfig(top_k=1, tol=1e-9, per_class=True), ctx)
    for c, batches in parts.items():
        n_c = sum(int(b[1].shape[0]) for b in batches)
        Hc = dense_hessian(hessian_operator(ctx, batches=batches))
        total += (n_c / ctx.n_samples) * Hc
        lam = float(torch.linalg.eigvalsh(Hc)[-1])
        assert values(res, "eigenvalue", f"class={c}")[0] == pytest.approx(lam, rel=1e-6)
        assert res.metadata["per_class"][f"class={c}"]["samples"] == n_c
    assert torch.allclose(total, H, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize(
    "opt_factory, threshold",
    [
        (lambda p: torch.optim.SGD(p, lr=0.1), 2 / 0.1),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), (2 + 1.8) / 0.1),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True), (2 + 1.8) / ((1 + 1.8) * 0.1)),
    ],
)
def test_edge_of_stability_figures(tmp_path: Path, opt_factory, threshold: float) -> None:
    m = tm.build_tiny()
    ctx = tiny_ctx(tmp_path, optimizer=opt_factory(m.parameters()))
    res = analyze_hessian(HessianConfig(top_k=1, tol=1e-9), ctx)
    lam = values(res, "eigenvalue")[0]
    assert values(res, "eos_threshold")[0] == pytest.approx(threshold, rel=1e-12)
    assert values(res, "eos_ratio")[0] == pytest.approx(lam / threshold, rel=1e-12)
    # --lr overrides the checkpoint's learning rate
    res = analyze_hessian(HessianConfig(top_k=1, lr=0.5), ctx)
    assert values(res, "eos_threshold")[0] == pytest.approx(threshold * 0.1 / 0.5, rel=1e-12)


def test_adam_has_no_raw_threshold_but_says_why(tmp_path: Path) -> None:
    m = tm.build_tiny()
    ctx = tiny_ctx(tmp_path, optimizer=torch.optim.Adam(m.parameters(), lr=1e-3))
    res = analyze_hessian(HessianConfig(top_k=1), ctx)
    assert not [r for r in res.records if r.metric.startswith("eos")]
    assert "38" in f"{res.metadata['eos']['note']}" or "3.8e+04" in res.metadata["eos"]["note"]


def test_no_learning_rate_no_eos_records(tmp_path: Path) -> None:
    res = analyze_hessian(HessianConfig(top_k=1), tiny_ctx(tmp_path))
    assert not [r for r in res.records if r.metric.startswith("eos")]


@pytest.mark.parametrize(
    "lr, word", [(math.nan, "not a finite number"), (math.inf, "not a finite number"), (-0.1, "negative")]
)
def test_a_corrupt_learning_rate_gives_a_note_not_a_nan_threshold(tmp_path: Path, lr: float, word: str) -> None:
    ctx = tiny_ctx(tmp_path, optimizer=torch.optim.SGD(tm.build_tiny().parameters(), lr=0.1))
    ctx.checkpoint_metadata = {**ctx.checkpoint_metadata, "lr": lr}
    res = analyze_hessian(HessianConfig(top_k=1), ctx)
    assert not [r for r in res.records if r.metric.startswith("eos")]
    assert word in res.metadata["eos"]["note"]
    assert any(word in n and "--lr" in n for n in res.metadata["notes"])
    assert not (isinstance(res.metadata["eos"]["lr"], float) and not math.isfinite(res.metadata["eos"]["lr"]))


def test_agrees_with_pyhessian_top_eigenvalue(digits_run: list[Path]) -> None:
    pytest.importorskip("pyhessian")
    import pyhessian  # noqa: F401

    ph = sys.modules["pyhessian.hessian"]
    ck = load_checkpoint(digits_run[-1])
    binding = Binding(
        model="diagnostics.examples.digits:build_mlp",
        data="diagnostics.examples.digits:train_data",
        loss="cross_entropy",
        model_kwargs={"width": 16},
    )
    ctx = build_context(ck, binding, samples=400, seed=0)
    exact = np.linalg.eigvalsh(dense_hessian(hessian_operator(ctx.restrict())).double().numpy())
    assert exact[-1] > abs(exact[0])  # power iteration finds the largest magnitude; make sure that is the top
    ours = values(analyze_hessian(HessianConfig(top_k=1, tol=1e-5), ctx), "eigenvalue")[0]
    model = ctx.model
    for p in model.parameters():
        p.requires_grad_(True)
    torch.manual_seed(0)
    X, y = ctx.batches[0]
    theirs, _ = ph.hessian(model, nn.CrossEntropyLoss(), data=(X, y), cuda=False).eigenvalues(
        maxIter=1000, tol=1e-7, top_n=1
    )
    assert ours == pytest.approx(exact[-1], rel=1e-4)
    assert theirs[0] == pytest.approx(ours, rel=1e-3)
