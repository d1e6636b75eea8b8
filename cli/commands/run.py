"""``diag run``: run analyzers on every checkpoint of a training run, cached and resumable."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from diag_cli.common import (
    BatchSizeOpt,
    ConfigOpt,
    DataOpt,
    DebugOpt,
    DeviceOpt,
    DtypeOpt,
    LossOpt,
    ModelOpt,
    ParamsOpt,
    QuietOpt,
    SamplesOpt,
    SeedOpt,
    TrustOpt,
    check_format,
    err,
    handle_errors,
    progress_bar,
    project_config,
    warn,
)
from diagnostics import distributed
from diagnostics.binding import input_files
from diagnostics.errors import DiagnosticsError
from diagnostics.report import summary_table
from diagnostics.results import format_markdown, frame_to_records, records_to_json
from diagnostics.runs import (
    CACHE_DIR,
    SweepResult,
    parse_overrides,
    prepare_out_dir,
    read_manifest,
    resolve_settings,
    start_manifest,
    sweep,
    write_sweep,
)

RunArg = Annotated[Path, typer.Argument(help="folder holding the run's checkpoints (searched recursively)")]
OptionalRunArg = Annotated[
    Path | None, typer.Argument(help="folder holding the run's checkpoints (searched recursively)", show_default=False)
]
AnalyzersOpt = Annotated[
    str | None,
    typer.Option(
        "--analyzers",
        "-a",
        help="comma-separated analyzers (default: 'analyzers' in diag.toml, else hessian); see 'diag run --list'",
    ),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        help="analyzer option ANALYZER.OPTION=VALUE (repeatable), over the [ANALYZER] table of diag.toml",
    ),
]
RunOutOpt = Annotated[
    Path | None,
    typer.Option("--out", "-o", help="output folder (default: reports/<run name>); its cache/ makes reruns cheap"),
]
PatternOpt = Annotated[
    str | None, typer.Option("--pattern", help="glob of checkpoint files inside the run (e.g. 'step_*.pt')")
]
ForceDirOpt = Annotated[
    bool, typer.Option("--force", help="write into a non-empty folder that diag did not create (deletes nothing)")
]
FailFastOpt = Annotated[
    bool, typer.Option("--fail-fast", help="stop at the first checkpoint that cannot be analysed (default: go on)")
]
ListOpt = Annotated[bool, typer.Option("--list", help="list the available analyzers and exit")]


def invocation(**flags: Any) -> dict[str, Any]:
    """The flags as given (None = not given), stored in the manifest so ``diag report`` can repeat them."""
    out = {k: (str(v) if isinstance(v, Path) else v) for k, v in flags.items()}
    out["set"] = list(out.get("set") or [])
    return out


def merge_invocation(flags: dict[str, Any], stored: dict[str, Any] | None) -> dict[str, Any]:
    """Flags not given now take the value stored by the previous ``diag run``/``diag report``."""
    if not stored:
        return flags
    merged = dict(flags)
    for key, value in flags.items():
        if key == "trust":
            merged[key] = bool(value) or bool(stored.get(key))
        elif key == "set":
            merged[key] = value or list(stored.get(key) or [])
        elif value is None and stored.get(key) is not None:
            merged[key] = stored[key]
    return merged


def run_inputs(flags: dict[str, Any]) -> list[Path]:
    """diag.toml and file.py factories named by the flags: inputs no output may overwrite."""
    config = flags.get("config")
    return input_files(Path(config) if config else None, flags.get("model"), flags.get("data"), flags.get("loss"))


def run_sweep(run: Path, out: Path, flags: dict[str, Any], *, force: bool, fail_fast: bool, quiet: bool) -> SweepResult:
    """Validate the output folder, sweep (cached) and write the table and the manifest."""
    if not run.is_dir():
        raise DiagnosticsError(f"no such run folder: '{run}'" if not run.exists() else f"'{run}' is not a folder")
    prepare_out_dir(out, force=force, protected=[run, *run_inputs(flags)])
    distributed.init_from_env()  # under torchrun: checkpoints are spread over the ranks
    config_path = flags.get("config")
    cfg = project_config(Path(config_path) if config_path else None)
    settings = resolve_settings(
        cfg,
        analyzers=flags.get("analyzers"),
        overrides=parse_overrides(flags.get("set") or []),
        model=flags.get("model"),
        data=flags.get("data"),
        loss=flags.get("loss"),
        trust_checkpoint=bool(flags.get("trust")),
        seed=flags.get("seed"),
        samples=flags.get("samples"),
        batch_size=flags.get("batch_size"),
        dtype=flags.get("dtype"),
        device=flags.get("device"),
        params=flags.get("params"),
        pattern=flags.get("pattern"),
    )
    if distributed.is_main():  # before the first result: a killed first sweep resumes with the same command
        start_manifest(out, run, settings, invocation=flags)
    with progress_bar(quiet) as progress:
        log = None if quiet or progress is not None else (lambda line: typer.echo(f"diag: {line}", err=True))
        try:
            result = sweep(
                run,
                settings,
                cache_dir=out / CACHE_DIR,
                exclude=[out],
                progress=progress,
                keep_going=not fail_fast,
                log=log,
            )
        except KeyboardInterrupt:
            err(f"interrupted; finished results are kept in '{out / CACHE_DIR}': rerun the same command to resume")
            raise typer.Exit(130) from None
    if not distributed.is_main():  # every rank holds the whole sweep; rank 0 alone writes and prints
        raise typer.Exit(0)
    write_sweep(out, result, invocation=flags)
    if not quiet:
        for line in result.warnings:
            warn(line)
        for s in result.skipped:
            warn(f"{s.checkpoint} skipped: {s.reason}")
        for f in result.failures:
            warn(f"{f.checkpoint} [{f.analyzer}] failed: {f.message}")
    return result


def sweep_summary(result: SweepResult, out: Path) -> str:
    n = len(result.checkpoints)
    line = (
        f"{n} checkpoint{'s' if n != 1 else ''} x {len(result.settings.analyzers)} analyzer(s) "
        f"[{', '.join(result.settings.analyzers)}]: {len(result.computed)} computed, {len(result.cached)} from cache"
    )
    if result.failures:
        line += f", {len(result.failures)} FAILED"
    return line + f"; {len(result.frame)} records in {out}/records.parquet and records.csv ({result.seconds:.1f} s)"


def default_out(run: Path) -> Path:
    return Path("reports") / run.resolve().name


def list_analyzers() -> None:
    from diagnostics.analyzers.registry import all_analyzers

    for name, spec in sorted(all_analyzers().items()):
        typer.echo(f"{name:<12} {spec.summary}")


@handle_errors
def run(
    run: OptionalRunArg = None,
    analyzers: AnalyzersOpt = None,
    set_: SetOpt = None,
    model: ModelOpt = None,
    data: DataOpt = None,
    loss: LossOpt = None,
    config: ConfigOpt = None,
    trust_checkpoint_factories: TrustOpt = False,
    seed: SeedOpt = None,
    samples: SamplesOpt = None,
    batch_size: BatchSizeOpt = None,
    dtype: DtypeOpt = None,
    device: DeviceOpt = None,
    params: ParamsOpt = None,
    pattern: PatternOpt = None,
    out: RunOutOpt = None,
    format: Annotated[
        str, typer.Option("--format", "-f", help="stdout: table (per-checkpoint summary) | json | csv | md")
    ] = "table",
    force: ForceDirOpt = False,
    fail_fast: FailFastOpt = False,
    list_: ListOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Analyze every checkpoint of a run: one tidy table (Parquet + CSV), every result cached.

    Rerunning computes only what is new (a changed checkpoint, analyzer option or setting); an
    interrupted sweep resumes where it stopped. Analyzer options come from diag.toml tables
    ([hessian] top_k = 3) or --set hessian.top_k=3.
    """
    if list_:
        list_analyzers()
        return
    if run is None:
        raise DiagnosticsError("missing the run folder: diag run RUN_DIR [--analyzers hessian,...] [--out DIR]")
    check_format(format)
    out = out or default_out(run)
    flags = invocation(
        analyzers=analyzers,
        set=set_,
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
        pattern=pattern,
    )
    result = run_sweep(run, out, flags, force=force, fail_fast=fail_fast, quiet=quiet)
    records = result.frame
    if format == "json":
        typer.echo(records_to_json(frame_to_records(records)))
    elif format == "csv":
        typer.echo(records.to_csv(index=False), nl=False)
    elif format == "md":
        typer.echo(format_markdown(frame_to_records(records)), nl=False)
    else:
        table = summary_table(records)
        typer.echo(table.to_string(index=False, float_format=lambda x: f"{x:.6g}") if len(table) else "(no records)")
        typer.echo(sweep_summary(result, out))


def register(app: typer.Typer) -> None:
    app.command("run")(run)


__all__ = ["invocation", "merge_invocation", "read_manifest", "run_sweep", "sweep_summary"]
