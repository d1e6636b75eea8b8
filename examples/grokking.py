"""Grokking on modular addition, measured from checkpoints.

Trains the small MLP of :mod:`diagnostics.examples.grokking` on ``(a + b) mod p`` (p = 59, 40% of the pairs)
with full-batch AdamW and weight decay until the validation accuracy jumps, saving a checkpoint every
``--save-every`` steps with the training/validation accuracy and loss in its metadata. Then every checkpoint
goes through ``dynamics`` (softmax collapse, gradient-weight cosine, weight norm, distance from the first
checkpoint, dormant units, label alignment) and ``hessian`` (top eigenvalue) in a cached sweep, and the report
is written under ``reports/grokking/`` (``index.html``, ``report.md``, ``figures/*.png``, ``records.*``).

    python examples/grokking.py [--out reports/grokking] [--run-dir runs/grokking] [--steps 2500] [--weight-decay 1]

The same report from the shell, once the checkpoints exist:
``diag report runs/grokking --analyzers dynamics,hessian --out reports/grokking``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from diagnostics.examples.grokking import train
from diagnostics.report import report_from_sweep
from diagnostics.runs import CACHE_DIR, SweepResult, SweepSettings, prepare_out_dir, sweep, write_report, write_sweep

MARKER = ".diag-grokking-run"
OPTIONS = {"dynamics": {}, "hessian": {"top_k": 1, "tol": 1e-2}}


def prepare_run_dir(run_dir: Path) -> None:
    """The run folder is the example's own: refuse a non-empty folder it did not create."""
    if run_dir.exists() and any(run_dir.iterdir()) and not (run_dir / MARKER).exists():
        sys.exit(f"grokking: '{run_dir}' holds files this example did not write; choose another --run-dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    for old in run_dir.glob("step_*.pt"):
        old.unlink()
    (run_dir / MARKER).write_text("checkpoints written by examples/grokking.py\n")


def analyse(run_dir: Path, out: Path) -> SweepResult:
    """Every checkpoint through dynamics and hessian, cached under ``out``; the checkpoints are our own."""
    settings = SweepSettings(analyzers=list(OPTIONS), options=OPTIONS, seed=0)
    return sweep(run_dir, settings, cache_dir=out / CACHE_DIR, exclude=[out], log=lambda line: print(f"  {line}"))


def summary(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per step: the logged accuracies and the measured quantities of the README."""
    whole = frame[frame["group"].isna() | (frame["group"] == "float32")]
    whole = whole[(whole["index"].isna()) | (whole["index"] == 0)]
    wide = whole.pivot_table(index="step", columns="metric", values="value")
    cols = [
        "train_accuracy",
        "val_accuracy",
        "train_loss",
        "weight_norm",
        "softmax_collapse_fraction",
        "gradient_weight_cosine",
        "distance_from_init",
        "eigenvalue",
    ]
    return wide[[c for c in cols if c in wide]]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("reports/grokking"))
    ap.add_argument("--run-dir", type=Path, default=Path("runs/grokking"))
    ap.add_argument("--steps", type=int, default=2500)
    ap.add_argument("--save-every", type=int, default=100)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--weight-decay", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the model is tiny: one is as fast)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)  # a second thread only waits on a small model, and a busy machine

    prepare_run_dir(args.run_dir)
    prepare_out_dir(args.out, protected=[args.run_dir])
    t0 = time.perf_counter()
    print(f"training: (a + b) mod 59, AdamW lr={args.lr} weight decay={args.weight_decay}, {args.steps} steps")
    paths = train(
        args.run_dir,
        steps=args.steps,
        save_every=args.save_every,
        lr=args.lr,
        weight_decay=args.weight_decay,
        log=lambda line: print(f"  {line}", flush=True),
    )
    t_train = time.perf_counter() - t0
    print(f"analysing {len(paths)} checkpoints (cached in {args.out / CACHE_DIR})")
    swept = analyse(args.run_dir, args.out)
    write_sweep(args.out, swept)
    report = report_from_sweep(swept, title="Grokking: (a + b) mod 59, MLP, AdamW with weight decay")
    written = write_report(args.out, report)
    t_all = time.perf_counter() - t0

    table = summary(swept.frame)
    print(table.to_string(float_format=lambda v: f"{v:.4g}"))
    table.to_csv(args.out / "grokking_by_step.csv")
    val = table["val_accuracy"]
    fitted = table.index[table["train_accuracy"] >= 0.99]
    jumped = table.index[val >= 0.9]
    if len(fitted):
        print(f"\ntraining accuracy >= 0.99 from step {fitted[0]}")
    if len(jumped):
        before = table.index[(table.index < jumped[0]) & (val < 0.1)]
        print(
            f"validation accuracy >= 0.9 from step {jumped[0]} (last step below 0.1: {before[-1] if len(before) else '-'})"
        )
    else:
        print("validation accuracy never reached 0.9: train longer (--steps)")
    print(f"time: {t_train:.0f} s training, {t_all - t_train:.0f} s analysis and report, {t_all:.0f} s in all")
    print(f"report: {written['index.html']} ({len(report.figures)} figures), {written['report.md']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
