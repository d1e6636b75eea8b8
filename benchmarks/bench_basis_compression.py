"""The basis compression before each restart check, against the same Lanczos without it, on the stress zoo.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_basis_compression.py [--seeds 5] [--tols 1e-2 1e-4] [--ks 1 5 10]

Before a restart check :func:`diagnostics.linalg.lanczos.lanczos` replaces the multiplied rows of its basis by
the Ritz vectors the certificate and the check need (a thick restart), so the check's rows reuse their memory.
This runs every operator of ``benchmarks/bench_lanczos_stress.py`` (float64, known spectra) both ways, on the
same start vectors, and prints per case: runs, how many products (HVPs) differ, the peak basis rows of each
(``LanczosResult.basis_rows``), the largest eigenvalue difference relative to ``||A||`` and, for each way, the
tolerance and bound violations against the exact eigenvalues. Without compression means
``_Run.compress`` replaced by the identity.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_lanczos_stress import violations, zoo

from diagnostics.linalg import DenseOperator, lanczos
from diagnostics.linalg.lanczos import _Run


def run(A: torch.Tensor, k: int, tol: float, seed: int, compress: bool):
    keep = _Run.compress
    if not compress:
        _Run.compress = lambda self, cert, steps: cert  # type: ignore[method-assign]
    try:
        return lanczos(DenseOperator(A), k_top=k, tol=tol, generator=torch.Generator().manual_seed(seed))
    finally:
        _Run.compress = keep  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--tols", type=float, nargs="+", default=[1e-2, 1e-4])
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 5, 10])
    args = ap.parse_args(argv)
    print(f"{'case':<14}{'runs':>5}{'HVPs differ':>12}{'HVPs with':>10}{'without':>9}{'rows with':>10}{'without':>9}"
          f"{'max |dtheta|/|A|':>18}{'viol. with':>11}{'without':>9}")  # fmt: skip
    totals = np.zeros(8)
    for name, A in zoo().items():
        exact_all = np.sort(np.linalg.eigvalsh(A))[::-1]
        norm = float(np.abs(exact_all).max())
        At = torch.from_numpy(A)
        runs = differ = 0
        rows_with, rows_without, dtheta, viol_with, viol_without = [], [], 0.0, 0, 0
        hvps_with, hvps_without = [], []
        for tol in args.tols:
            for k in args.ks:
                if k >= A.shape[0]:
                    continue
                for seed in range(args.seeds):
                    a, b = run(At, k, tol, seed, True), run(At, k, tol, seed, False)
                    runs += 1
                    differ += a.iterations != b.iterations
                    hvps_with.append(a.iterations)
                    hvps_without.append(b.iterations)
                    rows_with.append(a.basis_rows)
                    rows_without.append(b.basis_rows)
                    dtheta = max(dtheta, float((a.eigenvalues - b.eigenvalues).abs().max()) / norm)
                    for res, acc in ((a, "with"), (b, "without")):
                        bad = violations(res.eigenvalues.numpy(), exact_all[:k], tol, norm, res.error_bounds.numpy())
                        if acc == "with":
                            viol_with += bad[0] + bad[1]
                        else:
                            viol_without += bad[0] + bad[1]
        print(f"{name:<14}{runs:>5}{differ:>12}{np.mean(hvps_with):>10.1f}{np.mean(hvps_without):>9.1f}"
              f"{np.mean(rows_with):>10.1f}{np.mean(rows_without):>9.1f}"
              f"{dtheta:>18.2e}{viol_with:>11}{viol_without:>9}", flush=True)  # fmt: skip
        totals += [runs, differ, np.sum(hvps_with), np.sum(hvps_without), np.sum(rows_with), np.sum(rows_without),
                   viol_with, viol_without]  # fmt: skip
    runs, differ, hw, hwo, rw, rwo, vw, vwo = totals
    print(f"all: {int(runs)} runs, HVP counts differ in {int(differ)} ({int(hw)} HVPs in all with compression, "
          f"{int(hwo)} without), mean peak rows {rw / runs:.1f} with against {rwo / runs:.1f} without, "
          f"violations {int(vw)} with and {int(vwo)} without")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
