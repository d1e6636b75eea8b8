"""Trace estimators with standard errors: Hutchinson and Hutch++.

Hutchinson: ``tr(A) ~ (1/g) sum_i z_i^T A z_i`` with Rademacher ``z_i``.

Hutch++ (Meyer, Musco, Musco, Woodruff 2021): sketch ``Y = A S`` with ``s`` Rademacher columns,
``Q = qr(Y)``; then ``tr(A) = tr(Q^T A Q) + tr((I - QQ^T) A (I - QQ^T))``, the first term exact and the
second by Hutchinson on projected probes. The dominant directions are removed from the random part,
so the variance falls from ``~||A||_F^2`` to ``~||A - A_s||_F^2``. The number of Hutchinson samples that
reaches ``stderr <= rtol * |estimate|`` is set from a pilot sample (two-stage rule), capped by the budget.

Standard error (of the random part, conditional on ``Q``). For Rademacher ``z`` and symmetric ``B``
(``B = P A P``, ``P = I - Q Q^T``), ``Var(z^T B z) = 2 (||B||_F^2 - sum_i B_ii^2)``,
``E ||B z||^2 = ||B||_F^2`` and, for independent probes, ``E[(z_i (Bz)_i)(z'_i (Bz')_i)] = B_ii^2``: the
products already computed estimate the variance through these moments, with far less spread than the
sample variance of the heavy-tailed quadratic forms ``z^T B z`` (a few dominant eigenvalues make them
nearly chi-square with one degree of freedom, and their sample variance then runs low in most draws).
The variance used is the larger of the two estimates; its
uncertainty enters through a Student t quantile with Satterthwaite's degrees of freedom
``2 g mean(X)^2 / var(X)`` (``X = ||B z||^2``, or the squared deviations for the sample variance), and the
reported stderr is ``t_{0.975, dof} se / 1.96``: ``value +- 2 stderr`` is a ~95% interval.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from diagnostics.linalg.operator import LinearOperator

Progress = Callable[[int, int], None]
Z975 = 1.959963984540054  # standard normal 0.975 quantile


@dataclass
class TraceEstimate:
    """A trace estimate with its calibrated standard error (module doc).

    Attributes:
        value: the estimate of ``tr(A)`` (Hutch++: ``tr(Q^T A Q)`` plus the Hutchinson mean of the rest).
        stderr: ``t_{0.975, dof} se / 1.96``, so ``value +- 2 stderr`` is a ~95% interval; 0 when the
            sketch spans the whole space (the trace is then exact), ``inf`` below 2 Hutchinson samples.
        matvecs: products with ``A`` spent (sketch and probes).
        samples: Hutchinson probes ``z`` used.
        sketch: columns of the Hutch++ sketch ``Q`` (0 for plain Hutchinson).
        method: ``"hutchinson"`` or ``"hutch++"``.
    """

    value: float
    stderr: float
    matvecs: int
    samples: int
    sketch: int
    method: str


def rademacher(dim: int, k: int, generator: torch.Generator, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[dim, k]`` of +-1 drawn on the CPU (device-independent)."""
    z = torch.randint(0, 2, (dim, k), generator=generator, dtype=torch.int8)
    return (2 * z - 1).to(dtype=dtype, device=device)


@dataclass
class _Samples:
    """Hutchinson samples: quadratic forms ``z^T B z``, squared norms ``||B z||^2`` and the running sums
    of ``d = z * (B z)`` (``E[d_i d'_i] = B_ii^2`` for independent ``z, z'``)."""

    forms: list[float]
    norms: list[float]
    d_sum: torch.Tensor | None = None
    d_sq: float = 0.0

    def add(self, Z: torch.Tensor, BZ: torch.Tensor) -> None:
        self.forms.extend((Z * BZ).sum(0).double().tolist())
        self.norms.extend((BZ * BZ).sum(0).double().tolist())
        D = (Z * BZ).double()
        s = D.sum(1)
        self.d_sum = s if self.d_sum is None else self.d_sum + s
        self.d_sq += float((D * D).sum())

    def diagonal_square(self) -> float:
        """Unbiased estimate of ``sum_i B_ii^2`` from the cross products of distinct samples."""
        g = len(self.forms)
        if g < 2 or self.d_sum is None:
            return 0.0
        return (float(self.d_sum @ self.d_sum) - self.d_sq) / (g * (g - 1))

    def __len__(self) -> int:
        return len(self.forms)

    def mean(self) -> float:
        return sum(self.forms) / len(self.forms)

    def stderr(self) -> float:
        """Standard error of the mean of the forms, calibrated (module doc); ``inf`` below 2 samples."""
        return _stderr(self.forms, self.norms, self.diagonal_square())


def _adaptive_hutchinson(
    op: LinearOperator,
    project: Callable[[torch.Tensor], torch.Tensor],
    *,
    min_samples: int,
    max_samples: int,
    rtol: float,
    offset: float,
    generator: torch.Generator,
    block: int,
    progress: Progress | None,
    done: int,
    budget: int,
) -> tuple[_Samples, int]:
    """Hutchinson samples ``z^T B z`` of projected Rademacher probes, sized by a two-stage rule.

    Stopping as soon as the running stderr dips below ``rtol * |estimate|`` makes the reported stderr
    too small (optional stopping). Instead a pilot of ``min_samples`` probes estimates the variance,
    which fixes how many samples reach the target (Stein's two-stage rule, with the pilot variance
    inflated by 1.2); one top-up follows only if the target is still missed.
    """
    samples = _Samples([], [])

    def draw(count: int, done: int) -> int:
        while count > 0:
            k = min(block, count)
            Z = project(rademacher(op.dim, k, generator, op.dtype, op.device))
            BZ = project(op.matmat(Z))
            samples.add(Z, BZ)
            done += k
            count -= k
            if progress is not None:
                progress(done, budget)
        return done

    def needed() -> int:
        est = offset + samples.mean()
        var = samples.stderr() ** 2 * len(samples)
        if est == 0:
            return max_samples
        return math.ceil(1.2 * var / (rtol * est) ** 2)

    done = draw(min(max(min_samples, 2), max_samples), done)
    if rtol <= 0:
        return samples, draw(max_samples - len(samples), done)
    for _ in range(2):  # stage two, then at most one top-up
        target = min(max_samples, needed())
        if target <= len(samples):
            break
        done = draw(target - len(samples), done)
    return samples, done


def _satterthwaite(x: list[float]) -> float:
    """Degrees of freedom of ``mean(x)`` as a variance estimate: ``2 g mean^2 / var`` (>= 1)."""
    g = len(x)
    m = sum(x) / g
    v = sum((xi - m) ** 2 for xi in x) / (g - 1)
    return max(1.0, 2 * g * m * m / v) if v > 0 else math.inf


def _stderr(forms: list[float], norms: list[float] | None = None, diagonal: float = 0.0) -> float:
    """Calibrated standard error of ``mean(forms)`` (module doc): ``t_{0.975,dof} se / 1.96``."""
    from scipy.stats import t as student

    g = len(forms)
    if g < 2:
        return math.inf
    mean = sum(forms) / g
    dev = [(x - mean) ** 2 for x in forms]
    var, dof = sum(dev) / (g - 1), _satterthwaite(dev) * (g - 1) / g
    if norms:
        var_f = 2 * (sum(norms) / len(norms) - max(diagonal, 0.0))  # E = 2 (||B||_F^2 - sum B_ii^2)
        if var_f >= var:
            var, dof = var_f, _satterthwaite(norms)
    se = math.sqrt(var / g)
    q = float(student.ppf(0.975, dof)) if math.isfinite(dof) else Z975
    return se * q / Z975


def hutchinson(
    op: LinearOperator,
    *,
    generator: torch.Generator,
    min_samples: int = 10,
    max_samples: int = 100,
    rtol: float = 0.0,
    block: int = 8,
    progress: Progress | None = None,
) -> TraceEstimate:
    """Plain Hutchinson with Rademacher probes; stops at ``stderr <= rtol * |trace|`` (rtol 0: all samples)."""
    samples, done = _adaptive_hutchinson(
        op,
        lambda Z: Z,
        min_samples=min_samples,
        max_samples=max_samples,
        rtol=rtol,
        offset=0.0,
        generator=generator,
        block=block,
        progress=progress,
        done=0,
        budget=max_samples,
    )
    return TraceEstimate(samples.mean(), samples.stderr(), done, len(samples), 0, "hutchinson")


def hutchpp(
    op: LinearOperator,
    *,
    generator: torch.Generator,
    sketch: int = 10,
    min_samples: int = 10,
    max_samples: int = 100,
    rtol: float = 0.0,
    block: int = 8,
    progress: Progress | None = None,
) -> TraceEstimate:
    """Hutch++ with ``sketch`` sketch columns (``2 * sketch`` matvecs) plus adaptive Hutchinson on the rest.

    If ``sketch >= dim`` the trace is computed exactly (stderr 0).
    """
    n = op.dim
    sketch = max(0, min(sketch, n))
    budget = 2 * sketch + max_samples
    S = rademacher(n, sketch, generator, op.dtype, op.device)
    Y = op.matmat(S) if sketch else S
    done = sketch
    if sketch:
        # any orthonormal Q keeps the split tr(Q^T A Q) + tr(P A P) exact, even for a rank-deficient sketch
        Q = torch.linalg.qr(Y.double())[0].to(op.dtype)
    else:
        Q = torch.zeros(n, 0, dtype=op.dtype, device=op.device)
    exact = 0.0
    if Q.shape[1]:
        AQ = op.matmat(Q)
        done += Q.shape[1]
        exact = float((Q.double() * AQ.double()).sum())
    if progress is not None:
        progress(done, budget)
    if Q.shape[1] >= n:
        return TraceEstimate(exact, 0.0, done, 0, Q.shape[1], "hutch++")

    def project(Z: torch.Tensor) -> torch.Tensor:
        return Z - Q @ (Q.T @ Z) if Q.shape[1] else Z

    samples, done = _adaptive_hutchinson(
        op,
        project,
        min_samples=min_samples,
        max_samples=max_samples,
        rtol=rtol,
        offset=exact,
        generator=generator,
        block=block,
        progress=progress,
        done=done,
        budget=budget,
    )
    return TraceEstimate(exact + samples.mean(), samples.stderr(), done, len(samples), Q.shape[1], "hutch++")
