"""The README's demo: train a small MLP on scikit-learn's digits by full-batch gradient descent (MSE, step
size eta), save checkpoints along the way, analyse every checkpoint (Hessian spectrum, trace and density;
RankMe, neural collapse and a 1-d loss slice when those analyzers are installed) with a cached sweep, and
write the full report under ``reports/digits/``: ``index.html`` (self-contained), ``report.md``,
``figures/*.png`` and the tidy table ``records.parquet`` / ``records.csv``.

It reproduces the edge of stability (Cohen et al. 2021): the sharpness eigenvalue_0 rises until it
reaches 2/eta and then hovers there (``eos_ratio`` near 1).

    python examples/digits_demo.py [--out reports/digits] [--run-dir runs/digits] [--lr 2.0] [--steps 2000]

The same report from the shell: ``diag report runs/digits --out reports/digits``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from diagnostics.analyzers.registry import all_analyzers
from diagnostics.examples.digits import train_gd
from diagnostics.report import report_from_sweep
from diagnostics.results import Result, frame_to_records, write_result
from diagnostics.runs import CACHE_DIR, SweepResult, SweepSettings, prepare_out_dir, sweep, write_report, write_sweep

MARKER = ".diag-demo-run"


def prepare_run_dir(run_dir: Path) -> None:
    """The run folder is the demo's own: refuse to reuse a non-empty folder the demo did not create."""
    if run_dir.exists() and any(run_dir.iterdir()) and not (run_dir / MARKER).exists():
        sys.exit(f"digits_demo: '{run_dir}' holds files the demo did not write; choose another --run-dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    for old in run_dir.glob("step_*.pt"):
        old.unlink()
    (run_dir / MARKER).write_text("checkpoints written by examples/digits_demo.py\n")


# What the report shows for every checkpoint; analyzers that are not installed are left out.
DEMO_OPTIONS = {
    "hessian": {
        "top_k": 3,
        "bottom_k": 1,
        "trace": True,
        "trace_rtol": 0.02,
        "trace_samples": 100,
        "density": True,
        "density_probes": 3,
        "density_steps": 40,
    },
    "rankme": {},
    "collapse": {},
    "landscape": {"dims": 1, "steps": 21, "span": 0.5},
}


def analyse(run_dir: Path, out: Path) -> SweepResult:
    """Every checkpoint of the run through the analyzers of :data:`DEMO_OPTIONS`, cached under ``out``."""
    available = all_analyzers()
    names = [name for name in DEMO_OPTIONS if name in available]
    missing = [name for name in DEMO_OPTIONS if name not in available]
    if missing:
        print(f"digits_demo: analyzers not installed, left out of the report: {', '.join(missing)}", file=sys.stderr)
    settings = SweepSettings(analyzers=names, options={n: DEMO_OPTIONS[n] for n in names}, seed=0)

    def log(line: str) -> None:
        print(f"  {line}", file=sys.stderr, flush=True)

    return sweep(run_dir, settings, cache_dir=out / CACHE_DIR, exclude=[out], log=log)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("reports/digits"))
    ap.add_argument("--run-dir", type=Path, default=Path("runs/digits"))
    ap.add_argument("--lr", type=float, default=2.0)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--save-every", type=int, default=100)
    ap.add_argument("--width", type=int, default=32)
    args = ap.parse_args(argv)

    prepare_run_dir(args.run_dir)
    prepare_out_dir(args.out, protected=[args.run_dir])
    print(f"training: full-batch GD, MSE, lr={args.lr}, {args.steps} steps -> {args.run_dir}", file=sys.stderr)
    paths = train_gd(args.run_dir, lr=args.lr, steps=args.steps, save_every=args.save_every, width=args.width)
    print(f"analysing {len(paths)} checkpoints (cached in {args.out / CACHE_DIR})", file=sys.stderr)
    swept = analyse(args.run_dir, args.out)
    write_sweep(args.out, swept)
    hessian = swept.frame[swept.frame["analyzer"] == "hessian"]
    result = Result(
        frame_to_records(hessian),
        {"demo": "digits full-batch GD", **swept.metadata()},
    )
    write_result(result, args.out / "hessian.csv")
    write_result(result, args.out / "hessian.json")
    report = report_from_sweep(swept, title=f"Digits: full-batch GD at lr={args.lr} (edge of stability)")
    written = write_report(args.out, report)
    df = hessian
    wide = df[(df.metric.isin(["eigenvalue", "eos_ratio"])) & (df["index"].fillna(0) == 0)].pivot_table(
        index="step", columns="metric", values="value"
    )
    print(f"\nedge of stability: 2/lr = {2 / args.lr:.4g}")
    print(wide.to_string(float_format=lambda v: f"{v:.4f}"))
    late = wide[wide.index >= args.steps // 2]["eos_ratio"]
    print(f"\nmean eos_ratio over steps >= {args.steps // 2}: {late.mean():.3f} (edge of stability = 1)")
    pd.DataFrame(wide).to_csv(args.out / "sharpness_by_step.csv")
    print(f"results: {args.out / 'hessian.csv'}, {args.out / 'hessian.json'}", file=sys.stderr)
    print(f"report: {written['index.html']} ({len(report.figures)} figures), {written['report.md']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
