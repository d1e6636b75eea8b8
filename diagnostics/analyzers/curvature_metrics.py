"""Curvature metrics beyond the spectrum that ``diag hessian`` reports (pure functions over operators).

* :func:`alignment_from_ritz`: the fraction of the gradient's squared norm in the top-k eigenspace of a
  curvature, ``||U_k^T g||^2 / ||g||^2`` (Gur-Ari, Roberts, Dyer 2018), from Lanczos' Ritz pairs, with a
  Davis-Kahan bound on its error from the Ritz vectors' residuals.
* :func:`batch_sharpness`: ``E_B[g_B^T H_B g_B / ||g_B||^2]`` over mini-batches of the training batch size
  (Andreyev & Beneventano 2024), with its standard error over batches.
* :func:`count_outliers`: how many top eigenvalues lie above the edge of the spectrum's bulk (Sagun et al.
  2017; Papyan 2019, 2020: about one per class).
* :func:`block_heterogeneity`: per-block top eigenvalue and SLQ density, the Jensen-Shannon distances
  between the block densities on a common grid, and their mean (Zhang et al. 2024).

This module imports nothing heavy at import time (the analyzer declarations load without torch).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from diagnostics.lazy import lazy_from, lazy_import

if TYPE_CHECKING:
    from diagnostics.linalg.operator import LinearOperator

torch = lazy_import("torch")
lanczos = lazy_from("diagnostics.linalg.lanczos", "lanczos")
default_grid, gaussian_density, slq = lazy_from("diagnostics.linalg.density", "default_grid", "gaussian_density", "slq")


# ------------------------------------------------------------------------------ gradient alignment
def alignment_from_ritz(
    vectors: torch.Tensor,
    eigenvalues: Sequence[float],
    residuals: Sequence[float],
    gradient: torch.Tensor,
    k: int,
) -> tuple[float, list[float], float, float]:
    """``(alignment, overlaps, bound, gap)`` from the top Ritz pairs (``k`` of them, plus one more when known).

    ``|a - a*| = |g^T (P - P*) g| / ||g||^2 <= ||P - P*||_2 = ||sin Theta(U, U*)||_2 <= ||R||_F / delta``
    (Davis & Kahan 1970, the residual form of the sin-theta theorem) when the other eigenvalues lie below
    ``theta_k - delta``; ``delta`` is taken as ``theta_k - theta_{k+1} - r_{k+1}`` (the (k+1)-th eigenvalue
    lies within its residual of its Ritz value). With ``k = dim`` the alignment is exactly 1. The gap
    assumes Lanczos missed no eigenvalue above ``theta_{k+1}``; at loose tolerances it can (an eigenvalue
    not yet found), which overstates the gap: stop on tight Ritz residuals (``criterion="residual"``).

    Args:
        vectors: ``[n, >= k]`` orthonormal Ritz vectors, descending.
        eigenvalues: their Ritz values (``k`` or ``k+1``).
        residuals: their residual norms.
        gradient: ``g [n]``.
        k: the eigenspace's dimension.

    Returns:
        The alignment, the per-vector overlaps, the error bound and the gap.
    """
    g = gradient.to(vectors.dtype)
    gn2 = float(g @ g)
    if gn2 == 0.0 or not math.isfinite(gn2):
        return math.nan, [math.nan] * k, math.nan, math.nan
    proj = vectors[:, :k].T @ g
    overlaps = [float(c) ** 2 / gn2 for c in proj]
    value = float(sum(overlaps))
    if len(eigenvalues) <= k:  # the whole space (k = dim): nothing left out
        return value, overlaps, 0.0 if k >= vectors.shape[0] else 1.0, math.inf
    gap = float(eigenvalues[k - 1]) - float(eigenvalues[k]) - float(residuals[k])
    rf = math.sqrt(sum(float(r) ** 2 for r in residuals[:k]))
    bound = min(1.0, rf / gap) if gap > 0 else 1.0
    return value, overlaps, bound, gap


@dataclass
class BatchSharpness:
    """``E_B[g_B^T H_B g_B / ||g_B||^2]`` over mini-batches.

    Attributes:
        value: the mean over batches.
        stderr: standard deviation over batches / sqrt(number of batches) (NaN for one batch).
        per_batch: the ratio of each batch.
        batch_size: ``B``.
        dropped: samples of a smaller last batch left out (E_B is over batches of size ``B``).
        hvps: Hessian-vector products (one per batch).
    """

    value: float
    stderr: float
    per_batch: list[float]
    batch_size: int
    dropped: int
    hvps: int


def batch_sharpness(
    batches: Sequence[Any],
    gradient_and_hvp: Callable[[Any], tuple[torch.Tensor, torch.Tensor]],
    batch_size_of: Callable[[Any], int],
) -> BatchSharpness:
    """Batch sharpness (Andreyev & Beneventano 2024): ``E_B[g_B^T H_B g_B / ||g_B||^2]``.

    Under mini-batch SGD with step ``eta`` it rises to and hovers at ``2/eta`` (``(2+2beta)/eta`` with
    heavy-ball momentum ``beta``), the mini-batch analogue of the edge of stability; the full-batch
    ``lambda_max`` then sits below it. ``g_B`` and ``H_B`` are the gradient and Hessian of batch ``B``'s
    mean loss; one Hessian-vector product per batch. A last batch smaller than the others is left out (the
    expectation is over batches of the training batch size) unless it is the only one.

    Args:
        batches: the mini-batches.
        gradient_and_hvp: ``fn(batch) -> (g_B [n], H_B g_B [n])``.
        batch_size_of: ``fn(batch) -> number of samples``.

    Returns:
        The :class:`BatchSharpness`.
    """
    sizes = [batch_size_of(b) for b in batches]
    B = max(sizes)
    keep = [b for b, s in zip(batches, sizes) if s == B] if len(batches) > 1 else list(batches)
    dropped = sum(sizes) - B * len(keep) if len(batches) > 1 else 0
    ratios = []
    for b in keep:
        g, hg = gradient_and_hvp(b)
        gn2 = float(g @ g)
        ratios.append(float(g @ hg) / gn2 if gn2 > 0 else math.nan)
    finite = [x for x in ratios if math.isfinite(x)]
    mean = sum(finite) / len(finite) if finite else math.nan
    if len(finite) > 1:
        var = sum((x - mean) ** 2 for x in finite) / (len(finite) - 1)
        se = math.sqrt(var / len(finite))
    else:
        se = math.nan
    return BatchSharpness(mean, se, ratios, B, dropped, len(keep))


# ---------------------------------------------------------------------------------------- outliers
def bulk_edge(
    nodes: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor],
    dim: int,
    sigma: float | None = None,
    points: int = 4096,
) -> tuple[float, float]:
    """The upper edge of the spectrum's bulk from an SLQ estimate -> ``(edge, sigma)``.

    The SLQ quadrature estimates the spectral density ``rho`` (unit mass); ``c(t) = n rho_sigma(t) sigma
    sqrt(2 pi)`` is the Gaussian-kernel count of eigenvalues around ``t`` (an isolated eigenvalue at ``t``
    gives ``c(t) = 1``; inside a bulk whose eigenvalues are closer than ``sigma``, ``c >> 1``). The edge
    is the first grid point above the spectral median where ``c < 1/2``, i.e. where consecutive eigenvalues
    are first more than about ``2.4 sigma`` apart; ``sigma`` defaults to 1% of the spectral span (the
    smoothing of the report's density figures).

    Args:
        nodes: SLQ quadrature nodes, one tensor per probe.
        weights: their weights (each probe's sum to 1).
        dim: ``n``.
        sigma: the kernel width (default 1% of the span).
        points: grid points of the scan.

    Returns:
        The edge and the width used.
    """
    grid, default_sigma = default_grid(list(nodes), points, pad=0.0)
    s = float(sigma) if sigma else default_sigma
    rho = gaussian_density(list(nodes), list(weights), grid, s)
    count = dim * rho * s * math.sqrt(2 * math.pi)
    th = torch.cat([t.double() for t in nodes])
    w = torch.cat([x.double() for x in weights]) / len(nodes)
    order = torch.argsort(th)
    cdf = torch.cumsum(w[order], 0)
    median = float(
        th[order][int(torch.searchsorted(cdf, torch.tensor(0.5, dtype=torch.float64)).clamp(max=len(th) - 1))]
    )
    above = (grid >= median) & (count < 0.5)
    if not bool(above.any()):
        return float(grid[-1]), s
    return float(grid[int(torch.nonzero(above)[0])]), s


def count_outliers(
    eigenvalues: Sequence[float],
    nodes: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor],
    dim: int,
    sigma: float | None = None,
) -> tuple[int, float, bool]:
    """How many of the top eigenvalues lie above the bulk edge (:func:`bulk_edge`) -> ``(count, edge, saturated)``.

    Sagun et al. (2017) and Papyan (2019, 2020) find about one outlier per class in the Hessian and
    Gauss-Newton spectra of trained classifiers, attributable to the class means of the gradients.

    Args:
        eigenvalues: the top-m eigenvalues (Lanczos), descending.
        nodes: SLQ quadrature nodes of the same operator, one tensor per probe.
        weights: their weights.
        dim: ``n``.
        sigma: kernel width of the edge (default 1% of the span).

    Returns:
        The count, the edge, and whether every examined eigenvalue is above it (the count is then a lower
        bound).
    """
    edge, _ = bulk_edge(nodes, weights, dim, sigma)
    count = sum(1 for lam in eigenvalues if lam > edge)
    return count, edge, bool(eigenvalues) and count == len(eigenvalues) and len(eigenvalues) < dim


# ------------------------------------------------------------------------------ block heterogeneity
def js_distance(p: torch.Tensor, q: torch.Tensor) -> float:
    """Jensen-Shannon distance ``sqrt(JSD(p, q))`` in bits (``[0, 1]``) between two distributions on one grid.

    ``JSD = (KL(p || m) + KL(q || m)) / 2`` with ``m = (p + q) / 2`` (Lin 1991; Endres & Schindelin 2003:
    its square root is a metric).
    """
    p = p.double() / p.sum()
    q = q.double() / q.sum()
    m = 0.5 * (p + q)

    def kl(a: torch.Tensor) -> float:
        nz = a > 0
        return float((a[nz] * torch.log2(a[nz] / m[nz])).sum())

    return math.sqrt(max(0.5 * kl(p) + 0.5 * kl(q), 0.0))


def mean_pairwise_js(densities: Sequence[torch.Tensor]) -> tuple[float, list[list[float]]]:
    """Mean Jensen-Shannon distance over unordered pairs and the full symmetric matrix."""
    n = len(densities)
    mat = [[0.0] * n for _ in range(n)]
    total, pairs = 0.0, 0
    for i in range(n):
        for j in range(i + 1, n):
            d = js_distance(densities[i], densities[j])
            mat[i][j] = mat[j][i] = d
            total += d
            pairs += 1
    return (total / pairs if pairs else math.nan), mat


@dataclass
class BlockSpectrum:
    """One block's top eigenvalue (Lanczos) and SLQ quadrature."""

    name: str
    dim: int
    eigenvalue: float
    error_bound: float
    nodes: list[torch.Tensor]
    weights: list[torch.Tensor]
    hvps: int
    converged: bool


@dataclass
class Heterogeneity:
    """Block heterogeneity of a curvature (Zhang et al. 2024).

    Attributes:
        value: mean pairwise Jensen-Shannon distance between the block densities (``[0, 1]``).
        stderr: jackknife standard error over the SLQ probes (NaN with one probe).
        blocks: each block's spectrum.
        distances: the pairwise JS distance matrix (block order).
        grid: ``(lo, hi, points)`` of the common grid; ``sigma`` its smoothing width.
    """

    value: float
    stderr: float
    blocks: list[BlockSpectrum]
    distances: list[list[float]]
    grid: tuple[float, float, int]
    sigma: float
    densities: list[torch.Tensor] = field(repr=False, default_factory=list)


def block_spectrum(
    name: str,
    op: LinearOperator,
    *,
    tol: float,
    max_iter: int,
    probes: int,
    steps: int,
    generator: torch.Generator,
    block_size: int = 1,
) -> BlockSpectrum:
    """Top eigenvalue (Lanczos to ``tol``) and SLQ quadrature (``probes`` x ``min(steps, dim)``) of one block."""
    start = op.matvec_count
    res = lanczos(op, k_top=1, tol=tol, max_iter=max_iter, generator=generator, block_size=block_size)
    q = slq(op, probes=probes, steps=min(steps, op.dim), generator=generator, block=block_size)
    return BlockSpectrum(
        name=name,
        dim=op.dim,
        eigenvalue=float(res.eigenvalues[0]),
        error_bound=float(res.error_bounds[0]),
        nodes=list(q.nodes),
        weights=list(q.weights),
        hvps=op.matvec_count - start,
        converged=bool(res.converged),
    )


def block_heterogeneity(blocks: Sequence[BlockSpectrum], points: int, sigma: float | None = None) -> Heterogeneity:
    """Mean pairwise Jensen-Shannon distance between block spectral densities on one grid (JS_0 of Zhang et al.).

    Each block's SLQ quadrature is Gaussian-smoothed on a grid common to all blocks (spanning every
    block's nodes, :func:`~diagnostics.linalg.density.default_grid`; width ``sigma``, default 1% of the
    span) and normalised to a distribution over the grid; the score is the mean over unordered block pairs
    of their Jensen-Shannon distance (bits, ``[0, 1]``): 0 when every block has the same spectrum, 1 when
    the spectra do not overlap. The eigenvalues are not rescaled per block: different scales are part of
    the heterogeneity a single learning rate cannot serve. Its standard error is the jackknife over the SLQ
    probes (probe ``j`` of every block left out at a time).

    Args:
        blocks: the block spectra (at least two).
        points: grid points.
        sigma: smoothing width (default from the grid).

    Returns:
        The :class:`Heterogeneity`.
    """
    if len(blocks) < 2:
        raise ValueError("block heterogeneity needs at least two blocks")
    nodes = [t for b in blocks for t in b.nodes]
    grid, default_sigma = default_grid(nodes, points)
    s = float(sigma) if sigma else default_sigma

    def densities(skip: int | None) -> list[torch.Tensor]:
        out = []
        for b in blocks:
            keep = [j for j in range(len(b.nodes)) if j != skip]
            out.append(gaussian_density([b.nodes[j] for j in keep], [b.weights[j] for j in keep], grid, s))
        return out

    full = densities(None)
    value, mat = mean_pairwise_js(full)
    probes = min(len(b.nodes) for b in blocks)
    if probes > 1:
        loo = [mean_pairwise_js(densities(j))[0] for j in range(probes)]
        mean_loo = sum(loo) / probes
        se = math.sqrt((probes - 1) / probes * sum((x - mean_loo) ** 2 for x in loo))
    else:
        se = math.nan
    return Heterogeneity(
        value=value,
        stderr=se,
        blocks=list(blocks),
        distances=mat,
        grid=(float(grid[0]), float(grid[-1]), int(points)),
        sigma=s,
        densities=full,
    )
