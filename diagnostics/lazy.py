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


class LazyAttr:
    """A name imported from a module on first use: calls, attribute access, iteration, membership and
    ``isinstance`` checks are forwarded to the real object."""

    def __init__(self, module: str, name: str) -> None:
        object.__setattr__(self, "_lazy_ref", (module, name))
        object.__setattr__(self, "_lazy_obj", _UNSET)

    def _lazy_target(self) -> Any:
        obj = object.__getattribute__(self, "_lazy_obj")
        if obj is _UNSET:
            module, name = object.__getattribute__(self, "_lazy_ref")
            obj = getattr(importlib.import_module(module), name)
            object.__setattr__(self, "_lazy_obj", obj)
        return obj

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._lazy_target()(*args, **kwargs)

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._lazy_target(), attr)

    def __iter__(self) -> Any:
        return iter(self._lazy_target())

    def __contains__(self, item: Any) -> bool:
        return item in self._lazy_target()

    def __len__(self) -> int:
        return len(self._lazy_target())

    def __getitem__(self, key: Any) -> Any:
        return self._lazy_target()[key]

    def __instancecheck__(self, obj: Any) -> bool:
        return isinstance(obj, self._lazy_target())

    def __subclasscheck__(self, cls: Any) -> bool:
        return issubclass(cls, self._lazy_target())

    def __repr__(self) -> str:
        module, name = object.__getattribute__(self, "_lazy_ref")
        return f"<lazy {module}.{name}>"


_UNSET = object()


def lazy_from(module: str, *names: str) -> Any:
    """Stand-ins for ``from module import a, b`` that import on first use: ``a, b = lazy_from("m", "a", "b")``.

    Returns:
        One :class:`LazyAttr` for a single name, else a tuple of them.
    """
    attrs = tuple(LazyAttr(module, n) for n in names)
    return attrs[0] if len(attrs) == 1 else attrs
