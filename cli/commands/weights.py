"""``diag weights``: data-free spectra of the weight matrices (spectral norm, ranks, power-law alpha)."""

from __future__ import annotations

from typing import Annotated

import torch
import typer

from diag_cli.commands.rankme import PlotOpt, plot_endings, plot_paths
from diag_cli.common import (
    CheckpointArg,
    ConfigOpt,
    DebugOpt,
    ForceOpt,
    FormatOpt,
    ModelOpt,
    OutOpt,
    ParamsOpt,
    QuietOpt,
    TrustOpt,
    analyzer_defaults,
    check_format,
    emit,
    handle_errors,
    pick,
    progress_bar,
    project_config,
)
from diagnostics.analyzers.weights import WeightsConfig, analyze_weights
from diagnostics.binding import input_files, resolve_binding
from diagnostics.checkpoint import load_checkpoint
from diagnostics.context import build_model
from diagnostics.outputs import plan_outputs
from diagnostics.plots import figure_png, singular_value_figure
from diagnostics.results import atomic_write_bytes


@handle_errors
def weights(
    checkpoint: CheckpointArg,
    model: ModelOpt = None,
    config: ConfigOpt = None,
    trust_checkpoint_factories: TrustOpt = False,
    params: ParamsOpt = None,
    min_evals: Annotated[
        int | None, typer.Option("--min-evals", help="fewest non-zero eigenvalues for an alpha fit (default 10)")
    ] = None,
    format: FormatOpt = "table",
    out: OutOpt = None,
    plot: PlotOpt = None,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Spectral norm, stable rank, effective rank and power-law alpha (WeightWatcher-style) of every weight
    matrix, from the checkpoint alone (no data)."""
    check_format(format)
    d = analyzer_defaults(config, "weights")
    cfg = WeightsConfig(params=pick(params, d, "params"), min_evals=int(pick(min_evals, d, "min_evals", 10)))
    cfg.validate()
    plan = plan_outputs(
        inputs=[checkpoint, *input_files(config, model)],
        force=force,
        out=out,
        prefixes={"--plot": (plot, plot_endings(["spectrum"]))},
    )
    plots = plot_paths(plan)
    project = project_config(config)
    ck = load_checkpoint(checkpoint)
    # only the model factory matters here: an untrusted data factory in the checkpoint is never imported
    factories = {k: v for k, v in ck.factories.items() if k in ("model", "model_kwargs")}
    binding = resolve_binding(
        factories,
        model=model,
        config={k: v for k, v in project.items() if k not in ("data", "loss")},
        trust_checkpoint=trust_checkpoint_factories,
        require=("model",),
    )
    net = build_model(ck, binding, torch.device("cpu"), torch.float64)
    with progress_bar(quiet) as progress:
        result = analyze_weights(cfg, net, progress, checkpoint=ck.name, step=ck.step)
    result.metadata["binding"] = binding.describe()
    emit(result, format, out, quiet)
    if "spectrum" in plots:
        fig = singular_value_figure(result.artifacts["spectrum"], title=f"Singular values of the weights: {ck.name}")
        atomic_write_bytes(plots["spectrum"], figure_png(fig))


def register(app: typer.Typer) -> None:
    app.command("weights")(weights)
