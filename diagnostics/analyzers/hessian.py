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
from diagnostics.linalg.density import default_grid, gaussian_density, negative_mass, quadrature_resolution, slq
from diagnostics.linalg.lanczos import LanczosResult, lanczos
from diagnostics.linalg.operator import HessianOperator
from diagnostics.linalg.trace import hutchpp
from diagnostics.progress import ProgressFn, bind
from diagnostics.results import Result, make_records

ANALYZER = "hessian"


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

    def scale_options(self) -> dict[str, Any]:
        """Keyword arguments of ``HessianOperator`` for micro-batching and mixed precision."""
        return {
            "micro_batch": self.micro_batch,
            "autocast": self.autocast,
            "accumulate_dtype": self.accumulate_dtype,
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
    k_top = min(config.top_k, op.dim)
    k_bot = min(config.bottom_k, max(op.dim - k_top, 0)) if op.dim > 1 else 0
    start = op.hvp_count
    res = lanczos(
        op,
        k_top=k_top,
        k_bottom=k_bot,
        tol=config.tol,
        max_iter=config.max_iter,
        generator=ctx.generator(stream),
        basis_device=torch.device(config.basis_device) if config.basis_device else None,
        block_size=config.block_size,
        criterion="residual" if config.strict_residual else "bound",
        progress=bind(progress, f"lanczos{label}"),
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
        lam_max = abs(float(res.eigenvalues[0])) if k_top else max(abs(float(t.abs().max())) for t in q.nodes)
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


def analyze_hessian(config: HessianConfig, ctx: Context, progress: ProgressFn | None = None) -> Result:
    """Hessian spectrum at ``ctx`` -> records (see module docstring) and run metadata.

    Artifacts: ``lanczos`` (the :class:`LanczosResult` of the whole model, with eigenvectors) and
    ``density`` (a DataFrame ``group, eigenvalue, density`` when asked).
    """
    config.validate()
    t0 = time.perf_counter()
    op = HessianOperator.from_context(
        ctx, backend=config.backend, max_vectors=config.max_vectors, **config.scale_options()
    )
    total_hvps = 0
    full = _spectrum(op, config, ctx, None, 0, progress)
    total_hvps += op.hvp_count
    rows = list(full.rows)
    info: dict[str, Any] = {"model": full.info}
    densities = [full.density] if full.density is not None else []

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
    info["eos"] = eos_info

    if config.per_layer:
        groups = parameter_groups(ctx.params)
        info["per_layer"] = {}
        for gi, (gname, names) in enumerate(groups.items()):
            gop = HessianOperator.from_context(
                ctx, names=names, backend=op.backend, max_vectors=config.max_vectors, **config.scale_options()
            )
            spec = _spectrum(gop, config, ctx, gname, 1000 * (gi + 1), progress)
            rows += spec.rows
            total_hvps += gop.hvp_count
            info["per_layer"][gname] = spec.info
            if spec.density is not None:
                densities.append(spec.density)
    if config.per_class:
        info["per_class"] = {}
        for ci, (c, parts) in enumerate(class_batches(ctx.batches).items()):
            cop = HessianOperator.from_context(
                ctx, batches=parts, backend=op.backend, max_vectors=config.max_vectors, **config.scale_options()
            )
            spec = _spectrum(cop, config, ctx, f"class={c}", 100_000 * (ci + 1), progress)
            rows += spec.rows
            total_hvps += cop.hvp_count
            info["per_class"][f"class={c}"] = {**spec.info, "samples": sum(int(p[1].shape[0]) for p in parts)}
            if spec.density is not None:
                densities.append(spec.density)

    seconds = time.perf_counter() - t0
    metadata = {
        "analyzer": ANALYZER,
        **describe_context(ctx),
        "config": asdict(config),
        "backend": op.backend,
        "hvp_count": total_hvps,
        "processes": world().size,
        "seconds": seconds,
        **info,
    }
    artifacts: dict[str, Any] = {"lanczos": full.lanczos}
    if densities:
        artifacts["density"] = pd.concat(densities, ignore_index=True)
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
