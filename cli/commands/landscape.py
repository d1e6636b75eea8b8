"""``diag landscape``: loss/accuracy on a 1-D or 2-D slice, or on the line between two checkpoints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

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
    err,
    handle_errors,
    load_context,
    pick,
    progress_bar,
)
from diagnostics.analyzers.landscape import (
    BARRIER_DEFINITION,
    LandscapeConfig,
    analyze_interpolation,
    analyze_landscape,
    landscape_key,
)
from diagnostics.binding import input_files
from diagnostics.errors import DiagnosticsError
from diagnostics.outputs import plan_outputs
from diagnostics.results import atomic_write_bytes

CACHE_FORMAT = "diagnostics-landscape-cache/1"


def plot_endings(two_d: bool) -> dict[str, str]:
    """What ``--plot PREFIX`` appends: ``PREFIX.png`` (curve) or ``PREFIX_contour.png`` + ``PREFIX_surface.png``."""
    return {"contour": "_contour.png", "surface": "_surface.png"} if two_d else {"curve": ".png"}


def read_cache(path: Path, key: str, force: bool) -> dict[int, tuple[float, float | None]]:
    """Grid points saved by an interrupted run with the same key (``{}`` when starting afresh)."""
    if not path.exists():
        return {}
    try:
        payload = json.loads(path.read_text())
        if payload.get("format") != CACHE_FORMAT:
            raise ValueError("not a landscape cache")
        saved_key = payload["key"]
        points = {int(i): (float(v[0]), None if v[1] is None else float(v[1])) for i, v in payload["points"].items()}
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        if force:
            return {}
        raise DiagnosticsError(
            f"cache '{path}' is not a readable landscape cache ({type(exc).__name__}); delete it, choose another "
            "--cache or pass --force to start over"
        ) from exc
    if saved_key != key:
        if force:
            return {}
        raise DiagnosticsError(
            f"cache '{path}' belongs to a different grid (checkpoint, data or options differ); delete it, "
            "choose another --cache or pass --force to start over"
        )
    return points


def write_cache(path: Path, key: str, points: dict[int, tuple[float, float | None]]) -> None:
    payload = {"format": CACHE_FORMAT, "key": key, "points": {str(i): list(v) for i, v in sorted(points.items())}}
    atomic_write_bytes(path, json.dumps(payload).encode())


@handle_errors
def landscape(
    checkpoint: CheckpointArg,
    other: Annotated[
        Path | None,
        typer.Argument(help="second checkpoint: the loss on the straight line between the two", show_default=False),
    ] = None,
    model: ModelOpt = None,
    data: DataOpt = None,
    loss: LossOpt = None,
    config: ConfigOpt = None,
    trust_checkpoint_factories: TrustOpt = False,
    direction: Annotated[
        str | None, typer.Option("--direction", help="random (filter-normalised) | hessian (top eigenvectors)")
    ] = None,
    dims: Annotated[int | None, typer.Option("--dims", help="1 (curve) or 2 (plane); default 2")] = None,
    steps: Annotated[int | None, typer.Option("--steps", help="grid points per axis (default 21)")] = None,
    span: Annotated[float | None, typer.Option("--span", help="coordinates run over [-span, span] (default 1)")] = None,
    normalize: Annotated[
        str | None,
        typer.Option("--normalize", help="filter | layer | unit | none (default: filter; unit for hessian)"),
    ] = None,
    include_1d: Annotated[
        bool, typer.Option("--include-1d", help="also move biases and norm parameters (zeroed by default)")
    ] = False,
    orthogonalize: Annotated[
        bool, typer.Option("--orthogonalize", help="make the two random directions exactly orthogonal")
    ] = False,
    bn_recompute: Annotated[
        bool, typer.Option("--bn-recompute", help="recompute BatchNorm statistics on the data at every point")
    ] = False,
    alpha_min: Annotated[
        float | None, typer.Option("--alpha-min", help="interpolation from (default 0; e.g. -0.5)")
    ] = None,
    alpha_max: Annotated[
        float | None, typer.Option("--alpha-max", help="interpolation to (default 1; e.g. 1.5)")
    ] = None,
    chunk: Annotated[
        int | None, typer.Option("--chunk", help="grid points per batched evaluation (default 32)")
    ] = None,
    backend: Annotated[
        str | None,
        typer.Option(
            "--backend", help="evaluation: auto (vmap; one point at a time for conv nets on CPU) | vmap | loop"
        ),
    ] = None,
    grid_out: Annotated[
        Path | None,
        typer.Option(
            "--grid-out", help="write the grid (coordinates, loss, accuracy) to FILE.csv", rich_help_panel="Output"
        ),
    ] = None,
    plot: Annotated[
        Path | None,
        typer.Option(
            "--plot",
            help="write PREFIX.png (1-D) or PREFIX_contour.png and PREFIX_surface.png (2-D)",
            rich_help_panel="Output",
        ),
    ] = None,
    cache: Annotated[
        Path | None,
        typer.Option(
            "--cache",
            help="save grid points here as they are computed and resume from it "
            "(default with --grid-out: FILE.csv.partial.json, removed when done)",
            rich_help_panel="Output",
        ),
    ] = None,
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
    """Loss landscape: a filter-normalised random (or Hessian) slice, or the line between two checkpoints.

    With one checkpoint: the loss and accuracy on a 1-D or 2-D grid around its weights (Li et al. 2018).
    With two: on (1-alpha) w_a + alpha w_b and the loss barrier
    max_{alpha in [0,1]} L(alpha) - [(1-alpha) L(w_a) + alpha L(w_b)].
    """
    check_format(format)
    inputs = [checkpoint] + ([other] if other is not None else [])
    d = analyzer_defaults(config, "landscape")
    two = other is not None
    if two and direction is not None:
        raise DiagnosticsError("--direction applies to a slice around one checkpoint, not to the line between two")
    if two and dims == 2:
        raise DiagnosticsError("the interpolation between two checkpoints is 1-D; drop --dims 2")
    cfg = LandscapeConfig(
        direction=pick(direction, d, "direction", "random"),
        dims=1 if two else pick(dims, d, "dims", 2),
        steps=pick(steps, d, "steps", 21),
        span=pick(span, d, "span", 1.0),
        normalize=pick(normalize, d, "normalize", None),
        include_1d=include_1d or bool(d.get("include_1d", False)),
        orthogonalize=orthogonalize or bool(d.get("orthogonalize", False)),
        bn_recompute=bn_recompute or bool(d.get("bn_recompute", False)),
        alpha_min=pick(alpha_min, d, "alpha_min", 0.0),
        alpha_max=pick(alpha_max, d, "alpha_max", 1.0),
        chunk=pick(chunk, d, "chunk", 32),
        backend=pick(backend, d, "backend", "auto"),
    )
    cfg.validate()
    endings = plot_endings(cfg.dims == 2)
    plan = plan_outputs(
        inputs=[*inputs, *input_files(config, model, data, loss)],
        force=force,
        out=out,
        files={"--grid-out": (grid_out, (".csv",))},
        prefixes={"--plot": (plot, tuple(endings.values()))},
        resumable={"--cache": (cache, grid_out, CACHE_FORMAT)},
    )
    plots = {name: path for name, e in endings.items() if (path := plan.path("--plot", e)) is not None}
    cache_path = plan.path("--cache")
    implicit_cache = plan.temporary("--cache")  # the command's own partial file: removed when the grid is done

    binding: dict[str, Any] = dict(
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
    _, ctx = load_context(checkpoint, **binding)
    ctx_b = load_context(other, **binding)[1] if two else None

    done: dict[int, tuple[float, float | None]] = {}
    key = ""
    if cache_path is not None:
        key = landscape_key(cfg, ctx, ctx_b)
        done = read_cache(cache_path, key, force)
    saved = dict(done)

    def on_points(new: dict[int, tuple[float, float | None]]) -> None:
        saved.update(new)
        if cache_path is not None:
            write_cache(cache_path, key, saved)

    try:
        with progress_bar(quiet) as progress:
            if two:
                assert ctx_b is not None
                result = analyze_interpolation(cfg, ctx, ctx_b, progress, done=done, on_points=on_points)
            else:
                result = analyze_landscape(cfg, ctx, progress, done=done, on_points=on_points)
    except KeyboardInterrupt:
        if cache_path is not None and saved:
            err(
                f"interrupted; {len(saved)} grid points are saved in '{cache_path}': rerun the same command "
                "to continue where it stopped"
            )
        else:
            err("interrupted (pass --grid-out or --cache to make the grid resumable)")
        raise typer.Exit(130) from None
    emit(result, format, out, quiet)
    if two and format == "table":
        typer.echo(f"# {BARRIER_DEFINITION}")
    grid = result.artifacts["grid"]
    if grid_out is not None:
        atomic_write_bytes(grid_out, grid.to_csv(index=False).encode())
    if plots:
        from diagnostics import plots as plotting

        if two:
            title = f"{ctx.checkpoint} -> {ctx_b.checkpoint if ctx_b else ''}: barrier {result.metadata['barrier']['value']:.4g}"
            figs = {"curve": plotting.landscape_curve_figure(grid, title)}
        elif cfg.dims == 1:
            figs = {"curve": plotting.landscape_curve_figure(grid, f"{ctx.checkpoint}: {cfg.direction} direction")}
        else:
            title = f"{ctx.checkpoint}: {cfg.direction} plane ({cfg.normalization}-normalised)"
            figs = {
                "contour": plotting.landscape_contour_figure(grid, title),
                "surface": plotting.landscape_surface_figure(grid, title),
            }
        for name, fig in figs.items():
            atomic_write_bytes(plots[name], plotting.figure_png(fig))
    if implicit_cache and cache_path is not None and cache_path.exists():
        cache_path.unlink()


def register(app: typer.Typer) -> None:
    app.command("landscape")(landscape)
