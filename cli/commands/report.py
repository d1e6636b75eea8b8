"""``diag report``: sweep a run (whatever is not cached yet) and write the report: index.html, report.md, figures."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated, Any

import typer

from diag_cli.commands.run import (
    default_out,
    invocation,
    merge_invocation,
    run_argument,
    run_sweep,
    sweep_parameters,
    sweep_summary,
)
from diag_cli.errors import cli_errors
from diag_cli.factory import make_command, split_values
from diagnostics.options import FolderOptions
from diagnostics.spec import PANEL_OUTPUT, resolve_config

HELP = """Report on a whole run: OUT/index.html (one self-contained file), OUT/report.md and OUT/figures/*.png.

Runs the sweep first for whatever is not cached in OUT yet. Flags not given are taken from the previous
'diag run'/'diag report' into the same OUT, so 'diag report RUN --out OUT' after
'diag run RUN --analyzers ... --out OUT' reports exactly what was run.
"""


def report(values: dict[str, Any]) -> None:
    """``diag report`` with its parsed ``values``."""
    from diagnostics.report import report_from_sweep
    from diagnostics.runs import read_manifest, write_report

    with cli_errors(bool(values.get("debug"))):
        opts = resolve_config(FolderOptions, flags=split_values(values, FolderOptions))
        run_dir = Path(values["run"])
        out = opts.out or default_out(run_dir)
        flags = invocation(values)
        manifest = read_manifest(out) if out.is_dir() else None
        if manifest is not None and Path(str(manifest.get("run", ""))).resolve() == run_dir.resolve():
            flags = merge_invocation(flags, manifest.get("invocation"))
        result = run_sweep(run_dir, out, flags, force=opts.force, quiet=opts.quiet)
        rendered = report_from_sweep(result, title=values.get("title"))
        written = write_report(out, rendered)
        typer.echo(sweep_summary(result, out))
        typer.echo(
            f"report: {written['index.html']} (self-contained), {written['report.md']}, {len(rendered.figures)} figures"
        )


def register(app: typer.Typer) -> None:
    """Add ``diag report``."""
    title = typer.Option("--title", help="report title (default: from the run's name)", rich_help_panel=PANEL_OUTPUT)
    title_param = inspect.Parameter(
        "title", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[str | None, title]
    )
    params = [run_argument(), *sweep_parameters(), title_param]
    summary = "sweep a run and write one self-contained report (HTML, Markdown, figures)"
    app.command("report", help=HELP, short_help=summary)(make_command("report", report, params, HELP))
