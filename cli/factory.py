"""Typer commands generated from declarations: an analyzer's command is written nowhere by hand.

:func:`typer_parameters` turns the options of a config dataclass (see :mod:`diagnostics.spec`) into Typer
parameters - flag ``--NAME`` from field ``NAME``, help with the default appended, the declared panel - all
with default None, so "not given" is known and ``diag.toml`` can fill it. :func:`analyzer_command` builds
``diag NAME CHECKPOINT... [binding options] [analyzer options] [output files] [output options]`` for one
:class:`~diagnostics.spec.Analyzer`; the body is the same for every analyzer (:func:`run_command`).

Nothing here imports torch: ``diag --help`` and ``diag NAME --help`` are built from declarations only.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any

import typer

from diagnostics.spec import PANEL_OUTPUT, Analyzer, FileOutput, Param, params_of

_METAVARS = {int: "INT", float: "FLOAT", str: "TEXT", Path: "PATH", list: "TEXT"}


def help_text(p: Param) -> str:
    """The ``--help`` line of an option: its help, the choices or range, and the default."""
    text = p.info.help
    if p.kind is list:
        text += " (repeatable, or comma-separated)" if p.info.separator == "," else " (repeatable)"
    default = p.default_text()
    if default and p.kind is not bool:
        text += f" (default {default})"
    elif p.kind is bool and p.default:
        text += " (default on)"
    return text


def typer_parameter(p: Param) -> inspect.Parameter:
    """One Typer option for ``p``, defaulting to None (= not given on the command line)."""
    if p.kind is bool:
        # an option diag.toml can switch on needs a way to switch it off again on the command line
        decls = [f"{p.flag}/--no-{p.flag[2:]}" if p.info.toml else p.flag]
        annotation: Any = bool | None
    else:
        decls = [p.flag]
        annotation = list[str] | None if p.kind is list else p.kind | None
    decls += list(p.info.aliases)
    if p.info.short:
        decls.append(p.info.short)
    metavar = p.info.metavar or ("|".join(p.info.choices) if p.info.choices else _METAVARS.get(p.kind))
    opt = typer.Option(
        *decls,
        help=help_text(p),
        rich_help_panel=p.info.panel,
        show_default=False,
        metavar=None if p.kind is bool else metavar,
    )
    return inspect.Parameter(
        p.name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[annotation, opt]
    )


def file_parameter(fo: FileOutput) -> inspect.Parameter:
    """The Typer option of an extra output file (``--density-out PREFIX``)."""
    opt = typer.Option(
        "--" + fo.name.replace("_", "-"), help=fo.help, rich_help_panel=PANEL_OUTPUT, show_default=False, metavar="PATH"
    )
    return inspect.Parameter(
        fo.name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[Path | None, opt]
    )


def options_of(*config_classes: type) -> list[Param]:
    """The user-facing options (with a flag) of several config classes, in order."""
    return [p for cls in config_classes for p in params_of(cls) if p.info.cli]


def make_command(
    name: str,
    body: Callable[[dict[str, Any]], None],
    parameters: Iterable[inspect.Parameter],
    doc: str,
) -> Callable[..., None]:
    """A function Typer can register whose signature is ``parameters`` and which calls ``body(values)``."""
    params = list(parameters)

    def command(**values: Any) -> None:
        body(values)

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__name__ = name.replace("-", "_")
    command.__doc__ = doc
    return command


def checkpoint_argument() -> inspect.Parameter:
    """One positional CHECKPOINT argument (commands that are not analyzers, e.g. the gate)."""
    arg = typer.Argument(
        help="checkpoint file (.pt .pth .ckpt .safetensors) or model folder", metavar="CHECKPOINT", show_default=False
    )
    return inspect.Parameter("checkpoint", inspect.Parameter.KEYWORD_ONLY, annotation=Annotated[Path, arg])


def checkpoints_parameter(analyzer: Analyzer) -> inspect.Parameter:
    """The positional checkpoint argument(s) of an analyzer's command."""
    lo, hi = analyzer.checkpoints
    what = "checkpoint file (.pt .pth .ckpt .safetensors) or model folder"
    if hi > 1:
        what = f"{lo} to {hi} checkpoints" if lo != hi else f"{lo} checkpoints"
        what += " (files or model folders)"
    arg = typer.Argument(help=what, metavar="CHECKPOINT..." if hi > 1 else "CHECKPOINT", show_default=False)
    annotation = Annotated[list[Path], arg] if hi > 1 else Annotated[Path, arg]
    return inspect.Parameter("checkpoints", inspect.Parameter.KEYWORD_ONLY, annotation=annotation)


def analyzer_parameters(analyzer: Analyzer) -> list[inspect.Parameter]:
    """Every parameter of an analyzer's command, in the order of ``--help``."""
    from diagnostics.options import BindingOptions, OutputOptions, ProjectOptions

    binding = [p for p in options_of(BindingOptions) if analyzer.uses_loss or p.name != "loss"]
    params = [checkpoints_parameter(analyzer)]
    params += [typer_parameter(p) for p in [*binding, *options_of(ProjectOptions)]]
    params += [typer_parameter(p) for p in options_of(analyzer.config)]
    params += [file_parameter(fo) for fo in analyzer.outputs]
    if analyzer.resumable:
        opt = typer.Option(
            "--cache",
            help="keep finished work here as it is computed and resume from it (default with a FILE "
            "output: FILE.partial.json, removed when done)",
            rich_help_panel=PANEL_OUTPUT,
            show_default=False,
            metavar="PATH",
        )
        params.append(
            inspect.Parameter(
                "cache", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[Path | None, opt]
            )
        )
    params += [typer_parameter(p) for p in options_of(OutputOptions)]
    return params


def analyzer_command(analyzer: Analyzer) -> Callable[..., None]:
    """The ``diag NAME`` command of an analyzer."""

    def body(values: dict[str, Any]) -> None:
        from diag_cli.run_command import run_command

        run_command(analyzer, values)

    return make_command(analyzer.name, body, analyzer_parameters(analyzer), analyzer.help_text)


def split_values(values: Mapping[str, Any], config_cls: type) -> dict[str, Any]:
    """The values of ``config_cls``'s options among a command's parameter values."""
    names = {p.name for p in params_of(config_cls)}
    return {k: v for k, v in values.items() if k in names}


def register_analyzers(app: typer.Typer, analyzers: Iterable[Analyzer]) -> None:
    """Add one command per analyzer to ``app``."""
    for analyzer in analyzers:
        app.command(analyzer.name, help=analyzer.help_text, short_help=analyzer.summary)(analyzer_command(analyzer))
