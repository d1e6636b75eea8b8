"""One Krylov core: block Lanczos with full reorthogonalisation, safe eigenvalue bounds, quadrature.

Everything Krylov in the package runs on :class:`KrylovSpace`: an orthonormal basis ``Q`` (rows, grown
as needed) and the projected matrix ``H = Q^T A Q`` (float64). A step multiplies a block of *pending*
basis vectors (``op.matmat``: one data pass for the block), orthogonalises the products against the
basis and appends what is left as new pending vectors. With one start vector this is the Lanczos
recurrence (``H`` tridiagonal), with ``b`` start vectors block Lanczos (``H`` block tridiagonal), and
fresh random directions can be added at any time (the restart check below, invariant subspaces,
warm starts padded with random vectors) without breaking the relation

    ``A Q_done = Q H[:, done]``  exactly, up to rounding,

where ``done`` are the vectors already multiplied. The Ritz pairs of ``H[done, done] = S diag(theta) S^T``
have residuals ``A y - theta y = Q_pending H[pending, done] s``, so the residual of every Ritz pair is
known without another product.

Reorthogonalisation: the known couplings (the previous block) are removed first, then one classical
Gram-Schmidt pass against the whole basis as two matrix products (``C = Q W``, ``W -= Q^T C``); a second
pass follows only when the first removed more than ``1 - 1/sqrt(2)`` of a column's norm (the
Daniel-Gragg-Kaufman-Stewart criterion, "twice is enough"). The basis is one ``[capacity, n]`` tensor
in the operator's dtype on ``basis_device``, grown by doubling; no chunks, no per-column loops.

**Eigenvalue bounds** (:func:`lanczos`). Top end (the bottom is the same for ``-A``); ``theta_1 >= ...``
are the Ritz values, ``lambda_1 >= ...`` the eigenvalues.

1. *Interlacing* (Cauchy): ``theta_j <= lambda_j``. The error of the same index is one-sided.
2. *Lehmann's optimal intervals* (Lehmann 1949/1963; Parlett, *The Symmetric Eigenvalue Problem*,
   sec. 10.5): if ``lambda_{p+1} < a < theta_p``, Rayleigh-Ritz for ``(A - a)^{-1}`` on ``(A - a) Y_p``
   (``Y_p`` the top ``p`` Ritz vectors) gives ``lambda_{p+1-l} <= a + 1/tau_l``, where ``tau_1 >= ...``
   are the eigenvalues of the pencil ``(D, D^2 + G^T G)``, ``D = diag(theta - a)``, ``G`` the residual
   coordinates. With one vector this is the Kato-Temple inequality ``lambda <= theta + r^2/(theta - a)``
   (the gap theorem, Parlett Thm 11.7.1); for a group it is cluster robust: the ``p`` Ritz values may
   be as close as they like, only the gap ``theta_p - a`` below the group counts.
3. *The shift* ``a`` must bound ``lambda_{p+1}`` from above, and no Ritz value that has not itself
   converged is trusted: ``a = max_{j > p} (theta_j + r_j)`` over every lower Ritz pair (each residual
   interval holds an eigenvalue, and an unconverged pair is assumed to hide one as high as its interval
   reaches). The group size ``p >= k`` (oversampling) is chosen per step to give the tightest bounds; a
   cluster straddling the ``k``-th eigenvalue is certified as a whole against the spectrum below it.
4. *Rounding*: ``H`` is the projection of ``A + E`` (HVP and orthogonalisation rounding). The in-basis
   part of ``E`` is measured: ``q_i^T (A q_j)`` must equal the coefficient recorded when ``q_i`` was
   multiplied (0 outside the band), and the discrepancies estimate ``||Q^T E Q|| <= eps_T`` (floored at
   the unit roundoff times ``||A||``); every Ritz value moves by at most ``eps_T`` (Weyl). The
   out-of-basis part ``phi = sqrt(n) max(u ||A||, rms anomaly)`` inflates the residuals.
   Bound: ``e_j = max(U_j - theta_j, 0) + eps_T`` with ``U_j`` the Lehmann bound.
5. *Missed eigenvalues*: (2)-(3) assume no eigenvalue of ``A`` above ``a`` is missing from the Krylov
   space (``lambda_{p+1} <= a``). A single start vector cannot see a second copy of a repeated
   eigenvalue, and a member of a tight cluster, or any eigenvector the start vector barely touches, can
   stay invisible while everything seen has converged. So when the bounds first certify the wanted
   eigenvalues, a *restart check* runs: a fresh random vector, orthogonal to the basis and the pending
   vectors, starts an independent Lanczos chain on the deflated operator for ``d`` steps. By the
   Kaniel-Paige-Saad argument (Saad 1980; Kuczynski & Wozniakowski 1992) a Chebyshev polynomial of
   degree ``d - 1`` on ``[lambda_lo, a]`` lifts a missing eigenvector with ``lambda >= theta_p`` and a
   component ``|c| >= delta/sqrt(n)`` in the fresh vector above ``a`` once
   ``T_{d-1}(1 + 2g) >= sqrt(n/g)/delta``, ``g = (theta_p - a)/(a - lambda_lo)``; a Gaussian start
   has ``|c| < delta/sqrt(n)`` with probability ``< 0.8 delta`` (``delta = 1e-3`` here). If the check's
   Ritz values stay below ``a`` the certificate stands (and is returned as it was); otherwise the
   missing direction is kept, both chains continue as one block until the bounds certify again, and
   another check follows. Each found direction widens the block by one, so an exact ``m``-fold
   eigenvalue costs ``m - 1`` extra checks. Before a check the multiplied rows are replaced by the Ritz
   vectors it needs (:func:`_kept_pairs`: the certificate's group, the pair that sets its level, the two
   outermost pairs), a thick restart (Wu & Simon 2000) that keeps ``A Q_done = Q H[:, done]`` exact: the
   check's rows reuse the memory of the rest, so the basis peaks at the main chain's length rather than
   at that plus the check's (21 rows instead of 30 on the 1.13M-parameter benchmark), for the same products.

Stopping: every wanted ``e_j <= tol * max(|theta_j|, 1e-3 ||A||)`` (the floor keeps eigenvalues near 0
from demanding an unreachable relative accuracy), the check passed, and with ``vectors_tol`` also the
residual ``||A y_j - theta_j y_j|| <= vectors_tol * |theta_j|`` (eigenvectors, e.g. for overlaps). When a
tolerance is below what rounding allows (``eps_T`` for the bounds; for the residuals the part of ``phi`` no step
can lower, ``u ||A|| sqrt(n)``), the run certifies at the floor instead (``2 eps_T`` or ``2 phi`` relative to the
wanted Ritz values), stops there, and reports ``floor_tol`` with ``converged`` False.

Quadrature (:func:`krylov_quadrature`, used by SLQ): ``s`` block steps from the probes ``V = Q_1 R``
give the block Gauss rule ``V^T f(A) V ~ R^T E_1^T f(H) E_1 R``, exact for polynomials of degree
``<= 2s - 1``: nodes ``theta``, probe ``i``'s weights ``(S[first block]^T R e_i)^2``.

Shapes: basis ``[capacity, n]`` (rows), ``H [capacity, capacity]`` float64 on the CPU, Ritz values ``[m]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from diagnostics.linalg.memory import Requirement, check_fits, lanczos_basis_bytes
from diagnostics.linalg.operator import LinearOperator
from diagnostics.linalg.products import unit_roundoff
from diagnostics.settings import with_fields

Progress = Callable[[int, int], None]
MISS_PROBABILITY = 1e-3  # delta of the restart check
DGKS = 1.0 / math.sqrt(2.0)
RELATIVE_FLOOR = 1e-3  # tolerances are relative to max(|theta|, RELATIVE_FLOOR * ||A||)
CRITERIA = ("bound", "residual")


def random_unit(dim: int, generator: torch.Generator, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A Gaussian vector drawn on the CPU in float64 (device-independent), normalised."""
    v = torch.randn(dim, generator=generator, dtype=torch.float64)
    return (v / v.norm()).to(dtype=dtype, device=device)


def gaussian_block(
    dim: int, k: int, generator: torch.Generator, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """``[dim, k]`` Gaussian columns drawn on the CPU in float64 (the same numbers on every device)."""
    return torch.randn(dim, k, generator=generator, dtype=torch.float64).to(dtype=dtype, device=device)


def accurate_norm(X: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Euclidean norm of ``X`` (of its columns with ``dim=0``, kept as a ``[1, k]`` row) summed in float64.

    A float32 sum over ~1e6 entries is ~1e-5 off (torch's float32 norm: 1.3e-5 at ``n`` = 1.1M), which a basis
    vector divided by it keeps as a loss of orthonormality. MPS has no float64: there the squares are summed in
    the tensor's dtype.
    """
    if X.device.type == "mps":
        return X.square().sum(dim=dim, keepdim=dim is not None).sqrt()
    return torch.linalg.vector_norm(X, dim=dim, keepdim=dim is not None, dtype=torch.float64)


def consecutive_runs(rows: torch.Tensor | list[int]) -> list[tuple[int, int]]:
    """``[start, stop)`` spans of the runs of consecutive indices in ``rows``, in the order given:
    ``[3, 4, 5, 9, 2] -> [(3, 6), (9, 10), (2, 3)]``."""
    idx = [int(i) for i in (rows.tolist() if isinstance(rows, torch.Tensor) else rows)]
    spans: list[tuple[int, int]] = []
    for i in idx:
        if spans and spans[-1][1] == i:
            spans[-1] = (spans[-1][0], i + 1)
        else:
            spans.append((i, i + 1))
    return spans


def transposed(X: torch.Tensor) -> torch.Tensor:
    """``X.T`` of a ``[n, k]`` matrix as a view, with row-major strides where a dimension is 1.

    For a single row or column ``X.T`` (and ``X.T.contiguous()``, since a size-1 dimension does not count
    for contiguity) keeps strides such as ``(1, 1)`` or ``(1, n)``, and copying from such a tensor takes
    torch's elementwise slow path, ~80x a plain copy (7 ms instead of 0.09 ms for a 1.1M-entry basis row).
    Transposing a vector is a reshape, which gives it ordinary strides.
    """
    if 1 in X.shape:
        return X.reshape(X.shape[1], X.shape[0])
    return X.T


class KrylovSpace:
    """An orthonormal basis with its projected matrix, grown by multiplying pending vectors.

    Attributes:
        Q: ``[capacity, n]`` basis rows (``Q[:size]`` in use), dtype of the operator.
        H: ``[capacity, capacity]`` float64, ``H[i, j] = q_i^T A q_j`` for multiplied ``j``.
        done: which rows have been multiplied.
        pending: rows not yet multiplied, oldest first.
        matvecs: products taken.
    """

    def __init__(
        self,
        op: LinearOperator,
        basis_device: torch.device | str | None = None,
        capacity: int = 32,
    ) -> None:
        self.op = op
        self.n = int(op.dim)
        self.dtype = op.dtype
        self.device = torch.device(basis_device) if basis_device is not None else torch.device(op.device)
        self.u = unit_roundoff(self.dtype)
        cap = max(1, min(self.n, int(capacity)))
        self.Q = torch.empty(cap, self.n, dtype=self.dtype, device=self.device)
        self.H = torch.zeros(cap, cap, dtype=torch.float64)
        self.done = torch.zeros(cap, dtype=torch.bool)
        self.pending: list[int] = []
        self.size = 0
        self.matvecs = 0
        self.scale = 0.0  # max |H| entry seen: a lower estimate of ||A||
        self.norm_estimate = 0.0  # max |Ritz value| seen (set by the driver)
        self._anomaly_sq = 0.0
        self._anomaly_count = 0
        self.lost = 0.0  # norm of remainders dropped as numerically zero (added to every residual)
        self.peak_rows = 0  # most rows held at once

    # ------------------------------------------------------------------ storage
    def _reserve(self, extra: int) -> None:
        need = self.size + extra
        cap = self.Q.shape[0]
        if need <= cap:
            return
        new = min(self.n, max(need, 2 * cap))
        Q = torch.empty(new, self.n, dtype=self.dtype, device=self.device)
        Q[: self.size] = self.Q[: self.size]
        H = torch.zeros(new, new, dtype=torch.float64)
        H[:cap, :cap] = self.H
        done = torch.zeros(new, dtype=torch.bool)
        done[:cap] = self.done
        self.Q, self.H, self.done = Q, H, done

    def _append(self, rows: torch.Tensor) -> list[int]:
        """Append ``[k, n]`` orthonormal rows as pending vectors; returns their indices."""
        k = int(rows.shape[0])
        if k == 0:
            return []
        self._reserve(k)
        self.Q[self.size : self.size + k] = rows
        idx = list(range(self.size, self.size + k))
        self.size += k
        self.peak_rows = max(self.peak_rows, self.size)
        self.pending.extend(idx)
        return idx

    def compress(self, S: torch.Tensor) -> None:
        """Replace the multiplied rows by the Ritz vectors ``Y = Q_done^T S`` (``S [m_done, j]``, orthonormal
        columns of eigenvectors of ``H[done, done]``): a thick restart (Wu & Simon 2000).

        The new basis is ``[Y; Q_pending]`` (the pending rows in their old order), with ``H[Y, Y] = S^T H_dd S``
        and ``H[pending, Y] = H[pending, done] S``, so ``A Q_done = Q H[:, done]`` holds in it as before: a
        Ritz vector's residual lies in the pending rows. Directions of the discarded Ritz vectors leave the
        basis. ``Y`` is written over the basis a column block at a time, so no ``[j, n]`` temporary is made.
        """
        rows = self.done_index
        pend = sorted(self.pending)
        j, p, old = int(S.shape[1]), len(pend), self.size
        pidx = torch.tensor(pend, dtype=torch.long)
        H_yy = S.T @ self.H[rows[:, None], rows[None, :]] @ S
        H_py = self.H[pidx[:, None], rows[None, :]] @ S
        kept = self.Q[pidx.to(self.device)].clone() if p else None
        Sd = S.to(dtype=self.dtype, device=self.device)
        m = rows.numel()
        first = int(rows[0]) if m else 0
        consecutive = len(consecutive_runs(rows)) <= 1
        rows_dev = rows.to(self.device)
        step = max(1024, (1 << 20) // max(j, m, 1))
        for c in range(0, self.n, step):
            src = self.Q[first : first + m, c : c + step] if consecutive else self.Q[rows_dev, c : c + step]
            self.Q[:j, c : c + step] = Sd.T @ src
        if kept is not None:
            self.Q[j : j + p] = kept
        self.H[:old, :old] = 0
        self.done[:old] = False
        self.H[:j, :j] = 0.5 * (H_yy + H_yy.T)
        self.H[j : j + p, :j] = H_py
        self.H[:j, j : j + p] = H_py.T
        self.done[:j] = True
        where = {i: j + n for n, i in enumerate(pend)}
        self.pending = [where[i] for i in self.pending]
        self.size = j + p

    # ----------------------------------------------------------- orthogonality
    def _rows(self, rows: torch.Tensor | list[int]) -> torch.Tensor:
        """``Q[rows]``: a view when the rows are consecutive (the usual case: a chain's block), else a copy."""
        spans = consecutive_runs(rows)
        if len(spans) == 1:
            return self.Q[spans[0][0] : spans[0][1]]
        return self.Q[torch.as_tensor(rows, dtype=torch.long).to(self.device)]

    def _project_out(self, W: torch.Tensor, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One classical Gram-Schmidt pass of ``W [n, b]`` against ``Q[rows]`` (all rows if None).

        Returns the projected ``W`` (a new tensor, or ``W`` itself when ``rows`` is empty) and the
        coefficients ``C = Q[rows] W`` (rows in the order given). Each run of consecutive rows is a view of
        the basis, so no row is copied: during a restart check the rows coupled to a step (the check's last
        two and the main chain's pending row) are not consecutive, and gathering them copied three basis
        vectors per step (13.5 MB and 1.6 ms at ``n`` = 1.1M).
        """
        spans = [(0, self.size)] if rows is None else consecutive_runs(rows)
        Cs = [self.Q[a:b] @ W for a, b in spans]
        out = W
        for (a, b), C in zip(spans, Cs):
            Qs = self.Q[a:b]
            out = torch.addmm(out, Qs.T, C, alpha=-1) if out is W else out.addmm_(Qs.T, C, alpha=-1)
        C = Cs[0] if len(Cs) == 1 else torch.cat(Cs) if Cs else W.new_zeros(0, W.shape[1])
        return out, C

    def _orthonormal(self, W: torch.Tensor, reference: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Orthonormal rows spanning ``W``'s numerically nonzero range, and ``B`` with ``W ~ rows^T B``.

        QR, then an SVD of the small ``R`` (float64): singular values below ``64 u reference`` are
        dropped (their norm is added to ``lost``). A single column (a one-vector chain, every step of plain
        Lanczos) is normalised instead: its QR and SVD are ``w = (w / ||w||) ||w||``, and LAPACK's Householder
        QR of an ``[n, 1]`` matrix costs ~10 times the float64-summed norm (4.5 ms against 0.4 ms at ``n`` = 1.1M).
        """
        b = W.shape[1]
        if b == 0:
            return W.new_zeros(0, self.n), torch.zeros(0, 0, dtype=torch.float64)
        if b == 1:
            return self._normalised(W, reference)
        self._require_finite(float(W.norm()))
        Qw, R = torch.linalg.qr(W)
        U, s, Vh = torch.linalg.svd(R.cpu().double())
        cut = max(64 * self.u, 1e-12) * max(reference, float(s.max()) if s.numel() else 0.0, 1e-300)
        keep = int((s > cut).sum())
        if keep < s.numel():
            self.lost = math.sqrt(self.lost**2 + float((s[keep:] ** 2).sum()))
        rows = transposed(Qw @ U[:, :keep].to(dtype=Qw.dtype, device=Qw.device))
        B = s[:keep, None] * Vh[:keep]
        return rows, B

    def _require_finite(self, norm: float) -> None:
        """Raise :class:`DiagnosticsError` when a vector about to join the basis holds NaN or Inf (its norm)."""
        if not math.isfinite(norm):
            from diagnostics.errors import DiagnosticsError

            dtype = str(self.dtype).removeprefix("torch.")
            fix = (
                "check the model's forward and the checkpoint's weights"
                if self.dtype == torch.float64
                else "run with --dtype float64 (and without --autocast), or check the model's forward and the "
                "checkpoint's weights"
            )
            raise DiagnosticsError(
                f"a product of the operator returned NaN or Inf after {self.matvecs} product(s) in {dtype}: the "
                f"second derivative is infinite or undefined at this point (e.g. sqrt or log at 0) or overflows; {fix}"
            )

    def _normalised(self, w: torch.Tensor, reference: float) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`_orthonormal` of one column ``w [n, 1]``: ``(w^T / ||w||, [[||w||]])``, or no row when
        ``||w||`` is below the same cut (its norm is then added to ``lost``)."""
        norm = float(accurate_norm(w))
        self._require_finite(norm)
        cut = max(64 * self.u, 1e-12) * max(reference, norm, 1e-300)
        if not norm > cut:
            self.lost = math.sqrt(self.lost**2 + norm**2)
            return w.new_zeros(0, self.n), torch.zeros(0, 1, dtype=torch.float64)
        return transposed(w / norm), torch.tensor([[norm]], dtype=torch.float64)

    def add(self, X: torch.Tensor) -> list[int]:
        """Orthonormalise the columns of ``X [n, k]`` against the basis and append them as pending."""
        X = X.reshape(self.n, -1).to(dtype=self.dtype, device=self.device)
        ref = float(X.norm(dim=0).max()) if X.numel() else 0.0
        if self.size:
            for _ in range(2):
                X, _ = self._project_out(X)
        lost_before = self.lost
        rows, _ = self._orthonormal(X, ref)
        # a second pass after normalisation keeps tiny projected directions orthogonal to the basis
        if self.size and rows.shape[0]:
            Y, _ = self._project_out(rows.T)
            rows = transposed(Y / accurate_norm(Y, dim=0).to(Y.dtype))
        self.lost = lost_before  # directions dropped from a start are not residuals
        return self._append(rows)

    # ----------------------------------------------------------------- product
    def multiply(self, idx: list[int]) -> list[int]:
        """Multiply the pending rows ``idx`` (one ``matmat``), extend ``H``, append the remainders.

        Returns the indices of the new pending rows (the next block of this chain).
        """
        if not idx:
            return []
        rows = torch.tensor(idx, dtype=torch.long)
        W = self.op.matmat(transposed(self._rows(rows)).to(self.op.device)).to(self.device)
        self.matvecs += len(idx)
        s = self.size
        done = self.done[:s].clone()
        known = self.H[rows, :s]  # H[idx, j] recorded when j was multiplied (0 if idx came later)
        local = (~done) | (done & (known != 0).any(0))
        local_rows = local.nonzero().squeeze(1)
        W, C = self._project_out(W, local_rows)
        coef = torch.zeros(s, len(idx), dtype=torch.float64)
        coef[local_rows] = C.cpu().double()
        before = W.norm(dim=0)
        W, C = self._project_out(W)
        coef += C.cpu().double()
        after = W.norm(dim=0)
        if bool((after < DGKS * before).any()):
            W, C = self._project_out(W)
            coef += C.cpu().double()
        # rounding: multiplied rows must reproduce the coupling recorded before
        if bool(done.any()):
            diff = coef[done] - known[:, done].T
            self._anomaly_sq += float((diff**2).sum())
            self._anomaly_count += diff.numel()
        diag = coef[rows]
        if len(idx) > 1:
            asym = diag - diag.T
            self._anomaly_sq += float((asym**2).sum()) / 4
            self._anomaly_count += len(idx) * (len(idx) - 1)
        diag = 0.5 * (diag + diag.T)
        open_rows = (~done).nonzero().squeeze(1)
        self.H[open_rows[:, None], rows[None, :]] = coef[open_rows]
        self.H[rows[:, None], open_rows[None, :]] = coef[open_rows].T
        self.H[rows[:, None], rows[None, :]] = diag
        self.done[rows] = True
        self.pending = [i for i in self.pending if i not in set(idx)]
        self.scale = max(self.scale, float(coef.abs().max()) if coef.numel() else 0.0)
        new_rows, B = self._orthonormal(W, self.scale)
        new = self._append(new_rows)
        if new:
            nr = torch.tensor(new, dtype=torch.long)
            self.H[nr[:, None], rows[None, :]] = B
            self.H[rows[:, None], nr[None, :]] = B.T
            self.scale = max(self.scale, float(B.abs().max()))
        return new

    # ------------------------------------------------------------------- Ritz
    @property
    def done_index(self) -> torch.Tensor:
        """Indices (``[m_done]``, ascending, long) of the basis rows already multiplied."""
        return self.done[: self.size].nonzero().squeeze(1)

    def projected(self, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``H[rows, rows]`` and the residual coupling ``H[others, rows]`` (``rows``: multiplied ones,
        default all; ``others``: every other basis row)."""
        rows = self.done_index if rows is None else rows
        mask = torch.ones(self.size, dtype=torch.bool)
        mask[rows] = False
        others = mask.nonzero().squeeze(1)
        return self.H[rows[:, None], rows[None, :]], self.H[others[:, None], rows[None, :]]

    def ritz(self, exclude: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Ritz pairs of the multiplied rows (minus ``exclude``): values (ascending), eigenvectors ``S``
        of ``H[rows, rows]``, residual coordinates ``G`` and the ``rows``.

        ``||G[:, j]||`` is the residual ``||A y_j - theta_j y_j||`` of the Ritz vector ``y_j = Q_rows S[:, j]``
        (``A Q_rows`` lies in the span of the basis, so every other row carries part of the residual).
        """
        rows = self.done_index
        if exclude:
            keep = torch.ones(self.size, dtype=torch.bool)
            keep[torch.tensor(exclude, dtype=torch.long)] = False
            rows = rows[keep[rows]]
        Hd, Hr = self.projected(rows)
        theta, S = torch.linalg.eigh(Hd)
        return theta, S, Hr @ S, rows

    def vectors(self, S: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
        """``Q_done @ S`` (``S [m_done, k]``) as ``[n, k]`` columns, one matrix product."""
        full = torch.zeros(self.size, S.shape[1], dtype=torch.float64)
        full[self.done_index] = S
        Y = self.Q[: self.size].T @ full.to(dtype=self.dtype, device=self.device)
        return Y.to(device if device is not None else self.op.device)

    def rounding(self) -> tuple[float, float]:
        """``(eps_T, phi)``: bounds on the in-basis and the out-of-basis rounding of ``A`` (see module doc)."""
        m = int(self.done[: self.size].sum())
        norm = max(self.scale, self.norm_estimate, 1e-300)
        rms = math.sqrt(self._anomaly_sq / self._anomaly_count) if self._anomaly_count else 0.0
        # ~1.5x the norm 2 sigma sqrt(m) of an m x m noise matrix, and never below 8 u ||A|| sqrt(m)
        eps_t = max(3 * rms, 8 * self.u * norm) * math.sqrt(max(m, 1))
        phi = max(rms * math.sqrt(self.n) + self.lost, self.phi_floor())
        return eps_t, phi

    def phi_floor(self) -> float:
        """The part of ``phi`` no further step can lower: ``u ||A|| sqrt(n)`` plus what was lost (the measured
        anomaly term of ``phi`` may still fall as the basis grows)."""
        return self.u * max(self.scale, self.norm_estimate, 1e-300) * math.sqrt(self.n) + self.lost


def tridiagonal(alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """``[m]`` diagonal and ``[m-1]`` off-diagonal -> dense ``[m, m]`` symmetric tridiagonal (float64)."""
    T = torch.diag(alpha.double())
    if beta.numel():
        off = beta.double()
        T = T + torch.diag(off, 1) + torch.diag(off, -1)
    return T


# ---------------------------------------------------------------------------------------- bounds
def lehmann_upper(theta: torch.Tensor, G: torch.Tensor, shift: float, phi: float = 0.0) -> torch.Tensor:
    """Lehmann upper bounds for the top ``p`` eigenvalues from the top ``p`` Ritz pairs.

    Rayleigh-Ritz for ``(A - a)^{-1}`` on ``(A - a) Y`` has the pencil ``(D, D^2 + G^T G)``,
    ``D = diag(theta - a) > 0``; its reciprocal eigenvalues ``1/tau`` are the eigenvalues of
    ``D + J^T J`` with ``J = G D^{-1/2}``, computed in that form (accurate to ``eps ||D||`` even when
    the bounds are tiny). Interlacing for ``(A - a)^{-1}`` gives ``lambda_j <= a + mu_j`` (``mu``
    descending) when exactly ``p`` eigenvalues exceed ``a``.

    Args:
        theta: ``[p]`` Ritz values, descending, all ``> shift``.
        G: ``[r, p]`` residual coordinates of those Ritz vectors (``||G[:, j]||`` = residual of pair ``j``).
        shift: ``a`` with ``lambda_{p+1} < a`` (the hypothesis; see the module doc).
        phi: a bound on extra residual (rounding) of unknown direction, ``||F|| <= phi``; then
            ``(G + F)^T (G + F) <= (1 + eta) G^T G + (1 + 1/eta) phi^2 I``.

    Returns:
        ``[p]`` upper bounds ``U_j >= lambda_j``, descending.
    """
    d = theta.double() - shift
    J = G.double() / d.sqrt()[None, :]
    M = torch.diag(d) + J.T @ J
    if phi > 0:
        gn = float(torch.linalg.matrix_norm(G.double(), 2)) if G.numel() else 0.0
        eta = phi / max(gn, phi)
        M = M + eta * (J.T @ J) + (1 + 1 / eta) * phi * phi * torch.diag(1.0 / d)
    mu = torch.linalg.eigvalsh(0.5 * (M + M.T)).flip(0)
    return shift + mu


@dataclass
class _EndBounds:
    """Certified bounds at one end (values oriented so that this end is the top)."""

    bounds: torch.Tensor  # [k] error bounds, inf where none
    group: int  # p used, 0 if none
    shift: float  # a, the Lehmann shift (hypothesis lambda_{p+1} < a)
    level: float  # x < a: the estimated top of the rest; the check looks for Ritz values above it
    steps: int  # restart-check length that protects (a, inf)
    ok: bool
    settled: bool = True  # the pair that sets the level x has a residual below a - x


NEAR_INVARIANT = 0.1


def _end_bounds(
    theta: torch.Tensor,
    G: torch.Tensor,
    k: int,
    tol: float,
    eps_t: float,
    phi: float,
    norm: float,
    max_group: int,
    dim: int,
    fixed: tuple[int, float] | None = None,
) -> _EndBounds:
    """Best Lehmann certificate for the top ``k`` of ``theta`` (descending) over groups ``p >= k``.

    For a group ``p``: ``x = max_{j > p} (theta_j + r_j)`` (+ rounding) estimates the top of the rest;
    the Lehmann shift is ``a = x + f (theta_p - x)``, the largest that still meets ``tol`` (bisection on
    ``f``); the restart check then has to rule out a missing eigenvalue above ``a`` by lifting it above
    ``x``, which takes :func:`check_length` steps with ``g = (a - x)/(x - low)``. Among the certificates
    that meet ``tol`` the one with the shortest check (small groups preferred) wins; if none does, the
    tightest bounds are reported. ``fixed = (p, a)`` evaluates one group at a given shift (a shift a
    check has already guarded).
    """
    m = theta.numel()
    inf = torch.full((k,), math.inf, dtype=torch.float64)
    if k == 0:
        return _EndBounds(torch.zeros(0, dtype=torch.float64), 0, math.inf, math.inf, 0, True)
    r = G.norm(dim=0) + phi
    suffix = torch.flip(torch.cummax(torch.flip(theta + r, [0]), 0).values, [0])
    low = float(theta[-1] - r[-1])
    need = tol * theta[:k].abs().clamp(min=RELATIVE_FLOOR * norm)
    best = _EndBounds(inf, 0, math.inf, math.inf, 0, False)
    best_key: tuple[float, float] = (math.inf, math.inf)
    groups = range(k, min(m - 1, max_group) + 1) if fixed is None else [fixed[0]] if fixed[0] < m else []
    for p in groups:
        x = float(suffix[p]) + eps_t
        top_p = float(theta[p - 1]) - eps_t
        if not x < top_p - float(r[p - 1]):  # the group's lowest pair must sit clear of the rest
            continue
        clusters = _clusters(theta[:p], r[:p], 2 * eps_t)
        if not _resolved(theta[:p], G[:, :p], clusters, x, phi):
            continue
        hull = _cluster_hull(theta, G, clusters, k, phi)

        def bounds_at(a: float, p: int = p, hull: torch.Tensor = hull) -> tuple[torch.Tensor, float]:
            U = lehmann_upper(theta[:p], G[:, :p], a, phi)
            e = torch.maximum((U[:k] - theta[:k]).clamp(min=0), hull) + eps_t
            return e, float((e / need).max())

        if fixed is not None:
            a = fixed[1]
            if not x < a < top_p:
                continue
            e, score = bounds_at(a)
        else:
            a, e, score = _largest_shift(bounds_at, x, top_p - x)
        steps = check_length(a, x, low, dim)
        j = p + int(torch.argmax(theta[p:] + r[p:]))  # the pair that sets the level x
        settled = float(r[j]) <= a - x
        # prefer small groups (fewer eigenvalues the check must account for) unless their check is long
        key = (0.0, steps * (1.0 + 0.5 * (p - k) / max(k, 1))) if score <= 1.0 else (1.0, score)
        if key < best_key:
            best_key = key
            best = _EndBounds(e, p, a, x, steps, score <= 1.0, settled)
    return best


def _cluster_hull(
    theta: torch.Tensor, G: torch.Tensor, clusters: list[tuple[int, int]], k: int, phi: float
) -> torch.Tensor:
    """Error bounds ``[k]`` that cover each wanted cluster's whole hull (0 outside clusters).

    Inside a cluster ``[i, j)`` of two or more Ritz pairs the residuals cannot count the eigenvalues, so
    every member ``l < k`` gets ``theta_i - theta_l + rho`` with ``rho = ||G[:, i:j]||_2 + phi``: the
    distance from its Ritz value to the top of the cluster's residual interval.

    Args:
        theta: Ritz values, descending (at least the group).
        G: residual coordinates, ``[r, >= p]`` (column ``l`` belongs to ``theta_l``).
        clusters: ``[start, stop)`` runs from :func:`_clusters`.
        k: how many of the top values are wanted.
        phi: the out-of-basis rounding residual added to every residual norm.

    Returns:
        ``[k]`` float64 bounds.
    """
    hull = torch.zeros(k, dtype=torch.float64)
    for i, j in clusters:
        if j - i > 1 and i < k:
            rho = float(torch.linalg.matrix_norm(G[:, i:j], 2)) + phi
            idx = torch.arange(i, min(j, k))
            hull[idx] = (theta[i] - theta[idx]) + rho
    return hull


def _largest_shift(
    bounds_at: Callable[[float], tuple[torch.Tensor, float]], x: float, gap: float
) -> tuple[float, torch.Tensor, float]:
    """The largest Lehmann shift ``a = x + f gap`` (``0.1 <= f <= 0.95``) whose bounds still meet ``tol``.

    A larger shift gives a shorter restart check (:func:`check_length`) but looser bounds. ``f = 0.1`` is
    tried first; if it meets ``tol`` (score ``<= 1``), ``f = 0.95``, else six bisection steps on ``f``.

    Args:
        bounds_at: ``a -> (e [k], score)``, the bounds at shift ``a`` and ``max(e / need)``.
        x: the estimated top of the rest of the spectrum.
        gap: ``theta_p - x`` (rounding included), the room for the shift.

    Returns:
        ``(a, e, score)`` at the chosen shift (at ``f = 0.1`` when even that misses ``tol``).
    """
    lo_f, hi_f = 0.1, 0.95
    e, score = bounds_at(x + lo_f * gap)
    if score <= 1.0:
        e_hi, s_hi = bounds_at(x + hi_f * gap)
        if s_hi <= 1.0:
            lo_f, e, score = hi_f, e_hi, s_hi
        else:
            for _ in range(6):
                mid = 0.5 * (lo_f + hi_f)
                e_mid, s_mid = bounds_at(x + mid * gap)
                if s_mid <= 1.0:
                    lo_f, e, score = mid, e_mid, s_mid
                else:
                    hi_f = mid
    return x + lo_f * gap, e, score


def _clusters(theta: torch.Tensor, r: torch.Tensor, slack: float) -> list[tuple[int, int]]:
    """``[start, stop)`` runs of neighbours (descending ``theta``) that their residual intervals cannot
    tell apart: ``theta_i - theta_{i+1} <= r_i + r_{i+1} + slack``."""
    p = theta.numel()
    starts = [0]
    for i in range(p - 1):
        if float(theta[i] - theta[i + 1]) > float(r[i] + r[i + 1]) + slack:
            starts.append(i + 1)
    starts.append(p)
    return [(starts[c], starts[c + 1]) for c in range(len(starts) - 1)]


def _resolved(theta: torch.Tensor, G: torch.Tensor, clusters: list[tuple[int, int]], below: float, phi: float) -> bool:
    """Whether every cluster of a group of Ritz pairs (descending) is near-invariant.

    A cluster ``C`` must have ``||G_C|| <= NEAR_INVARIANT * sep_C``, ``sep_C`` its distance to the nearest
    Ritz value outside it (``below`` under the group). By the Davis-Kahan sin(theta) theorem its Ritz
    vectors then lie within angle ``~NEAR_INVARIANT`` of an invariant subspace; a single Ritz value that
    is a mixture of two eigenvectors (an eigenvector half discovered) has a residual comparable to its
    distance to the neighbours and fails. A direction missing from the basis altogether is the restart
    check's job.
    """
    p = theta.numel()
    for i, j in clusters:
        above = float(theta[i - 1] - theta[i]) if i > 0 else math.inf
        under = float(theta[j - 1] - (theta[j] if j < p else below))
        rho = float(torch.linalg.matrix_norm(G[:, i:j], 2)) + phi
        if rho > NEAR_INVARIANT * min(above, under):
            return False
    return True


def check_length(shift: float, level: float, low: float, dim: int, delta: float = MISS_PROBABILITY) -> int:
    """Restart-check steps that lift a missing eigenvalue ``>= shift`` above ``level`` (module doc).

    ``1 + acosh(sqrt(dim/g)/delta) / acosh(1 + 2g)`` with ``g = (shift - level)/(level - low)``: a
    Chebyshev polynomial on ``[low, level]`` of that degree amplifies a component ``>= delta/sqrt(dim)``
    enough that the Rayleigh quotient exceeds ``level``.
    """
    g = max((shift - level) / max(level - low, 1e-300), 1e-12)
    amp = math.sqrt(max(dim, 1) / g) / delta
    return 1 + math.ceil(math.acosh(max(amp, 1.0)) / math.acosh(1 + 2 * g))


@dataclass
class LanczosResult:
    """Extreme Ritz pairs with certified error bounds.

    Attributes:
        eigenvalues: top-k, descending (``[k_top]``).
        eigenvectors: ``[n, k_top]`` unit Ritz vectors.
        bottom_eigenvalues: bottom-k, ascending (``[k_bottom]``).
        bottom_eigenvectors: ``[n, k_bottom]``.
        residuals / bottom_residuals: ``||A y - theta y||`` of each pair (rounding floor included).
        error_bounds / bottom_error_bounds: ``|lambda_j - theta_j| <= bound`` for the eigenvalue of the
            same index (see the module doc; ``inf`` where no certificate was reached).
        iterations: matvecs spent (HVPs).
        converged: every wanted bound met the tolerance and the restart check passed.
        restarts: fresh random directions added (restart checks, invariant subspaces).
        checks: restart checks run; ``check_matvecs`` their products.
        block_size: vectors per product of the main chain.
        rounding: the rounding floor ``eps_T`` included in every bound.
        floor_tol: where the rounding floor alone exceeded ``tol`` for a wanted eigenvalue, or the
            out-of-basis rounding ``phi`` alone exceeded ``vectors_tol`` for a wanted residual (more
            iterations cannot help; ``converged`` is False): the relative tolerance it allows,
            ``2 eps_T / min_j max(|theta_j|, 1e-3 ||A||)`` (``2 phi / ...`` for residuals; the larger where
            both), at which the bounds (residuals) were certified instead. 0.0 otherwise.
        basis_rows: the most basis vectors held at once (the basis memory is this many ``[n]`` vectors;
            a restart check reuses the rows of the Ritz vectors it does not need).
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    bottom_eigenvalues: torch.Tensor
    bottom_eigenvectors: torch.Tensor
    residuals: torch.Tensor
    bottom_residuals: torch.Tensor
    iterations: int
    converged: bool
    tol: float
    restarts: int = 0
    block_size: int = 1
    error_bounds: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    bottom_error_bounds: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    criterion: str = "bound"
    checks: int = 0
    check_matvecs: int = 0
    rounding: float = 0.0
    vectors_tol: float | None = None
    floor_tol: float = 0.0
    basis_rows: int = 0


def check_basis_memory(op: LinearOperator, columns: int, basis_device: torch.device, extra_vectors: int = 0) -> None:
    """Raise ``DiagnosticsError`` before a Lanczos run whose basis of ``columns`` vectors cannot fit."""
    basis = lanczos_basis_bytes(op.dim, columns, op.dtype)
    reqs = [Requirement(basis_device, basis, f"Lanczos basis ({op.dim:,} x {columns} x {op.dtype})")]
    if extra_vectors:
        reqs.append(Requirement(op.device, lanczos_basis_bytes(op.dim, extra_vectors, op.dtype), "work vectors"))
    per_column = lanczos_basis_bytes(op.dim, 1, op.dtype)
    fixes = []
    if torch.device(basis_device).type != "cpu":
        fixes.append("--basis-device cpu")
    fixes.append(f"a smaller --max-iter (each iteration holds {per_column / 2**20:.3g} MiB)")
    fixes.append("--params to analyse fewer parameters")
    reduce = getattr(op, "reduce", None)
    try:
        check_fits(reqs, "use " + " or ".join(fixes))
    except Exception:
        if reduce is not None:  # tell the other processes, so none is left waiting in a collective
            reduce(torch.ones(1, dtype=op.dtype, device=op.device))
        raise
    if reduce is not None and float(reduce(torch.zeros(1, dtype=op.dtype, device=op.device))[0]) > 0:
        from diagnostics.errors import DiagnosticsError

        raise DiagnosticsError("another process has not enough memory for the Lanczos basis")


@dataclass
class _Certificate:
    theta: torch.Tensor  # ascending Ritz values
    S: torch.Tensor
    G: torch.Tensor
    top: _EndBounds
    bottom: _EndBounds
    eps_t: float
    phi: float
    ok: bool
    hopeless: bool = False  # the rounding floor alone exceeds the tolerance
    vectors_hopeless: bool = False  # the residual floor phi alone exceeds vectors_tol
    rows: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))  # basis rows of S


def _certify(
    kr: KrylovSpace,
    k_top: int,
    k_bottom: int,
    tol: float,
    vectors_tol: float | None,
    oversample: int,
    guarded: _Certificate | None = None,
    exclude: list[int] | None = None,
) -> _Certificate:
    theta, S, G, rows = kr.ritz(exclude)
    m = theta.numel()
    if m:
        kr.norm_estimate = max(kr.norm_estimate, float(theta.abs().max()))
    eps_t, phi = kr.rounding()
    norm = float(theta.abs().max()) if m else 0.0
    desc = torch.arange(m - 1, -1, -1)
    # what relative tolerances multiply, and the wanted Ritz values (top k descending, then bottom k)
    scale = theta.abs().clamp(min=RELATIVE_FLOOR * norm)
    idx = torch.cat([desc[:k_top], torch.arange(k_bottom)])
    if m >= kr.n and not kr.pending and not exclude:
        # the whole space multiplied: H is A (plus rounding) in an orthonormal basis, so by Weyl every Ritz
        # value is within eps_T (+ the out-of-basis part phi) of the eigenvalue of the same index
        e = eps_t + phi
        full = [
            _EndBounds(torch.full((k,), e, dtype=torch.float64), min(k, m), -math.inf, -math.inf, 0, True)
            for k in (k_top, k_bottom)
        ]
        hopeless = bool((e > tol * scale[idx]).any())
        ok, v_hopeless = _vectors_ok(G, phi, kr.phi_floor(), scale, idx, vectors_tol)
        return _Certificate(theta, S, G, full[0], full[1], e, phi, ok and not hopeless, hopeless, v_hopeless, rows)
    if m < k_top + k_bottom + (k_top > 0) + (k_bottom > 0):
        empty = _EndBounds(torch.full((k_top,), math.inf, dtype=torch.float64), 0, math.inf, math.inf, 0, False)
        emptyb = _EndBounds(torch.full((k_bottom,), math.inf, dtype=torch.float64), 0, math.inf, math.inf, 0, False)
        return _Certificate(theta, S, G, empty, emptyb, eps_t, phi, False, rows=rows)
    rest = kr.n - kr.size
    fix_top = (guarded.top.group, guarded.top.shift) if guarded is not None else None
    fix_bot = (guarded.bottom.group, guarded.bottom.shift) if guarded is not None else None
    top = _end_bounds(theta[desc], G[:, desc], k_top, tol, eps_t, phi, norm, k_top + oversample, rest, fix_top)
    bottom = _end_bounds(-theta, G, k_bottom, tol, eps_t, phi, norm, k_bottom + oversample, rest, fix_bot)
    ok = top.ok and bottom.ok
    # the rounding floor alone exceeds the tolerance of some wanted eigenvalue: more steps cannot help
    hopeless = bool((eps_t >= tol * scale[idx]).any())
    v_ok, v_hopeless = _vectors_ok(G, phi, kr.phi_floor(), scale, idx, vectors_tol)
    return _Certificate(theta, S, G, top, bottom, eps_t, phi, ok and v_ok, hopeless, v_hopeless, rows)


def _vectors_ok(
    G: torch.Tensor, phi: float, phi_floor: float, scale: torch.Tensor, idx: torch.Tensor, vectors_tol: float | None
) -> tuple[bool, bool]:
    """``(ok, hopeless)`` of the residual test ``||G_j|| + phi <= vectors_tol * scale_j`` over the wanted ``idx``:
    ``hopeless`` where the part of ``phi`` no step can lower, ``phi_floor``, alone exceeds it."""
    if vectors_tol is None:
        return True, False
    need = vectors_tol * scale[idx]
    r = G.norm(dim=0)[idx] + phi
    return bool((r <= need).all()), bool((phi_floor >= need).any())


class _Run:
    """The driver of :func:`lanczos`: a main chain (``active`` rows), certificates and restart checks."""

    def __init__(
        self,
        op: LinearOperator,
        kr: KrylovSpace,
        gen: torch.Generator,
        budget: int,
        progress: Progress | None,
        k_top: int,
        k_bottom: int,
        tol: float,
        vectors_tol: float | None,
        oversample: int,
    ) -> None:
        self.op, self.kr, self.gen, self.budget, self.progress = op, kr, gen, budget, progress
        self.k_top, self.k_bottom, self.tol, self.vectors_tol, self.oversample = (
            k_top,
            k_bottom,
            tol,
            vectors_tol,
            oversample,
        )
        self.eff_tol = tol  # raised to the rounding floor when tol is below it (then not converged)
        self.eff_vectors_tol = vectors_tol  # likewise for the residual floor phi
        self.active: list[int] = []
        self.restarts = self.checks = self.check_matvecs = 0
        self.converged = False

    def certify(self, guarded: _Certificate | None = None) -> _Certificate:
        return _certify(
            self.kr, self.k_top, self.k_bottom, self.eff_tol, self.eff_vectors_tol, self.oversample, guarded
        )

    def certify_at_floor(self) -> _Certificate:
        """Certify at the tolerances asked, or, where one is below what rounding allows (more steps cannot
        help), at the floor: ``2 eps_T`` (bounds) or ``2 phi`` (residuals) relative to the wanted Ritz values.

        Judged afresh every step: an early Ritz value near 0 (a wanted one not yet converged) makes the floor
        look out of reach, but the Ritz values it is relative to grow as the chain converges.
        """
        self.eff_tol, self.eff_vectors_tol = self.tol, self.vectors_tol
        cert = self.certify()
        self.unpark(cert)
        if not (cert.hopeless or cert.vectors_hopeless):
            return cert
        scale = _scale_min(cert, self.k_top, self.k_bottom)
        if cert.hopeless:
            self.eff_tol = max(self.tol, 2 * cert.eps_t / scale)
        if cert.vectors_hopeless and self.vectors_tol is not None:
            self.eff_vectors_tol = max(self.vectors_tol, 2 * cert.phi / scale)
        return self.certify()

    def report(self) -> None:
        if self.progress is not None:
            self.progress(min(self.kr.matvecs, self.budget), self.budget)

    def random(self, k: int) -> list[int]:
        return self.kr.add(gaussian_block(self.kr.n, k, self.gen, self.kr.dtype, self.kr.device))

    def start(self, start: torch.Tensor | None, b: int) -> None:
        """Cold: ``b`` random vectors. Warm: one start vector ``w + 0.1 g`` (``w`` the normalised sum of the
        given unit vectors, e.g. the previous checkpoint's eigenvectors, ``g`` a unit Gaussian vector that
        keeps every direction in the Krylov space) and ``b - 1`` random ones. The chain then costs what a
        cold one costs per step but meets the wanted pairs sooner; the certificate and the restart check are
        unchanged, so a warm start never changes what is guaranteed, only the HVP count."""
        if start is None:
            self.active = self.random(b)
            return
        v = start.reshape(self.kr.n, -1).to(self.kr.dtype)
        v = v / v.norm(dim=0, keepdim=True).clamp_min(torch.finfo(v.dtype).tiny)
        w = v.sum(1, keepdim=True)
        w = w / w.norm().clamp_min(torch.finfo(v.dtype).tiny)
        g = gaussian_block(self.kr.n, 1, self.gen, self.kr.dtype, self.kr.device)
        g = g / g.norm()
        self.active = self.kr.add(w + 0.1 * g) + (self.random(b - 1) if b > 1 else [])

    def unpark(self, cert: _Certificate) -> None:
        """While the wanted bounds miss ``tol``, multiply the parked rows (pending rows outside the main
        chain) that couple to the wanted Ritz vectors at least half as much as the strongest: they hold
        residual the main chain does not reduce."""
        kr = self.kr
        parked = [i for i in kr.pending if i not in self.active]
        # also without any certificate: a parked remainder (rows the budget cut from a block, or left by a
        # restart check) may hold residual the main chain never reduces (the run would stall at max_iter)
        if not parked or cert.ok:
            return
        m = cert.theta.numel()
        wanted = torch.cat([torch.arange(m - 1, m - 1 - min(self.k_top, m), -1), torch.arange(min(self.k_bottom, m))])
        rows = torch.tensor(parked, dtype=torch.long)
        coupling = (kr.H[rows[:, None], cert.rows[None, :]] @ cert.S[:, wanted]).norm(dim=1)
        cut = 0.5 * float(coupling.max())
        self.active = self.active + [i for i, c in zip(parked, coupling.tolist()) if c >= cut > 0]

    def step(self, rows: list[int]) -> list[int]:
        new = self.kr.multiply(rows[: max(self.budget - self.kr.matvecs, 0)])
        self.report()
        return new

    def loop(self, check: bool) -> _Certificate:
        kr = self.kr
        first: int | None = None  # matvecs at the first certificate
        while kr.matvecs < self.budget:
            if not self.active:
                self.active = [i for i in kr.pending] or (self.random(1) if kr.size < kr.n else [])
                self.restarts += 0 if kr.pending else 1
                if not self.active:
                    break
            width = len(self.active)
            new = self.step(self.active)
            self.active = new
            cert = self.certify_at_floor()
            if not cert.ok:
                first = None
                continue
            if not check or (kr.size >= kr.n and not kr.pending):
                return self.finish(cert)  # (the whole space multiplied: the Ritz values are exact)
            if kr.size >= kr.n:
                self.active = list(kr.pending)  # no room for a fresh vector: finish the space
                continue
            steps = self.check_steps(cert)
            if steps is None:
                continue
            first = kr.matvecs if first is None else first
            if self.worth_waiting(cert, steps, width, first):
                continue
            found, cert = self.restart_check(cert, steps)
            if not found:  # the certificate stands: its hypothesis has been checked
                return self.finish(cert)
        cert = self.certify()
        if cert.ok and kr.size >= kr.n and not kr.pending:
            return self.finish(cert)  # the budget ran out exactly as the whole space was multiplied
        return cert

    def check_steps(self, cert: _Certificate) -> int | None:
        """The restart check's length for ``cert``, or None when it cannot run yet: no budget for it (go
        on, the group may separate further) or the level it guards is set by a pair still far from
        converged."""
        kr = self.kr
        steps = min(max(cert.top.steps, cert.bottom.steps), kr.n - kr.size)
        if steps + len(kr.pending) > self.budget - kr.matvecs:
            return None
        if not (cert.top.settled and cert.bottom.settled):
            return None
        return steps

    def worth_waiting(self, cert: _Certificate, steps: int, width: int, first: int) -> bool:
        """Whether to defer a check of ``steps`` products: the check is shorter once the pairs below a
        group have settled, so wait for that, but spend on waiting (matvecs since the first certificate,
        ``first``, plus the next block of ``width``) at most what the check could save."""
        kr = self.kr
        floor = _check_floor(cert, self.k_top, self.k_bottom, kr.n - kr.size, self.oversample)
        return steps > floor + width and kr.matvecs - first + width <= steps - floor

    def restart_check(self, cert: _Certificate, steps: int) -> tuple[bool, _Certificate]:
        """A fresh random direction's own chain for ``steps`` products, then one more step of every
        other pending vector (an eigenvector half discovered sits in them); ``found`` when more Ritz
        values lie beyond the certificate's levels than before. Returns ``found`` and ``cert`` in the
        (compressed, :meth:`compress`) basis the check ran in."""
        kr = self.kr
        self.checks += 1
        self.restarts += 1
        before = kr.matvecs
        cert = self.compress(cert, steps)
        chain = self.random(1)
        for _ in range(steps):
            if not chain:
                break
            chain = self.step(chain)
        others = self.step([i for i in kr.pending if i not in chain])
        self.check_matvecs += kr.matvecs - before
        after = self.certify()
        found = _grew(after, cert, self.k_top, self.k_bottom)
        # found: the missing direction's chain joins the main one (otherwise the run ends here)
        self.active = others + chain if found else others
        return found, cert

    def compress(self, cert: _Certificate, steps: int) -> _Certificate:
        """Before a restart check: keep only the Ritz pairs the certificate and the check need
        (:func:`_kept_pairs`) and drop the rest of the multiplied rows (:meth:`KrylovSpace.compress`), so the
        check's rows reuse their memory; returns ``cert`` in the new basis (same values, bounds and levels).

        Skipped when it would free fewer than two rows, or when the space is small enough that the check could
        exhaust it (the whole-space exact bounds need every direction kept)."""
        kr = self.kr
        keep = _kept_pairs(cert, self.k_top, self.k_bottom)
        freed = cert.theta.numel() - keep.numel()
        if freed < 2 or 2 * (kr.size + steps + 2) > kr.n:
            return cert
        kr.compress(cert.S[:, keep])
        j = keep.numel()
        S = torch.eye(j, dtype=cert.S.dtype)
        rows = torch.arange(j, dtype=torch.long)
        return replace(cert, theta=cert.theta[keep], S=S, G=cert.G[:, keep], rows=rows)

    def finish(self, cert: _Certificate) -> _Certificate:
        self.converged = self.floor_tol == 0.0
        return cert

    @property
    def floor_tol(self) -> float:
        """The tolerance the rounding floors allowed at the last step where they exceeded ``tol`` or
        ``vectors_tol`` (the larger of the two raised tolerances), else 0."""
        asked = [(self.eff_tol, self.tol), (self.eff_vectors_tol, self.vectors_tol)]
        return max((eff for eff, tol in asked if eff is not None and tol is not None and eff > tol), default=0.0)


def _initial_capacity(n: int, budget: int, want: int, b: int, device: torch.device) -> int:
    """Rows of the basis to allocate up front.

    On the CPU the whole budget (``budget + b`` rows): ``torch.empty`` of that size is an anonymous
    mapping whose pages become resident only when a row is written, so the resident memory is the rows in
    use and the basis is never copied to grow. On an accelerator, memory is committed at allocation, so the
    basis starts at ``max(32, 2 (want + b) + 8)`` rows and doubles when full.
    """
    if device.type == "cpu":
        return min(n, budget + b)
    return min(n, max(32, 2 * (want + b) + 8))


@dataclass(frozen=True)
class LanczosSettings:
    """How :func:`lanczos` runs, apart from what it computes (which eigenvalues, to what tolerance).

    Pass one as ``lanczos(op, settings=...)``, or name its fields as keywords of :func:`lanczos`
    (``lanczos(op, block_size=4)``; they override the fields of ``settings``).

    Attributes:
        basis_device: where the basis lives (default: the operator's device; ``cpu`` saves accelerator
            memory).
        block_size: vectors per product of the main chain (one data pass each).
        memory_check: refuse up front (``DiagnosticsError``) a basis that cannot fit.
        criterion: ``"bound"`` (eigenvalue bounds) or ``"residual"`` (also the residuals, i.e.
            ``vectors_tol = tol``).
        vectors_tol: also require ``||A y - theta y|| <= vectors_tol * |theta|`` for the wanted vectors.
        check: run the restart check (guard against missed eigenvalues); off only for studies.
        oversample: largest group beyond ``k`` tried for the Lehmann certificate (default ``max(k, 10)``).
    """

    basis_device: torch.device | str | None = None
    block_size: int = 1
    memory_check: bool = True
    criterion: str = "bound"
    vectors_tol: float | None = None
    check: bool = True
    oversample: int | None = None


def lanczos(
    op: LinearOperator,
    *,
    k_top: int = 1,
    k_bottom: int = 0,
    tol: float = 1e-3,
    max_iter: int | None = None,
    generator: torch.Generator | None = None,
    start: torch.Tensor | None = None,
    progress: Progress | None = None,
    settings: LanczosSettings | None = None,
    **overrides: Any,
) -> LanczosResult:
    """Top-``k_top`` and bottom-``k_bottom`` eigenpairs with certified error bounds (module doc).

    Each returned ``theta_j`` comes with a bound ``e_j >= |lambda_j - theta_j|`` on the eigenvalue of the
    same index: ``e_j = max(U_j - theta_j, 0) + eps_T`` (Lehmann bound ``U_j``, rounding floor ``eps_T``),
    or ``inf`` where no certificate was reached.

    Args:
        op: symmetric operator (``matvec``/``matmat``, ``dim``, ``dtype``, ``device``).
        k_top: how many of the largest eigenvalues.
        k_bottom: how many of the smallest.
        tol: every returned eigenvalue's bound ``<= tol * max(|theta|, 1e-3 ||A||)``.
        max_iter: at most this many matvecs (default ``min(dim, 300)``).
        generator: source of the start block and of the restart checks' vectors (default: seed 0).
        start: warm start ``[n]`` or ``[n, k]`` (e.g. the previous checkpoint's eigenvectors): combined into
            one start vector with a small random part, padded with random vectors to ``block_size`` columns.
        progress: ``fn(matvecs, max_iter)`` after every product.
        settings: how the run works (:class:`LanczosSettings`); default ``LanczosSettings()``.
        **overrides: fields of :class:`LanczosSettings` by name (``block_size=4``, ``criterion=...``);
            they replace those of ``settings``.

    Returns:
        :class:`LanczosResult`.

    Raises:
        ValueError: an unknown ``criterion``, no eigenvalue asked for, or more than ``dim``.
        TypeError: a keyword that is neither an argument nor a field of :class:`LanczosSettings`.
        DiagnosticsError: with ``memory_check``, a basis that cannot fit (names the fixes).
    """
    cfg = with_fields(LanczosSettings, settings, overrides, "lanczos")
    basis_device, block_size, memory_check = cfg.basis_device, cfg.block_size, cfg.memory_check
    criterion, vectors_tol, check, oversample = cfg.criterion, cfg.vectors_tol, cfg.check, cfg.oversample
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, not {criterion!r}")
    if criterion == "residual" and vectors_tol is None:
        vectors_tol = tol
    n = op.dim
    want = k_top + k_bottom
    if want < 1:
        raise ValueError("ask for at least one eigenvalue")
    if want > n:
        raise ValueError(f"asked for {want} eigenvalues of a {n}-dimensional operator")
    gen = generator or torch.Generator().manual_seed(0)
    b = max(1, min(int(block_size), n))
    budget = min(n, max_iter or 300)
    budget = max(budget, min(n, want), b)
    oversample = max(k_top, k_bottom, 10) if oversample is None else int(oversample)
    bdev = torch.device(basis_device) if basis_device is not None else torch.device(op.device)
    if memory_check:
        check_basis_memory(op, min(n, budget + b), bdev, extra_vectors=3 * b if bdev != op.device else 0)
    kr = KrylovSpace(op, bdev, capacity=_initial_capacity(n, budget, want, b, bdev))
    run = _Run(op, kr, gen, budget, progress, k_top, k_bottom, tol, vectors_tol, oversample)
    run.start(start, b)
    final = run.loop(check)
    res = _result(
        kr,
        final,
        k_top,
        k_bottom,
        tol,
        vectors_tol,
        run.converged,
        run.restarts,
        run.checks,
        run.check_matvecs,
        b,
        criterion,
    )
    res.floor_tol = run.floor_tol
    res.basis_rows = kr.peak_rows
    return res


def round_up(x: float, digits: int = 2) -> float:
    """``x > 0`` rounded up to ``digits`` significant digits (a tolerance to suggest: never below ``x``)."""
    if not (x > 0 and math.isfinite(x)):
        return x
    exp = math.floor(math.log10(x)) - digits + 1
    return float(f"{math.ceil(x / 10.0**exp * (1 - 1e-12))}e{exp}")


def unconverged_fix(floor_tol: float, dtype: str | torch.dtype) -> str:
    """What to change (as CLI flags) after a run that did not converge, from its
    :attr:`LanczosResult.floor_tol`: ``--max-iter`` when the budget ran out (``floor_tol == 0``); when the
    tolerance was below the rounding floor, where more iterations cannot help, the tolerance the floor
    allows (rounded up) and, below float64, float64."""
    if not floor_tol > 0:
        return "raise --max-iter"
    name = str(dtype).removeprefix("torch.")
    fix = f"the tolerance is below what {name} rounding allows here; use --tol {round_up(floor_tol):.2g}"
    return fix if name == "float64" else fix + " or --dtype float64"


def _scale_min(cert: _Certificate, k_top: int, k_bottom: int) -> float:
    """Smallest ``max(|theta|, floor)`` over the wanted Ritz values (what relative tolerances multiply)."""
    m = cert.theta.numel()
    norm = float(cert.theta.abs().max()) if m else 0.0
    idx = torch.cat([torch.arange(m - 1, m - 1 - k_top, -1), torch.arange(k_bottom)])
    return max(float(cert.theta[idx].abs().clamp(min=RELATIVE_FLOOR * norm).min()), 1e-300)


def _check_floor(cert: _Certificate, k_top: int, k_bottom: int, dim: int, oversample: int) -> int:
    """The shortest check any group could need once the Ritz pairs below it have converged.

    For each group ``p`` (``k <= p <= k + oversample``) with ``theta_p`` above the Ritz values below it:
    :func:`check_length` at ``x = max_{j > p} theta_j`` (residuals dropped) and ``a = x + 0.9 (theta_p - x)``.
    """
    r = cert.G.norm(dim=0)
    steps = 0
    for k, vals, low in (
        (k_top, cert.theta.flip(0), float(cert.theta[0] - r[0])),
        (k_bottom, -cert.theta, float(-cert.theta[-1] - r[-1])),
    ):
        if not k:
            continue
        best = math.inf
        for p in range(k, min(vals.numel() - 1, k + oversample) + 1):
            x, top = float(vals[p]), float(vals[p - 1])
            if top > x > low:
                best = min(best, check_length(x + 0.9 * (top - x), x, low, dim))
        steps = max(steps, 0 if best == math.inf else best)
    return steps


def _kept_pairs(cert: _Certificate, k_top: int, k_bottom: int) -> torch.Tensor:
    """Indices (ascending) of the Ritz pairs a restart check needs: at each wanted end the certificate's group
    and the pair whose interval sets its level (what the check compares against), and the outermost pair at
    both ends (``low`` of :func:`check_length` and the norm estimate)."""
    m = cert.theta.numel()
    r = cert.G.norm(dim=0) + cert.phi
    keep = {0, m - 1}
    ends = ((k_top, cert.top, 1.0, torch.arange(m - 1, -1, -1)), (k_bottom, cert.bottom, -1.0, torch.arange(m)))
    for k, bounds, sign, order in ends:
        if not k:
            continue
        p = bounds.group
        keep.update(int(i) for i in order[:p])
        if p < m:
            rest = order[p:]
            keep.add(int(rest[int(torch.argmax(sign * cert.theta[rest] + r[rest]))]))
    return torch.tensor(sorted(keep), dtype=torch.long)


def _count_above(cert: _Certificate, level: float, top: bool) -> int:
    return int((cert.theta > level).sum()) if top else int((-cert.theta > level).sum())


def _grew(cert: _Certificate, ref: _Certificate, k_top: int, k_bottom: int) -> bool:
    """Whether more Ritz values now lie beyond the levels the reference certificate was checked at."""
    top = k_top > 0 and _count_above(cert, ref.top.level, True) > _count_above(ref, ref.top.level, True)
    bottom = k_bottom > 0 and _count_above(cert, ref.bottom.level, False) > _count_above(ref, ref.bottom.level, False)
    return top or bottom


def _result(
    kr: KrylovSpace,
    cert: _Certificate,
    k_top: int,
    k_bottom: int,
    tol: float,
    vectors_tol: float | None,
    converged: bool,
    restarts: int,
    checks: int,
    check_matvecs: int,
    block_size: int,
    criterion: str,
) -> LanczosResult:
    theta, S, G = cert.theta, cert.S, cert.G
    m = theta.numel()
    top_idx = torch.arange(m - 1, m - 1 - min(k_top, m), -1)
    bot_idx = torch.arange(0, min(k_bottom, m))
    r = G.norm(dim=0) + cert.phi
    # without a certificate nothing bounds the eigenvalue of the same index: the bound is inf
    top_b, bot_b = cert.top.bounds, cert.bottom.bounds
    # the Ritz vectors of the certificate's space (a passed check leaves them unchanged)
    S_full = S
    return LanczosResult(
        eigenvalues=theta[top_idx].clone(),
        eigenvectors=_vectors(kr, S_full, top_idx, cert.rows),
        bottom_eigenvalues=theta[bot_idx].clone(),
        bottom_eigenvectors=_vectors(kr, S_full, bot_idx, cert.rows),
        residuals=r[top_idx].clone(),
        bottom_residuals=r[bot_idx].clone(),
        error_bounds=top_b.clone(),
        bottom_error_bounds=bot_b.clone(),
        iterations=kr.matvecs,
        converged=bool(converged),
        tol=float(tol),
        restarts=restarts,
        block_size=block_size,
        criterion=criterion,
        checks=checks,
        check_matvecs=check_matvecs,
        rounding=cert.eps_t,
        vectors_tol=vectors_tol,
    )


def _vectors(kr: KrylovSpace, S: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Ritz vectors ``Q_rows S[:, idx]`` as ``[n, len(idx)]`` columns (one matrix product)."""
    d = rows
    full = torch.zeros(kr.size, idx.numel(), dtype=torch.float64)
    full[d] = S[:, idx]
    return (kr.Q[: kr.size].T @ full.to(dtype=kr.dtype, device=kr.device)).to(kr.op.device)


# ------------------------------------------------------------------------------------ quadrature
def krylov_space(
    op: LinearOperator, starts: torch.Tensor, steps: int, basis_device: torch.device | str | None = None
) -> tuple[KrylovSpace, torch.Tensor]:
    """``steps`` block Lanczos steps from the columns of ``starts [n, p]`` (no restarts).

    Returns the space and ``R [q, p]`` with ``starts / ||starts|| = Q[:q]^T R`` (the first block).
    Stops early when the Krylov space is exhausted (the quadrature is then exact).
    """
    n = op.dim
    V = starts.reshape(n, -1).to(dtype=op.dtype)
    V = V / V.norm(dim=0, keepdim=True)
    p = V.shape[1]
    steps = max(1, min(int(steps), n))
    kr = KrylovSpace(op, basis_device, capacity=min(n, p * (steps + 1)))
    rows, R = kr._orthonormal(V.to(kr.device), 1.0)
    kr.lost = 0.0
    block = kr._append(rows)
    for _ in range(steps):
        if not block:
            break
        block = kr.multiply(block)
    return kr, R


def krylov_quadrature(
    op: LinearOperator, starts: torch.Tensor, steps: int, basis_device: torch.device | str | None = None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Block Gauss quadrature of each start vector's spectral measure (module doc).

    Args:
        op: symmetric operator.
        starts: ``[n]`` or ``[n, p]`` probes (normalised here); ``p > 1`` runs block Lanczos, one
            ``matmat`` of ``p`` vectors per step.
        steps: block steps (matvecs per probe).
        basis_device: where the basis lives.

    Returns:
        ``p`` pairs ``(nodes [m], weights [m])``; each probe's weights sum to 1 and
        ``sum_l w_l f(theta_l) = v^T f(A) v`` for polynomials ``f`` of degree ``<= 2 steps - 1``.
    """
    kr, R = krylov_space(op, starts, steps, basis_device)
    Hd, _ = kr.projected()
    theta, S = torch.linalg.eigh(Hd)
    q = R.shape[0]
    first = S[:q, :]  # the first block's rows are the first q rows of the done set
    W = (first.T @ R) ** 2  # [m, p]
    return [(theta.clone(), W[:, i].clone()) for i in range(W.shape[1])]


def lanczos_tridiagonal(op: LinearOperator, start: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``steps`` Lanczos steps from ``start`` -> ``(alpha [m], beta [m-1])`` (the tridiagonal ``H``)."""
    kr, _ = krylov_space(op, start.reshape(-1, 1), steps)
    Hd, _ = kr.projected()
    return Hd.diagonal().clone(), Hd.diagonal(1).clone()
