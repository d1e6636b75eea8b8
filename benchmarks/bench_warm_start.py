"""HVPs of a ``diag run``-style hessian sweep, cold against ``--warm-start`` (issue 13).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_warm_start.py [--steps 600] [--every 100] [--top-k 1 5]
        [--width 32] [--samples 600]

Trains full-batch GD on digits (MSE, lr 2.0, ``diagnostics.examples.digits.train_gd``), saving a checkpoint
every ``--every`` steps, then sweeps ``hessian`` over the checkpoints twice (cold; warm: each checkpoint's
Lanczos starts from the previous one's eigenvectors) and prints the HVPs per checkpoint and in total, and the
largest difference of the eigenvalues relative to their bounds (must be <= 1: the same answers).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from diagnostics.examples.digits import train_gd
from diagnostics.runs import SweepSettings, sweep


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--top-k", type=int, nargs="+", default=[1, 5])
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--samples", type=int, default=600)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(tempfile.mkdtemp(prefix="warm_"))
    train_gd(out, lr=2.0, steps=args.steps, save_every=args.every, width=args.width)
    for k in args.top_k:
        runs = {}
        for warm in (False, True):
            st = SweepSettings(
                analyzers=["hessian"], options={"hessian": {"top_k": k, "warm_start": warm}}, samples=args.samples
            )
            runs[warm] = sweep(out, st)
        names = sorted({n for n, _ in runs[False].results})
        total = {False: 0, True: 0}
        worst = 0.0
        print(f"top_k={k}")
        for n in names:
            c, w = runs[False].results[(n, "hessian")], runs[True].results[(n, "hessian")]
            hc, hw = c.metadata["hvp_count"], w.metadata["hvp_count"]
            total[False] += hc
            total[True] += hw
            for a, b in zip(
                [r for r in c.records if r.metric == "eigenvalue"], [r for r in w.records if r.metric == "eigenvalue"]
            ):
                worst = max(worst, abs(a.value - b.value) / max(a.stderr + b.stderr, 1e-300))
            print(f"  {n}: cold {hc} HVPs, warm {hw} HVPs ({w.metadata['model']['lanczos']['warm_start'] or 'cold'})")
        saving = 1 - total[True] / total[False]
        print(
            f"  total: cold {total[False]}, warm {total[True]} ({100 * saving:+.1f}% saved); "
            f"max |cold - warm| / (bound_cold + bound_warm) = {worst:.3f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
