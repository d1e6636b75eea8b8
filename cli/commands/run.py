"""``diag run``: run analyzers on every checkpoint of a training run, cached and resumable.

Options are the shared declarations (:class:`~diagnostics.options.BindingOptions`, ``SweepOptions``,
``FolderOptions``); analyzer options come from ``[ANALYZER]`` tables of diag.toml or ``--set``. Nothing heavy is
imported until the command runs.
"""

from __future__ import annotations

import contextlib
import inspect
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from diag_cli.errors import cli_errors, err, warn
from diag_cli.factory import make_command, options_from, options_of, split_values, typer_parameter
from diagnostics.errors import DiagnosticsError
from diagnostics.options import BindingOptions, FolderOptions, ProjectOptions, SweepOptions

if TYPE_CHECKING:
    from diagnostics.runs import SweepResult

HELP = """Analyze every checkpoint of a run: one tidy table (Parquet + CSV), every result cached.

Rerunning computes only what is new (a changed checkpoint, analyzer option or setting); an interrupted sweep
resumes where it stopped. Analyzer options come from diag.toml tables ([hessian] top_k = 3) or
--set hessian.top_k=3.
"""
# the flags a sweep stores in its manifest, so 'diag report' can repeat exactly what was run
STORED = (BindingOptions, SweepOptions, ProjectOptions)


def run_argument(required: bool = True) -> inspect.Parameter:
    """The RUN folder argument."""
    arg = typer.Argument(help="folder holding the run's checkpoints (searched recursively)", show_default=False)
    annotation = Annotated[Path, arg] if required else Annotated[Path | None, arg]
    default = inspect.Parameter.empty if required else None
    return inspect.Parameter("run", inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def sweep_parameters() -> list[inspect.Parameter]:
    """The options ``diag run`` and ``diag report`` share."""
    return [typer_parameter(p) for p in options_of(SweepOptions, BindingOptions, ProjectOptions, FolderOptions)]


def invocation(values: dict[str, Any]) -> dict[str, Any]:
    """The stored flags as given (None = not given), JSON-ready."""
    names = {p.name for cls in STORED for p in options_of(cls)}
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in values.items() if k in names}


def merge_invocation(flags: dict[str, Any], stored: dict[str, Any] | None) -> dict[str, Any]:
    """Flags not given now take the value stored by the previous ``diag run``/``diag report``."""
    return {**flags, **{k: v for k, v in (stored or {}).items() if flags.get(k) is None and k in flags}}


def default_out(run: Path) -> Path:
    """``reports/<run name>``."""
    return Path("reports") / run.resolve().name


def settings_from(flags: dict[str, Any], project: Any) -> Any:
    """Flags (+ diag.toml) -> :class:`~diagnostics.runs.SweepSettings`."""
    from diagnostics.runs import parse_overrides, resolve_settings

    binding = project.binding(split_values(flags, BindingOptions))
    sweep = options_from(SweepOptions, flags)
    trust = options_from(ProjectOptions, flags).trust_checkpoint_factories
    fields = {k: getattr(binding, k) for k in ("model", "data", "loss", "seed", "samples", "batch_size", "dtype")}
    fields |= {k: getattr(binding, k) for k in ("device", "params", "replicates", "inputs", "targets")}
    overrides = parse_overrides(sweep.set or [])
    return resolve_settings(
        project.as_dict(),
        analyzers=sweep.analyzers,
        overrides=overrides,
        trust_checkpoint=trust,
        pattern=sweep.pattern,
        **fields,
    )


def check_run_folder(run: Path) -> None:
    """Refuse a RUN that is no folder, before the numerical stack is imported (a typo costs no second of
    start-up)."""
    if not run.is_dir():
        raise DiagnosticsError(
            f"no such run folder: '{run}'; pass the folder that holds the run's checkpoints"
            if not run.exists()
            else f"'{run}' is a file; pass the folder that holds the run's checkpoints"
        )


def run_sweep(run: Path, out: Path, flags: dict[str, Any], *, force: bool, quiet: bool) -> SweepResult:
    """Check the output folder, sweep (cached, resumable) and write the table and the manifest."""
    check_run_folder(run)
    from diag_cli.run_command import load_project
    from diagnostics.binding import input_files, missing_factory_file
    from diagnostics.runs import (
        check_out_dir,
        check_settings,
        checkpoint_files,
        create_out_dir,
        last_manifest_kept,
        refuse_output_as_run,
        start_manifest,
        write_sweep,
    )

    refuse_output_as_run(run)
    project_opts = options_from(ProjectOptions, flags)
    project = load_project(project_opts.config)
    inputs = input_files(project_opts.config, flags.get("model"), flags.get("data"), flags.get("loss"))
    settings = settings_from(flags, project)  # checks --pattern (resolve_settings), before --out is made
    # what would stop the sweep before its first checkpoint stops it before the output folder and its manifest
    # are touched: a rerun with a typo keeps the last sweep's manifest (diag report reruns from it)
    check_settings(settings)
    missing_factory_file(model=settings.model, data=settings.data, loss=settings.loss)
    check_out_dir(out, force=force, protected=[run, *inputs])
    checkpoint_files(run, settings.pattern, exclude=[out])  # a run with no checkpoints leaves no empty --out
    create_out_dir(out)
    from diagnostics import distributed  # torch: only once the arguments are known to be good

    distributed.init_from_env()  # under torchrun: checkpoints are spread over the ranks
    main = distributed.is_main()
    # a rerun that fails as a whole puts the last finished sweep's manifest back (its tables stay current)
    with last_manifest_kept(out) if main else contextlib.nullcontext():
        if main:  # before the first result: a killed first sweep resumes with the same command
            start_manifest(out, run, settings, invocation=flags)
        result = _sweep(run, out, settings, bool(flags.get("fail_fast")), quiet)
    if not main:  # every rank holds the whole sweep; rank 0 alone writes and prints
        raise typer.Exit(0)
    write_sweep(out, result, invocation=flags)
    if not quiet:
        skipped = (f"{s.checkpoint} skipped: {s.reason}" for s in result.skipped)
        for line in [*sweep_notes(result), *result.warnings, *skipped]:
            warn(line)
        for f in result.failures:
            warn(f"{f.checkpoint} [{f.analyzer}] failed: {f.message}")
    return result


def sweep_notes(result: SweepResult, shown: int = 3) -> list[str]:
    """The notes of the sweep's results (``not converged: raise --max-iter``), each once, with the analyzer
    and the checkpoints it holds for: ``step_0.pt, step_1.pt and 8 more [hessian]: NOTE``."""
    where: dict[tuple[str, str], list[str]] = {}
    for rc in result.checkpoints:
        for analyzer in result.settings.analyzers:
            res = result.results.get((rc.name, analyzer))
            for note in [] if res is None else res.metadata.get("notes") or []:
                names = where.setdefault((analyzer, str(note)), [])
                if rc.name not in names:
                    names.append(rc.name)
    lines = []
    for (analyzer, note), names in where.items():
        more = f" and {len(names) - shown} more" if len(names) > shown else ""
        lines.append(f"{', '.join(names[:shown])}{more} [{analyzer}]: {as_sweep_hint(note, analyzer)}")
    return lines


_FLAG = re.compile(r"--([a-z][a-z0-9-]*)(?:=(\S+?)|\s+([-+]?\d[\w.+-]*))?(?=[\s,;:)]|$)")


def as_sweep_hint(note: str, analyzer: str) -> str:
    """A note's fix in the words of a sweep: an analyzer's own option is set with ``--set`` there, so
    ``raise --max-iter`` reads ``raise --set hessian.max_iter=N`` and ``use --tol 0.00012`` reads
    ``use --set hessian.tol=0.00012``; the flags ``diag run`` itself takes (``--dtype``, ``--samples``) stay."""
    from dataclasses import fields

    from diagnostics.analyzers.registry import all_analyzers
    from diagnostics.runs import BindingFlags

    registered = all_analyzers().get(analyzer)
    config = getattr(registered, "config", None)
    own = {f.name for f in fields(config)} if config is not None else set()
    sweep_flags = {f.name for f in fields(BindingFlags)}

    def rewrite(m: re.Match[str]) -> str:
        name = m.group(1).replace("-", "_")
        if name not in own or name in sweep_flags:
            return m.group(0)
        return f"--set {analyzer}.{name}={m.group(2) or m.group(3) or 'N'}"

    return _FLAG.sub(rewrite, note)


def _sweep(run: Path, out: Path, settings: Any, fail_fast: bool, quiet: bool) -> SweepResult:
    from diag_cli.output import progress_bar, user_prints_to_stderr
    from diagnostics.runs import CACHE_DIR, sweep

    with progress_bar(quiet) as progress:
        log = None if quiet or progress is not None else (lambda line: typer.echo(f"diag: {line}", err=True))
        try:
            with user_prints_to_stderr():
                return sweep(
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


def sweep_summary(result: SweepResult, out: Path) -> str:
    """One line: checkpoints x analyzers, computed/cached/failed, where the table is."""
    n = len(result.checkpoints)
    line = (
        f"{n} checkpoint{'s' if n != 1 else ''} x {len(result.settings.analyzers)} analyzer(s) "
        f"[{', '.join(result.settings.analyzers)}]: {len(result.computed)} computed, {len(result.cached)} from cache"
    )
    if result.failures:
        line += f", {len(result.failures)} FAILED"
    return line + f"; {len(result.frame)} records in {out}/records.parquet and records.csv ({result.seconds:.1f} s)"


def print_sweep(result: SweepResult, fmt: str, out: Path) -> None:
    """The records in ``fmt``; the table format is a per-checkpoint summary and one summary line."""
    from diag_cli.output import print_records
    from diagnostics.report import summary_table
    from diagnostics.results import frame_to_records

    if fmt != "table":
        print_records(frame_to_records(result.frame), fmt)
        return
    table = summary_table(result.frame)
    typer.echo(table.to_string(index=False, float_format=lambda x: f"{x:.6g}") if len(table) else "(no records)")
    typer.echo(sweep_summary(result, out))


def list_analyzers() -> None:
    """One line per registered analyzer: name and summary."""
    from diagnostics.analyzers.registry import all_analyzers

    for name, spec in all_analyzers().items():
        typer.echo(f"{name:<14} {spec.summary}")


def run(values: dict[str, Any]) -> None:
    """``diag run`` with its parsed ``values``."""
    with cli_errors(bool(values.get("debug"))):
        if values.get("list"):
            list_analyzers()
            return
        if values.get("run") is None:
            raise DiagnosticsError("missing the run folder: diag run RUN_DIR [--analyzers hessian,...] [--out DIR]")
        opts = options_from(FolderOptions, values)
        run_dir = Path(values["run"])
        out = opts.out or default_out(run_dir)
        result = run_sweep(run_dir, out, invocation(values), force=opts.force, quiet=opts.quiet)
        print_sweep(result, opts.format, out)


def register(app: typer.Typer) -> None:
    """Add ``diag run``."""
    listing = typer.Option("--list", help="list the available analyzers and exit", show_default=False)
    list_param = inspect.Parameter(
        "list", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=Annotated[bool, listing]
    )
    params = [run_argument(required=False), *sweep_parameters(), list_param]
    summary = "analyze every checkpoint of a run: one tidy table, every result cached, resumable"
    app.command("run", help=HELP, short_help=summary)(make_command("run", run, params, HELP))
