"""Spectral density by stochastic Lanczos quadrature (SLQ; Lin, Saad, Yang 2016; Ghorbani et al. 2019).

For a unit probe ``v``, ``m`` Lanczos steps give ``T_m``; its eigen-decomposition ``T_m = U diag(theta) U^T``
yields a Gauss quadrature of the spectral measure seen from ``v``: nodes ``theta_i``, weights
``tau_i = U[0, i]^2`` (sum 1). Averaging over probes estimates the spectral density
``phi(t) = (1/n) sum_j delta(t - lambda_j)``, which is smoothed with a Gaussian of width ``sigma``.
Probes run in blocks share one block Krylov space (block Gauss quadrature; see
:func:`diagnostics.linalg.lanczos.krylov_quadrature`).

Negative mass (:func:`negative_mass`): the fraction of eigenvalues below ``-delta``, with an interval
that holds both the quadrature error (Chebyshev-Markov-Stieltjes bracket) and the probe noise.

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
        """``(min, max)`` over every probe's quadrature nodes (inside ``[lambda_min, lambda_max]``)."""
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

    Each probe is a Rademacher vector ``v / ||v||`` (``v_i = +-1``), all drawn from ``generator`` first, in
    order, so the probes do not depend on ``block``. Probe ``i``'s ``steps``-node Gauss rule
    ``sum_l w_l f(theta_l)`` equals ``v_i^T f(A) v_i`` for polynomials ``f`` of degree ``<= 2 steps - 1``
    (:func:`diagnostics.linalg.lanczos.krylov_quadrature`).

    Args:
        op: symmetric operator (``matmat``, ``dim``, ``matvec_count``).
        probes: how many probe vectors.
        steps: Lanczos steps (matvecs) per probe; fewer nodes when the Krylov space is exhausted.
        generator: source of the probes.
        progress: ``progress(probes done, probes)`` after each block.
        block: run this many probes in lockstep, one ``matmat`` (one data pass) per step for all of
            them (block Lanczos, :func:`diagnostics.linalg.lanczos.krylov_quadrature`); the probes and
            results are the same as with ``block=1`` (to rounding), the memory ``block`` Krylov bases.

    Returns:
        :class:`SLQResult` with one ``(nodes [m], weights [m])`` pair per probe (weights sum to 1) and the
        matvecs spent.
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


def grid_mass(grid: torch.Tensor, values: torch.Tensor) -> float:
    """The trapezoid integral of a smoothed density over its grid (1 up to the tails outside the grid and the
    grid's resolution of the Gaussians: far from 1 when ``sigma`` is below the grid spacing, or so wide that
    most of the mass lies outside the grid)."""
    return float(torch.trapezoid(values.double(), grid.double()))


def default_grid(nodes: list[torch.Tensor], points: int = 512, pad: float = 0.05) -> tuple[torch.Tensor, float]:
    """A grid over the spectrum (padded) and a smoothing width of 1% of its span."""
    lo = min(float(t.min()) for t in nodes)
    hi = max(float(t.max()) for t in nodes)
    span = max(hi - lo, 1e-12 * max(abs(lo), abs(hi), 1.0))
    sigma = 0.01 * span
    grid = torch.linspace(lo - pad * span - 3 * sigma, hi + pad * span + 3 * sigma, points, dtype=torch.float64)
    return grid, sigma


@dataclass
class NegativeMass:
    """The spectral mass below ``-delta``: ``F = #{j : lambda_j < -delta} / n``.

    Attributes:
        value: mean over probes of the quadrature weight on nodes below ``-delta``.
        stderr: half the larger distance from ``value`` to an end of ``[low, high]`` (so
            ``value +- 2 stderr`` contains the interval).
        low, high: an interval for ``F`` (~``confidence``): the probes' Chebyshev-Markov-Stieltjes
            brackets, widened by a t-quantile of their spread.
        delta: the threshold (``>= 0``).
        bias: mean half-width of the quadrature brackets (the quadrature's own uncertainty).
        noise: the t-scaled probe standard error of the bracket ends.
        probes: how many probes.
    """

    value: float
    stderr: float
    low: float
    high: float
    delta: float
    bias: float
    noise: float
    probes: int


def quadrature_resolution(nodes: list[torch.Tensor], steps: int) -> float:
    """``(theta_max - theta_min) / steps``: the mean spacing of an ``steps``-node rule over the spectrum."""
    lo = min(float(t.min()) for t in nodes)
    hi = max(float(t.max()) for t in nodes)
    return (hi - lo) / max(int(steps), 1)


def cms_bracket(nodes: torch.Tensor, weights: torch.Tensor, t: float) -> tuple[float, float, float]:
    """``(low, point, high)`` for ``mu((-inf, t))`` of one probe's spectral measure ``mu``.

    Chebyshev-Markov-Stieltjes inequalities for a Gauss rule with nodes ``x_1 < ... < x_m``:
    ``sum_{k<j} w_k <= mu((-inf, x_j))`` and ``mu((-inf, x_j]) <= sum_{k<=j} w_k`` (Szego, *Orthogonal
    polynomials*, Thm 3.41.1; Golub & Meurant, *Matrices, Moments and Quadrature*, sec. 6.2). With
    ``x_J < t <= x_{J+1}`` and ``P = sum_{k<=J} w_k`` (the point estimate) this gives
    ``P - w_J <= mu((-inf, t)) <= P + w_{J+1}``.
    """
    order = torch.argsort(nodes)
    x, w = nodes[order].double(), weights[order].double()
    below = x < t
    J = int(below.sum())
    point = float(w[:J].sum())
    low = point - (float(w[J - 1]) if J > 0 else 0.0)
    high = point + (float(w[J]) if x.numel() > J else 0.0)
    point = min(max(point, 0.0), 1.0)
    return max(low, 0.0), point, min(max(high, point), 1.0)


def negative_mass(
    nodes: list[torch.Tensor],
    weights: list[torch.Tensor],
    delta: float = 0.0,
    confidence: float = 0.95,
) -> NegativeMass:
    """Fraction of eigenvalues below ``-delta`` from SLQ nodes and weights, with an honest interval.

    ``F(-delta) = E_v[mu_v((-inf, -delta))]`` for unit Rademacher probes (``E[v v^T] = I/n``). Each
    probe's ``mu_v((-inf, -delta))`` lies in its Chebyshev-Markov-Stieltjes bracket ``[L_v, U_v]``
    (:func:`cms_bracket`; the quadrature error, which grows when ``-delta`` falls among heavy nodes, e.g.
    inside the near-zero bulk of a Hessian); the probe noise adds a t-quantile (``probes - 1`` degrees
    of freedom) of the brackets' spread:
    ``[mean L - t se(L), mean U + t se(U)]``. Pick ``delta`` at or above the quadrature resolution
    (:func:`quadrature_resolution`) so that the threshold is not inside the nodes' spacing around 0.

    Args:
        nodes: per probe, the quadrature nodes.
        weights: per probe, the weights (sum 1).
        delta: threshold ``>= 0``; eigenvalues below ``-delta`` count as negative.
        confidence: coverage of the probe-noise part.

    Returns:
        :class:`NegativeMass`.
    """
    from scipy.stats import t as student

    if delta < 0:
        raise ValueError(f"delta must be >= 0, got {delta}")
    brackets = torch.tensor([cms_bracket(th, w, -delta) for th, w in zip(nodes, weights)], dtype=torch.float64)
    p = brackets.shape[0]
    low, point, high = brackets.mean(0).tolist()
    if p > 1:
        q = float(student.ppf(0.5 + confidence / 2, p - 1))
        se = brackets.std(0, unbiased=True) / math.sqrt(p)
        noise_low, noise_high = q * float(se[0]), q * float(se[2])
    else:
        noise_low = noise_high = math.inf
    lo = max(low - noise_low, 0.0)
    hi = min(high + noise_high, 1.0)
    stderr = max(point - lo, hi - point) / 2
    return NegativeMass(
        value=point,
        stderr=stderr,
        low=lo,
        high=hi,
        delta=float(delta),
        bias=float((brackets[:, 2] - brackets[:, 0]).mean()) / 2,
        noise=max(noise_low, noise_high),
        probes=p,
    )
