"""``diag bos``: box stability of a detector under feature dropout; ``diag bos-correlate``: BoS vs mAP."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import pandas as pd
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
from diagnostics.analyzers.stability import BosConfig, analyze_bos, correlate_bos
from diagnostics.binding import input_files
from diagnostics.errors import DiagnosticsError
from diagnostics.outputs import plan_outputs
from diagnostics.results import Result, atomic_write_bytes, read_result

ModuleOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--module",
        "-m",
        help="module whose output gets dropout (repeat for several), e.g. backbone.layer2",
        rich_help_panel="Dropout",
    ),
]
POpt = Annotated[
    float | None, typer.Option("--p", "-p", help="element-wise dropout rate (default 0.15)", rich_help_panel="Dropout")
]
PassesOpt = Annotated[
    int | None,
    typer.Option(
        "--passes", help="seeded dropout passes; their spread gives the interval (default 5)", rich_help_panel="Dropout"
    ),
]
ConfidenceOpt = Annotated[
    float | None,
    typer.Option("--confidence", help="level of the t-interval over passes (default 0.95)", rich_help_panel="Dropout"),
]


def interval_line(result: Result, metric: str) -> str | None:
    info = result.metadata.get(metric) or {}
    low, high = (info.get("ci") or [None, None])[:2]
    if low is None:
        return None
    conf = result.metadata.get("confidence", 0.95)
    return f"{metric} = {info['mean']:.4f}, {100 * conf:g}% t-interval over {result.metadata.get('passes')} passes [{low:.4f}, {high:.4f}]"


@handle_errors
def bos(
    checkpoint: CheckpointArg,
    model: ModelOpt = None,
    data: DataOpt = None,
    config: ConfigOpt = None,
    trust_checkpoint_factories: TrustOpt = False,
    module: ModuleOpt = None,
    p: POpt = None,
    passes: PassesOpt = None,
    score_threshold: Annotated[
        float | None,
        typer.Option("--score-threshold", help="ignore boxes scored below this (default 0.5)", rich_help_panel="Boxes"),
    ] = None,
    max_boxes: Annotated[
        int | None,
        typer.Option(
            "--max-boxes", help="keep the N best-scored boxes per image (default 100)", rich_help_panel="Boxes"
        ),
    ] = None,
    box_format: Annotated[
        str | None,
        typer.Option("--box-format", help="xyxy (torchvision, default) | xywh | cxcywh", rich_help_panel="Boxes"),
    ] = None,
    class_aware: Annotated[
        bool, typer.Option("--class-aware", help="boxes of different labels never match", rich_help_panel="Boxes")
    ] = False,
    empty: Annotated[
        str | None,
        typer.Option(
            "--empty",
            help="image with one empty box set: skip (paper, counted in bos_skipped_images) | zero",
            rich_help_panel="Boxes",
        ),
    ] = None,
    adapter: Annotated[
        str | None,
        typer.Option(
            "--adapter",
            help="'pkg.module:fn' turning the model output into [{'boxes','scores','labels'}, ...]",
            rich_help_panel="Boxes",
        ),
    ] = None,
    confidence: ConfidenceOpt = None,
    label: Annotated[
        str | None,
        typer.Option("--label", help="name of this test set (stored in the metadata; used by bos-correlate)"),
    ] = None,
    per_image: Annotated[
        Path | None,
        typer.Option("--per-image", help="write the per-image, per-pass scores to FILE.csv", rich_help_panel="Output"),
    ] = None,
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
    """Box stability score (BoS, Yang et al. 2024): how much a detector's boxes move under feature dropout.

    Boxes of a clean pass and of --passes dropout passes (rate --p at --module, BatchNorm in eval) are
    matched per image by the Hungarian algorithm on IoU; BoS = mean over images of
    sum(matched IoU) / min(n, n'). Higher = more stable; across test sets it tracks mAP (see bos-correlate).
    """
    check_format(format)
    plan = plan_outputs(
        inputs=[checkpoint, *input_files(config, model, data)],
        force=force,
        out=out,
        files={"--per-image": (per_image, (".csv",))},
    )
    d = analyzer_defaults(config, "bos")
    modules = list(module) if module else d.get("modules", d.get("module"))
    cfg = BosConfig(
        modules=[modules] if isinstance(modules, str) else list(modules or []),
        p=pick(p, d, "p", 0.15),
        passes=pick(passes, d, "passes", 5),
        score_threshold=pick(score_threshold, d, "score_threshold", 0.5),
        max_boxes=pick(max_boxes, d, "max_boxes", 100),
        box_format=pick(box_format, d, "box_format", "xyxy"),
        class_aware=class_aware or bool(d.get("class_aware", False)),
        empty=pick(empty, d, "empty", "skip"),
        adapter=pick(adapter, d, "adapter"),
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
        result = analyze_bos(cfg, ctx, progress)
    if label is not None:
        result.metadata["label"] = label
    emit(result, format, out, quiet)
    line = interval_line(result, "bos")
    if line and not quiet:
        typer.echo(f"diag: {line}", err=True)
    if (per_image_path := plan.path("--per-image")) is not None:
        atomic_write_bytes(per_image_path, result.artifacts["per_image"].to_csv(index=False).encode())


# -------------------------------------------------------------------------------- bos-correlate
_KEY_COLUMNS = ("set", "name", "label", "test_set", "file", "dataset")
_VALUE_COLUMNS = ("map", "map50", "map@0.5", "ap", "value")


def _column(df: pd.DataFrame, wanted: tuple[str, ...], explicit: str | None, what: str, path: Path) -> str:
    lower = {str(c).strip().lower(): c for c in df.columns}
    if explicit is not None:
        if explicit.lower() not in lower:
            raise DiagnosticsError(f"'{path}' has no column '{explicit}'; columns: {', '.join(map(str, df.columns))}")
        return lower[explicit.lower()]
    for w in wanted:
        if w in lower:
            return lower[w]
    raise DiagnosticsError(
        f"'{path}' needs a {what} column named one of {', '.join(wanted)}; columns: {', '.join(map(str, df.columns))}"
    )


def read_map_table(path: Path, value_column: str | None = None) -> dict[str, float]:
    """``maps.csv`` -> ``{test set name: mAP}`` (columns ``set``/``name`` and ``map``, any case)."""
    if not path.is_file():
        raise DiagnosticsError(f"no such mAP table: '{path}'")
    try:
        df = pd.read_csv(path)
    except Exception as exc:
        raise DiagnosticsError(f"cannot read '{path}' as CSV: {exc}") from exc
    vcol = _column(df, _VALUE_COLUMNS, value_column, "mAP", path)
    keys = [c for c in df.columns if c != vcol]
    kcol = next((c for c in keys if str(c).strip().lower() in _KEY_COLUMNS), keys[0] if keys else None)
    if kcol is None:
        raise DiagnosticsError(f"'{path}' needs a column naming the test sets (e.g. 'set') next to '{vcol}'")
    values = pd.to_numeric(df[vcol], errors="coerce")
    if values.isna().any():
        bad = df.loc[values.isna(), kcol].astype(str).tolist()
        raise DiagnosticsError(f"'{path}': column '{vcol}' is not a number for {bad[:5]}")
    names = df[kcol].astype(str).str.strip()
    if names.duplicated().any():
        raise DiagnosticsError(f"'{path}': test sets listed twice: {sorted(set(names[names.duplicated()]))}")
    return dict(zip(names, values.astype(float)))


def _point(path: Path, metric: str) -> tuple[list[str], float, float | None]:
    res = read_result(path)
    rows = [r for r in res.records if r.metric == metric and r.group is None]
    if not rows:
        found = sorted({r.metric for r in res.records})
        raise DiagnosticsError(
            f"'{path}' holds no '{metric}' record (metrics there: {', '.join(found) or 'none'}); "
            f"write one with: diag bos CKPT ... --out {path.name}"
        )
    if len(rows) > 1:
        raise DiagnosticsError(f"'{path}' holds {len(rows)} '{metric}' records; give one result file per test set")
    keys = [k for k in (res.metadata.get("label"), path.stem, path.name, str(path)) if k]
    return keys, rows[0].value, rows[0].stderr


@handle_errors
def bos_correlate(
    results: Annotated[
        list[Path], typer.Argument(help="BoS result files, one per test set (from diag bos --out)", show_default=False)
    ],
    map_table: Annotated[
        Path,
        typer.Option("--map", help="CSV with the known mAP of each test set: columns set (or name) and map"),
    ],
    map_column: Annotated[
        str | None, typer.Option("--map-column", help="name of the mAP column (default: map / mAP / ap)")
    ] = None,
    metric: Annotated[
        str, typer.Option("--metric", help="the stability metric to correlate (e.g. prediction_agreement)")
    ] = "bos",
    plot: Annotated[Path | None, typer.Option("--plot", help="write the scatter plot with the fit to FILE.png")] = None,
    format: FormatOpt = "table",
    out: OutOpt = None,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Does BoS predict mAP across test sets? Spearman, Pearson, a linear fit and its leave-one-out RMSE.

    A test set's name is the --label given to diag bos, else the result file's stem; the --map CSV lists
    each name with its mAP.
    """
    check_format(format)
    plan = plan_outputs(inputs=[*results, map_table], force=force, out=out, files={"--plot": (plot, (".png",))})
    table = read_map_table(map_table, map_column)
    names, xs, ses, ys = [], [], [], []
    for path in results:
        keys, value, se = _point(path, metric)
        key = next((k for k in keys if k in table), None)
        if key is None:
            raise DiagnosticsError(
                f"'{path}' (test set '{keys[0]}') is not listed in '{map_table}'; it lists: {', '.join(table)}"
            )
        names.append(key)
        xs.append(value)
        ses.append(se)
        ys.append(table[key])
    result = correlate_bos(names, xs, ys, ses)
    result.metadata["metric"] = metric
    unused = sorted(set(table) - set(names))
    if unused:
        result.metadata["notes"].append(f"'{map_table}' lists test sets without a result file: {unused}")
    emit(result, format, out, quiet)
    if plot is not None:
        from diagnostics.plots import bos_map_figure, figure_png

        records = {r.metric: r.value for r in result.records}
        fig = bos_map_figure(
            result.artifacts["points"],
            slope=records["fit_slope"],
            intercept=records["fit_intercept"],
            title=f"{metric} vs mAP: Spearman {records['spearman_rho']:.3f}, Pearson {records['pearson_r']:.3f}",
            xlabel=metric,
        )
        atomic_write_bytes(plan.path("--plot"), figure_png(fig))


def register(app: typer.Typer) -> None:
    app.command("bos")(bos)
    app.command("bos-correlate")(bos_correlate)
