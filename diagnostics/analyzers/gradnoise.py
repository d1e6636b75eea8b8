"""Gradient noise scale: how much the per-sample gradients scatter around the full-data gradient.

McCandlish, Kaplan, Amodei et al. 2018 ("An Empirical Model of Large-Batch Training"): with per-sample
gradients ``g_i`` (``N`` samples, mean ``G``) and their covariance ``Sigma``, the *simple noise scale*
``B_simple = tr(Sigma) / |G|^2`` is the batch size at which the gradient noise equals the signal: below it
doubling the batch nearly halves the steps, far above it larger batches waste compute.

Draws are micro-batch gradients ``g_k`` (``micro_batch`` samples each, ``c_k`` samples or, for token-mean
losses, counted targets) of the loss as the run defines it; with ``S = sum_k c_k g_k``, ``C = sum_k c_k``
and ``K`` draws:

* ``|G|^2`` is estimated without bias as ``|S/C|^2 - tr(Sigma)/C``;
* ``tr(Sigma) = (sum_k c_k |g_k|^2 - |S|^2 / C) / (K - 1)`` (per sample: ``Var(g_k) = Sigma / c_k``);
* every standard error is the jackknife over the draws, from the scalars ``c_k``, ``g_k . S``, ``|g_k|^2``
  (leave-one-out sums need no stored gradients).

Cost: one gradient per batch (for ``S``) plus one per micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from diagnostics.errors import DiagnosticsError
from diagnostics.lazy import lazy_import
from diagnostics.progress import null_progress
from diagnostics.results import Result, make_records
from diagnostics.spec import Analyzer, Metric, check_config, option

if TYPE_CHECKING:
    from diagnostics.context import Context
    from diagnostics.progress import ProgressFn

torch = lazy_import("torch")
B = lazy_import("diagnostics.batches")
products = lazy_import("diagnostics.linalg.products")

NAME = "gradnoise"


@dataclass
class GradNoiseConfig:
    """Options of ``diag gradnoise`` (``[gradnoise]`` in diag.toml)."""

    micro_batch: int = option(
        1, help="samples per gradient draw (1: per-sample gradients; larger is cheaper, same estimand)", min=1
    )


@dataclass
class Draws:
    """Per-draw scalars: weights ``c_k``, projections ``g_k . S`` and squared norms ``|g_k|^2`` (float64)."""

    weights: Any
    projections: Any
    squares: Any
    total_sq: float  # |S|^2


def noise_statistics(C: Any, Q: Any, s2: Any, K: Any) -> dict[str, Any]:
    """``|G|`` (gradient norm), ``tr(Sigma)`` and ``B_simple`` from sums over the draws (module docstring).

    Args:
        C: ``sum_k c_k`` (samples or counted targets).
        Q: ``sum_k c_k |g_k|^2``.
        s2: ``|S|^2``, ``S = sum_k c_k g_k``.
        K: number of draws.

    Returns:
        ``{"gradient_norm", "gradient_noise_trace", "noise_scale"}``, elementwise over the inputs' shape.
    """
    trace = (Q - s2 / C) / (K - 1)
    signal = s2 / C**2 - trace / C
    return {
        "gradient_norm": signal.clamp_min(0).sqrt(),
        "gradient_noise_trace": trace,
        "noise_scale": trace / signal,
    }


def jackknife(draws: Draws) -> dict[str, tuple[float, float]]:
    """Each statistic with its jackknife standard error ``sqrt((K-1)/K sum_k (t_-k - mean t_-)^2)``.

    Leaving draw ``k`` out: ``S_-k = S - c_k g_k``, so ``|S_-k|^2 = |S|^2 - 2 c_k (g_k . S) + c_k^2 |g_k|^2``;
    ``C`` and ``Q`` lose their own terms. ``O(K)``, no stored gradients.
    """
    c, d, q = draws.weights, draws.projections, draws.squares
    K = c.numel()
    C, Q, s2 = c.sum(), (c * q).sum(), torch.tensor(draws.total_sq, dtype=torch.float64)
    full = noise_statistics(C, Q, s2, K)
    loo = noise_statistics(C - c, Q - c * q, s2 - 2 * c * d + c**2 * q, K - 1)
    out = {}
    for name, value in full.items():
        t = loo[name]
        se = float(((K - 1) / K * ((t - t.mean()) ** 2).sum()).sqrt())
        out[name] = (float(value), se)
    return out


def _weight(ctx: Context, batch: Any) -> int:
    """What a draw's loss averages over: its counted targets (token-mean losses) or its samples."""
    count = ctx.batch_count(batch) if ctx.token_weighted else None
    return int(count) if count is not None else B.batch_size(batch)


def collect_draws(ctx: Context, micro_batch: int, progress: ProgressFn | None = None) -> Draws:
    """Pass 1: ``S = sum_b c_b g_b`` from whole batches; pass 2: each micro-batch's scalars against ``S``.

    Args:
        ctx: the checkpoint's context.
        micro_batch: samples per draw.
        progress: ``progress(task, done, total)``.

    Returns:
        The :class:`Draws` (float64).

    Raises:
        DiagnosticsError: fewer than two draws carry weight.
    """
    progress = progress or null_progress
    S = None
    for b in ctx.batches:
        c = _weight(ctx, b)
        if c:
            g = products.batch_gradient(ctx.raw_batch_loss, ctx.params, b).double() * c
            S = g if S is None else S + g
    parts = [mb for b in ctx.batches for mb in B.split(b, micro_batch)]
    rows = []
    for i, mb in enumerate(parts):
        c = _weight(ctx, mb)
        if c:
            g = products.batch_gradient(ctx.raw_batch_loss, ctx.params, mb).double()
            rows.append((c, float(g @ S), float(g @ g)))
        progress("micro-batch gradients", i + 1, len(parts))
    if len(rows) < 2 or S is None:
        raise DiagnosticsError(
            f"the gradient noise scale needs at least 2 gradient draws, got {len(rows)}; use more data or a "
            "smaller --micro-batch"
        )
    c, d, q = (torch.tensor(col, dtype=torch.float64) for col in zip(*rows))
    return Draws(c, d, q, float(S @ S))


def analyze_gradnoise(config: GradNoiseConfig, ctx: Context, progress: ProgressFn | None = None) -> Result:
    """Gradient norm, per-sample gradient covariance trace and simple noise scale (McCandlish et al. 2018).

    Args:
        config: the options (checked first).
        ctx: the checkpoint's context (inputs and targets).
        progress: ``progress(task, done, total)``.

    Returns:
        Records ``gradient_norm``, ``gradient_noise_trace``, ``noise_scale`` with jackknife standard
        errors; metadata with the number of draws and what a draw averages over.
    """
    check_config(config)
    draws = collect_draws(ctx, config.micro_batch, progress)
    stats = jackknife(draws)
    rows = [(name, value, se) for name, (value, se) in stats.items()]
    notes = []
    if stats["noise_scale"][0] <= 0:
        notes.append("the noise dominates the gradient (|G|^2 estimated <= 0): the noise scale is not meaningful here")
    unit = "counted targets" if ctx.token_weighted else "samples"
    metadata = {"draws": int(draws.weights.numel()), "micro_batch": config.micro_batch, "unit": unit, "notes": notes}
    return Result(make_records(ctx.checkpoint, ctx.step, NAME, rows), metadata)


ANALYZER = Analyzer(
    name=NAME,
    summary="gradient norm, per-sample gradient noise and the simple noise scale (critical batch size)",
    config=GradNoiseConfig,
    run=analyze_gradnoise,
    order=47,
    metrics=(
        Metric(
            "gradient_norm",
            "|G| of the full-data gradient, with |G|^2 estimated without bias as |S/C|^2 - tr(Sigma)/C",
            unit="loss/param",
        ),
        Metric(
            "gradient_noise_trace",
            "tr(Sigma) of the per-sample gradient covariance, (sum_k c_k |g_k|^2 - |S|^2/C) / (K - 1) over K "
            "micro-batch draws",
        ),
        Metric(
            "noise_scale",
            "B_simple = tr(Sigma) / |G|^2, the batch size where gradient noise equals signal",
            unit="samples",
            headline=True,
            reference="McCandlish et al. 2018",
        ),
    ),
)
