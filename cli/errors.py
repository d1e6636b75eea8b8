"""Errors and messages on stderr: every failure becomes one line and an exit code (DESIGN: 2 bad input,
1 a gate failed, 130 interrupted, 141 the reader of stdout went away), never a traceback unless ``--debug``
(or ``DIAG_DEBUG=1``)."""

from __future__ import annotations

import errno
import functools
import os
import re
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


# what the parser's value checks say, in diag's words: the pydantic error type's prefix -> the kind of value
_VALUE_KINDS = {"int": "a valid integer", "float": "a valid number", "bool": "a boolean (true or false)"}


def _bad_value(exc: Any) -> str | None:
    """``'nan' is not a valid integer`` for a value that Typer's pydantic check refused (the message it
    gives, "Input should be a valid integer, ...", does not name the value); None for anything else."""
    errors = getattr(exc.__cause__, "errors", None)
    try:
        first = errors()[0] if callable(errors) else None
        value, kind, msg = first["input"], str(first["type"]), str(first["msg"])
    except Exception:  # not a pydantic error, or one of another shape: keep the parser's own message
        return None
    what = _VALUE_KINDS.get(kind.split("_", 1)[0])
    return f"{value!r} is not {what}" if what else f"{value!r}: {msg[:1].lower()}{msg[1:]}"


def usage_message(exc: Any, command_path: str) -> str:
    """The one line (after ``diag: error: ``) for a usage error of the command-line parser (a click
    ``UsageError``): its problem in diag's style - lower case, no full stop, a suggestion in parentheses -
    and, as the fix, the help of ``command_path`` (``diag hessian``)."""
    text = exc.format_message()
    value = _bad_value(exc) if isinstance(exc, typer.BadParameter) else None
    if value is not None and exc.message and text.endswith(exc.message):
        text = text[: -len(exc.message)] + value
    possibilities = sorted(getattr(exc, "possibilities", None) or ())
    if possibilities and text.endswith(")"):  # NoSuchOption: "No such option: --sed (Possible options: --seed)"
        text = exc.message + (
            f" (did you mean {possibilities[0]}?)"
            if len(possibilities) == 1
            else f" (did you mean one of {', '.join(possibilities)}?)"
        )
    text = " ".join(text.split())
    text = re.sub(r"\.? Did you mean (.+?)\??$", r" (did you mean \1?)", text)  # no such command 'x'. Did ...
    text = text.rstrip(".")
    if text[:2].istitle():  # "Invalid value" -> "invalid value", but not "CHECKPOINT ..."
        text = text[0].lower() + text[1:]
    return f"{text}; see '{command_path} --help'"


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
