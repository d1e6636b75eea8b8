"""A tiny GPT-2 (transformers) trained with AdamW by ``transformers.Trainer``, then ``diag report`` over its
checkpoints: Adam's edge of stability (preconditioned sharpness against 38/eta, Cohen et al. 2022),
token-pooled RankMe of each transformer block, and the Hessian trace.

Nothing is downloaded: the text is the Zen of Python (it ships with Python, module ``this``), the model is
built from a ``GPT2Config`` (character vocabulary, 2 blocks, width 16) with random initial weights. Needs
the [hf] extra: ``pip install -e '.[hf]'`` (``make`` installs it).

    python examples/tiny_gpt.py [--run-dir runs/tiny_gpt] [--out reports/tiny_gpt] [--steps 200] [--lr 3e-3]

It runs the two commands of the README section "Using diag with transformers / Lightning":

    diag report runs/tiny_gpt --data diagnostics.examples.tiny_gpt:zen_batches \\
        --analyzers sharpness,rankme,hessian --out reports/tiny_gpt \\
        --set sharpness.kind=worst --set sharpness.restarts=1 --set sharpness.max_iter=5 \\
        --set 'rankme.layers=["transformer.h.0","transformer.h.1"]' --set rankme.pool=mean \\
        --set hessian.trace=true --set hessian.trace_samples=40 --set hessian.trace_rtol=0.05
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPORT_SETTINGS = [
    "--analyzers",
    "sharpness,rankme,hessian",
    "--set",
    "sharpness.kind=worst",
    "--set",
    "sharpness.restarts=1",
    "--set",
    "sharpness.max_iter=5",
    "--set",
    'rankme.layers=["transformer.h.0","transformer.h.1"]',
    "--set",
    "rankme.pool=mean",
    "--set",
    "hessian.trace=true",
    "--set",
    "hessian.trace_samples=40",
    "--set",
    "hessian.trace_rtol=0.05",
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--run-dir", type=Path, default=Path("runs/tiny_gpt"))
    ap.add_argument("--out", type=Path, default=Path("reports/tiny_gpt"))
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--save-every", type=int, default=25)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--width", type=int, default=16)
    args = ap.parse_args(argv)
    if args.run_dir.exists() and any(args.run_dir.iterdir()):
        sys.exit(f"tiny_gpt: '{args.run_dir}' is not empty; choose another --run-dir")

    from diag_cli.main import app
    from diagnostics.examples.tiny_gpt import train_trainer

    t0 = time.perf_counter()
    print(f"training: AdamW lr={args.lr}, full batch, {args.steps} steps -> {args.run_dir}", file=sys.stderr)
    train_trainer(args.run_dir, lr=args.lr, steps=args.steps, save_every=args.save_every, n_embd=args.width)
    t1 = time.perf_counter()
    command = [
        "report",
        str(args.run_dir),
        "--data",
        "diagnostics.examples.tiny_gpt:zen_batches",
        *REPORT_SETTINGS,
        "--out",
        str(args.out),
    ]
    print("diag " + " ".join(command), file=sys.stderr)
    try:
        app(command)
    except SystemExit as exc:
        if exc.code not in (0, None):
            return int(exc.code) if isinstance(exc.code, int) else 1
    t2 = time.perf_counter()
    print(
        f"tiny_gpt: training {t1 - t0:.0f} s, report {t2 - t1:.0f} s; open {args.out / 'index.html'}", file=sys.stderr
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
