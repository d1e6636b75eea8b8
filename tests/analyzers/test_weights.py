"""Weight spectra against closed forms: designed singular values, exact Pareto quantiles."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from diagnostics.analyzers.registry import all_analyzers
from diagnostics.analyzers.weights import (
    METRICS,
    WeightsConfig,
    analyze_weights,
    powerlaw_fit,
    weight_matrices,
    weight_spectrum_metrics,
)
from diagnostics.errors import DiagnosticsError

F64 = torch.float64


def designed(out: int, inp: int, s: torch.Tensor, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(out, len(s), generator=g, dtype=F64))
    v, _ = torch.linalg.qr(torch.randn(inp, len(s), generator=g, dtype=F64))
    return u * s @ v.T


def pareto_quantiles(n: int, alpha: float, xmin: float) -> torch.Tensor:
    """The n quantiles ``xmin (1 - u)^(-1/(alpha-1))`` at ``u = (i - 1/2)/n``: a noise-free Pareto sample."""
    u = (torch.arange(n, dtype=F64) + 0.5) / n
    return xmin * (1 - u) ** (-1.0 / (alpha - 1.0))


def test_spectral_norm_stable_and_effective_rank_of_designed_singular_values():
    s = torch.tensor([4.0, 2.0, 1.0, 1.0, 0.5], dtype=F64)
    w = designed(9, 7, s)
    rows, sv, _ = weight_spectrum_metrics(w, WeightsConfig())
    got = {m: v for m, v, _ in rows}
    assert got["spectral_norm"] == pytest.approx(4.0, rel=1e-13)
    assert got["stable_rank"] == pytest.approx(float((s**2).sum()) / 16.0, rel=1e-12)
    p = s / s.sum()
    assert got["effective_rank"] == pytest.approx(math.exp(-float((p * p.log()).sum())), rel=1e-12)
    assert "alpha" not in got  # 5 non-zero eigenvalues < min_evals
    assert torch.allclose(sv[:5], s, rtol=1e-12)


def test_powerlaw_mle_at_fixed_xmin_is_the_closed_form():
    x = pareto_quantiles(400, 3.0, 2.0)
    fit = powerlaw_fit(x, xmin=2.0)
    xt = x[x >= 2.0]
    assert fit.alpha == pytest.approx(1 + len(xt) / float(torch.log(xt / 2.0).sum()), rel=1e-12)
    assert fit.stderr == pytest.approx((fit.alpha - 1) / math.sqrt(len(xt)), rel=1e-12)


@pytest.mark.parametrize("alpha", [2.0, 3.5, 5.0])
def test_powerlaw_fit_recovers_alpha_of_a_pareto_tail_above_a_bulk(alpha):
    """A uniform bulk below 1 and a Pareto tail from 1: the KS search finds the tail's start and alpha."""
    tail = pareto_quantiles(300, alpha, 1.0)
    bulk = torch.linspace(0.05, 0.9, 200, dtype=F64)
    fit = powerlaw_fit(torch.cat([bulk, tail]))
    assert fit.xmin == pytest.approx(1.0, abs=0.05)
    assert abs(fit.alpha - alpha) < 2 * fit.stderr
    assert fit.ks < 0.05


def test_conv_kernels_are_read_as_out_by_fan_in():
    conv = nn.Conv2d(3, 5, 3)
    mats = weight_matrices(dict(nn.Sequential(conv).named_parameters()))
    assert list(mats) == ["0"] and mats["0"].shape == (5, 27)
    rows, _, _ = weight_spectrum_metrics(mats["0"], WeightsConfig())
    exact = np.linalg.svd(conv.weight.detach().double().numpy().reshape(5, -1), compute_uv=False)
    assert dict((m, v) for m, v, _ in rows)["spectral_norm"] == pytest.approx(float(exact[0]), rel=1e-12)


def test_analyze_a_module_one_row_per_layer_and_metric():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 30), nn.ReLU(), nn.Linear(30, 4))
    with torch.no_grad():
        model[0].weight.copy_(designed(30, 40, pareto_quantiles(30, 3.0, 1.0).sqrt().flip(0)).float())
    result = analyze_weights(WeightsConfig(), model, checkpoint="m.pt", step=7)
    rows = {(r.group, r.metric): r for r in result.records}
    assert {g for g, _ in rows} == {"0", "2"}
    assert ("0", "alpha") in rows and ("2", "alpha") not in rows
    assert rows[("0", "alpha")].stderr > 0
    assert any("layer '2'" in n and "no alpha" in n for n in result.metadata["notes"])
    assert all(r.checkpoint == "m.pt" and r.step == 7 for r in result.records)
    only = analyze_weights(WeightsConfig(params=r"^2\."), model)
    assert {r.group for r in only.records} == {"2"}
    spectrum = result.artifacts["spectrum"]
    assert list(spectrum[spectrum["group"] == "2"]["k"]) == [1, 2, 3, 4]


def test_bad_inputs():
    with pytest.raises(DiagnosticsError, match="no weight matrix"):
        analyze_weights(WeightsConfig(), nn.Sequential(nn.ReLU()))
    with pytest.raises(DiagnosticsError, match="not a valid regex"):
        WeightsConfig(params="(").validate()
    bad = nn.Linear(3, 3)
    with torch.no_grad():
        bad.weight[0, 0] = float("nan")
    with pytest.raises(DiagnosticsError, match="NaN or inf"):
        analyze_weights(WeightsConfig(), bad)


def test_bad_options_name_the_flag():
    with pytest.raises(DiagnosticsError, match="--min-tail must be >= 2, got 1"):
        analyze_weights(WeightsConfig(min_tail=1), nn.Linear(3, 3))
    with pytest.raises(DiagnosticsError, match=r"--min-evals \(3\) must be >= min_tail \(5\)"):
        analyze_weights(WeightsConfig(min_evals=3), nn.Linear(3, 3))


def test_a_context_analyses_its_parameters_after_params(digits_run):
    """On a checkpoint the shared --params option (the context's analysed parameters) selects the weights."""
    from diagnostics.binding import resolve_binding
    from diagnostics.checkpoint import load_checkpoint
    from diagnostics.context import build_context

    ck = load_checkpoint(digits_run[-1])
    ctx = build_context(ck, resolve_binding(ck.factories), params=r"^head\.")
    result = analyze_weights(WeightsConfig(), ctx)
    assert {r.group for r in result.records} == {"head"}
    assert all(r.checkpoint == ctx.checkpoint and r.step == ctx.step for r in result.records)
    w = ctx.model.head.weight.detach().double()
    got = {r.metric: r.value for r in result.records}
    assert got["spectral_norm"] == pytest.approx(float(torch.linalg.matrix_norm(w, 2)), rel=1e-12)


def test_weights_is_registered():
    spec = all_analyzers()["weights"]
    assert not spec.needs_targets and spec.config is WeightsConfig and not spec.uses_loss
    assert {m.name for m in spec.metrics} == set(METRICS)
    assert all(m.definition and m.group for m in spec.metrics)
    with pytest.raises(DiagnosticsError, match=r"unknown option 'min_eval' in \[weights\]; did you mean 'min_evals'"):
        spec.make_config({"min_eval": 4})
    assert spec.make_config({"min_evals": "12"}).min_evals == 12
