"""Scale benchmarks: HVP cost over gradient cost per model, vmapped blocks, and 1 vs 2 processes.

Usage::

    python benchmarks/bench_scale.py ratios   [--device cpu|cuda] [--repeats 5] [--threads 1] [--out benchmarks/results]
    python benchmarks/bench_scale.py scaling  [--hvps 40] [--copies 8] [--out benchmarks/results]
    python benchmarks/bench_scale.py all

``ratios``: for a tanh MLP, a small CNN (BatchNorm in eval mode) and a small transformer encoder on
scikit-learn's digits (all 1,437 training images, one batch, float32), the median wall time of one
full-data gradient (``torch.func.grad`` of a ``functional_call``) and of one Hessian-vector product
per vector when ``k = 1, 4, 16`` vectors share one vmapped pass (forward-over-reverse), and of the
double-backward fallback. Prints a Markdown table, writes CSV and a PNG figure.

``scaling``: the same Lanczos run (top-5, a fixed number of HVPs) on the digits MLP with the data
replicated ``--copies`` times, on 1 process (1 and 2 intra-op threads) and on 2 gloo processes of
1 thread each (``torch.multiprocessing`` spawn, data sharded, products all-reduced). Reports wall
time per HVP, the speed-up and the largest eigenvalue difference.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call

from diagnostics.examples.digits import build_cnn, build_mlp, train_data
from diagnostics.linalg.data import DataLoop
from diagnostics.linalg.lanczos import lanczos
from diagnostics.linalg.operator import HessianOperator


class DigitsTransformer(nn.Module):
    """Each 8x8 digit as 8 tokens (rows) of 8 pixels: linear embedding + position, 2 encoder layers
    (d_model 32, 4 heads, GELU), mean pooling, linear head."""

    def __init__(self, d_model: int = 32, heads: int = 4, layers: int = 2, classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Linear(8, d_model)
        self.pos = nn.Parameter(torch.zeros(8, d_model))
        layer = nn.TransformerEncoderLayer(
            d_model, heads, dim_feedforward=2 * d_model, dropout=0.0, activation="gelu", batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x.reshape(-1, 8, 8)) + self.pos
        return self.head(self.encoder(tokens).mean(1))


def models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {
        "mlp (64-64-64-10, tanh)": build_mlp(width=64, depth=2),
        "cnn (2 conv + BN)": build_cnn(channels=8),
        "transformer (2 layers, d=32)": DigitsTransformer(),
    }


def _median_time(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def ratios(device: torch.device, repeats: int, out: Path) -> list[dict]:
    X, y = train_data()
    X, y = X.to(device), y.to(device)
    rows = []
    for name, model in models().items():
        model = model.to(device).eval()
        params = {k: v.detach() for k, v in model.named_parameters()}
        buffers = dict(model.named_buffers())

        def batch_loss(p, b, model=model, buffers=buffers):
            return nn.functional.cross_entropy(functional_call(model, {**buffers, **p}, (b[0],)), b[1])

        grad = torch.func.grad(lambda p: batch_loss(p, (X, y)))
        t_grad = _median_time(lambda grad=grad, params=params: grad(params), repeats, device)
        row = {"model": name, "params": sum(p.numel() for p in params.values()), "grad_ms": 1e3 * t_grad}
        for backend in ("forward", "reverse"):
            op = HessianOperator(batch_loss, params, [(X, y)], backend=backend, max_vectors=16, memory_check=False)
            for k in (1, 4, 16) if backend == "forward" else (1,):
                V = torch.randn(op.dim, k, device=device)
                try:
                    t = _median_time(lambda op=op, V=V: op.matmat(V), repeats, device) / k
                except (RuntimeError, NotImplementedError) as exc:
                    print(f"# {name}: {backend} k={k} failed: {str(exc).splitlines()[0]}", file=sys.stderr)
                    t = float("nan")
                key = f"hvp_{backend}_k{k}" if backend == "forward" else "hvp_double_backward"
                row[key + "_ms"] = 1e3 * t
                row[key + "_ratio"] = t / t_grad
        rows.append(row)
    _write(rows, out / f"hvp_ratios_{device.type}.csv")
    print(f"\nHVP time / gradient time ({device.type}, {torch.get_num_threads()} threads, median of {repeats}):\n")
    print("| model | params | gradient (ms) | HVP k=1 | HVP per vector, k=4 | k=16 | double backward |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['model']} | {r['params']:,} | {r['grad_ms']:.2f} | {r['hvp_forward_k1_ratio']:.2f}x | "
            f"{r['hvp_forward_k4_ratio']:.2f}x | {r['hvp_forward_k16_ratio']:.2f}x | "
            f"{r['hvp_double_backward_ratio']:.2f}x |"
        )
    _figure_ratios(rows, out / f"hvp_ratios_{device.type}.png", device.type)
    return rows


def _write(rows: list[dict], path: Path) -> None:
    import pandas as pd

    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(path, index=False)


def _figure_ratios(rows: list[dict], path: Path, device: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["k=1", "k=4", "k=16", "double bwd"]
    keys = ["hvp_forward_k1_ratio", "hvp_forward_k4_ratio", "hvp_forward_k16_ratio", "hvp_double_backward_ratio"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / len(rows)
    for i, r in enumerate(rows):
        ax.bar([j + i * width for j in range(len(keys))], [r[k] for k in keys], width, label=r["model"])
    ax.set_xticks([j + width * (len(rows) - 1) / 2 for j in range(len(keys))], labels)
    ax.set_ylabel("time per HVP / time per gradient")
    ax.set_title(f"Hessian-vector products on digits ({device}): cost per vector")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ------------------------------------------------------------------------------------ scaling
def _scaling_problem(copies: int):
    torch.manual_seed(0)
    model = build_mlp(width=64, depth=2).eval()
    X, y = train_data()
    X, y = X.repeat(copies, 1), y.repeat(copies)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def batch_loss(p, b):
        return nn.functional.cross_entropy(functional_call(model, p, (b[0],)), b[1])

    batches = [(X[i : i + 1024], y[i : i + 1024]) for i in range(0, len(y), 1024)]
    return batch_loss, params, batches


def _timed_lanczos(op: HessianOperator, hvps: int) -> tuple[float, torch.Tensor]:
    op.matvec(torch.ones(op.dim))  # warm-up (and the memory check) outside the timing
    t = time.perf_counter()
    res = lanczos(op, k_top=5, tol=1e-30, max_iter=hvps, generator=torch.Generator().manual_seed(0))
    return time.perf_counter() - t, res.eigenvalues


def _scaling_worker(rank: int, size: int, port: int, hvps: int, copies: int, folder: str) -> None:
    from diagnostics import distributed as D

    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(size), "MASTER_ADDR": "127.0.0.1"})
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    D.init_from_env()
    batch_loss, params, batches = _scaling_problem(copies)
    shard = D.shard_data(batches)
    op = HessianOperator(batch_loss, params, DataLoop(shard.batches, shard.weights, reduce=D.all_reduce_sum))
    D.barrier()
    seconds, ev = _timed_lanczos(op, hvps)
    torch.save({"seconds": seconds, "eigenvalues": ev}, Path(folder) / f"rank{rank}.pt")
    D.shutdown()


def scaling(hvps: int, copies: int, out: Path) -> list[dict]:
    import tempfile

    import torch.multiprocessing as mp

    rows = []
    batch_loss, params, batches = _scaling_problem(copies)
    n = sum(len(b[1]) for b in batches)
    reference = None
    for threads in (1, 2):
        torch.set_num_threads(threads)
        op = HessianOperator(batch_loss, params, batches)
        seconds, ev = _timed_lanczos(op, hvps)
        reference = ev if reference is None else reference
        rows.append({"setup": f"1 process x {threads} thread(s)", "seconds": seconds, "eigenvalues": ev})
    with tempfile.TemporaryDirectory() as folder:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.start_processes(
            _scaling_worker, args=(2, port, hvps, copies, folder), nprocs=2, join=True, start_method="spawn"
        )
        r0 = torch.load(Path(folder) / "rank0.pt")
        r1 = torch.load(Path(folder) / "rank1.pt")
    rows.append(
        {
            "setup": "2 processes (gloo) x 1 thread",
            "seconds": max(r0["seconds"], r1["seconds"]),
            "eigenvalues": r0["eigenvalues"],
        }
    )
    base = rows[0]["seconds"]
    print(
        f"\nLanczos top-5, {hvps} HVPs, digits MLP ({sum(p.numel() for p in params.values()):,} params), {n:,} samples:\n"
    )
    print("| setup | wall time (s) | per HVP (ms) | speed-up vs 1x1 | max rel. eigenvalue difference |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        diff = float(((r["eigenvalues"] - reference).abs() / reference.abs()).max())
        r.update(per_hvp_ms=1e3 * r["seconds"] / hvps, speedup=base / r["seconds"], max_rel_diff=diff)
        print(f"| {r['setup']} | {r['seconds']:.2f} | {r['per_hvp_ms']:.1f} | {r['speedup']:.2f}x | {diff:.1e} |")
    _write([{k: v for k, v in r.items() if k != "eigenvalues"} for r in rows], out / "scaling_cpu.csv")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["ratios", "scaling", "all"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads for ratios")
    parser.add_argument("--hvps", type=int, default=40)
    parser.add_argument("--copies", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    if args.what in ("ratios", "all"):
        torch.set_num_threads(args.threads)
        ratios(torch.device(args.device), args.repeats, args.out)
    if args.what in ("scaling", "all"):
        scaling(args.hvps, args.copies, args.out)


if __name__ == "__main__":
    main()
