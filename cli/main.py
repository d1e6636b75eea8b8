"""``diag``: training-dynamics diagnostics from the shell.

Commands live in ``cli/commands/<name>.py``, each with ``register(app)``; they are discovered here.
"""

from __future__ import annotations

import atexit
import importlib
import os
import pkgutil
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import typer
from typer.core import TyperGroup

try:  # recent Typer vendors click (typer._click): its exceptions, not click's, are the ones raised
    from typer._click.exceptions import UsageError
except ImportError:  # pragma: no cover - older Typer on click
    from click.exceptions import UsageError

from diagnostics import __version__

_COMMAND = "diag.command"  # ctx.meta key: the command being run (names it in a usage error without a context)


@contextmanager
def _usage_errors(ctx: Any) -> Iterator[None]:
    """A usage error of the command-line parser inside (click's ``UsageError``: a value of the wrong type, an
    unknown option or command, a missing argument or option value) becomes one ``diag: error`` line pointing
    to the command's help, and exit 2; ``diag`` alone (``NoArgsIsHelpError``) still prints the help."""
    try:
        yield
    except UsageError as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":
            raise
        from diag_cli.errors import err, usage_message

        names: list[str] = []
        where = getattr(exc, "ctx", None)  # the context of the command (or of diag itself) being parsed
        if where is None and ctx is not None and ctx.meta.get(_COMMAND):
            names = [ctx.meta[_COMMAND]]  # the option parser leaves it out: the command resolved last
        while where is not None and where.parent is not None:  # "diag", whatever the program's name
            names.insert(0, where.info_name)
            where = where.parent
        err(usage_message(exc, " ".join(["diag", *names])))
        raise typer.Exit(2) from None


class _DiagGroup(TyperGroup):
    """diag's command group: Typer's own report of a usage error is a "Usage: ... / Error" box of several
    lines; diag's contract is one line on stderr and exit 2 (README "Exit codes"). The errors are caught where
    they are raised (parsing diag's options, resolving the command, parsing and running the command), so the
    console script and ``app`` called directly (``CliRunner``) give the same line."""

    def make_context(self, info_name: str | None, args: list[str], parent: Any = None, **extra: Any) -> Any:
        with _usage_errors(parent):
            return super().make_context(info_name, args, parent=parent, **extra)

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:
        name, command, rest = super().resolve_command(ctx, args)
        ctx.meta[_COMMAND] = name
        return name, command, rest

    def invoke(self, ctx: Any) -> Any:
        with _usage_errors(ctx):
            return super().invoke(ctx)


app = typer.Typer(
    cls=_DiagGroup,
    name="diag",
    help="Training-dynamics diagnostics for PyTorch checkpoints: Hessian spectra, sharpness, rank, "
    "collapse, landscapes, stability, sweeps, reports and a CI gate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"diag {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="print the version"),
) -> None:
    """Training-dynamics diagnostics for PyTorch checkpoints."""


def _register_commands() -> None:
    from diag_cli import commands
    from diag_cli.factory import register_analyzers
    from diagnostics.analyzers.registry import all_analyzers

    generated = all_analyzers()
    register_analyzers(app, generated.values())
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if info.name in generated:
            continue
        module = importlib.import_module(f"diag_cli.commands.{info.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(app)


_register_commands()


def _exit_code(code: object) -> int:
    """The status ``sys.exit(code)`` would give (a message is printed to stderr, status 1)."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def _stdout_file() -> tuple[int, int] | None:
    """What stdout's file descriptor points at (device, inode); None without one."""
    try:
        st = os.fstat(sys.stdout.fileno())
    except (AttributeError, OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def _pipe_status(code: int, stdout: object, stdout_file: tuple[int, int] | None) -> int:
    """:data:`~diag_cli.errors.SIGPIPE_STATUS` when Typer or Rich met a closed stdout themselves
    (``diag --help | true``), else ``code``.

    Both exit 1 then (which in diag means "a gate failed"): Typer after swapping ``sys.stdout`` for a wrapper
    that hides the EPIPE, Rich (printing --help) after pointing the descriptor at the null device.
    """
    from diag_cli.errors import SIGPIPE_STATUS, silence_stdout

    if code != 1 or (sys.stdout is stdout and _stdout_file() == stdout_file):
        return code
    silence_stdout()
    return SIGPIPE_STATUS


def _flush_streams() -> int:
    """Flush stdout and stderr; 120 (Python's own status for it) if stdout was closed under us."""
    status = 0
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (BrokenPipeError, ValueError, OSError):
            status = 120 if stream is sys.stdout else status
    return status


#: glibc ``mallopt`` parameters (``malloc.h``) and the values :func:`tune_allocator` sets
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 << 20  # glibc's own ceiling for its sliding threshold on 64-bit systems
TRIM_THRESHOLD = 256 << 20


def tune_allocator() -> bool:
    """Fix glibc's two malloc thresholds for this process (the console script's, never a library user's).

    By default glibc slides its mmap threshold up to the size of each large block freed and trims the top of
    the heap whenever more than twice that is free. The products of a Lanczos run free and reallocate blocks of
    a few MB every HVP, so the heap is trimmed and faulted back in again and again: ~0.3M minor page faults
    on the 1.13M-parameter benchmark. With the mmap threshold fixed at 32 MiB (glibc's ceiling for the sliding
    one) and the heap trimmed only beyond 256 MiB free, the same run takes ~0.16M faults and ~1 s less, at the
    same peak resident memory once products run over micro-batches (``benchmarks/bench_process.py``, README
    "Memory"). Blocks of 32 MiB and more are still mapped and unmapped on their own.

    Left alone: another C library, and any ``MALLOC_*`` variable, ``glibc.malloc`` tunable or preloaded
    allocator in the environment (the user's choice). Returns whether the thresholds were set.
    """
    env = os.environ
    if any(k.startswith("MALLOC_") for k in env) or "malloc" in env.get("GLIBC_TUNABLES", ""):
        return False
    if "malloc" in env.get("LD_PRELOAD", ""):  # jemalloc, tcmalloc, mimalloc: not glibc's
        return False
    try:
        if not (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc"):
            return False
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
    except (ValueError, OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def main() -> None:
    """The ``diag`` console script: run the command, then leave without tearing the interpreter down.

    Finalising an interpreter that has imported torch (and the user's data libraries) frees every module
    and object one by one: 0.3-0.9 s after the command has finished, measured on the 1.13M-parameter
    benchmark (``benchmarks/bench_process.py``), and nothing the command wrote depends on it. So once the
    command returns, this does what the interpreter's exit does first (waits for threads that are not
    daemons, shuts down thread pools, runs the exit handlers: temporary folders, logging, multiprocessing
    workers), flushes stdout and stderr and ends the process with ``os._exit``. Every file the package
    writes is closed by a ``with`` block before the command returns. Only the console script does this; ``app`` itself (and
    so ``CliRunner`` in the tests) exits the ordinary way, and so does the script under a profiler or tracer
    (``python -m cProfile``, a debugger, coverage), which writes its results at the interpreter's exit.

    First it fixes the C library's malloc thresholds for this process (:func:`tune_allocator`).
    """
    tune_allocator()
    if sys.getprofile() is not None or sys.gettrace() is not None:
        app()  # a profiler, debugger or coverage tool writes its results at the interpreter's exit
        return
    code = 0
    stdout, stdout_file = sys.stdout, _stdout_file()
    try:
        app()
    except SystemExit as stop:
        code = _pipe_status(_exit_code(stop.code), stdout, stdout_file)
    shutdown = getattr(threading, "_shutdown", None)  # joins non-daemon threads, stops thread pools
    if shutdown is not None:
        shutdown()
    atexit._run_exitfuncs()
    broken = _flush_streams()
    os._exit(code or broken)


if __name__ == "__main__":
    main()
