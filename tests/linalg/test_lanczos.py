"""Lanczos against known spectra: extreme eigenpairs, the tolerance honoured, degeneracy, bottom end, and
the safety of the stopping rule on spectra built to break it (clusters, repeated eigenvalues, a bulk just
below the top, negative bottoms, float32 rounding), warm starts and eigenvector accuracy."""

from __future__ import annotations

import importlib

import pytest
import torch

from diagnostics.errors import DiagnosticsError
from diagnostics.linalg import DenseOperator, lanczos
from diagnostics.linalg.lanczos import KrylovSpace, _Run, consecutive_runs, lehmann_upper, transposed
from tinymodels import spectrum_matrix

lanczos_module = importlib.import_module("diagnostics.linalg.lanczos")


def test_top_and_bottom_of_a_known_spectrum() -> None:
    g = torch.Generator().manual_seed(3)
    eigs = torch.cat(
        [
            torch.tensor([50.0, 31.0, 20.0, 12.5, 9.0]),
            torch.rand(195, generator=g, dtype=torch.float64) * 4 - 1,
            torch.tensor([-7.0, -5.5]),
        ]
    ).double()
    A = spectrum_matrix(eigs)
    op = DenseOperator(A)
    res = lanczos(op, k_top=5, k_bottom=2, tol=1e-9, generator=torch.Generator().manual_seed(0))
    ref = torch.sort(eigs, descending=True).values
    assert res.converged
    assert torch.allclose(res.eigenvalues, ref[:5], rtol=1e-8)
    assert torch.allclose(res.bottom_eigenvalues, torch.tensor([-7.0, -5.5], dtype=torch.float64), rtol=1e-8)
    assert res.iterations == op.matvec_count < 200
    # eigenvectors: unit, and residuals as reported
    for lam, v, r in zip(res.eigenvalues, res.eigenvectors.T, res.residuals):
        assert abs(float(v.norm()) - 1) < 1e-10
        assert float((A @ v - lam * v).norm()) == pytest.approx(float(r), abs=1e-9)


@pytest.mark.parametrize("tol", [1e-2, 1e-3, 1e-5])
@pytest.mark.parametrize("criterion", ["bound", "residual"])
def test_requested_tolerance_is_honoured(tol: float, criterion: str) -> None:
    # a slowly decaying spectrum with clustered top eigenvalues: the hard case for power iteration
    eigs = 1.0 / torch.arange(1, 401, dtype=torch.float64) ** 0.5
    A = spectrum_matrix(eigs, seed=1)
    for seed in range(3):
        res = lanczos(
            DenseOperator(A), k_top=5, tol=tol, generator=torch.Generator().manual_seed(seed), criterion=criterion
        )
        assert res.converged and res.criterion == criterion
        err = (res.eigenvalues - eigs[:5]).abs()
        assert (err <= tol * eigs[:5]).all()
        # the reported bounds really bound the error
        assert (err <= res.error_bounds * (1 + 1e-9) + 1e-12 * eigs[:5]).all()  # + rounding
        true_res = torch.stack([(A @ v - lam * v).norm() for lam, v in zip(res.eigenvalues, res.eigenvectors.T)])
        assert torch.allclose(true_res, res.residuals, rtol=1e-6, atol=1e-12)
        if criterion == "residual":
            assert (true_res <= 1.0001 * tol * res.eigenvalues.abs()).all()


def test_eigenvalue_bound_stops_no_later_than_the_residual_rule() -> None:
    eigs = 1.0 / torch.arange(1, 401, dtype=torch.float64) ** 0.5
    op = DenseOperator(spectrum_matrix(eigs, seed=1))
    bound = lanczos(op, k_top=5, tol=1e-4, generator=torch.Generator().manual_seed(0))
    resid = lanczos(op, k_top=5, tol=1e-4, generator=torch.Generator().manual_seed(0), criterion="residual")
    assert bound.converged and resid.converged
    assert bound.iterations <= resid.iterations
    assert (resid.residuals <= 1e-4 * resid.eigenvalues.abs()).all()
    with pytest.raises(ValueError):
        lanczos(op, k_top=1, criterion="nonsense")


def test_lehmann_bounds_are_temple_for_one_vector_and_hold_for_groups() -> None:
    # one Ritz pair: lambda <= theta + r^2 / (theta - a), the Kato-Temple inequality
    theta = torch.tensor([3.0], dtype=torch.float64)
    G = torch.tensor([[0.2]], dtype=torch.float64)
    assert float(lehmann_upper(theta, G, 1.0)[0]) == pytest.approx(3.0 + 0.04 / 2.0, rel=1e-14)
    # groups of approximate eigenvectors of random matrices: the bounds hold whenever lambda_{p+1} < a
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        n, p = 30, int(torch.randint(1, 5, (1,), generator=gen))
        ev = torch.sort(torch.randn(n, generator=gen, dtype=torch.float64) * 3, descending=True).values
        ev[:p] += 5
        Qm = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))[0]
        A = Qm @ torch.diag(ev) @ Qm.T
        Y = torch.linalg.qr(Qm[:, :p] + 0.05 * torch.randn(n, p, generator=gen, dtype=torch.float64))[0]
        th, S = torch.linalg.eigh(Y.T @ A @ Y)
        th, Y = th.flip(0), (Y @ S).flip(1)
        G = torch.linalg.qr(A @ Y - Y * th)[1]  # residual coordinates in an orthonormal basis
        if not ev[p] < th[-1]:
            continue
        U = lehmann_upper(th, G, float(ev[p] + th[-1]) / 2)
        assert (ev[:p] - 1e-12 <= U).all() and (th <= ev[:p] + 1e-12).all()


def test_repeated_eigenvalues_are_found_through_restarts() -> None:
    eigs = torch.tensor([5.0, 5.0, 5.0, 2.0, 1.0, 1.0, 0.5], dtype=torch.float64)
    res = lanczos(DenseOperator(spectrum_matrix(eigs)), k_top=4, tol=1e-10, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(res.eigenvalues, torch.tensor([5.0, 5.0, 5.0, 2.0], dtype=torch.float64), rtol=1e-9)
    assert res.restarts >= 1


def test_same_seed_same_numbers_and_iteration_cap() -> None:
    eigs = torch.linspace(1, 2, 300, dtype=torch.float64)
    op = DenseOperator(spectrum_matrix(eigs, seed=2))
    a = lanczos(op, k_top=2, tol=1e-12, max_iter=20, generator=torch.Generator().manual_seed(5))
    b = lanczos(op, k_top=2, tol=1e-12, max_iter=20, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.eigenvalues, b.eigenvalues)
    assert not a.converged and a.iterations == 20


def test_bad_requests() -> None:
    op = DenseOperator(torch.eye(3, dtype=torch.float64))
    with pytest.raises(ValueError):
        lanczos(op, k_top=3, k_bottom=1)
    with pytest.raises(ValueError):
        lanczos(op, k_top=0, k_bottom=0)


def test_transposed_is_a_view_with_row_major_strides_for_vectors() -> None:
    # a [1, n] row with strides (1, 1) (what X.T.contiguous() gives for a column) copies ~80x slower
    col = torch.arange(6.0).reshape(6, 1)
    row = transposed(col)
    assert row.shape == (1, 6) and row.stride() == (6, 1) and row.data_ptr() == col.data_ptr()
    assert torch.equal(row, col.T)
    back = transposed(torch.arange(6.0).reshape(6, 1).T)  # a (1, 1)-strided row (a column's .T) back to a column
    assert back.shape == (6, 1) and back.stride() == (1, 1)
    M = torch.arange(12.0).reshape(4, 3)
    assert torch.equal(transposed(M), M.T) and transposed(M).data_ptr() == M.data_ptr()


def test_consecutive_runs_keep_the_given_order() -> None:
    assert consecutive_runs([3, 4, 5, 9, 2]) == [(3, 6), (9, 10), (2, 3)]
    assert consecutive_runs(torch.tensor([11, 17, 18])) == [(11, 12), (17, 19)]
    assert consecutive_runs([]) == []


def _space_with_rows(n: int = 50, rows: int = 8) -> KrylovSpace:
    kr = KrylovSpace(DenseOperator(torch.eye(n, dtype=torch.float64)), capacity=rows)
    Q, _ = torch.linalg.qr(torch.randn(n, rows, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    kr.Q[:rows] = Q.T
    kr.size = rows
    return kr


def test_projecting_out_scattered_rows_equals_projecting_out_their_gather() -> None:
    # e.g. a restart check's step: its last two rows and the main chain's pending row further up
    kr = _space_with_rows()
    W = torch.randn(50, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    idx = [6, 1, 2, 4]
    G = kr.Q[torch.tensor(idx)]
    out, C = kr._project_out(W, torch.tensor(idx))
    assert torch.allclose(C, G @ W, atol=1e-14)  # coefficients in the order of the rows given
    assert torch.allclose(out, W - G.T @ (G @ W), atol=1e-14)
    assert torch.allclose(G @ out, torch.zeros(4, 2, dtype=torch.float64), atol=1e-14)
    assert torch.equal(W, torch.randn(50, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    whole, C_all = kr._project_out(W)
    assert torch.allclose(C_all, kr.Q[:8] @ W, atol=1e-14)
    assert torch.allclose(whole, W - kr.Q[:8].T @ (kr.Q[:8] @ W), atol=1e-14)


def test_one_column_is_normalised_like_its_qr() -> None:
    kr = _space_with_rows()
    w = torch.randn(50, 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    rows, B = kr._orthonormal(w, 1.0)
    assert rows.shape == (1, 50) and B.shape == (1, 1) and B.dtype == torch.float64
    assert torch.allclose(rows.T @ B, w, atol=1e-14) and abs(float(rows.norm()) - 1.0) < 1e-14
    rows2, B2 = kr._orthonormal(torch.cat([w, w.roll(1, 0)], 1), 1.0)  # the QR path: same first column
    assert torch.allclose(rows2.T @ B2[:, :1], w, atol=1e-13)
    tiny = 1e-20 * w  # numerically zero against the reference: no row, its norm counted as lost
    rows, B = kr._orthonormal(tiny, 1.0)
    assert rows.shape == (0, 50) and B.shape == (0, 1)
    assert kr.lost == pytest.approx(float(tiny.norm()), rel=1e-12)


def test_a_long_float32_column_is_normalised_to_working_precision() -> None:
    # float32 sums over ~1e6 entries lose ~1e-5 (torch's norm: 1.3e-5, LAPACK's Householder QR: 5e-6), which
    # the rounding estimate then charges to every bound; the norm is taken in float64
    kr = KrylovSpace(DenseOperator(torch.eye(3, dtype=torch.float32)), capacity=1)
    kr.n = 1_000_000
    w = 0.37 * torch.randn(kr.n, 1, generator=torch.Generator().manual_seed(4))
    rows, B = kr._orthonormal(w, 1.0)
    exact = float(w.double().norm())
    assert abs(float(B) - exact) <= 1e-12 * exact
    assert abs(float(rows.double().norm()) - 1.0) < 1e-7


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_product_stops_with_a_one_line_error(bad: float) -> None:
    A = torch.diag(torch.linspace(0.0, 1.0, 30, dtype=torch.float64))
    A[3, 3] = bad
    with pytest.raises(DiagnosticsError, match="NaN or Inf after 1 product"):
        lanczos(DenseOperator(A), k_top=2, tol=1e-6)
    with pytest.raises(DiagnosticsError, match="NaN or Inf"):  # and the block path (QR of several columns)
        lanczos(DenseOperator(A), k_top=2, tol=1e-6, block_size=2)


def _outliers_over_a_bulk(n: int = 800) -> torch.Tensor:
    """Nine outliers over a bulk with a negative part and two negative outliers (a classifier's Hessian)."""
    bulk = -0.3 + 1.1 * torch.rand(n - 11, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    return torch.cat([torch.linspace(5.6, 3.5, 9, dtype=torch.float64), bulk, torch.tensor([-1.5, -1.2]).double()])


def test_compressing_the_basis_keeps_the_krylov_relation() -> None:
    # a thick restart: the multiplied rows become Ritz vectors, A Q_done = Q H[:, done] still holds exactly
    eigs = _outliers_over_a_bulk(300)
    A = spectrum_matrix(eigs, seed=3)
    kr = KrylovSpace(DenseOperator(A), capacity=40)
    chain = kr.add(torch.randn(300, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    for _ in range(15):
        chain = kr.multiply(chain)
    theta, S, _, _ = kr.ritz()
    keep = torch.tensor([0, 9, 11, 12, 13, 14])
    pending = kr.Q[kr.pending].clone()
    kr.compress(S[:, keep])
    assert kr.size == 7 and kr.pending == [6] and kr.done_index.tolist() == list(range(6))
    Q = kr.Q[: kr.size]
    assert torch.allclose(Q @ Q.T, torch.eye(7, dtype=torch.float64), atol=1e-12)
    assert torch.equal(Q[6], pending[0])
    done = kr.done_index
    assert torch.allclose(A @ Q[done].T, Q.T @ kr.H[: kr.size, done], atol=1e-11)
    assert torch.allclose(kr.H[done[:, None], done[None, :]], torch.diag(theta[keep]), atol=1e-12)
    # and the chain goes on from the kept pending row: still a valid Krylov decomposition
    chain = list(kr.pending)
    for _ in range(5):
        chain = kr.multiply(chain)
    Q, done = kr.Q[: kr.size], kr.done_index
    assert torch.allclose(Q @ Q.T, torch.eye(kr.size, dtype=torch.float64), atol=1e-11)
    assert torch.allclose(A @ Q[done].T, Q.T @ kr.H[: kr.size, done], atol=1e-10)


@pytest.mark.parametrize("k_top,k_bottom", [(5, 0), (3, 2)])
def test_restart_check_reuses_the_rows_of_ritz_vectors_it_does_not_need(monkeypatch, k_top: int, k_bottom: int) -> None:
    # the same products, eigenvalues, bounds and vectors as a run that keeps every row, with fewer rows held
    eigs = _outliers_over_a_bulk()
    A = spectrum_matrix(eigs, seed=1)
    exact = torch.sort(eigs, descending=True).values
    runs = {}
    for compress in (True, False):
        if not compress:
            monkeypatch.setattr(_Run, "compress", lambda self, cert, steps: cert)
        runs[compress] = lanczos(
            DenseOperator(A), k_top=k_top, k_bottom=k_bottom, tol=1e-6, generator=torch.Generator().manual_seed(0)
        )
    lean, full = runs[True], runs[False]
    assert lean.converged and full.converged and lean.checks == full.checks >= 1
    assert lean.iterations == full.iterations
    assert lean.basis_rows <= full.basis_rows - 8
    assert torch.allclose(lean.eigenvalues, full.eigenvalues, rtol=1e-12)
    assert torch.allclose(lean.error_bounds, full.error_bounds, rtol=1e-6)
    assert (abs(lean.eigenvalues - exact[:k_top]) <= lean.error_bounds).all()
    assert (abs(lean.bottom_eigenvalues - exact.flip(0)[:k_bottom]) <= lean.bottom_error_bounds).all()
    for lam, v, r in zip(lean.eigenvalues, lean.eigenvectors.T, lean.residuals):
        assert float((A @ v - lam * v).norm()) == pytest.approx(float(r), rel=1e-6, abs=1e-12)
    assert torch.allclose(
        (lean.eigenvectors.T @ full.eigenvectors).abs().diagonal(), torch.ones(k_top, dtype=torch.float64), atol=1e-9
    )


def test_missing_eigenvalues_are_still_found_after_a_compressed_check(monkeypatch) -> None:
    # a triple top eigenvalue: the first check runs on a compressed basis and must still find the copies
    eigs = torch.cat([torch.tensor([6.0, 6.0, 6.0, 4.0], dtype=torch.float64), _outliers_over_a_bulk(600)[9:-2] * 0.5])
    compressed = []
    orig = KrylovSpace.compress

    def spy(self, S):
        compressed.append(self.size - S.shape[1] - len(self.pending))
        return orig(self, S)

    monkeypatch.setattr(KrylovSpace, "compress", spy)
    # a diagonal operator and a start vector without the 2nd and 3rd copies: every vector of the main chain has
    # exact zeros there, so only the restart checks (fresh Gaussian vectors) can find them
    draw = lanczos_module.gaussian_block
    calls = []

    def start_without_copies(*args, **kwargs):
        X = draw(*args, **kwargs)
        if not calls:
            X[1:3] = 0
        calls.append(1)
        return X

    monkeypatch.setattr(lanczos_module, "gaussian_block", start_without_copies)
    res = lanczos(DenseOperator(torch.diag(eigs)), k_top=4, tol=1e-8, generator=torch.Generator().manual_seed(0))
    # the first check finds the missing copies, the second (again on a compressed basis) passes
    assert res.converged and res.checks >= 2 and len(compressed) == res.checks and min(compressed) >= 2
    assert torch.allclose(res.eigenvalues, torch.tensor([6.0, 6.0, 6.0, 4.0], dtype=torch.float64), rtol=1e-8)


def test_compressing_a_basis_with_a_parked_row_in_the_middle() -> None:
    # multiplied rows that are not consecutive (a fresh vector was added mid-chain and left pending)
    A = spectrum_matrix(_outliers_over_a_bulk(300), seed=3)
    kr = KrylovSpace(DenseOperator(A), capacity=60)
    g = torch.Generator().manual_seed(0)
    chain = kr.add(torch.randn(300, 1, generator=g, dtype=torch.float64))
    for _ in range(6):
        chain = kr.multiply(chain)
    kr.add(torch.randn(300, 1, generator=g, dtype=torch.float64))
    for _ in range(6):
        chain = kr.multiply(chain)
    assert kr.pending == [7, 13] and kr.done_index.tolist() == [0, 1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12]
    _, S, _, _ = kr.ritz()
    kr.compress(S[:, torch.tensor([0, 8, 9, 10, 11])])
    assert kr.size == 7 and kr.pending == [5, 6]  # the pending rows keep their order
    for _ in range(4):
        kr.multiply(list(kr.pending))
    Q, done = kr.Q[: kr.size], kr.done_index
    assert torch.allclose(Q @ Q.T, torch.eye(kr.size, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(A @ Q[done].T, Q.T @ kr.H[: kr.size, done], atol=1e-12)
