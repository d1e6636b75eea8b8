"""Rashomon ratio (Semenova, Rudin, Parr 2022, "On the Existence of Simpler Machine Learning Models").

The hypothesis space ``F`` is stated explicitly, always around the checkpoint's weights ``w`` in the
space of the analysed parameters (``d`` of them), with ``u`` a perturbation:

* ``ball``: ``F = {w + u : ||u||_2 <= r}``;
* ``filter``: ``F = {w + s * u : ||u||_2 <= r}``, ``s`` the per-filter weight norms (each entry of an
  output filter / row scaled by that filter's norm, a 1-d tensor by its own norm), so ``r`` is a
  relative size, as in filter-normalised landscapes; entries with ``s = 0`` are not perturbed;
* ``box``: ``F = {w + u : |u_i| <= r for all i}``.

``theta`` is an absolute loss tolerance: the Rashomon set is ``R = {f in F : L(f) <= L(w) + theta}``
(the reference is the checkpoint's own loss). Metrics:

* ``rashomon_ratio`` = ``p = vol(R) / vol(F)`` and ``rashomon_log10_ratio`` = ``log10 p`` (with its own
  standard error, so that ratios far below the float range keep a value and an interval). Methods:

  - ``mc`` (plain Monte Carlo): ``N`` uniform draws from ``F``, ``k`` of them in ``R``; value ``k/N``,
    ``stderr = sqrt(p(1-p)/N)``, Clopper-Pearson interval ``[B(a/2; k, N-k+1), B(1-a/2; k+1, N-k)]``
    (``B`` the beta quantile). Exact coverage, but a relative error ``~ 1/sqrt(k)``: useless once
    ``p << 1/N``.
  - ``subset`` (subset simulation, Au & Beck 2001, "Estimation of small failure probabilities in high
    dimensions by subset simulation"): nested sets ``F = A_0 ⊃ A_1 ⊃ ... ⊃ A_J ⊃ R`` with
    ``A_j = {f in F : L(f) <= c_j}``, so ``p = prod_j P(A_{j+1} | A_j)`` and every factor is about
    ``p0`` (``level_fraction``, 0.1), estimable from a few thousand draws whatever ``p`` is. The
    draws in ``A_{j+1}`` come from Markov chains started at the draws of ``A_j`` that fell in
    ``A_{j+1}`` (their law is already the uniform law on ``A_{j+1}``), moved by random-walk
    Metropolis with Gaussian proposals shaped by the covariance of ``A_{j+1}`` (as in adaptive
    conditional sampling, Papaioannou et al. 2015): that covariance is the set's own anisotropy, whatever the
    Hessian spectrum, where the importance sampling this replaces (concentric balls fitted by rays)
    missed the long axes of anisotropic sets and its interval excluded the truth by up to 63 standard
    errors (issue 17). No Hessian is needed, non-quadratic sets and the boundary of ``F`` are handled
    by the same moves, and a chain never leaves ``F``.

    Why this and not the alternatives: nested sampling (Skilling 2006) has the same constrained-move
    problem and a variance ``ln(1/p) / N`` that holds only for independent replacements; proposals
    shaped by the Hessian at ``w`` (top-k eigenpairs and the trace) are exact only for a quadratic loss
    and need Hessian products; the covariance of the level's own draws is the set's actual shape, at
    no extra cost. Design, for an interval that covers:

    1. *Pilot* (:func:`pilot_levels`). An adaptive run fixes the thresholds ``c_j`` (the
       ``p0``-quantiles of its draws), the proposal covariance of each level, the proposal scale (tuned
       to an acceptance rate of 0.3) and the thinning (Metropolis steps between recorded states, raised
       level by level until the Au-Beck factor ``gamma`` below is about ``GAMMA_TARGET`` and the chains
       travel at least half as far from their seeds as independent draws would, :func:`next_thin`: slow
       mixing costs evaluations, not coverage; ``O(d)`` steps per draw in ``d`` dimensions, as for any
       random walk). A covariance estimated from the draws it moves drifts them
       (measured: 3% per level in 20 dimensions, uniformity lost within a level in 500), so the pilot
       moves with the covariance of a second run, which itself leaves out each chain's own family.
    2. *Replicates.* ``R`` independent runs with the pilot's levels and kernels frozen. Each is then a
       particle system with fixed levels and fixed invariant kernels, whose product of level fractions
       ``p_r = prod_j n_j / N`` is an unbiased estimate of ``p`` (Del Moral 2004, "Feynman-Kac
       Formulae"; Cérou et al. 2012, "Sequential Monte Carlo for rare event estimation"): adaptive
       levels and adapted kernels bias it by ``O(1/N)`` per level.
    3. *Interval.* ``log p_r`` is a sum of many level terms, close to normal, so ``p_r`` is close to
       lognormal with mean ``p``: the estimate and interval for ``log p`` are the modified Cox interval
       for a lognormal mean (Zhou & Gao 1997), ``m + s^2/2 +- t_{R-1} sqrt(s^2/R + s^4/(2(R-1)))``
       from the mean ``m`` and variance ``s^2`` of the ``R`` values ``log p_r``. The spread of
       independent replicates contains every correlation the chains carry (within a chain, between
       levels), which the naive binomial variance of subset simulation ignores. ``s^2`` is floored at
       the Au-Beck level-wise variance ``sum_j (1-p_j)/(N p_j) (1 + gamma_j)``, ``gamma_j = 2 sum_k
       (1 - k/L) rho_j(k)`` the correlation factor of the level indicators along the chains (``L`` the
       chain length, ``rho_j(k)`` their autocorrelation at lag ``k``).

    Cost: about ``(1 + 2/R) N_total thin log(1/p) / log(1/p0)`` loss evaluations (``N_total`` the
    draws per level); the variance of ``log p`` is about ``10-20 ln(1/p)^2 / evaluations`` on the
    ellipsoids of ``benchmarks/bench_rashomon.py`` (``1.7 ln(1/p)^2 / evaluations`` would be the
    bound for independent draws), more where the chains mix slowly (sets cut by the boundary of ``F``
    in many dimensions).
  - ``auto`` (default): draws ``N`` uniform models (a plain Monte Carlo run); if at least 100 fall in
    ``R`` (relative standard error <= 10 %) that is the answer, otherwise the same draws become the
    first level of subset simulation. The choice and its reason are a note in the metadata.

  Notes flag an unreliable interval: a replicate that lost all its draws, a level whose acceptance
  rate is below 2%, too few effective draws in ``R`` (``N p_J / (1 + gamma_J)`` < 30), replicates
  scattered more than 3 times the Au-Beck variance (its 95% lower bound: chains correlated across
  levels), ``s > 1``, or a run that stopped before ``R`` (``max_levels``, a plateau of the loss), which
  gives only an upper bound.

* ``rashomon_pattern_ratio``: the number of distinct prediction patterns (the vector of predicted labels
  on the data) among the sampled models in ``R`` over the number among all sampled models in ``F`` (the
  pattern Rashomon ratio of Semenova et al.; both counts are lower bounds that grow with ``N``): the
  uniform draws of ``F`` (plain Monte Carlo, or the first level) and the draws of ``R`` (those, or the
  last level of subset simulation). Classification only.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from diagnostics.errors import DiagnosticsError
from diagnostics.lazy import lazy_import
from diagnostics.progress import bind
from diagnostics.results import Result, make_records
from diagnostics.spec import PANEL_SCALE, Analyzer, Metric, Section, check_config, option

if TYPE_CHECKING:
    from diagnostics.context import Context
    from diagnostics.progress import ProgressFn

torch = lazy_import("torch")
np = lazy_import("numpy")
directions = lazy_import("diagnostics.directions")

NAME = "rashomon"
GEOMETRIES = ("ball", "filter", "box")
METHODS = ("auto", "mc", "subset")
BACKENDS = ("auto", "vmap", "loop")  # = diagnostics.directions.BACKENDS
AUTO_MIN_HITS = 100
TARGET_ACCEPTANCE = 0.3
GAMMA_TARGET = 1.0
TRAVEL_TARGET = 1.0
MAX_THIN = 64
LN10 = math.log(10.0)

LossFn = Callable[["torch.Tensor"], "torch.Tensor"]


@dataclass
class RashomonConfig:
    """Settings of :func:`analyze_rashomon` (options of ``diag rashomon``, ``[rashomon]`` in diag.toml).

    Attributes:
        theta: loss tolerance (absolute, >= 0): ``R = {L <= L(w) + theta}``.
        radius: ``r``, the size of ``F`` (see the module docstring).
        geometry: ``ball`` | ``filter`` | ``box``.
        draws: models drawn uniformly from ``F`` (plain Monte Carlo), and models per level of subset
            simulation (split over the ``subset_runs``). Not ``samples``: that is the data subset.
        method: ``auto`` (plain Monte Carlo if it sees >= 100 models in R, else subset simulation) | ``mc``
            | ``subset``.
        confidence: level of the interval.
        subset_runs: independent subset-simulation runs (>= 2); their spread gives the interval. Not
            ``replicates``: that repeats the whole analysis on disjoint data subsets.
        level_fraction: ``p0``, the conditional probability of each intermediate level of subset
            simulation, in (0, 0.5].
        max_levels: at most this many intermediate levels (the smallest ratio reachable is about
            ``level_fraction ** max_levels``).
        patterns: the pattern Rashomon ratio (classification); ``--no-patterns`` turns it off.
        chunk: models per batched evaluation; backend: ``auto`` | ``vmap`` | ``loop``.
    """

    theta: float = option(0.01, help="loss tolerance (absolute): R = {L <= L(w) + theta}", min=0)
    radius: float = option(0.1, help="size r of the hypothesis space F", min=0, min_open=True)
    geometry: str = option(
        "ball",
        help="F = ball (||u||_2 <= r) | filter (per-filter relative ball) | box (|u_i| <= r)",
        choices=GEOMETRIES,
    )
    draws: int = option(
        100_000,
        help="models drawn from F, and per level of subset simulation (data subset: --samples)",
        min=10,
    )
    method: str = option(
        "auto",
        help="auto (plain Monte Carlo if >= 100 of the draws fall in R, else subset simulation) | mc | subset",
        choices=METHODS,
    )
    confidence: float = option(0.95, help="level of the interval", min=0, max=1, min_open=True, max_open=True)
    subset_runs: int = option(10, help="independent subset-simulation runs; their spread is the error bar", min=2)
    level_fraction: float = option(
        0.1, help="conditional probability p0 of each subset-simulation level", min=0, max=0.5, min_open=True
    )
    max_levels: int = option(
        400, help="at most this many subset-simulation levels (ratio >= level_fraction^max_levels)", min=1
    )
    patterns: bool = option(True, help="the pattern Rashomon ratio (classification)")
    chunk: int = option(64, help="models per batched evaluation", min=1, panel=PANEL_SCALE)
    backend: str = option(
        "auto",
        help="evaluation: auto (vmap; one model at a time for conv nets on CPU), vmap or loop",
        choices=BACKENDS,
        panel=PANEL_SCALE,
    )

    def validate(self) -> None:
        """Cross-option rules (single options are checked from their declarations)."""
        if self.method != "mc" and self.draws // self.subset_runs * self.level_fraction < 10:
            raise DiagnosticsError(
                f"--draws {self.draws} over {self.subset_runs} subset runs leaves fewer than 10 seeds per level "
                f"(at --level-fraction {self.level_fraction:g}); raise --draws to at least "
                f"{math.ceil(10 / self.level_fraction) * self.subset_runs}"
            )


def clopper_pearson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact binomial interval for ``k`` successes in ``n`` trials (scipy.stats.beta quantiles)."""
    from scipy.stats import beta

    a = 1.0 - confidence
    lo = 0.0 if k == 0 else float(beta.ppf(a / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - a / 2, k + 1, n - k))
    return lo, hi


def norm_of(U: torch.Tensor, geometry: str) -> torch.Tensor:
    """``[k, d]`` -> ``[k]``: the L2 norm (ball, filter) or the L-infinity norm (box)."""
    return U.abs().amax(dim=1) if geometry == "box" else U.norm(dim=1)


def sample_uniform(radii: torch.Tensor, d: int, geometry: str, generator: torch.Generator) -> torch.Tensor:
    """Uniform draws in the L2 ball (or the box) of radius ``radii[i]`` for each row: ``[k] -> [k, d]``."""
    k = radii.shape[0]
    if geometry == "box":
        U = torch.rand(k, d, generator=generator, dtype=torch.float64)
        return (2.0 * U - 1.0) * radii.unsqueeze(1)
    G = torch.randn(k, d, generator=generator, dtype=torch.float64)
    G = G / G.norm(dim=1, keepdim=True)
    R = torch.rand(k, generator=generator, dtype=torch.float64)
    return G * (radii * torch.exp(torch.log(R) / d)).unsqueeze(1)


# ------------------------------------------------------------------------------ proposal shapes
@dataclass(frozen=True)
class ProposalShape:
    """Gaussian proposal steps ``N(0, C)`` shaped like a sample ``X [n, d]`` (its covariance ``S``).

    * ``n > d`` distinct points: ``C = S`` (eigenvalues floored at ``1e-12`` of the largest), steps ``B z`` with
      ``B = V sqrt(Lambda)`` (``O(d^2)`` each).
    * ``n <= d`` (``S`` singular): ``C = S + s I``, ``s = tr(S) / d`` the mean variance per coordinate,
      steps ``X_c^T z' / sqrt(n - 1) + sqrt(s) z`` (``O(n d)``, never a ``d x d`` matrix): the directions
      the sample does not span get the mean variance. (A floor taken from the sample's smallest eigenvalue
      shrinks level after level: the draws then collapse onto the span of a few seeds.)

    No shrinkage towards the diagonal: in a rotated, strongly anisotropic set the diagonal carries the
    long axes' variance into the short ones, the acceptance collapses, the tuned scale shrinks and the
    draws stop spreading along the long axes (measured: a 20-dim set of condition 1e6 whose level
    estimates then stalled).

    Attributes:
        factor: ``[d, d]`` matrix ``B`` (dense form) or None.
        centred: ``[n, d]`` centred sample over ``sqrt(n - 1)`` (factor form) or None.
        floor: ``s`` (factor form; 0 in the dense form).
    """

    factor: torch.Tensor | None
    centred: torch.Tensor | None
    floor: float
    families: torch.Tensor | None = None

    @classmethod
    def fit(cls, X: torch.Tensor, families: torch.Tensor | None = None) -> ProposalShape:
        """The shape of the distinct points of ``X [n, d]`` (at least 2).

        Chains repeat a state whenever a move is rejected; repeated rows would add zero eigenvalues to ``S``
        and shrink the floor of the factor form to nothing, confining the moves to the span of the sample.
        """
        if families is None:
            X = torch.unique(X.to(torch.float64), dim=0)
        n, d = X.shape
        Xc = (X.to(torch.float64) - X.to(torch.float64).mean(0, keepdim=True)) / math.sqrt(max(n - 1, 1))
        if n > d and families is None:
            lam, V = torch.linalg.eigh(Xc.T @ Xc)
            top = float(lam.max()) if float(lam.max()) > 0 else 1.0
            return cls(factor=V * lam.clamp_min(1e-12 * top).sqrt(), centred=None, floor=0.0)
        total = float((Xc * Xc).sum())
        floor = (total / d if total > 0 else 1e-300) if n <= d else 0.0
        return cls(factor=None, centred=Xc, floor=floor, families=families)

    def draw(self, k: int, generator: torch.Generator, exclude: torch.Tensor | None = None) -> torch.Tensor:
        """``k`` steps ``[k, d]`` from ``N(0, C)``; with ``exclude [k]``, step ``i`` leaves out family ``exclude[i]``."""
        if self.factor is not None:
            d = self.factor.shape[0]
            return torch.randn(k, d, generator=generator, dtype=torch.float64) @ self.factor.T
        n, d = self.centred.shape
        Z = torch.randn(k, n, generator=generator, dtype=torch.float64)
        if exclude is not None and self.families is not None:
            Z = Z.masked_fill(exclude.unsqueeze(1) == self.families.unsqueeze(0), 0.0)
        low_rank = Z @ self.centred
        if self.floor == 0.0:
            return low_rank
        return low_rank + math.sqrt(self.floor) * torch.randn(k, d, generator=generator, dtype=torch.float64)


# --------------------------------------------------------------------------- the Markov chains
def chain_lengths(n_seeds: int, total: int, generator: torch.Generator) -> torch.Tensor:
    """``[n_seeds]`` chain lengths summing to ``total``, as equal as possible (the remainder at random)."""
    base, extra = divmod(total, n_seeds)
    lengths = torch.full((n_seeds,), base, dtype=torch.long)
    if extra:
        lengths[torch.randperm(n_seeds, generator=generator)[:extra]] += 1
    return lengths


def plan_chains(n_seeds: int, total: int, max_length: int, generator: torch.Generator):
    """Chains that record ``total`` states from ``n_seeds`` seeds, none longer than ``max_length``.

    Returns:
        (``starts [n_chains]`` the seed each chain starts from, ``lengths [n_chains]``), the chains spread
        over the seeds as evenly as possible.
    """
    n_chains = max(n_seeds, -(-total // max_length))
    n_chains = min(n_chains, total)
    per_seed = chain_lengths(n_seeds, n_chains, generator)
    starts = torch.repeat_interleave(torch.arange(n_seeds), per_seed)
    return starts, chain_lengths(n_chains, total, generator)


def au_beck_gamma(indicator: torch.Tensor, lengths: torch.Tensor) -> float:
    """Correlation factor ``gamma`` of a level's indicator along its chains (Au & Beck 2001, eq. 29).

    Args:
        indicator: ``[N]`` 0/1 values in chain-major order (chain 0's states first).
        lengths: ``[n_c]`` chain lengths (sum ``N``).

    Returns:
        ``gamma = 2 sum_{k=1}^{L-1} (1 - k/L) rho(k)``, ``L = N/n_c``, ``rho(k) = R(k)/R(0)``,
        ``R(k)`` = mean over pairs of states ``k`` apart on a chain of ``I_t I_{t+k}``, minus ``p^2``;
        ``Var(p_hat) = p(1-p)/N (1 + gamma)``. 0 for independent draws.
    """
    N = int(lengths.sum())
    p = float(indicator.sum()) / N
    r0 = p * (1 - p)
    Lmax = int(lengths.max())
    if r0 <= 0 or Lmax < 2:
        return 0.0
    mask = torch.arange(Lmax).unsqueeze(0) < lengths.unsqueeze(1)
    I = torch.zeros(mask.shape, dtype=torch.float64)
    I[mask] = indicator.to(torch.float64)
    mean_len = N / lengths.numel()
    gamma = 0.0
    for k in range(1, Lmax):
        pairs = mask[:, k:] & mask[:, :-k]
        count = int(pairs.sum())
        if count == 0 or k >= mean_len:
            break
        rk = float((I[:, k:] * I[:, :-k] * pairs).sum()) / count - p * p
        gamma += 2 * (1 - k / mean_len) * rk / r0
    return gamma


@dataclass
class ChainRun:
    """The states of a batch of chains, chain-major.

    Attributes:
        states: ``[N, d]``; losses: ``[N]``; lengths: ``[n_c]``.
        accepted, proposed: moves accepted / proposed; scale: the step scale at the end (adapted or not).
    """

    states: torch.Tensor
    losses: torch.Tensor
    lengths: torch.Tensor
    accepted: int
    proposed: int
    scale: float


@dataclass(frozen=True)
class ChainOptions:
    """How :func:`run_chains` runs its chains beyond the plain Metropolis step.

    Attributes:
        thin: Metropolis steps between recorded states.
        adapt: tune the scale step by step towards the acceptance rate ``TARGET_ACCEPTANCE`` (pilots only).
        families: ``[n_c]`` the family of each chain; a chain's proposals leave out its own family's draws
            (with a factor-form :class:`ProposalShape` fitted with families).
    """

    thin: int = 1
    adapt: bool = False
    families: torch.Tensor | None = None


def run_chains(
    loss: LossFn,
    seeds: torch.Tensor,
    seed_losses: torch.Tensor,
    lengths: torch.Tensor,
    threshold: float,
    shape: ProposalShape,
    scale: float,
    geometry: str,
    radius: float,
    generator: torch.Generator,
    options: ChainOptions | None = None,
) -> ChainRun:
    """Random-walk Metropolis for the uniform law on ``{u in F : loss(u) <= threshold}``, one chain per seed.

    A step proposes ``u' = u + (scale / sqrt(d)) z``, ``z ~`` ``shape``, and accepts iff ``u'`` is in ``F``
    and ``loss(u') <= threshold`` (the Metropolis rule for a uniform target with a symmetric proposal).
    Chain ``i`` records ``lengths[i]`` states, one every ``thin`` steps, the first ``thin`` steps after its
    seed (the seed itself is a draw of the previous level); all chains step together and every step is
    one batched call of ``loss`` (points outside ``F`` are never evaluated). With ``adapt`` the scale is
    multiplied by ``exp(acceptance - 0.3)`` after every step (used by the pilots only).

    Args:
        loss: the batched loss ``[k, d] -> [k]`` (float64).
        seeds: ``[n_c, d]`` the chains' first states (in the level).
        seed_losses: ``[n_c]`` their losses.
        lengths: ``[n_c]`` states each chain records.
        threshold: the level ``c``.
        shape: the proposal covariance.
        scale: the step scale.
        geometry: ``ball`` | ``filter`` | ``box`` (the norm of ``F``).
        radius: the size of ``F``.
        generator: all randomness.
        options: ``thin``, ``adapt`` and ``families`` (:class:`ChainOptions`; default: none of them).

    Returns:
        :class:`ChainRun`.
    """
    opts = options or ChainOptions()
    thin, adapt, families = opts.thin, opts.adapt, opts.families
    d = seeds.shape[1]
    Lmax = int(lengths.max())
    X = seeds.to(torch.float64).clone()
    loss_x = seed_losses.to(torch.float64).clone()
    states, losses = [], []
    accepted = proposed = 0
    for step in range(Lmax * thin):
        alive = torch.nonzero(lengths > step // thin).flatten()
        k = alive.numel()
        exclude = None if families is None else families[alive]
        Y = X[alive] + (scale / math.sqrt(d)) * shape.draw(k, generator, exclude)
        inside = torch.nonzero(norm_of(Y, geometry) <= radius).flatten()
        loss_y = torch.full((k,), math.inf, dtype=torch.float64)
        if inside.numel():
            loss_y[inside] = loss(Y[inside])
        ok = loss_y <= threshold
        X[alive[ok]] = Y[ok]
        loss_x[alive[ok]] = loss_y[ok]
        n_ok = int(ok.sum())
        accepted += n_ok
        proposed += k
        if adapt:
            scale = min(50.0, max(1e-4, scale * math.exp(n_ok / k - TARGET_ACCEPTANCE)))
        if (step + 1) % thin == 0:
            states.append(X.clone())
            losses.append(loss_x.clone())
    S = torch.stack(states, 1)
    loss_rows = torch.stack(losses, 1)
    mask = torch.arange(Lmax).unsqueeze(0) < lengths.unsqueeze(1)
    return ChainRun(S[mask], loss_rows[mask], lengths, accepted, proposed, scale)


# ------------------------------------------------------------------------------ subset simulation
@dataclass
class Level:
    """One intermediate level of subset simulation, frozen by the pilot.

    Attributes:
        threshold: ``c_j``: ``A_j = {u in F : loss(u) <= c_j}``.
        shape: the proposal covariance (from the other pilot's draws in ``A_j``).
        scale: the proposal scale the pilot tuned.
        thin: Metropolis steps between recorded states.
    """

    threshold: float
    shape: ProposalShape
    scale: float
    thin: int = 1


@dataclass
class LevelStats:
    """Diagnostics of one level over all replicates.

    Level ``j`` holds the draws in ``A_j`` (``A_0 = F``: independent uniform draws; later levels: chains).

    Attributes:
        threshold: the loss level those draws are counted against: ``c_{j+1}`` (the target for the last).
        fraction: mean over replicates of the conditional fraction ``n_j / N`` at or below ``threshold``.
        gamma: Au-Beck correlation factor of that fraction (mean over replicates; 0 on ``F``'s iid draws).
        acceptance: acceptance rate of the chains that filled ``A_j`` (None for ``F``).
        relative_variance: ``(1 - p_j)/(N_total p_j) (1 + gamma_j)``, pooled over replicates.
    """

    threshold: float
    fraction: float
    gamma: float
    acceptance: float | None
    relative_variance: float


@dataclass
class SubsetRun:
    """What :func:`subset_simulation` returns.

    Attributes:
        log_p: ``[R]`` natural logs of the replicates' estimates (``-inf`` for a replicate that died).
        au_beck: ``[R]`` each replicate's own Au-Beck variance of ``log p_r``.
        levels: per-level diagnostics (F first, R's level last).
        finished: False when ``max_levels`` ran out before the target (the estimate is then of the last
            level ``A_J``, an upper bound of the ratio).
        pilot_log_p: the pilot's own (biased, unused) estimate; pilot_levels: its number of levels.
        evaluations: loss evaluations, pilot included.
        final_states, final_losses: the replicates' draws of the last level (for pattern counts).
        stalled: True when the loss stopped decreasing from one level to the next (a plateau).
        capped_travel: the pilot's least :func:`chain_travel` at the largest thinning (inf if never capped).
        no_level: True when the pilot's uniform draws had fewer than ``p0 n`` finite losses, so that no level
            could be set: the loss is not finite on most of ``F`` and the replicates counted ``R`` among their
            uniform draws.
    """

    log_p: np.ndarray
    au_beck: np.ndarray
    levels: list[LevelStats]
    finished: bool
    pilot_log_p: float
    pilot_levels: int
    evaluations: int
    n: int
    final_states: torch.Tensor
    final_losses: torch.Tensor
    stalled: bool = False
    notes: list[str] = field(default_factory=list)
    capped_travel: float = math.inf
    no_level: bool = False


def _seed_count(n: int, level_fraction: float) -> int:
    return max(2, round(level_fraction * n))


def _finite(L: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isnan(L), torch.full_like(L, math.inf), L)


class _AdaptiveRun:
    """One adaptive subset-simulation run of ``n`` draws per level (a pilot): its draws, levels and scale."""

    def __init__(self, loss: LossFn, d: int, radius: float, geometry: str, n: int, generator: torch.Generator):
        self.U = sample_uniform(torch.full((n,), float(radius), dtype=torch.float64), d, geometry, generator)
        self.losses = _finite(loss(self.U))
        self.n = n
        self.evaluations = n
        self.log_p = 0.0
        self.scale = 2.38
        self.thin = 1
        self.lengths: torch.Tensor | None = None  # chain layout of the current draws (None: independent)
        self.thresholds: list[float] = []
        self.scales: list[float] = []
        self.thins: list[int] = []
        self.gammas: list[float] = []
        self.shapes: list[ProposalShape] = []
        self.finished = self.stalled = False
        self.family = torch.arange(n)  # the chain each draw comes from (all distinct at first)
        self.travel = math.inf  # chain_travel of the last level (inf: independent draws)
        self.capped_travel = math.inf  # the least chain_travel of a level thinned at MAX_THIN

    @property
    def done(self) -> bool:
        return self.finished or self.stalled

    def next_threshold(self, target: float, n_seed: int, max_levels: int) -> float | None:
        """The next level ``c`` (the ``n_seed``-th smallest loss), or None when the run is over."""
        c = float(torch.kthvalue(self.losses, n_seed).values)
        if c <= target:
            self.log_p += math.log(int((self.losses <= target).sum()) / self.n)
            self.finished = True
            return None
        previous = self.thresholds[-1] if self.thresholds else math.inf
        if not (math.isfinite(c) and c < previous) or len(self.thresholds) >= max_levels:
            self.stalled = not (math.isfinite(c) and c < previous)
            return None
        below = self.losses <= c
        self.log_p += math.log(int(below.sum()) / self.n)
        if self.lengths is not None:
            gamma = au_beck_gamma(below, self.lengths)
            self.gammas.append(gamma)
            self.thin = next_thin(self.thin, gamma, self.travel)
        return c

    def advance(self, loss, c, shape, chain_length, geometry, radius, generator, thin=None) -> None:
        """Fill the level ``{loss <= c}`` with chains from the seeds, moved with ``shape``; tune the scale."""
        thin = self.thin if thin is None else thin
        below = torch.nonzero(self.losses <= c).flatten()
        starts, lengths = plan_chains(below.numel(), self.n, chain_length, generator)
        seeds = self.U[below][starts]
        run = run_chains(
            loss, seeds, self.losses[below][starts], lengths, c, shape, self.scale, geometry, radius,
            generator, ChainOptions(thin=thin, adapt=True, families=self.family[below][starts]),
        )  # fmt: skip
        self.travel = chain_travel(seeds, run.states, lengths)
        if thin >= MAX_THIN:
            self.capped_travel = min(self.capped_travel, self.travel)
        self.thresholds.append(c)
        self.shapes.append(shape)
        self.scales.append(run.scale)
        self.thins.append(thin)
        self.scale = run.scale
        self.lengths = lengths
        self.evaluations += run.proposed
        self.U, self.losses = run.states, run.losses
        self.family = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)


def chain_travel(seeds: torch.Tensor, states: torch.Tensor, lengths: torch.Tensor) -> float:
    """How far the chains of a level travelled from their seeds, in units of the level's spread.

    ``mean_chains mean_i (x_last,i - x_seed,i)^2 / var_i``, ``var_i`` the variance of coordinate ``i`` over all
    the level's states (coordinates that do not vary are left out): 2 when every chain's last state is
    independent of its seed, ``~ steps * acceptance * scale^2 / d`` for a random walk that has not yet
    forgotten its seed.

    Args:
        seeds: ``[n_c, d]`` the chains' first states.
        states: ``[N, d]`` the recorded states, chain-major.
        lengths: ``[n_c]`` states per chain.
    """
    last = states[torch.cumsum(lengths, 0) - 1]
    var = states.var(dim=0)
    keep = var > 0
    if not bool(keep.any()):
        return math.inf
    return float((((last - seeds)[:, keep]) ** 2 / var[keep]).mean())


def next_thin(thin: int, gamma: float, travel: float) -> int:
    """The next level's thinning from this level's Au-Beck factor ``gamma`` and :func:`chain_travel`.

    Two needs, the larger wins (at most ``MAX_THIN``): ``gamma`` near ``GAMMA_TARGET`` (the level fractions'
    variance), and chains that travel at least ``TRAVEL_TARGET`` (half of what independent draws would),
    so that a level's draws do not stay clustered around their few seeds. Without the second rule the
    draws of a 100-dimensional set kept clustering level after level (measured: the travel was 0.3 at
    the thinning ``gamma`` chose), the covariances fitted on them shrank, the proposals with them, and
    the levels crept down by 0.01% of the loss per level until ``max_levels`` ran out.
    """
    by_gamma = thin * (1 + max(gamma, 0.0)) / (1 + GAMMA_TARGET)
    by_travel = thin * TRAVEL_TARGET / max(travel, 1e-6)
    return min(MAX_THIN, max(1, round(max(by_gamma, by_travel))))


def pilot_levels(
    loss: LossFn,
    d: int,
    radius: float,
    geometry: str,
    target: float,
    *,
    n: int,
    level_fraction: float,
    max_levels: int,
    generator: torch.Generator,
    tick: Callable[[int], None] | None = None,
) -> tuple[list[Level], dict[str, Any]]:
    """Two adaptive subset-simulation runs (``n`` draws per level each) that fix the levels and kernels.

    In each run ``c_{j+1}`` is the ``ceil(p0 n)``-th smallest loss of its draws in ``A_j``, and the run
    stops at the first level where that quantile is at or below ``target``; the draws below ``c_{j+1}``
    seed the chains. A proposal covariance estimated from the very draws it moves drifts them (a chain
    proposes along its own deviation from the mean; outward moves fail, inward ones pass): measured, 3%
    per level in 20 dimensions, and uniformity lost within one level in 500 dimensions; two runs lending
    each other their covariances drift too (each imprints its covariance on the other's draws, which hand
    it back a level later). So:

    * the *second* run moves with its own covariance, each chain leaving out the draws of its family (the
      states of the chain its seed came from, which sit where it sits): factor form of
      :class:`ProposalShape` on at most ``max(4d, 256)`` of its draws in ``A_j``;
    * the *first* run, which sets the levels, moves with the covariance of all the second run's draws in
      ``A_j`` (its last one once the second run is over), so no covariance it uses was built from or
      shaped by its own draws. (``A_j`` rather than only its draws below ``c_{j+1}``: ten times the
      points, and the shape of ``A_{j+1}`` up to a scale the tuning absorbs.)

    The scale is tuned step by step (acceptance 0.3) and the thinning level by level (:func:`next_thin`:
    an Au-Beck factor ``gamma`` near ``GAMMA_TARGET`` and a :func:`chain_travel` of at least
    ``TRAVEL_TARGET``). The frozen kernel of level ``j`` is the first run's: its
    threshold, the covariance it used, the scale it reached and its thinning.

    Returns:
        (levels, info) with ``info = {"log_p", "levels", "finished", "stalled", "evaluations",
        "capped_travel"}`` of the first run (``evaluations``: both; ``capped_travel``: the least
        :func:`chain_travel` of a level already thinned at ``MAX_THIN``, inf if none).
    """
    n_seed = _seed_count(n, level_fraction)
    chain_length = max(1, round(1 / level_fraction))
    runs = [_AdaptiveRun(loss, d, radius, geometry, n, generator) for _ in range(2)]
    first, second = runs
    while not first.done:
        cs = [r.next_threshold(target, n_seed, max_levels) if not r.done else None for r in runs]
        if cs[0] is None:
            break
        # the second run moves with its own covariance, each chain leaving out the draws of its own family
        # (the states of the chain its seed came from); the first run moves with the second run's covariance
        # (both fitted on the second run's draws in the current level A_j)
        keep = torch.randperm(second.U.shape[0], generator=generator)[: max(4 * d, 256)]
        shapes = [
            ProposalShape.fit(second.U),
            ProposalShape.fit(second.U[keep], families=second.family[keep]),
        ]
        for r, c, shape in zip(runs, cs, shapes):
            if c is not None:
                r.advance(loss, c, shape, chain_length, geometry, radius, generator, thin=first.thin)
        if tick is not None:
            tick(first.evaluations + second.evaluations)
    levels = [
        Level(threshold=c, shape=sh, scale=sc, thin=th)
        for c, sh, sc, th in zip(first.thresholds, first.shapes, first.scales, first.thins)
    ]
    info = {
        "log_p": first.log_p,
        "levels": len(levels),
        "finished": first.finished,
        "stalled": first.stalled,
        "evaluations": first.evaluations + second.evaluations,
        "capped_travel": first.capped_travel,
    }
    return levels, info


class _Progress:
    """Progress in loss evaluations: ``fn(done, total)``, with a total that never falls below ``done``."""

    def __init__(self, progress: Callable[[int, int], None] | None) -> None:
        self.progress = progress
        self.total = 0

    def __call__(self, done: int) -> None:
        if self.progress is not None:
            self.total = max(self.total, done)
            self.progress(done, max(done, self.total))


@dataclass
class _Replicate:
    """One independent subset-simulation run with frozen levels: its draws of the current level, its estimate.

    Attributes:
        U: ``[n, d]`` the draws of the current level; losses: ``[n]`` their losses.
        layout: chain lengths of the draws (None: independent uniform draws).
        log_p: the running ``log p_r`` (``-inf`` once the replicate lost all its draws).
        au_beck: the running Au-Beck variance of ``log p_r``.
        alive: False once a level kept none of its draws.
    """

    U: torch.Tensor
    losses: torch.Tensor
    layout: torch.Tensor | None = None
    log_p: float = 0.0
    au_beck: float = 0.0
    alive: bool = True

    def count(self, c: float, n: int) -> tuple[float, float, torch.Tensor | None]:
        """Count the draws at or below ``c`` and add the level's factor to the estimate.

        Args:
            c: the next level.
            n: draws per level.

        Returns:
            (the fraction ``n_j / n``, its Au-Beck factor ``gamma``, the indices of the draws below ``c`` or
            None when there are none: the replicate is then dead).
        """
        below = self.losses <= c
        k = int(below.sum())
        frac = k / n
        gamma = 0.0 if self.layout is None else au_beck_gamma(below, self.layout)
        if k == 0:
            self.alive = False
            self.log_p = -math.inf
            return frac, gamma, None
        self.log_p += math.log(frac)
        self.au_beck += (1 - frac) / (n * frac) * (1 + gamma)
        return frac, gamma, torch.nonzero(below).flatten()


def first_level(
    loss: LossFn,
    space: tuple[int, float, str],
    replicates: int,
    n: int,
    generator: torch.Generator,
    first: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[list[_Replicate], int]:
    """The replicates' level 0: ``n`` uniform draws of ``F`` each, given (``first``) or drawn here.

    Args:
        loss: the batched loss.
        space: ``(d, radius, geometry)`` of ``F``.
        replicates: ``R``.
        n: draws per replicate.
        generator: the randomness of the draws made here.
        first: ``(U [R n, d], losses [R n])``; replicate ``r`` takes rows ``r n .. (r+1) n - 1``.

    Returns:
        (the replicates, the loss evaluations spent here).
    """
    d, radius, geometry = space
    R = replicates
    if first is not None:
        U0, losses0, spent = first[0].to(torch.float64), _finite(first[1].to(torch.float64)), 0
    else:
        U0 = sample_uniform(torch.full((R * n,), float(radius), dtype=torch.float64), d, geometry, generator)
        losses0, spent = _finite(loss(U0)), R * n
    return [_Replicate(U0[r * n : (r + 1) * n], losses0[r * n : (r + 1) * n]) for r in range(R)], spent


def level_stats(
    threshold: float, fractions: list[float], gammas: list[float], n: int, acceptance: float | None
) -> LevelStats:
    """One level's diagnostics pooled over the live replicates (:class:`LevelStats`).

    Args:
        threshold: the level the draws were counted against.
        fractions: each live replicate's ``n_j / n``.
        gammas: their Au-Beck factors.
        n: draws per level and replicate.
        acceptance: acceptance rate of the chains that filled the level (None for ``F``).

    Returns:
        :class:`LevelStats` with ``relative_variance = (1 - p)/(n R p) (1 + gamma)`` (inf when ``p = 0``).
    """
    p_mean = float(np.mean(fractions)) if fractions else 0.0
    g_mean = float(np.mean(gammas)) if gammas else 0.0
    n_total = n * max(len(fractions), 1)
    rel_var = (1 - p_mean) / (n_total * p_mean) * (1 + g_mean) if p_mean > 0 else math.inf
    return LevelStats(threshold, p_mean, g_mean, acceptance, rel_var)


def count_level(
    replicates: list[_Replicate], c: float, n: int
) -> tuple[list[float], list[float], list[tuple[int, torch.Tensor]]]:
    """Count every live replicate's draws at or below ``c`` (:meth:`_Replicate.count`).

    Returns:
        (fractions, gammas, ``[(replicate index, indices of its draws below c)]`` for the survivors).
    """
    fractions, gammas, belows = [], [], []
    for r, rep in enumerate(replicates):
        if not rep.alive:
            continue
        frac, gamma, idx = rep.count(c, n)
        fractions.append(frac)
        gammas.append(gamma)
        if idx is not None:
            belows.append((r, idx))
    return fractions, gammas, belows


def plan_level(
    replicates: list[_Replicate],
    belows: list[tuple[int, torch.Tensor]],
    n: int,
    chain_length: int,
    generator: torch.Generator,
) -> list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The chains of the next level: for each survivor, seeds drawn from its draws in the level.

    Args:
        replicates: all replicates.
        belows: ``[(replicate index, indices of its draws in the level)]`` (:func:`count_level`).
        n: draws per level and replicate (states the chains of one replicate record).
        chain_length: the longest chain.
        generator: all randomness.

    Returns:
        ``[(replicate index, seeds [n_c, d], their losses [n_c], chain lengths [n_c])]`` (:func:`plan_chains`).
    """
    plans = []
    for r, idx in belows:
        rep = replicates[r]
        starts, lengths = plan_chains(idx.numel(), n, chain_length, generator)
        plans.append((r, rep.U[idx][starts], rep.losses[idx][starts], lengths))
    return plans


def move_level(
    loss: LossFn,
    replicates: list[_Replicate],
    plans: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]],
    level: Level,
    space: tuple[float, str],
    generator: torch.Generator,
) -> ChainRun:
    """One level's MCMC: the planned chains of all replicates run together and refill each one's draws.

    Args:
        loss: the batched loss.
        replicates: all replicates (the planned ones get new draws and layouts).
        plans: :func:`plan_level`'s chains (at least one).
        level: the frozen level (threshold, proposal shape, scale, thinning).
        space: ``(radius, geometry)`` of ``F``.
        generator: all randomness.

    Returns:
        the :class:`ChainRun` of all the chains.
    """
    radius, geometry = space
    _, seeds, seed_losses, lengths = zip(*plans)
    run = run_chains(
        loss, torch.cat(seeds), torch.cat(seed_losses), torch.cat(lengths), level.threshold, level.shape, level.scale,
        geometry, radius, generator, ChainOptions(thin=level.thin),
    )  # fmt: skip
    start = 0
    for r, _, _, ln in plans:
        m = int(ln.sum())
        replicates[r].U = run.states[start : start + m]
        replicates[r].losses = run.losses[start : start + m]
        replicates[r].layout = ln
        start += m
    return run


def subset_simulation(
    loss: LossFn,
    d: int,
    radius: float,
    geometry: str,
    target: float,
    *,
    n: int,
    replicates: int,
    generator: torch.Generator,
    level_fraction: float = 0.1,
    max_levels: int = 400,
    first: tuple[torch.Tensor, torch.Tensor] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> SubsetRun:
    """``vol{u in F : loss(u) <= target} / vol(F)`` by subset simulation with a pilot and ``R`` replicates.

    See the module docstring for the method. ``loss([k, d]) -> [k]`` (float64; NaN counts as +inf) is only
    called on points of ``F`` (``u`` coordinates: the ball or box of radius ``radius``).

    Args:
        loss: the batched loss.
        d: the dimension of ``F``.
        radius: the size of ``F``.
        geometry: ``ball`` | ``filter`` | ``box`` (the norm of ``F``).
        target: the loss level of ``R``.
        n: draws per level and replicate.
        replicates: ``R`` independent runs with the pilot's levels.
        generator: all randomness.
        level_fraction: ``p0``.
        max_levels: cap on the number of intermediate levels.
        first: ``(U [R n, d], losses [R n])``, uniform draws of ``F`` to use as the replicates' level 0
            (replicate ``r`` takes rows ``r n .. (r+1) n - 1``).
        progress: ``fn(done, total)`` in loss evaluations.

    Returns:
        :class:`SubsetRun`.
    """
    tick = _Progress(progress)
    levels, info = pilot_levels(
        loss, d, radius, geometry, target, n=n, level_fraction=level_fraction, max_levels=max_levels,
        generator=generator, tick=tick,
    )  # fmt: skip
    total_guess = info["evaluations"] + replicates * n * (len(levels) + 1)
    reps, evaluations = first_level(loss, (d, radius, geometry), replicates, n, generator, first)
    evaluations += info["evaluations"]
    stats: list[LevelStats] = []
    acceptance: float | None = None
    # no level at all (the loss is not finite on most of F): count R at level 0 (plain Monte Carlo per replicate)
    finished = bool(info["finished"]) or not levels
    thresholds = [lv.threshold for lv in levels] + ([target] if finished else [])
    chain_length = max(1, round(1 / level_fraction))
    for j, c in enumerate(thresholds):
        fractions, gammas, belows = count_level(reps, c, n)
        stats.append(level_stats(c, fractions, gammas, n, acceptance))
        # an unfinished run's last level plans its chains too (and draws from the generator) but runs none
        plans = plan_level(reps, belows, n, chain_length, generator) if j < len(levels) else []
        if j == len(thresholds) - 1 or not plans:
            break
        run = move_level(loss, reps, plans, levels[j], (radius, geometry), generator)
        evaluations += run.proposed
        acceptance = run.accepted / max(run.proposed, 1)
        tick.total = max(tick.total, total_guess)
        tick(evaluations)
    survivors = [rep for rep in reps if rep.alive]
    if progress is not None:
        progress(evaluations, evaluations)
    return SubsetRun(
        log_p=np.array([rep.log_p for rep in reps], dtype=np.float64),
        au_beck=np.array([rep.au_beck for rep in reps], dtype=np.float64),
        levels=stats,
        finished=finished,
        pilot_log_p=float(info["log_p"]),
        pilot_levels=int(info["levels"]),
        evaluations=evaluations,
        n=n,
        final_states=torch.cat([rep.U for rep in survivors]) if survivors else torch.zeros(0, d, dtype=torch.float64),
        final_losses=torch.cat([rep.losses for rep in survivors]) if survivors else torch.zeros(0, dtype=torch.float64),
        stalled=bool(info["stalled"]) and bool(levels),
        capped_travel=float(info["capped_travel"]),
        # the first level's threshold (a quantile of the pilot's uniform draws) stalls only when it is not finite
        no_level=bool(info["stalled"]) and not levels,
    )


def lognormal_interval(log_values: np.ndarray, confidence: float, floor_variance: float = 0.0):
    """Modified Cox interval for ``log E[X]`` from ``R`` values ``log X_r`` of a lognormal ``X`` (Zhou & Gao 1997).

    ``m`` and ``s^2`` the mean and variance (ddof 1) of the logs, ``s^2`` floored at ``floor_variance``:
    estimate ``m + s^2/2``, standard error ``sqrt(s^2/R + s^4/(2(R-1)))``, interval
    ``estimate +- t_{R-1, (1+confidence)/2} * stderr``.

    Returns:
        (estimate, stderr, low, high, s^2).
    """
    from scipy.stats import t as student

    x = np.asarray(log_values, dtype=np.float64)
    R = x.size
    m = float(x.mean())
    s2 = max(float(x.var(ddof=1)), float(floor_variance))
    est = m + s2 / 2
    se = math.sqrt(s2 / R + s2 * s2 / (2 * (R - 1)))
    q = float(student.ppf(0.5 + confidence / 2, R - 1))
    return est, se, est - q * se, est + q * se, s2


# --------------------------------------------------------------------------------- estimates
@dataclass
class RatioEstimate:
    """A Monte-Carlo estimate of ``p = vol(R)/vol(F)``.

    Attributes:
        value: the estimate (0 if below the float range; see ``log10``).
        stderr: its standard error (None when the value underflows; see ``log10_stderr``).
        interval: ``(low, high)`` at the requested confidence.
        log10: ``log10(value)`` (-inf when nothing hit), exact even when ``value`` underflows.
        log10_stderr: standard error of ``log10`` (inf when nothing hit).
        log10_interval: the interval's ends in log10 (-inf for a lower end of 0).
        relative_stderr: ``stderr / value`` (= ``ln(10) log10_stderr`` to first order).
        hits: models that landed in ``R`` (plain MC) or drawn in ``R`` at the last level (subset);
        draws: all models drawn.
        ess: effective number of independent draws in ``R``.
        kind: how the interval was made.
    """

    value: float
    stderr: float | None
    interval: tuple[float, float]
    log10: float
    log10_stderr: float
    log10_interval: tuple[float, float]
    relative_stderr: float
    hits: int
    draws: int
    ess: float
    kind: str


def _log10(x: float) -> float:
    return math.log10(x) if x > 0 else -math.inf


def _from_log10(x: float) -> float:
    return 10.0**x if x > -300 else 0.0


def mc_estimate(hits: torch.Tensor, confidence: float) -> RatioEstimate:
    """Plain Monte Carlo: fraction of uniform draws in ``R`` with a Clopper-Pearson interval.

    ``log10_stderr = sqrt((1-p)/(N p)) / ln 10`` (delta method; inf when ``k = 0``).
    """
    n = int(hits.numel())
    k = int(hits.sum())
    p = k / n
    se = math.sqrt(p * (1 - p) / n)
    lo, hi = clopper_pearson(k, n, confidence)
    rel = se / p if p > 0 else math.inf
    return RatioEstimate(
        value=p,
        stderr=se,
        interval=(lo, hi),
        log10=_log10(p),
        log10_stderr=rel / LN10,
        log10_interval=(_log10(lo), _log10(hi)),
        relative_stderr=rel,
        hits=k,
        draws=n,
        ess=float(k),
        kind="Clopper-Pearson",
    )


def subset_estimate(run: SubsetRun, confidence: float) -> RatioEstimate:
    """The replicates of :func:`subset_simulation` -> estimate and interval (modified Cox, module docstring).

    A replicate that died (no draw reached a level) makes the log-normal model untenable: the estimate is
    then the plain mean of the ``R`` values ``p_r`` (zeros included) with a Student-t interval on that
    mean, clipped at 0. A run that stopped before the Rashomon set (``max_levels``, or a plateau of the
    loss) has no estimate (value NaN): its interval is ``[0, upper end for the last level reached]``.
    """
    from scipy.stats import t as student

    R = run.log_p.size
    draws = run.evaluations
    last = run.levels[-1]
    hits = int((run.final_losses <= last.threshold).sum()) if run.final_losses.numel() else 0
    ess = last.fraction * run.n * R / (1 + last.gamma)
    if not run.finished:
        upper = subset_estimate(replace(run, finished=True), confidence)
        hi10 = upper.log10_interval[1]
        return RatioEstimate(
            value=math.nan,
            stderr=None,
            interval=(0.0, _from_log10(hi10)),
            log10=math.nan,
            log10_stderr=math.nan,
            log10_interval=(-math.inf, hi10),
            relative_stderr=math.nan,
            hits=0,
            draws=draws,
            ess=0.0,
            kind=f"upper bound only: the last level reached (of {R} subset-simulation runs (--subset-runs)) contains R",
        )
    if np.all(np.isfinite(run.log_p)):
        floor = float(np.mean(run.au_beck))
        est, se, lo, hi, _ = lognormal_interval(run.log_p, confidence, floor)
        hi = min(hi, 0.0)
        log10 = est / LN10
        value = _from_log10(log10)
        return RatioEstimate(
            value=value,
            stderr=value * se if value > 0 else None,
            interval=(_from_log10(lo / LN10), _from_log10(hi / LN10)),
            log10=log10,
            log10_stderr=se / LN10,
            log10_interval=(lo / LN10, hi / LN10),
            relative_stderr=se,
            hits=hits,
            draws=draws,
            ess=ess,
            kind=f"modified Cox (log-normal mean) over {R} subset-simulation runs (--subset-runs)",
        )
    top = float(np.max(run.log_p))
    if not math.isfinite(top):
        return RatioEstimate(0.0, None, (0.0, 1.0), -math.inf, math.inf, (-math.inf, 0.0), math.inf, 0, draws, 0.0,
                             "none: every subset run lost its draws")  # fmt: skip
    scaled = np.exp(run.log_p - top)
    mean = float(scaled.mean())
    sd = float(scaled.std(ddof=1)) / math.sqrt(R)
    q = float(student.ppf(0.5 + confidence / 2, R - 1))
    log10 = (top + math.log(mean)) / LN10
    lo = mean - q * sd
    log10_lo = (top + math.log(lo)) / LN10 if lo > 0 else -math.inf
    log10_hi = min(0.0, (top + math.log(mean + q * sd)) / LN10)
    value = _from_log10(log10)
    rel = sd / mean
    return RatioEstimate(
        value=value,
        stderr=value * rel if value > 0 else None,
        interval=(_from_log10(log10_lo), _from_log10(log10_hi)),
        log10=log10,
        log10_stderr=rel / LN10,
        log10_interval=(log10_lo, log10_hi),
        relative_stderr=rel,
        hits=hits,
        draws=draws,
        ess=ess,
        kind=f"Student t on the mean of {R} subset-simulation runs (--subset-runs) (some lost their draws)",
    )


def subset_notes(run: SubsetRun, est: RatioEstimate) -> list[str]:
    """Notes on the reliability of a subset-simulation interval (module docstring).

    Too few draws in ``R`` ask for more ``--draws``, unless the loss is not finite on most of ``F``
    (``run.no_level``): more draws land there just as often, a smaller ``F`` is the fix.
    """
    notes: list[str] = []
    fix = "lower --radius: the loss is not finite on most of F" if run.no_level else "raise --draws"
    dead = int(np.sum(~np.isfinite(run.log_p)))
    if dead:
        notes.append(
            f"subset simulation: {dead} of {run.log_p.size} subset runs lost all their draws at some level; the "
            f"interval is unreliable ({fix})"
        )
    worst = min(((lv.acceptance, j) for j, lv in enumerate(run.levels) if lv.acceptance is not None), default=None)
    if worst is not None and worst[0] < 0.02:
        notes.append(
            f"subset simulation: the chains accepted only {100 * worst[0]:.2g}% of their moves at level {worst[1]}; "
            "they barely move and the interval is unreliable"
        )
    if run.capped_travel < TRAVEL_TARGET / 2:
        notes.append(
            f"subset simulation: even {MAX_THIN} Metropolis steps between draws moved the chains only "
            f"{run.capped_travel:.2g} of the way to independence (target {TRAVEL_TARGET:g}); the draws of a level "
            "may stay clustered around their seeds and the interval be unreliable"
        )
    if run.finished and est.ess < 30:
        notes.append(
            f"subset simulation: only {est.ess:.3g} effective draws in the Rashomon set at the last level; the "
            f"interval is unreliable ({fix})"
        )
    finite = run.log_p[np.isfinite(run.log_p)]
    if finite.size >= 2:
        from scipy.stats import chi2

        s2 = float(finite.var(ddof=1))
        predicted = float(np.mean(run.au_beck))
        # flag when even the lower 95% confidence bound of the variance ratio exceeds 3
        lower = (finite.size - 1) * s2 / float(chi2.ppf(0.975, finite.size - 1))
        if predicted > 0 and lower > 3 * predicted:
            notes.append(
                f"subset simulation: the subset runs scatter {s2 / predicted:.3g} times more than the Au-Beck "
                "level-wise variance predicts (the chains mix slowly and stay correlated across levels); the "
                f"interval rests on {finite.size} subset runs only and may be unreliable ({fix})"
            )
        if s2 > 1.0:
            notes.append(
                f"subset simulation: the subset runs' log-ratios have standard deviation {math.sqrt(s2):.3g} > 1; "
                f"the log-normal interval is rough ({fix})"
            )
    if run.stalled:
        notes.append(
            "subset simulation: the loss stopped decreasing between levels (a plateau); no estimate, only an upper "
            f"bound (log10 ratio <= {est.log10_interval[1]:.4g})"
        )
    elif not run.finished:
        notes.append(
            f"subset simulation: --max-levels ({run.pilot_levels}) reached before the Rashomon set; no estimate, "
            f"only an upper bound (log10 ratio <= {est.log10_interval[1]:.4g}); raise --max-levels"
        )
    return notes


def uniform_stage(
    loss: LossFn,
    draws: int,
    d: int,
    radius: float,
    geometry: str,
    generator: torch.Generator,
    tick: Callable[[int, int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``draws`` uniform draws of ``F`` and their losses: ``([draws, d], [draws])`` (generated in blocks of 1024)."""
    U_parts, loss_parts = [], []
    done = 0
    while done < draws:
        k = min(1024, draws - done)
        U = sample_uniform(torch.full((k,), float(radius), dtype=torch.float64), d, geometry, generator)
        U_parts.append(U)
        loss_parts.append(loss(U).to(torch.float64))
        done += k
        if tick is not None:
            tick(done, draws)
    return torch.cat(U_parts), torch.cat(loss_parts)


def auto_choice(hits: int, draws: int) -> tuple[str, str]:
    """``auto``: plain Monte Carlo when ``hits >= 100`` of ``draws`` uniform draws fell in ``R``, else subset.

    Returns:
        (method, the reason as a sentence).
    """
    if hits >= AUTO_MIN_HITS:
        rel = math.sqrt((1 - hits / draws) / hits)
        return "mc", (
            f"auto chose plain Monte Carlo: {hits} of {draws} uniform draws fell in the Rashomon set "
            f"(>= {AUTO_MIN_HITS}: relative standard error {rel:.2g})"
        )
    return "subset", (
        f"auto chose subset simulation: only {hits} of {draws} uniform draws fell in the Rashomon set "
        f"(< {AUTO_MIN_HITS}: plain Monte Carlo's relative error would exceed 10%); those draws are its first level"
    )


@dataclass
class RatioOutcome:
    """What :func:`estimate_ratio` returns: the method used, the estimate, the subset run (or None), the note.

    ``nonfinite``: how many of the ``config.draws`` uniform draws of ``F`` have a non-finite loss (inf or NaN;
    outside ``R``).
    """

    method: str
    estimate: RatioEstimate
    run: SubsetRun | None
    choice: str
    nonfinite: int = 0


def estimate_ratio(
    loss: LossFn,
    d: int,
    radius: float,
    geometry: str,
    target: float,
    config: RashomonConfig,
    generators: tuple[torch.Generator, torch.Generator],
    progress: ProgressFn | None = None,
    uniform_loss: LossFn | None = None,
) -> RatioOutcome:
    """``vol{u in F : loss(u) <= target} / vol(F)`` by the method of ``config`` (``auto`` | ``mc`` | ``subset``).

    ``config.draws`` uniform draws of ``F`` come first (generator 0): plain Monte Carlo's sample, ``auto``'s
    test (:func:`auto_choice`) and subset simulation's first level (split over the replicates); subset
    simulation then uses generator 1. ``uniform_loss`` (default ``loss``) evaluates the uniform draws (the
    analyzer's also counts prediction patterns there).

    Args:
        loss: ``[k, d] -> [k]`` float64 losses of points of ``F`` (``u`` coordinates).
        d: the dimension of ``F``.
        radius: the size of ``F``.
        geometry: ``ball`` | ``filter`` | ``box`` (the norm of ``F``).
        target: the loss level of ``R``.
        config: method, draws, replicates, level fraction, max levels, confidence.
        generators: two independent generators.
        progress: ``fn(task, done, total)``.
        uniform_loss: optional loss for the uniform draws.

    Returns:
        :class:`RatioOutcome`.
    """
    U, losses = uniform_stage(
        uniform_loss or loss, config.draws, d, radius, geometry, generators[0], bind(progress, "models")
    )
    hits = losses <= target
    nonfinite = int((~torch.isfinite(losses)).sum())
    method, choice = config.method, ""
    if method == "auto":
        method, choice = auto_choice(int(hits.sum()), config.draws)
    if method == "mc":
        return RatioOutcome("mc", mc_estimate(hits, config.confidence), None, choice, nonfinite)
    n = config.draws // config.subset_runs
    run = subset_simulation(
        loss, d, radius, geometry, target, n=n, replicates=config.subset_runs, generator=generators[1],
        level_fraction=config.level_fraction, max_levels=config.max_levels,
        first=(U[: n * config.subset_runs], losses[: n * config.subset_runs]),
        progress=bind(progress, "subset simulation (loss evaluations)"),
    )  # fmt: skip
    return RatioOutcome("subset", subset_estimate(run, config.confidence), run, choice, nonfinite)


def _pattern_key(row: torch.Tensor) -> bytes:
    return hashlib.blake2b(row.to(torch.int64).numpy().tobytes(), digest_size=16).digest()


# ------------------------------------------------------------------------------------- analyzer
def describe_space(geometry: str, radius: float, d: int) -> str:
    """The hypothesis space ``F`` as a sentence (for the metadata).

    Args:
        geometry: ``ball`` | ``filter`` | ``box``.
        radius: ``r``.
        d: the number of analysed parameters.

    Returns:
        e.g. ``F = {w + u : ||u||_2 <= 0.1} over the 20 analysed parameters``.
    """
    if geometry == "ball":
        return f"F = {{w + u : ||u||_2 <= {radius:g}}} over the {d} analysed parameters"
    if geometry == "filter":
        return (
            f"F = {{w + s*u : ||u||_2 <= {radius:g}}} over the {d} analysed parameters, s = per-filter weight "
            "norms (1-d tensors: their own norm)"
        )
    return f"F = {{w + u : |u_i| <= {radius:g} for all i}} over the {d} analysed parameters"


class _ModelLoss:
    """The loss of the models ``w + s * u`` for rows ``u`` of ``F``; tracks their lowest loss and their patterns.

    Attributes:
        min_loss: the lowest loss seen (the checkpoint's to start with).
        patterns_all: keys of the prediction vectors of every model evaluated with patterns.
        patterns_in: those of the models in ``R`` (loss at or below ``threshold``).
    """

    def __init__(self, evaluator: Any, w: torch.Tensor, scale: torch.Tensor, base: float, threshold: float) -> None:
        self.evaluator = evaluator
        self.w = w
        self.scale = scale
        self.threshold = threshold
        self.min_loss = base
        self.patterns_all: set[bytes] = set()
        self.patterns_in: set[bytes] = set()

    def points(self, U: torch.Tensor) -> torch.Tensor:
        """``[k, d]`` perturbations -> ``[k, d]`` flat parameter vectors ``w + s * u``."""
        return self.w.unsqueeze(0) + self.scale.unsqueeze(0) * U.to(dtype=self.w.dtype, device=self.w.device)

    def _track(self, L: torch.Tensor) -> None:
        if L.numel():
            self.min_loss = min(self.min_loss, float(torch.nan_to_num(L, nan=math.inf).min()))

    def loss(self, U: torch.Tensor) -> torch.Tensor:
        """``[k, d] -> [k]`` float64 losses."""
        L = self.evaluator.evaluate(self.points(U)).loss.to(torch.float64)
        self._track(L)
        return L

    def add_reference(self, predictions: torch.Tensor) -> None:
        """The checkpoint's own prediction vector: in ``F`` and in ``R``."""
        key = _pattern_key(predictions)
        self.patterns_all.add(key)
        self.patterns_in.add(key)

    def loss_and_patterns(self, U: torch.Tensor) -> torch.Tensor:
        """:meth:`loss`, and the prediction vectors of the models counted (all, and those in ``R``)."""
        stats = self.evaluator.evaluate(self.points(U), predictions=True)
        L = stats.loss.to(torch.float64)
        for i in range(L.numel()):
            key = _pattern_key(stats.predictions[i])
            self.patterns_all.add(key)
            if bool(L[i] <= self.threshold):
                self.patterns_in.add(key)
        self._track(L)
        return L

    def count_last_level(self, run: SubsetRun, draws: int) -> None:
        """Count the patterns of (at most ``draws``) draws of subset simulation's last level that lie in ``R``."""
        sel = torch.nonzero(run.final_losses <= self.threshold).flatten()[:draws]
        for start in range(0, sel.numel(), 1024):
            self.loss_and_patterns(run.final_states[sel[start : start + 1024]])

    def pattern_ratio(self) -> float:
        """Distinct prediction vectors in ``R`` over those in ``F``."""
        return len(self.patterns_in) / len(self.patterns_all)


def setup_notes(config: RashomonConfig, pattern_capable: bool, scale: torch.Tensor) -> list[str]:
    """Notes on the set-up: no pattern ratio for a non-classification model; unperturbed zero filters.

    Args:
        config: the settings.
        pattern_capable: whether the outputs and targets are classification labels.
        scale: ``s``, the per-entry scale of the perturbation.

    Returns:
        the notes, in order.
    """
    notes = []
    if config.patterns and not pattern_capable:
        notes.append("no pattern Rashomon ratio: the outputs/targets are not classification labels")
    if config.geometry == "filter" and bool((scale == 0).any()):
        notes.append(
            f"{int((scale == 0).sum())} parameters sit in all-zero filters/tensors and are not perturbed "
            "in the filter geometry"
        )
    return notes


def nonfinite_notes(nonfinite: int, config: RashomonConfig, dtype: torch.dtype) -> list[str]:
    """A note when some uniform draws of ``F`` have a non-finite loss: ``F`` reaches where the loss overflows.

    Args:
        nonfinite: how many of the ``config.draws`` uniform draws have a loss that is inf or NaN.
        config: the settings (``draws``, ``geometry``, ``radius``).
        dtype: the dtype the weights are analysed in.

    Returns:
        the note, or nothing.
    """
    if not nonfinite:
        return []
    name = str(dtype).replace("torch.", "")
    fix = "use a smaller --radius" + ("" if dtype == torch.float64 else " or --dtype float64")
    return [
        f"{nonfinite} of {config.draws} uniform draws in F ({config.geometry}, radius {config.radius:g}) have a "
        f"non-finite loss (counted as outside the Rashomon set): F reaches where the {name} loss overflows; {fix}"
    ]


def outcome_notes(outcome: RatioOutcome, base: float, min_loss: float) -> list[str]:
    """Notes from the estimate and its diagnostics: the method choice, no hit, unreliable intervals, underflow.

    Args:
        outcome: :func:`estimate_ratio`'s result.
        base: ``L(w)``, the checkpoint's loss.
        min_loss: the lowest loss among the sampled models.

    Returns:
        the notes, in order.
    """
    est = outcome.estimate
    notes = [outcome.choice] if outcome.choice else []
    if outcome.method == "mc" and est.hits == 0:
        notes.append(
            "no sampled model fell in the Rashomon set: the ratio is below the resolution of this sample; "
            "use --method subset (or auto), raise --theta or lower --radius"
        )
    if outcome.run is not None:
        notes.extend(subset_notes(outcome.run, est))
    if est.value == 0.0 and math.isfinite(est.log10):
        notes.append(f"the ratio is below the float range: log10(ratio) = {est.log10:.6g}")
    if min_loss < base - 1e-12 * max(abs(base), 1.0):
        notes.append(
            f"some sampled models have a lower loss ({min_loss:.6g}) than the checkpoint ({base:.6g}); the "
            "reference L(w) is the checkpoint's loss, not the minimum over F"
        )
    return notes


def ratio_rows(est: RatioEstimate, pattern_ratio: float | None) -> list[tuple]:
    """The records' rows: ratio, log10 ratio (when finite), the interval's finite ends, the pattern ratio.

    Args:
        est: the estimate.
        pattern_ratio: the pattern Rashomon ratio, or None.

    Returns:
        ``(metric, value[, stderr[, index]])`` tuples for :func:`make_records`.
    """
    rows: list[tuple] = [("rashomon_ratio", est.value, est.stderr)]
    if math.isfinite(est.log10):
        rows.append(("rashomon_log10_ratio", est.log10, est.log10_stderr))
    rows += [
        ("rashomon_log10_interval", end, None, i) for i, end in enumerate(est.log10_interval) if math.isfinite(end)
    ]
    if pattern_ratio is not None:
        rows.append(("rashomon_pattern_ratio", pattern_ratio))
    return rows


def estimate_metadata(est: RatioEstimate, confidence: float) -> dict[str, Any]:
    """The metadata's ``estimate`` table.

    Args:
        est: the estimate.
        confidence: the level of its interval.

    Returns:
        value, standard error, interval (linear and log10), hits, draws, effective sample size.
    """
    return {
        "value": est.value,
        "stderr": est.stderr,
        "interval": list(est.interval),
        "confidence": confidence,
        "interval_kind": est.kind,
        "log10_ratio": est.log10,
        "log10_stderr": est.log10_stderr,
        "log10_interval": list(est.log10_interval),
        "relative_stderr": est.relative_stderr,
        "hits": est.hits,
        "draws": est.draws,
        "effective_sample_size": est.ess,
    }


def subset_metadata(run: SubsetRun | None, level_fraction: float) -> dict[str, Any]:
    """The metadata's ``subset_simulation`` table: the replicates and the level-wise diagnostics.

    Args:
        run: the subset-simulation run, or None (plain Monte Carlo: an empty table).
        level_fraction: ``p0``.

    Returns:
        replicates, draws per level, levels, their thresholds, fractions, gammas, acceptance rates and
        relative variances, the replicates' log10 ratios, the Au-Beck variance and the evaluations.
    """
    if run is None:
        return {}
    return {
        "replicates": int(run.log_p.size),
        "draws_per_level": run.n * int(run.log_p.size),
        "level_fraction": level_fraction,
        "levels": len(run.levels) - 1,
        "finished": run.finished,
        "replicate_log10_ratios": [float(x) / LN10 for x in run.log_p],
        "au_beck_log_variance": float(np.mean(run.au_beck)),
        "pilot_log10_ratio": run.pilot_log_p / LN10,
        "level_thresholds": [lv.threshold for lv in run.levels],
        "level_fractions": [lv.fraction for lv in run.levels],
        "level_gammas": [lv.gamma for lv in run.levels],
        "level_acceptance": [lv.acceptance for lv in run.levels],
        "level_relative_variances": [lv.relative_variance for lv in run.levels],
        "evaluations": run.evaluations,
    }


def analyze_rashomon(config: RashomonConfig, ctx: Context, progress: ProgressFn | None = None) -> Result:
    """Rashomon ratio (and pattern ratio) of the hypothesis space around ``ctx``'s weights.

    Args:
        config: the settings (:class:`RashomonConfig`).
        ctx: the model, data and loss.
        progress: ``fn(task, done, total)``.

    Returns:
        Records ``rashomon_ratio`` (stderr), ``rashomon_log10_ratio`` (stderr; omitted when no model hit
        ``R``), ``rashomon_log10_interval`` (index 0/1: the interval's ends where finite) and
        ``rashomon_pattern_ratio`` (classification); the metadata hold the method, the interval, the
        level-wise diagnostics of subset simulation and the notes.
    """
    check_config(config)
    space = directions.FlatSpace.of(ctx.params)
    d = space.dim
    w = space.flatten(ctx.params)
    if config.geometry == "filter":
        scale = directions.filter_scales(ctx.params, include_1d=True)
    else:
        scale = torch.ones_like(w)
    evaluator = directions.PointEvaluator(ctx, chunk=config.chunk, backend=config.backend)
    want_patterns = config.patterns and evaluator.kind is not None
    ref = evaluator.evaluate(w.reshape(1, -1), predictions=want_patterns)
    base = float(ref.loss[0])
    threshold = base + config.theta
    notes: list[str] = list(evaluator.notes) + setup_notes(config, evaluator.kind is not None, scale)
    model = _ModelLoss(evaluator, w, scale, base, threshold)
    if want_patterns:
        model.add_reference(ref.predictions[0])
    outcome = estimate_ratio(
        model.loss, d, config.radius, config.geometry, threshold, config, (ctx.generator(51), ctx.generator(52)),
        progress, uniform_loss=model.loss_and_patterns if want_patterns else None,
    )  # fmt: skip
    if want_patterns and outcome.run is not None and outcome.run.finished:  # the last level's draws in R
        model.count_last_level(outcome.run, config.draws)
    notes += nonfinite_notes(outcome.nonfinite, config, w.dtype) + outcome_notes(outcome, base, model.min_loss)
    rows = ratio_rows(outcome.estimate, model.pattern_ratio() if want_patterns else None)
    metadata: dict[str, Any] = {
        "hypothesis_space": describe_space(config.geometry, config.radius, d),
        "rashomon_set": f"R = {{f in F : L(f) <= L(w) + theta}}, theta = {config.theta:g} (absolute loss)",
        "reference_loss": base,
        "threshold": threshold,
        "dim": d,
        "method": outcome.method,
        "method_choice": outcome.choice,
        "estimate": estimate_metadata(outcome.estimate, config.confidence),
        "nonfinite_draws": outcome.nonfinite,
        "subset_simulation": subset_metadata(outcome.run, config.level_fraction),
        "evaluations": evaluator.evaluations,
        "backend": evaluator.backend,
        "backend_reason": evaluator.backend_reason,
    }
    if want_patterns:
        metadata["patterns"] = {
            "in_rashomon_set": len(model.patterns_in),
            "in_space": len(model.patterns_all),
            "definition": "distinct prediction vectors on the data among sampled models in R / in F",
        }
    metadata["notes"] = notes
    return Result(make_records(ctx.checkpoint, ctx.step, NAME, rows), metadata)


ANALYZER = Analyzer(
    name=NAME,
    summary="Rashomon ratio (Monte Carlo / subset simulation) and pattern ratio around the weights",
    description="Rashomon ratio: the fraction of F around the weights whose loss is within theta of the "
    "checkpoint's. Plain Monte Carlo with a Clopper-Pearson interval, or subset simulation (independent runs, an "
    "interval on log10 ratio) for small ratios, down to 1e-100 and below; also the pattern Rashomon ratio "
    "(distinct prediction patterns in R over those in F).",
    config=RashomonConfig,
    order=80,
    run=analyze_rashomon,
    metrics=(
        Metric(
            "rashomon_ratio",
            "vol(R) / vol(F), R = {f in F : L(f) <= L(w) + theta}; plain Monte Carlo k/N (stderr sqrt(p(1-p)/N)) or "
            "subset simulation prod_j P(A_j+1 | A_j) (stderr by the delta method from log10); 0 below the float range",
            headline=True,
            reference="Semenova, Rudin, Parr 2022; Au & Beck 2001",
        ),
        Metric(
            "rashomon_log10_ratio",
            "log10 of the Rashomon ratio with its standard error (modified Cox estimate over independent "
            "subset-simulation runs, or log10(k/N)); absent when no sampled model fell in R",
            headline=True,
            reference="Zhou & Gao 1997 (interval)",
        ),
        Metric(
            "rashomon_log10_interval",
            "ends of the confidence interval of log10 ratio (Clopper-Pearson, or modified Cox for subset "
            "simulation); an end that is -inf (no model in R) is left out",
            index="0 = lower end, 1 = upper end",
        ),
        Metric(
            "rashomon_pattern_ratio",
            "distinct prediction vectors on the data among the sampled models in R / among those in F "
            "(classification; both counts are lower bounds that grow with the draws)",
            reference="Semenova, Rudin, Parr 2022",
        ),
    ),
    sections=(
        Section(
            "Rashomon ratio",
            ("rashomon_log10_ratio",),
            "log10 of the fraction of the stated hypothesis space F whose loss is within theta of the checkpoint's "
            "(band = ±1 standard error); a larger Rashomon set means a flatter, more forgiving region.",
        ),
        Section(
            "Pattern Rashomon ratio",
            ("rashomon_pattern_ratio",),
            "Distinct prediction patterns among sampled models in the Rashomon set over those in F.",
        ),
    ),
)
