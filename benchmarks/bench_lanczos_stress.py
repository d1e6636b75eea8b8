"""Stress test of the Lanczos stopping rule and error bounds on spectra built to break them (issue 18).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_lanczos_stress.py [--seeds 20] [--tols 1e-2 1e-3 1e-4]
        [--ks 1 5 10 20] [--cases NAME ...] [--out benchmarks/results/lanczos_stress.csv]

Operators (float64, dense, known spectra; ``n = 400`` unless stated), each rotated by a random orthogonal
matrix:

* ``quad20``: the 20-dim quadratic of issue 18, eigenvalues evenly spaced in ``[1, 10]``;
* ``eos400``: top eigenvalues 10, 9.95, ..., 9.70 over a bulk uniform in ``[-0.5, 9.0]`` (issue 18);
* ``cluster_1e-4`` ... ``cluster_1e-1``: three clusters of four eigenvalues (at 10, 7 and 5, members
  ``s * 10`` apart) over a bulk in ``[-1, 3]``;
* ``degenerate``: exact multiplicities 10 (x3), 8 (x2), 6 (x4) over a bulk in ``[-1, 4]``;
* ``bulk_top``: 10 over 399 eigenvalues uniform in ``[0, 9.9]`` (a bulk just below the top);
* ``negative``: 5, 4, 3 over a bulk in ``[-2, 1]`` and a bottom at -6, -5.9;
* ``decay``: ``1/sqrt(i)``, i = 1..400 (slowly decaying, every eigenvalue close to the next);
* ``tanh_ce``, ``tanh_mse``: dense float64 Hessians of two tiny tanh MLPs (160 / 163 parameters) after a
  few gradient steps (indefinite; reference by ``eigh``).

For every case, tolerance ``tol`` and ``k`` (top-k), over ``--seeds`` start vectors, three methods run on
the same operator:

* ``new``: :func:`diagnostics.linalg.lanczos.lanczos` (Lehmann bounds + rounding floor + restart check);
* ``old``: the previous rule, reimplemented here as a reference: single-vector Lanczos with full
  reorthogonalisation, stopped when every wanted Ritz pair has ``min(r, r^2/gap) <= tol |theta|`` (``r`` the
  Ritz residual, ``gap`` the distance to the nearest other Ritz value), that quantity reported as the bound;
* ``eigsh``: ``scipy.sparse.linalg.eigsh(which="LA", tol=tol)`` (ARPACK, implicitly restarted), products
  counted (no bound reported).

A *tolerance violation* is ``|theta_j - lambda_j| > tol * max(|lambda_j|, 1e-3 ||A||)`` for some ``j < k``
(``lambda_j`` the exact eigenvalue of the same index; the floor is the documented one for eigenvalues near
0); a *bound violation* is ``|theta_j - lambda_j| > bound_j``. Printed per case and tolerance: runs,
violations of each kind for each method, and the mean products (HVPs) per run for each ``k``.
"""

from __future__ import annotations

import argparse
import csv
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import scipy.sparse.linalg as sla
import torch

from diagnostics.linalg import DenseOperator
from diagnostics.linalg.lanczos import RELATIVE_FLOOR, lanczos

N = 400


def rotated(eigs: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(1000 + seed)
    Q, _ = np.linalg.qr(rng.standard_normal((eigs.size, eigs.size)))
    A = (Q * eigs) @ Q.T
    return 0.5 * (A + A.T)


def _tiny_net_hessian(kind: str) -> np.ndarray:
    torch.manual_seed(3 if kind == "ce" else 4)
    d_in, width, d_out = (8, 12, 4) if kind == "ce" else (6, 16, 3)
    model = torch.nn.Sequential(torch.nn.Linear(d_in, width), torch.nn.Tanh(), torch.nn.Linear(width, d_out)).double()
    X = torch.randn(64, d_in, dtype=torch.float64)
    y = torch.randint(0, d_out, (64,)) if kind == "ce" else torch.randn(64, d_out, dtype=torch.float64)
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]

    def loss(flat: torch.Tensor) -> torch.Tensor:
        params = {n: t.reshape(s) for n, t, s in zip(names, torch.split(flat, sizes), shapes)}
        out = torch.func.functional_call(model, params, (X,))
        if kind == "ce":
            return torch.nn.functional.cross_entropy(out, y)
        return torch.nn.functional.mse_loss(out, y)

    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    for _ in range(20):  # a few gradient steps: away from the initialisation, still indefinite
        flat = flat - 0.5 * torch.func.grad(loss)(flat)
    H = torch.autograd.functional.hessian(loss, flat).numpy()
    return 0.5 * (H + H.T)


def zoo() -> dict[str, np.ndarray]:
    """Name -> dense symmetric matrix (float64)."""
    rng = np.random.default_rng(7)
    cases: dict[str, np.ndarray] = {}
    cases["quad20"] = rotated(np.linspace(1.0, 10.0, 20), 0)
    top = np.array([10.0, 9.95, 9.90, 9.85, 9.80, 9.75, 9.70])
    cases["eos400"] = rotated(np.concatenate([top, rng.uniform(-0.5, 9.0, N - top.size)]), 1)
    for s in (1e-4, 1e-3, 1e-2, 1e-1):
        clusters = np.concatenate([c - 10 * s * np.arange(4) for c in (10.0, 7.0, 5.0)])
        cases[f"cluster_{s:.0e}"] = rotated(np.concatenate([clusters, rng.uniform(-1, 3, N - 12)]), 2)
    deg = np.array([10.0] * 3 + [8.0] * 2 + [6.0] * 4)
    cases["degenerate"] = rotated(np.concatenate([deg, rng.uniform(-1, 4, N - deg.size)]), 3)
    cases["bulk_top"] = rotated(np.concatenate([[10.0], rng.uniform(0, 9.9, N - 1)]), 4)
    neg = np.concatenate([[5.0, 4.0, 3.0], rng.uniform(-2, 1, N - 5), [-6.0, -5.9]])
    cases["negative"] = rotated(neg, 5)
    cases["decay"] = rotated(1.0 / np.sqrt(np.arange(1, N + 1)), 6)
    cases["tanh_ce"] = _tiny_net_hessian("ce")
    cases["tanh_mse"] = _tiny_net_hessian("mse")
    return cases


def old_rule(A: np.ndarray, k: int, tol: float, seed: int, max_iter: int = 300) -> tuple[np.ndarray, np.ndarray, int]:
    """The previous stopping rule (module doc): values (descending), bounds, products."""
    n = A.shape[0]
    rng = np.random.default_rng(seed)
    q = rng.standard_normal(n)
    Q = np.zeros((n, min(n, max_iter) + 1))
    Q[:, 0] = q / np.linalg.norm(q)
    alpha, beta = [], []
    for m in range(1, min(n, max_iter) + 1):
        w = A @ Q[:, m - 1]
        a = float(Q[:, m - 1] @ w)
        w = w - a * Q[:, m - 1] - (beta[-1] * Q[:, m - 2] if m > 1 else 0)
        for _ in range(2):  # full reorthogonalisation
            w = w - Q[:, :m] @ (Q[:, :m].T @ w)
        b = float(np.linalg.norm(w))
        alpha.append(a)
        T = np.diag(alpha) + np.diag(beta, 1) + np.diag(beta, -1)
        theta, S = np.linalg.eigh(T)
        theta, S = theta[::-1], S[:, ::-1]
        r = np.abs(b * S[-1, :])
        if m >= k:
            if m > 1:
                gaps = np.array([np.min(np.abs(np.delete(theta, j) - theta[j])) for j in range(k)])
                bound = np.minimum(r[:k], r[:k] ** 2 / np.maximum(gaps, 1e-300))
            else:  # one Ritz value: no gap, the residual itself
                bound = r[:k]
            if np.all(bound <= tol * np.abs(theta[:k])) or b < 1e-12 or m == min(n, max_iter):
                return theta[:k], bound, m
        beta.append(b)
        Q[:, m] = w / b
    raise AssertionError("unreachable")


def eigsh_run(A: np.ndarray, k: int, tol: float, seed: int) -> tuple[np.ndarray | None, int]:
    n = A.shape[0]
    if k >= n:
        return None, 0
    count = [0]

    def mv(x: np.ndarray) -> np.ndarray:
        count[0] += 1 if x.ndim == 1 else x.shape[1]
        return A @ x

    op = sla.LinearOperator((n, n), matvec=mv, dtype=np.float64)
    v0 = np.random.default_rng(seed).standard_normal(n)
    vals = sla.eigsh(op, k=k, which="LA", tol=tol, v0=v0, return_eigenvectors=False, maxiter=10 * n)
    return np.sort(vals)[::-1], count[0]


def violations(theta: np.ndarray, exact: np.ndarray, tol: float, norm: float, bound: np.ndarray | None):
    err = np.abs(theta - exact)
    scale = np.maximum(np.abs(exact), RELATIVE_FLOOR * norm)
    tol_bad = bool(np.any(err > tol * scale))
    bound_bad = bool(np.any(err > bound)) if bound is not None else False
    return tol_bad, bound_bad, float(np.max(err / scale))


def run_case(name: str, A: np.ndarray, tols, ks, seeds: int) -> list[dict]:
    exact_all = np.sort(np.linalg.eigvalsh(A))[::-1]
    norm = float(np.max(np.abs(exact_all)))
    At = torch.from_numpy(A)
    rows = []
    for tol in tols:
        for k in ks:
            if k > A.shape[0]:
                continue
            exact = exact_all[:k]
            acc: dict[str, list] = defaultdict(list)
            for seed in range(seeds):
                res = lanczos(DenseOperator(At), k_top=k, tol=tol, generator=torch.Generator().manual_seed(seed))
                t, b = res.eigenvalues.numpy(), res.error_bounds.numpy()
                acc["new"].append((*violations(t, exact, tol, norm, b), res.iterations, not res.converged))
                t, b, m = old_rule(A, k, tol, seed)
                acc["old"].append((*violations(t, exact, tol, norm, b), m, False))
                t, m = eigsh_run(A, k, tol, seed)
                if t is not None:
                    acc["eigsh"].append((*violations(t, exact, tol, norm, None), m, False))
            row = {"case": name, "tol": tol, "k": k, "runs": seeds}
            for method, vals in acc.items():
                row[f"{method}_tol_viol"] = sum(v[0] for v in vals)
                row[f"{method}_bound_viol"] = sum(v[1] for v in vals) if method != "eigsh" else ""
                row[f"{method}_worst_rel_err"] = max(v[2] for v in vals)
                row[f"{method}_hvps"] = float(np.mean([v[3] for v in vals]))
                if method == "new":
                    row["new_unconverged"] = sum(v[4] for v in vals)
            rows.append(row)
            print(_line(row), flush=True)
    return rows


def _line(row: dict) -> str:
    def get(m: str, key: str) -> str:
        v = row.get(f"{m}_{key}", "")
        return "-" if v == "" else (f"{v:.1f}" if isinstance(v, float) else str(v))

    return (
        f"{row['case']:>13} tol={row['tol']:.0e} k={row['k']:>2} runs={row['runs']} | "
        f"new: tolV={get('new', 'tol_viol')} boundV={get('new', 'bound_viol')} hvps={get('new', 'hvps')} "
        f"unconv={row.get('new_unconverged', 0)} | old: tolV={get('old', 'tol_viol')} "
        f"boundV={get('old', 'bound_viol')} hvps={get('old', 'hvps')} | "
        f"eigsh: tolV={get('eigsh', 'tol_viol')} hvps={get('eigsh', 'hvps')}"
    )


def summary(rows: list[dict]) -> None:
    print("\nper tolerance, all cases and k together (violating runs / runs; mean HVPs per run):")
    for tol in sorted({r["tol"] for r in rows}, reverse=True):
        sel = [r for r in rows if r["tol"] == tol]
        runs = sum(r["runs"] for r in sel)
        parts = [f"tol={tol:.0e} runs={runs}"]
        for m in ("new", "old", "eigsh"):
            ok = [r for r in sel if r.get(f"{m}_hvps") is not None and f"{m}_hvps" in r]
            tv = sum(r[f"{m}_tol_viol"] for r in ok)
            bv = sum(r[f"{m}_bound_viol"] for r in ok) if m != "eigsh" else "-"
            hv = sum(r[f"{m}_hvps"] * r["runs"] for r in ok) / max(sum(r["runs"] for r in ok), 1)
            parts.append(f"{m}: tolV={tv} boundV={bv} hvps={hv:.1f}")
        print("  " + " | ".join(parts))
    print("\nmean HVPs per run by k (all cases, all tolerances):")
    for k in sorted({r["k"] for r in rows}):
        sel = [r for r in rows if r["k"] == k and "eigsh_hvps" in r]
        line = f"  k={k:>2}"
        for m in ("new", "old", "eigsh"):
            line += f"  {m}={np.mean([r[f'{m}_hvps'] for r in sel]):.1f}"
        print(line + "  (cases where eigsh ran)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--tols", type=float, nargs="+", default=[1e-2, 1e-3, 1e-4])
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 5, 10, 20])
    ap.add_argument("--cases", nargs="*", default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/lanczos_stress.csv"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for name, A in zoo().items():
        if args.cases and name not in args.cases:
            continue
        rows.extend(run_case(name, A, args.tols, args.ks, args.seeds))
    summary(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    keys = sorted({k for r in rows for k in r}, key=lambda k: (k not in ("case", "tol", "k", "runs"), k))
    with args.out.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    bad = sum(r["new_tol_viol"] + r["new_bound_viol"] for r in rows if r["tol"] >= 1e-3 - 1e-15)
    print(f"\nnew rule, tol 1e-3 and 1e-2: {bad} violations (target 0); table written to {args.out}")
    return 0 if bad == 0 and not math.isnan(bad) else 1


if __name__ == "__main__":
    raise SystemExit(main())
