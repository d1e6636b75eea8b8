"""``diag stability``: how often a classifier's predictions survive feature dropout (agreement, KL)."""

from __future__ import annotations

from typing import Annotated

import typer

from diag_cli.commands.bos import ConfidenceOpt, ModuleOpt, PassesOpt, POpt, interval_line
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
    ModelOpt,
    OutOpt,
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
from diagnostics.analyzers.stability import StabilityConfig, analyze_stability
from diagnostics.binding import input_files
from diagnostics.outputs import plan_outputs


@handle_errors
def stability(
    checkpoint: CheckpointArg,
    model: ModelOpt = None,
    data: DataOpt = None,
    config: ConfigOpt = None,
    trust_checkpoint_factories: TrustOpt = False,
    module: ModuleOpt = None,
    p: POpt = None,
    passes: PassesOpt = None,
    output_type: Annotated[
        str | None,
        typer.Option("--output-type", help="the model returns logits (default) or probs", rich_help_panel="Dropout"),
    ] = None,
    confidence: ConfidenceOpt = None,
    seed: SeedOpt = None,
    samples: SamplesOpt = None,
    batch_size: BatchSizeOpt = None,
    dtype: DtypeOpt = None,
    device: DeviceOpt = None,
    format: FormatOpt = "table",
    out: OutOpt = None,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Prediction stability of a classifier under feature dropout at --module (BatchNorm stays in eval).

    prediction_agreement = share of samples whose argmax survives dropout; prediction_kl = mean
    KL(clean || dropout) of the class probabilities; both averaged over --passes seeded passes.
    """
    check_format(format)
    plan_outputs(inputs=[checkpoint, *input_files(config, model, data)], force=force, out=out)
    d = analyzer_defaults(config, "stability")
    modules = list(module) if module else d.get("modules", d.get("module"))
    cfg = StabilityConfig(
        modules=[modules] if isinstance(modules, str) else list(modules or []),
        p=pick(p, d, "p", 0.15),
        passes=pick(passes, d, "passes", 5),
        output_type=pick(output_type, d, "output_type", "logits"),
        confidence=pick(confidence, d, "confidence", 0.95),
    )
    cfg.validate()
    _, ctx = load_context(
        checkpoint,
        model=model,
        data=data,
        loss=None,
        config=config,
        trust=trust_checkpoint_factories,
        seed=seed,
        samples=samples,
        batch_size=batch_size,
        dtype=dtype,
        device=device,
        need_targets=False,
    )
    with progress_bar(quiet) as progress:
        result = analyze_stability(cfg, ctx, progress)
    emit(result, format, out, quiet)
    if not quiet:
        for metric in ("prediction_agreement", "prediction_kl"):
            line = interval_line(result, metric)
            if line:
                typer.echo(f"diag: {line}", err=True)


def register(app: typer.Typer) -> None:
    app.command("stability")(stability)
