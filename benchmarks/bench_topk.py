"""Top-k Hessian eigenvalues: PyHessian (power iteration + deflation) vs our Lanczos, at matched accuracy.

Usage::

    python benchmarks/bench_topk.py [--ks 1 5 20] [--target 1e-3] [--threads 1] [--out benchmarks/results]

Problem: a tanh MLP (64-16-16-10, 1,482 parameters) trained 300 steps of full-batch GD (MSE, lr 0.5)
on scikit-learn's digits; the Hessian of the loss over all 1,437 training samples (one batch), float32
for both tools. Exact eigenvalues: the dense float64 Hessian (``torch.func`` products, ``eigh``).

For each k and each tool the tolerance is swept over 1e-1 ... 1e-7; "matched accuracy" is the loosest
tolerance whose worst relative error over the top k, ``max_i |theta_i - lambda_i| / |lambda_i|``, is at
most ``--target``. Reported: HVPs (PyHessian's counted by wrapping its ``hessian_vector_product``),
wall time (median of 3 runs), the error reached, and PyHessian at its default ``tol=1e-3`` as well.
PyHessian reuses one autograd graph (``data=`` mode), so each of its HVPs is a backward pass only;
ours redo the forward pass per block of vectors.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from pyhessian_products import counted_products
from torch import nn
from torch.func import functional_call

from diagnostics.binding import LOSSES
from diagnostics.examples.digits import build_mlp, train_data
from diagnostics.linalg.lanczos import lanczos
from diagnostics.linalg.operator import HessianOperator

TOLS = [1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 1e-6, 1e-7]


def trained_model() -> nn.Module:
    torch.manual_seed(0)
    model = build_mlp(width=16, depth=2)
    X, y = train_data()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(300):
        opt.zero_grad()
        LOSSES["mse"](model(X), y).backward()
        opt.step()
    return model.eval()


def exact_top(model: nn.Module, k: int) -> torch.Tensor:
    m64 = build_mlp(width=16, depth=2).double()
    m64.load_state_dict({n: t.double() for n, t in model.state_dict().items()})
    X, y = train_data()
    params = {n: p.detach() for n, p in m64.named_parameters()}

    def loss(p, b):
        return LOSSES["mse"](functional_call(m64, p, (b[0].double(),)), b[1])

    op = HessianOperator(loss, params, [(X, y)], max_vectors=128)
    H = op.matmat(torch.eye(op.dim, dtype=torch.float64))
    return torch.linalg.eigvalsh(0.5 * (H + H.T)).flip(0)[:k]


def run_ours(model: nn.Module, k: int, tol: float, block_size: int, seed: int) -> tuple[torch.Tensor, int]:
    X, y = train_data()
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss(p, b):
        return LOSSES["mse"](functional_call(model, p, (b[0],)), b[1])

    op = HessianOperator(loss, params, [(X, y)])
    res = lanczos(
        op, k_top=k, tol=tol, max_iter=1000, block_size=block_size, generator=torch.Generator().manual_seed(seed)
    )
    return res.eigenvalues.double(), op.hvp_count


def run_pyhessian(model: nn.Module, k: int, tol: float, seed: int) -> tuple[torch.Tensor, int]:
    import importlib

    ph = importlib.import_module("pyhessian.hessian")  # the module (the package re-exports a class of that name)
    try:
        with counted_products() as counter:
            torch.manual_seed(seed)
            X, y = train_data()
            h = ph.hessian(model, LOSSES["mse"], data=(X, y), cuda=False)
            vals, _ = h.eigenvalues(maxIter=1000, tol=tol, top_n=k)
    finally:
        model.zero_grad(set_to_none=True)
    return torch.tensor(sorted(vals, reverse=True), dtype=torch.float64), counter["n"]


def rel_error(theta: torch.Tensor, exact: torch.Tensor) -> float:
    return float(((theta - exact) / exact.abs()).abs().max())


def timed(fn, repeats: int = 3):
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return out, statistics.median(times)


def matched(name: str, fn, exact: torch.Tensor, target: float) -> dict:
    """The loosest tolerance reaching ``target`` (tolerances tried from loose to tight)."""
    for tol in TOLS:
        (theta, hvps), _ = timed(lambda tol=tol: fn(tol), repeats=1)
        err = rel_error(theta, exact)
        if err <= target:
            (theta, hvps), seconds = timed(lambda tol=tol: fn(tol))
            return {"method": name, "tol": tol, "hvps": hvps, "seconds": seconds, "error": rel_error(theta, exact)}
    return {"method": name, "tol": None, "hvps": hvps, "seconds": float("nan"), "error": err}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 5, 20])
    parser.add_argument("--target", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = trained_model()
    exact_all = exact_top(model, max(args.ks))
    rows = []
    for k in args.ks:
        exact = exact_all[:k]
        rows.append(matched("ours: Lanczos", lambda tol, k=k: run_ours(model, k, tol, 1, 0), exact, args.target))
        rows.append(
            matched("ours: block Lanczos (b=4)", lambda tol, k=k: run_ours(model, k, tol, 4, 0), exact, args.target)
        )
        rows.append(matched("PyHessian", lambda tol, k=k: run_pyhessian(model, k, tol, 0), exact, args.target))
        (theta, hvps), seconds = timed(lambda k=k: run_pyhessian(model, k, 1e-3, 0))
        rows.append(
            {
                "method": "PyHessian, default tol=1e-3",
                "tol": 1e-3,
                "hvps": hvps,
                "seconds": seconds,
                "error": rel_error(theta, exact),
            }
        )
        for r in rows[-4:]:
            r["k"] = k
    print(f"\nTop-k at matched accuracy (max relative error <= {args.target:g}); {args.threads} thread(s):\n")
    print("| k | method | tolerance used | HVPs | wall time (s) | max rel. error vs exact |")
    print("|---:|---|---:|---:|---:|---:|")
    for r in rows:
        tol = "not reached" if r["tol"] is None else f"{r['tol']:g}"
        print(f"| {r['k']} | {r['method']} | {tol} | {r['hvps']} | {r['seconds']:.2f} | {r['error']:.1e} |")
    import pandas as pd

    args.out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(args.out / "topk_vs_pyhessian.csv", index=False)


if __name__ == "__main__":
    main()
