"""Training-dynamics diagnostics for PyTorch checkpoints.

Library entry points (nothing here prints, plots or writes except the explicit writers)::

    from diagnostics import load_checkpoint, save_checkpoint, resolve_binding, build_context
    from diagnostics.analyzers.hessian import HessianConfig, analyze_hessian

The names below are imported on first use (PEP 562), so that importing a submodule, e.g. the
numerical core :mod:`diagnostics.linalg`, does not import the layers above it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Binding": "diagnostics.binding",
    "resolve_binding": "diagnostics.binding",
    "Checkpoint": "diagnostics.checkpoint",
    "load_checkpoint": "diagnostics.checkpoint",
    "save_checkpoint": "diagnostics.checkpoint",
    "Context": "diagnostics.context",
    "build_context": "diagnostics.context",
    "DiagnosticsError": "diagnostics.errors",
    "Record": "diagnostics.results",
    "Result": "diagnostics.results",
    "read_result": "diagnostics.results",
    "records_to_frame": "diagnostics.results",
    "write_result": "diagnostics.results",
}

__all__ = [
    "Binding",
    "Checkpoint",
    "Context",
    "DiagnosticsError",
    "Record",
    "Result",
    "build_context",
    "load_checkpoint",
    "read_result",
    "records_to_frame",
    "resolve_binding",
    "save_checkpoint",
    "write_result",
]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names come from __getattr__
    from diagnostics.binding import Binding, resolve_binding
    from diagnostics.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
    from diagnostics.context import Context, build_context
    from diagnostics.errors import DiagnosticsError
    from diagnostics.results import Record, Result, read_result, records_to_frame, write_result


def __getattr__(name: str) -> Any:
    """Import the module that defines ``name`` on first access."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'diagnostics' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
