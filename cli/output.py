"""What commands print: records in the chosen format on stdout, notes on stderr, a progress bar on stderr.

Only the CLI prints; this module imports nothing heavy until it is used.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, redirect_stdout
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from diag_cli.errors import warn

if TYPE_CHECKING:
    from diagnostics.progress import ProgressFn
    from diagnostics.results import Record, Result


def print_records(records: list[Record], fmt: str, metadata: dict[str, Any] | None = None) -> None:
    """Records on stdout as ``table`` (readable), ``json`` (an array), ``csv`` or ``md``."""
    from diagnostics import results

    if fmt == "json":
        typer.echo(results.records_to_json(records))
    elif fmt == "csv":
        typer.echo(results.records_to_csv(records), nl=False)
    elif fmt == "md":
        typer.echo(results.format_markdown(records), nl=False)
    else:
        typer.echo(results.format_table(records, metadata), nl=False)


def emit(result: Result, fmt: str, out: Path | None, quiet: bool = False) -> None:
    """``--out`` written by its suffix, notes on stderr, then the records on stdout in ``fmt``.

    The file first: it is the durable result, and stdout may be a pipe whose reader stops early
    (``diag ... | head -1``), which ends the command at the first write that finds it gone.
    """
    from diagnostics.results import write_result

    if out is not None:
        write_result(result, out)
    if not quiet:
        for note in result.metadata.get("notes", []):
            warn(note)
    print_records(result.records, fmt, result.metadata)


def user_prints_to_stderr() -> AbstractContextManager[Any]:
    """While the analysis runs, ``print`` in the user's code (a model's forward, a data generator) goes to
    stderr: stdout carries the records only (``diag run -f json | jq``)."""
    return redirect_stdout(sys.stderr)


@contextmanager
def progress_bar(quiet: bool = False) -> Iterator[ProgressFn | None]:
    """A progress bar on stderr (only on a terminal); yields the ``progress(task, done, total)`` callback."""
    if quiet or not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    tasks: dict[str, Any] = {}

    def update(task: str, done: int, total: int) -> None:
        if task not in tasks:
            tasks[task] = bar.add_task(task, total=total)
        bar.update(tasks[task], completed=done, total=max(total, done))

    with bar:
        yield update
