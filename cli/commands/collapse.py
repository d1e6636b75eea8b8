"""``diag collapse``: neural collapse (NC1-NC4, CDNV) of the features at any layer."""

from __future__ import annotations

from typing import Annotated

import typer

from diag_cli.commands.rankme import LayerOpt, PlotOpt, PoolOpt, plot_endings, plot_paths
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
from diagnostics.analyzers.collapse import CollapseConfig, analyze_collapse
from diagnostics.binding import input_files
from diagnostics.errors import DiagnosticsError
from diagnostics.outputs import plan_outputs
from diagnostics.plots import class_cosine_figure, figure_png, layer_metrics_figure
from diagnostics.results import atomic_write_bytes

LAYER_PLOT_METRICS = ["nc1", "nc2_equinorm", "nc2_equiangular", "nc3", "nc4", "cdnv"]


@handle_errors
def collapse(
    checkpoint: CheckpointArg,
    model: ModelOpt = None,
    data: DataOpt = None,
    config: ConfigOpt = None,
    trust_checkpoint_factories: TrustOpt = False,
    layer: LayerOpt = None,
    classifier: Annotated[
        str | None,
        typer.Option("--classifier", help="module name of the classifier W h + b (default: the last nn.Linear)"),
    ] = None,
    no_classifier: Annotated[
        bool, typer.Option("--no-classifier", help="skip the classifier metrics (nc2_*_classifier, nc3, nc4)")
    ] = False,
    pool: PoolOpt = None,
    per_class: Annotated[bool, typer.Option("--per-class", help="also one row per class and metric")] = False,
    seed: SeedOpt = None,
    samples: SamplesOpt = None,
    batch_size: BatchSizeOpt = None,
    dtype: DtypeOpt = None,
    device: DeviceOpt = None,
    format: FormatOpt = "table",
    out: OutOpt = None,
    plot: PlotOpt = None,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Neural collapse (Papyan et al. 2020): NC1, NC2 (equinorm, equiangularity), NC3, NC4 and CDNV at one
    or more layers, with the global mean taken as the unweighted mean of the class means."""
    check_format(format)
    d = analyzer_defaults(config, "collapse")
    cfg = CollapseConfig(
        layers=list(layer) if layer else d.get("layers"),
        classifier=pick(classifier, d, "classifier"),
        use_classifier=not no_classifier and bool(d.get("use_classifier", True)),
        pool=pick(pool, d, "pool"),
        per_class=per_class or bool(d.get("per_class", False)),
    )
    cfg.validate()
    kinds = ["cosine"] + (["layers"] if cfg.layers and len(cfg.layers) > 1 else [])
    plan = plan_outputs(
        inputs=[checkpoint, *input_files(config, model, data)],
        force=force,
        out=out,
        prefixes={"--plot": (plot, plot_endings(kinds))},
    )
    plots = plot_paths(plan)
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
    if any(b[1] is None for b in ctx.batches):
        raise DiagnosticsError(
            f"diag collapse needs class labels, but the data '{ctx.binding.get('data')}' gives inputs only; "
            "pass --data with a callable that returns (inputs, labels)"
        )
    with progress_bar(quiet) as progress:
        result = analyze_collapse(cfg, ctx, progress)
    emit(result, format, out, quiet)
    if "cosine" in plots:
        fig = class_cosine_figure(result.artifacts["cosine"], title=f"Cosines between class means: {ctx.checkpoint}")
        atomic_write_bytes(plots["cosine"], figure_png(fig))
    if "layers" in plots:
        fig = layer_metrics_figure(
            result.frame(), LAYER_PLOT_METRICS, title=f"Neural collapse per layer: {ctx.checkpoint}"
        )
        atomic_write_bytes(plots["layers"], figure_png(fig))


def register(app: typer.Typer) -> None:
    app.command("collapse")(collapse)
