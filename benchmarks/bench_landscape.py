"""Benchmark: a 41x41 loss-landscape grid on digits, batched (vmap over stacked parameters) vs a loop.

Both paths evaluate the same filter-normalised random plane around a trained digits model on the full
training split (1,437 samples), through :func:`diagnostics.analyzers.landscape.analyze_landscape`: once
with ``backend="vmap"`` (``chunk`` grid points per pass) and once with ``backend="loop"`` (one point at a
time, a ``functional_call`` per point, as the usual landscape scripts do). Prints seconds, points per
second, the ratio and the largest difference between the two grids.

    .venv/bin/python benchmarks/bench_landscape.py [--model mlp|cnn] [--steps 41] [--chunk 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from diagnostics.analyzers.landscape import LandscapeConfig, analyze_landscape
from diagnostics.binding import LOSSES
from diagnostics.context import Context
from diagnostics.examples import digits
from diagnostics.examples.digits import build_cnn, train_data


def trained_mlp(width: int) -> torch.nn.Module:
    return digits.trained_mlp(width=width, steps=300)


def trained_cnn(channels: int, steps: int = 100) -> torch.nn.Module:
    model = build_cnn(channels=channels)
    X, y = train_data(image=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
    return model.eval()


def context(model: torch.nn.Module, image: bool) -> Context:
    X, y = train_data(image=image)
    return Context(
        model=model,
        params={n: p.detach() for n, p in model.named_parameters()},
        frozen=dict(model.named_buffers()),
        batches=[(X, y)],
        loss_fn=LOSSES["cross_entropy"],
        device=torch.device("cpu"),
        dtype=torch.float32,
        loss_name="cross_entropy",
    )


def timed(cfg: LandscapeConfig, ctx: Context, repeats: int) -> tuple[float, list[float], np.ndarray, str]:
    times, grid, backend = [], None, ""
    for _ in range(repeats):
        t0 = time.perf_counter()
        res = analyze_landscape(cfg, ctx)
        times.append(time.perf_counter() - t0)
        grid = res.artifacts["grid"]["loss"].to_numpy()
        backend = res.metadata["evaluation"]["backend"]
    return statistics.median(times), times, grid, backend


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["mlp", "cnn"], default="mlp")
    ap.add_argument("--width", type=int, default=32, help="MLP width / CNN channels")
    ap.add_argument("--steps", type=int, default=41)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model == "mlp":
        model, image = trained_mlp(args.width), False
    else:
        model, image = trained_cnn(max(args.width // 4, 4)), True
    ctx = context(model, image)
    n_params = sum(p.numel() for p in ctx.params.values())
    points = args.steps**2
    print(
        f"digits {args.model}: {n_params} parameters, {ctx.n_samples} samples, {args.steps}x{args.steps} grid "
        f"({points} points), torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    batched = LandscapeConfig(dims=2, steps=args.steps, span=1.0, chunk=args.chunk, backend="vmap")
    loop = LandscapeConfig(dims=2, steps=args.steps, span=1.0, backend="loop")
    analyze_landscape(LandscapeConfig(dims=2, steps=3, chunk=args.chunk), ctx)  # warm-up
    tb, all_b, grid_b, backend_b = timed(batched, ctx, args.repeats)
    tl, all_l, grid_l, backend_l = timed(loop, ctx, args.repeats)
    auto = LandscapeConfig(dims=2, steps=args.steps, span=1.0, chunk=args.chunk, backend="auto")
    ta, all_a, _, backend_a = timed(auto, ctx, args.repeats)
    diff = float(np.max(np.abs(grid_b - grid_l)))
    print(f"{'path':<28}{'median s':>10}{'points/s':>12}   runs")
    print(f"{'batched (vmap, chunk ' + str(args.chunk) + ')':<28}{tb:>10.2f}{points / tb:>12.0f}   "
          + ", ".join(f"{t:.2f}" for t in all_b))  # fmt: skip
    print(
        f"{'loop (one point at a time)':<28}{tl:>10.2f}{points / tl:>12.0f}   " + ", ".join(f"{t:.2f}" for t in all_l)
    )
    print(f"{'auto (-> ' + backend_a + ')':<28}{ta:>10.2f}{points / ta:>12.0f}   "
          + ", ".join(f"{t:.2f}" for t in all_a))  # fmt: skip
    print(
        f"speed-up of the batched path: {tl / tb:.2f}x   max |loss difference| = {diff:.2e}   ({backend_b} vs {backend_l})"
    )


if __name__ == "__main__":
    main()
