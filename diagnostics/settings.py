"""Settings objects passed as a frozen dataclass or as keywords (a leaf module: imports nothing of the package)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields, replace
from typing import Any, TypeVar

T = TypeVar("T")


def with_fields(cls: type[T], base: T | None, overrides: Mapping[str, Any], caller: str) -> T:
    """``base`` (default ``cls()``) with the fields named in ``overrides`` replaced.

    Lets a function take ``settings=cls(...)`` and the same fields as keywords (the keywords win).

    Args:
        cls: the frozen dataclass of the settings.
        base: the settings given, or None for the defaults.
        overrides: field values given as keywords.
        caller: the function's name, for the error.

    Returns:
        The settings.

    Raises:
        TypeError: a keyword that is not a field of ``cls`` (as Python raises for an unknown argument).
    """
    unknown = sorted(set(overrides) - {f.name for f in fields(cls)})  # type: ignore[arg-type]
    if unknown:
        raise TypeError(f"{caller}() got an unexpected keyword argument {unknown[0]!r}")
    settings = base if base is not None else cls()
    return replace(settings, **overrides) if overrides else settings  # type: ignore[type-var]
