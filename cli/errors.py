"""Errors and messages on stderr: every failure becomes one line and an exit code (DESIGN: 2 bad input,
1 a gate failed, 130 interrupted, 141 the reader of stdout went away), never a traceback unless ``--debug``
(or ``DIAG_DEBUG=1``)."""

from __future__ import annotations

import errno
import functools
import os
import select
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import typer

from diagnostics.errors import DiagnosticsError, GateFailed, one_line

F = TypeVar("F", bound=Callable[..., Any])


def err(message: str) -> None:
    """``diag: error: MESSAGE`` on stderr."""
    typer.echo(f"diag: error: {message}", err=True)


def warn(message: str) -> None:
    """``diag: warning: MESSAGE`` on stderr."""
    typer.echo(f"diag: warning: {message}", err=True)


def _one_line(exc: BaseException) -> str:
    return one_line(exc, 300)


# The status when the reader of stdout went away (``diag ... | head``): 128 + SIGPIPE, what the shell reports
# for cat, seq or git killed by SIGPIPE, so a ``set -o pipefail`` script sees diag like any other tool. Not 0:
# the records did not all arrive (and a gate whose verdict was cut off must not read as passed); not 1
# (Python's own choice in the docs' "Note on SIGPIPE"), which here means "a gate failed". diag exits by
# exception rather than dying of the signal (SIG_DFL), so the exit handlers still run and every file it
# writes is finished first.
SIGPIPE_STATUS = 141


def stdout_reader_gone() -> bool:
    """Whether stdout is a pipe or socket whose reader has gone (writing fails with EPIPE).

    True when it cannot be told (no file descriptor, no ``poll``): the caller has an EPIPE in hand already.
    """
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
    except (AttributeError, OSError, ValueError):
        return True
    return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))


def silence_stdout() -> None:
    """Point stdout's file descriptor at the null device, so that what is still buffered is flushed there at
    exit instead of failing again (the docs' "Note on SIGPIPE"); nothing when stdout has no descriptor."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        return
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (AttributeError, OSError, ValueError):
        pass
    finally:
        os.close(devnull)


def is_closed_stdout(exc: BaseException) -> bool:
    """Whether ``exc`` is a write to stdout after its reader went away (``diag ... | head -1``)."""
    epipe = isinstance(exc, BrokenPipeError) or (isinstance(exc, OSError) and exc.errno == errno.EPIPE)
    return epipe and stdout_reader_gone()


def _bad_input(message: str, debug: bool) -> typer.Exit:
    """Report ``message`` (after the traceback of the exception being handled, with ``--debug``); exit 2."""
    if debug:
        traceback.print_exc(file=sys.stderr)
    err(message)
    return typer.Exit(2)


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
        raise _bad_input(str(exc), debug) from None
    except SystemExit as exc:  # diag itself exits through typer.Exit: this came from the user's code at work
        code = " ".join(repr(exc.code).split())[:80]
        message = f"the model, data or loss code called sys.exit({code}) during the analysis"
        raise _bad_input(
            f"{message}; raise an exception there to report a problem (--debug shows where)", debug
        ) from None
    except KeyboardInterrupt:
        err("interrupted")
        raise typer.Exit(130) from None
    except MemoryError:
        err("out of memory: use --samples, --batch-size or --params to analyse less at once")
        raise typer.Exit(2) from None
    except Exception as exc:
        if is_closed_stdout(exc):  # the reader stopped reading: nothing to say, and stdout cannot say it
            silence_stdout()
            raise typer.Exit(SIGPIPE_STATUS) from None
        message = f"unexpected {type(exc).__name__}: {_one_line(exc)} (rerun with --debug for the traceback)"
        raise _bad_input(message, debug) from None


def handle_errors(fn: F) -> F:
    """Decorator form of :func:`cli_errors` for hand-written commands (reads their ``debug`` argument)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with cli_errors(bool(kwargs.get("debug"))):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
