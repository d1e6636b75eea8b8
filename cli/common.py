"""Shared CLI plumbing: binding options, error handling, output, progress. No numerics here."""

from __future__ import annotations

import functools
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from diagnostics.binding import find_config, load_config, resolve_binding
from diagnostics.checkpoint import Checkpoint, load_checkpoint
from diagnostics.context import Context, build_context
from diagnostics.errors import DiagnosticsError, GateFailed
from diagnostics.progress import ProgressFn
from diagnostics.results import (
    Result,
    format_markdown,
    format_table,
    records_to_frame,
    records_to_json,
    write_result,
)

F = TypeVar("F", bound=Callable[..., Any])
FORMATS = ("table", "json", "csv", "md")

# ------------------------------------------------------------------------------ option types
CheckpointArg = Annotated[
    Path, typer.Argument(help="checkpoint file (.pt, .pth, .ckpt, .safetensors)", show_default=False)
]
ModelOpt = Annotated[
    str | None,
    typer.Option("--model", help="model factory 'pkg.module:build' or 'file.py:build'", rich_help_panel="Binding"),
]
DataOpt = Annotated[
    str | None,
    typer.Option(
        "--data",
        help="data callable returning (inputs, targets) or an iterable of batches",
        rich_help_panel="Binding",
    ),
]
LossOpt = Annotated[
    str | None,
    typer.Option(
        "--loss",
        help="cross_entropy | mse | nll | bce_with_logits | 'pkg.module:fn'",
        rich_help_panel="Binding",
    ),
]
ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", help="project file (default: ./diag.toml if present)", rich_help_panel="Binding"),
]
TrustOpt = Annotated[
    bool,
    typer.Option(
        "--trust-checkpoint-factories",
        help="import factory names stored in the checkpoint even if not listed in diag.toml",
        rich_help_panel="Binding",
    ),
]
SeedOpt = Annotated[
    int | None, typer.Option("--seed", help="seed of every random draw (default 0)", rich_help_panel="Data")
]
SamplesOpt = Annotated[
    int | None,
    typer.Option("--samples", help="analyse a seeded random subset of this many samples", rich_help_panel="Data"),
]
BatchSizeOpt = Annotated[
    int | None,
    typer.Option(
        "--batch-size",
        help="re-batch the data (default: as given; one batch for tensors)",
        rich_help_panel="Data",
    ),
]
DtypeOpt = Annotated[str | None, typer.Option("--dtype", help="float32 (default) or float64", rich_help_panel="Data")]
DeviceOpt = Annotated[
    str | None,
    typer.Option("--device", help="auto (CUDA when present), cpu, cuda, cuda:N", rich_help_panel="Data"),
]
ParamsOpt = Annotated[
    str | None,
    typer.Option("--params", help="regex: analyse only parameters whose name matches", rich_help_panel="Data"),
]
FormatOpt = Annotated[
    str,
    typer.Option("--format", "-f", help="stdout format: table | json | csv | md", rich_help_panel="Output"),
]
OutOpt = Annotated[
    Path | None,
    typer.Option("--out", "-o", help="also write results to FILE (.json .csv .parquet .md)", rich_help_panel="Output"),
]
ForceOpt = Annotated[bool, typer.Option("--force", help="overwrite existing output files", rich_help_panel="Output")]
QuietOpt = Annotated[
    bool,
    typer.Option("--quiet", "-q", help="no progress bar or warnings on stderr", rich_help_panel="Output"),
]
DebugOpt = Annotated[bool, typer.Option("--debug", help="show tracebacks", rich_help_panel="Output")]


def err(message: str) -> None:
    typer.echo(f"diag: error: {message}", err=True)


def warn(message: str) -> None:
    typer.echo(f"diag: warning: {message}", err=True)


def handle_errors(fn: F) -> F:
    """Turn library errors into one stderr line and an exit code (2 bad input, 1 gate failed)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = bool(kwargs.get("debug")) or os.environ.get("DIAG_DEBUG") == "1"
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except GateFailed as exc:
            if str(exc):
                typer.echo(f"diag: {exc}", err=True)
            raise typer.Exit(1) from None
        except DiagnosticsError as exc:
            if debug:
                traceback.print_exc(file=sys.stderr)
            err(str(exc))
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err("interrupted")
            raise typer.Exit(130) from None
        except MemoryError:
            err("out of memory: use --samples, --batch-size or --params to analyse less at once")
            raise typer.Exit(2) from None
        except Exception as exc:
            if debug:
                traceback.print_exc(file=sys.stderr)
            msg = " ".join(str(exc).split())[:300]
            err(f"unexpected {type(exc).__name__}: {msg} (rerun with --debug for the traceback)")
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


# ------------------------------------------------------------------------------------- binding
def project_config(config: Path | None) -> dict[str, Any]:
    return load_config(find_config(config))


def pick(flag: Any, cfg: dict[str, Any], key: str, default: Any = None) -> Any:
    """Flag if given, else the diag.toml value, else ``default``."""
    if flag is not None:
        return flag
    return cfg.get(key, default)


def load_context(
    path: Path,
    *,
    model: str | None,
    data: str | None,
    loss: str | None,
    config: Path | None,
    trust: bool,
    seed: int | None,
    samples: int | None,
    batch_size: int | None,
    dtype: str | None,
    device: str | None,
    params: str | None = None,
    need_targets: bool = True,
    check: bool = True,
) -> tuple[Checkpoint, Context]:
    """Checkpoint file + flags (+ diag.toml) -> (Checkpoint, Context)."""
    cfg = project_config(config)
    ck = load_checkpoint(path)
    binding = resolve_binding(ck.factories, model=model, data=data, loss=loss, config=cfg, trust_checkpoint=trust)
    ctx = build_context(
        ck,
        binding,
        device=pick(device, cfg, "device"),
        dtype=pick(dtype, cfg, "dtype"),
        seed=int(pick(seed, cfg, "seed", 0)),
        samples=pick(samples, cfg, "samples"),
        batch_size_=pick(batch_size, cfg, "batch_size"),
        params=pick(params, cfg, "params"),
        need_targets=need_targets,
        check=check,
    )
    return ck, ctx


def analyzer_defaults(config: Path | None, section: str) -> dict[str, Any]:
    """The ``[section]`` table of diag.toml (defaults for one analyzer's options)."""
    return dict(project_config(config).get(section) or {})


# -------------------------------------------------------------------------------------- output
def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise DiagnosticsError(f"unknown --format '{fmt}'; use one of {', '.join(FORMATS)}")


def emit(result: Result, fmt: str, out: Path | None, quiet: bool = False) -> None:
    """Print results to stdout in ``fmt``, write ``--out``, and warnings (notes) to stderr."""
    if not quiet:
        for note in result.metadata.get("notes", []):
            warn(note)
    if fmt == "json":
        typer.echo(records_to_json(result.records))
    elif fmt == "csv":
        typer.echo(records_to_frame(result.records).to_csv(index=False), nl=False)
    elif fmt == "md":
        typer.echo(format_markdown(result.records), nl=False)
    else:
        typer.echo(format_table(result.records, result.metadata), nl=False)
    if out is not None:
        write_result(result, out)


# ------------------------------------------------------------------------------------ progress
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
