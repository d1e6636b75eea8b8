"""Batches of data: their size and slices of them (a leaf module: imports only torch and the errors).

A batch is a pair ``(inputs, targets)``; ``targets`` may be ``None`` for unlabelled data. Inputs are a
tensor (rows are samples), a tuple of tensors (several model arguments, rows of each are samples), a
list (one entry per sample, e.g. detector images of different sizes) or a dict of those.

Both the numerical core (:mod:`diagnostics.linalg`, micro-batching) and the layers above it (the
context, data sharding in :mod:`diagnostics.distributed`) use these, so they live below both.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from diagnostics.errors import DiagnosticsError

Batch = tuple[Any, Any]  # (inputs, targets); targets may be None for unlabelled data


def batch_size(batch: Batch) -> int:
    """Number of samples in a batch: rows of the targets, else of the inputs.

    A tuple of inputs is several model arguments (rows of the first count); a list of inputs is a
    list of samples (e.g. detector images of different sizes).

    Args:
        batch: ``(inputs, targets)``.

    Returns:
        The sample count ``n_b``.

    Raises:
        DiagnosticsError: neither inputs nor targets tell a size.
    """
    x, y = batch
    for t in (y, x):
        if isinstance(t, torch.Tensor) and t.dim() > 0:
            return int(t.shape[0])
        if isinstance(t, tuple) and t and isinstance(t[0], torch.Tensor) and t[0].dim() > 0:
            return int(t[0].shape[0])
        if isinstance(t, list) and t:
            return len(t)
    raise DiagnosticsError("cannot tell the batch size: a batch's inputs/targets are not tensors or lists")


def _slice(obj: Any, start: int, stop: int) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj[start:stop] if obj.dim() > 0 else obj
    if isinstance(obj, tuple):  # several model arguments: slice each one that has a batch dimension
        return tuple(_slice(o, start, stop) for o in obj)
    if isinstance(obj, list):  # a list of samples
        return obj[start:stop]
    if isinstance(obj, Mapping):
        return {k: _slice(v, start, stop) for k, v in obj.items()}
    return obj


def slice_batch(batch: Batch, start: int, stop: int) -> Batch:
    """Samples ``start:stop`` of a batch.

    Rows of tensors and items of a list of samples are sliced; tuples of model arguments and dicts
    element-wise; zero-dimensional tensors and non-tensors are kept.

    Args:
        batch: ``(inputs, targets)`` with ``n_b`` samples.
        start: first sample kept.
        stop: one past the last sample kept.

    Returns:
        ``(inputs[start:stop], targets[start:stop])``.
    """
    x, y = batch
    return _slice(x, start, stop), _slice(y, start, stop)
