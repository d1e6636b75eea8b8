"""``diag rashomon``: the Rashomon ratio (and pattern ratio) of a stated hypothesis space around a checkpoint."""

from __future__ import annotations

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
from diagnostics.analyzers.rashomon import RashomonConfig, analyze_rashomon
from diagnostics.binding import input_files
from diagnostics.outputs import plan_outputs


@handle_errors
def rashomon(
    checkpoint: CheckpointArg,
    model: ModelOpt = None,
    data: DataOpt = None,
    loss: LossOpt = None,
    config: ConfigOpt = None,
    trust_checkpoint_factories: TrustOpt = False,
    theta: Annotated[
        float | None,
        typer.Option("--theta", help="loss tolerance: R = {L <= L(w) + theta} (absolute; default 0.01)"),
    ] = None,
    radius: Annotated[
        float | None, typer.Option("--radius", help="size r of the hypothesis space F (default 0.1)")
    ] = None,
    geometry: Annotated[
        str | None,
        typer.Option(
            "--geometry",
            help="F = ball (||u||_2 <= r) | filter (per-filter relative ball) | box (|u_i| <= r); default ball",
        ),
    ] = None,
    draws: Annotated[
        int | None,
        typer.Option("--samples", "--draws", help="models drawn from F (default 20000); data subset: --data-samples"),
    ] = None,
    method: Annotated[
        str | None,
        typer.Option("--method", help="auto | mc (plain Monte Carlo) | is (importance sampling); default auto"),
    ] = None,
    confidence: Annotated[
        float | None, typer.Option("--confidence", help="level of the interval (default 0.95)")
    ] = None,
    pilot: Annotated[
        int | None, typer.Option("--pilot", help="rays of the importance-sampling pilot (default 32)")
    ] = None,
    no_patterns: Annotated[bool, typer.Option("--no-patterns", help="skip the pattern Rashomon ratio")] = False,
    chunk: Annotated[int | None, typer.Option("--chunk", help="models per batched evaluation (default 64)")] = None,
    seed: SeedOpt = None,
    data_samples: Annotated[
        int | None,
        typer.Option(
            "--data-samples", help="analyse a seeded random subset of this many data samples", rich_help_panel="Data"
        ),
    ] = None,
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
    """Rashomon ratio: the fraction of F around the weights whose loss is within theta of the checkpoint's.

    Monte Carlo with a Clopper-Pearson interval, or importance sampling for ratios down to 1e-6 and below;
    also the pattern Rashomon ratio (distinct prediction patterns in R over those in F).
    """
    check_format(format)
    plan_outputs(inputs=[checkpoint, *input_files(config, model, data, loss)], force=force, out=out)
    d = analyzer_defaults(config, "rashomon")
    cfg = RashomonConfig(
        theta=pick(theta, d, "theta", 0.01),
        radius=pick(radius, d, "radius", 0.1),
        geometry=pick(geometry, d, "geometry", "ball"),
        draws=pick(draws, d, "draws", 20000),
        method=pick(method, d, "method", "auto"),
        confidence=pick(confidence, d, "confidence", 0.95),
        pilot=pick(pilot, d, "pilot", 32),
        patterns=not no_patterns and bool(d.get("patterns", True)),
        chunk=pick(chunk, d, "chunk", 64),
    )
    cfg.validate()
    _, ctx = load_context(
        checkpoint,
        model=model,
        data=data,
        loss=loss,
        config=config,
        trust=trust_checkpoint_factories,
        seed=seed,
        samples=data_samples,
        batch_size=batch_size,
        dtype=dtype,
        device=device,
        params=params,
    )
    with progress_bar(quiet) as progress:
        result = analyze_rashomon(cfg, ctx, progress)
    emit(result, format, out, quiet)
    if format == "table":
        est = result.metadata["estimate"]
        lo, hi = est["interval"]
        typer.echo(f"# {result.metadata['hypothesis_space']}; {result.metadata['rashomon_set']}")
        interval = f"[{lo:.4g}, {hi:.4g}]"
        if est["hits"] and est["value"] == 0.0:  # below the float range: show log10
            llo, lhi = est["log10_interval"]
            interval = f"log10 ratio {est['log10_ratio']:.4f}, interval [{llo:.4f}, {lhi:.4f}]"
        typer.echo(
            f"# method={result.metadata['method']}  {100 * est['confidence']:g}% interval {interval} "
            f"({est['interval_kind']})  hits={est['hits']}/{est['draws']}"
        )


def register(app: typer.Typer) -> None:
    app.command("rashomon")(rashomon)
