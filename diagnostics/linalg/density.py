"""Spectral density by stochastic Lanczos quadrature (SLQ; Lin, Saad, Yang 2016; Ghorbani et al. 2019).

For a unit probe ``v``, ``m`` Lanczos steps give ``T_m``; its eigen-decomposition ``T_m = U diag(theta) U^T``
yields a Gauss quadrature of the spectral measure seen from ``v``: nodes ``theta_i``, weights
``tau_i = U[0, i]^2`` (sum 1). Averaging over probes estimates the spectral density
``phi(t) = (1/n) sum_j delta(t - lambda_j)``, which is smoothed with a Gaussian of width ``sigma``.

Shapes: ``tridiag (alpha [m], beta [m-1]) -> nodes [m], weights [m] -> density on a grid [G]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from diagnostics.linalg.lanczos import krylov_quadrature, tridiagonal
from diagnostics.linalg.operator import LinearOperator

Progress = Callable[[int, int], None]


@dataclass
class SLQResult:
    """Quadrature nodes and weights of each probe (lists: probes may stop at different lengths)."""

    nodes: list[torch.Tensor]
    weights: list[torch.Tensor]
    matvecs: int

    def spectral_range(self) -> tuple[float, float]:
        allnodes = torch.cat(self.nodes)
        return float(allnodes.min()), float(allnodes.max())


def tridiagonal_quadrature(alpha: torch.Tensor, beta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``alpha [m], beta [m-1] -> nodes [m], weights [m]`` (Gauss quadrature; weights sum to 1)."""
    theta, U = torch.linalg.eigh(tridiagonal(alpha, beta))
    return theta, U[0, :] ** 2


def slq(
    op: LinearOperator,
    *,
    probes: int,
    steps: int,
    generator: torch.Generator,
    progress: Progress | None = None,
    block: int = 1,
) -> SLQResult:
    """Run ``probes`` independent Lanczos quadratures of ``steps`` steps each (Rademacher probes).

    Args:
        block: run this many probes in lockstep, one ``matmat`` (one data pass) per step for all of
            them (:func:`lanczos_tridiagonal_block`); the probes and results are the same as with
            ``block=1`` (to rounding), the memory ``block`` Krylov bases.
    """
    nodes, weights = [], []
    before = op.matvec_count
    # all probe vectors are drawn first, in order, so the result does not depend on ``block``
    vs = []
    for _ in range(probes):
        v = (2 * torch.randint(0, 2, (op.dim,), generator=generator, dtype=torch.int8) - 1).to(torch.float64)
        vs.append(v / v.norm())
    block = max(1, int(block))
    for first in range(0, probes, block):
        group = vs[first : first + block]
        for th, w in krylov_quadrature(op, torch.stack(group, dim=1), steps):
            nodes.append(th)
            weights.append(w)
        if progress is not None:
            progress(len(nodes), probes)
    return SLQResult(nodes, weights, op.matvec_count - before)


def gaussian_density(
    nodes: list[torch.Tensor],
    weights: list[torch.Tensor],
    grid: torch.Tensor,
    sigma: float,
) -> torch.Tensor:
    """Smoothed density on ``grid`` ``[G]``: mean over probes of ``sum_i tau_i N(t; theta_i, sigma^2)``."""
    grid = grid.double()
    total = torch.zeros_like(grid)
    for th, w in zip(nodes, weights):
        z = (grid[:, None] - th.double()[None, :]) / sigma
        total += (w.double()[None, :] * torch.exp(-0.5 * z * z)).sum(1) / (sigma * math.sqrt(2 * math.pi))
    return total / len(nodes)


def default_grid(nodes: list[torch.Tensor], points: int = 512, pad: float = 0.05) -> tuple[torch.Tensor, float]:
    """A grid over the spectrum (padded) and a smoothing width of 1% of its span."""
    lo = min(float(t.min()) for t in nodes)
    hi = max(float(t.max()) for t in nodes)
    span = max(hi - lo, 1e-12 * max(abs(lo), abs(hi), 1.0))
    sigma = 0.01 * span
    grid = torch.linspace(lo - pad * span - 3 * sigma, hi + pad * span + 3 * sigma, points, dtype=torch.float64)
    return grid, sigma


def negative_mass(
    nodes: list[torch.Tensor], weights: list[torch.Tensor], threshold: float = 0.0
) -> tuple[float, float]:
    """Quadrature weight on nodes below ``-threshold``: mean over probes and its standard error.

    It estimates the fraction of Hessian eigenvalues that are negative (beyond ``threshold``).
    """
    vals = [float(w[th < -threshold].sum()) for th, w in zip(nodes, weights)]
    mean = sum(vals) / len(vals)
    if len(vals) < 2:
        return mean, math.nan
    var = sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)
    return mean, math.sqrt(var / len(vals))
