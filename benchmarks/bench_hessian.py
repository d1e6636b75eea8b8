"""Side-by-side benchmark: this package against PyHessian (the incumbent) on the same model and batch.

For top-5 eigenvalues at 1e-3 relative accuracy and for the trace, prints HVPs, wall time and the error
against exact values (dense Hessian eigen-decomposition in float64), and the ratios. Both run in this
process, on the same float32 model and the same full batch of scikit-learn's digits.

    .venv/bin/python benchmarks/bench_hessian.py [--width 32] [--repeats 3] [--seed 0]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import numpy as np
import torch
from pyhessian_products import counted_products

from diagnostics.binding import LOSSES
from diagnostics.context import Context
from diagnostics.examples import digits
from diagnostics.examples.digits import train_data
from diagnostics.linalg import hutchpp, lanczos
from diagnostics.linalg.operator import dense_hessian
from diagnostics.operators import hessian_operator


def trained_model(width: int) -> torch.nn.Module:
    return digits.trained_mlp(width=width, steps=500)


def context(model: torch.nn.Module, X: torch.Tensor, y: torch.Tensor, dtype: torch.dtype) -> Context:
    m = type(model)(width=model.head.in_features, depth=sum(isinstance(x, torch.nn.Linear) for x in model.features))
    m.load_state_dict(model.state_dict())
    m = m.to(dtype).eval()
    return Context(
        model=m,
        params={n: p.detach() for n, p in m.named_parameters()},
        frozen={},
        batches=[(X.to(dtype), y)],
        loss_fn=LOSSES["cross_entropy"],
        device=torch.device("cpu"),
        dtype=dtype,
    )


def exact_spectrum(model: torch.nn.Module, X: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    op = hessian_operator(context(model, X, y, torch.float64), max_vectors=64)
    return np.linalg.eigvalsh(dense_hessian(op).numpy())[::-1]


def run_pyhessian(model, X, y, top_n: int, tol: float, seed: int):
    import sys

    import pyhessian  # noqa: F401  (the package re-exports the class under the module's name)

    ph = sys.modules["pyhessian.hessian"]
    try:
        with counted_products() as calls:
            torch.manual_seed(seed)  # PyHessian draws from the global RNG
            t0 = time.perf_counter()
            h = ph.hessian(model, torch.nn.CrossEntropyLoss(), data=(X, y), cuda=False)
            eig, _ = h.eigenvalues(maxIter=100, tol=tol, top_n=top_n)
            t_eig = time.perf_counter() - t0
            n_eig = calls["n"]
            calls["n"] = 0
            t0 = time.perf_counter()
            samples = h.trace(maxIter=100, tol=tol)
            t_tr = time.perf_counter() - t0
            n_tr = calls["n"]
    finally:
        model.zero_grad(set_to_none=True)
    return np.array(eig), n_eig, t_eig, float(np.mean(samples)), n_tr, t_tr, len(samples)


def run_ours(model, X, y, top_k: int, tol: float, seed: int, trace_rtol: float):
    ctx = context(model, X, y, torch.float32)
    op = hessian_operator(ctx)
    t0 = time.perf_counter()
    res = lanczos(op, k_top=top_k, tol=tol, generator=torch.Generator().manual_seed(seed))
    t_eig = time.perf_counter() - t0
    n_eig = op.hvp_count
    op2 = hessian_operator(ctx)
    t0 = time.perf_counter()
    tr = hutchpp(op2, generator=torch.Generator().manual_seed(seed + 1), sketch=10, rtol=trace_rtol, max_samples=300)
    t_tr = time.perf_counter() - t0
    return res.eigenvalues.numpy(), n_eig, t_eig, tr.value, tr.stderr, op2.hvp_count, t_tr


def run_ours_trace_budget(model, X, y, budget: int, seed: int):
    """Hutch++ with the HVP budget PyHessian spent: sketch s, 2s + g = budget."""
    ctx = context(model, X, y, torch.float32)
    op = hessian_operator(ctx)
    s = max(1, budget // 6)
    g = max(2, budget - 2 * s)
    tr = hutchpp(op, generator=torch.Generator().manual_seed(seed + 1), sketch=s, min_samples=g, max_samples=g)
    return tr.value, tr.stderr, op.hvp_count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tol", type=float, default=1e-3)
    ap.add_argument("--trace-rtol", type=float, default=0.01)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    X, y = train_data()
    model = trained_model(args.width)
    n_params = sum(p.numel() for p in model.parameters())
    exact = exact_spectrum(model, X, y)
    top = exact[:5]
    print(f"model: digits MLP width {args.width}, {n_params} parameters, batch {len(y)} samples, float32, CPU")
    print(f"exact top-5 (dense float64): {np.array2string(top, precision=5)}   exact trace: {exact.sum():.5f}")
    rows = []
    for r in range(args.repeats):
        seed = args.seed + r
        p_eig, p_n, p_t, p_tr, p_trn, p_trt, p_trs = run_pyhessian(model, X, y, 5, args.tol, seed)
        o_eig, o_n, o_t, o_tr, o_trse, o_trn, o_trt = run_ours(model, X, y, 5, args.tol, seed, args.trace_rtol)
        b_tr, b_se, b_n = run_ours_trace_budget(model, X, y, p_trn, seed)
        p_err = np.max(np.abs(np.sort(p_eig)[::-1] - top) / np.abs(top))
        o_err = np.max(np.abs(o_eig - top) / np.abs(top))
        rows.append(
            dict(
                p_n=p_n,
                p_t=p_t,
                p_err=p_err,
                o_n=o_n,
                o_t=o_t,
                o_err=o_err,
                p_trn=p_trn,
                p_trt=p_trt,
                p_trerr=abs(p_tr - exact.sum()) / abs(exact.sum()),
                p_trs=p_trs,
                o_trn=o_trn,
                o_trt=o_trt,
                o_trerr=abs(o_tr - exact.sum()) / abs(exact.sum()),
                o_trse=o_trse / abs(exact.sum()),
                b_n=b_n,
                b_err=abs(b_tr - exact.sum()) / abs(exact.sum()),
                b_se=b_se / abs(exact.sum()),
            )
        )

    def med(key):
        return statistics.median(row[key] for row in rows)

    print(f"\nmedian over {args.repeats} seeds                  PyHessian      ours     ratio")
    print(
        f"top-5 @ tol {args.tol:g}: HVPs              {med('p_n'):9.0f} {med('o_n'):9.0f} {med('p_n') / med('o_n'):8.1f}x"
    )
    print(
        f"top-5 @ tol {args.tol:g}: wall time (s)     {med('p_t'):9.3f} {med('o_t'):9.3f} {med('p_t') / med('o_t'):8.1f}x"
    )
    print(f"top-5 @ tol {args.tol:g}: max rel. error    {med('p_err'):9.2e} {med('o_err'):9.2e}")
    print(
        f"  worst seed max rel. error             {max(r['p_err'] for r in rows):9.2e} {max(r['o_err'] for r in rows):9.2e}"
    )
    print(
        f"trace: HVPs                             {med('p_trn'):9.0f} {med('o_trn'):9.0f} {med('p_trn') / med('o_trn'):8.2f}x"
    )
    print(
        f"trace: wall time (s)                    {med('p_trt'):9.3f} {med('o_trt'):9.3f} {med('p_trt') / med('o_trt'):8.2f}x"
    )
    print(f"trace: rel. error vs exact              {med('p_trerr'):9.2e} {med('o_trerr'):9.2e}")
    print(f"trace: PyHessian samples / ours rel. stderr  {med('p_trs'):5.0f}  {med('o_trse'):9.2e}")
    print(
        f"trace at PyHessian's HVP budget: ours {med('b_n'):.0f} HVPs, rel. error {med('b_err'):.2e}, "
        f"rel. stderr {med('b_se'):.2e} (PyHessian: rel. error {med('p_trerr'):.2e}, no error estimate)"
    )


if __name__ == "__main__":
    main()
