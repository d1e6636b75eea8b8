"""Hessian spectrum of the loss at a checkpoint: top/bottom eigenvalues, trace, spectral density.

Metrics (records; ``group`` is null for the whole model, a module name with ``per_layer``, or
``class=<c>`` with ``per_class``):

* ``eigenvalue`` (index 0 = largest): top-k eigenvalues of the loss Hessian by Lanczos with full
  reorthogonalisation, stopped when every wanted eigenvalue's certified error bound is ``<= tol |lambda|``
  (Lehmann bounds with a rounding floor, checked against missed eigenvalues by a restart check; see
  :mod:`diagnostics.linalg.lanczos`); with ``strict_residual`` the residual ``||Hv - lambda v||`` must
  meet the tolerance too (accurate eigenvectors). ``stderr`` holds the bound on ``|lambda - theta|`` for
  the eigenvalue of the same index (``inf`` when the run stopped before a certificate).
* ``bottom_eigenvalue`` (index 0 = smallest): likewise at the bottom; negative values mean saddles.
* ``trace``: Hutch++ estimate with its standard error.
* ``negative_mass``: the fraction of eigenvalues below ``-delta``,
  ``delta = max(negative_tol |lambda_max|, (theta_max - theta_min) / density_steps)`` (the quadrature's
  resolution: finer thresholds sit inside the node spacing around 0), from the SLQ nodes and weights.
  ``stderr`` is half the reach of an interval (~95%) that holds the quadrature error (the
  Chebyshev-Markov-Stieltjes bracket of each probe) and the probe noise (t quantile); the interval and
  ``delta`` are in the metadata.
* ``eos_threshold`` and ``eos_ratio = eigenvalue_0 / eos_threshold`` when the learning rate is known:
  ``2/lr`` for GD/SGD (so ``eos_ratio = lambda_max * lr / 2``), ``(2+2 beta)/lr`` with heavy-ball
  momentum, ``(2+2 beta)/((1+2 beta) lr)`` with Nesterov (Cohen et al. 2021). For Adam the raw Hessian
  has no threshold; see ``diag sharpness`` for the preconditioned one.

Curvature beyond the Hessian (:mod:`diagnostics.linalg.curvature`): ``--curvature`` replaces the Hessian by
the Gauss-Newton matrix, the Fisher, the empirical Fisher or ``H - GGN`` in every output above (top/bottom
eigenvalues, trace, density, per-layer, per-class; metric names unchanged, the matrix in the metadata's
``curvature``). Further records, each declared below with its formula: ``curvature_eigenvalue``
(``--compare-curvatures``), ``gradient_alignment``/``gradient_overlap``, ``outlier_count``/``bulk_edge``/
``num_classes`` (``--outliers``), ``batch_sharpness``/``batch_sharpness_ratio`` (always of the loss Hessian of
each mini-batch), ``block_eigenvalue``/``block_heterogeneity``. They live in this analyzer (not a separate
one) because their report sections compare them with its own records: batch sharpness with ``eigenvalue_0``
and ``eos_threshold``, the Gauss-Newton spectrum with the Hessian's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from diagnostics.analyzers.eos import eos_notes, eos_threshold, lr_info
from diagnostics.errors import DiagnosticsError
from diagnostics.lazy import lazy_from, lazy_import
from diagnostics.progress import bind
from diagnostics.results import Result, concat_later, make_records
from diagnostics.spec import (
    PANEL_SCALE,
    Analyzer,
    FileOutput,
    Metric,
    Section,
    Threshold,
    check_config,
    option,
)

if TYPE_CHECKING:
    from diagnostics.context import Batch, Context
    from diagnostics.linalg.lanczos import LanczosResult
    from diagnostics.linalg.operator import DataOperator, HessianOperator
    from diagnostics.progress import ProgressFn

torch = lazy_import("torch")
parameter_groups, available_devices, check_device = lazy_from(
    "diagnostics.context", "parameter_groups", "available_devices", "check_device"
)
world = lazy_from("diagnostics.distributed", "world")
default_grid, gaussian_density, grid_mass, negative_mass, quadrature_resolution, slq = lazy_from(
    "diagnostics.linalg.density",
    "default_grid",
    "gaussian_density",
    "grid_mass",
    "negative_mass",
    "quadrature_resolution",
    "slq",
)
lanczos, unconverged_fix = lazy_from("diagnostics.linalg.lanczos", "lanczos", "unconverged_fix")
batch_size = lazy_from("diagnostics.batches", "batch_size")
hutchpp = lazy_from("diagnostics.linalg.trace", "hutchpp")
curvature_operator = lazy_from("diagnostics.operators", "curvature_operator")
cm = lazy_import("diagnostics.analyzers.curvature_metrics")
sampled_fisher_stderr = lazy_from("diagnostics.linalg.curvature", "sampled_fisher_stderr")

NAME = "hessian"
HVP_BACKENDS = ("auto", "cached", "forward", "reverse")
# the curvature matrices (diagnostics.linalg.curvature.CURVATURES, repeated here to keep this module torch-free)
CURVATURES = ("hessian", "ggn", "fisher", "empirical_fisher", "functional")
# how the Hessian is computed, not what is measured: the gate takes these from its own settings
SCALE_OPTIONS = (
    "backend",
    "max_vectors",
    "micro_batch",
    "autocast",
    "accumulate_dtype",
    "compile",
    "basis_device",
    "block_size",
)


@dataclass
class ScaleOptions:
    """How Hessian-vector products are computed (not what is measured); shared by ``diag hessian`` and the gate."""

    backend: str = option(
        "auto",
        help="HVP backend: auto (cached graph for one batch, else forward-over-reverse) | cached | forward | reverse",
        choices=HVP_BACKENDS,
        panel=PANEL_SCALE,
    )
    max_vectors: int = option(16, help="vectors per vmapped HVP pass (lower saves memory)", min=1, panel=PANEL_SCALE)
    basis_device: str | None = option(
        None, help="keep the Lanczos basis here, e.g. cpu (saves GPU memory)", panel=PANEL_SCALE
    )
    micro_batch: int | None = option(
        None,
        help="split batches into micro-batches of this size (exact accumulation; default: on the CPU one batch of a built-in loss is cut to save memory)",
        min=1,
        panel=PANEL_SCALE,
    )
    autocast: str | None = option(
        None, help="mixed-precision forward", choices=("bfloat16", "float16"), panel=PANEL_SCALE
    )
    accumulate_dtype: str | None = option(
        None, help="accumulate HVPs over batches in this dtype", choices=("float32", "float64"), panel=PANEL_SCALE
    )
    block_size: int = option(1, help="block Lanczos / lockstep SLQ: vectors per data pass", min=1, panel=PANEL_SCALE)
    compile: bool = option(
        False,
        help="torch.compile the per-batch HVP (pays off on long runs; falls back to eager with a note)",
        panel=PANEL_SCALE,
    )

    def operator_options(self) -> dict[str, Any]:
        """Keyword arguments of :func:`diagnostics.operators.hessian_operator` (backend and scale)."""
        return {
            "backend": self.backend,
            "max_vectors": self.max_vectors,
            "micro_batch": self.micro_batch,
            "autocast": self.autocast,
            "accumulate_dtype": self.accumulate_dtype,
            "compile": self.compile,
        }

    def validate(self) -> None:
        """Cross-option rules (single options are checked from their declarations)."""
        basis_device(self)


def basis_device(config: ScaleOptions) -> torch.device | None:
    """The device of the Lanczos basis (``--basis-device``; None: the operator's), checked against this machine.

    Raises:
        DiagnosticsError: an unknown device or one this machine lacks (``cuda`` without CUDA), listing those it has.
    """
    if config.basis_device is None:
        return None
    return check_device(str(config.basis_device), available_devices(), "--basis-device")


@dataclass
class HessianConfig(ScaleOptions):
    """Settings of :func:`analyze_hessian` (options of ``diag hessian``, ``[hessian]`` in diag.toml)."""

    top_k: int = option(1, help="number of top eigenvalues", short="-k", min=0)
    bottom_k: int = option(0, help="number of bottom eigenvalues (negative ones mean saddles)", min=0)
    tol: float = option(
        1e-3,
        help="relative accuracy of each eigenvalue: error bound <= tol·|λ|",
        min=0,
        max=1,
        min_open=True,
        max_open=True,
    )
    max_iter: int = option(300, help="Lanczos iteration cap", min=1)
    strict_residual: bool = option(
        False,
        help="also require the residual ||Hv-λv|| <= tol·|λ| (accurate eigenvectors), not only the eigenvalue bound",
    )
    warm_start: bool = option(
        False,
        help="in diag run, start Lanczos from the previous checkpoint's eigenvectors (same guarantees; a few % fewer HVPs)",
    )
    trace: bool = option(False, help="estimate the trace (Hutch++, with stderr)")
    trace_rtol: float = option(0.01, help="stop the trace when stderr <= rtol·|trace| (0: use every sample)", min=0)
    trace_sketch: int = option(10, help="Hutch++ sketch size (vectors of the low-rank part)", min=0)
    trace_samples: int = option(200, help="most Hutchinson samples of the trace", min=2)
    density: bool = option(False, help="spectral density by stochastic Lanczos quadrature")
    density_probes: int = option(5, help="SLQ probes", min=1)
    density_steps: int = option(80, help="Lanczos steps per SLQ probe", min=2)
    density_points: int = option(512, help="grid points of the smoothed density", min=16)
    density_sigma: float | None = option(
        None, help="Gaussian smoothing width of the density (default: from the spectral range)", min=0, min_open=True
    )
    negative_tol: float = option(
        1e-4,
        help="negative_mass counts eigenvalues below -max(negative_tol·|λ_max|, quadrature resolution)",
        min=0,
        min_open=True,
    )
    curvature: str = option(
        "hessian",
        help="the matrix every output analyses: hessian | ggn (Gauss-Newton J^T H_l J) | fisher | empirical_fisher "
        "| functional (H - GGN)",
        choices=CURVATURES,
    )
    fisher_samples: int = option(
        16,
        help="labels sampled per input for --curvature fisher when the loss has no exact Fisher (nll, custom)",
        min=2,
    )
    compare_curvatures: list[str] = option(
        default_factory=list,
        help="also the top-k eigenvalues of these curvatures (curvature_eigenvalue), e.g. hessian,ggn",
        choices=CURVATURES,
    )
    outliers: bool = option(
        False, help="count the top eigenvalues above the bulk edge of the spectral density (vs the number of classes)"
    )
    outlier_k: int | None = option(
        None, help="top eigenvalues examined by --outliers (default: 3 x the number of model outputs)", min=1
    )
    gradient_alignment: bool = option(
        False, help="the gradient's share in the top-k eigenspace, ||U_k^T g||^2/||g||^2 (Gur-Ari et al. 2018)"
    )
    batch_sharpness: bool = option(
        False, help="E_B[g_B^T H_B g_B / ||g_B||^2] over batches of --batch-size (Andreyev & Beneventano 2024)"
    )
    block_heterogeneity: bool = option(
        False, help="per-block top eigenvalue and SLQ density; mean pairwise JS distance (Zhang et al. 2024)"
    )
    blocks: str = option(
        "tensor",
        help="blocks of --block-heterogeneity: each parameter tensor, or each layer",
        choices=("tensor", "layer"),
    )
    per_layer: bool = option(False, help="also the spectrum of each layer's block")
    per_class: bool = option(False, help="also the Hessian of each class's loss")
    lr: float | None = option(
        None, help="learning rate for eos_ratio (default: from the checkpoint)", min=0, min_open=True
    )

    def validate(self) -> None:
        """Cross-option rules (single options are checked from their declarations)."""
        super().validate()
        if self.top_k + self.bottom_k == 0:
            raise DiagnosticsError("ask for at least one eigenvalue: --top-k >= 1 or --bottom-k >= 1")


def build_operator(
    ctx: Context,
    config: HessianConfig,
    *,
    names: list[str] | None = None,
    batches: list[Batch] | None = None,
    backend: str | None = None,
    kind: str | None = None,
    shard: bool | None = None,
) -> DataOperator:
    """The operator ``diag hessian`` measures (``config.curvature``), with ``config``'s backend and scale options.

    Args:
        ctx: the context.
        config: the settings (``curvature``, ``fisher_samples``, ``backend``, ``max_vectors``,
            ``micro_batch``, ``autocast``, ``accumulate_dtype``, ``compile`` apply).
        names: restrict to these parameters (a layer's block).
        batches: use these batches (a class's samples).
        backend: override ``config.backend`` (e.g. the one the whole-model operator settled on).
        kind: override ``config.curvature``.
        shard: shard the data over the process group (default: when one is active).

    Returns:
        The operator (the Hessian, or a curvature operator of :mod:`diagnostics.linalg.curvature`; sharded
        over the process group by default; see ``diagnostics.operators.curvature_operator``).
    """
    options = config.operator_options()
    if backend is not None:
        options["backend"] = backend
    return curvature_operator(
        ctx,
        kind or config.curvature,
        names=names,
        batches=batches,
        shard=shard,
        fisher_samples=config.fisher_samples,
        generator=ctx.generator(7),
        **options,
    )


def run_lanczos(
    op: HessianOperator,
    config: HessianConfig,
    generator: torch.Generator,
    progress: ProgressFn | None = None,
    start: torch.Tensor | None = None,
) -> LanczosResult:
    """Top-``top_k`` and bottom-``bottom_k`` eigenpairs of ``op`` as ``diag hessian`` computes them.

    Lanczos with ``config``'s ``tol``, ``max_iter``, ``basis_device``, ``block_size`` and stopping rule
    (``strict_residual``: the residual, else the gap-theorem error bound); the counts are clipped to
    the operator's dimension.

    Args:
        op: the operator.
        config: the settings.
        generator: the start vector's random stream.
        progress: ``progress(done, total)``.
        start: warm start ``[n, j]`` (e.g. the previous checkpoint's eigenvectors; see :func:`lanczos`).

    Returns:
        The :class:`LanczosResult`.
    """
    k_top = min(config.top_k, op.dim)
    k_bot = min(config.bottom_k, max(op.dim - k_top, 0)) if op.dim > 1 else 0
    return lanczos(
        op,
        k_top=k_top,
        k_bottom=k_bot,
        tol=config.tol,
        max_iter=config.max_iter,
        generator=generator,
        basis_device=basis_device(config),
        block_size=config.block_size,
        criterion="residual" if config.strict_residual else "bound",
        progress=progress,
        start=start,
    )


@dataclass
class _Spectrum:
    rows: list[tuple]
    lanczos: LanczosResult | None
    density: dict[str, Any] | None  # the density table's columns (``group, eigenvalue, density``)
    info: dict[str, Any]


def _trace(
    op: HessianOperator,
    config: HessianConfig,
    generator: torch.Generator,
    progress: Any,
    rows: list[tuple],
    group: str | None,
) -> dict[str, Any]:
    """Hutch++ trace of ``op`` -> a ``trace`` row (value, calibrated stderr) and its metadata."""
    start = op.hvp_count
    est = hutchpp(
        op,
        generator=generator,
        sketch=config.trace_sketch,
        min_samples=20,
        max_samples=config.trace_samples,
        rtol=config.trace_rtol,
        progress=progress,
    )
    rows.append(("trace", est.value, est.stderr, None, group))
    return {"hvps": op.hvp_count - start, "samples": est.samples, "sketch": est.sketch}


def _density(
    op: HessianOperator,
    config: HessianConfig,
    res: LanczosResult,
    generator: torch.Generator,
    progress: Any,
    rows: list[tuple],
    group: str | None,
) -> tuple[Any, dict[str, Any]]:
    """SLQ spectral density of ``op`` and the ``negative_mass`` row -> (density table's columns, metadata).

    ``delta = max(negative_tol |lambda_max|, quadrature resolution)``; ``lambda_max`` from the Lanczos
    result, else from the quadrature nodes.
    """
    start = op.hvp_count
    q = slq(
        op,
        probes=config.density_probes,
        steps=min(config.density_steps, op.dim),
        generator=generator,
        progress=progress,
        block=config.block_size,
    )
    lam_max = (
        abs(float(res.eigenvalues[0])) if len(res.eigenvalues) else max(abs(float(t.abs().max())) for t in q.nodes)
    )
    delta = max(config.negative_tol * lam_max, quadrature_resolution(q.nodes, config.density_steps))
    nm = negative_mass(q.nodes, q.weights, delta)
    rows.append(("negative_mass", nm.value, nm.stderr, None, group))
    grid, sigma = default_grid(q.nodes, config.density_points)
    if config.density_sigma:
        sigma = config.density_sigma
    values = gaussian_density(q.nodes, q.weights, grid, sigma)
    density = {"group": group or "", "eigenvalue": grid.numpy(), "density": values.numpy()}
    info = {
        "hvps": op.hvp_count - start,
        "probes": config.density_probes,
        "steps": config.density_steps,
        "sigma": sigma,
        "grid_mass": grid_mass(grid, values),
        "grid_step": float(grid[1] - grid[0]),
        "negative_mass": {
            "delta": nm.delta,
            "interval": [nm.low, nm.high],
            "quadrature_bias": nm.bias,
            "probe_noise": nm.noise,
        },
        "nodes": [t.tolist() for t in q.nodes],
        "weights": [t.tolist() for t in q.weights],
    }
    return density, info


def _spectrum(
    op: HessianOperator,
    config: HessianConfig,
    ctx: Context,
    group: str | None,
    stream: int,
    progress: ProgressFn | None,
    warm: dict[str, Any] | None = None,
) -> _Spectrum:
    """Eigenvalues (+ trace, + density) of one operator -> record rows."""
    label = "" if group is None else f" [{group}]"
    rows: list[tuple] = []
    info: dict[str, Any] = {"dim": op.dim}
    start = op.hvp_count
    vectors = _warm_vectors(warm, ctx, group, op) if config.warm_start else None
    res = run_lanczos(op, config, ctx.generator(stream), bind(progress, f"lanczos{label}"), start=vectors)
    if warm is not None and config.warm_start:
        warm.setdefault("vectors", {})[group] = (
            _signature(ctx, op),
            torch.cat([res.eigenvectors, res.bottom_eigenvectors], 1).detach().clone(),
        )
    info["lanczos"] = {
        "iterations": res.iterations,
        "converged": res.converged,
        "restarts": res.restarts,
        "hvps": op.hvp_count - start,
        "criterion": res.criterion,
        "residuals": res.residuals.tolist(),
        "bottom_residuals": res.bottom_residuals.tolist(),
        "error_bounds": res.error_bounds.tolist(),
        "bottom_error_bounds": res.bottom_error_bounds.tolist(),
        "checks": res.checks,
        "check_hvps": res.check_matvecs,
        "rounding": res.rounding,
        "floor_tol": res.floor_tol,
        "basis_rows": res.basis_rows,
        "warm_start": warm.get("source") if vectors is not None and warm is not None else None,
    }
    for i, (lam, e) in enumerate(zip(res.eigenvalues.tolist(), res.error_bounds.tolist())):
        rows.append(("eigenvalue", lam, e, i, group))
    for i, (lam, e) in enumerate(zip(res.bottom_eigenvalues.tolist(), res.bottom_error_bounds.tolist())):
        rows.append(("bottom_eigenvalue", lam, e, i, group))
    if config.trace:
        info["trace"] = _trace(op, config, ctx.generator(stream + 1), bind(progress, f"trace{label}"), rows, group)
    density = None
    if config.density:
        density, info["density"] = _density(
            op, config, res, ctx.generator(stream + 2), bind(progress, f"density{label}"), rows, group
        )
    return _Spectrum(rows, res, density, info)


def density_notes(info: dict[str, Any], group: str | None) -> list[str]:
    """A note when the smoothed density does not integrate to about 1 over its grid (off by more than 10%):
    a ``--density-sigma`` below the grid spacing (the grid falls between the Gaussians' peaks) or so wide that
    the mass spreads beyond the spectrum's range. The SLQ nodes and weights in the metadata are unaffected."""
    dens = info.get("density")
    if not dens or (math.isfinite(dens["grid_mass"]) and abs(dens["grid_mass"] - 1.0) <= 0.1):
        return []
    where = "" if group is None else f" of {group}"
    sigma, step = dens["sigma"], dens["grid_step"]
    cause = (
        f"below the grid spacing {step:.3g} (use a larger --density-sigma or more --density-points)"
        if sigma < step
        else "wider than the spectrum (use a smaller --density-sigma, or leave it out for 1% of the range)"
    )
    return [
        f"the smoothed density{where} integrates to {dens['grid_mass']:.3g} over its grid, not 1: --density-sigma "
        f"{sigma:.3g} is {cause}"
    ]


def class_batches(batches: list[Batch]) -> dict[Any, list[Batch]]:
    """Split batches by integer class label: ``{c: [(x[y == c], y[y == c]), ...]}`` (empty parts dropped)."""
    labels: set[int] = set()
    for _, y in batches:
        if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.is_floating_point():
            raise DiagnosticsError("--per-class needs integer class labels (1-d targets)")
        labels.update(int(c) for c in torch.unique(y).tolist())
    out: dict[Any, list[Batch]] = {}
    for c in sorted(labels):
        parts = []
        for x, y in batches:
            mask = y == c
            if bool(mask.any()):
                if not isinstance(x, torch.Tensor):
                    raise DiagnosticsError("--per-class needs tensor inputs")
                parts.append((x[mask], y[mask]))
        out[c] = parts
    return out


def check_k(config: HessianConfig, dim: int) -> list[str]:
    """Refuse ``--top-k``/``--bottom-k`` above the Hessian's dimension (before any HVP); note an overlap.

    A ``dim x dim`` Hessian has ``dim`` eigenvalues: asking for more would run Lanczos to the whole
    spectrum and quietly return fewer values than asked. When top and bottom together exceed ``dim``,
    the bottom ones are the ``dim - top_k`` that are not top ones (a note says so).
    """
    for flag, k in (("--top-k", config.top_k), ("--bottom-k", config.bottom_k)):
        if k > dim:
            raise DiagnosticsError(
                f"{flag} {k} asks for more eigenvalues than the Hessian has: it is {dim} x {dim} ({dim} analysed "
                f"parameters); use {flag} {dim} for the whole spectrum, or --density"
            )
    if config.top_k + config.bottom_k > dim:
        return [
            f"--top-k {config.top_k} and --bottom-k {config.bottom_k} overlap on a {dim} x {dim} Hessian: "
            f"the {max(dim - config.top_k, 0)} bottom eigenvalues that are not top ones are reported"
        ]
    return []


def _eos(config: HessianConfig, ctx: Context, full: _Spectrum) -> tuple[list[tuple], dict[str, Any]]:
    """Edge-of-stability rows (threshold, ratio) and their metadata."""
    rows: list[tuple] = []
    lr = config.lr if config.lr is not None else ctx.lr
    opt = ctx.checkpoint_metadata.get("optimizer") or {}
    thr = eos_threshold(lr, opt)
    eos_info = lr_info(lr, opt)
    if thr is not None and thr.kind != "adam_preconditioned" and config.top_k >= 1:
        lam0 = float(full.lanczos.eigenvalues[0])
        rows.append(("eos_threshold", thr.value, None, None, None))
        rows.append(("eos_ratio", lam0 / thr.value, None, None, None))
        eos_info.update({"threshold": thr.value, "rule": thr.rule, "kind": thr.kind})
        if not opt:
            eos_info["assumed"] = "no optimizer metadata: plain gradient descent assumed (threshold 2/lr)"
    elif thr is not None:
        eos_info["note"] = (
            "Adam: the raw Hessian has no stability threshold; the preconditioned sharpness "
            f"lambda_max(P^-1 H) hovers near {thr.value:.4g} = {thr.rule} (see diag sharpness)"
        )
    return rows, eos_info


def _signature(ctx: Context, op: HessianOperator) -> tuple:
    """What must match for a warm start: the parameters' names and shapes, the operator's size and dtype."""
    return (tuple((n, tuple(p.shape)) for n, p in ctx.params.items()), op.dim, str(op.dtype))


def _warm_vectors(warm: dict[str, Any] | None, ctx: Context, group: str | None, op: HessianOperator):
    """The previous checkpoint's eigenvectors of the same group when the parameter shapes match (else None)."""
    if not warm or group not in warm.get("vectors", {}):
        return None
    signature, vectors = warm["vectors"][group]
    if signature != _signature(ctx, op) or vectors.shape[1] == 0:
        return None
    return vectors


def _blocks(config: HessianConfig, ctx: Context) -> list[tuple[str, str, dict[str, Any], int, dict[str, Any]]]:
    """The per-layer and per-class spectra asked for: ``(section, group, operator kwargs, stream, extra info)``."""
    out = []
    if config.per_layer:
        for gi, (gname, names) in enumerate(parameter_groups(ctx.params).items()):
            out.append(("per_layer", gname, {"names": names}, 1000 * (gi + 1), {}))
    if config.per_class:
        for ci, (c, parts) in enumerate(class_batches(ctx.batches).items()):
            extra = {"samples": sum(int(p[1].shape[0]) for p in parts)}
            out.append(("per_class", f"class={c}", {"batches": parts}, 100_000 * (ci + 1), extra))
    return out


def _mc_errors(op: Any, res: LanczosResult | None) -> tuple[list[float], list[float]] | None:
    """Monte-Carlo standard errors of a sampled Fisher's top and bottom eigenvalues (None for other operators)."""
    if res is None or getattr(op, "fisher_samples", None) is None:
        return None
    top = sampled_fisher_stderr(op, res.eigenvectors).tolist() if res.eigenvectors.shape[1] else []
    bottom = sampled_fisher_stderr(op, res.bottom_eigenvectors).tolist() if res.bottom_eigenvectors.shape[1] else []
    return top, bottom


def _with_mc_errors(rows: list[tuple], errors: tuple[list[float], list[float]] | None, group: Any) -> list[tuple]:
    """``eigenvalue``/``bottom_eigenvalue`` rows of ``group`` with stderr ``sqrt(bound^2 + mc^2)`` (sampled Fisher)."""
    if errors is None:
        return rows
    out = []
    for metric, value, se, index, g in rows:
        table = {"eigenvalue": errors[0], "bottom_eigenvalue": errors[1]}.get(metric)
        if table is not None and g == group and index is not None and index < len(table):
            se = math.hypot(float(se), float(table[index]))
        out.append((metric, value, se, index, g))
    return out


def _curvature_info(op: Any) -> dict[str, Any]:
    """What matrix an operator is: its kind and, for the Fisher, the identity used or the sample count."""
    info: dict[str, Any] = {"kind": getattr(op, "kind", "hessian")}
    if getattr(op, "fisher_rule", None):
        info["fisher"] = f"exact: {op.fisher_rule}"
    if getattr(op, "fisher_samples", None):
        info["fisher"] = (
            f"sampled: {op.fisher_samples} labels per input from p(c|x) = exp(-loss(z, c)); eigenvalue stderr = "
            "sqrt(Lanczos bound^2 + Monte-Carlo stderr^2); trace/density carry no Monte-Carlo error"
        )
    return info


def analyze_hessian(
    config: HessianConfig,
    ctx: Context,
    progress: ProgressFn | None = None,
    warm: dict[str, Any] | None = None,
) -> Result:
    """Spectrum of the loss Hessian (or of ``config.curvature``) at ``ctx`` -> records (see module docstring).

    Artifacts: ``lanczos`` (the :class:`LanczosResult` of the whole model, with eigenvectors) and
    ``density`` (a DataFrame ``group, eigenvalue, density`` when asked).

    Args:
        config: the settings.
        ctx: the checkpoint.
        progress: ``progress(task, done, total)``.
        warm: a sweep's scratch dict (``Analyzer.warm_start``): Lanczos starts from the eigenvectors the
            previous checkpoint left there (block start, padded with random vectors) when the parameter
            names and shapes match, and leaves this checkpoint's. The error bounds are certified the same
            way, so the answers agree with a cold start within ``tol``; only the HVP count changes.
    """
    check_config(config)
    notes = check_k(config, ctx.n_params)  # before any HVP
    op = build_operator(ctx, config)
    full = _spectrum(op, config, ctx, None, 0, progress, warm)
    mc = _mc_errors(op, full.lanczos)
    total_hvps = op.hvp_count
    notes += op.notes
    rows = _with_mc_errors(list(full.rows), mc, None)
    info: dict[str, Any] = {"curvature": _curvature_info(op), "model": full.info}
    if mc is not None:
        info["model"]["fisher_mc_stderr"] = {"top": mc[0], "bottom": mc[1]}
    densities = [full.density] if full.density is not None else []
    notes += density_notes(full.info, None)
    eos_rows, info["eos"] = _eos(config, ctx, full)
    rows += eos_rows
    notes += eos_notes(config.lr if config.lr is not None else ctx.lr, ctx.checkpoint_metadata.get("optimizer"))
    for section, group, where, stream, extra in _blocks(config, ctx):
        bop = build_operator(ctx, config, backend=op.backend, **where)
        spec = _spectrum(bop, config, ctx, group, stream, progress, warm)
        rows += _with_mc_errors(spec.rows, _mc_errors(bop, spec.lanczos), group)
        total_hvps += bop.hvp_count
        notes += bop.notes
        info.setdefault(section, {})[group] = {**spec.info, **extra}
        if spec.density is not None:
            densities.append(spec.density)
            notes += density_notes(spec.info, group)
    if full.info["lanczos"]["warm_start"]:
        notes.append(f"warm start from {full.info['lanczos']['warm_start']} (its eigenvectors start Lanczos)")
    if not full.lanczos.converged:
        what = "error bound and residual" if config.strict_residual else "error bound"
        fix = unconverged_fix(full.lanczos.floor_tol, op.dtype)
        notes.append(
            f"Lanczos stopped after {full.lanczos.iterations} iterations before every {what} met tol={config.tol}: "
            f"{fix} (each eigenvalue's error bound is in stderr)"
        )
    beyond = _beyond_spectrum(config, ctx, op, full, progress)
    rows += beyond.rows
    total_hvps += beyond.hvps
    notes += beyond.notes
    info.update(beyond.info)
    metadata = {
        "backend": op.backend,
        "micro_batch_auto": op.auto_micro_batch,
        "hvp_count": total_hvps,
        "processes": world().size,
        "sharded": op.loop.sharded,
        "notes": list(dict.fromkeys(notes)),
        **info,
    }
    artifacts: dict[str, Any] = {"lanczos": full.lanczos}
    if densities:
        artifacts["density"] = concat_later(densities)  # a DataFrame once read
    return Result(make_records(ctx.checkpoint, ctx.step, NAME, rows), metadata, artifacts)


# ------------------------------------------------------------------------------ beyond the spectrum
@dataclass
class _Beyond:
    rows: list[tuple] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    hvps: int = 0


def _curvature_group(kind: str) -> str:
    return f"curvature={kind}"


def num_outputs(ctx: Context) -> int | None:
    """Model outputs per sample (classes for a classifier): ``z.shape[1]`` of the smallest batch, or None."""
    if not ctx.batches:
        return None
    smallest = min(ctx.batches, key=batch_size)
    with torch.no_grad():
        z = ctx.forward(ctx.params, smallest[0])
    if not isinstance(z, torch.Tensor) or z.dim() < 2:
        return None
    return int(z.shape[1])


def _slq_nodes(
    op: Any, config: HessianConfig, ctx: Context, full: _Spectrum | None, stream: int
) -> tuple[list[Any], list[Any], int]:
    """SLQ nodes/weights of ``op``: the ones ``--density`` computed, else a fresh run -> (nodes, weights, hvps)."""
    if full is not None and "density" in full.info:
        d = full.info["density"]
        return (
            [torch.tensor(t, dtype=torch.float64) for t in d["nodes"]],
            [torch.tensor(w, dtype=torch.float64) for w in d["weights"]],
            0,
        )
    start = op.hvp_count
    q = slq(
        op,
        probes=config.density_probes,
        steps=min(config.density_steps, op.dim),
        generator=ctx.generator(stream),
        block=config.block_size,
    )
    return list(q.nodes), list(q.weights), op.hvp_count - start


def _beyond_spectrum(
    config: HessianConfig, ctx: Context, op: Any, full: _Spectrum, progress: ProgressFn | None
) -> _Beyond:
    """Curvature comparisons, outliers, gradient alignment, batch sharpness and block heterogeneity."""
    out = _Beyond()
    if config.compare_curvatures or config.outliers or config.gradient_alignment:
        _curvature_runs(config, ctx, op, full, out, progress)
    if config.batch_sharpness:
        _batch_sharpness(config, ctx, out, progress)
    if config.block_heterogeneity:
        _block_heterogeneity(config, ctx, op, out, progress)
    return out


def _eigenpairs(
    config: HessianConfig,
    ctx: Context,
    kop: Any,
    kind: str,
    want: int,
    ci: int,
    residual: bool,
    progress: ProgressFn | None,
) -> tuple[LanczosResult, dict[str, Any]]:
    """Top ``want`` eigenpairs of the curvature ``kind`` (stream ``500_000 + ci``) and their run details.

    ``residual``: stop on the residual (accurate eigenvectors, for the gradient alignment).
    """
    start = kop.hvp_count
    res = lanczos(
        kop,
        k_top=want,
        tol=config.tol,
        max_iter=config.max_iter,
        generator=ctx.generator(500_000 + ci),
        basis_device=basis_device(config),
        block_size=config.block_size,
        criterion="residual" if residual or config.strict_residual else "bound",
        progress=bind(progress, f"{kind} eigenpairs"),
    )
    info = {
        "hvps": kop.hvp_count - start,
        "iterations": res.iterations,
        "converged": res.converged,
        "criterion": res.criterion,
    }
    return res, info


def _alignment(res: LanczosResult, gradient: Any, k: int, kind: str, group: str | None, out: _Beyond) -> dict[str, Any]:
    """``gradient_alignment`` (with its Davis-Kahan bound) and ``gradient_overlap`` rows -> their metadata."""
    eig = res.eigenvalues.tolist()
    value, overlaps, bound, gap = cm.alignment_from_ritz(
        res.eigenvectors, eig[: k + 1], res.residuals.tolist()[: k + 1], gradient, k
    )
    out.rows.append(("gradient_alignment", value, bound, None, group))
    for i, o in enumerate(overlaps):
        out.rows.append(("gradient_overlap", o, None, i, group))
    if bound >= 0.5:
        out.notes.append(
            f"{kind}: the top-{k} eigenspace is not separated from eigenvalue {k + 1} (gap {gap:.3g}); "
            f"the gradient alignment is undetermined to within {bound:.2f} (lower --tol or change --top-k)"
        )
    return {
        "k": k,
        "value": value,
        "bound": bound,
        "gap": gap,
        "gradient_norm": float(gradient.norm()),
        "rule": "|error| <= ||R_k||_F / (theta_k - theta_{k+1} - r_{k+1}) (Davis-Kahan sin-theta), 1 when "
        "the gap is not positive",
    }


def _outliers(
    eig: list[float],
    nodes: Any,
    weights: Any,
    dim: int,
    config: HessianConfig,
    kind: str,
    group: str | None,
    out: _Beyond,
) -> dict[str, Any]:
    """``outlier_count`` and ``bulk_edge`` rows from the examined top eigenvalues ``eig`` -> their metadata."""
    m = len(eig)
    count, edge, saturated = cm.count_outliers(eig, nodes, weights, dim, config.density_sigma)
    out.rows.append(("outlier_count", float(count), None, None, group))
    out.rows.append(("bulk_edge", edge, None, None, group))
    if saturated:
        out.notes.append(
            f"{kind}: all {m} examined eigenvalues lie above the bulk edge; outlier_count is a lower bound "
            "(raise --outlier-k)"
        )
    return {"count": count, "edge": edge, "examined": m, "saturated": saturated}


def _curvature_runs(
    config: HessianConfig, ctx: Context, op: Any, full: _Spectrum, out: _Beyond, progress: ProgressFn | None
) -> None:
    """Top eigenpairs of each compared curvature (and of ``--curvature`` for alignment/outliers) -> rows."""
    primary = config.curvature
    kinds = list(dict.fromkeys(config.compare_curvatures))
    if (config.gradient_alignment or config.outliers) and primary not in kinds:
        kinds.insert(0, primary)
    classes = num_outputs(ctx) if config.outliers else None
    m = min(config.outlier_k or 3 * (classes or 10), op.dim) if config.outliers else 0
    k = min(config.top_k, op.dim)
    gradient = op.gradient() if config.gradient_alignment and k >= 1 else None
    if config.outliers and classes is not None:
        out.rows.append(("num_classes", float(classes), None, None, None))
    runs: dict[str, Any] = {}
    for ci, kind in enumerate(kinds):
        group = None if kind == primary else _curvature_group(kind)
        kop = op if kind == primary else build_operator(ctx, config, kind=kind)
        want = max(k + 1 if gradient is not None else 0, m, k if kind in config.compare_curvatures else 0)
        want = min(want, kop.dim)
        reuse = kind == primary and gradient is None and want <= len(full.lanczos.eigenvalues)
        if reuse:
            res, run_info = full.lanczos, {"reused": "the --curvature Lanczos run"}
        else:
            res, run_info = _eigenpairs(config, ctx, kop, kind, want, ci, gradient is not None, progress)
            out.hvps += run_info["hvps"] if kind == primary else kop.hvp_count
            if kind != primary:
                out.notes += kop.notes
            if not res.converged:
                out.notes.append(
                    f"{kind}: Lanczos for {want} eigenpairs stopped after {res.iterations} iterations before tol="
                    f"{config.tol}: {unconverged_fix(res.floor_tol, kop.dtype)}"
                )
        eig = res.eigenvalues.tolist()
        bounds = res.error_bounds.tolist()
        run_info.update({"eigenvalues": eig, "residuals": res.residuals.tolist(), "error_bounds": bounds})
        mc = _mc_errors(kop, res) if not reuse else None
        if kind in config.compare_curvatures:
            for i in range(min(k, len(eig))):
                se = bounds[i] if mc is None else math.hypot(bounds[i], mc[0][i])
                out.rows.append(("curvature_eigenvalue", eig[i], se, i, _curvature_group(kind)))
        if gradient is not None:
            run_info["alignment"] = _alignment(res, gradient, k, kind, group, out)
        if config.outliers:
            nodes, weights, hv = _slq_nodes(kop, config, ctx, full if kind == primary else None, 600_000 + ci)
            out.hvps += hv
            run_info["outliers"] = _outliers(eig[:m], nodes, weights, kop.dim, config, kind, group, out)
        runs[kind] = run_info
    out.info["curvatures"] = runs
    if classes is not None:
        out.info["num_classes"] = classes


def _batch_sharpness(config: HessianConfig, ctx: Context, out: _Beyond, progress: ProgressFn | None) -> None:
    """Batch sharpness over ``ctx``'s batches (the loss Hessian, one HVP per batch) and its ratio to 2/eta."""
    hvps = 0
    options = config.operator_options()
    done = [0]

    def gradient_and_hvp(batch: Batch) -> tuple[Any, Any]:
        nonlocal hvps
        hop = curvature_operator(ctx, "hessian", batches=[batch], shard=False, **options)
        g = hop.gradient()
        hg = hop.matvec(g)
        hvps += hop.hvp_count
        done[0] += 1
        if progress is not None:
            progress("batch sharpness", done[0], len(ctx.batches))
        return g, hg

    bs = cm.batch_sharpness(ctx.batches, gradient_and_hvp, batch_size)
    se = bs.stderr if math.isfinite(bs.stderr) else None
    out.rows.append(("batch_sharpness", bs.value, se, None, None))
    lr = config.lr if config.lr is not None else ctx.lr
    thr = eos_threshold(lr, ctx.checkpoint_metadata.get("optimizer") or {})
    info: dict[str, Any] = {
        "batch_size": bs.batch_size,
        "batches": len(bs.per_batch),
        "per_batch": bs.per_batch,
        "dropped_samples": bs.dropped,
        "hvps": hvps,
        "matrix": "the loss Hessian of each batch (whatever --curvature)",
    }
    if thr is not None and thr.kind != "adam_preconditioned":
        out.rows.append(
            ("batch_sharpness_ratio", bs.value / thr.value, None if se is None else se / thr.value, None, None)
        )
        info.update({"threshold": thr.value, "rule": thr.rule})
    if len(ctx.batches) == 1:
        out.notes.append(
            "batch sharpness over one batch is the full-batch directional sharpness g^T H g / ||g||^2; pass "
            "--batch-size (the training batch size) for mini-batch SGD"
        )
    if bs.dropped:
        out.notes.append(f"batch sharpness: the last {bs.dropped} samples (a smaller batch) were left out")
    out.hvps += hvps
    out.info["batch_sharpness"] = info


def _block_heterogeneity(
    config: HessianConfig, ctx: Context, op: Any, out: _Beyond, progress: ProgressFn | None
) -> None:
    """Per-block top eigenvalue and SLQ density of ``--curvature``, and their mean pairwise JS distance."""
    if config.blocks == "layer":
        blocks = parameter_groups(ctx.params)
    else:
        blocks = {name: [name] for name in ctx.params}
    if len(blocks) < 2:
        out.notes.append("block heterogeneity needs at least two blocks; the model has one (see --blocks)")
        return
    spectra = []
    for bi, (bname, names) in enumerate(blocks.items()):
        bop = build_operator(ctx, config, names=names, backend=op.backend)
        spectra.append(
            cm.block_spectrum(
                bname,
                bop,
                tol=config.tol,
                max_iter=config.max_iter,
                probes=config.density_probes,
                steps=config.density_steps,
                generator=ctx.generator(400_000 + bi),
                block_size=config.block_size,
            )
        )
        out.hvps += bop.hvp_count
        if progress is not None:
            progress("block spectra", bi + 1, len(blocks))
    het = cm.block_heterogeneity(spectra, config.density_points, config.density_sigma)
    for b in spectra:
        out.rows.append(("block_eigenvalue", b.eigenvalue, b.error_bound, None, b.name))
    out.rows.append(("block_heterogeneity", het.value, het.stderr if math.isfinite(het.stderr) else None, None, None))
    out.info["block_heterogeneity"] = {
        "blocks": {b.name: {"dim": b.dim, "hvps": b.hvps, "converged": b.converged} for b in spectra},
        "distances": het.distances,
        "grid": list(het.grid),
        "sigma": het.sigma,
        "definition": "mean over block pairs of the Jensen-Shannon distance (bits) between their SLQ densities "
        "on one grid; stderr: jackknife over probes",
    }


_GROUP = "null for the whole model; a module name with --per-layer; class=<c> with --per-class"


ANALYZER = Analyzer(
    name=NAME,
    summary="top/bottom Hessian (or Gauss-Newton, Fisher) eigenvalues, trace, spectral density, edge of stability",
    description="Hessian spectrum of the loss at a checkpoint: eigenvalues, trace, density, edge of stability.",
    config=HessianConfig,
    order=10,
    run=analyze_hessian,
    warm_start=True,
    metrics=(
        Metric(
            "eigenvalue",
            "top-k eigenvalues of the loss Hessian (Lanczos, full reorthogonalisation); stderr = a certified bound "
            "on |λ_i - θ_i| (Lehmann intervals + rounding floor, guarded by a restart check)",
            unit="loss / weight^2",
            higher_is_better=False,
            headline=True,
            index="0 = largest (λ_max, the sharpness)",
            group=_GROUP,
        ),
        Metric(
            "bottom_eigenvalue",
            "bottom-k eigenvalues of the loss Hessian; negative values are directions of negative curvature (saddles)",
            unit="loss / weight^2",
            index="0 = smallest",
            group=_GROUP,
        ),
        Metric(
            "trace",
            "tr(H) by Hutch++ (low-rank sketch plus Hutchinson on the rest), with its standard error",
            unit="loss / weight^2",
            headline=True,
            group=_GROUP,
            reference="Meyer et al. 2021",
        ),
        Metric(
            "negative_mass",
            "fraction of eigenvalues below -delta, delta = max(negative_tol·|λ_max|, (θ_max-θ_min)/density_steps), "
            "from the SLQ nodes and weights; stderr covers the quadrature bracket and the probe noise",
            group=_GROUP,
        ),
        Metric(
            "eos_threshold",
            "edge-of-stability threshold of the optimizer: 2/η for GD, (2+2β)/η with heavy-ball momentum, "
            "(2+2β)/((1+2β)η) with Nesterov",
            unit="loss / weight^2",
            reference="Cohen et al. 2021",
        ),
        Metric(
            "eos_ratio",
            "eigenvalue_0 / eos_threshold (= λ_max η / 2 for GD); about 1 at the edge of stability",
            headline=True,
            reference="Cohen et al. 2021",
        ),
        Metric(
            "curvature_eigenvalue",
            "top-k eigenvalues of each curvature of --compare-curvatures: hessian H, ggn G = (1/N) Σ_i J_i^T H_l(z_i) J_i, "
            "fisher (= G for cross_entropy, bce_with_logits, mse), empirical_fisher (1/N) Σ_i g_i g_i^T, functional "
            "H - G; stderr = the Lanczos error bound",
            unit="loss / weight^2",
            index="0 = largest",
            group="curvature=<kind>",
            reference="Martens 2014; Sagun et al. 2017; Papyan 2020",
        ),
        Metric(
            "gradient_alignment",
            "||U_k^T g||^2 / ||g||^2: the share of the full-batch gradient's squared norm in the span of the top-k "
            "eigenvectors U_k of the curvature; stderr = the Davis-Kahan bound ||R_k||_F / (θ_k - θ_{k+1} - r_{k+1}) "
            "on its error from the Ritz residuals R_k",
            higher_is_better=None,
            headline=True,
            group="null for --curvature; curvature=<kind> for --compare-curvatures",
            reference="Gur-Ari, Roberts, Dyer 2018",
        ),
        Metric(
            "gradient_overlap",
            "(u_i^T g)^2 / ||g||^2 for the i-th top eigenvector u_i (they sum to gradient_alignment)",
            index="0 = top eigenvector",
            group="null for --curvature; curvature=<kind> for --compare-curvatures",
            reference="Gur-Ari, Roberts, Dyer 2018",
        ),
        Metric(
            "outlier_count",
            "number of the top --outlier-k eigenvalues above bulk_edge (a lower bound when all are)",
            group="null for --curvature; curvature=<kind> for --compare-curvatures",
            reference="Sagun et al. 2017; Papyan 2020",
        ),
        Metric(
            "bulk_edge",
            "upper edge of the spectrum's bulk: the first point above the SLQ median where the Gaussian-kernel "
            "eigenvalue count n ρ_σ(t) σ √(2π) falls below 1/2 (eigenvalues more than ~2.4σ apart; σ = 1% of the span)",
            unit="loss / weight^2",
            group="null for --curvature; curvature=<kind> for --compare-curvatures",
        ),
        Metric(
            "num_classes",
            "model outputs per sample (the classes of a classifier), the reference of outlier_count: about one "
            "outlier per class",
            reference="Papyan 2020",
        ),
        Metric(
            "batch_sharpness",
            "E_B[g_B^T H_B g_B / ||g_B||^2] over the mini-batches B of --batch-size (g_B, H_B: gradient and Hessian "
            "of B's mean loss); stderr = sd over batches / √batches",
            unit="loss / weight^2",
            headline=True,
            reference="Andreyev & Beneventano 2024",
        ),
        Metric(
            "batch_sharpness_ratio",
            "batch_sharpness / eos_threshold (= batch_sharpness η / 2 for SGD); about 1 at the edge of stochastic "
            "stability",
            reference="Andreyev & Beneventano 2024",
        ),
        Metric(
            "block_eigenvalue",
            "top eigenvalue of each parameter block's diagonal block of the curvature (Lanczos; stderr = error bound)",
            unit="loss / weight^2",
            group="the block: a parameter tensor (--blocks tensor) or a layer (--blocks layer)",
            reference="Zhang et al. 2024",
        ),
        Metric(
            "block_heterogeneity",
            "mean over block pairs of the Jensen-Shannon distance (bits, in [0, 1]) between the blocks' SLQ spectral "
            "densities on one common grid (JS_0); stderr = jackknife over SLQ probes",
            headline=True,
            reference="Zhang et al. 2024",
        ),
    ),
    outputs=(
        FileOutput(
            "density_out",
            "write PREFIX.csv and PREFIX.png of the spectral density (implies --density)",
            render="diagnostics.render:hessian_density",
            suffixes=(".csv", ".png"),
            enables="density",
        ),
    ),
    sections=(
        Section(
            "Sharpness and the edge of stability",
            ("eigenvalue", "eos_ratio"),
            "Top Hessian eigenvalues (eigenvalue_0 = λ_max, band = the eigenvalue error bound) against the "
            "training step, with the optimizer's stability threshold; under full-batch GD λ_max rises to 2/η and "
            "hovers there (Cohen et al. 2021). eos_ratio = λ_max / threshold (1 = edge of stability).",
            thresholds=(Threshold("eos_threshold"),),
        ),
        Section("Hessian trace", ("trace",), "Trace of the loss Hessian (Hutch++; band = ±1 standard error)."),
        Section(
            "Bottom Hessian eigenvalues",
            ("bottom_eigenvalue",),
            "Smallest Hessian eigenvalues (index 0 = smallest); negative values mean negative curvature (saddle).",
        ),
        Section(
            "Negative spectral mass",
            ("negative_mass",),
            "Fraction of the SLQ spectral density below the stated threshold (band = its interval).",
        ),
        Section(
            "Hessian spectral density over training",
            (),
            "Spectral density of the loss Hessian at each checkpoint by stochastic Lanczos quadrature "
            "(Gaussian-smoothed, log colour scale); lines: eigenvalue_0 and bottom_eigenvalue_0.",
            figure="diagnostics.plots:density_section",
        ),
        Section(
            "Gauss-Newton vs Hessian",
            ("curvature_eigenvalue",),
            "Top eigenvalues of each curvature of --compare-curvatures against the step (band = error bound): the "
            "Hessian H, the Gauss-Newton matrix G = J^T H_l J (PSD), the (empirical) Fisher and H - G. Near a "
            "minimum with small residuals H ≈ G; their gap is the functional part H - G.",
            figure="diagnostics.plots:curvature_comparison_section",
        ),
        Section(
            "Outliers above the bulk vs the number of classes",
            ("outlier_count",),
            "Top eigenvalues above the edge of the spectral bulk, per curvature; trained classifiers show about one "
            "outlier per class (Sagun et al. 2017, Papyan 2020).",
            thresholds=(Threshold("num_classes", label="classes C = {value}"),),
        ),
        Section(
            "Gradient alignment",
            ("gradient_alignment", "gradient_overlap"),
            "Share of the gradient's squared norm in the top-k eigenspace (band = Davis-Kahan error bound); "
            "Gur-Ari et al. (2018) find the gradient quickly enters the top eigenspace of the Hessian and stays.",
        ),
        Section(
            "Batch vs full-batch sharpness",
            ("batch_sharpness", "batch_sharpness_ratio"),
            "Batch sharpness E_B[g_B^T H_B g_B/||g_B||^2] over mini-batches (band = ±1 stderr over batches) beside "
            "the full-batch λ_max, against the stability threshold: under mini-batch SGD batch sharpness, not "
            "λ_max, hovers at 2/η (Andreyev & Beneventano 2024).",
            figure="diagnostics.plots:batch_sharpness_section",
        ),
        Section(
            "Block heterogeneity",
            ("block_heterogeneity", "block_eigenvalue"),
            "Mean pairwise Jensen-Shannon distance between the spectral densities of parameter blocks (band = "
            "jackknife stderr), and each block's top eigenvalue; heterogeneous blocks are what SGD's single step size "
            "cannot serve (Zhang et al. 2024).",
        ),
    ),
)
