"""Trace estimators: exactness where the sketch spans the matrix, unbiasedness, honest standard errors."""

from __future__ import annotations

import statistics

import pytest
import torch

from diagnostics.linalg import DenseOperator, hutchinson, hutchpp
from tinymodels import spectrum_matrix


def psd(n: int, decay: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=g))
    eigs = torch.arange(1, n + 1, dtype=torch.float64) ** (-decay)
    return Q @ torch.diag(eigs) @ Q.T


def test_hutchpp_is_exact_for_low_rank() -> None:
    g = torch.Generator().manual_seed(0)
    U = torch.randn(80, 6, dtype=torch.float64, generator=g)
    A = U @ torch.diag(torch.tensor([9.0, 7, 5, 3, 2, 1], dtype=torch.float64)) @ U.T
    est = hutchpp(DenseOperator(A), generator=torch.Generator().manual_seed(1), sketch=8, max_samples=10)
    assert abs(est.value - float(torch.trace(A))) < 1e-9 * float(torch.trace(A))
    assert est.stderr < 1e-9 * float(torch.trace(A))


def test_hutchpp_exact_when_sketch_covers_dimension() -> None:
    A = psd(12, 1.0, 3)
    est = hutchpp(DenseOperator(A), generator=torch.Generator().manual_seed(0), sketch=12)
    assert abs(est.value - float(torch.trace(A))) < 1e-12 and est.stderr == 0.0


def test_estimators_are_unbiased_and_stderr_is_calibrated() -> None:
    A = psd(150, 0.7, 5) - 0.2 * torch.eye(150, dtype=torch.float64)  # indefinite, like a Hessian
    exact = float(torch.trace(A))
    z_hutch, z_pp, se_h, se_pp = [], [], [], []
    for seed in range(40):
        h = hutchinson(DenseOperator(A), generator=torch.Generator().manual_seed(seed), min_samples=30, max_samples=30)
        p = hutchpp(
            DenseOperator(A), generator=torch.Generator().manual_seed(seed), sketch=10, max_samples=30, min_samples=30
        )
        z_hutch.append((h.value - exact) / h.stderr)
        z_pp.append((p.value - exact) / p.stderr)
        se_h.append(h.stderr)
        se_pp.append(p.stderr)
    # standardised errors: mean near 0, spread near 1 (a bias or a wrong stderr would show here)
    for z in (z_hutch, z_pp):
        assert abs(statistics.mean(z)) < 0.5
        assert 0.6 < statistics.stdev(z) < 1.5
    # deflating the top directions lowers the variance
    assert statistics.median(se_pp) < 0.8 * statistics.median(se_h)


def test_adaptive_stopping_reaches_the_requested_relative_stderr() -> None:
    A = psd(200, 0.5, 7)
    est = hutchpp(DenseOperator(A), generator=torch.Generator().manual_seed(0), sketch=10, rtol=0.01, max_samples=2000)
    assert est.stderr <= 0.01 * abs(est.value)
    assert abs(est.value - float(torch.trace(A))) < 4 * est.stderr
    assert est.matvecs == 20 + est.samples


def test_stderr_coverage_over_100_seeds_with_a_heavy_top_cluster() -> None:
    # 30 eigenvalues near 10 over a bulk in [-0.5, 1]: the quadratic forms are heavy-tailed and their
    # sample variance runs low; the moment-based variance with a t quantile keeps the coverage
    g = torch.Generator().manual_seed(1)
    eigs = torch.cat(
        [
            10 + 0.3 * torch.rand(30, generator=g, dtype=torch.float64),
            torch.rand(90, generator=g, dtype=torch.float64) * 1.5 - 0.5,
        ]
    )
    op = DenseOperator(spectrum_matrix(eigs, 2))
    exact = float(eigs.sum())
    for method in ("hutch++", "hutchinson"):
        z = []
        for seed in range(100):
            gen = torch.Generator().manual_seed(seed)
            if method == "hutch++":
                est = hutchpp(op, generator=gen, sketch=8, min_samples=12, max_samples=12)
            else:
                est = hutchinson(op, generator=gen, min_samples=12, max_samples=12)
            z.append((est.value - exact) / est.stderr)
        covered = sum(abs(x) <= 2 for x in z) / len(z)
        wild = sum(abs(x) > 3 for x in z) / len(z)
        assert covered >= 0.9, (method, covered)
        assert wild <= 0.02, (method, wild)


def test_diagonal_part_does_not_inflate_the_stderr() -> None:
    # z^T (c I) z = c n for Rademacher z: a shift adds nothing to the variance, and the estimate knows it
    A = spectrum_matrix(torch.linspace(-1, 1, 80, dtype=torch.float64), 3) + 5 * torch.eye(80, dtype=torch.float64)
    B = A - 5 * torch.eye(80, dtype=torch.float64)
    a = hutchinson(DenseOperator(A), generator=torch.Generator().manual_seed(0), min_samples=40, max_samples=40)
    b = hutchinson(DenseOperator(B), generator=torch.Generator().manual_seed(0), min_samples=40, max_samples=40)
    assert a.value == pytest.approx(b.value + 400, rel=1e-12)
    assert a.stderr == pytest.approx(b.stderr, rel=0.1)
