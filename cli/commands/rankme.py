"""``diag rankme``: RankMe and related ranks of the features at any layer."""

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
    ModelOpt,
    OutOpt,
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
from diagnostics.analyzers.rank import RankConfig, analyze_rank
from diagnostics.binding import input_files
from diagnostics.outputs import OutputPlan, plan_outputs
from diagnostics.plots import figure_png, singular_value_figure
from diagnostics.results import atomic_write_bytes

LayerOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--layer",
        "-l",
        help="module name to capture (repeatable); 'name:input' captures its input "
        "(default: the input of the last nn.Linear)",
    ),
]
PoolOpt = Annotated[
    str | None,
    typer.Option("--pool", help="feature maps with >2 dims: mean (per channel) or flatten"),
]
PlotOpt = Annotated[
    Path | None,
    typer.Option("--plot", help="write PNG figures named PREFIX.<kind>.png", rich_help_panel="Output"),
]


def plot_endings(kinds: list[str]) -> tuple[str, ...]:
    """What ``--plot PREFIX`` appends for each figure: ``PREFIX.<kind>.png``."""
    return tuple(f".{kind}.png" for kind in kinds)


def plot_paths(plan: OutputPlan) -> dict[str, Path]:
    """``{kind: path}`` of the planned ``--plot`` figures."""
    return {ending[1:].removesuffix(".png"): path for ending, path in plan.paths("--plot").items()}


@handle_errors
def rankme(
    checkpoint: CheckpointArg,
    model: ModelOpt = None,
    data: DataOpt = None,
    config: ConfigOpt = None,
    trust_checkpoint_factories: TrustOpt = False,
    layer: LayerOpt = None,
    pool: PoolOpt = None,
    samples: Annotated[
        int | None,
        typer.Option("--samples", help="rows used, a seeded subsample when the data has more (default 25600)"),
    ] = None,
    eps: Annotated[float | None, typer.Option("--eps", help="RankMe's eps (default 1e-7)")] = None,
    alpha_kmin: Annotated[
        int | None, typer.Option("--alpha-kmin", help="first eigenvalue index of the alpha-ReQ fit (default 1)")
    ] = None,
    alpha_kmax: Annotated[
        int | None,
        typer.Option("--alpha-kmax", help="last eigenvalue index of the alpha-ReQ fit (default: numerical rank)"),
    ] = None,
    seed: SeedOpt = None,
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
    """RankMe (Garrido et al. 2023), effective rank, stable rank, participation ratio and alpha-ReQ of the
    features at one or more layers."""
    check_format(format)
    d = analyzer_defaults(config, "rankme")
    cfg = RankConfig(
        layers=list(layer) if layer else d.get("layers"),
        pool=pick(pool, d, "pool"),
        max_samples=int(pick(samples, d, "samples", 25_600)),
        eps=float(pick(eps, d, "eps", 1e-7)),
        alpha_kmin=int(pick(alpha_kmin, d, "alpha_kmin", 1)),
        alpha_kmax=pick(alpha_kmax, d, "alpha_kmax"),
    )
    cfg.validate()
    plan = plan_outputs(
        inputs=[checkpoint, *input_files(config, model, data)],
        force=force,
        out=out,
        prefixes={"--plot": (plot, plot_endings(["spectrum"]))},
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
        samples=cfg.max_samples,
        batch_size=batch_size,
        dtype=dtype,
        device=device,
        need_targets=False,
    )
    with progress_bar(quiet) as progress:
        result = analyze_rank(cfg, ctx, progress)
    emit(result, format, out, quiet)
    if "spectrum" in plots:
        fig = singular_value_figure(
            result.artifacts["spectrum"], title=f"Singular values of the features: {ctx.checkpoint}"
        )
        atomic_write_bytes(plots["spectrum"], figure_png(fig))


def register(app: typer.Typer) -> None:
    app.command("rankme")(rankme)
