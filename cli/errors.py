"""Errors and messages on stderr: every failure becomes one line and an exit code (DESIGN: 2 bad input,
1 a gate failed, 130 interrupted), never a traceback unless ``--debug`` (or ``DIAG_DEBUG=1``)."""

from __future__ import annotations

import functools
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import typer

from diagnostics.errors import DiagnosticsError, GateFailed

F = TypeVar("F", bound=Callable[..., Any])


def err(message: str) -> None:
    """``diag: error: MESSAGE`` on stderr."""
    typer.echo(f"diag: error: {message}", err=True)


def warn(message: str) -> None:
    """``diag: warning: MESSAGE`` on stderr."""
    typer.echo(f"diag: warning: {message}", err=True)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]


@contextmanager
def cli_errors(debug: bool = False) -> Iterator[None]:
    """Turn any exception raised inside into one stderr line and ``typer.Exit`` with the right code."""
    debug = debug or os.environ.get("DIAG_DEBUG") == "1"
    try:
        yield
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
        err(f"unexpected {type(exc).__name__}: {_one_line(exc)} (rerun with --debug for the traceback)")
        raise typer.Exit(2) from None


def handle_errors(fn: F) -> F:
    """Decorator form of :func:`cli_errors` for hand-written commands (reads their ``debug`` argument)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with cli_errors(bool(kwargs.get("debug"))):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
