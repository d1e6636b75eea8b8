"""``--compile``: Hessian-vector-product cost over gradient cost, eager against ``torch.compile``.

Usage::

    python benchmarks/bench_compile.py [--device cpu|cuda] [--repeats 7] [--threads 1] [--k 1 16]
                                       [--models mlp cnn transformer] [--out benchmarks/results]

For three pure ``torch.nn`` models on seeded random data (one batch, float32):

* ``mlp``: 256-512-512-10, tanh, 512 samples;
* ``cnn``: two 3x3 conv + ReLU + max-pool blocks (16, 32 channels) and a linear head, 128 images 3x32x32;
* ``transformer``: linear embedding of 16 tokens of 16 features + positions, two encoder layers
  (d_model 64, 4 heads, GELU, feed-forward 128), mean pooling, linear head, 64 sequences,

it times one full-batch gradient (``torch.func.grad`` of a ``functional_call``), eager and compiled,
and one HVP per vector through :class:`~diagnostics.linalg.operator.HessianOperator` for blocks of
``k`` vectors: eager with the default backend for one batch (``cached``: one backward pass through the
kept gradient graph), eager forward-over-reverse (``forward``), and compiled forward-over-reverse
(``forward`` with ``compile=True``, what ``--compile`` gives). Compilation happens in a warm-up call
outside the timings. Within each repeat the variants run one after another in a rotating order
(alternating A/B), each ratio is formed inside its repeat, and the table shows the median over repeats,
so slow drifts of a shared machine cancel. Prints a Markdown table and writes a CSV.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call

from diagnostics.linalg.operator import HessianOperator


class TinyTransformer(nn.Module):
    """16 tokens of 16 features: linear embedding + positions, encoder layers, mean pooling, head."""

    def __init__(self, d_model: int = 64, heads: int = 4, layers: int = 2, classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Linear(16, d_model)
        self.pos = nn.Parameter(0.02 * torch.randn(16, d_model))
        layer = nn.TransformerEncoderLayer(
            d_model, heads, dim_feedforward=2 * d_model, dropout=0.0, activation="gelu", batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x) + self.pos).mean(1))


def problems(names: list[str]) -> dict[str, tuple[nn.Module, torch.Tensor, torch.Tensor]]:
    """``{name: (model, inputs, labels)}``, seeded."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    builders: dict[str, Callable[[], tuple[nn.Module, torch.Tensor]]] = {
        "mlp": lambda: (
            nn.Sequential(nn.Linear(256, 512), nn.Tanh(), nn.Linear(512, 512), nn.Tanh(), nn.Linear(512, 10)),
            torch.randn(512, 256, generator=gen),
        ),
        "cnn": lambda: (
            nn.Sequential(
                nn.Conv2d(3, 16, 3, padding=1),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Conv2d(16, 32, 3, padding=1),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Flatten(),
                nn.Linear(32 * 8 * 8, 10),
            ),
            torch.randn(128, 3, 32, 32, generator=gen),
        ),
        "transformer": lambda: (TinyTransformer(), torch.randn(64, 16, 16, generator=gen)),
    }
    out = {}
    for name in names:
        model, X = builders[name]()
        out[name] = (model.eval(), X, torch.randint(0, 10, (X.shape[0],), generator=gen))
    return out


def _timed(fn: Callable[[], object], device: torch.device, inner: int) -> float:
    """Seconds per call of ``fn`` (mean of ``inner`` calls)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(inner):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / inner


def variants(model: nn.Module, X: torch.Tensor, y: torch.Tensor, k: int) -> dict[str, Callable[[], object]]:
    """The timed callables: gradients and products of ``k`` vectors (warmed up, so compiled)."""
    params = {n: p.detach() for n, p in model.named_parameters()}

    def batch_loss(p, b):
        return nn.functional.cross_entropy(functional_call(model, p, (b[0],)), b[1])

    def grad(p):
        return torch.func.grad(lambda q: batch_loss(q, (X, y)))(p)

    compiled_grad = torch.compile(grad)
    ops = {
        "hvp_cached": HessianOperator(batch_loss, params, [(X, y)], max_vectors=k, memory_check=False),
        "hvp_forward": HessianOperator(batch_loss, params, [(X, y)], backend="forward", max_vectors=k),
        "hvp_compiled": HessianOperator(batch_loss, params, [(X, y)], backend="forward", max_vectors=k, compile=True),
    }
    V = torch.randn(ops["hvp_cached"].dim, k, generator=torch.Generator().manual_seed(2)).to(X.device)
    fns: dict[str, Callable[[], object]] = {
        "grad": lambda: grad(params),
        "grad_compiled": lambda: compiled_grad(params),
    }
    fns.update({name: (lambda op=op: op.matmat(V)) for name, op in ops.items()})
    ref = ops["hvp_forward"].matmat(V)
    for fn in fns.values():  # warm-up: builds graphs, compiles
        fn()
    compiled = ops["hvp_compiled"].matmat(V)
    rel = float((compiled - ref).norm() / ref.norm())
    notes = ops["hvp_compiled"].notes
    print(f"#   k={k}: compiled vs eager product, relative difference {rel:.2e}; notes: {notes or 'none'}")
    return fns


def measure(name: str, problem, k: int, repeats: int, device: torch.device) -> dict:
    """Median over repeats of each variant's time and of the per-repeat HVP/gradient ratios."""
    model, X, y = problem
    model, X, y = model.to(device), X.to(device), y.to(device)
    t0 = time.perf_counter()
    fns = variants(model, X, y, k)
    setup = time.perf_counter() - t0
    first = _timed(fns["grad"], device, 1)
    inner = max(1, int(0.2 / max(first, 1e-6)))
    order = list(fns)
    times: dict[str, list[float]] = {v: [] for v in order}
    for r in range(repeats):
        rotation = order[r % len(order) :] + order[: r % len(order)]
        for v in rotation:
            times[v].append(_timed(fns[v], device, inner))
    row = {"model": name, "params": sum(p.numel() for p in model.parameters()), "k": k, "setup_s": setup}
    for v in order:
        row[f"{v}_ms"] = 1e3 * statistics.median(times[v]) / (k if v.startswith("hvp") else 1)
    for v in ("hvp_cached", "hvp_forward", "hvp_compiled"):
        ratios = [t / k / g for t, g in zip(times[v], times["grad"])]
        row[f"{v}_over_grad"] = statistics.median(ratios)
    ratios = [t / k / g for t, g in zip(times["hvp_compiled"], times["grad_compiled"])]
    row["hvp_compiled_over_grad_compiled"] = statistics.median(ratios)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--k", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn", "transformer"])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = []
    for name, problem in problems(args.models).items():
        for k in args.k:
            print(f"# {name}, k={k} ...", flush=True)
            rows.append(measure(name, problem, k, args.repeats, device))
    print(f"\nHVP time per vector / gradient time ({device.type}, {torch.get_num_threads()} thread(s), ", end="")
    print(f"torch {torch.__version__}, median over {args.repeats} alternating repeats):\n")
    print("| model | params | k | gradient ms (eager / compiled) | eager cached | eager forward | compiled forward |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['model']} | {r['params']:,} | {r['k']} | {r['grad_ms']:.2f} / {r['grad_compiled_ms']:.2f} | "
            f"{r['hvp_cached_over_grad']:.2f}x | {r['hvp_forward_over_grad']:.2f}x | "
            f"{r['hvp_compiled_over_grad']:.2f}x ({r['hvp_compiled_over_grad_compiled']:.2f}x compiled grad) |"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"compile_ratios_{device.type}.csv"
    keys = list(rows[0])
    path.write_text("\n".join([",".join(keys)] + [",".join(str(r[k]) for k in keys) for r in rows]) + "\n")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
