"""``diag report``: sweep a run (whatever is not cached yet) and write the report: index.html, report.md, figures."""

from __future__ import annotations

import inspect
import json
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from diag_cli.commands.run import (
    check_run_folder,
    default_out,
    invocation,
    merge_invocation,
    run_argument,
    run_sweep,
    sweep_notes,
    sweep_parameters,
    sweep_summary,
)
from diag_cli.errors import cli_errors
from diag_cli.factory import make_command, options_from, options_of, typer_parameter
from diagnostics.errors import DiagnosticsError
from diagnostics.options import FolderOptions
from diagnostics.spec import PANEL_OUTPUT

if TYPE_CHECKING:
    from diagnostics.report import Report
    from diagnostics.runs import SweepResult

HELP = """Report on a whole run: OUT/index.html (one self-contained file), OUT/report.md and OUT/figures/*.png.

Runs the sweep first for whatever is not cached in OUT yet. Flags not given are taken from the previous
'diag run'/'diag report' into the same OUT, so 'diag report RUN --out OUT' after
'diag run RUN --analyzers ... --out OUT' reports exactly what was run.
"""


# what 'diag report' prints is where the report went, as text or JSON; the records are in OUT/records.csv
REPORT_FORMATS = ("table", "json")


def check_format(fmt: str) -> None:
    """Refuse a ``--format`` that has nothing to format here (``csv``, ``md``), naming what to use instead."""
    if fmt not in REPORT_FORMATS:
        raise DiagnosticsError(
            f"diag report prints where the report went, as table (text) or json, not {fmt}: pass --format json, "
            f"or print the records with 'diag run RUN --out OUT --format {fmt}' (they are in OUT/records.csv)"
        )


def report_summary(result: SweepResult, out: Path, written: dict[str, Path], rendered: Report) -> dict[str, Any]:
    """What ``diag report --format json`` prints: the files written, the figures and the sweep's counts."""
    return {
        "out": str(out),
        "title": rendered.title,
        "index_html": str(written["index.html"]),
        "report_md": str(written["report.md"]),
        "figures": [
            {"key": f.key, "title": f.title, "path": str(written[f"figures/{f.key}.png"])} for f in rendered.figures
        ],
        "records": len(result.frame),
        "records_files": [str(out / "records.parquet"), str(out / "records.csv")],
        "checkpoints": len(result.checkpoints),
        "analyzers": list(result.settings.analyzers),
        "computed": len(result.computed),
        "cached": len(result.cached),
        "failed": [{"checkpoint": f.checkpoint, "analyzer": f.analyzer, "message": f.message} for f in result.failures],
        "notes": sweep_notes(result),
        "seconds": round(result.seconds, 3),
    }


def report(values: dict[str, Any]) -> None:
    """``diag report`` with its parsed ``values``."""
    with cli_errors(bool(values.get("debug"))):
        opts = options_from(FolderOptions, values)
        check_format(opts.format)
        run_dir = Path(values["run"])
        check_run_folder(run_dir)
        from diagnostics.report import report_from_sweep
        from diagnostics.runs import read_manifest, write_report

        out = opts.out or default_out(run_dir)
        flags = invocation(values)
        manifest = read_manifest(out) if out.is_dir() else None
        if manifest is not None and Path(str(manifest.get("run", ""))).resolve() == run_dir.resolve():
            flags = merge_invocation(flags, manifest.get("invocation"))
        result = run_sweep(run_dir, out, flags, force=opts.force, quiet=opts.quiet)
        rendered = report_from_sweep(result, title=values.get("title"))
        written = write_report(out, rendered)
        if opts.format == "json":
            typer.echo(json.dumps(report_summary(result, out, written, rendered), indent=2))
            return
        typer.echo(sweep_summary(result, out))
        typer.echo(
            f"report: {written['index.html']} (self-contained), {written['report.md']}, {len(rendered.figures)} figures"
        )


def report_format(params: list[inspect.Parameter]) -> list[inspect.Parameter]:
    """The sweep's parameters with ``--format`` offering what ``diag report`` prints (:data:`REPORT_FORMATS`)."""
    fmt = next(p for p in options_of(FolderOptions) if p.name == "format")
    info = replace(fmt.info, choices=REPORT_FORMATS, help="stdout: where the report went, as text or JSON")
    return [typer_parameter(replace(fmt, info=info)) if p.name == "format" else p for p in params]


def register(app: typer.Typer) -> None:
    """Add ``diag report``."""
    title = typer.Option("--title", help="report title (default: from the run's name)", rich_help_panel=PANEL_OUTPUT)
    title_param = inspect.Parameter(
        "title", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[str | None, title]
    )
    params = [run_argument(), *report_format(sweep_parameters()), title_param]
    summary = "sweep a run and write one self-contained report (HTML, Markdown, figures)"
    app.command("report", help=HELP, short_help=summary)(make_command("report", report, params, HELP))
