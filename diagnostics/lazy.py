"""Deferred imports, so that declarations (and ``diag --help``) never load the numerical stack.

``torch = lazy_import("torch")`` at the top of an analyzer module binds a stand-in that imports torch on
its first attribute access (``torch.zeros``); until then ``torch`` is not in ``sys.modules``. Annotations
stay strings (``from __future__ import annotations``), so they never touch it.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any


class LazyModule:
    """A module imported on first attribute access; each attribute is cached after its first lookup."""

    def __init__(self, name: str) -> None:
        object.__setattr__(self, "_lazy_name", name)

    def _lazy_module(self) -> ModuleType:
        return importlib.import_module(object.__getattribute__(self, "_lazy_name"))

    def __getattr__(self, attr: str) -> Any:
        value = getattr(self._lazy_module(), attr)
        object.__setattr__(self, attr, value)
        return value

    def __repr__(self) -> str:
        return f"<lazy module {object.__getattribute__(self, '_lazy_name')!r}>"


def lazy_import(name: str) -> Any:
    """A stand-in for ``import name`` that imports on first use (see module docstring)."""
    return LazyModule(name)
