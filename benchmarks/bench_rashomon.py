"""Validation of the Rashomon ratio's estimators against exact volumes: coverage and relative error.

Usage::

    python benchmarks/bench_rashomon.py [--cases NAME ...] [--seeds 20] [--draws N] [--threads 1]
                                        [--out benchmarks/results/rashomon.csv] [--digits] [--list]

Problems (``u`` the perturbation, ``F`` a ball ``||u||_2 <= r`` or a box ``|u_i| <= r``, ``r = 1`` unless
stated): the loss ``L(u) = u^T H u / 2`` with Hessian eigenvalues ``lambda_i`` spread over ``[1, cond]``
(log-spaced; linear for the issue's case), axis-aligned or randomly rotated, and ``R = {u in F : L(u) <=
theta}``, an ellipsoid with semi-axes ``a_i = sqrt(2 theta / lambda_i)``. Exact ratios:

* ellipsoid inside the ball: ``prod_i a_i / r^d``; inside the box: ``V_d prod_i a_i / (2r)^d``
  (``V_d`` the unit-ball volume);
* ellipsoid crossing the ball: ``prod_i a_i / r^d`` times the fraction ``m`` of the ellipsoid inside the
  ball. A uniform point of the unit ``d``-ball is the first ``d`` coordinates of a uniform point of the
  ``(d+1)``-sphere in ``R^{d+2}`` (the Archimedes projection), so
  ``m = P(sum_{i<=d} (a_i^2 - r^2) g_i^2 - r^2 (g_{d+1}^2 + g_{d+2}^2) <= 0)`` for Gaussian ``g``: a
  Gaussian quadratic form, whose distribution function is one 1-d integral (Imhof 1961);
* axis-aligned ellipsoid crossing the box: ``P(sum_i lambda_i x_i^2 <= 2 theta)`` for ``x`` uniform in the
  box; its Laplace transform in ``t = 2 theta`` is ``(1/s) prod_i sqrt(pi) erf(r sqrt(s lambda_i)) /
  (2 r sqrt(s lambda_i))``, inverted by the Bromwich integral (de Hoog's method in mpmath, 50 digits)
  - exact in the sense of a converged 1-d integral; checked against the closed form where the ellipsoid
  is inside the box and against 10^6-draw Monte Carlo where the ratio allows (``--check``).

For every case and seed the estimator (``diagnostics.analyzers.rashomon.estimate_ratio`` with the
package defaults unless the case says otherwise: ``method=auto``, 100,000 draws per level, 10 subset runs)
runs on the quadratic directly (no network), and the table gives the coverage of the reported 95%
interval, the root-mean-square and median relative error ``|p_hat/p - 1|``, the loss evaluations and the
seconds per run. ``--digits`` adds two trained digits networks (ball and filter geometries) through the
analyzer, comparing plain Monte Carlo and subset simulation where both apply, and the issue's ellipsoid
through the analyzer (a 20-parameter quadratic model).
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from scipy import integrate
from scipy.special import gammaln

from diagnostics.analyzers.rashomon import RashomonConfig, estimate_ratio, subset_notes

LN10 = math.log(10.0)


# ------------------------------------------------------------------------------------ references
def log_unit_ball(d: int) -> float:
    return 0.5 * d * math.log(math.pi) - float(gammaln(d / 2 + 1))


def ball_fraction(semi_axes_sq: np.ndarray, r: float) -> float:
    """Fraction of the ellipsoid with squared semi-axes ``a_i^2`` inside the ball of radius ``r`` (Imhof 1961).

    ``P(Q <= 0)``, ``Q = sum_k w_k g_k^2`` with ``w = (a_1^2 - r^2, ..., a_d^2 - r^2, -r^2, -r^2)``;
    ``P(Q > 0) = 1/2 + (1/pi) int_0^inf sin(th(u)) / (u rho(u)) du``, ``th = sum_k atan(w_k u) / 2``,
    ``rho = prod_k (1 + w_k^2 u^2)^(1/4)``.
    """
    r2 = r * r
    w = np.concatenate([np.asarray(semi_axes_sq, dtype=np.float64) - r2, [-r2, -r2]])

    def f(u: float) -> float:
        th = 0.5 * float(np.arctan(w * u).sum())
        log_rho = 0.25 * float(np.log1p((w * u) ** 2).sum())
        return math.sin(th) * math.exp(-log_rho) / u

    val, _ = integrate.quad(f, 0, np.inf, limit=4000, epsabs=1e-14, epsrel=1e-11)
    return 0.5 - val / math.pi


def box_log_ratio(lam: np.ndarray, r: float, t: float, dps: int = 50) -> float:
    """``log P(sum_i lambda_i x_i^2 <= t)``, ``x`` uniform in ``[-r, r]^d``, by inverting its Laplace transform."""
    import mpmath as mp

    mp.mp.dps = dps
    lams = [mp.mpf(float(x)) for x in lam]
    rr = mp.mpf(r)

    def transform(s):
        out = 1 / s
        for lv in lams:
            a = mp.sqrt(s * lv)
            out *= mp.sqrt(mp.pi) * mp.erf(rr * a) / (2 * rr * a)
        return out

    return float(mp.log(mp.invertlaplace(transform, mp.mpf(t), method="dehoog")))


# ----------------------------------------------------------------------------------------- cases
@dataclass(frozen=True)
class Case:
    """One validation problem.

    Attributes:
        name: short label.
        geometry: ``ball`` | ``box``.
        d: dimension; cond: ``lambda_max / lambda_min``; spacing: ``log`` | ``linear``.
        placement: ``inside`` (the ellipsoid inside F) | ``crossing``.
        target: for ``inside``: the log10 ratio (theta solved for it); for ``crossing``: the longest
            semi-axis over ``r`` (> 1).
        rotated: a random rotation of the eigenbasis (``inside`` and ball cases only).
        radius: ``r``; theta: a fixed theta (overrides ``target``).
        draws: draws per level (None: the package default).
    """

    name: str
    geometry: str
    d: int
    cond: float
    placement: str
    target: float
    rotated: bool = False
    spacing: str = "log"
    radius: float = 1.0
    theta: float | None = None
    draws: int | None = None


def eigenvalues(case: Case) -> np.ndarray:
    if case.d == 1 or case.cond == 1:
        return np.ones(case.d)
    if case.spacing == "linear":
        return np.linspace(1.0, case.cond, case.d)
    return np.logspace(0.0, math.log10(case.cond), case.d)


def theta_of(case: Case, lam: np.ndarray) -> float:
    """theta for the case: from the target log10 ratio (inside) or the longest semi-axis (crossing)."""
    if case.theta is not None:
        return case.theta
    r, d = case.radius, case.d
    if case.placement == "crossing":
        return 0.5 * float(lam.min()) * (case.target * r) ** 2
    base = d * math.log(r) if case.geometry == "ball" else d * math.log(2 * r) - log_unit_ball(d)
    # log ratio = sum_i (log(2 theta) - log lambda_i) / 2 - base
    log_2theta = (case.target * LN10 + base + 0.5 * float(np.log(lam).sum())) * 2 / d
    return 0.5 * math.exp(log_2theta)


def exact_log_ratio(case: Case, lam: np.ndarray, theta: float) -> float:
    """The exact natural-log ratio (see the module docstring)."""
    r, d = case.radius, case.d
    a2 = 2 * theta / lam
    log_e = 0.5 * float(np.log(a2).sum())
    if case.geometry == "ball":
        out = log_e - d * math.log(r)
        if float(a2.max()) > r * r:
            out += math.log(ball_fraction(a2, r))
        return out
    extent2 = a2 if not case.rotated else None
    if extent2 is not None and float(extent2.max()) <= r * r:
        return log_unit_ball(d) + log_e - d * math.log(2 * r)
    if case.rotated:
        raise ValueError(f"{case.name}: a rotated ellipsoid crossing a box has no reference here")
    coarse, fine = box_log_ratio(lam, r, 2 * theta, dps=30), box_log_ratio(lam, r, 2 * theta, dps=60)
    if abs(coarse - fine) > 1e-6:
        raise ValueError(f"{case.name}: the Laplace inversion did not converge ({coarse} vs {fine})")
    return fine


CASES = [
    # ellipsoids inside the ball (target = log10 ratio)
    Case("ball-2d-iso", "ball", 2, 1, "inside", -1),
    Case("ball-2d-c1e6", "ball", 2, 1e6, "inside", -10),
    Case("issue-20d-lin10", "ball", 20, 10, "inside", 0, spacing="linear", radius=0.2, theta=0.01),
    Case("ball-20d-c1e3-rot", "ball", 20, 1e3, "inside", -20, rotated=True),
    Case("ball-20d-c1e6", "ball", 20, 1e6, "inside", -31),
    Case("ball-100d-c1e2-rot", "ball", 100, 1e2, "inside", -60, rotated=True, draws=20000),
    Case("ball-20d-c1e2-1e100", "ball", 20, 1e2, "inside", -100),
    Case("ball-500d-iso-1e2", "ball", 500, 1, "inside", -2),
    Case("ball-500d-iso-1e5", "ball", 500, 1, "inside", -5, draws=20000),
    # ellipsoids crossing the ball (target = longest semi-axis / r)
    Case("cross-ball-5d-c1e2", "ball", 5, 1e2, "crossing", 3.0),
    Case("cross-ball-20d-c1e3-rot", "ball", 20, 1e3, "crossing", 3.0, rotated=True),
    Case("cross-ball-50d-c1e4", "ball", 50, 1e4, "crossing", 4.0),
    Case("cross-ball-200d-c1e2", "ball", 200, 1e2, "crossing", 2.5, draws=20000),
    # ellipsoids inside / crossing the box (axis-aligned)
    Case("box-20d-c10", "box", 20, 10, "inside", -14),
    Case("cross-box-10d-c1e2", "box", 10, 1e2, "crossing", 3.0),
    Case("cross-box-30d-c1e6", "box", 30, 1e6, "crossing", 5.0),
    Case("cross-box-100d-c1e2", "box", 100, 1e2, "crossing", 4.0, draws=20000),
]


# ------------------------------------------------------------------------------------ the runs
def quadratic(case: Case, lam: np.ndarray, seed: int = 1234):
    """``u -> u^T H u / 2`` as a batched torch function (diagonal, or ``Q diag Q^T`` when rotated)."""
    lam_t = torch.tensor(lam, dtype=torch.float64)
    if not case.rotated:
        return lambda U: 0.5 * (U * U * lam_t).sum(1)
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(case.d, case.d, generator=g, dtype=torch.float64))
    H = Q @ torch.diag(lam_t) @ Q.T
    return lambda U: 0.5 * ((U @ H) * U).sum(1)


@dataclass
class Row:
    case: str
    geometry: str
    d: int
    cond: float
    placement: str
    exact_log10: float
    draws: int
    seeds: int
    methods: str
    coverage: float
    rms_rel_err: float
    median_rel_err: float
    mean_abs_log10_err: float
    evaluations: float
    seconds: float
    notes: int


def run_case(case: Case, seeds: int, draws: int | None, first_seed: int = 0) -> Row:
    lam = eigenvalues(case)
    theta = theta_of(case, lam)
    exact = exact_log_ratio(case, lam, theta)
    loss = quadratic(case, lam)
    config = RashomonConfig(theta=theta, radius=case.radius, geometry=case.geometry)
    budget = draws or case.draws
    if budget:
        config = replace(config, draws=budget)
    covered, rel, abs_log, evals, secs, methods, flagged = [], [], [], [], [], [], 0
    for seed in range(first_seed, first_seed + seeds):
        gens = (
            torch.Generator().manual_seed(1_000_003 * seed + 51),
            torch.Generator().manual_seed(1_000_003 * seed + 52),
        )
        t0 = time.perf_counter()
        out = estimate_ratio(loss, case.d, case.radius, case.geometry, theta, config, gens)
        secs.append(time.perf_counter() - t0)
        est = out.estimate
        lo, hi = est.log10_interval
        truth10 = exact / LN10
        covered.append(math.isfinite(est.log10) and lo <= truth10 <= hi)  # no estimate (upper bound only): a miss
        err10 = est.log10 - truth10
        rel.append(math.expm1(err10 * LN10) if math.isfinite(err10) else math.inf)
        abs_log.append(abs(err10))
        evals.append(out.run.evaluations if out.run is not None else config.draws)
        methods.append(out.method)
        notes = subset_notes(out.run, est) if out.run is not None else []
        flagged += bool(notes)
        print(
            f"  {case.name} seed {seed}: log10 {est.log10:.4f} [{lo:.4f}, {hi:.4f}] exact {truth10:.4f} "
            f"covers {covered[-1]} rel.err {rel[-1]:+.3f} {secs[-1]:.1f} s"
            + "".join(f"\n    flagged: {note}" for note in notes),
            file=sys.stderr,
            flush=True,
        )
    return Row(
        case=case.name,
        geometry=case.geometry,
        d=case.d,
        cond=case.cond,
        placement=case.placement,
        exact_log10=exact / LN10,
        draws=config.draws,
        seeds=seeds,
        methods="/".join(sorted(set(methods))),
        coverage=float(np.mean(covered)),
        rms_rel_err=math.sqrt(float(np.mean(np.square(rel)))),
        median_rel_err=float(np.median(np.abs(rel))),
        mean_abs_log10_err=float(np.mean(abs_log)),
        evaluations=float(np.mean(evals)),
        seconds=float(np.mean(secs)),
        notes=flagged,
    )


def markdown(rows: list[Row]) -> str:
    head = (
        "| case | F | d | cond | R vs F | exact log10 ratio | draws/level | seeds | method | coverage of 95% interval "
        "| RMS rel. error | median rel. error | evaluations/run | s/run | runs flagged |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r.case} | {r.geometry} | {r.d} | {r.cond:g} | {r.placement} | {r.exact_log10:.3f} | {r.draws} | "
            f"{r.seeds} | {r.methods} | {100 * r.coverage:.0f}% | {100 * r.rms_rel_err:.1f}% | "
            f"{100 * r.median_rel_err:.1f}% | {r.evaluations:.3g} | {r.seconds:.1f} | {r.notes} |"
        )
    return "\n".join(lines)


def check_references() -> None:
    """Cross-check the exact references against closed forms and long Monte Carlo."""
    rng = np.random.default_rng(0)
    print("reference checks (exact vs closed form / 10^6-draw Monte Carlo):")
    for d, cond, t in ((10, 10.0, 0.05), (20, 1e3, 0.01)):
        lam = np.logspace(0, math.log10(cond), d)
        closed = log_unit_ball(d) + 0.5 * float(np.log(t / lam).sum()) - d * math.log(2)
        got = box_log_ratio(lam, 1.0, t)
        print(f"  box inside d={d}: Laplace inversion log10 {got / LN10:.10f}, closed form {closed / LN10:.10f}")
    for d, cond, t in ((5, 100.0, 1.0), (10, 100.0, 2.0), (3, 10.0, 4.0)):
        lam = np.logspace(0, math.log10(cond), d)
        x = rng.uniform(-1, 1, (1_000_000, d))
        p = float(((x * x * lam).sum(1) <= t).mean())
        got = math.exp(box_log_ratio(lam, 1.0, t))
        print(
            f"  box crossing d={d}: Laplace inversion {got:.6g}, Monte Carlo {p:.6g} +- {math.sqrt(p * (1 - p) / 1e6):.2g}"
        )
    for d, cond, top in ((5, 100.0, 3.0), (20, 1e3, 2.0), (50, 1e4, 1.5)):
        lam = np.logspace(0, math.log10(cond), d)
        a2 = (top**2) * lam.min() / lam
        g = rng.standard_normal((1_000_000, d))
        q = (g * g * a2).sum(1) / (g * g).sum(1)
        mc = np.minimum(1.0, (1.0 / q) ** (d / 2))
        print(
            f"  ball crossing d={d}: Imhof fraction {ball_fraction(a2, 1.0):.6g}, Monte Carlo "
            f"{mc.mean():.6g} +- {mc.std() / 1e3:.2g}"
        )


# ------------------------------------------------------------------------ networks, the analyzer
def issue_bowl_timing(seeds: int) -> list[str]:
    """The issue's 20-dim bowl through ``analyze_rashomon`` (PointEvaluator, default budget and chunk): time."""
    from torch import nn

    from diagnostics.analyzers.rashomon import analyze_rashomon
    from diagnostics.binding import LOSSES
    from diagnostics.context import Context

    lam = torch.linspace(1.0, 10.0, 20, dtype=torch.float64)

    class Bowl(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.zeros(20, dtype=torch.float64))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x @ self.w

    model = Bowl().eval()
    X = torch.diag(torch.sqrt(lam * 10))
    exact = 0.5 * float(np.log(0.02 / lam.numpy()).sum()) - 20 * math.log(0.2)
    lines = []
    for seed in range(seeds):
        ctx = Context(model=model, params={"w": model.w.detach()}, frozen={}, batches=[(X, torch.zeros(20, dtype=torch.float64))],
                      loss_fn=LOSSES["mse"], device=torch.device("cpu"), dtype=torch.float64, loss_name="mse", seed=seed)  # fmt: skip
        t0 = time.perf_counter()
        res = analyze_rashomon(RashomonConfig(theta=0.01, radius=0.2), ctx)
        secs = time.perf_counter() - t0
        est = res.metadata["estimate"]
        lo, hi = est["log10_interval"]
        lines.append(
            f"| {seed} | {est['value']:.4g} | {est['value'] / math.exp(exact) - 1:+.1%} | [{10**lo:.4g}, {10**hi:.4g}] | "
            f"{'yes' if lo <= exact / LN10 <= hi else 'NO'} | {res.metadata['evaluations']:.3g} | {secs:.1f} |"
        )
    return [
        f"issue's bowl through the analyzer (exact {math.exp(exact):.4g}; default budget, chunk 64, "
        f"{torch.get_num_threads()} thread(s)):",
        "| seed | ratio | rel. error | 95% interval | covers | evaluations | seconds |",
        "|---|---|---|---|---|---|---|",
        *lines,
    ]


def digits_comparison(seeds: int, mc_draws: int, draws: int, samples: int) -> list[str]:
    """Two trained digits MLPs, ball and filter geometries: plain Monte Carlo vs subset simulation."""
    import tempfile

    from diagnostics.analyzers.rashomon import analyze_rashomon
    from diagnostics.binding import LOSSES
    from diagnostics.context import Context
    from diagnostics.examples.digits import build_mlp, train_data, train_gd

    X, y = train_data(n=samples)
    X = X.double()
    lines = [
        f"digits MLPs trained by full-batch GD (MSE, lr 2, 300 steps; `diagnostics.examples.digits.train_gd`), loss "
        f"on {samples} training samples (float64), theta = 0.01:",
        "| network | F | r | plain MC (draws) | MC log10 ratio [95%] | subset log10 ratio [95%] (draws/level) | "
        "z = diff / combined s.e. | intervals overlap | evaluations (subset) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for width, depth in ((16, 2), (32, 1)):
        with tempfile.TemporaryDirectory() as tmp:
            path = train_gd(tmp, lr=2.0, steps=300, save_steps=[300], width=width, depth=depth)[0]
            state = torch.load(path, weights_only=True)["model"]
        model = build_mlp(width=width, depth=depth)
        model.load_state_dict(state)
        model = model.double().eval()
        ctx = Context(model=model, params={n: p.detach() for n, p in model.named_parameters()}, frozen={},
                      batches=[(X, y)], loss_fn=LOSSES["mse"], device=torch.device("cpu"), dtype=torch.float64,
                      loss_name="mse")  # fmt: skip
        n_params = sum(p.numel() for p in model.parameters())
        for geometry in ("ball", "filter"):
            # the radius where about 1 in 1000 uniform models is in R (plain Monte Carlo still sees ~ mc_draws / 1000)
            radius = 1.0
            for _ in range(40):
                probe = analyze_rashomon(RashomonConfig(theta=0.01, radius=radius, geometry=geometry, draws=4000,
                                                        method="mc", patterns=False, chunk=256), ctx)  # fmt: skip
                p = probe.metadata["estimate"]["value"]
                if 5e-4 <= p <= 3e-3:
                    break
                radius *= 1.25 if p > 3e-3 else 0.8
            mc = analyze_rashomon(RashomonConfig(theta=0.01, radius=radius, geometry=geometry, draws=mc_draws,
                                                 method="mc", patterns=False, chunk=256), ctx).metadata["estimate"]  # fmt: skip
            for seed in range(seeds):
                sub_res = analyze_rashomon(
                    RashomonConfig(theta=0.01, radius=radius, geometry=geometry, draws=draws, method="subset",
                                   patterns=False, chunk=256),
                    replace(ctx, seed=seed),
                )  # fmt: skip
                sub = sub_res.metadata["estimate"]
                z = (sub["log10_ratio"] - mc["log10_ratio"]) / math.hypot(sub["log10_stderr"], mc["log10_stderr"])
                overlap = (
                    sub["log10_interval"][0] <= mc["log10_interval"][1]
                    and mc["log10_interval"][0] <= sub["log10_interval"][1]
                )
                lines.append(
                    f"| MLP {width}x{depth} ({n_params} params), seed {seed} | {geometry} | {radius:.4g} | {mc_draws} | "
                    f"{mc['log10_ratio']:.3f} [{mc['log10_interval'][0]:.3f}, {mc['log10_interval'][1]:.3f}] | "
                    f"{sub['log10_ratio']:.3f} [{sub['log10_interval'][0]:.3f}, {sub['log10_interval'][1]:.3f}] ({draws}) | "
                    f"{z:+.2f} | {'yes' if overlap else 'NO'} | {sub_res.metadata['evaluations']:.3g} |"
                )
                print(lines[-1], flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="*", default=None, help="case names (default: all)")
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--first-seed", type=int, default=0, help="run seeds first-seed .. first-seed + seeds - 1")
    parser.add_argument("--draws", type=int, default=None, help="draws per level for every case")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="CSV file for the table")
    parser.add_argument("--list", action="store_true", help="list the cases with their exact ratios")
    parser.add_argument("--check", action="store_true", help="cross-check the references")
    parser.add_argument("--digits", action="store_true", help="the digits networks and the issue's bowl instead")
    parser.add_argument("--digits-seeds", type=int, default=3)
    parser.add_argument("--mc-draws", type=int, default=200000)
    parser.add_argument("--samples", type=int, default=256, help="digits training samples in the loss")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.check:
        check_references()
        return
    if args.digits:
        for line in issue_bowl_timing(3):
            print(line, flush=True)
        print()
        lines = digits_comparison(args.digits_seeds, args.mc_draws, args.draws or 20000, args.samples)
        print()
        print("\n".join(lines))
        return
    cases = [c for c in CASES if args.cases is None or c.name in args.cases]
    if args.list:
        for c in cases:
            lam = eigenvalues(c)
            theta = theta_of(c, lam)
            print(f"{c.name}: theta={theta:.6g} exact log10 ratio={exact_log_ratio(c, lam, theta) / LN10:.6f}")
        return
    rows = []
    for case in cases:
        row = run_case(case, args.seeds, args.draws, args.first_seed)
        rows.append(row)
        print(markdown([row]).splitlines()[-1], flush=True)
    print()
    print(markdown(rows))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(Row.__dataclass_fields__))
            writer.writeheader()
            for r in rows:
                writer.writerow(r.__dict__)


if __name__ == "__main__":
    main()
