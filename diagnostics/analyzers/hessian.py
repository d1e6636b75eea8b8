"""Hessian spectrum of the loss at a checkpoint: top/bottom eigenvalues, trace, spectral density.

Metrics (records; ``group`` is null for the whole model, a module name with ``per_layer``, or
``class=<c>`` with ``per_class``):

* ``eigenvalue`` (index 0 = largest): top-k eigenvalues of the loss Hessian by Lanczos with full
  reorthogonalisation, stopped when every wanted eigenvalue's error bound is ``<= tol |lambda|``:
  ``min(r, r^2/gap)`` by the gap theorem (default), or the residual ``r = ||Hv - lambda v||`` itself with
  ``strict_residual``; ``stderr`` holds that bound.
* ``bottom_eigenvalue`` (index 0 = smallest): likewise at the bottom; negative values mean saddles.
* ``trace``: Hutch++ estimate with its standard error.
* ``negative_mass``: SLQ quadrature weight on eigenvalues below ``-negative_tol * |lambda_max|``
  (the fraction of the spectrum that is negative), stderr over probes.
* ``eos_threshold`` and ``eos_ratio = eigenvalue_0 / eos_threshold`` when the learning rate is known:
  ``2/lr`` for GD/SGD (so ``eos_ratio = lambda_max * lr / 2``), ``(2+2 beta)/lr`` with heavy-ball
  momentum, ``(2+2 beta)/((1+2 beta) lr)`` with Nesterov (Cohen et al. 2021). For Adam the raw Hessian
  has no threshold; see ``diag sharpness`` for the preconditioned one.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import pandas as pd
import torch

from diagnostics.analyzers.eos import eos_threshold
from diagnostics.analyzers.registry import AnalyzerSpec
from diagnostics.context import Batch, Context, describe_context, parameter_groups
from diagnostics.distributed import world
from diagnostics.errors import DiagnosticsError
from diagnostics.linalg.density import default_grid, gaussian_density, negative_mass, slq
from diagnostics.linalg.lanczos import LanczosResult, lanczos
from diagnostics.linalg.operator import HessianOperator
from diagnostics.linalg.trace import hutchpp
from diagnostics.operators import hessian_operator
from diagnostics.progress import ProgressFn, bind
from diagnostics.results import Result, make_records

ANALYZER = "hessian"
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
class HessianConfig:
    """Settings of :func:`analyze_hessian` (CLI flags of ``diag hessian``)."""

    top_k: int = 1
    bottom_k: int = 0
    tol: float = 1e-3
    max_iter: int = 300
    trace: bool = False
    trace_rtol: float = 0.01
    trace_sketch: int = 10
    trace_max_samples: int = 200
    density: bool = False
    density_probes: int = 5
    density_steps: int = 80
    density_points: int = 512
    density_sigma: float | None = None
    negative_tol: float = 1e-4
    per_layer: bool = False
    per_class: bool = False
    lr: float | None = None
    strict_residual: bool = False
    backend: str = "auto"
    max_vectors: int = 16
    basis_device: str | None = None
    micro_batch: int | None = None
    autocast: str | None = None
    accumulate_dtype: str | None = None
    block_size: int = 1
    compile: bool = False

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
        if self.top_k < 0 or self.bottom_k < 0 or self.top_k + self.bottom_k == 0:
            raise DiagnosticsError("ask for at least one eigenvalue: --top-k >= 1 or --bottom-k >= 1")
        if not 0 < self.tol < 1:
            raise DiagnosticsError(f"--tol must be in (0, 1), got {self.tol}")
        if self.max_iter < 1:
            raise DiagnosticsError(f"--max-iter must be positive, got {self.max_iter}")
        if self.density and (self.density_probes < 1 or self.density_steps < 2):
            raise DiagnosticsError("--density-probes must be >= 1 and --density-steps >= 2")
        if self.trace and (self.trace_max_samples < 2 or self.trace_sketch < 0):
            raise DiagnosticsError("--trace-samples must be >= 2 and --trace-sketch >= 0")
        if self.lr is not None and self.lr <= 0:
            raise DiagnosticsError(f"--lr must be positive, got {self.lr}")
        if self.max_vectors < 1 or self.block_size < 1:
            raise DiagnosticsError("--max-vectors and --block-size must be >= 1")
        if self.micro_batch is not None and self.micro_batch < 1:
            raise DiagnosticsError(f"--micro-batch must be positive, got {self.micro_batch}")
        if self.autocast not in (None, "bfloat16", "float16"):
            raise DiagnosticsError(f"--autocast must be bfloat16 or float16, not '{self.autocast}'")
        if self.accumulate_dtype not in (None, "float32", "float64"):
            raise DiagnosticsError(f"--accumulate-dtype must be float32 or float64, not '{self.accumulate_dtype}'")
        if self.basis_device is not None:
            try:
                torch.device(self.basis_device)
            except RuntimeError:
                raise DiagnosticsError(
                    f"unknown --basis-device '{self.basis_device}'; use cpu, cuda or cuda:N"
                ) from None


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
) -> _Spectrum:
    """Eigenvalues (+ trace, + density) of one operator -> record rows."""
    label = "" if group is None else f" [{group}]"
    rows: list[tuple] = []
    info: dict[str, Any] = {"dim": op.dim}
    start = op.hvp_count
    res = run_lanczos(op, config, ctx.generator(stream), bind(progress, f"lanczos{label}"))
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
            max_samples=config.trace_max_samples,
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
        mass, mass_se = negative_mass(q.nodes, q.weights, threshold=config.negative_tol * lam_max)
        rows.append(("negative_mass", mass, mass_se, None, group))
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


def analyze_hessian(config: HessianConfig, ctx: Context, progress: ProgressFn | None = None) -> Result:
    """Hessian spectrum at ``ctx`` -> records (see module docstring) and run metadata.

    Artifacts: ``lanczos`` (the :class:`LanczosResult` of the whole model, with eigenvectors) and
    ``density`` (a DataFrame ``group, eigenvalue, density`` when asked).
    """
    config.validate()
    dim_notes = check_k(config, ctx.n_params)  # before any HVP
    t0 = time.perf_counter()
    op = build_operator(ctx, config)
    full = _spectrum(op, config, ctx, None, 0, progress)
    total_hvps = op.hvp_count
    notes = list(op.notes)
    rows = list(full.rows)
    info: dict[str, Any] = {"model": full.info}
    densities = [full.density] if full.density is not None else []
    eos_rows, info["eos"] = _eos(config, ctx, full)
    rows += eos_rows
    for section, group, where, stream, extra in _blocks(config, ctx):
        bop = build_operator(ctx, config, backend=op.backend, **where)
        spec = _spectrum(bop, config, ctx, group, stream, progress)
        rows += spec.rows
        total_hvps += bop.hvp_count
        notes += bop.notes
        info.setdefault(section, {})[group] = {**spec.info, **extra}
        if spec.density is not None:
            densities.append(spec.density)

    metadata = {
        "analyzer": ANALYZER,
        **describe_context(ctx),
        "config": asdict(config),
        "backend": op.backend,
        "hvp_count": total_hvps,
        "processes": world().size,
        "sharded": op.loop.sharded,
        "seconds": time.perf_counter() - t0,
        **info,
    }
    metadata["notes"] = list(metadata["notes"]) + list(dict.fromkeys(notes))
    artifacts: dict[str, Any] = {"lanczos": full.lanczos}
    if densities:
        artifacts["density"] = pd.concat(densities, ignore_index=True)
    metadata["notes"] = dim_notes + metadata["notes"]
    if not full.lanczos.converged:
        metadata["notes"].append(
            f"Lanczos stopped after {full.lanczos.iterations} iterations before every error bound met "
            f"tol={config.tol}; raise --max-iter (each eigenvalue's error bound is in stderr)"
        )
    return Result(make_records(ctx.checkpoint, ctx.step, ANALYZER, rows), metadata, artifacts)


ANALYZERS = {
    ANALYZER: AnalyzerSpec(
        name=ANALYZER,
        config_cls=HessianConfig,
        run=analyze_hessian,
        needs_targets=True,
        summary="top/bottom Hessian eigenvalues, trace, spectral density, edge of stability",
    )
}
