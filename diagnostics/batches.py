"""Walking nested batches: size, subsets, concatenation, device moves and fingerprints in one place.

A *batch* is a tree (``torch.utils._pytree``) whose containers are tuples, named tuples and dicts and
whose leaves are tensors with the sample axis first, ``None``, or other values (kept as they are). A
Python ``list`` is a leaf holding one item per sample (e.g. detector images of different sizes), so
subsetting a list picks items while subsetting a tensor indexes its first axis.

Typical batches: ``(inputs, targets)``, ``((ids, mask), targets)``, ``{"input_ids": ..., "labels": ...}``.

This is a bottom-layer module (it imports only the errors, and torch when used): the numerical core
(:mod:`diagnostics.linalg`, micro-batching), the context and data sharding all use it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from diagnostics.errors import DiagnosticsError

if TYPE_CHECKING:
    import torch

Batch = Any  # a tree of tensors with the sample axis first; usually (inputs, targets), targets may be None


def _is_leaf(obj: Any) -> bool:
    return isinstance(obj, list)


def flatten(batch: Any) -> tuple[list[Any], Any]:
    """``batch`` -> (leaves, spec); lists are leaves (one item per sample)."""
    from torch.utils import _pytree

    return _pytree.tree_flatten(batch, is_leaf=_is_leaf)


def unflatten(leaves: Sequence[Any], spec: Any) -> Any:
    """Inverse of :func:`flatten`."""
    from torch.utils import _pytree

    return _pytree.tree_unflatten(list(leaves), spec)


def map_leaves(fn: Callable[[Any], Any], batch: Any) -> Any:
    """Apply ``fn`` to every leaf (tensors, lists, None, scalars) and rebuild the same structure."""
    leaves, spec = flatten(batch)
    return unflatten([fn(x) for x in leaves], spec)


def tensors(batch: Any) -> list[torch.Tensor]:
    """The tensor leaves of ``batch`` (list items included), in order."""
    import torch

    out: list[torch.Tensor] = []
    for leaf in flatten(batch)[0]:
        if isinstance(leaf, torch.Tensor):
            out.append(leaf)
        elif isinstance(leaf, list):
            out.extend(t for t in leaf if isinstance(t, torch.Tensor))
    return out


def size(batch: Any) -> int:
    """The number of samples: the first axis of the first tensor leaf (a list leaf: its length).

    Raises:
        DiagnosticsError: no leaf carries a sample axis.
    """
    import torch

    for leaf in flatten(batch)[0]:
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
            return int(leaf.shape[0])
        if isinstance(leaf, list) and leaf:
            return len(leaf)
    raise DiagnosticsError("cannot tell the batch size: no tensor with a sample axis in the batch")


def batch_size(batch: Batch) -> int:
    """The number of samples of a batch (see :func:`size`)."""
    return size(batch)


def slice_batch(batch: Batch, start: int, stop: int) -> Batch:
    """Samples ``start:stop`` of every leaf with a sample axis (views, no copies)."""
    import torch

    def cut(leaf: Any) -> Any:
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
            return leaf[start:stop]
        if isinstance(leaf, list):
            return leaf[start:stop]
        return leaf

    return map_leaves(cut, batch)


def take(batch: Any, index: torch.Tensor) -> Any:
    """The samples ``index`` (1-d integer tensor) of every leaf with a sample axis."""
    import torch

    rows = index.tolist()

    def pick(leaf: Any) -> Any:
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
            return leaf[index.to(leaf.device)]
        if isinstance(leaf, list):
            return [leaf[i] for i in rows]
        return leaf

    return map_leaves(pick, batch)


def concat(parts: Sequence[Any]) -> Any:
    """Concatenate batches of the same structure along the sample axis.

    Raises:
        DiagnosticsError: the batches have different structures.
    """
    import torch

    flat = [flatten(p) for p in parts]
    spec = flat[0][1]
    if any(s != spec for _, s in flat[1:]):
        raise DiagnosticsError("the data's batches do not all have the same structure (keys or nesting differ)")
    columns = list(zip(*(leaves for leaves, _ in flat)))
    merged = []
    for col in columns:
        first = col[0]
        if isinstance(first, torch.Tensor) and first.dim() > 0:
            merged.append(torch.cat(list(col), 0))
        elif isinstance(first, list):
            merged.append([item for part in col for item in part])
        else:
            merged.append(first)
    return unflatten(merged, spec)


def split(batch: Any, max_size: int | None) -> list[Any]:
    """``batch`` cut into consecutive batches of at most ``max_size`` samples (all of it when None)."""
    import torch

    n = size(batch)
    if not max_size or max_size >= n:
        return [batch]
    return [take(batch, torch.arange(s, min(s + max_size, n))) for s in range(0, n, max_size)]


def to_device(batch: Any, device: torch.device | str, dtype: torch.dtype | None = None) -> Any:
    """Move every tensor (list items too) to ``device``; cast floating ones to ``dtype`` when given."""
    import torch

    def move(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return x.to(device=device, dtype=dtype) if dtype is not None and x.is_floating_point() else x.to(device)
        if isinstance(x, list):
            return [move(t) for t in x]
        return x

    return map_leaves(move, batch)


def _feed(h: Any, leaf: Any) -> None:
    import torch

    if isinstance(leaf, torch.Tensor):
        t = leaf.detach().to("cpu").contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)};".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(leaf, list):
        h.update(f"L{len(leaf)}[".encode())
        for item in leaf:
            _feed(h, item)
        h.update(b"]")
    else:
        h.update(f"V{leaf!r};".encode())


def fingerprint(batches: Sequence[Any], *, ignore_batching: bool = False) -> str:
    """SHA-256 (hex) of the data: structure, dtype, shape and bytes of every leaf of every batch, in order.

    Equal data gives the same fingerprint on every device. With ``ignore_batching`` the same samples in the same
    order give the same fingerprint however they are cut into batches (each leaf position is hashed as one
    stream of per-sample rows; the sample axis is left out of the shapes).

    Args:
        batches: the batches.
        ignore_batching: hash the samples, not the batches.

    Returns:
        The hex digest.
    """
    import torch

    if not ignore_batching:
        h = hashlib.sha256()
        for b in batches:
            leaves, spec = flatten(b)
            h.update(f"B{spec};".encode())
            for leaf in leaves:
                _feed(h, leaf)
        return h.hexdigest()
    streams: list[Any] = []
    spec = None
    for b in batches:
        leaves, spec = flatten(b)
        streams += [hashlib.sha256() for _ in range(len(leaves) - len(streams))]
        for h, leaf in zip(streams, leaves):
            if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
                t = leaf.detach().to("cpu").contiguous()
                h.update(f"T{t.dtype}{tuple(t.shape[1:])};".encode())
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
            else:
                _feed(h, leaf)
    whole = hashlib.sha256(f"S{spec};".encode())
    for h in streams:
        whole.update(h.hexdigest().encode())
    return whole.hexdigest()
