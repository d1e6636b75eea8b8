"""Loss-landscape slices (Li et al. 2018) and the straight line between two checkpoints.

Metrics (records; ``index`` is the grid point, ``group`` is null):

* ``loss`` at every grid point: the sample-weighted mean loss ``L(w + x d_1 [+ y d_2])`` over the data
  on a slice around one checkpoint, or ``L((1 - alpha) w_a + alpha w_b)`` on the line between two.
* ``accuracy`` at every grid point (classification only: argmax of the outputs against the labels, or
  the sign of one logit with a BCE loss).
* ``barrier`` (two checkpoints only): the loss barrier of linear interpolation (Frankle et al. 2020,
  "Linear Mode Connectivity and the Lottery Ticket Hypothesis"; Draxler et al. 2018)

      B = max_{alpha in [0, 1]} L((1 - alpha) w_a + alpha w_b) - [(1 - alpha) L(w_a) + alpha L(w_b)],

  the largest rise of the loss above the chord between the end points (0 for a convex loss, since the
  end points contribute 0). It is the maximum over the grid points in [0, 1], refined by golden-section
  search between the neighbours of the best grid point. The definition travels in the metadata
  (``barrier_definition``).

Where the coordinates are: a grid point's ``index`` is its row in the ``grid`` artifact (a DataFrame
``x[, y], loss, accuracy`` for a slice, flat index ``i * steps + j`` for ``(x_i, y_j)``; ``alpha, loss,
accuracy, chord`` for a line), which ``--grid-out`` writes and sweeps cache as Parquet. Coordinates are
not packed into ``group``: a record is one measured number addressed by (metric, index), the coordinates
are a property of the grid shared by every checkpoint of a sweep, and a reader (the report, a notebook)
joins on the row instead of parsing strings whose float formatting would have to round-trip.

Directions (see :mod:`diagnostics.directions`): filter-normalised Gaussian directions by default, with
biases and norm parameters zeroed (Li et al. 2018), optionally orthogonalised; or the unit top
eigenvectors of the Hessian (coordinates are then Euclidean distances, and the slice's curvature at the
centre is the eigenvalue). Interpolated checkpoints also interpolate BatchNorm running statistics, or
recompute them on the data at every point with ``bn_recompute``.

Resumable: :func:`run_landscape` takes a store of partial work (``resume``, e.g. ``diag landscape
--cache FILE``); the grid points already evaluated are read from it under the key of
:func:`landscape_key` and every newly evaluated chunk is saved to it, so an interrupted grid continues
where it stopped. The pure functions take the points (``done``) and a callback (``on_points``) instead.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from diagnostics.batches import fingerprint
from diagnostics.errors import DiagnosticsError
from diagnostics.lazy import lazy_import
from diagnostics.progress import bind
from diagnostics.results import Result, concat_later, make_records
from diagnostics.spec import Analyzer, FileOutput, Metric, Section, check_config, config_values, option

if TYPE_CHECKING:
    from diagnostics.context import Context
    from diagnostics.directions import PointEvaluator
    from diagnostics.progress import ProgressFn

torch = lazy_import("torch")
directions = lazy_import("diagnostics.directions")

NAME = "landscape"
DIRECTIONS = ("random", "hessian")
NORMALIZATIONS = ("filter", "layer", "unit", "none")  # = diagnostics.directions.NORMALIZATIONS (a test checks)
BACKENDS = ("auto", "vmap", "loop")  # = diagnostics.directions.BACKENDS
BARRIER_DEFINITION = (
    "barrier = max over alpha in [0, 1] of L((1-alpha) w_a + alpha w_b) - [(1-alpha) L(w_a) + alpha L(w_b)]"
)
KEY_VERSION = b"diagnostics.landscape/2;"
# At most this many grid points (each one loss evaluation over the data): 1001 x 1001 is already far finer
# than a plot shows (Li et al. 2018 use 51 x 51); beyond it the grid alone cannot be held.
MAX_GRID_POINTS = 1_000_000
# Host memory per grid point kept until the output is written (grid row, loss/accuracy records, their
# table and JSON; measured about 2.4 KiB, 5.5 KiB at peak).
GRID_POINT_BYTES = 4096
PointValues = Mapping[int, tuple[float, "float | None"]]
OnPoints = Callable[[dict[int, tuple[float, "float | None"]]], None]


class PartialStore(Protocol):
    """Where a resumable analyzer keeps finished work (``diag NAME --cache FILE``; see ``diag_cli.resume``)."""

    def load(self, key: str) -> Any:
        """The data saved under ``key`` (None when there is none)."""

    def save(self, key: str, data: Any) -> None:
        """Replace the data saved under ``key`` (JSON-ready)."""


@dataclass
class LandscapeConfig:
    """Settings of :func:`run_landscape` (options of ``diag landscape``, ``[landscape]`` in diag.toml).

    Attributes:
        direction: ``random`` (Gaussian, normalised) or ``hessian`` (top eigenvectors).
        dims: 1 (a curve) or 2 (a plane); None: 2 around one checkpoint, 1 on the line between two
            (which is always 1-D).
        steps: grid points per axis.
        span: slice coordinates run over ``[-span, span]``.
        normalize: ``filter`` | ``layer`` | ``unit`` | ``none``; default ``filter`` for random and
            ``unit`` for Hessian directions.
        include_1d: give biases and norm parameters a (normalised) direction instead of zero.
        orthogonalize: make the second random direction exactly orthogonal to the first.
        bn_recompute: recompute BatchNorm statistics on the data at every point.
        alpha_min, alpha_max: interpolation range (extrapolation allowed, e.g. -0.5 .. 1.5).
        refine_steps: golden-section steps refining the barrier (0: grid maximum only).
        chunk: points per batched (vmap) evaluation; backend ``auto`` | ``vmap`` | ``loop``.
        hessian_tol, hessian_max_iter: Lanczos settings for Hessian directions.
    """

    direction: str = option(
        "random", help="random (filter-normalised Gaussian) or hessian (top eigenvectors)", choices=DIRECTIONS
    )
    dims: int | None = option(
        None, help="1 (a curve) or 2 (a plane); default 2 around one checkpoint, 1 between two", min=1, max=2
    )
    steps: int = option(21, help="grid points per axis", min=2)
    span: float = option(1.0, help="slice coordinates run over [-span, span]", min=0, min_open=True)
    normalize: str | None = option(
        None, help="direction normalisation (default: filter for random, unit for hessian)", choices=NORMALIZATIONS
    )
    include_1d: bool = option(False, help="also move biases and norm parameters (zeroed by default)")
    orthogonalize: bool = option(False, help="make the two random directions exactly orthogonal")
    bn_recompute: bool = option(False, help="recompute BatchNorm statistics on the data at every point")
    alpha_min: float = option(0.0, help="interpolation from (e.g. -0.5 to extrapolate)")
    alpha_max: float = option(1.0, help="interpolation to (e.g. 1.5 to extrapolate)")
    refine_steps: int = option(16, help="golden-section steps refining the barrier (0: grid maximum only)", min=0)
    chunk: int = option(32, help="grid points per batched evaluation", min=1)
    backend: str = option(
        "auto", help="evaluation: auto (vmap; one point at a time for conv nets on CPU), vmap or loop", choices=BACKENDS
    )
    hessian_tol: float = option(
        1e-3, help="Lanczos tolerance of Hessian directions", min=0, max=1, min_open=True, max_open=True
    )
    hessian_max_iter: int = option(300, help="Lanczos iterations for Hessian directions", min=1)

    def validate(self) -> None:
        """Cross-option rules (single options are checked from their declarations)."""
        check_grid_points(self.steps, self.dims or 1)
        if not (math.isfinite(self.span) and math.isfinite(self.alpha_min) and math.isfinite(self.alpha_max)):
            raise DiagnosticsError("--span, --alpha-min and --alpha-max must be finite numbers")
        if self.alpha_min >= self.alpha_max:
            raise DiagnosticsError(f"--alpha-min ({self.alpha_min}) must be below --alpha-max ({self.alpha_max})")

    @property
    def normalization(self) -> str:
        """The normalisation used: ``normalize``, or its default for the direction kind."""
        if self.normalize is not None:
            return self.normalize
        return "filter" if self.direction == "random" else "unit"

    @property
    def slice_dims(self) -> int:
        """The dimension of a slice around one checkpoint (``dims``, default 2)."""
        return 2 if self.dims is None else self.dims


# ----------------------------------------------------------------------------------- pure maths
def check_grid_points(steps: int, dims: int) -> int:
    """The number of grid points ``steps ** dims``, or :class:`DiagnosticsError` above ``MAX_GRID_POINTS``.

    Checked before anything is allocated: a ``[steps^2, 2]`` grid of ``--steps 100000`` alone is 160 GB.
    """
    points = int(steps) ** int(dims)
    if points > MAX_GRID_POINTS:
        most = math.isqrt(MAX_GRID_POINTS) if dims == 2 else MAX_GRID_POINTS
        raise DiagnosticsError(
            f"a {dims}-D grid of --steps {steps} has {points:,} points, each a loss evaluation over the data; "
            f"at most {MAX_GRID_POINTS:,}: use --steps {most} or fewer"
        )
    return points


def check_grid_memory(points: int) -> None:
    """:class:`DiagnosticsError` when the host cannot hold the records of ``points`` grid points (an estimate)."""
    from diagnostics.linalg.memory import Requirement, check_fits

    need = Requirement(torch.device("cpu"), points * GRID_POINT_BYTES, f"records of {points:,} grid points")
    check_fits([need], "use a smaller --steps")


def axis(lo: float, hi: float, steps: int) -> torch.Tensor:
    """``steps`` evenly spaced float64 coordinates from ``lo`` to ``hi`` (both included)."""
    i = torch.arange(steps, dtype=torch.float64)
    return lo + (hi - lo) * i / (steps - 1)


def slice_axis(span: float, steps: int) -> torch.Tensor:
    """Coordinates ``[-span, span]``; with odd ``steps`` the centre is exactly 0."""
    i = torch.arange(steps, dtype=torch.float64)
    return span * (2.0 * i / (steps - 1) - 1.0)


def interpolation_axis(alpha_min: float, alpha_max: float, steps: int) -> torch.Tensor:
    """``steps`` alphas over the range, with 0 and 1 (the two checkpoints) always included."""
    a = axis(alpha_min, alpha_max, steps).tolist()
    for end in (0.0, 1.0):
        if alpha_min <= end <= alpha_max and not any(abs(x - end) <= 1e-12 for x in a):
            a.append(end)
    a = sorted(0.0 if abs(x) <= 1e-12 else (1.0 if abs(x - 1) <= 1e-12 else x) for x in a)
    return torch.tensor(a, dtype=torch.float64)


def loss_barrier(alphas: torch.Tensor, losses: torch.Tensor) -> tuple[float, float]:
    """``max_{alpha in [0, 1]} L(alpha) - [(1 - alpha) L(0) + alpha L(1)]`` over the given points.

    Args:
        alphas: ``[m]`` interpolation coefficients; must contain 0 and 1.
        losses: ``[m]`` losses ``L((1 - alpha) w_a + alpha w_b)``.

    Returns:
        (barrier, alpha where it is attained). Points outside [0, 1] are ignored.
    """
    a = alphas.double()
    values = losses.double()
    i0 = torch.nonzero(a == 0).flatten()
    i1 = torch.nonzero(a == 1).flatten()
    if not len(i0) or not len(i1):
        raise ValueError("the barrier needs the losses at alpha = 0 and alpha = 1")
    l0, l1 = values[i0[0]], values[i1[0]]
    inside = (a >= 0) & (a <= 1)
    gap = values - ((1 - a) * l0 + a * l1)
    gap = torch.where(inside, gap, torch.tensor(-math.inf, dtype=torch.float64))
    j = int(torch.argmax(gap))
    return float(gap[j]), float(a[j])


def golden_max(fn: Callable[[float], float], lo: float, hi: float, steps: int) -> tuple[float, float]:
    """Golden-section search for ``max fn`` on ``[lo, hi]`` (``steps`` evaluations after two)."""
    inv = (math.sqrt(5) - 1) / 2
    c, d = hi - inv * (hi - lo), lo + inv * (hi - lo)
    fc, fd = fn(c), fn(d)
    best = max((fc, c), (fd, d))
    for _ in range(steps):
        if fc >= fd:
            hi, d, fd = d, c, fc
            c = hi - inv * (hi - lo)
            fc = fn(c)
            best = max(best, (fc, c))
        else:
            lo, c, fc = c, d, fd
            d = lo + inv * (hi - lo)
            fd = fn(d)
            best = max(best, (fd, d))
    return best[1], best[0]


# ---------------------------------------------------------------------------------- cache keys
def _config_for_key(config: LandscapeConfig, mode: str) -> dict[str, Any]:
    keep = config_values(config)
    for k in ("chunk", "backend", "refine_steps"):
        keep.pop(k)
    keep["normalize"] = config.normalization
    keep["dims"] = config.slice_dims if mode == "slice" else 1
    keep["mode"] = mode
    return keep


def landscape_key(config: LandscapeConfig, ctx: Context, other: Context | None = None) -> str:
    """A fingerprint of everything that fixes the grid values: options, weights, buffers, data, loss.

    Saved grid points may be reused only by a run with the same key. Options that change how the points
    are computed but not their values (``chunk``, ``backend``, ``refine_steps``) are left out.

    Args:
        config: the options.
        ctx: the (first) checkpoint's context.
        other: the second checkpoint's context for the line between two.

    Returns:
        A sha256 hex digest.
    """
    h = hashlib.sha256(KEY_VERSION)
    mode = "slice" if other is None else "interpolation"
    h.update(json.dumps(_config_for_key(config, mode), sort_keys=True).encode())
    h.update(f"seed={ctx.seed};loss={ctx.loss_name};dtype={ctx.dtype};".encode())
    h.update(json.dumps(["analysed", *ctx.params]).encode())
    directions.tensors_digest({**ctx.params, **ctx.frozen}, h)
    if other is not None:
        directions.tensors_digest({**other.params, **other.frozen}, h)
    h.update(fingerprint(ctx.batches).encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------- the grid
def _run_grid(
    total: int,
    build: Callable[[list[int]], tuple[torch.Tensor, dict[str, torch.Tensor]]],
    evaluator: PointEvaluator,
    done: PointValues | None,
    on_points: OnPoints | None,
    progress: ProgressFn | None,
) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """Evaluate the points not in ``done``; returns (loss [total], accuracy [total] or None, resumed)."""
    loss = torch.full((total,), math.nan, dtype=torch.float64)
    acc = torch.full((total,), math.nan, dtype=torch.float64)
    resumed = 0
    for i, (l, a) in (done or {}).items():
        i = int(i)
        if not 0 <= i < total:
            raise DiagnosticsError(f"cached grid point {i} is outside this grid of {total} points")
        loss[i] = float(l)
        acc[i] = math.nan if a is None else float(a)
        resumed += 1
    todo = [i for i in range(total) if math.isnan(float(loss[i]))]
    tick = bind(progress, "grid")
    tick(total - len(todo), total)
    size = max(evaluator.chunk, 1)
    for start in range(0, len(todo), size):
        idx = todo[start : start + size]
        points, buffers = build(idx)
        stats = evaluator.evaluate(points, buffers=buffers)
        new: dict[int, tuple[float, float | None]] = {}
        for j, i in enumerate(idx):
            loss[i] = float(stats.loss[j])
            a = None if stats.accuracy is None else float(stats.accuracy[j])
            acc[i] = math.nan if a is None else a
            new[i] = (float(stats.loss[j]), a)
        if on_points is not None:
            on_points(new)
        tick(total - len(todo) + start + len(idx), total)
    has_acc = evaluator.kind is not None
    return loss, (acc if has_acc else None), resumed


def _grid_rows(loss: torch.Tensor, acc: torch.Tensor | None) -> list[tuple]:
    """``loss`` (and ``accuracy``) records of every grid point: index = row of the grid, no group."""
    rows: list[tuple] = []
    for i in range(len(loss)):
        rows.append(("loss", float(loss[i]), None, i, None))
        if acc is not None:
            rows.append(("accuracy", float(acc[i]), None, i, None))
    return rows


def _direction_info(dirs: list[dict[str, torch.Tensor]], params: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    inner = directions.inner
    wn = math.sqrt(inner(params, params))
    norms = [math.sqrt(inner(d, d)) for d in dirs]
    info: dict[str, Any] = {
        "norms": norms,
        "relative_norms": [n / wn if wn > 0 else math.nan for n in norms],
        "weight_norm": wn,
    }
    if len(dirs) == 2:
        denom = norms[0] * norms[1]
        info["cosine"] = inner(dirs[0], dirs[1]) / denom if denom > 0 else math.nan
    return info


def _evaluation_info(evaluator: PointEvaluator, config: LandscapeConfig, resumed: int) -> dict[str, Any]:
    return {
        "points_evaluated": evaluator.evaluations,
        "points_resumed": resumed,
        "evaluation": {
            "backend": evaluator.backend,
            "chunk": evaluator.chunk,
            "bn_recompute": config.bn_recompute,
            "backend_reason": evaluator.backend_reason,
        },
    }


def nonfinite_note(loss: torch.Tensor, fix: str) -> list[str]:
    """A note when some grid points have a non-finite loss (they are null in JSON, inf/nan in tables)."""
    bad = int((~torch.isfinite(loss)).sum())
    if bad == 0:
        return []
    return [
        f"{bad} of {len(loss)} grid points have a non-finite loss (inf or NaN; null in JSON): the grid reaches where "
        f"the loss overflows; {fix}"
    ]


def span_precision_note(
    config: LandscapeConfig,
    grid: torch.Tensor,
    build: Callable[[list[int]], tuple[torch.Tensor, Any]],
    w: torch.Tensor,
    loss: torch.Tensor,
) -> list[str]:
    """A note when ``--span`` is below the precision of the weights (or of the loss) in the analysis dtype.

    The perturbed weights ``fl(w + fl(x d_1 [+ y d_2]))`` are monotone in each coordinate, so they equal ``w`` at
    every grid point exactly when they do at the grid's corners (``|x| = |y| = span``): those 2 (or 4) points are
    built as the grid builds them and compared with ``w``. When some weights do move but every grid point's
    loss is the same finite number, the slice is flat too (the moves are below what the loss resolves, or
    the loss does not depend on these directions).

    Args:
        config: the options (``span``).
        grid: ``[points, dims]`` the grid's float64 coordinates.
        build: the grid's point builder (``indices -> ([k, dim] flat weights, buffers)``).
        w: ``[dim]`` the centre's flat weights.
        loss: ``[points]`` the grid's losses.

    Returns:
        the note, or nothing.
    """
    name = str(w.dtype).replace("torch.", "")
    fix = "use a larger --span" + ("" if w.dtype == torch.float64 else " or --dtype float64")
    far = grid.abs()
    corners = torch.nonzero((far == far.amax()).all(dim=1)).flatten().tolist()
    if corners and bool((build(corners)[0] == w.unsqueeze(0)).all()):
        return [
            f"--span {config.span!r} is below the {name} precision of the weights: no grid point changes any "
            f"weight, so every point's loss is the centre's; {fix}"
        ]
    first = float(loss[0])
    if math.isfinite(first) and bool((loss == first).all()):
        return [
            f"every grid point has the same loss ({first:.6g}): --span {config.span!r} moves the weights by less "
            f"than the {name} loss resolves, or the loss does not depend on these directions; {fix}"
        ]
    return []


def _notes(evaluator: PointEvaluator, acc: torch.Tensor | None) -> list[str]:
    notes = list(evaluator.notes)
    if acc is None:
        notes.append("no accuracy: the outputs/targets are not classification labels")
    return notes


def slice_directions(
    config: LandscapeConfig, ctx: Context, progress: ProgressFn | None = None
) -> tuple[list[dict[str, torch.Tensor]], dict[str, Any]]:
    """The ``dims`` directions of a slice (random normalised, or Hessian eigenvectors) and their description.

    Args:
        config: the options (``direction``, ``dims``, ``normalize``, ``include_1d``, ``orthogonalize``, ...).
        ctx: the checkpoint's context; random directions come from its generator stream 0, the Lanczos start
            vector from stream 1.
        progress: ``progress(task, done, total)``.

    Returns:
        (directions ``[{name: tensor}]``, info: kind, normalisation, norms, cosine, eigenvalues, hvps).
    """
    mode = config.normalization
    dims = config.slice_dims
    info: dict[str, Any] = {"kind": config.direction, "normalize": mode, "include_1d": config.include_1d, "hvps": 0}
    if config.direction == "random":
        gen = ctx.generator(0)
        dirs = [directions.random_direction(ctx.params, gen, mode, config.include_1d) for _ in range(dims)]
        if dims == 2 and config.orthogonalize:
            dirs[1] = directions.orthogonalize(dirs[0], dirs[1], mode)
        info["orthogonalized"] = bool(dims == 2 and config.orthogonalize)
    else:
        unit, eigenvalues, lanczos_info = directions.hessian_directions(
            ctx,
            dims,
            tol=config.hessian_tol,
            max_iter=config.hessian_max_iter,
            generator=ctx.generator(1),
            progress=bind(progress, "lanczos"),
        )
        dirs = unit
        if mode != "unit":
            dirs = [directions.normalize_direction(d, ctx.params, mode, config.include_1d) for d in unit]
        info.update(eigenvalues=eigenvalues, lanczos=lanczos_info, hvps=int(lanczos_info.get("hvps") or 0))
    info.update(_direction_info(dirs, ctx.params))
    return dirs, info


def analyze_landscape(
    config: LandscapeConfig,
    ctx: Context,
    progress: ProgressFn | None = None,
    *,
    done: PointValues | None = None,
    on_points: OnPoints | None = None,
) -> Result:
    """A 1-D or 2-D slice of the loss around ``ctx``'s weights -> records and the grid.

    Points ``w + x d_1`` (1-D) or ``w + x d_1 + y d_2`` (2-D) with ``x, y`` in ``[-span, span]``;
    flat index ``i * steps + j`` for ``(x_i, y_j)`` (Li et al. 2018, "Visualizing the Loss Landscape of
    Neural Nets").

    Args:
        config: the options.
        ctx: the checkpoint's context.
        progress: ``progress(task, done, total)``.
        done: grid points already evaluated ``{index: (loss, accuracy or None)}`` (resuming).
        on_points: called with every chunk of newly evaluated points.

    Returns:
        records ``loss``/``accuracy`` per point (``index`` = row of the grid); artifacts ``grid`` (DataFrame
        ``x[, y], loss, accuracy``) and ``directions`` (list of ``{name: tensor}``).
    """
    check_config(config)
    check_grid_memory(check_grid_points(config.steps, config.slice_dims))
    space = directions.FlatSpace.of(ctx.params)
    w = space.flatten(ctx.params)
    dirs, dir_info = slice_directions(config, ctx, progress)
    D = torch.stack([space.flatten(d) for d in dirs])  # [dims, dim]
    ax = slice_axis(config.span, config.steps)
    if config.slice_dims == 1:
        grid = ax.reshape(-1, 1)
    else:
        gx, gy = torch.meshgrid(ax, ax, indexing="ij")
        grid = torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1)  # [steps^2, 2], index i*steps + j
    evaluator = directions.PointEvaluator(
        ctx, chunk=config.chunk, backend=config.backend, bn_recompute=config.bn_recompute
    )

    def build(idx: list[int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        c = grid[idx].to(dtype=space.dtype, device=space.device)
        return w.unsqueeze(0) + c @ D, {}

    loss, acc, resumed = _run_grid(grid.shape[0], build, evaluator, done, on_points, progress)
    names = ["x", "y"][: config.slice_dims]
    columns = {name: grid[:, i].numpy() for i, name in enumerate(names)}
    columns |= {"loss": loss.numpy(), "accuracy": acc.numpy() if acc is not None else math.nan}
    centre = torch.nonzero((grid.abs() <= 1e-12).all(dim=1)).flatten()
    metadata: dict[str, Any] = {
        "mode": "slice",
        "directions": dir_info,
        "grid": {"axes": names, "steps": config.steps, "span": config.span, "points": int(grid.shape[0])},
        **_evaluation_info(evaluator, config, resumed),
        "loss_centre": float(loss[centre[0]]) if len(centre) else None,
        "hvp_count": dir_info["hvps"],
        "notes": _notes(evaluator, acc)
        + nonfinite_note(loss, "use a smaller --span")
        + span_precision_note(config, grid, build, w, loss),
    }
    artifacts = {"grid": concat_later([columns]), "directions": dirs}  # a DataFrame once read
    return Result(make_records(ctx.checkpoint, ctx.step, NAME, _grid_rows(loss, acc)), metadata, artifacts)


def check_same_architecture(a: Context, b: Context) -> None:
    """Raise :class:`DiagnosticsError` unless two contexts hold the same tensors (names and shapes)."""
    for what, ta, tb in (("parameters", a.params, b.params), ("buffers/frozen tensors", a.frozen, b.frozen)):
        only_a = sorted(set(ta) - set(tb))
        only_b = sorted(set(tb) - set(ta))
        if only_a or only_b:
            raise DiagnosticsError(
                f"checkpoints '{a.checkpoint}' and '{b.checkpoint}' have different architectures: {what} "
                f"only in the first {only_a[:3]}, only in the second {only_b[:3]}"
            )
        for name in ta:
            if tuple(ta[name].shape) != tuple(tb[name].shape):
                raise DiagnosticsError(
                    f"checkpoints '{a.checkpoint}' and '{b.checkpoint}' have different architectures: "
                    f"'{name}' has shape {tuple(ta[name].shape)} vs {tuple(tb[name].shape)}"
                )


def check_interpolation_options(config: LandscapeConfig) -> None:
    """Refuse slice-only options on the line between two checkpoints (one line each)."""
    if config.direction != "random":
        raise DiagnosticsError("--direction applies to a slice around one checkpoint, not to the line between two")
    if config.dims not in (None, 1):
        raise DiagnosticsError("the interpolation between two checkpoints is 1-D; drop --dims 2")


def _lerp_buffers(ctx_a: Context, ctx_b: Context) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Floating-point tensors outside the analysed parameters that differ between the checkpoints and are part
    of each checkpoint's state: buffers (BatchNorm statistics) and parameters the model does not train
    (``requires_grad=False``), ``{name: (a, b)}``. Trainable parameters left out by ``--params`` are not
    included: they stay at the first checkpoint's values."""
    trainable = {n for n, p in ctx_a.model.named_parameters() if p.requires_grad}
    out = {}
    for n, t in ctx_a.frozen.items():
        if n in trainable or not t.is_floating_point():
            continue
        tb = ctx_b.frozen[n].to(device=t.device, dtype=t.dtype)
        if not torch.equal(t, tb):
            out[n] = (t, tb)
    return out


def _barrier(
    alphas: torch.Tensor, loss: torch.Tensor, gap: Callable[[float], float], refine_steps: int
) -> dict[str, Any]:
    """The barrier on the grid, refined by golden-section search around the best grid point."""
    l0 = float(loss[alphas == 0][0])
    l1 = float(loss[alphas == 1][0])
    grid_barrier, grid_alpha = loss_barrier(alphas, loss)
    value, at, refined = grid_barrier, grid_alpha, False
    j = int(torch.nonzero(alphas == grid_alpha)[0])
    if refine_steps > 0 and 0 < grid_alpha < 1 and grid_barrier > 0:
        lo = max(0.0, float(alphas[j - 1]))
        hi = min(1.0, float(alphas[j + 1]))
        ra, rv = golden_max(gap, lo, hi, refine_steps)
        if rv > value:
            value, at, refined = rv, ra, True
    return {
        "value": value,
        "alpha": at,
        "grid_value": grid_barrier,
        "grid_alpha": grid_alpha,
        "refined": refined,
        "loss_a": l0,
        "loss_b": l1,
    }


def analyze_interpolation(
    config: LandscapeConfig,
    ctx_a: Context,
    ctx_b: Context,
    progress: ProgressFn | None = None,
    *,
    done: PointValues | None = None,
    on_points: OnPoints | None = None,
) -> Result:
    """The loss on the line ``(1 - alpha) w_a + alpha w_b`` and its barrier (see module docstring).

    The analysed parameters, floating-point buffers (BatchNorm running statistics) and parameters the model
    does not train (``requires_grad=False``) are interpolated (the statistics are recomputed on the data
    instead with ``bn_recompute``); trainable parameters outside ``--params`` and integer buffers are those of
    the first checkpoint. Data and loss are ``ctx_a``'s.

    Args:
        config: the options (``steps``, ``alpha_min``, ``alpha_max``, ``refine_steps``, ...).
        ctx_a: the first checkpoint (``alpha = 0``); its data, loss, frozen tensors and integer buffers are used.
        ctx_b: the second checkpoint (``alpha = 1``), same parameter and buffer names and shapes as ``ctx_a``.
        progress: ``progress(task, done, total)``.
        done: grid points already evaluated ``{index: (loss, accuracy or None)}`` (resuming).
        on_points: called with every chunk of newly evaluated points.

    Returns:
        records ``loss``/``accuracy`` per alpha (``index`` = row of the grid) and ``barrier``; artifact
        ``grid`` (DataFrame ``alpha, loss, accuracy, chord``, ``chord = (1-alpha) L(w_a) + alpha L(w_b)``).

    Raises:
        DiagnosticsError: on invalid options, a slice-only option (``--direction``, ``--dims 2``), or two
            checkpoints whose architectures differ.
    """
    check_config(config)
    check_interpolation_options(config)
    check_grid_memory(check_grid_points(config.steps, 1))
    check_same_architecture(ctx_a, ctx_b)
    space = directions.FlatSpace.of(ctx_a.params)
    wa = space.flatten(ctx_a.params)
    wb = space.flatten(ctx_b.params).to(dtype=wa.dtype, device=wa.device)
    lerp_buffers = _lerp_buffers(ctx_a, ctx_b)
    alphas = interpolation_axis(config.alpha_min, config.alpha_max, config.steps)
    evaluator = directions.PointEvaluator(
        ctx_a, chunk=config.chunk, backend=config.backend, bn_recompute=config.bn_recompute
    )

    def points_at(a: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        a = a.to(dtype=space.dtype, device=space.device)
        P = (1 - a).unsqueeze(1) * wa.unsqueeze(0) + a.unsqueeze(1) * wb.unsqueeze(0)
        bufs = {}
        for n, (ta, tb) in lerp_buffers.items():
            ak = a.to(ta.dtype).reshape((-1,) + (1,) * ta.dim())
            bufs[n] = (1 - ak) * ta.unsqueeze(0) + ak * tb.unsqueeze(0)
        return P, bufs

    loss, acc, resumed = _run_grid(
        len(alphas), lambda idx: points_at(alphas[idx]), evaluator, done, on_points, progress
    )
    l0, l1 = float(loss[alphas == 0][0]), float(loss[alphas == 1][0])

    def gap(a: float) -> float:
        P, bufs = points_at(torch.tensor([a], dtype=torch.float64))
        return float(evaluator.evaluate(P, buffers=bufs).loss[0]) - ((1 - a) * l0 + a * l1)

    barrier = _barrier(alphas, loss, gap, config.refine_steps)
    rows = [*_grid_rows(loss, acc), ("barrier", barrier["value"], None, None, None)]
    columns = {"alpha": alphas.numpy(), "loss": loss.numpy()}
    columns |= {
        "accuracy": acc.numpy() if acc is not None else math.nan,
        "chord": ((1 - alphas) * l0 + alphas * l1).numpy(),
    }
    metadata: dict[str, Any] = {
        "mode": "interpolation",
        "checkpoints": [ctx_a.checkpoint, ctx_b.checkpoint],
        "steps_of": [ctx_a.step, ctx_b.step],
        "barrier_definition": BARRIER_DEFINITION,
        "barrier": barrier,
        "interpolated_buffers": sorted(
            n for n in lerp_buffers if not (evaluator.bn_recompute and n in evaluator.bn_buffers)
        ),
        "distance": float((wb - wa).double().norm()),
        "grid": {"axes": ["alpha"], "alphas": alphas.tolist(), "points": len(alphas)},
        **_evaluation_info(evaluator, config, resumed),
        "notes": _notes(evaluator, acc) + nonfinite_note(loss, "narrow --alpha-min/--alpha-max"),
    }
    return Result(make_records(ctx_a.checkpoint, ctx_a.step, NAME, rows), metadata, {"grid": concat_later([columns])})


# --------------------------------------------------------------------------------------- resuming
def _points_of(data: Any) -> dict[int, tuple[float, float | None]]:
    """Grid points as saved by :func:`run_landscape` -> ``{index: (loss, accuracy or None)}``."""
    if data is None:
        return {}
    try:
        return {int(i): (float(v[0]), None if v[1] is None else float(v[1])) for i, v in data["points"].items()}
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        raise DiagnosticsError(
            f"the saved grid points are not readable ({type(exc).__name__}); delete the cache or pass --force"
        ) from exc


def run_landscape(
    config: LandscapeConfig,
    ctx: Context,
    progress: ProgressFn | None = None,
    *,
    others: Sequence[Context] = (),
    resume: PartialStore | None = None,
) -> Result:
    """``diag landscape``: a slice around one checkpoint, or the line to a second one (``others=[ctx_b]``).

    Args:
        config: the options.
        ctx: the (first) checkpoint's context.
        progress: ``progress(task, done, total)``.
        others: nothing (a slice, :func:`analyze_landscape`) or the second checkpoint (the line and its
            barrier, :func:`analyze_interpolation`).
        resume: where finished grid points are kept under :func:`landscape_key` (None: nowhere).

    Returns:
        The result of :func:`analyze_landscape` or :func:`analyze_interpolation`.
    """
    check_config(config)
    if len(others) > 1:
        raise DiagnosticsError(f"diag landscape takes one or two checkpoints, got {1 + len(others)}")
    other = others[0] if others else None
    if other is not None:
        check_interpolation_options(config)
    done: dict[int, tuple[float, float | None]] = {}
    on_points = None
    if resume is not None:
        key = landscape_key(config, ctx, other)
        done = _points_of(resume.load(key))
        saved = dict(done)

        def on_points(new: dict[int, tuple[float, float | None]]) -> None:
            saved.update(new)
            resume.save(key, {"points": {str(i): list(v) for i, v in sorted(saved.items())}})

    if other is None:
        return analyze_landscape(config, ctx, progress, done=done, on_points=on_points)
    return analyze_interpolation(config, ctx, other, progress, done=done, on_points=on_points)


def plot_suffixes(config: LandscapeConfig) -> tuple[str, ...]:
    """``--plot PREFIX`` files: ``PREFIX.png`` (the curve, or the contours of a plane) and, for a plane,
    ``PREFIX_surface.png``. With ``dims`` unset the surface is planned too (a plane is the default around
    one checkpoint); the line between two checkpoints writes only ``PREFIX.png``."""
    return (".png",) if config.dims == 1 else (".png", "_surface.png")


_POINT = "the grid point: the row of the grid artifact (--grid-out), i * steps + j for (x_i, y_j) on a plane"
ANALYZER = Analyzer(
    name=NAME,
    summary="loss/accuracy on a filter-normalised random (or Hessian) 1-D/2-D slice, or the line between two "
    "checkpoints and its loss barrier",
    description="Loss landscape: a filter-normalised random (or Hessian) slice, or the line between two "
    "checkpoints.\n\nWith one checkpoint: the loss and accuracy on a 1-D or 2-D grid around its weights (Li et "
    "al. 2018). With two: on (1-alpha) w_a + alpha w_b and the loss barrier "
    "max_{alpha in [0,1]} L(alpha) - [(1-alpha) L(w_a) + alpha L(w_b)].",
    config=LandscapeConfig,
    order=30,
    run=run_landscape,
    checkpoints=(1, 2),
    resumable=True,
    metrics=(
        Metric(
            "loss",
            "sample-weighted mean loss sum_b n_b L_b / N at a grid point: w + x d_1 [+ y d_2] on a slice, "
            "(1-alpha) w_a + alpha w_b on the line between two checkpoints",
            unit="loss",
            higher_is_better=False,
            index=_POINT,
            reference="Li et al. 2018",
        ),
        Metric(
            "accuracy",
            "fraction correct at a grid point (argmax of the outputs against the labels; sign of the logit for BCE)",
            higher_is_better=True,
            index=_POINT,
        ),
        Metric(
            "barrier",
            "max_{alpha in [0,1]} L((1-alpha) w_a + alpha w_b) - [(1-alpha) L(w_a) + alpha L(w_b)]: grid maximum "
            "refined by golden-section search; 0 for a convex loss; w holds the analysed parameters, the "
            "floating-point buffers and the parameters the model does not train (trainable ones outside --params "
            "stay at w_a's values)",
            unit="loss",
            higher_is_better=False,
            headline=True,
            reference="Frankle et al. 2020",
        ),
    ),
    outputs=(
        FileOutput(
            "grid_out",
            "write the grid (coordinates, loss, accuracy) to FILE.csv",
            render="diagnostics.render:landscape_grid",
            require_suffix=".csv",
        ),
        FileOutput(
            "plot",
            "write PREFIX.png (the curve, or the contours of a plane) and PREFIX_surface.png (a plane's surface)",
            render="diagnostics.render:landscape_plot",
            suffixes=plot_suffixes,
        ),
    ),
    sections=(
        Section(
            "Loss-landscape slices",
            ("loss", "accuracy"),
            "Loss along slices through the weights at each checkpoint (filter-normalised random directions by "
            "default, Li et al. 2018; coordinates from the grid artifact): 1-D curves coloured by training step, "
            "2-D slices as contours of the last checkpoint.",
            figure="diagnostics.plots:landscape_section",
        ),
    ),
)
