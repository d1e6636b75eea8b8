"""``diag bos-correlate``: does BoS predict mAP across test sets? (Yang et al. 2024)

Not an analyzer (it reads result files, not a checkpoint), so it is written here; its options are declared
once in :class:`CorrelateOptions` and the output options are the shared :class:`~diagnostics.options.OutputOptions`.
No heavy import at module level: ``diag --help`` stays fast.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from diag_cli.errors import handle_errors
from diag_cli.factory import make_command, options_of, split_values, typer_parameter
from diagnostics.errors import DiagnosticsError
from diagnostics.options import OutputOptions
from diagnostics.spec import PANEL_OUTPUT, option, resolve_config

NAME = "bos-correlate"
SUMMARY = "fit BoS against the known mAP of several test sets (Spearman, Pearson, leave-one-out RMSE)"
HELP = """Does BoS predict mAP across test sets? Spearman, Pearson, a linear fit and its leave-one-out RMSE.

A test set's name is the --label given to diag bos, else the result file's stem; the --map CSV lists
each name with its mAP.
"""


@dataclass
class CorrelateOptions:
    """Options of ``diag bos-correlate`` (command line only: there is no checkpoint, so no diag.toml table)."""

    map: Path | None = option(
        None, help="CSV with the known mAP of each test set: columns set (or name) and map (required)", metavar="CSV"
    )
    map_column: str | None = option(None, help="name of the mAP column (default: map / mAP / ap)")
    metric: str = option("bos", help="the stability metric to correlate (e.g. prediction_agreement)")
    plot: Path | None = option(
        None, help="write the scatter plot with the fit to FILE.png", panel=PANEL_OUTPUT, metavar="FILE"
    )


def parameters() -> list[inspect.Parameter]:
    """The command's parameters: the result files, then the declared options."""
    arg = typer.Argument(help="BoS result files, one per test set (from diag bos --out)", show_default=False)
    results = inspect.Parameter("results", inspect.Parameter.KEYWORD_ONLY, annotation=Annotated[list[Path], arg])
    return [results, *(typer_parameter(p) for p in options_of(CorrelateOptions, OutputOptions))]


def check_files(opts: CorrelateOptions, out: OutputOptions, results: list[Path]) -> Path | None:
    """Plan the outputs before any work (see :func:`diagnostics.outputs.plan_outputs`) -> the plot's path."""
    from diagnostics.outputs import plan_outputs

    if opts.map is None:
        raise DiagnosticsError("--map is required: a CSV with the known mAP of each test set (columns set, map)")
    plan = plan_outputs(
        inputs=[*results, opts.map], force=out.force, out=out.out, files={"--plot": (opts.plot, (".png",))}
    )
    return plan.path("--plot")


@handle_errors
def bos_correlate(**values: Any) -> None:
    """Run the command with its parsed ``values`` (errors become one line and exit code 2)."""
    from diag_cli.output import emit
    from diagnostics.analyzers.stability import correlate_files
    from diagnostics.outputs import atomic_write_bytes
    from diagnostics.render import bos_fit

    out = resolve_config(OutputOptions, flags=split_values(values, OutputOptions))
    opts = resolve_config(CorrelateOptions, flags=split_values(values, CorrelateOptions))
    results = [Path(p) for p in values["results"]]
    plot = check_files(opts, out, results)
    result = correlate_files(results, opts.map, metric=opts.metric, map_column=opts.map_column)
    emit(result, out.format, out.out, out.quiet)
    if plot is not None:
        atomic_write_bytes(plot, bos_fit(result, opts)[""])


def register(app: typer.Typer) -> None:
    """Add ``diag bos-correlate`` to the app."""
    command = make_command(NAME, lambda values: bos_correlate(**values), parameters(), HELP)
    app.command(NAME, help=HELP, short_help=SUMMARY)(command)
