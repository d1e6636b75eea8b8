"""Transitional: the hand-written option types of the pre-declaration commands (only ``diag rashomon`` still
uses them); errors live in :mod:`diag_cli.errors`, printing in :mod:`diag_cli.output`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from diagnostics.binding import find_config, load_config, resolve_binding
from diagnostics.checkpoint import Checkpoint, load_checkpoint
from diagnostics.context import Context, build_context
from diagnostics.errors import DiagnosticsError

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


from diag_cli.errors import err, handle_errors, warn  # noqa: E402
from diag_cli.output import emit, progress_bar  # noqa: E402

__all__ = ["emit", "err", "handle_errors", "progress_bar", "warn"]
