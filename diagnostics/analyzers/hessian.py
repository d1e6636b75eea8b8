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
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from diagnostics.analyzers.eos import eos_threshold
from diagnostics.errors import DiagnosticsError
from diagnostics.lazy import lazy_from, lazy_import
from diagnostics.progress import bind
from diagnostics.results import Result, make_records
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
    from diagnostics.linalg.operator import HessianOperator
    from diagnostics.progress import ProgressFn

torch = lazy_import("torch")
pd = lazy_import("pandas")
parameter_groups = lazy_from("diagnostics.context", "parameter_groups")
world = lazy_from("diagnostics.distributed", "world")
default_grid, gaussian_density, negative_mass, quadrature_resolution, slq = lazy_from(
    "diagnostics.linalg.density", "default_grid", "gaussian_density", "negative_mass", "quadrature_resolution", "slq"
)
lanczos = lazy_from("diagnostics.linalg.lanczos", "lanczos")
hutchpp = lazy_from("diagnostics.linalg.trace", "hutchpp")
hessian_operator = lazy_from("diagnostics.operators", "hessian_operator")

NAME = "hessian"
HVP_BACKENDS = ("auto", "cached", "forward", "reverse")
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
        None, help="split batches into micro-batches of this size (exact accumulation)", min=1, panel=PANEL_SCALE
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
        if self.basis_device is not None and not re.fullmatch(r"(cpu|cuda|mps|xpu)(:\d+)?", self.basis_device):
            raise DiagnosticsError(f"unknown --basis-device '{self.basis_device}'; use cpu, cuda or cuda:N")


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
        help="experimental: in diag run, start Lanczos from the previous checkpoint's eigenvectors (costs more HVPs today)",
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
) -> HessianOperator:
    """The Hessian operator ``diag hessian`` measures, with ``config``'s backend and scale options.

    Args:
        ctx: the context.
        config: the settings (``backend``, ``max_vectors``, ``micro_batch``, ``autocast``,
            ``accumulate_dtype``, ``compile`` apply).
        names: restrict to these parameters (a layer's block).
        batches: use these batches (a class's samples).
        backend: override ``config.backend`` (e.g. the one the whole-model operator settled on).

    Returns:
        The operator (sharded over the process group by default; see ``hessian_operator``).
    """
    options = config.operator_options()
    if backend is not None:
        options["backend"] = backend
    return hessian_operator(ctx, names=names, batches=batches, **options)


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
        basis_device=torch.device(config.basis_device) if config.basis_device else None,
        block_size=config.block_size,
        criterion="residual" if config.strict_residual else "bound",
        progress=progress,
        start=start,
    )


@dataclass
class _Spectrum:
    rows: list[tuple]
    lanczos: LanczosResult | None
    density: pd.DataFrame | None
    info: dict[str, Any]


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
        "warm_start": warm.get("source") if vectors is not None and warm is not None else None,
    }
    for i, (lam, e) in enumerate(zip(res.eigenvalues.tolist(), res.error_bounds.tolist())):
        rows.append(("eigenvalue", lam, e, i, group))
    for i, (lam, e) in enumerate(zip(res.bottom_eigenvalues.tolist(), res.bottom_error_bounds.tolist())):
        rows.append(("bottom_eigenvalue", lam, e, i, group))
    if config.trace:
        start = op.hvp_count
        est = hutchpp(
            op,
            generator=ctx.generator(stream + 1),
            sketch=config.trace_sketch,
            min_samples=20,
            max_samples=config.trace_samples,
            rtol=config.trace_rtol,
            progress=bind(progress, f"trace{label}"),
        )
        rows.append(("trace", est.value, est.stderr, None, group))
        info["trace"] = {"hvps": op.hvp_count - start, "samples": est.samples, "sketch": est.sketch}
    density = None
    if config.density:
        start = op.hvp_count
        q = slq(
            op,
            probes=config.density_probes,
            steps=min(config.density_steps, op.dim),
            generator=ctx.generator(stream + 2),
            progress=bind(progress, f"density{label}"),
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
        density = pd.DataFrame({"group": group or "", "eigenvalue": grid.numpy(), "density": values.numpy()})
        info["density"] = {
            "hvps": op.hvp_count - start,
            "probes": config.density_probes,
            "steps": config.density_steps,
            "sigma": sigma,
            "negative_mass": {
                "delta": nm.delta,
                "interval": [nm.low, nm.high],
                "quadrature_bias": nm.bias,
                "probe_noise": nm.noise,
            },
            "nodes": [t.tolist() for t in q.nodes],
            "weights": [t.tolist() for t in q.weights],
        }
    return _Spectrum(rows, res, density, info)


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
    eos_info: dict[str, Any] = {"lr": lr}
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


def analyze_hessian(
    config: HessianConfig,
    ctx: Context,
    progress: ProgressFn | None = None,
    warm: dict[str, Any] | None = None,
) -> Result:
    """Hessian spectrum at ``ctx`` -> records (see module docstring) and run metadata.

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
    total_hvps = op.hvp_count
    notes += op.notes
    rows = list(full.rows)
    info: dict[str, Any] = {"model": full.info}
    densities = [full.density] if full.density is not None else []
    eos_rows, info["eos"] = _eos(config, ctx, full)
    rows += eos_rows
    for section, group, where, stream, extra in _blocks(config, ctx):
        bop = build_operator(ctx, config, backend=op.backend, **where)
        spec = _spectrum(bop, config, ctx, group, stream, progress, warm)
        rows += spec.rows
        total_hvps += bop.hvp_count
        notes += bop.notes
        info.setdefault(section, {})[group] = {**spec.info, **extra}
        if spec.density is not None:
            densities.append(spec.density)
    if full.info["lanczos"]["warm_start"]:
        notes.append(f"warm start from {full.info['lanczos']['warm_start']} (its eigenvectors start Lanczos)")
    if not full.lanczos.converged:
        notes.append(
            f"Lanczos stopped after {full.lanczos.iterations} iterations before every error bound met "
            f"tol={config.tol}; raise --max-iter (each eigenvalue's error bound is in stderr)"
        )
    metadata = {
        "backend": op.backend,
        "hvp_count": total_hvps,
        "processes": world().size,
        "sharded": op.loop.sharded,
        "notes": list(dict.fromkeys(notes)),
        **info,
    }
    artifacts: dict[str, Any] = {"lanczos": full.lanczos}
    if densities:
        artifacts["density"] = pd.concat(densities, ignore_index=True)
    return Result(make_records(ctx.checkpoint, ctx.step, NAME, rows), metadata, artifacts)


_GROUP = "null for the whole model; a module name with --per-layer; class=<c> with --per-class"


ANALYZER = Analyzer(
    name=NAME,
    summary="top/bottom Hessian eigenvalues, trace, spectral density, edge of stability",
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
    ),
)
