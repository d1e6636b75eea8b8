"""Training-dynamics diagnostics for PyTorch checkpoints.

Library entry points (nothing here prints, plots or writes except the explicit writers)::

    from diagnostics import load_checkpoint, save_checkpoint, resolve_binding, build_context
    from diagnostics.analyzers.hessian import HessianConfig, analyze_hessian

The names below are imported on first use, so ``import diagnostics`` (and ``diag --help``) does not load
torch.
"""

from __future__ import annotations

import importlib
from typing import Any

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

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'diagnostics' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
