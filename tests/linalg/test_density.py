"""SLQ density: quadrature exactness, normalisation, negative mass (Chebyshev-Markov-Stieltjes bracket plus
probe noise) against the exact fraction of eigenvalues below -delta."""

from __future__ import annotations

import math

import pytest
import torch

from diagnostics.linalg import DenseOperator, gaussian_density, negative_mass, slq, tridiagonal_quadrature
from diagnostics.linalg.density import cms_bracket, default_grid, quadrature_resolution
from diagnostics.linalg.lanczos import lanczos_tridiagonal
from tinymodels import spectrum_matrix


def test_full_krylov_quadrature_reproduces_the_spectrum() -> None:
    eigs = torch.tensor([-2.0, -0.5, 0.1, 0.3, 1.0, 4.0, 9.0], dtype=torch.float64)
    A = spectrum_matrix(eigs)
    v = torch.randn(7, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    alpha, beta = lanczos_tridiagonal(DenseOperator(A), v, 7)
    nodes, weights = tridiagonal_quadrature(alpha, beta)
    assert torch.allclose(nodes, eigs, atol=1e-10)
    # weights are the squared overlaps of the unit probe with the eigenvectors
    _, U = torch.linalg.eigh(A)
    assert torch.allclose(weights, (U.T @ (v / v.norm())) ** 2, atol=1e-10)
    assert abs(float(weights.sum()) - 1) < 1e-12


def test_quadrature_moments_are_exact() -> None:
    # m-step Gauss quadrature integrates polynomials up to degree 2m-1 exactly: v^T A^j v
    eigs = torch.linspace(-1, 3, 60, dtype=torch.float64)
    A = spectrum_matrix(eigs, 2)
    v = torch.randn(60, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    v = v / v.norm()
    nodes, weights = tridiagonal_quadrature(*lanczos_tridiagonal(DenseOperator(A), v, 6))
    for j in range(12):
        exact = float(v @ torch.linalg.matrix_power(A, j) @ v)
        assert abs(float((weights * nodes**j).sum()) - exact) < 1e-9 * max(1.0, abs(exact))


def test_density_integrates_to_one_and_negative_mass_matches_exact_fraction() -> None:
    g = torch.Generator().manual_seed(4)
    eigs = torch.cat(
        [
            torch.rand(60, generator=g, dtype=torch.float64) * 2 - 2.5,
            torch.rand(140, generator=g, dtype=torch.float64) * 5 + 0.5,
        ]
    )
    exact_fraction = float((eigs < 0).double().mean())  # 0.3
    op = DenseOperator(spectrum_matrix(eigs, 3))
    res = slq(op, probes=40, steps=40, generator=torch.Generator().manual_seed(0))
    assert res.matvecs == 40 * 40
    nm = negative_mass(res.nodes, res.weights)
    assert nm.low <= exact_fraction <= nm.high and nm.high - nm.low < 0.08
    assert nm.value - 2 * nm.stderr <= nm.low and nm.high <= nm.value + 2 * nm.stderr
    grid, sigma = default_grid(res.nodes, 2000)
    dens = gaussian_density(res.nodes, res.weights, grid, sigma)
    integral = float(torch.trapezoid(dens, grid))
    assert abs(integral - 1) < 1e-3
    lo, hi = res.spectral_range()
    # Ritz values lie inside the spectrum (interlacing) and the extreme ones converge fast
    span = float(eigs.max() - eigs.min())
    assert float(eigs.min()) - 1e-10 <= lo < float(eigs.min()) + 1e-4 * span
    assert float(eigs.max()) - 1e-4 * span < hi <= float(eigs.max()) + 1e-10


def test_gaussian_density_of_one_node_is_the_normal_pdf() -> None:
    grid = torch.linspace(-3, 3, 7, dtype=torch.float64)
    d = gaussian_density(
        [torch.tensor([0.0], dtype=torch.float64)], [torch.tensor([1.0], dtype=torch.float64)], grid, 1.0
    )
    ref = torch.exp(-0.5 * grid**2) / math.sqrt(2 * math.pi)
    assert torch.allclose(d, ref, atol=1e-15)


def test_cms_bracket_holds_for_every_threshold() -> None:
    # the Chebyshev-Markov-Stieltjes inequalities: the quadrature's partial sums bracket the true
    # spectral distribution of the probe at any threshold
    eigs = torch.linspace(-3, 5, 120, dtype=torch.float64)
    A = spectrum_matrix(eigs, 5)
    evals, U = torch.linalg.eigh(A)
    for seed in range(5):
        v = torch.randn(120, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        v = v / v.norm()
        mu = (U.T @ v) ** 2
        nodes, weights = tridiagonal_quadrature(*lanczos_tridiagonal(DenseOperator(A), v, 12))
        for t in torch.linspace(-3.5, 5.5, 91).tolist():
            low, point, high = cms_bracket(nodes, weights, t)
            exact = float(mu[evals < t].sum())
            assert low - 1e-12 <= exact <= high + 1e-12
            assert low <= point <= high


def test_negative_mass_interval_covers_the_exact_fraction_below_delta() -> None:
    # a Hessian-like spectrum: outliers, a huge near-zero bulk (where the old threshold sat), some negatives
    g = torch.Generator().manual_seed(4)
    eigs = torch.cat(
        [
            torch.tensor([10.0, 6.0, 4.0], dtype=torch.float64),
            0.02 * torch.randn(200, generator=g, dtype=torch.float64),
            -0.5 * torch.rand(40, generator=g, dtype=torch.float64),
            torch.rand(57, generator=g, dtype=torch.float64),
        ]
    )
    op = DenseOperator(spectrum_matrix(eigs, 3))
    covered = 0
    for seed in range(20):
        res = slq(op, probes=6, steps=30, generator=torch.Generator().manual_seed(seed))
        delta = quadrature_resolution(res.nodes, 30)
        nm = negative_mass(res.nodes, res.weights, delta)
        exact = float((eigs < -delta).double().mean())
        covered += nm.low <= exact <= nm.high
        assert nm.delta == delta > 0 and nm.bias > 0 and nm.probes == 6
    assert covered >= 18
    with pytest.raises(ValueError):
        negative_mass(res.nodes, res.weights, -1.0)


def test_grid_mass_is_one_for_a_resolved_density_and_not_for_an_unresolved_one() -> None:
    from diagnostics.linalg.density import gaussian_density, grid_mass

    nodes, weights = [torch.tensor([-1.0, 2.0])], [torch.tensor([0.25, 0.75])]
    grid = torch.linspace(-3.0, 4.0, 2001, dtype=torch.float64)
    assert grid_mass(grid, gaussian_density(nodes, weights, grid, 0.1)) == pytest.approx(1.0, abs=1e-9)
    assert grid_mass(grid, gaussian_density(nodes, weights, grid, 1e-6)) < 0.5  # spikes between grid points
    assert grid_mass(grid, gaussian_density(nodes, weights, grid, 100.0)) == pytest.approx(7 / (100 * 2.5066), rel=1e-3)
