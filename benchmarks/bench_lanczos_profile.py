"""Where Lanczos time goes on the 1.13M-parameter digits MLP (issue 13): HVPs against everything else.

The model is ``bench_process.py``'s (64-1024-1024-10, tanh; 1,126,410 parameters, briefly trained) over all 1,797
digits, float32, cross-entropy; ``diag hessian``'s operator (``hessian_operator``, default backend) and
:func:`~diagnostics.linalg.lanczos.lanczos` for the top-5 eigenvalues at tol 1e-3. The operator's ``matmat`` is
timed (wall clock around each call); the rest of the Lanczos run is reorthogonalisation, the certificates (small
dense eigenproblems) and bookkeeping. Repeated ``--repeats`` times with fresh seeds; medians printed.

Then one HVP on its own, alternated: diag's cached-graph product (:class:`~diagnostics.linalg.products.CachedGraph`)
against PyHessian's (``torch.autograd.grad(grads, params, grad_outputs=v, retain_graph=True)`` on the same kind of
kept graph), one gradient, and one lone ``1797 x 1024 @ 1024 x 1024`` matrix product with its GFLOP/s (an HVP
here has six of them).

    OMP_NUM_THREADS=1 python benchmarks/bench_lanczos_profile.py [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from bench_process import issue_model

from diagnostics.binding import LOSSES
from diagnostics.context import Context
from diagnostics.linalg.lanczos import lanczos
from diagnostics.operators import hessian_operator


def model_and_data() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """``bench_process.py``'s model (:func:`bench_process.issue_model`) and all 1,797 digits scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    X = torch.tensor(d.data / 16.0, dtype=torch.float32)
    y = torch.tensor(d.target)
    return issue_model(X, y), X, y


def profile_once(ctx: Context, seed: int) -> tuple[float, float, int]:
    """One top-5 Lanczos run -> (total seconds, seconds inside the operator's products, HVPs)."""
    op = hessian_operator(ctx)
    inner = op.matmat
    spent = [0.0]

    def timed(V: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        out = inner(V)
        spent[0] += time.perf_counter() - t0
        return out

    op.matmat = timed  # type: ignore[method-assign]
    t0 = time.perf_counter()
    lanczos(op, k_top=5, tol=1e-3, generator=torch.Generator().manual_seed(seed))
    return time.perf_counter() - t0, spent[0], op.hvp_count


def per_product(ctx: Context, model: torch.nn.Module, X: torch.Tensor, y: torch.Tensor, repeats: int) -> None:
    """Median ms of one HVP (diag's cached graph, PyHessian's ``grad_outputs`` product), a gradient and a lone
    matrix product of the big layer's shape, alternated ``repeats`` times over 5 calls each."""
    from diagnostics.linalg.products import CachedGraph

    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    V = torch.randn(n, 1, generator=torch.Generator().manual_seed(0))
    vs = [c.reshape(p.shape) for c, p in zip(torch.split(V[:, 0], [p.numel() for p in params]), params)]
    kept = torch.autograd.grad(torch.nn.functional.cross_entropy(model(X), y), params, create_graph=True)
    cached, batch = CachedGraph(), ctx.batches[0]
    A, B = torch.randn(X.shape[0], 1024), torch.randn(1024, 1024)
    cases = {
        "diag HVP (cached graph)": lambda: cached(ctx.batch_loss, ctx.params, batch, V),
        "PyHessian HVP (grad_outputs)": lambda: torch.autograd.grad(kept, params, grad_outputs=vs, retain_graph=True),
        "gradient": lambda: torch.autograd.grad(torch.nn.functional.cross_entropy(model(X), y), params),
        "lone mm 1797x1024x1024": lambda: torch.mm(A, B),
    }
    times: dict[str, list[float]] = {k: [] for k in cases}
    for fn in cases.values():
        fn()  # build the graphs, warm the caches
    for _ in range(repeats):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            for _ in range(5):
                fn()
            times[name].append((time.perf_counter() - t0) / 5)
    for name, ts in times.items():
        ms = 1e3 * statistics.median(ts)
        extra = f"  ({2 * X.shape[0] * 1024 * 1024 / (ms / 1e3) / 1e9:.0f} GFLOP/s)" if name.startswith("lone") else ""
        print(f"  {name:<30} {ms:7.1f} ms{extra}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, X, y = model_and_data()
    ctx = Context(
        model=model,
        params={n: p.detach() for n, p in model.named_parameters()},
        frozen={},
        batches=[(X, y)],
        loss_fn=LOSSES["cross_entropy"],
        device=torch.device("cpu"),
        dtype=torch.float32,
        loss_name="cross_entropy",
    )
    print(f"{ctx.n_params:,} parameters, {ctx.n_samples} samples, {torch.get_num_threads()} thread(s)")
    rows = [profile_once(ctx, seed) for seed in range(args.repeats)]
    for total, hvp, n in rows:
        print(f"  total {total:7.2f} s   in HVPs {hvp:7.2f} s ({100 * hvp / total:5.1f}%)   {n} HVPs")
    share = statistics.median(h / t for t, h, _ in rows)
    print(f"median share of Lanczos time in HVPs: {100 * share:.1f}%")
    print("one product at a time (medians):")
    per_product(ctx, model, X, y, max(args.repeats, 3))


if __name__ == "__main__":
    main()
