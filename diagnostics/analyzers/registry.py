"""Discover analyzers: every module in ``diagnostics.analyzers`` declares ``ANALYZER`` (an
:class:`~diagnostics.spec.Analyzer`), or ``ANALYZERS`` (a tuple of them) when it holds several.

The CLI, sweeps (``diag run``), the gate, the report and the README metric table look analyzers up here, so
adding an analyzer means writing one module and nothing else. Importing an analyzer module must not import
the numerical stack (torch, pandas, scipy, matplotlib): its heavy imports live inside its functions, so
``diag --help`` stays fast (a test checks every module).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, fields
from functools import cache
from typing import Any

from diagnostics.errors import DiagnosticsError
from diagnostics.spec import Analyzer, did_you_mean

_NOT_ANALYZERS = frozenset({"registry"})


@dataclass(frozen=True)
class AnalyzerSpec:
    """Transitional: the pre-declaration form (name, config class, run); being replaced by :class:`Analyzer`."""

    name: str
    config_cls: type
    run: Callable[..., Any]
    needs_targets: bool = True
    summary: str = ""

    def make_config(self, options: dict[str, Any] | None = None) -> Any:
        """Config from a dict; unknown keys are an error that lists the known ones."""
        options = dict(options or {})
        known = {f.name for f in fields(self.config_cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise DiagnosticsError(
                f"unknown option(s) {unknown} for analyzer '{self.name}'; known: {', '.join(sorted(known))}"
            )
        cfg = self.config_cls(**options)
        if hasattr(cfg, "validate"):
            cfg.validate()
        return cfg


def analyzer_modules() -> list[str]:
    """Names of the modules of ``diagnostics.analyzers`` that may declare analyzers."""
    from diagnostics import analyzers

    infos = sorted(pkgutil.iter_modules(analyzers.__path__), key=lambda m: m.name)
    return [i.name for i in infos if i.name not in _NOT_ANALYZERS and not i.name.startswith("_")]


def declared_in(module_name: str) -> list[Analyzer]:
    """The analyzers one module declares (``ANALYZER`` and/or ``ANALYZERS``)."""
    module = importlib.import_module(f"diagnostics.analyzers.{module_name}")
    found = getattr(module, "ANALYZERS", ()) or ()
    found = list(found.values()) if isinstance(found, dict) else list(found)
    single = getattr(module, "ANALYZER", None)
    if isinstance(single, Analyzer):
        found.insert(0, single)
    return [a for a in found if isinstance(a, (Analyzer, AnalyzerSpec))]


@cache
def _all() -> tuple[Any, ...]:
    out: list[Any] = []
    for name in analyzer_modules():
        out += declared_in(name)
    return tuple(sorted(out, key=lambda a: (getattr(a, "order", 50), a.name)))


def all_analyzers() -> dict[str, Analyzer]:
    """Every registered analyzer, by name, in module order."""
    return {a.name: a for a in _all()}


def get_analyzer(name: str) -> Analyzer:
    """One analyzer by name.

    Raises:
        DiagnosticsError: unknown name (with the closest known one).
    """
    specs = all_analyzers()
    if name not in specs:
        raise DiagnosticsError(
            f"unknown analyzer '{name}'{did_you_mean(name, list(specs))}; available: {', '.join(sorted(specs))}"
        )
    return specs[name]
