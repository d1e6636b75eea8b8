"""``diag``: training-dynamics diagnostics from the shell.

Commands live in ``cli/commands/<name>.py``, each with ``register(app)``; they are discovered here.
"""

from __future__ import annotations

import importlib
import pkgutil

import typer

from diagnostics import __version__

app = typer.Typer(
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
    from diagnostics.spec import Analyzer

    generated = {n: a for n, a in all_analyzers().items() if isinstance(a, Analyzer)}
    register_analyzers(app, generated.values())
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if info.name in generated:
            continue
        module = importlib.import_module(f"diag_cli.commands.{info.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(app)


_register_commands()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
