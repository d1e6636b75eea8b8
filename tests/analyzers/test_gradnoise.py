"""Gradient noise scale against closed forms: per-sample gradients of linear least squares in float64,
a brute-force jackknife, and the coverage of the error bars on a population with a known noise scale."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from diag_cli.main import app
from diagnostics.analyzers.gradnoise import Draws, GradNoiseConfig, analyze_gradnoise, jackknife
from diagnostics.binding import LOSSES
from diagnostics.context import Context
from diagnostics.errors import DiagnosticsError

F64 = torch.float64


def regression(n: int, d: int, seed: int, batch: int) -> tuple[Context, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``L = mean (w.x - y)^2`` of a bias-free linear model on Gaussian data, in ragged batches."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=F64)
    y = torch.randn(n, 1, generator=g, dtype=F64)
    model = torch.nn.Linear(d, 1, bias=False).double().eval()
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, d, generator=g, dtype=F64))
    batches = [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]
    ctx = Context(
        model=model,
        params={k: v.detach() for k, v in model.named_parameters()},
        frozen={},
        batches=batches,
        loss_fn=LOSSES["mse"],
        device=torch.device("cpu"),
        dtype=F64,
        loss_name="mse",
    )
    return ctx, x, y, model.weight.detach().reshape(-1)


def exact(gradients: torch.Tensor, weights: torch.Tensor | None = None) -> dict[str, float]:
    """The statistics from the draws themselves: ``S``, ``tr(Sigma)``, unbiased ``|G|^2``."""
    c = torch.ones(len(gradients), dtype=F64) if weights is None else weights
    C, K = c.sum(), len(gradients)
    mean = (c[:, None] * gradients).sum(0) / C
    trace = (c * ((gradients - mean) ** 2).sum(1)).sum() / (K - 1)
    signal = mean @ mean - trace / C
    return {
        "gradient_norm": float(signal.sqrt()),
        "gradient_noise_trace": float(trace),
        "noise_scale": float(trace / signal),
    }


def values(result) -> dict[str, tuple[float, float]]:
    return {r.metric: (r.value, r.stderr) for r in result.records}


def test_per_sample_statistics_equal_the_closed_form_gradients() -> None:
    ctx, x, y, w = regression(n=203, d=4, seed=0, batch=37)  # ragged last batch
    per_sample = 2 * ((x @ w)[:, None] - y) * x  # d/dw (w.x - y)^2
    got = values(analyze_gradnoise(GradNoiseConfig(micro_batch=1), ctx))
    for name, want in exact(per_sample).items():
        assert got[name][0] == pytest.approx(want, rel=1e-10)


def test_micro_batches_are_weighted_draws_of_the_same_estimand() -> None:
    ctx, x, y, w = regression(n=203, d=4, seed=1, batch=50)
    per_sample = 2 * ((x @ w)[:, None] - y) * x
    means, weights = [], []
    for start in range(0, 203, 50):  # micro-batches of 8 inside each batch of 50 (ragged ends)
        for s in range(start, min(start + 50, 203), 8):
            block = per_sample[s : min(s + 8, start + 50, 203)]
            means.append(block.mean(0))
            weights.append(float(len(block)))
    want = exact(torch.stack(means), torch.tensor(weights, dtype=F64))
    got = values(analyze_gradnoise(GradNoiseConfig(micro_batch=8), ctx))
    for name in want:
        assert got[name][0] == pytest.approx(want[name], rel=1e-10)


def test_jackknife_equals_brute_force_leave_one_out() -> None:
    g = torch.Generator().manual_seed(3)
    grads = torch.randn(30, 5, generator=g, dtype=F64) + 0.7
    c = torch.randint(1, 5, (30,), generator=g).to(F64)
    S = (c[:, None] * grads).sum(0)
    got = jackknife(Draws(c, grads @ S, (grads * grads).sum(1), float(S @ S)))
    for name in ("gradient_norm", "gradient_noise_trace", "noise_scale"):
        loo = torch.tensor(
            [exact(torch.cat([grads[:k], grads[k + 1 :]]), torch.cat([c[:k], c[k + 1 :]]))[name] for k in range(30)],
            dtype=F64,
        )
        se = math.sqrt(29 / 30 * float(((loo - loo.mean()) ** 2).sum()))
        assert got[name][0] == pytest.approx(exact(grads, c)[name], rel=1e-12)
        assert got[name][1] == pytest.approx(se, rel=1e-9)


def test_error_bars_cover_the_population_noise_scale() -> None:
    """Least squares with ``x ~ N(0, I_d)``, residual ``r = a.x - sigma eps``: ``G = 2a``,
    ``Sigma = 4((|a|^2 + sigma^2) I + a a^T)``, so ``B = (d (|a|^2 + sigma^2) + |a|^2) / |a|^2``."""
    d, n, sigma = 5, 400, 1.0
    a = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0], dtype=F64)
    truth = {
        "gradient_norm": 2 * float(a.norm()),
        "gradient_noise_trace": 4 * (d * (float(a @ a) + sigma**2) + float(a @ a)),
        "noise_scale": (d * (float(a @ a) + sigma**2) + float(a @ a)) / float(a @ a),
    }
    z = {name: [] for name in truth}
    for seed in range(200):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, d, generator=g, dtype=F64)
        r = x @ a - sigma * torch.randn(n, generator=g, dtype=F64)
        grads = 2 * r[:, None] * x
        S = grads.sum(0)
        stats = jackknife(Draws(torch.ones(n, dtype=F64), grads @ S, (grads * grads).sum(1), float(S @ S)))
        for name, (value, se) in stats.items():
            z[name].append((value - truth[name]) / se)
    for name, zs in z.items():
        zs = torch.tensor(zs)
        assert float((zs.abs() <= 2).double().mean()) >= 0.90, name
        assert float((zs.abs() > 3).double().mean()) <= 0.03, name


def test_one_draw_is_refused() -> None:
    ctx, *_ = regression(n=5, d=2, seed=0, batch=5)
    with pytest.raises(DiagnosticsError, match="at least 2 gradient draws"):
        analyze_gradnoise(GradNoiseConfig(micro_batch=5), ctx)


def test_command_runs_on_a_checkpoint_and_reads_its_toml_table(digits_run: list[Path], tmp_path: Path) -> None:
    (tmp_path / "diag.toml").write_text("[gradnoise]\nmicro_batch = 64\n")
    out = tmp_path / "noise.json"
    res = CliRunner().invoke(app, ["gradnoise", str(digits_run[-1]), "--samples", "512", "-q", "--out", str(out)])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    records = {r["metric"]: r for r in doc["records"]}
    assert set(records) == {"gradient_norm", "gradient_noise_trace", "noise_scale"}
    assert all(math.isfinite(r["stderr"]) and r["stderr"] > 0 for r in records.values())
    assert doc["metadata"]["draws"] == 8  # 512 samples / 64 per draw, from diag.toml
    bad = CliRunner().invoke(app, ["gradnoise", str(digits_run[-1]), "--micro-batch", "0"])
    assert bad.exit_code == 2 and "micro" in bad.output
