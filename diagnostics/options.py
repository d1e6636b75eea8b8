"""The options every checkpoint command shares, declared once (see :mod:`diagnostics.spec`), and ``diag.toml``.

* :class:`BindingOptions`: how a checkpoint is bound to code and data (``--model``, ``--data``, ``--loss``,
  ``--seed``, ``--samples``, ...). Each is also a top-level key of ``diag.toml``.
* :class:`OutputOptions`: what a command prints and writes (``--format``, ``--out``, ``--force``, ...),
  command-line only.
* :class:`Project`: a parsed ``diag.toml`` whose keys are all checked (an unknown key is an error with a
  did-you-mean, in every command).

Torch-free, like :mod:`diagnostics.spec`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from diagnostics.errors import DiagnosticsError
from diagnostics.spec import (
    PANEL_BINDING,
    PANEL_DATA,
    PANEL_OUTPUT,
    check_keys,
    did_you_mean,
    option,
    params_of,
    resolve_config,
)

CONFIG_NAME = "diag.toml"
FORMATS = ("table", "json", "csv", "md")
DTYPES = ("float32", "float64")


@dataclass
class BindingOptions:
    """Binding and data options of every command that analyses checkpoints (flags = ``diag.toml`` keys)."""

    model: str | None = option(
        None, help="model factory 'pkg.module:build' or 'file.py:build'", panel=PANEL_BINDING, metavar="SPEC"
    )
    data: str | None = option(
        None,
        help="data callable returning (inputs, targets) or an iterable of batches",
        panel=PANEL_BINDING,
        metavar="SPEC",
    )
    loss: str | None = option(
        None,
        help="cross_entropy | mse | nll | bce_with_logits | model (the loss the model returns) | 'pkg.module:fn'",
        panel=PANEL_BINDING,
        metavar="SPEC",
    )
    inputs: str | None = option(
        None,
        help="the batch's model inputs: dict keys (passed as keyword arguments) or tuple positions, e.g. "
        "'input_ids,attention_mask' or '0,1'",
        panel=PANEL_BINDING,
        metavar="KEY[,KEY]",
    )
    targets: str | None = option(
        None,
        help="the batch's targets: a dict key or tuple position (default: 'labels', 'label', 'targets', 'target' or "
        "'y' in a dict, the second item of a tuple)",
        panel=PANEL_BINDING,
        metavar="KEY",
    )
    seed: int = option(0, help="seed of every random draw", panel=PANEL_DATA, min=0)
    samples: int | None = option(
        None, help="analyse a seeded random subset of this many samples", panel=PANEL_DATA, min=1
    )
    batch_size: int | None = option(
        None, help="re-batch the data (default: as given; one batch for tensors)", panel=PANEL_DATA, min=1
    )
    dtype: str = option("float32", help="precision of the analysis", panel=PANEL_DATA, choices=DTYPES)
    device: str | None = option(None, help="auto (CUDA when present), cpu, cuda, cuda:N", panel=PANEL_DATA)
    params: str | None = option(
        None, help="regex: analyse only parameters whose name matches", panel=PANEL_DATA, metavar="REGEX"
    )
    replicates: int = option(
        1,
        help="repeat the analysis on K disjoint seeded subsets of --samples samples each and report the mean "
        "with the standard error across subsets",
        panel=PANEL_DATA,
        min=1,
        metavar="K",
    )


@dataclass
class PrintOptions:
    """What a command prints; command-line only."""

    format: str = option("table", help="stdout format", panel=PANEL_OUTPUT, choices=FORMATS, short="-f", toml=False)
    quiet: bool = option(
        False, help="no progress bar or warnings on stderr", panel=PANEL_OUTPUT, short="-q", toml=False
    )
    debug: bool = option(False, help="show tracebacks", panel=PANEL_OUTPUT, toml=False)


@dataclass
class Overwrite:
    """Whether existing output files may be replaced; command-line only."""

    force: bool = option(False, help="overwrite existing output files", panel=PANEL_OUTPUT, toml=False)


def _out_option(help: str) -> Any:
    """``--out/-o``: where a command writes (command-line only, never a diag.toml key)."""
    return option(None, help=help, panel=PANEL_OUTPUT, short="-o", toml=False)


@dataclass
class OutputOptions(PrintOptions, Overwrite):
    """What a command prints, and the records file it writes; command-line only."""

    out: Path | None = _out_option("also write the records to FILE (.json .csv .parquet .md)")


@dataclass
class FolderOptions(PrintOptions):
    """What a sweep or report prints, and the folder it writes; command-line only."""

    out: Path | None = _out_option("output folder (default: reports/<run name>); its cache/ makes reruns cheap")
    force: bool = option(
        False,
        help="write into a non-empty folder that diag did not create (deletes nothing)",
        panel=PANEL_OUTPUT,
        toml=False,
    )


@dataclass
class SweepOptions:
    """What ``diag run`` and ``diag report`` sweep over a run's checkpoints (``analyzers`` is also a diag.toml key)."""

    analyzers: list[str] | None = option(
        None,
        help="analyzers to run (default: 'analyzers' in diag.toml, else hessian); see 'diag run --list'",
        short="-a",
        metavar="NAME",
        toml=False,
    )
    set: list[str] | None = option(
        None,
        help="an analyzer option ANALYZER.OPTION=VALUE over the [ANALYZER] table of diag.toml (repeatable)",
        metavar="A.OPTION=VALUE",
        separator=None,
        toml=False,
    )
    pattern: str | None = option(
        None, help="glob of checkpoint files inside the run (e.g. 'step_*.pt')", metavar="GLOB", toml=False
    )
    fail_fast: bool = option(
        False, help="stop at the first checkpoint that cannot be analysed (default: go on)", toml=False
    )


@dataclass
class ProjectOptions:
    """Where the project file is and how far checkpoint metadata is trusted; command-line only."""

    config: Path | None = option(
        None, help=f"project file (default: ./{CONFIG_NAME} if present)", panel=PANEL_BINDING, toml=False
    )
    trust_checkpoint_factories: bool = option(
        False,
        help="import factory names stored in the checkpoint even if not listed in diag.toml",
        panel=PANEL_BINDING,
        toml=False,
    )


POOLS = ("mean", "last", "first", "flatten")


# How the ``layers`` option is spelled on the command line, for analyzers that declare it with their own help.
LAYERS_FLAGS: Mapping[str, Any] = MappingProxyType({"short": "-l", "aliases": ("--layer",), "metavar": "MODULE"})


@dataclass
class FeatureOptions:
    """Where features are captured; analyzers reading layer features inherit these two options."""

    layers: list[str] | None = option(
        None,
        help="module names to capture; 'name:input' captures a module's input (default: the input of the last "
        "nn.Linear)",
        **LAYERS_FLAGS,
    )
    pool: str | None = option(
        None,
        help="how [B, T, D] token features and [B, C, ...] feature maps become vectors: mean (over real tokens / "
        "positions), last or first real token, flatten",
        choices=POOLS,
    )


# Top-level keys of diag.toml besides the binding options and the analyzer tables.
EXTRA_KEYS = ("model_kwargs", "data_kwargs", "trusted_factories", "analyzers")


@dataclass
class Project:
    """A parsed ``diag.toml`` (empty when there is none).

    Attributes:
        path: the file, or None.
        top: the top-level keys (binding options, ``model_kwargs``, ``trusted_factories``, ...).
        tables: ``{name: table}`` of the analyzer (and ``[gate]``) tables.
    """

    path: Path | None = None
    top: dict[str, Any] = field(default_factory=dict)
    tables: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def where(self) -> str:
        """The file's name for messages."""
        return str(self.path) if self.path else CONFIG_NAME

    def table(self, name: str) -> dict[str, Any]:
        """The ``[name]`` table (empty when absent)."""
        return dict(self.tables.get(name) or {})

    def binding(self, flags: Mapping[str, Any] | None = None) -> BindingOptions:
        """Binding options: a flag wins over the file, which wins over the default."""
        top = {k: v for k, v in self.top.items() if k in _binding_names()}
        return resolve_config(BindingOptions, flags=flags, table=top, table_name=self.where)

    def as_dict(self) -> dict[str, Any]:
        """The legacy flat dict (top-level keys, tables by name, ``_path``) used by the binding layer."""
        out: dict[str, Any] = {**self.top, **self.tables}
        if self.path is not None:
            out["_path"] = str(self.path)
        return out


def _binding_names() -> list[str]:
    return [p.name for p in params_of(BindingOptions)]


def find_config(explicit: str | Path | None = None, cwd: Path | None = None) -> Path | None:
    """``--config PATH`` if given (it must exist), else ``./diag.toml`` if present.

    Raises:
        DiagnosticsError: an explicit path that is not a file.
    """
    if explicit is not None:
        p = Path(explicit)
        if p.is_dir():
            inside = " (pass --config " + str(p / CONFIG_NAME) + ")" if (p / CONFIG_NAME).is_file() else ""
            raise DiagnosticsError(
                f"config '{p}' is a folder, not a file: --config takes the {CONFIG_NAME} file{inside}"
            )
        if p.exists() and not p.is_file():
            raise DiagnosticsError(f"config '{p}' is not a regular file: --config takes a {CONFIG_NAME} file")
        if not p.is_file():
            raise DiagnosticsError(f"no such config file: '{p}'")
        return p
    p = (cwd or Path.cwd()) / CONFIG_NAME
    return p if p.is_file() else None


def read_toml(path: str | Path) -> dict[str, Any]:
    """The TOML document of ``path`` as a dict.

    Raises:
        DiagnosticsError: the file cannot be read (a folder, no permission), is not UTF-8 text (TOML is
            UTF-8 by definition), or is not valid TOML; the message names the file.
    """
    try:
        import tomllib
    except ModuleNotFoundError:  # pragma: no cover - Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except IsADirectoryError as exc:
        raise DiagnosticsError(f"config '{path}' is a folder, not a file: pass the {CONFIG_NAME} file") from exc
    except OSError as exc:
        raise DiagnosticsError(f"cannot read config '{path}': {exc.strerror or exc}") from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DiagnosticsError(
            f"config '{path}' is not UTF-8 text (byte {data[exc.start]:#04x} at offset {exc.start}); TOML files "
            "are UTF-8: re-save it as UTF-8"
        ) from exc
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise DiagnosticsError(f"config '{path}' is not valid TOML: {exc}") from exc


def unwrap_diag_table(raw: Mapping[str, Any], path: str | Path) -> dict[str, Any]:
    """The options of a parsed ``diag.toml``: the document, or its ``[diag]`` table when that is all it holds.

    Raises:
        DiagnosticsError: ``diag = <not a table>`` as the only key (e.g. ``diag = "x"``).
    """
    if set(raw) != {"diag"}:
        return dict(raw)
    inner = raw["diag"]
    if not isinstance(inner, Mapping):
        raise DiagnosticsError(
            f"'diag' in {path} must be a table of options ([diag] followed by key = value lines), got "
            f"{type(inner).__name__} {inner!r:.40}; or drop it and write the options at the top level"
        )
    return dict(inner)


def parse_project(path: Path | None, tables: Sequence[str], extra_tables: Sequence[str] = ("gate",)) -> Project:
    """Read and check ``diag.toml``: every top-level key and every table must be known.

    Args:
        path: the file (None: no project file).
        tables: names of the analyzer tables allowed (the registered analyzers).
        extra_tables: other tables allowed (``[gate]``).

    Returns:
        The :class:`Project`.

    Raises:
        DiagnosticsError: invalid TOML, an unknown key or table (with a did-you-mean), a table that is
            not a table.
    """
    if path is None:
        return Project()
    raw = unwrap_diag_table(read_toml(path), path)
    known_tables = [*tables, *extra_tables]
    top_keys = [*_binding_names(), *EXTRA_KEYS]
    project = Project(path=Path(path))
    for key, value in raw.items():
        if isinstance(value, dict) and key not in ("model_kwargs", "data_kwargs"):
            if key not in known_tables:
                raise DiagnosticsError(
                    f"unknown table [{key}] in {path}{did_you_mean(key, known_tables)} "
                    f"(tables: {', '.join(sorted(known_tables))})"
                )
            project.tables[key] = dict(value)
        elif key in known_tables:
            raise DiagnosticsError(f"'{key}' in {path} must be a table of options ([{key}])")
        else:
            check_keys({key: value}, top_keys, str(path))
            check_extra_key(key, value, path)
            project.top[key] = value
    return project


def check_extra_key(key: str, value: Any, path: str | Path) -> None:
    """The top-level keys of diag.toml that are not options have the right shape (else a one-line error).

    ``model_kwargs``/``data_kwargs``: tables; ``trusted_factories``, ``analyzers``: a string or a list of
    strings. Binding options are checked by their declarations instead.
    """
    if key in ("model_kwargs", "data_kwargs") and not isinstance(value, Mapping):
        raise DiagnosticsError(
            f"'{key}' in {path} must be a table of keyword arguments ({key} = {{ width = 8 }}), got "
            f"{type(value).__name__} {value!r:.40}"
        )
    if key in ("trusted_factories", "analyzers"):
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
            example = '["pkg.mod:build"]' if key == "trusted_factories" else '["hessian", "sharpness"]'
            raise DiagnosticsError(
                f"'{key}' in {path} must be a list of strings ({key} = {example}), got {value!r:.60}"
            )
