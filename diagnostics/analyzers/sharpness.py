"""Sharpness of the loss at a checkpoint: worst-case, adaptive, average-case; edge-of-stability figures.

Metrics (records; ``group`` is null):

* ``sharpness_worst`` (SAM sharpness; Foret et al. 2021, "Sharpness-Aware Minimization"; Keskar et
  al. 2017): ``max_{||e||_2 <= rho} L(w + e) - L(w)``, solved by projected gradient ascent on the ball
  with backtracking (a step is kept only if it raises the loss) from several starts (the SAM one-step
  point ``rho g/||g||`` and seeded random points on the sphere); the best value is reported. At a
  minimum of a quadratic it is ``rho^2 lambda_max / 2``; elsewhere it is the trust-region value.
  The one-step SAM approximation is kept in the metadata for comparison.
* ``sharpness_adaptive`` (ASAM; Kwon et al. 2021, "ASAM: Adaptive Sharpness-Aware Minimization"):
  ``max_{||T_w^-1 e||_2 <= rho} L(w + e) - L(w)`` with ``T_w = diag(|w| + eta)``, i.e. the same ascent
  over ``u`` in the ball with ``e = T_w u``; invariant to rescaling weights (for ``eta -> 0``). At a
  quadratic minimum: ``rho^2 lambda_max(T_w H T_w) / 2``.
* ``sharpness_average`` (Keskar et al. 2017; Jiang et al. 2020, "Fantastic Generalization Measures"):
  ``E[L(w + e)] - L(w)`` with ``e ~ N(0, sigma^2 I)``, estimated by ``draws`` antithetic pairs
  ``(L(w + e) + L(w - e))/2 - L(w)`` (same expectation, the linear term cancels exactly), ``stderr`` =
  sample standard deviation / sqrt(draws). ``sigma`` defaults to ``rho / sqrt(d)`` (``d`` analysed
  parameters), so that ``E||e||^2 = rho^2`` as for the worst case; for a quadratic the value is
  ``sigma^2 tr(H) / 2``.
* ``eos_threshold``: the edge-of-stability threshold from the optimizer metadata (Cohen et al. 2021,
  2022; :mod:`diagnostics.analyzers.eos`): ``2/eta`` for gradient descent, ``(2 + 2 beta)/eta`` with
  heavy-ball momentum, ``(2 + 2 beta)/((1 + 2 beta) eta)`` with Nesterov, and for Adam
  ``(2 + 2 beta1)/((1 - beta1) eta)`` (38/eta for beta1 = 0.9), which bounds the preconditioned
  sharpness below.
* ``preconditioned_eigenvalue`` (Adam; Cohen et al. 2022, "Adaptive Gradient Methods at the Edge of
  Stability"): ``lambda_max(P^-1 H)`` with ``P = (1 - beta1^t) diag(sqrt(v_t / (1 - beta2^t)) + eps)``,
  ``v_t`` the optimizer's second moments (``exp_avg_sq``; ``max_exp_avg_sq`` with AMSGrad) and ``t`` its
  step count. Computed by Lanczos on the symmetric ``P^-1/2 H P^-1/2`` (same eigenvalues); ``stderr`` is
  the eigenvalue error bound of the Ritz value (gap theorem; the residual is in the metadata). Needs a checkpoint that saved the optimizer state.
* ``eos_ratio`` (Adam with state): ``preconditioned_eigenvalue / eos_threshold`` (about 1 at the edge
  of stability). For GD/momentum the raw ``eos_ratio`` comes from ``diag hessian``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from diagnostics.analyzers.eos import eos_notes, eos_threshold, lr_info
from diagnostics.errors import DiagnosticsError
from diagnostics.lazy import lazy_from, lazy_import
from diagnostics.progress import bind
from diagnostics.results import Result, make_records
from diagnostics.spec import Analyzer, Metric, Section, Threshold, check_config, option

if TYPE_CHECKING:
    from diagnostics.context import Context
    from diagnostics.directions import FlatSpace, PointEvaluator
    from diagnostics.progress import ProgressFn

torch = lazy_import("torch")
batch_size = lazy_from("diagnostics.context", "batch_size")
FlatSpace, PointEvaluator = lazy_from("diagnostics.directions", "FlatSpace", "PointEvaluator")
lanczos = lazy_from("diagnostics.linalg.lanczos", "lanczos")
preconditioned = lazy_from("diagnostics.linalg.operator", "preconditioned")
hessian_operator = lazy_from("diagnostics.operators", "hessian_operator")

NAME = "sharpness"
KINDS = ("worst", "adaptive", "average")
EVAL_BACKENDS = ("auto", "vmap", "loop")


@dataclass
class SharpnessConfig:
    """Settings of :func:`analyze_sharpness` (options of ``diag sharpness``, ``[sharpness]`` in diag.toml).

    ``kind`` lists the sharpness kinds (``all`` = every kind); ``sigma`` defaults to ``rho / sqrt(d)``; the
    ascent's first start is the SAM one-step point; ``eig_tol``/``eig_max_iter`` drive the Lanczos run of
    Adam's preconditioned eigenvalue; ``chunk``/``backend`` the batched evaluation of the Gaussian draws.
    """

    kind: list[str] = option(
        default_factory=lambda: ["worst"], help="which sharpness", choices=(*KINDS, "all"), metavar="KIND"
    )
    rho: float = option(0.05, help="radius of the perturbation ball", min=0, min_open=True)
    sigma: float | None = option(
        None, help="std of the Gaussian for --kind average (default rho/sqrt(#params))", min=0, min_open=True
    )
    restarts: int = option(3, help="starts of the projected gradient ascent", min=1)
    max_iter: int = option(100, help="ascent steps per start", min=1)
    tol: float = option(
        1e-7, help="stop when a step gains < tol x the sharpness", min=0, max=1, min_open=True, max_open=True
    )
    adaptive_eta: float = option(0.01, help="eta of ASAM's T_w = |w| + eta", min=0)
    draws: int = option(100, help="antithetic Gaussian pairs for --kind average", min=2)
    eos: bool = option(True, help="report the edge-of-stability threshold (and Adam's lambda_max(P^-1 H))")
    lr: float | None = option(
        None, help="learning rate for the thresholds (default: from the checkpoint)", min=0, min_open=True
    )
    eig_tol: float = option(
        1e-3, help="Lanczos tolerance for lambda_max(P^-1 H)", min=0, max=1, min_open=True, max_open=True
    )
    eig_max_iter: int = option(300, help="Lanczos iteration cap for lambda_max(P^-1 H)", min=1)
    chunk: int = option(32, help="perturbed models per batched evaluation", min=1)
    backend: str = option(
        "auto",
        help="evaluation of the Gaussian draws (auto: vmap, or one at a time for CPU conv nets)",
        choices=EVAL_BACKENDS,
    )

    @property
    def kinds(self) -> list[str]:
        """The kinds asked for, ``all`` expanded."""
        parts = [self.kind] if isinstance(self.kind, str) else list(self.kind)
        parts = [p.strip() for item in parts for p in item.split(",") if p.strip()]
        return list(KINDS) if parts == ["all"] else list(dict.fromkeys(parts))

    def validate(self) -> None:
        """Cross-option rules (single options are checked from their declarations)."""
        if not self.kinds or ("all" in self.kinds and len(self.kinds) > 1):
            raise DiagnosticsError("--kind takes worst, adaptive, average (a comma-separated list) or all")


# ------------------------------------------------------------------------------ loss and gradient
def loss_and_grad(ctx: Context, space: FlatSpace, flat: torch.Tensor) -> tuple[float, torch.Tensor]:
    """``(L(w), grad L(w))`` of the sample-weighted mean loss at the flat point ``w`` (``[dim]``)."""
    sizes = [batch_size(b) for b in ctx.batches]
    n = float(sum(sizes))
    total = 0.0
    grad = torch.zeros_like(flat)
    for batch, nb in zip(ctx.batches, sizes):

        def f(v: torch.Tensor, batch=batch) -> torch.Tensor:
            return ctx.batch_loss(space.unflatten(v), batch)

        g, value = torch.func.grad_and_value(f)(flat)
        total += float(value) * nb / n
        grad += g * (nb / n)
    return total, grad


@dataclass
class AscentResult:
    """One run of projected gradient ascent: best ``f`` and where, steps, evaluations, converged."""

    value: float
    u: torch.Tensor
    iterations: int
    evaluations: int
    converged: bool


def check_finite_loss(value: float, where: str, fix: str) -> float:
    """``value`` if finite, else :class:`DiagnosticsError` naming the point and the fix (one line).

    A perturbed loss that overflows (``inf``) or is undefined (``NaN``) has no sharpness to report: the
    ascent would read it as "no ascent step" and report 0, the Gaussian mean would be ``inf``.
    """
    if not math.isfinite(value):
        raise DiagnosticsError(f"the loss is {value} at {where}; {fix}")
    return value


RHO_FIX = "the perturbation leaves the region where the loss is finite: use a smaller --rho (or --dtype float64)"


def safe_norm(u: torch.Tensor) -> float:
    """``||u||_2`` without overflow of the squares (``max|u| * ||u / max|u|||``; ``1e30`` in float32 is fine)."""
    top = float(u.abs().max()) if u.numel() else 0.0
    if top == 0.0 or not math.isfinite(top):
        return top
    return top * float((u / top).norm())


def project_ball(u: torch.Tensor, rho: float) -> torch.Tensor:
    """Euclidean projection onto ``{||u|| <= rho}``."""
    norm = safe_norm(u)
    return u if norm <= rho else u * (rho / norm)


def projected_ascent(
    fg: Callable[[torch.Tensor], tuple[float, torch.Tensor]],
    u0: torch.Tensor,
    rho: float,
    *,
    max_iter: int = 100,
    tol: float = 1e-7,
    base: float = 0.0,
    max_step: float = 1e3,
    armijo: float = 0.1,
    max_halvings: int = 12,
) -> AscentResult:
    """Maximise ``f(u)`` over ``||u|| <= rho`` by projected normalised gradient ascent with backtracking.

    Step ``u' = P(u + t rho g/||g||)``, kept only if it raises ``f`` by at least ``armijo`` times the
    linear prediction ``g . (u' - u)`` (Armijo along the projection arc; else ``t`` halves); ``t`` doubles
    after a kept step (up to ``max_step``), so near a maximiser on the sphere the iteration tends to the
    power method on the Hessian, while directions of negative curvature get damped instead of
    oscillating. Stops when a kept step gains ``<= tol * |f - base|``, or when ``max_halvings`` halvings
    of ``t`` find no acceptable step (the maximiser is resolved to the precision of ``f``).

    Raises:
        DiagnosticsError: ``f`` is not finite at a point evaluated (NaN would pass for "no ascent").
    """

    def checked(v: torch.Tensor) -> tuple[float, torch.Tensor]:
        value, grad = fg(v)
        where = f"a point of the ascent at radius {safe_norm(v):.3g} (rho {rho:.3g})"
        check_finite_loss(value, where, RHO_FIX)
        if not bool(torch.isfinite(grad).all()):
            raise DiagnosticsError(f"the gradient of the loss is not finite at {where}; {RHO_FIX}")
        return value, grad

    u = project_ball(u0, rho)
    f, g = checked(u)
    evals = 1
    t = 1.0
    converged = False
    it = 0
    for it in range(1, max_iter + 1):  # noqa: B007 - the count is reported
        gn = safe_norm(g)
        if gn == 0.0:
            converged = True
            break
        for _ in range(max_halvings + 1):
            trial = project_ball(u + (t * rho / gn) * g, rho)
            ft, gt = checked(trial)
            evals += 1
            if ft > f and ft - f >= armijo * float(torch.dot(g, trial - u)):
                break
            t *= 0.5
        if not (ft > f and ft - f >= armijo * float(torch.dot(g, trial - u))):
            converged = True  # no ascent step left at this resolution
            break
        gain = ft - f
        u, f, g = trial, ft, gt
        t = min(2.0 * t, max_step)
        if gain <= tol * max(abs(f - base), 1e-300):
            converged = True
            break
    return AscentResult(value=f, u=u, iterations=it, evaluations=evals, converged=converged)


def worst_case_sharpness(
    ctx: Context,
    rho: float,
    *,
    scale: torch.Tensor | None = None,
    restarts: int = 3,
    max_iter: int = 100,
    tol: float = 1e-7,
    stream: int = 10,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[float, dict[str, Any]]:
    """``max_{||u|| <= rho} L(w + T u) - L(w)`` with ``T = diag(scale)`` (identity if None).

    Returns:
        (value, info with the per-start values, steps, evaluations and the one-step SAM value).

    Raises:
        DiagnosticsError: the loss is not finite at a point of the ball evaluated (suggests a smaller rho).
    """
    space = FlatSpace.of(ctx.params)
    w = space.flatten(ctx.params)
    T = torch.ones_like(w) if scale is None else scale.to(dtype=w.dtype, device=w.device)

    def fg(u: torch.Tensor) -> tuple[float, torch.Tensor]:
        value, grad = loss_and_grad(ctx, space, w + T * u)
        return value, T * grad

    base, g0 = fg(torch.zeros_like(w))
    check_finite_loss(base, "the checkpoint's weights", "check the data, the loss and whether training diverged")
    starts: list[tuple[str, torch.Tensor]] = []
    g0n = safe_norm(g0)
    one_step = None
    if g0n > 0:
        u_sam = g0 * (rho / g0n)
        starts.append(("sam", u_sam))
        one_step = check_finite_loss(fg(u_sam)[0], f"the one-step SAM point (rho {rho:.3g})", RHO_FIX) - base
    gen = ctx.generator(stream)
    while len(starts) < restarts:
        r = torch.randn(space.dim, generator=gen, dtype=torch.float64).to(dtype=w.dtype, device=w.device)
        starts.append(("random", r * (rho / float(r.norm()))))
    runs = []
    best = -math.inf
    for i, (kind, u0) in enumerate(starts):
        res = projected_ascent(fg, u0, rho, max_iter=max_iter, tol=tol, base=base)
        runs.append(
            {
                "start": kind,
                "value": res.value - base,
                "iterations": res.iterations,
                "evaluations": res.evaluations,
                "converged": res.converged,
                "radius": safe_norm(res.u),
            }
        )
        best = max(best, res.value - base)
        if progress is not None:
            progress(i + 1, len(starts))
    info = {
        "loss": base,
        "gradient_norm": g0n,
        "one_step": one_step,
        "runs": runs,
        "evaluations": 1 + (one_step is not None) + sum(r["evaluations"] for r in runs),
    }
    return max(best, 0.0), info


def average_case_sharpness(
    evaluator: PointEvaluator,
    sigma: float,
    draws: int,
    generator: torch.Generator,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[float, float, dict[str, Any]]:
    """``E[L(w + e)] - L(w)``, ``e ~ N(0, sigma^2 I)``, from antithetic pairs; returns (mean, stderr, info).

    Raises:
        DiagnosticsError: the loss is not finite at a drawn point (the mean would be ``inf`` or NaN).
    """
    space = evaluator.space
    w = space.flatten(evaluator.ctx.params)
    base = float(evaluator.evaluate(w.reshape(1, -1)).loss[0])
    check_finite_loss(base, "the checkpoint's weights", "check the data, the loss and whether training diverged")
    values = []
    per = max(1, evaluator.chunk // 2)
    done = 0
    while done < draws:
        k = min(per, draws - done)
        E = torch.randn(k, space.dim, generator=generator, dtype=torch.float64) * sigma
        E = E.to(dtype=w.dtype, device=w.device)
        stats = evaluator.evaluate(torch.cat([w + E, w - E]))
        bad = [float(x) for x in stats.loss if not math.isfinite(float(x))]
        if bad:
            check_finite_loss(
                bad[0],
                f"{len(bad)} of {2 * k} Gaussian points (sigma {sigma:.3g})",
                "the draws leave the region where the loss is finite: use a smaller --sigma or --rho "
                "(sigma defaults to rho/sqrt(#params)), or --dtype float64",
            )
        values.append(0.5 * (stats.loss[:k] + stats.loss[k:]) - base)
        done += k
        if progress is not None:
            progress(done, draws)
    v = torch.cat(values)
    mean = float(v.mean())
    stderr = float(v.std(unbiased=True)) / math.sqrt(draws)
    return mean, stderr, {"loss": base, "sigma": sigma, "draws": draws, "evaluations": 2 * draws + 1}


# --------------------------------------------------------------------------- Adam preconditioning
def _state_index(ctx: Context, opt_state: Mapping[str, Any]) -> dict[str, Any]:
    """Optimizer state entry and param group of every analysed parameter, matched by position."""
    groups = opt_state.get("param_groups") or []
    state = opt_state.get("state") or {}
    ids: list[Any] = []
    group_of: dict[Any, Mapping[str, Any]] = {}
    for g in groups:
        for pid in g.get("params", []):
            ids.append(pid)
            group_of[pid] = g
    named = list(ctx.model.named_parameters())
    trainable = [n for n, p in named if p.requires_grad]
    if len(ids) == len(named):
        order = [n for n, _ in named]
    elif len(ids) == len(trainable):
        order = trainable
    else:
        raise DiagnosticsError(
            f"the optimizer state covers {len(ids)} parameters but the model has {len(named)} "
            f"({len(trainable)} trainable); cannot match Adam's second moments to the weights"
        )
    out = {}
    shapes = {n: tuple(p.shape) for n, p in named}
    for name, pid in zip(order, ids):
        entry = state.get(pid, state.get(str(pid)))
        out[name] = (entry, group_of[pid])
        if entry is not None:
            v = entry.get("max_exp_avg_sq") if group_of[pid].get("amsgrad") else entry.get("exp_avg_sq")
            if isinstance(v, torch.Tensor) and tuple(v.shape) != shapes[name]:
                raise DiagnosticsError(
                    f"optimizer state for '{name}' has shape {tuple(v.shape)} but the weight has {shapes[name]}; "
                    "the optimizer was not built from model.parameters() in order"
                )
    return out


def adam_preconditioner(ctx: Context, lr: float) -> tuple[torch.Tensor, dict[str, Any]]:
    """``diag(P_eff)`` ``[dim]`` of Adam at the checkpoint (Cohen et al. 2022), over ``ctx.params``.

    ``P = (1 - beta1^t) (sqrt(v_t / (1 - beta2^t)) + eps)`` per entry, from the group's betas/eps and the
    parameter's step count ``t``. Param groups whose learning rate ``eta_g`` differs from ``lr`` are
    folded in as ``P_eff = P lr / eta_g`` (the update is ``eta_g P^-1 m = lr P_eff^-1 m``).

    Raises:
        DiagnosticsError: no optimizer state, or state that does not match the parameters.
    """
    opt_state = ctx.optimizer_state
    if not isinstance(opt_state, Mapping) or not opt_state.get("state"):
        raise DiagnosticsError("no optimizer state in the checkpoint")
    index = _state_index(ctx, opt_state)
    parts = []
    steps = set()
    folded = False
    for name in ctx.params:
        entry, group = index[name]
        key = "max_exp_avg_sq" if group.get("amsgrad") else "exp_avg_sq"
        if entry is None or not isinstance(entry.get(key), torch.Tensor):
            raise DiagnosticsError(f"the optimizer state has no '{key}' for '{name}' (not an Adam state?)")
        v = entry[key].to(dtype=torch.float64)
        step = entry.get("step")
        step = float(step.item() if isinstance(step, torch.Tensor) else step or 0)
        if step < 1:
            raise DiagnosticsError(f"the optimizer state of '{name}' has step {step}; Adam has not stepped yet")
        steps.add(step)
        b1, b2 = (float(b) for b in (group.get("betas") or (0.9, 0.999)))
        eps = float(group.get("eps", 1e-8))
        p = (1 - b1**step) * (torch.sqrt(v / (1 - b2**step)) + eps)
        eta_g = float(group.get("lr", lr))
        if not eta_g > 0:  # the caller leaves such parameters out (see still_parameters)
            raise DiagnosticsError(f"'{name}' is in a param group with learning rate {eta_g}; it does not move")
        if eta_g != lr:
            p = p * (lr / eta_g)
            folded = True
        parts.append(p.reshape(-1))
    P = torch.cat(parts).to(dtype=next(iter(ctx.params.values())).dtype, device=ctx.device)
    info = {
        "steps": sorted(steps),
        "definition": "P = (1 - beta1^t) * (sqrt(v_t / (1 - beta2^t)) + eps)",
        "min": float(P.min()),
        "max": float(P.max()),
        "lr_folded": folded,
    }
    return P, info


def still_parameters(ctx: Context) -> list[str]:
    """The analysed parameters whose optimizer param group has learning rate 0 (or below): Adam does not
    move them (e.g. every group at the last step of a linearly decaying schedule, or a group frozen by
    ``lr=0``), so they take no part in its edge of stability. Empty when the state cannot be matched
    (:func:`adam_preconditioner` then names the problem)."""
    opt_state = ctx.optimizer_state
    if not isinstance(opt_state, Mapping) or not opt_state.get("state"):
        return []
    try:
        index = _state_index(ctx, opt_state)
    except DiagnosticsError:
        return []
    return [name for name in ctx.params if name in index and not float(index[name][1].get("lr", 1.0)) > 0]


def preconditioned_sharpness(
    ctx: Context,
    P: torch.Tensor,
    *,
    tol: float = 1e-3,
    max_iter: int = 300,
    generator: torch.Generator | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[float, float, dict[str, Any]]:
    """``lambda_max(P^-1 H)`` by Lanczos on ``P^-1/2 H P^-1/2``; returns (eigenvalue, error bound, info)."""
    op = hessian_operator(ctx)
    res = lanczos(preconditioned(op, P), k_top=1, tol=tol, max_iter=max_iter, generator=generator, progress=progress)
    info = {
        "iterations": res.iterations,
        "converged": res.converged,
        "hvps": op.hvp_count,
        "residual": float(res.residuals[0]),
    }
    return float(res.eigenvalues[0]), float(res.error_bounds[0]), info


def rounding_note(label: str, value: float, base: float, dtype: torch.dtype, fix: str) -> list[str]:
    """A note when a sharpness ``value`` is within the rounding of the loss ``base`` in ``dtype`` (``|value| <=
    4 eps |base|``): the perturbation is too small to move the loss the analysis computes, so the figure (often
    exactly 0) says nothing about the curvature."""
    eps = torch.finfo(dtype).eps
    level = 4 * eps * abs(base)
    if not abs(value) <= level or base == 0.0:
        return []
    kind = str(dtype).removeprefix("torch.")
    return [
        f"{label} sharpness {value:.3g} is within the {kind} rounding of the loss ({level:.2g}): the perturbation "
        f"barely moves the loss; {fix}" + ("" if dtype == torch.float64 else " or --dtype float64")
    ]


def adaptive_scale(w: torch.Tensor, eta: float) -> torch.Tensor:
    """ASAM's ``T_w = |w| + eta`` (``[dim]``, the dtype of ``w``).

    Raises:
        DiagnosticsError: ``T_w`` is not finite in that dtype (an ``eta`` beyond its range, e.g. above ~3e38
            in float32): every scaled point would be NaN and the loss at the checkpoint would look undefined.
    """
    scale = w.abs() + eta
    if not bool(torch.isfinite(scale).all()):
        top = torch.finfo(w.dtype).max
        raise DiagnosticsError(
            f"--adaptive-eta {eta:g} overflows {str(w.dtype).removeprefix('torch.')} in T_w = |w| + eta (largest "
            f"{top:.3g}); use a smaller --adaptive-eta (or --dtype float64)"
        )
    return scale


def _ascent(
    kind: str,
    config: SharpnessConfig,
    ctx: Context,
    space: FlatSpace,
    rows: list[tuple],
    notes: list[str],
    progress: ProgressFn | None,
) -> dict[str, Any]:
    """Worst-case (``kind="worst"``) or adaptive (``T_w = |w| + eta`` scaling) sharpness by projected ascent.

    Appends the ``sharpness_<kind>`` row and a note when an ascent run stopped at ``max_iter``.

    Returns:
        The metadata of the ascent: ``rho`` (and ``eta``, the scaling for adaptive) and the runs.
    """
    adaptive = kind == "adaptive"
    scale = adaptive_scale(space.flatten(ctx.params), config.adaptive_eta) if adaptive else None
    value, runs = worst_case_sharpness(
        ctx,
        config.rho,
        scale=scale,
        restarts=config.restarts,
        max_iter=config.max_iter,
        tol=config.tol,
        stream=20 if adaptive else 10,
        progress=bind(progress, "adaptive ascent" if adaptive else "worst-case ascent"),
    )
    rows.append((f"sharpness_{kind}", value))
    label = "adaptive" if adaptive else "worst-case"
    notes += rounding_note(label, value, runs["loss"], ctx.dtype, "use a larger --rho")
    if not all(r["converged"] for r in runs["runs"]):
        notes.append(f"{label} ascent hit --max-iter={config.max_iter} before converging; raise it")
    extra = {"eta": config.adaptive_eta, "scaling": "T_w = |w| + eta"} if adaptive else {}
    return {"rho": config.rho, **extra, **runs}


def _edge_of_stability(
    config: SharpnessConfig, ctx: Context, rows: list[tuple], notes: list[str], progress: ProgressFn | None
) -> dict[str, Any]:
    """The edge-of-stability threshold of the optimizer (rows ``eos_threshold``) and, for Adam, the
    preconditioned sharpness and its ratio to the threshold (rows ``preconditioned_eigenvalue``,
    ``eos_ratio``).

    Args:
        config: the analyzer's options (``lr``, ``eig_tol``, ``eig_max_iter``).
        ctx: the checkpoint's context (its learning rate and optimizer metadata).
        rows: records are appended here.
        notes: notes are appended here.
        progress: progress callback.

    Returns:
        The ``eos`` metadata: learning rate, threshold, its kind and rule, preconditioner and Lanczos details.
    """
    lr = config.lr if config.lr is not None else ctx.lr
    opt = ctx.checkpoint_metadata.get("optimizer") or {}
    thr = eos_threshold(lr, opt)
    eos_info = lr_info(lr, opt)
    if thr is None:
        notes += eos_notes(lr, opt)
        return eos_info
    rows.append(("eos_threshold", thr.value))
    eos_info.update({"threshold": thr.value, "kind": thr.kind, "rule": thr.rule})
    if not opt:
        eos_info["assumed"] = "no optimizer metadata: plain gradient descent assumed (threshold 2/lr)"
    if thr.kind != "adam_preconditioned":
        return eos_info
    still = still_parameters(ctx)
    if still:
        moving = [n for n in ctx.params if n not in still]
        count = sum(ctx.params[n].numel() for n in still)
        eos_info["still_parameters"] = count
        if not moving:
            notes.append(
                "every analysed parameter's param group has learning rate 0 at this checkpoint (the end of a "
                "decaying schedule?): Adam does not move them, so there is no preconditioned sharpness to measure"
            )
            return eos_info
        notes.append(
            f"{len(still)} tensors ({count:,} entries) are in param groups with learning rate 0: Adam does not move "
            "them, so the preconditioned sharpness is over the other parameters"
        )
        ctx = ctx.restrict(names=moving)
    try:
        P, pinfo = adam_preconditioner(ctx, float(lr))
    except DiagnosticsError as exc:
        notes.append(
            f"Adam's preconditioned sharpness needs the optimizer's second moments: {exc}; save "
            "checkpoints with diagnostics.save_checkpoint(..., optimizer=opt)"
        )
        return eos_info
    lam, resid, linfo = preconditioned_sharpness(
        ctx,
        P,
        tol=config.eig_tol,
        max_iter=config.eig_max_iter,
        generator=ctx.generator(40),
        progress=bind(progress, "preconditioned lanczos"),
    )
    rows.append(("preconditioned_eigenvalue", lam, resid))
    rows.append(("eos_ratio", lam / thr.value))
    eos_info["preconditioner"] = pinfo
    eos_info["lanczos"] = linfo
    if not linfo["converged"]:
        notes.append("Lanczos for the preconditioned eigenvalue did not converge; raise --eig-max-iter")
    return eos_info


# ------------------------------------------------------------------------------------- analyzer
def analyze_sharpness(config: SharpnessConfig, ctx: Context, progress: ProgressFn | None = None) -> Result:
    """Worst-case / adaptive / average-case sharpness and edge-of-stability figures at ``ctx``."""
    check_config(config)
    rows: list[tuple] = []
    info: dict[str, Any] = {}
    notes: list[str] = []
    space = FlatSpace.of(ctx.params)
    kinds = config.kinds
    for kind in ("worst", "adaptive"):
        if kind in kinds:
            info[kind] = _ascent(kind, config, ctx, space, rows, notes, progress)
    evaluator = None
    if "average" in kinds:
        sigma = config.sigma if config.sigma is not None else config.rho / math.sqrt(space.dim)
        evaluator = PointEvaluator(ctx, chunk=config.chunk, backend=config.backend)
        mean, se, vinfo = average_case_sharpness(
            evaluator, sigma, config.draws, ctx.generator(30), progress=bind(progress, "gaussian draws")
        )
        rows.append(("sharpness_average", mean, se))
        notes += rounding_note("average", mean, vinfo["loss"], ctx.dtype, "use a larger --sigma (or --rho)")
        info["average"] = {
            **vinfo,
            "sigma_rule": "given" if config.sigma is not None else "rho / sqrt(d)",
            "estimator": "antithetic pairs (L(w+e) + L(w-e))/2 - L(w)",
            "backend": evaluator.backend,
            "backend_reason": evaluator.backend_reason,
        }
        notes.extend(evaluator.notes)
    if config.eos:
        info["eos"] = _edge_of_stability(config, ctx, rows, notes, progress)
    metadata = {"dim": space.dim, "notes": notes, **info}
    return Result(make_records(ctx.checkpoint, ctx.step, NAME, rows), metadata)


ANALYZER = Analyzer(
    name=NAME,
    summary="worst-case (SAM), adaptive (ASAM) and average-case sharpness; edge-of-stability figures",
    description="Sharpness at a checkpoint: max_{||e||<=rho} L(w+e) - L(w) (solved), ASAM, Gaussian; EoS thresholds.",
    config=SharpnessConfig,
    order=20,
    run=analyze_sharpness,
    metrics=(
        Metric(
            "sharpness_worst",
            "max_{||e||_2 <= rho} L(w+e) - L(w), by projected gradient ascent with backtracking from several starts",
            unit="loss",
            higher_is_better=False,
            headline=True,
            reference="Foret et al. 2021; Keskar et al. 2017",
        ),
        Metric(
            "sharpness_adaptive",
            "max_{||T_w^-1 e||_2 <= rho} L(w+e) - L(w) with T_w = diag(|w| + eta) (scale-invariant)",
            unit="loss",
            higher_is_better=False,
            reference="Kwon et al. 2021 (ASAM)",
        ),
        Metric(
            "sharpness_average",
            "E[L(w+e)] - L(w), e ~ N(0, sigma^2 I), by antithetic pairs; stderr over pairs",
            unit="loss",
            higher_is_better=False,
            headline=True,
            reference="Keskar et al. 2017; Jiang et al. 2020",
        ),
        Metric(
            "eos_threshold",
            "edge-of-stability threshold: 2/η (GD), (2+2β)/η (heavy ball), (2+2β)/((1+2β)η) (Nesterov), "
            "(2+2β1)/((1-β1)η) (Adam, for the preconditioned sharpness)",
            unit="loss / weight^2",
            reference="Cohen et al. 2021, 2022",
        ),
        Metric(
            "preconditioned_eigenvalue",
            "λ_max(P^-1 H) with Adam's preconditioner P = (1-β1^t) diag(sqrt(v_t/(1-β2^t)) + eps), over the "
            "parameters Adam moves (param groups at learning rate 0 are left out, with a note); stderr = "
            "eigenvalue error bound",
            unit="loss / weight^2",
            higher_is_better=False,
            reference="Cohen et al. 2022",
        ),
        Metric(
            "eos_ratio",
            "preconditioned_eigenvalue / eos_threshold (Adam); about 1 at the edge of stability",
            reference="Cohen et al. 2022",
        ),
    ),
    sections=(
        Section(
            "Sharpness",
            ("sharpness_worst", "sharpness_adaptive", "sharpness_average"),
            "Worst-case (SAM), adaptive (ASAM) and average-case (Gaussian) sharpness against the training step.",
        ),
        Section(
            "Adam's preconditioned sharpness",
            ("preconditioned_eigenvalue", "eos_ratio"),
            "λ_max(P^-1 H) with Adam's preconditioner against its stability threshold (2+2β1)/((1-β1)η) = 38/η "
            "for β1 = 0.9 (Cohen et al. 2022).",
            thresholds=(Threshold("eos_threshold"),),
        ),
    ),
)
