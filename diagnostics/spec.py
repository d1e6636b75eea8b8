"""Analyzer declarations: the one place an analyzer's options, metrics, files and report sections are written.

An analyzer module declares, once:

* its **config dataclass**, whose fields carry :func:`option` metadata (help, panel, choices, bounds).
  The field name is the option's only name: field ``trace_samples`` = flag ``--trace-samples`` = key
  ``trace_samples`` in the ``[hessian]`` table of ``diag.toml`` = ``diag run --set hessian.trace_samples=N``;
* the **metrics** it emits (:class:`Metric`: name, definition, unit, direction, headline);
* the **files** its command can write besides the records (:class:`FileOutput`, e.g. ``--density-out``);
* its **report sections** (:class:`Section`: metrics against the step, threshold lines, custom figures);
* an :class:`Analyzer` bundling them with the function ``run(config, ctx, progress) -> Result``.

The CLI command, the ``diag.toml`` table, ``diag run --set`` and ``--list``, the README metric table and
the report sections are all generated from these declarations (:mod:`diagnostics.analyzers.registry`
finds them). This module imports nothing heavy (no torch, pandas, matplotlib, scipy): the CLI builds
``--help`` from it without loading the numerical stack.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any

from diagnostics.errors import DiagnosticsError

OPTION_KEY = "diag_option"
PANEL_ANALYSIS = "Analysis"
PANEL_BINDING = "Binding"
PANEL_DATA = "Data"
PANEL_SCALE = "Scale"
PANEL_OUTPUT = "Output"


# ------------------------------------------------------------------------------------------ options
@dataclass(frozen=True)
class Option:
    """How a config field appears to users.

    Attributes:
        help: one line for ``--help`` (the default is appended automatically).
        panel: the ``--help`` panel.
        short: a one-letter alias such as ``-k``.
        aliases: further flags accepted for the option (e.g. the singular ``--layer`` of ``--layers``, handy
            when the flag is repeated); declared here, so they cannot drift.
        separator: a list option's values are also split on this (None: each value is one item).
        choices: the allowed values of a string option.
        min, max: bounds of a number (inclusive unless ``min_open``/``max_open``).
        metavar: the placeholder shown in ``--help``.
        cli: whether the command has a flag for it (False: ``diag.toml``/``--set`` only).
        toml: whether ``diag.toml`` and ``--set`` may set it.
    """

    help: str
    panel: str = PANEL_ANALYSIS
    short: str | None = None
    aliases: tuple[str, ...] = ()
    separator: str | None = ","
    choices: tuple[str, ...] | None = None
    min: float | None = None
    max: float | None = None
    min_open: bool = False
    max_open: bool = False
    metavar: str | None = None
    cli: bool = True
    toml: bool = True


def option(default: Any = MISSING, *, help: str, default_factory: Any = MISSING, **info: Any) -> Any:
    """A dataclass field that is also a user-facing option (see :class:`Option` for ``info``).

    Args:
        default: the default value.
        help: one line for ``--help``.
        default_factory: for mutable defaults (lists).
        **info: further :class:`Option` attributes (``panel``, ``short``, ``choices``, ``min``, ...).

    Returns:
        A :func:`dataclasses.field` carrying the :class:`Option` in its metadata.
    """
    for key in ("choices", "aliases"):
        if info.get(key) is not None:
            info[key] = tuple(info[key])
    meta = {OPTION_KEY: Option(help=help, **info)}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


_SCALARS = (bool, int, float, str, Path)


def _to_list(value: Any, separator: str | None) -> list[str]:
    """A string or list of strings -> stripped items, each split at ``separator``."""
    items = [value] if isinstance(value, str) else list(value)
    if not all(isinstance(v, str) for v in items):
        raise TypeError
    return [s.strip() for v in items for s in (v.split(separator) if separator else [v]) if s.strip()]


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise TypeError


def _to_int(value: Any) -> int:
    """Whole numbers only: ``3``, ``3.0``, ``"3"``; never a bool or ``3.5``."""
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise TypeError
    if isinstance(value, str):
        return int(value.strip())
    if isinstance(value, float):
        return int(value)
    if not isinstance(value, int):
        raise TypeError
    return value


def _to_float(value: Any) -> float:
    """A finite float (never a bool)."""
    if isinstance(value, bool):
        raise TypeError
    out = float(value)
    if not math.isfinite(out):
        raise ValueError
    return out


def _to_str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError
    return value


_CONVERTERS: dict[Any, Callable[[Any], Any]] = {bool: _to_bool, int: _to_int, float: _to_float, Path: Path}


@dataclass(frozen=True)
class Param:
    """One option of a config class, resolved from its field.

    Attributes:
        name: the field name (also the ``diag.toml`` key).
        kind: ``bool``, ``int``, ``float``, ``str``, ``Path`` or ``list`` (a list of strings).
        optional: whether None is allowed.
        default: the default value (a fresh copy for lists).
        info: the :class:`Option`.
    """

    name: str
    kind: type
    optional: bool
    default: Any
    info: Option

    @property
    def flag(self) -> str:
        """The command-line flag, ``--`` + the name with dashes."""
        return "--" + self.name.replace("_", "-")

    @property
    def type_name(self) -> str:
        """The type as a user reads it (for error messages)."""
        names = {bool: "true/false", int: "an integer", float: "a finite number", str: "a string", Path: "a path"}
        return "a list of strings" if self.kind is list else names[self.kind]

    def coerce(self, value: Any, where: str) -> Any:
        """``value`` (from a flag, ``diag.toml`` or ``--set``) as this option's type, or a one-line error.

        Args:
            value: the raw value.
            where: how the user gave it, for the message (``"--top-k"``, ``"[hessian] top_k"``).

        Returns:
            The value converted to :attr:`kind` (None stays None when optional).

        Raises:
            DiagnosticsError: the wrong type, naming the option and the expected type.
        """
        if value is None:
            if self.optional:
                return None
            raise DiagnosticsError(f"{where} needs {self.type_name}, not nothing")
        try:
            out = self._convert(value)
        except (TypeError, ValueError):
            raise DiagnosticsError(
                f"{where} must be {self.type_name}, got {_shown(value)}{self.default_hint()}"
            ) from None
        self.check(out, where)
        return out

    def default_hint(self) -> str:
        """The fix clause of a range or type error: ``; drop it to use the default, 0.001`` (empty without a
        default, e.g. for an optional option that is off unless given)."""
        text = self.default_text()
        if not text or isinstance(self.default, bool):
            return ""
        return f"; drop it to use the default, {text}"

    def _convert(self, value: Any) -> Any:
        if self.kind is list:
            return _to_list(value, self.info.separator)
        return _CONVERTERS.get(self.kind, _to_str)(value)

    def check(self, value: Any, where: str) -> None:
        """Raise a one-line error when ``value`` is outside the declared choices or bounds."""
        info = self.info
        if value is None:
            return
        if info.choices is not None:
            values = value if isinstance(value, list) else [value]
            for v in values:
                if v not in info.choices:
                    raise DiagnosticsError(
                        f"{where} must be one of {', '.join(info.choices)}, not {v!r}{did_you_mean(str(v), info.choices)}"
                    )
        if self.kind in (int, float):
            low_bad = info.min is not None and (value <= info.min if info.min_open else value < info.min)
            high_bad = info.max is not None and (value >= info.max if info.max_open else value > info.max)
            if low_bad or high_bad:
                raise DiagnosticsError(f"{where} must be {self.range_text()}, got {value}{self.default_hint()}")

    def range_text(self) -> str:
        """The allowed range in words, e.g. ``in (0, 1)`` or ``>= 1``."""
        info = self.info
        if info.min is not None and info.max is not None:
            left, right = ("(" if info.min_open else "["), (")" if info.max_open else "]")
            return f"in {left}{_num(info.min)}, {_num(info.max)}{right}"
        if info.min is not None:
            return f"{'>' if info.min_open else '>='} {_num(info.min)}"
        return f"{'<' if info.max_open else '<='} {_num(info.max)}"

    def default_text(self) -> str:
        """The default as shown in ``--help`` and the README."""
        d = self.default
        if d is None or d == []:
            return ""
        if isinstance(d, bool):
            return "on" if d else "off"
        return _num(d) if isinstance(d, float) else str(d)


def _shown(value: Any, width: int = 60) -> str:
    """``repr(value)``, shortened to ``width`` characters with ``...``."""
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _num(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _unwrap(tp: Any) -> tuple[type, bool]:
    """A field annotation -> (kind, optional); only the option types of :class:`Param` are allowed."""
    optional = False
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        if len(args) != 1:
            raise TypeError(f"unsupported option type {tp}")
        tp, origin = args[0], typing.get_origin(args[0])
    if origin in (list, Sequence, tuple):
        return list, optional
    if tp in _SCALARS:
        return tp, optional
    raise TypeError(f"unsupported option type {tp}")


def params_of(config_cls: type) -> list[Param]:
    """The options of a config dataclass: every field with :func:`option` metadata, in field order.

    Args:
        config_cls: a dataclass whose option fields use :func:`option`.

    Returns:
        One :class:`Param` per option field.
    """
    hints = typing.get_type_hints(config_cls)
    out = []
    for f in dataclasses.fields(config_cls):
        info = f.metadata.get(OPTION_KEY)
        if info is None:
            continue
        kind, optional = _unwrap(hints[f.name])
        if f.default is not MISSING:
            default = f.default
        elif f.default_factory is not MISSING:
            default = f.default_factory()
        else:
            default, optional = None, True
        out.append(Param(f.name, kind, optional or default is None, default, info))
    return out


def did_you_mean(word: str, candidates: Sequence[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest candidate, or an empty string."""
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def check_keys(table: Mapping[str, Any], known: Sequence[str], where: str) -> None:
    """Refuse keys of a ``diag.toml`` table (or ``--set``) that name no option.

    Raises:
        DiagnosticsError: naming the first unknown key, the closest known one and where it was found.
    """
    for key in table:
        if key not in known:
            raise DiagnosticsError(
                f"unknown option '{key}' in {where}{did_you_mean(key, known)} (known: {', '.join(sorted(known))})"
            )


def resolve_config(
    config_cls: type,
    *,
    flags: Mapping[str, Any] | None = None,
    table: Mapping[str, Any] | None = None,
    table_name: str = "",
    fixed: Mapping[str, Any] | None = None,
    source: str = "",
) -> Any:
    """Build a config: a flag given on the command line wins over ``diag.toml``, which wins over the default.

    Args:
        config_cls: the config dataclass.
        flags: option values from the command line; None means "not given".
        table: the analyzer's ``diag.toml`` table merged with ``--set`` values.
        table_name: the table's name for messages (``hessian``).
        fixed: values set by the caller after the user's (e.g. an output flag that implies an option).
        source: where the table came from, named in errors about its values (``[hessian] in diag.toml``).

    Returns:
        The config instance, validated (declared bounds/choices, then its own ``validate()``).

    Raises:
        DiagnosticsError: an unknown key, a wrong type, or a value out of range.
    """
    params = params_of(config_cls)
    by_name = {p.name: p for p in params}
    table = dict(table or {})
    where = source or (f"[{table_name}]" if table_name else "the table")
    check_keys(table, [p.name for p in params if p.info.toml], where)
    suffix = f" (from {source})" if source else ""
    values: dict[str, Any] = {}
    for p in params:
        given = (flags or {}).get(p.name)
        if given is not None:
            values[p.name] = p.coerce(given, p.flag)
        elif p.name in table:
            try:
                values[p.name] = p.coerce(table[p.name], f"{table_name}.{p.name}" if table_name else p.name)
            except DiagnosticsError as exc:
                raise DiagnosticsError(f"{exc}{suffix}") from None
        else:
            values[p.name] = p.default
    for name, value in (fixed or {}).items():
        values[name] = by_name[name].coerce(value, by_name[name].flag) if name in by_name else value
    cfg = config_cls(**values)
    validate = getattr(cfg, "validate", None)
    if callable(validate):
        validate()
    return cfg


def check_config(config: Any, where: str | None = None) -> Any:
    """Check every option of a config instance against its declaration, then its own ``validate()``.

    Analyzer functions call this first, so a config built in Python is held to the same rules as one built
    from flags or ``diag.toml``.

    Args:
        config: the config instance.
        where: name values ``WHERE.option`` in errors (e.g. ``settings`` of a file) instead of by their flag.

    Returns:
        ``config`` itself.

    Raises:
        DiagnosticsError: a value of the wrong type or out of range, naming the flag (or ``where``).
    """
    for p in params_of(type(config)):
        setattr(config, p.name, p.coerce(getattr(config, p.name), f"{where}.{p.name}" if where else p.flag))
    validate = getattr(config, "validate", None)
    if callable(validate):
        validate()
    return config


def config_values(config: Any) -> dict[str, Any]:
    """The option values of a config instance, JSON-ready (paths as strings)."""
    out = {}
    for p in params_of(type(config)):
        v = getattr(config, p.name)
        out[p.name] = str(v) if isinstance(v, Path) else v
    return out


# ------------------------------------------------------------------------------------- declarations
@dataclass(frozen=True)
class Metric:
    """A metric an analyzer emits (one record per value).

    Attributes:
        name: the ``metric`` column.
        definition: one sentence with the formula (README table, report tooltips).
        unit: the unit ("" for dimensionless; "loss" for loss units, ...).
        higher_is_better: True/False when the direction is meaningful, else None.
        headline: shown first in summaries and the report's key table.
        index: what the ``index`` column means for this metric ("" when unused).
        group: what the ``group`` column means for this metric ("" when unused).
        reference: the paper or convention the definition follows.
    """

    name: str
    definition: str
    unit: str = ""
    higher_is_better: bool | None = None
    headline: bool = False
    index: str = ""
    group: str = ""
    reference: str = ""


@dataclass(frozen=True)
class FileOutput:
    """A file (or files, from a prefix) the analyzer's command can write besides the records.

    Attributes:
        name: the option name (``density_out`` -> ``--density-out``).
        help: one line for ``--help``.
        render: ``"module:function"``; ``function(result, config) -> {suffix: bytes}`` draws or formats the
            artifact (only the CLI writes the bytes, to the paths :mod:`diagnostics.outputs` planned).
        suffixes: the suffixes appended to the given path (a prefix); ``("",)`` means the path itself.
            A callable ``suffixes(config) -> tuple`` when they depend on the options.
        require_suffix: a suffix the given path itself must end with (e.g. ``.csv``).
        enables: a boolean config option switched on when this file is asked for.
    """

    name: str
    help: str
    render: str
    suffixes: tuple[str, ...] | Callable[[Any], tuple[str, ...]] = ("",)
    require_suffix: str | None = None
    enables: str | None = None

    def suffix_list(self, config: Any) -> tuple[str, ...]:
        """The suffixes appended to the given path for ``config``."""
        return tuple(self.suffixes(config) if callable(self.suffixes) else self.suffixes)

    def prefix(self, given: Path, config: Any) -> Path:
        """The path the suffixes are appended to: ``given``, less an extension the suffixes already end in
        (``--plot a.png`` writes ``a.png`` and ``a_surface.png``, not ``a.png.png``).

        Raises:
            DiagnosticsError: ``given`` names no file (``''``, ``.``, ``..``).
        """
        suffixes = self.suffix_list(config)
        flag = "--" + self.name.replace("_", "-")
        if given.name in ("", ".", ".."):
            example = "plots/run1" if suffixes != ("",) else f"results/out{self.require_suffix or ''}"
            raise DiagnosticsError(f"{flag} '{given}' names no file; give a file path, e.g. {flag} {example}")
        if suffixes != ("",) and given.suffix and any(s.endswith(given.suffix) for s in suffixes):
            return given.with_name(given.name[: -len(given.suffix)])
        return given

    def paths(self, given: Path, config: Any) -> dict[str, Path]:
        """The files that may be written for ``--NAME given``, by suffix (the renderer's keys); see :meth:`prefix`."""
        base = self.prefix(given, config)
        return {s: base if not s else base.with_name(base.name + s) for s in self.suffix_list(config)}


@dataclass(frozen=True)
class Threshold:
    """A horizontal line in a report figure, drawn from another metric of the same checkpoints.

    Attributes:
        metric: the metric holding the threshold value (e.g. ``eos_threshold``).
        label: how the line is labelled; ``{value}`` is replaced by the value and ``{rule}`` by the
            formula recorded in the run info (``eos.rule``), e.g. ``"{rule} = {value}"``.
    """

    metric: str
    label: str = "{rule} = {value}"


@dataclass(frozen=True)
class Section:
    """A report section: metrics plotted against the training step, with a short explanation.

    Attributes:
        title: the section heading.
        metrics: metrics drawn (one line per index/group; stderr as a band).
        text: one or two sentences saying what to look for.
        thresholds: reference lines, drawn on the panel of the section's first metric.
        figure: ``"module:function"`` drawing the section's figure instead of the line panels (then
            ``metrics`` names what that figure shows, and they get no generic panel).
        log_y: logarithmic value axis.
        max_series: at most this many index/group lines per metric (the most important first).
    """

    title: str
    metrics: tuple[str, ...] = ()
    text: str = ""
    thresholds: tuple[Threshold, ...] = ()
    figure: str | None = None
    log_y: bool = False
    max_series: int = 8


RunFn = Callable[..., Any]


@dataclass(frozen=True)
class Analyzer:
    """Everything about one analyzer; the CLI, sweeps, the gate and the report are generated from it.

    Attributes:
        name: the command and the ``analyzer`` column (``diag NAME``, ``[NAME]`` in diag.toml).
        summary: one line for ``diag --help`` and ``diag run --list``.
        config: the config dataclass (fields declared with :func:`option`).
        run: ``run(config, ctx, progress) -> Result``; with ``checkpoints[1] > 1`` it also takes
            ``others=[Context, ...]``, and with ``resumable`` it takes ``resume=ResumeStore | None``.
        metrics: the metrics it emits (every record's metric must be declared; a test checks it).
        description: the long help of the command (defaults to the run function's first paragraph).
        outputs: the extra files its command can write.
        sections: its report sections.
        needs_targets: whether the data must carry targets.
        needs_data: False for data-free analyses (weight spectra): no data factory is needed or called.
        uses_loss: whether ``--loss`` applies.
        checkpoints: (fewest, most) checkpoints the command takes.
        resumable: the command gets ``--cache PATH``, where partial work is kept until it is done.
        sweep: whether ``diag run`` can run it over a run's checkpoints.
        order: position in ``diag --help``, ``diag run --list``, the README and the report (lower first;
            ties by name).
        sweep_with: which other checkpoint of the run ``diag run`` gives each checkpoint: None (each alone),
            ``"first"`` (the run's first checkpoint by step, e.g. the initial weights) or ``"previous"`` (the
            one before it; the first checkpoint then gets no result), as ``others=[ctx]``. Its content hash
            joins the cache key. Given two run folders, the command pairs their checkpoints by step.
        reference_option: with ``sweep_with``, the name of a path option that receives that checkpoint's path
            when the user left it unset; without it the analyzer gets the checkpoint as ``others=[ctx]``.
        warm_start: in a sweep, ``run`` also takes ``warm=dict``: one scratch dict per analyzer, kept in
            memory across the run's checkpoints (never in records or the cache). The analyzer reads what the
            checkpoint before left there (e.g. eigenvectors to start from) and writes its own; the sweep sets
            ``warm["source"]`` to the label of the checkpoint that wrote it (``"step N"`` or its name).
    """

    name: str
    summary: str
    config: type
    run: RunFn
    metrics: tuple[Metric, ...]
    description: str = ""
    outputs: tuple[FileOutput, ...] = ()
    sections: tuple[Section, ...] = ()
    needs_targets: bool = True
    needs_data: bool = True
    uses_loss: bool = True
    checkpoints: tuple[int, int] = (1, 1)
    resumable: bool = False
    sweep: bool = True
    order: int = 50
    sweep_with: str | None = None
    reference_option: str | None = None
    warm_start: bool = False

    def params(self) -> list[Param]:
        """The config's options."""
        return params_of(self.config)

    def make_config(self, options: Mapping[str, Any] | None = None, flags: Mapping[str, Any] | None = None) -> Any:
        """A config from a ``diag.toml`` table (plus ``--set``) and command-line flags."""
        return resolve_config(self.config, flags=flags, table=options, table_name=self.name)

    def metric(self, name: str) -> Metric | None:
        """The declaration of one metric (None when not declared)."""
        return next((m for m in self.metrics if m.name == name), None)

    @property
    def help_text(self) -> str:
        """The command's long help."""
        return self.description or self.summary


def load_callable(ref: str) -> Callable[..., Any]:
    """Import ``"package.module:function"`` named in a declaration (package code, never user input)."""
    import importlib

    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)
