"""Curvature beyond the Hessian: the cost of a Gauss-Newton / Fisher / empirical-Fisher product against a
Hessian-vector product, and top-5 Gauss-Newton eigenvalues against hessian-eigenthings 1.0.

Usage::

    python benchmarks/bench_curvature.py [--repeats 3] [--threads 1] [--k 1 8] [--models mlp cnn]
                                         [--eigenthings PATH] [--out benchmarks/results]

Problems (scikit-learn's digits training split, 1,437 samples, one batch, float32):

* ``mlp``: the demo's 64-32-32-10 tanh MLP (3,466 parameters), cross-entropy;
* ``cnn``: the digits CNN (two 3x3 convolutions with BatchNorm in eval mode, 8/16 channels, 1,546 parameters),
  cross-entropy.

**Cost.** For blocks of ``k`` vectors it times one product per vector of each operator of
:func:`diagnostics.operators.curvature_operator` (``hessian`` with forward-over-reverse and with the cached
graph, ``ggn``, ``fisher`` (= GGN for cross-entropy), ``empirical_fisher``, ``functional`` = H - GGN) and
one full-batch gradient. Within each repeat the variants run in a rotating order and each ratio is formed
inside its repeat; the table shows medians: time per vector over the gradient's, and over the
forward-over-reverse HVP's ("HVP-equivalents").

**Accuracy** (``--eigenthings PATH``, a checkout of hessian-eigenthings >= 1.0 put on ``sys.path``; nothing
is installed): top-5 eigenvalues of the MLP's GGN from our Lanczos (``tol`` 1e-3, the default of
``diag hessian``), from hessian-eigenthings' ``lanczos(GGNOperator(...), k=5)`` with its defaults (finite-
difference JVP, its default iteration count), with 40 iterations (its default reorthogonalises up to 50)
and with 100, each against a float64 reference
(our operator in float64, Lanczos to 1e-10; the operator is tested against ``J^T H_l J`` built with
``jacrev``). Prints Markdown tables and writes ``curvature_cost_cpu.csv`` and ``curvature_topk.csv``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from diagnostics.binding import LOSSES
from diagnostics.context import Context
from diagnostics.examples.digits import build_cnn, build_mlp, train_data
from diagnostics.linalg.lanczos import lanczos
from diagnostics.linalg.products import batch_gradient
from diagnostics.operators import curvature_operator

KINDS = ("hessian_forward", "hessian_cached", "ggn", "fisher", "empirical_fisher", "functional")


def context(model: nn.Module, dtype: torch.dtype) -> Context:
    """The digits training split as one batch and ``model`` (eval mode) with cross-entropy."""
    X, y = train_data()
    model = model.to(dtype).eval()
    named = dict(model.named_parameters())
    return Context(
        model=model,
        params={n: p.detach() for n, p in named.items()},
        frozen={n: b for n, b in model.named_buffers()},
        batches=[(X.to(dtype), y)],
        loss_fn=LOSSES["cross_entropy"],
        device=torch.device("cpu"),
        dtype=dtype,
        loss_name="cross_entropy",
    )


def problems(names: list[str], dtype: torch.dtype = torch.float32) -> dict[str, Context]:
    builders = {"mlp": lambda: build_mlp(width=32, depth=2, seed=0), "cnn": lambda: build_cnn(channels=8, seed=0)}
    return {name: context(builders[name](), dtype) for name in names}


def _timed(fn: Callable[[], object], inner: int) -> float:
    t = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t) / inner


def operators(ctx: Context, k: int) -> dict[str, object]:
    out = {}
    for kind in KINDS:
        name, _, backend = kind.partition("_") if kind.startswith("hessian") else (kind, "", "")
        out[kind] = curvature_operator(
            ctx, name, backend=backend or "forward", max_vectors=k, memory_check=False, shard=False
        )
    return out


def measure(name: str, ctx: Context, k: int, repeats: int) -> dict:
    ops = operators(ctx, k)
    V = torch.randn(ops["ggn"].dim, k, generator=torch.Generator().manual_seed(2), dtype=ctx.dtype)
    fns: dict[str, Callable[[], object]] = {
        "grad": lambda: batch_gradient(ctx.batch_loss, ctx.params, ctx.batches[0]),
        **{kind: (lambda op=op: op.matmat(V)) for kind, op in ops.items()},
    }
    for fn in fns.values():  # warm-up (the cached graph is built here)
        fn()
    first = _timed(fns["grad"], 1)
    inner = max(1, int(0.2 / max(first, 1e-6)))
    order = list(fns)
    times: dict[str, list[float]] = {v: [] for v in order}
    for r in range(repeats):
        for v in order[r % len(order) :] + order[: r % len(order)]:
            times[v].append(_timed(fns[v], inner))
    row: dict[str, object] = {
        "model": name,
        "params": ops["ggn"].dim,
        "k": k,
        "grad_ms": 1e3 * statistics.median(times["grad"]),
    }
    for kind in KINDS:
        row[f"{kind}_over_grad"] = statistics.median(t / k / g for t, g in zip(times[kind], times["grad"]))
        row[f"{kind}_over_hvp"] = statistics.median(t / h for t, h in zip(times[kind], times["hessian_forward"]))
    return row


def eigenthings_top5(path: str, model: nn.Module, X: torch.Tensor, y: torch.Tensor, max_iter: int | None):
    """Top-5 GGN eigenvalues by hessian-eigenthings (its ``GGNOperator`` and ``lanczos``) and the matvecs spent."""
    sys.path.insert(0, path)
    from hessian_eigenthings.algorithms import lanczos as he_lanczos
    from hessian_eigenthings.loss_fns.standard import cross_entropy_loss_of_output, supervised_forward
    from hessian_eigenthings.operators import GGNOperator

    op = GGNOperator(model, [(X, y)], supervised_forward, cross_entropy_loss_of_output())
    count = [0]
    inner = op.matvec

    def counted(v: torch.Tensor) -> torch.Tensor:
        count[0] += 1
        return inner(v)

    op.matvec = counted  # type: ignore[method-assign]
    t = time.perf_counter()
    kwargs = {"k": 5, "which": "LA", "seed": 0}
    if max_iter is not None:
        kwargs["max_iter"] = max_iter
    res = he_lanczos(op, **kwargs)
    seconds = time.perf_counter() - t
    return sorted(res.eigenvalues.tolist(), reverse=True)[:5], count[0], seconds


def accuracy(eigenthings: str | None) -> list[dict]:
    ref_ctx = problems(["mlp"], torch.float64)["mlp"]
    ref = lanczos(curvature_operator(ref_ctx, "ggn", shard=False), k_top=5, tol=1e-10).eigenvalues.tolist()
    ctx = problems(["mlp"])["mlp"]
    rows = []
    op = curvature_operator(ctx, "ggn", shard=False)
    t = time.perf_counter()
    res = lanczos(op, k_top=5, tol=1e-3, generator=torch.Generator().manual_seed(0))
    rows.append(("diag (tol 1e-3, float32)", res.eigenvalues.tolist(), op.matvec_count, time.perf_counter() - t))
    if eigenthings:
        model = build_mlp(width=32, depth=2, seed=0).eval()
        X, y = train_data()
        for label, it in (
            ("hessian-eigenthings defaults", None),
            ("hessian-eigenthings max_iter=40 (reorthogonalised)", 40),
            ("hessian-eigenthings max_iter=100 (not reorthogonalised)", 100),
        ):
            vals, mv, secs = eigenthings_top5(eigenthings, model, X, y, it)
            rows.append((label, vals, mv, secs))
    out = []
    for label, vals, mv, secs in rows:
        errs = [abs(a - b) / abs(b) for a, b in zip(vals, ref)]
        out.append({"method": label, "matvecs": mv, "seconds": secs, "max_rel_error": max(errs), "values": vals})
    out.append(
        {"method": "reference (float64, tol 1e-10)", "matvecs": 0, "seconds": 0.0, "max_rel_error": 0.0, "values": ref}
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--k", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"])
    parser.add_argument("--eigenthings", default=None, help="path of a hessian-eigenthings checkout (optional)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name, ctx in problems(args.models).items():
        for k in args.k:
            print(f"# {name}, k={k} ...", flush=True)
            rows.append(measure(name, ctx, k, args.repeats))
    print(
        f"\nCost per vector, in gradients / in forward-over-reverse HVPs (cpu, {torch.get_num_threads()} thread(s), ",
        end="",
    )
    print(f"torch {torch.__version__}, median over {args.repeats} rotating repeats):\n")
    print("| model | params | k | gradient ms | " + " | ".join(KINDS) + " |")
    print("|---|---:|---:|---:|" + "---:|" * len(KINDS))
    for r in rows:
        cells = " | ".join(f"{r[f'{kind}_over_grad']:.2f} / {r[f'{kind}_over_hvp']:.2f}" for kind in KINDS)
        print(f"| {r['model']} | {r['params']:,} | {r['k']} | {r['grad_ms']:.2f} | {cells} |")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "curvature_cost_cpu.csv"
    keys = list(rows[0])
    path.write_text("\n".join([",".join(keys)] + [",".join(str(r[k]) for k in keys) for r in rows]) + "\n")
    print(f"\nwrote {path}")
    acc = accuracy(args.eigenthings)
    print("\nTop-5 GGN eigenvalues of the digits MLP (cross-entropy, float32) against a float64 reference:\n")
    print("| method | matvecs | seconds | max relative error | eigenvalues |")
    print("|---|---:|---:|---:|---|")
    for a in acc:
        vals = ", ".join(f"{v:.5g}" for v in a["values"])
        print(f"| {a['method']} | {a['matvecs']} | {a['seconds']:.2f} | {a['max_rel_error']:.2e} | {vals} |")
    path = args.out / "curvature_topk.csv"
    path.write_text(
        "method,matvecs,seconds,max_rel_error,values\n"
        + "".join(
            f"{a['method']},{a['matvecs']},{a['seconds']},{a['max_rel_error']},{' '.join(map(str, a['values']))}\n"
            for a in acc
        )
    )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
