"""``diag hessian``: top/bottom eigenvalues, trace and spectral density of the loss Hessian."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from diag_cli.common import (
    BatchSizeOpt,
    CheckpointArg,
    ConfigOpt,
    DataOpt,
    DebugOpt,
    DeviceOpt,
    DtypeOpt,
    ForceOpt,
    FormatOpt,
    LossOpt,
    ModelOpt,
    OutOpt,
    ParamsOpt,
    QuietOpt,
    SamplesOpt,
    SeedOpt,
    TrustOpt,
    analyzer_defaults,
    check_format,
    emit,
    handle_errors,
    load_context,
    pick,
    progress_bar,
)
from diagnostics.analyzers.hessian import HessianConfig, analyze_hessian
from diagnostics.binding import input_files
from diagnostics.distributed import init_from_env
from diagnostics.errors import DiagnosticsError
from diagnostics.linalg.operator import BACKENDS
from diagnostics.outputs import plan_outputs
from diagnostics.plots import density_figure, figure_png
from diagnostics.results import atomic_write_bytes


@handle_errors
def hessian(
    checkpoint: CheckpointArg,
    model: ModelOpt = None,
    data: DataOpt = None,
    loss: LossOpt = None,
    config: ConfigOpt = None,
    trust_checkpoint_factories: TrustOpt = False,
    top_k: Annotated[int | None, typer.Option("--top-k", "-k", help="number of top eigenvalues (default 1)")] = None,
    bottom_k: Annotated[int | None, typer.Option("--bottom-k", help="number of bottom eigenvalues (saddles)")] = None,
    tol: Annotated[
        float | None,
        typer.Option("--tol", help="relative accuracy of each eigenvalue: error bound <= tol·|λ| (default 1e-3)"),
    ] = None,
    strict_residual: Annotated[
        bool,
        typer.Option(
            "--strict-residual",
            help="stop on the residual ||Hv-λv|| <= tol·|λ| instead of the (tighter, gap-theorem) eigenvalue error bound",
        ),
    ] = False,
    max_iter: Annotated[int | None, typer.Option("--max-iter", help="Lanczos iteration cap (default 300)")] = None,
    trace: Annotated[bool, typer.Option("--trace", help="estimate the trace (Hutch++, with stderr)")] = False,
    trace_rtol: Annotated[
        float | None, typer.Option("--trace-rtol", help="stop when stderr <= rtol·|trace| (default 0.01)")
    ] = None,
    trace_samples: Annotated[
        int | None, typer.Option("--trace-samples", help="most Hutchinson samples (default 200)")
    ] = None,
    density: Annotated[
        bool, typer.Option("--density", help="spectral density by stochastic Lanczos quadrature")
    ] = False,
    density_probes: Annotated[int | None, typer.Option("--density-probes", help="SLQ probes (default 5)")] = None,
    density_steps: Annotated[
        int | None, typer.Option("--density-steps", help="Lanczos steps per probe (default 80)")
    ] = None,
    density_out: Annotated[
        Path | None, typer.Option("--density-out", help="write PREFIX.csv and PREFIX.png of the density")
    ] = None,
    per_layer: Annotated[bool, typer.Option("--per-layer", help="also the spectrum of each layer's block")] = False,
    per_class: Annotated[bool, typer.Option("--per-class", help="also the Hessian of each class's loss")] = False,
    lr: Annotated[
        float | None, typer.Option("--lr", help="learning rate for eos_ratio (default: from the checkpoint)")
    ] = None,
    backend: Annotated[
        str,
        typer.Option(
            "--backend",
            help="HVP backend: auto (cached graph for one batch, else forward-over-reverse) | cached | forward | reverse",
        ),
    ] = "auto",
    basis_device: Annotated[
        str | None,
        typer.Option(
            "--basis-device", help="keep the Lanczos basis here, e.g. cpu (saves GPU memory)", rich_help_panel="Scale"
        ),
    ] = None,
    max_vectors: Annotated[
        int | None,
        typer.Option(
            "--max-vectors",
            help="vectors per vmapped HVP pass (default 16; lower saves memory)",
            rich_help_panel="Scale",
        ),
    ] = None,
    block_size: Annotated[
        int | None,
        typer.Option(
            "--block-size",
            help="block Lanczos / lockstep SLQ: vectors per data pass (default 1)",
            rich_help_panel="Scale",
        ),
    ] = None,
    micro_batch: Annotated[
        int | None,
        typer.Option(
            "--micro-batch",
            help="split batches into micro-batches of this size (exact accumulation)",
            rich_help_panel="Scale",
        ),
    ] = None,
    autocast: Annotated[
        str | None,
        typer.Option("--autocast", help="mixed-precision forward: bfloat16 | float16", rich_help_panel="Scale"),
    ] = None,
    accumulate_dtype: Annotated[
        str | None,
        typer.Option(
            "--accumulate-dtype", help="accumulate HVPs over batches in float32 | float64", rich_help_panel="Scale"
        ),
    ] = None,
    compile: Annotated[
        bool,
        typer.Option(
            "--compile",
            help="torch.compile the per-batch HVP (falls back to eager with a note when it cannot compile)",
            rich_help_panel="Scale",
        ),
    ] = False,
    seed: SeedOpt = None,
    samples: SamplesOpt = None,
    batch_size: BatchSizeOpt = None,
    dtype: DtypeOpt = None,
    device: DeviceOpt = None,
    params: ParamsOpt = None,
    format: FormatOpt = "table",
    out: OutOpt = None,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Hessian spectrum of the loss at a checkpoint: eigenvalues, trace, density, edge of stability."""
    check_format(format)
    plan = plan_outputs(
        inputs=[checkpoint, *input_files(config, model, data, loss)],
        force=force,
        out=out,
        prefixes={"--density-out": (density_out, (".csv", ".png"))},
    )
    d = analyzer_defaults(config, "hessian")
    cfg = HessianConfig(
        top_k=pick(top_k, d, "top_k", 1),
        bottom_k=pick(bottom_k, d, "bottom_k", 0),
        tol=pick(tol, d, "tol", 1e-3),
        max_iter=pick(max_iter, d, "max_iter", 300),
        trace=trace or bool(d.get("trace", False)),
        trace_rtol=pick(trace_rtol, d, "trace_rtol", 0.01),
        trace_max_samples=pick(trace_samples, d, "trace_samples", 200),
        density=density or density_out is not None or bool(d.get("density", False)),
        density_probes=pick(density_probes, d, "density_probes", 5),
        density_steps=pick(density_steps, d, "density_steps", 80),
        per_layer=per_layer,
        per_class=per_class,
        lr=lr,
        strict_residual=strict_residual or bool(d.get("strict_residual", False)),
        backend=backend,
        basis_device=pick(basis_device, d, "basis_device"),
        max_vectors=pick(max_vectors, d, "max_vectors", 16),
        block_size=pick(block_size, d, "block_size", 1),
        micro_batch=pick(micro_batch, d, "micro_batch"),
        autocast=pick(autocast, d, "autocast"),
        accumulate_dtype=pick(accumulate_dtype, d, "accumulate_dtype"),
        compile=compile or bool(d.get("compile", False)),
    )
    if backend not in BACKENDS:
        raise DiagnosticsError(f"unknown --backend '{backend}'; use {', '.join(BACKENDS)}")
    cfg.validate()
    rank = init_from_env()  # under torchrun: data sharded over ranks, every HVP all-reduced
    _, ctx = load_context(
        checkpoint,
        model=model,
        data=data,
        loss=loss,
        config=config,
        trust=trust_checkpoint_factories,
        seed=seed,
        samples=samples,
        batch_size=batch_size,
        dtype=dtype,
        device=device,
        params=params,
    )
    with progress_bar(quiet or not rank.is_main) as progress:
        result = analyze_hessian(cfg, ctx, progress)
    if not rank.is_main:  # every rank computed the same numbers; rank 0 alone prints and writes
        return
    emit(result, format, out, quiet)
    if density_out is not None and "density" in result.artifacts:
        df = result.artifacts["density"]
        written = plan.paths("--density-out")
        atomic_write_bytes(written[".csv"], df.to_csv(index=False).encode())
        fig = density_figure(df, f"Hessian spectral density: {ctx.checkpoint}")
        atomic_write_bytes(written[".png"], figure_png(fig))


def register(app: typer.Typer) -> None:
    app.command("hessian")(hessian)
