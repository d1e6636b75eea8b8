"""Rashomon ratio against closed-form volumes: ellipsoids in balls and boxes, crossing or not, exact pattern counts.

The quadratic problems use ``L(u) = u^T H u / 2`` directly through the estimator's core
(:func:`estimate_ratio`), or a linear least-squares model through the analyzer; exact references are
closed forms, the Imhof integral of a Gaussian quadratic form (ball crossings) and the inverse Laplace
transform of ``sum_i lambda_i x_i^2`` (box crossings).
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy import integrate
from scipy.optimize import brentq
from scipy.special import gammaln
from scipy.stats import binomtest
from torch import nn

from diagnostics.analyzers.rashomon import (
    LevelStats,
    ProposalShape,
    RashomonConfig,
    SubsetRun,
    analyze_rashomon,
    au_beck_gamma,
    auto_choice,
    chain_lengths,
    chain_travel,
    clopper_pearson,
    estimate_ratio,
    lognormal_interval,
    next_thin,
    plan_chains,
    run_chains,
    sample_uniform,
    subset_estimate,
    subset_notes,
    subset_simulation,
)
from diagnostics.analyzers.registry import all_analyzers
from diagnostics.binding import LOSSES
from diagnostics.context import Context
from diagnostics.errors import DiagnosticsError
from diagnostics.spec import check_config

F64 = torch.float64
LN10 = math.log(10.0)


# ---------------------------------------------------------------------------------- references
def log_unit_ball(d: int) -> float:
    return 0.5 * d * math.log(math.pi) - float(gammaln(d / 2 + 1))


def ellipsoid_log_ratio(lam: np.ndarray, theta: float, r: float) -> float:
    """log of vol{u : u^T diag(lam) u / 2 <= theta} / vol(ball of radius r), the ellipsoid inside the ball."""
    return 0.5 * float(np.log(2 * theta / lam).sum()) - len(lam) * math.log(r)


def ball_fraction(semi_axes_sq: np.ndarray, r: float) -> float:
    """Fraction of an ellipsoid inside a ball: P(sum (a_i^2 - r^2) g_i^2 - r^2 (g_{d+1}^2 + g_{d+2}^2) <= 0) (Imhof)."""
    w = np.concatenate([np.asarray(semi_axes_sq) - r * r, [-r * r, -r * r]])

    def f(u: float) -> float:
        return math.sin(0.5 * float(np.arctan(w * u).sum())) / (
            u * math.exp(0.25 * float(np.log1p((w * u) ** 2).sum()))
        )

    val, _ = integrate.quad(f, 0, np.inf, limit=2000, epsabs=1e-14, epsrel=1e-11)
    return 0.5 - val / math.pi


def box_log_ratio(lam: np.ndarray, r: float, t: float) -> float:
    """log P(sum lam_i x_i^2 <= t), x uniform in [-r, r]^d: inverse Laplace transform (de Hoog, mpmath)."""
    import mpmath as mp

    mp.mp.dps = 30
    lams = [mp.mpf(float(x)) for x in lam]

    def transform(s):
        out = 1 / s
        for lv in lams:
            a = mp.sqrt(s * lv)
            out *= mp.sqrt(mp.pi) * mp.erf(r * a) / (2 * r * a)
        return out

    return float(mp.log(mp.invertlaplace(transform, mp.mpf(t), method="dehoog")))


def quadratic(lam: np.ndarray, rotation_seed: int | None = None):
    lam_t = torch.tensor(lam, dtype=F64)
    if rotation_seed is None:
        return lambda U: 0.5 * (U * U * lam_t).sum(1)
    Q, _ = torch.linalg.qr(
        torch.randn(len(lam), len(lam), generator=torch.Generator().manual_seed(rotation_seed), dtype=F64)
    )
    H = Q @ torch.diag(lam_t) @ Q.T
    return lambda U: 0.5 * ((U @ H) * U).sum(1)


def run(loss, d: int, radius: float, geometry: str, theta: float, seed: int, **config):
    cfg = RashomonConfig(theta=theta, radius=radius, geometry=geometry, **config)
    gens = (torch.Generator().manual_seed(2 * seed + 1), torch.Generator().manual_seed(2 * seed + 2))
    return estimate_ratio(loss, d, radius, geometry, theta, cfg, gens)


def covers(est, exact_log: float) -> bool:
    lo, hi = est.log10_interval
    return lo <= exact_log / LN10 <= hi


# ---------------------------------------------------------------------- subset simulation: coverage
def test_interval_covers_the_truth_in_at_least_17_of_20_seeds() -> None:
    """A rotated 6-dim ellipsoid (condition 100) at 1e-6, a small budget: coverage of the 95% interval.

    With a true coverage of 95%, 17 or more of 20 happen with probability 0.98; an interval that ignores the
    chain correlation (the naive binomial variance, 3 times too small here) covers about 2/3 of the time.
    """
    lam = np.logspace(0, 2, 6)
    theta = 0.5 * math.exp((-6 * LN10 + 0.5 * float(np.log(lam).sum())) * 2 / 6)
    exact = ellipsoid_log_ratio(lam, theta, 1.0)
    loss = quadratic(lam, rotation_seed=3)
    hits, errors, widths = 0, [], []
    for seed in range(20):
        out = run(loss, 6, 1.0, "ball", theta, seed, draws=4000, method="subset")
        hits += covers(out.estimate, exact)
        errors.append(out.estimate.log10 - exact / LN10)
        widths.append(out.estimate.log10_interval[1] - out.estimate.log10_interval[0])
    assert hits >= 17
    # unbiased: the mean error is small next to its own standard error over 20 seeds
    assert abs(np.mean(errors)) < 3 * np.std(errors) / math.sqrt(20) + 0.01
    # and the intervals are not vacuous: half-width of the order of the actual error
    assert np.median(widths) / 2 < 4 * math.sqrt(np.mean(np.square(errors)))


class Bowl(nn.Module):
    """``x @ w``: with ``X = diag(sqrt(n lambda / 2))`` and zero targets the MSE is ``w^T diag(lambda) w / 2``."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(d, dtype=F64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w


def cpu_context(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], loss: str, **extra) -> Context:
    """A float64 CPU context of ``model`` (in eval mode) at its own weights, on one batch."""
    return Context(
        model=model.eval(),
        params={k: v.detach() for k, v in model.named_parameters()},
        frozen={},
        batches=[batch],
        loss_fn=LOSSES[loss],
        device=torch.device("cpu"),
        dtype=F64,
        **extra,
    )


def issue_bowl(seed: int) -> Context:
    """The issue's 20-dim bowl: Hessian eigenvalues evenly spaced in [1, 10], minimum at the checkpoint."""
    lam = torch.linspace(1.0, 10.0, 20, dtype=F64)
    X = torch.diag(torch.sqrt(lam * 20 / 2))
    return cpu_context(Bowl(20), (X, torch.zeros(20, dtype=F64)), "mse", loss_name="mse", seed=seed)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_issue_ellipsoid_at_2e_10_within_20_percent(seed: int) -> None:
    """theta 0.01, ball of radius 0.2: vol ratio prod sqrt(2 theta / lambda_i) / r^20 = 2.08e-10, default budget."""
    lam = np.linspace(1.0, 10.0, 20)
    exact = ellipsoid_log_ratio(lam, 0.01, 0.2)
    assert math.exp(exact) == pytest.approx(2.08e-10, rel=0.01)
    res = analyze_rashomon(RashomonConfig(theta=0.01, radius=0.2, chunk=4096), issue_bowl(seed))
    est = res.metadata["estimate"]
    assert res.metadata["method"] == "subset" and "subset simulation" in res.metadata["method_choice"]
    lo, hi = est["log10_interval"]
    assert lo <= exact / LN10 <= hi
    rec = {r.metric: r for r in res.records}
    assert rec["rashomon_ratio"].value == pytest.approx(math.exp(exact), rel=0.2)
    assert rec["rashomon_log10_ratio"].stderr < 0.05  # a useful interval, not a vacuous one
    assert not [n for n in res.metadata["notes"] if "unreliable" in n]


def test_anisotropic_ellipsoid_at_1e_30() -> None:
    """20 dims, a rotated Hessian with eigenvalues over 6 decades, the longest semi-axis 0.9 r: ratio 1e-31.

    Three seeds at a fifth of the default budget: at least two intervals cover (a 95% interval misses two of
    three with probability 0.007), every error within 4 reported standard errors, which are ~0.1 in log10.
    """
    lam = np.logspace(0, 6, 20)
    theta = 0.5 * math.exp((-31 * LN10 + 0.5 * float(np.log(lam).sum())) * 2 / 20)
    assert math.sqrt(2 * theta / lam.min()) < 1.0  # inside the ball
    exact = ellipsoid_log_ratio(lam, theta, 1.0)
    loss = quadratic(lam, rotation_seed=5)
    outs = [run(loss, 20, 1.0, "ball", theta, seed=s, draws=20000) for s in range(3)]
    assert sum(covers(o.estimate, exact) for o in outs) >= 2
    for o in outs:
        assert abs(o.estimate.log10 - exact / LN10) < 4 * o.estimate.log10_stderr
        assert 0.04 < o.estimate.log10_stderr < 0.2
        assert o.run is not None and o.run.finished and 25 < len(o.run.levels) < 40


def test_a_60_dim_rotated_set_keeps_its_spread_through_the_levels() -> None:
    """The draws of the last level fill R: their covariance, whitened by R's exact one, has eigenvalues near 1.

    Uniform draws in ``{u^T H u / 2 <= theta}`` have covariance ``2 theta H^-1 / (d + 2)``. Chains that do not
    travel far from their seeds leave each level's draws clustered around a few seeds; the covariances fitted
    on them shrink the next proposals, and the spread collapses level after level (the median whitened
    eigenvalue fell to 0.002 in 100 dimensions before the thinning followed chain_travel). Also: the pilot
    finds R in about as many levels as ``log(p) / log(p0)``, and the estimate is within 4 standard errors.
    """
    d = 60
    lam = np.logspace(0, 2, d)
    theta = 0.5 * math.exp((-33 * LN10 + 0.5 * float(np.log(lam).sum())) * 2 / d)  # ratio 1e-33, inside the ball
    assert math.sqrt(2 * theta / lam.min()) < 1.0
    exact = ellipsoid_log_ratio(lam, theta, 1.0)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(8), dtype=F64))
    H = Q @ torch.diag(torch.tensor(lam, dtype=F64)) @ Q.T
    out = subset_simulation(lambda U: 0.5 * ((U @ H) * U).sum(1), d, 1.0, "ball", theta, n=1000, replicates=4,
                            generator=torch.Generator().manual_seed(9))  # fmt: skip
    assert out.finished and 30 <= out.pilot_levels <= 36
    X = out.final_states
    root = Q @ torch.diag(torch.tensor(lam, dtype=F64).sqrt()) @ Q.T
    white = torch.linalg.eigvalsh(root @ torch.cov(X.T) @ root * (d + 2) / (2 * theta))
    assert 0.7 < float(white.median()) < 1.3 and float(white.min()) > 0.2
    est = subset_estimate(out, 0.95)
    assert abs(est.log10 - exact / LN10) < 4 * est.log10_stderr


def test_chain_travel_is_two_for_independent_draws_and_zero_for_stuck_chains() -> None:
    gen = torch.Generator().manual_seed(11)
    lengths = torch.full((500,), 10)
    seeds = torch.randn(500, 30, generator=gen, dtype=F64)
    states = torch.randn(5000, 30, generator=gen, dtype=F64)
    assert chain_travel(seeds, states, lengths) == pytest.approx(2.0, abs=0.1)
    stuck = seeds.repeat_interleave(10, dim=0)
    assert chain_travel(seeds, stuck, lengths) == 0.0
    half = seeds.repeat_interleave(10, dim=0) + 0.5 * torch.randn(5000, 30, generator=gen, dtype=F64)
    assert chain_travel(seeds, half, lengths) == pytest.approx(0.25 / 1.25, abs=0.03)  # var 1.25 per coordinate


def test_next_thin_follows_the_larger_need_within_bounds() -> None:
    assert next_thin(2, gamma=1.0, travel=1.0) == 2  # both targets met: unchanged
    assert next_thin(2, gamma=1.0, travel=0.25) == 8  # chains travelled a quarter of the target: 4x the steps
    assert next_thin(2, gamma=5.0, travel=2.0) == 6  # gamma 5 -> (1 + 5) / (1 + 1) = 3x
    assert next_thin(8, gamma=0.0, travel=2.0) == 4  # both over-met: halve
    assert next_thin(40, gamma=0.0, travel=0.01) == 64 and next_thin(1, gamma=0.0, travel=math.inf) == 1


def test_ellipsoid_crossing_the_ball_against_long_monte_carlo() -> None:
    """8 dims, condition 1e3, the longest semi-axis 2.5 r: the ball cuts the ellipsoid; ratio ~ 3e-5.

    Reference: 10^6 points uniform in the ellipsoid, each scored by the exact fraction of its ray inside the
    ball (Rao-Blackwellised Monte Carlo), checked against the Imhof integral.
    """
    d, r = 8, 1.0
    lam = np.logspace(0, 3, d)
    theta = 0.5 * lam.min() * 2.5**2
    a2 = 2 * theta / lam
    g = np.random.default_rng(0).standard_normal((1_000_000, d))
    q = (g * g * a2).sum(1) / (g * g).sum(1)
    ray = np.minimum(1.0, (r * r / q) ** (d / 2))
    m_mc, m_se = ray.mean(), ray.std() / 1000
    m = ball_fraction(a2, r)
    assert abs(m - m_mc) < 4 * m_se and 0.05 < m < 0.9
    exact = ellipsoid_log_ratio(lam, theta, r) + math.log(m)
    out = run(quadratic(lam), d, r, "ball", theta, seed=2, draws=30000)
    assert out.method == "subset"
    assert covers(out.estimate, exact)
    assert abs(out.estimate.log10 - exact / LN10) < 0.1
    # plain Monte Carlo agrees where it can: with 200,000 draws it sees a handful of models
    mc = run(quadratic(lam), d, r, "ball", theta, seed=3, draws=200000, method="mc").estimate
    assert mc.interval[0] <= math.exp(exact) <= mc.interval[1]


def test_axis_aligned_ellipsoid_crossing_a_box_against_the_exact_integral() -> None:
    """A box of half-width 1 and an ellipsoid sticking out along 4 of its 12 axes: ratio ~ 1e-8 (exact integral)."""
    d, r = 12, 1.0
    lam = np.logspace(0, 3, d)
    theta = 4.0
    assert int((2 * theta / lam > r * r).sum()) == 4
    exact = box_log_ratio(lam, r, 2 * theta)
    assert -8 * LN10 < exact < -6 * LN10
    out = run(quadratic(lam), d, r, "box", theta, seed=4, draws=30000)
    assert covers(out.estimate, exact)
    assert abs(out.estimate.log10 - exact / LN10) < 0.1


def test_box_reference_agrees_with_the_closed_form_inside() -> None:
    lam = np.logspace(0, 1, 6)
    t = 0.5  # every semi-axis sqrt(t / lam) <= 1
    closed = log_unit_ball(6) + 0.5 * float(np.log(t / lam).sum()) - 6 * math.log(2)
    assert box_log_ratio(lam, 1.0, t) == pytest.approx(closed, abs=1e-9)


# ------------------------------------------------------------------------------- building blocks
def test_proposal_shape_draws_have_the_sample_covariance() -> None:
    """Dense form (n > d distinct points): C = S; factor form (n <= d): C = S + (tr S / d) I."""
    gen = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(8, 8, generator=gen, dtype=F64))
    for n, d in ((60, 8), (5, 8)):
        X = (torch.randn(n, d, generator=gen, dtype=F64) * torch.logspace(-3, 0, d, dtype=F64)) @ Q.T  # rotated
        shape = ProposalShape.fit(torch.cat([X, X[:3]]))  # repeated rows (rejected moves) are dropped
        S = torch.cov(X.T)
        if n > d:
            assert shape.factor is not None and shape.floor == 0.0
            torch.testing.assert_close(shape.factor @ shape.factor.T, S, rtol=1e-8, atol=1e-14)
            C = S
        else:
            assert shape.factor is None and shape.centred.shape == (n, d)
            torch.testing.assert_close(shape.centred.T @ shape.centred, S, rtol=1e-8, atol=1e-14)
            assert shape.floor == pytest.approx(float(torch.trace(S)) / d, rel=1e-10)
            C = S + shape.floor * torch.eye(d, dtype=F64)
        Z = shape.draw(400000, gen)
        # compare in the whitened frame: every direction, short or long, within 1.5% (400,000 draws)
        L = torch.linalg.cholesky(C)
        W = torch.linalg.solve_triangular(L, Z.T, upper=False)
        torch.testing.assert_close(torch.cov(W), torch.eye(d, dtype=F64), atol=0.015, rtol=0.0)


def test_proposal_shape_leaves_out_a_chains_own_family() -> None:
    """With families, step i draws from the covariance of the points outside family exclude[i] (no floor if n > d)."""
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(40, 3, generator=gen, dtype=F64)
    X[:20, 0] *= 10.0  # family 0 is spread along axis 0, family 1 is not
    families = torch.tensor([0] * 20 + [1] * 20)
    shape = ProposalShape.fit(X, families=families)
    assert shape.factor is None and shape.floor == 0.0
    Xc = (X - X.mean(0)) / math.sqrt(39)
    for fam in (0, 1):
        Z = shape.draw(200000, gen, exclude=torch.full((200000,), fam))
        kept = Xc[families != fam]
        torch.testing.assert_close(torch.cov(Z.T), kept.T @ kept, rtol=0.03, atol=0.03 * float((kept**2).sum(0).max()))


def test_chains_keep_the_uniform_law_and_stay_in_the_set() -> None:
    """Uniform seeds in {|u| <= 0.5} inside the ball of radius 1: after the moves ``(|u|/0.5)^d`` is still U(0, 1)."""
    d, n = 10, 4000
    gen = torch.Generator().manual_seed(1)
    seeds = sample_uniform(torch.full((n,), 0.5, dtype=F64), d, "ball", gen)
    shape = ProposalShape.fit(sample_uniform(torch.full((2000,), 0.5, dtype=F64), d, "ball", gen))
    loss = lambda U: U.norm(dim=1)  # noqa: E731
    out = run_chains(loss, seeds, loss(seeds), torch.full((n,), 6), 0.5, shape, 2.38, "ball", 1.0, gen)
    assert out.states.shape == (6 * n, d) and out.losses.shape == (6 * n,)
    assert float(out.states.norm(dim=1).max()) <= 0.5
    v = (out.states.norm(dim=1) / 0.5) ** d
    assert abs(float(v.mean()) - 0.5) < 4 * math.sqrt(1 / 12 / n)  # chains of 6: n independent chains at least
    assert 0.1 < out.accepted / out.proposed < 0.9
    # states of the chains run in order, chain by chain
    torch.testing.assert_close(out.losses, out.states.norm(dim=1))


def test_chains_propose_only_inside_the_box_and_never_evaluate_outside() -> None:
    gen = torch.Generator().manual_seed(2)
    seen = []

    def loss(U):
        seen.append(U.abs().amax(dim=1))
        return U.norm(dim=1)

    seeds = sample_uniform(torch.full((200,), 0.9, dtype=F64), 3, "box", gen)
    shape = ProposalShape.fit(seeds)
    out = run_chains(loss, seeds, seeds.norm(dim=1), torch.full((200,), 5), 10.0, shape, 20.0, "box", 1.0, gen)
    assert float(torch.cat(seen).max()) <= 1.0
    assert float(out.states.abs().max()) <= 1.0


def test_au_beck_gamma_for_independent_and_frozen_chains() -> None:
    gen = torch.Generator().manual_seed(3)
    lengths = torch.full((2000,), 10)
    independent = torch.rand(20000, generator=gen) < 0.1
    assert abs(au_beck_gamma(independent, lengths)) < 0.15
    frozen = (torch.rand(2000, generator=gen) < 0.1).repeat_interleave(10)  # a chain never changes
    assert au_beck_gamma(frozen, lengths) == pytest.approx(9.0, rel=1e-9)  # Var = p(1-p)/n_chains: 1 + gamma = L
    assert au_beck_gamma(torch.zeros(100, dtype=torch.bool), torch.full((10,), 10)) == 0.0


def test_chain_plans_cover_the_level_exactly() -> None:
    gen = torch.Generator().manual_seed(4)
    lengths = chain_lengths(7, 100, gen)
    assert int(lengths.sum()) == 100 and int(lengths.max()) - int(lengths.min()) <= 1
    starts, lengths = plan_chains(7, 100, 10, gen)
    assert int(lengths.sum()) == 100 and int(lengths.max()) <= 10 and set(starts.tolist()) == set(range(7))
    starts, lengths = plan_chains(30, 100, 10, gen)  # more seeds than needed chains: one chain each
    assert starts.tolist() == list(range(30)) and int(lengths.sum()) == 100


def test_lognormal_interval_is_the_modified_cox_interval() -> None:
    x = np.array([-3.0, -2.5, -3.2, -2.9, -3.1])
    est, se, lo, hi, s2 = lognormal_interval(x, 0.95)
    assert s2 == pytest.approx(x.var(ddof=1))
    assert est == pytest.approx(x.mean() + s2 / 2)
    assert se == pytest.approx(math.sqrt(s2 / 5 + s2**2 / 8))
    assert hi - est == pytest.approx(2.7764451 * se, rel=1e-6) and est - lo == pytest.approx(hi - est)
    assert lognormal_interval(x, 0.95, floor_variance=1.0)[4] == 1.0
    # coverage for log-normal samples of mean 1 (log E = 0)
    rng = np.random.default_rng(0)
    hits = 0
    for _ in range(2000):
        sample = rng.normal(-0.5 * 0.8**2, 0.8, size=10)
        _, _, lo, hi, _ = lognormal_interval(sample, 0.95)
        hits += lo <= 0.0 <= hi
    assert abs(hits / 2000 - 0.95) < 0.02


def _fake_run(log_p, finished=True) -> SubsetRun:
    levels = [LevelStats(1.0, 0.1, 0.0, None, 0.001), LevelStats(0.5, 0.2, 1.0, 0.3, 0.002)]
    return SubsetRun(
        log_p=np.asarray(log_p, dtype=np.float64), au_beck=np.full(len(log_p), 1e-4), levels=levels,
        finished=finished, pilot_log_p=-1.0, pilot_levels=1, evaluations=1000, n=100,
        final_states=torch.zeros(0, 2, dtype=F64), final_losses=torch.zeros(0, dtype=F64),
    )  # fmt: skip


def test_chains_that_cannot_travel_at_the_largest_thinning_get_a_note() -> None:
    run = _fake_run([-3.0, -3.1, -2.9, -3.05])
    est = subset_estimate(run, 0.95)
    assert not any("independence" in n for n in subset_notes(run, est))
    stuck = replace(run, capped_travel=0.2)
    notes = [n for n in subset_notes(stuck, est) if "independence" in n]
    assert len(notes) == 1 and "0.2 of the way" in notes[0] and "unreliable" in notes[0]


def test_ratios_below_the_float_range_keep_a_log10_value_and_interval() -> None:
    log_p = np.array([-921.0, -921.3, -920.8, -921.1])  # ~ 1e-400
    est = subset_estimate(_fake_run(log_p), 0.95)
    assert est.value == 0.0 and est.stderr is None and est.interval == (0.0, 0.0)
    m, s2 = log_p.mean(), log_p.var(ddof=1)
    assert est.log10 == pytest.approx((m + s2 / 2) / LN10)
    lo, hi = est.log10_interval
    assert lo < est.log10 < hi and math.isfinite(lo) and hi - lo < 1


def test_a_replicate_that_died_falls_back_to_the_plain_mean() -> None:
    est = subset_estimate(_fake_run([-5.0, -math.inf, -5.2, -4.9]), 0.95)
    p = np.exp([-5.0, 0.0 - math.inf, -5.2, -4.9])
    assert est.log10 == pytest.approx(math.log10(p.mean()))
    assert est.log10_interval[0] == -math.inf and "lost" in est.kind


def test_an_unfinished_run_gives_only_an_upper_bound() -> None:
    est = subset_estimate(_fake_run([-5.0, -5.1, -4.9], finished=False), 0.95)
    assert math.isnan(est.value) and est.interval[0] == 0.0 and 0 < est.interval[1] < 1e-1
    assert "upper bound" in est.kind


def test_max_levels_reached_is_an_upper_bound_with_a_note() -> None:
    ctx, A = least_squares()
    res = analyze_rashomon(
        RashomonConfig(theta=0.01, radius=30 * semi_axis(A, 0.01), draws=2000, max_levels=2, chunk=512), ctx
    )
    rec = {r.metric: r for r in res.records}
    assert math.isnan(rec["rashomon_ratio"].value) and "rashomon_log10_ratio" not in rec
    assert any("--max-levels (2)" in n for n in res.metadata["notes"])
    lo, hi = res.metadata["estimate"]["interval"]
    assert lo == 0.0 and hi >= ellipsoid_ratio(A, 0.01, 30 * semi_axis(A, 0.01), "ball")


def test_auto_chooses_plain_monte_carlo_only_with_100_hits() -> None:
    assert auto_choice(100, 20000)[0] == "mc" and "relative standard error" in auto_choice(100, 20000)[1]
    assert auto_choice(99, 20000)[0] == "subset" and "99 of 20000" in auto_choice(99, 20000)[1]


def test_subset_simulation_replicates_are_independent_of_the_first_draws() -> None:
    """Same generators, same answer; the replicate estimates scatter (they are independent runs)."""
    lam = np.array([1.0, 4.0, 9.0])
    loss = quadratic(lam)
    a = subset_simulation(loss, 3, 1.0, "ball", 1e-4, n=500, replicates=5, generator=torch.Generator().manual_seed(0))
    b = subset_simulation(loss, 3, 1.0, "ball", 1e-4, n=500, replicates=5, generator=torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(a.log_p, b.log_p)
    assert np.unique(a.log_p).size == 5 and a.finished and a.evaluations > 5 * 500 * len(a.levels)


# ---------------------------------------------------------------------------------- the analyzer
def least_squares(n: int = 60, d_in: int = 2, seed: int = 0):
    """A linear model at its least-squares solution; ``L(w) - L(w*) = (w - w*)^T A (w - w*)``, ``A = X'X/n``."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d_in, generator=g, dtype=F64) * torch.linspace(1.0, 2.5, d_in, dtype=F64)
    y = X @ torch.linspace(1.5, -0.7, d_in, dtype=F64) + 0.3 + 0.2 * torch.randn(n, generator=g, dtype=F64)
    Xt = torch.cat([X, torch.ones(n, 1, dtype=F64)], 1)
    sol = torch.linalg.lstsq(Xt, y.unsqueeze(1)).solution.squeeze(1)
    model = nn.Linear(d_in, 1).double()
    with torch.no_grad():
        model.weight.copy_(sol[:d_in].unsqueeze(0))
        model.bias.copy_(sol[d_in:])
    return cpu_context(model, (X, y), "mse", loss_name="mse"), Xt.T @ Xt / n


def ellipsoid_ratio(A: torch.Tensor, theta: float, radius: float, geometry: str, scales=None) -> float:
    """vol{u : u^T A u <= theta} / vol(F), with the ellipsoid inside F."""
    d = A.shape[0]
    log_e = log_unit_ball(d) + 0.5 * d * math.log(theta) - 0.5 * math.log(float(torch.linalg.det(A)))
    if geometry == "box":
        log_f = d * math.log(2 * radius)
    else:
        log_f = log_unit_ball(d) + d * math.log(radius)
        if geometry == "filter":
            log_f += float(torch.log(scales).sum())
    return math.exp(log_e - log_f)


def semi_axis(A: torch.Tensor, theta: float) -> float:
    return math.sqrt(theta / float(torch.linalg.eigvalsh(A).min()))


def test_monte_carlo_interval_covers_the_ellipsoid_volume() -> None:
    ctx, A = least_squares()
    theta = 0.01
    r = 1.4 * semi_axis(A, theta)
    exact = ellipsoid_ratio(A, theta, r, "ball")
    res = analyze_rashomon(RashomonConfig(theta=theta, radius=r, draws=6000, method="mc"), ctx)
    est = res.metadata["estimate"]
    assert res.metadata["method"] == "mc" and est["interval_kind"] == "Clopper-Pearson"
    lo, hi = est["interval"]
    assert lo <= exact <= hi
    rec = {r.metric: r for r in res.records}
    p = est["hits"] / 6000
    assert rec["rashomon_ratio"].value == p
    assert rec["rashomon_ratio"].stderr == pytest.approx(math.sqrt(p * (1 - p) / 6000))
    assert rec["rashomon_log10_ratio"].value == pytest.approx(math.log10(p))
    assert rec["rashomon_log10_ratio"].stderr == pytest.approx(math.sqrt((1 - p) / (6000 * p)) / LN10)
    assert "||u||_2 <= " in res.metadata["hypothesis_space"] and "theta = 0.01" in res.metadata["rashomon_set"]
    assert "rashomon_pattern_ratio" not in rec  # regression: no patterns


def test_analyzer_auto_switches_to_subset_simulation_for_small_ratios() -> None:
    ctx, A = least_squares()
    theta = 0.01
    r = 90 * semi_axis(A, theta)
    exact = ellipsoid_ratio(A, theta, r, "ball")
    assert 1e-7 < exact < 1e-5
    res = analyze_rashomon(RashomonConfig(theta=theta, radius=r, draws=20000, chunk=1024), ctx)
    est = res.metadata["estimate"]
    assert res.metadata["method"] == "subset" and "auto chose subset simulation" in res.metadata["method_choice"]
    assert any("auto chose subset simulation" in n for n in res.metadata["notes"])
    lo, hi = est["log10_interval"]
    assert lo <= math.log10(exact) <= hi
    assert abs(est["log10_ratio"] - math.log10(exact)) < 0.1
    rec = {r.metric: r for r in res.records}
    assert rec["rashomon_log10_ratio"].value == pytest.approx(est["log10_ratio"])
    assert rec["rashomon_log10_ratio"].stderr == pytest.approx(est["log10_stderr"])
    assert rec["rashomon_ratio"].value == pytest.approx(10 ** est["log10_ratio"])
    sub = res.metadata["subset_simulation"]
    assert sub["replicates"] == 10 and sub["finished"] and len(sub["level_gammas"]) == sub["levels"] + 1
    assert all(0.05 < a < 0.8 for a in sub["level_acceptance"][1:])
    # plain Monte Carlo with the same budget sees (almost) nothing
    mc = analyze_rashomon(RashomonConfig(theta=theta, radius=r, draws=20000, method="mc", chunk=1024), ctx)
    assert mc.metadata["estimate"]["hits"] <= 2


def test_subset_agrees_with_plain_monte_carlo_where_both_work() -> None:
    ctx, A = least_squares(seed=1)
    theta = 0.02
    r = 2.5 * semi_axis(A, theta)
    exact = ellipsoid_ratio(A, theta, r, "ball")
    mc = analyze_rashomon(RashomonConfig(theta=theta, radius=r, draws=20000, method="mc", chunk=1024), ctx)
    sub = analyze_rashomon(RashomonConfig(theta=theta, radius=r, draws=20000, method="subset", chunk=1024), ctx)
    a, b = mc.metadata["estimate"], sub.metadata["estimate"]
    assert a["interval"][0] <= exact <= a["interval"][1]
    assert b["interval"][0] <= exact <= b["interval"][1]
    assert abs(a["log10_ratio"] - b["log10_ratio"]) < 3 * math.hypot(a["log10_stderr"], b["log10_stderr"])


def test_box_and_filter_geometries_have_their_own_volumes() -> None:
    ctx, A = least_squares(seed=2)
    theta = 0.02
    a = semi_axis(A, theta)
    box = analyze_rashomon(RashomonConfig(theta=theta, radius=1.2 * a, geometry="box", draws=4000, method="mc"), ctx)
    lo, hi = box.metadata["estimate"]["interval"]
    assert lo <= ellipsoid_ratio(A, theta, 1.2 * a, "box") <= hi
    assert "|u_i| <= " in box.metadata["hypothesis_space"]
    scales = torch.cat([ctx.params["weight"].norm().repeat(2), ctx.params["bias"].abs()])
    # F = {w + s*u : ||u|| <= r}: the set {e : e^T A e <= theta} in u-coordinates is the ellipsoid of S A S
    r = 1.3 * a / float(scales.min())
    exact = ellipsoid_ratio(A, theta, r, "filter", scales)
    filt = analyze_rashomon(RashomonConfig(theta=theta, radius=r, geometry="filter", draws=4000, method="mc"), ctx)
    lo, hi = filt.metadata["estimate"]["interval"]
    assert lo <= exact <= hi
    # subset simulation in the filter geometry, at a small ratio
    r = 40 * a / float(scales.min())
    exact = ellipsoid_ratio(A, theta, r, "filter", scales)
    sub = analyze_rashomon(
        RashomonConfig(theta=theta, radius=r, geometry="filter", draws=10000, method="subset", chunk=1024), ctx
    )
    lo, hi = sub.metadata["estimate"]["log10_interval"]
    assert lo <= math.log10(exact) <= hi


# ------------------------------------------------------------------------------------- patterns
class Threshold(nn.Module):
    """Two logits (0, x - w): class 1 iff x > w."""

    def __init__(self, w: float) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([w], dtype=F64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.zeros_like(x), 3.0 * (x - self.w)], dim=1)


def test_pattern_ratio_and_ratio_match_exact_counts_in_one_dimension() -> None:
    x = torch.linspace(-1.0, 1.0, 21, dtype=F64) + 0.013  # no data point on the edge of F
    y = (x > 0.05).long()
    y[3], y[17] = 1, 0  # label noise keeps the loss bounded away from zero
    w0 = 0.0
    ctx = cpu_context(Threshold(w0), (x, y), "cross_entropy")

    def loss(w: float) -> float:
        logits = torch.stack([torch.zeros_like(x), 3.0 * (x - w)], dim=1)
        return float(LOSSES["cross_entropy"](logits, y))

    theta, r = 0.02, 0.5
    target = loss(w0) + theta
    # the loss is convex in w: R is an interval [c, e] around its minimiser
    wmin = float(brentq(lambda t: loss(t + 1e-6) - loss(t - 1e-6), -0.9, 0.9))
    c = max(w0 - r, brentq(lambda t: loss(t) - target, -2, wmin))
    e = min(w0 + r, brentq(lambda t: loss(t) - target, wmin, 2))
    res = analyze_rashomon(RashomonConfig(theta=theta, radius=r, draws=5000, method="mc", chunk=500), ctx)
    lo, hi = res.metadata["estimate"]["interval"]
    assert lo <= (e - c) / (2 * r) <= hi

    def patterns(a: float, b: float) -> int:  # distinct {i : x_i > w} for w in [a, b]: one per crossing
        return 1 + int(((x > a) & (x < b)).sum())

    ratio = next(r_.value for r_ in res.records if r_.metric == "rashomon_pattern_ratio")
    meta = res.metadata["patterns"]
    assert meta["in_space"] == patterns(w0 - r, w0 + r)
    assert meta["in_rashomon_set"] == patterns(c, e)
    assert ratio == pytest.approx(patterns(c, e) / patterns(w0 - r, w0 + r))
    # subset simulation: the last level's models in R add no pattern outside [c, e]
    sub = analyze_rashomon(RashomonConfig(theta=theta, radius=r, draws=2000, method="subset", chunk=500), ctx)
    assert sub.metadata["patterns"]["in_rashomon_set"] == patterns(c, e)


# --------------------------------------------------------------------------------- misc behaviour
def test_clopper_pearson_is_the_exact_binomial_interval() -> None:
    for k, n in ((0, 50), (3, 50), (25, 50), (50, 50), (1, 20000)):
        ref = binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
        lo, hi = clopper_pearson(k, n, 0.95)
        assert lo == pytest.approx(ref.low, abs=1e-12) and hi == pytest.approx(ref.high, rel=1e-10)
    assert clopper_pearson(0, 100, 0.95)[1] == pytest.approx(1 - 0.025 ** (1 / 100))


def test_uniform_draws_fill_the_ball_and_the_box() -> None:
    gen = torch.Generator().manual_seed(0)
    d, n = 5, 40000
    U = sample_uniform(torch.full((n,), 2.0, dtype=F64), d, "ball", gen)
    radius = U.norm(dim=1)
    assert float(radius.max()) <= 2.0
    frac = float((radius <= 1.0).double().mean())
    assert abs(frac - 0.5**d) <= 4 * math.sqrt(0.5**d * (1 - 0.5**d) / n)
    B = sample_uniform(torch.full((n,), 2.0, dtype=F64), d, "box", gen)
    assert float(B.abs().max()) <= 2.0 and abs(float(B.mean())) < 0.02


def test_no_hit_gives_zero_with_an_upper_bound_and_a_note() -> None:
    ctx, _ = least_squares()
    res = analyze_rashomon(RashomonConfig(theta=0.0, radius=5.0, draws=200, method="mc"), ctx)
    assert res.records[0].value == 0.0
    upper = 1 - 0.025 ** (1 / 200)
    assert res.metadata["estimate"]["interval"] == [0.0, pytest.approx(upper)]
    # no log10 of 0: only the interval's upper end has a log10 record
    assert [(r.metric, r.index) for r in res.records] == [("rashomon_ratio", None), ("rashomon_log10_interval", 1)]
    assert res.records[1].value == pytest.approx(math.log10(upper))
    assert any("no sampled model" in n for n in res.metadata["notes"])


def test_seeded_and_reproducible() -> None:
    ctx, A = least_squares()
    cfg = RashomonConfig(theta=0.01, radius=20 * semi_axis(A, 0.01), draws=2000, method="subset")
    a, b = analyze_rashomon(cfg, ctx), analyze_rashomon(cfg, ctx)
    assert a.records[0].value == b.records[0].value and a.records[0].stderr == b.records[0].stderr
    c = analyze_rashomon(cfg, replace(ctx, seed=1))
    assert c.records[0].value != a.records[0].value


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"theta": -0.1}, "--theta must be >= 0"),
        ({"radius": 0.0}, "--radius must be > 0"),
        ({"radius": -2.0}, "--radius"),
        ({"geometry": "sphere"}, "--geometry must be one of ball, filter, box"),
        ({"method": "quasi"}, "--method must be one of auto, mc, subset"),
        ({"method": "is"}, "--method must be one of auto, mc, subset, not 'is'"),
        ({"confidence": 1.0}, r"--confidence must be in \(0, 1\)"),
        ({"draws": 3}, "--draws must be >= 10"),
        ({"subset_runs": 1}, "--subset-runs must be >= 2"),
        ({"level_fraction": 0.7}, r"--level-fraction must be in \(0, 0.5\]"),
        ({"max_levels": 0}, "--max-levels"),
        ({"backend": "jit"}, "--backend"),
        ({"draws": 500, "method": "subset"}, "--draws 500 .*fewer than 10 seeds per level.*at least 1000"),
    ],
)
def test_bad_settings_are_one_line_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(DiagnosticsError, match=message) as info:
        check_config(RashomonConfig(**kwargs))
    assert "\n" not in str(info.value)
    ctx, _ = least_squares()
    with pytest.raises(DiagnosticsError, match=message):  # the analyzer checks a config built in Python
        analyze_rashomon(RashomonConfig(**kwargs), ctx)


def test_rashomon_is_declared_with_its_own_option_names() -> None:
    spec = all_analyzers()["rashomon"]
    cfg = spec.make_config({"theta": 0.05, "radius": 0.2, "subset_runs": 5, "draws": 3000})
    assert (cfg.subset_runs, cfg.draws) == (5, 3000)
    assert np.isfinite(spec.make_config({}).theta)
    # the model draws and the subset runs are not the data options --samples / --replicates (BindingOptions)
    for legacy in ("samples", "replicates"):
        with pytest.raises(DiagnosticsError, match=f"unknown option '{legacy}' in \\[rashomon\\]"):
            spec.make_config({legacy: 5})
    names = {m.name for m in spec.metrics}
    assert names == {"rashomon_ratio", "rashomon_log10_ratio", "rashomon_log10_interval", "rashomon_pattern_ratio"}


def tiny_float32_context() -> Context:
    """The float32 tiny classifier of ``tinymodels`` at its own weights (cross entropy)."""
    import tinymodels as tm

    model = tm.build_tiny().eval()
    return Context(
        model=model,
        params={k: v.detach() for k, v in model.named_parameters()},
        frozen={},
        batches=[tm.tiny_data()],
        loss_fn=LOSSES["cross_entropy"],
        device=torch.device("cpu"),
        dtype=torch.float32,
        loss_name="cross_entropy",
    )


def test_a_ball_where_the_float32_loss_overflows_says_so_and_asks_for_a_smaller_radius() -> None:
    """Every draw of a 1e300 ball overflows float32: a note counts them; more --draws is no fix."""
    res = analyze_rashomon(RashomonConfig(radius=1e300, draws=1000), tiny_float32_context())
    notes = res.metadata["notes"]
    assert res.metadata["nonfinite_draws"] == 1000
    assert [n for n in notes if "non-finite loss" in n] == [
        "1000 of 1000 uniform draws in F (ball, radius 1e+300) have a non-finite loss (counted as outside the "
        "Rashomon set): F reaches where the float32 loss overflows; use a smaller --radius or --dtype float64"
    ]
    assert not any("raise --draws" in n for n in notes)
    assert any("effective draws" in n and "lower --radius" in n for n in notes)
    assert res.records[0].metric == "rashomon_ratio" and res.records[0].value == 0.0


def test_a_normal_radius_has_no_non_finite_note() -> None:
    res = analyze_rashomon(RashomonConfig(radius=0.1, draws=1000), tiny_float32_context())
    assert res.metadata["nonfinite_draws"] == 0
    assert not any("non-finite" in n for n in res.metadata["notes"])


def test_too_few_draws_in_r_ask_for_more_draws_unless_the_loss_is_not_finite_on_most_of_f() -> None:
    run = _fake_run([-3.0, -math.inf, -2.9, -3.05])
    est = replace(subset_estimate(run, 0.95), ess=3.0)
    assert [n for n in subset_notes(run, est) if "unreliable (raise --draws)" in n] != []
    notes = subset_notes(replace(run, no_level=True), est)
    lost = [n for n in notes if "lost all their draws" in n or "effective draws" in n]
    assert len(lost) == 2 and all(n.endswith("(lower --radius: the loss is not finite on most of F)") for n in lost)
    assert not any("--draws" in n for n in notes) and len(notes) == len(subset_notes(run, est))
