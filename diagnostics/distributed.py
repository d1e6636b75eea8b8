"""Data-parallel Hessian products and checkpoint sweeps on ``torch.distributed``.

Under ``torchrun`` (or any initialised process group) every process holds the same model and runs the
Krylov method identically; only the data is split. For the Hessian of the mean loss over ``N`` samples,

    H v = sum_b (n_b / N) H_b v = sum_ranks [ sum_{b on rank r} (n_b / N) H_b v ],

so each rank weights its own batches by the *global* count ``N`` and one ``all_reduce(SUM)`` per block of
vectors gives every rank the exact full-data product (a ragged split included). All-reduce returns the
same bits on every rank, so every rank takes the same Lanczos decisions; output is written by rank 0.

Two ways the data can arrive, told apart automatically (:func:`shard_data`):

* *replicated* (the usual ``diag hessian`` case: every rank loaded the same data): the samples are cut
  into ``world`` contiguous ranges of near-equal size, ``[r N / W, (r + 1) N / W)``; a batch that
  straddles a boundary is split there (exact for per-sample mean losses, the same as micro-batching).
* *pre-sharded* (each rank was given its own part, e.g. by a ``DistributedSampler``): nothing is cut;
  ``N`` is the all-reduced sum of the ranks' sample counts.

Whether an operator is sharded is a property of its data loop (:class:`diagnostics.linalg.data.DataLoop`
built with ``reduce=all_reduce_sum`` over a :class:`Shard`), decided when the operator is built from a
context (:func:`diagnostics.operators.hessian_operator`, argument ``shard``). When that argument is not
given, the default is :func:`data_parallel_active`: a group of more than one process, outside a
:func:`local_only` block. This module provides the pieces (process group, collectives, cutting data)
and imports nothing of the numerical core.

Sweeps over many checkpoints use the other axis: :func:`shard_items` gives each rank its checkpoints,
each is analysed locally (inside :func:`local_only`, so no operator built there is sharded) and
:func:`gather_items` brings the results back in the original order.

gloo is used for CPU tensors, NCCL for CUDA tensors (``"cpu:gloo,cuda:nccl"`` when CUDA is present).
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import datetime
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from diagnostics.batches import Batch, batch_size, fingerprint, slice_batch
from diagnostics.errors import DiagnosticsError

T = TypeVar("T")

_STATE: dict[str, Any] = {"initialised_here": False}
# the default of hessian_operator(shard=None) inside a local_only() block (scoped, per thread/task)
_LOCAL_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar("diagnostics_local_only", default=False)


# ------------------------------------------------------------------------------ process group
@dataclass(frozen=True)
class World:
    """Where this process stands: ``rank`` of ``size`` (``size == 1`` without a process group)."""

    rank: int
    size: int
    local_rank: int
    backend: str | None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1


def world() -> World:
    """This process's rank and the world size (rank 0 of 1 when ``torch.distributed`` is not initialised)."""
    if dist.is_available() and dist.is_initialized():
        return World(
            rank=dist.get_rank(),
            size=dist.get_world_size(),
            local_rank=int(os.environ.get("LOCAL_RANK", dist.get_rank())),
            backend=str(dist.get_backend()),
        )
    return World(rank=0, size=1, local_rank=0, backend=None)


def is_main() -> bool:
    """True on rank 0 (and without a process group): the process that prints and writes."""
    return world().is_main


def launched_by_torchrun() -> bool:
    """The environment of ``torchrun`` (or any ``env://`` launcher) with more than one process."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")) and (
        int(os.environ["WORLD_SIZE"]) > 1
    )


def default_backend() -> str:
    """``gloo`` for CPU tensors, plus ``nccl`` for CUDA tensors when both are available."""
    if torch.cuda.is_available() and dist.is_nccl_available():
        return "cpu:gloo,cuda:nccl"
    return "gloo"


def init_from_env(backend: str | None = None, timeout_s: float | None = None) -> World:
    """Initialise the process group from ``torchrun``'s environment, if launched that way.

    Does nothing when the group is already initialised (e.g. by the user's script) or when the
    environment names a single process. Selects the CUDA device ``LOCAL_RANK`` when CUDA is present,
    so ``--device cuda`` / ``auto`` means this process's GPU. Returns :func:`world`.
    """
    if not dist.is_available():
        return world()
    if dist.is_initialized() or not launched_by_torchrun():
        return world()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise DiagnosticsError(
                f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA device(s); lower --nproc_per_node"
            )
        torch.cuda.set_device(local_rank)
    kwargs: dict[str, Any] = {"backend": backend or default_backend(), "init_method": "env://"}
    if timeout_s is None and os.environ.get("DIAG_DIST_TIMEOUT"):
        timeout_s = float(os.environ["DIAG_DIST_TIMEOUT"])
    if timeout_s is not None:
        kwargs["timeout"] = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group(**kwargs)
    _STATE["initialised_here"] = True
    atexit.register(shutdown)
    return world()


def shutdown() -> None:
    """Destroy the process group if :func:`init_from_env` created it (a user's own group is left alone)."""
    if _STATE["initialised_here"] and dist.is_initialized():
        dist.destroy_process_group()
    _STATE["initialised_here"] = False


@contextlib.contextmanager
def local_only() -> Iterator[None]:
    """Inside this block operators built from a context default to local data (no sharding, no
    all-reduce), e.g. one checkpoint of a sweep analysed by one rank.

    Only the default of :func:`diagnostics.operators.hessian_operator` (``shard=None``) reads this;
    an operator, once built, keeps the sharding of its data loop.
    """
    token = _LOCAL_ONLY.set(True)
    try:
        yield
    finally:
        _LOCAL_ONLY.reset(token)


def data_parallel_active() -> bool:
    """The default for building an operator from a context: shard its data and all-reduce its
    products when a group of more than one process is initialised, outside :func:`local_only`."""
    return not _LOCAL_ONLY.get() and world().active


# ---------------------------------------------------------------------------------- collectives
def _backend_handles(t: torch.Tensor) -> bool:
    backend = str(dist.get_backend())
    if t.device.type == "cuda":
        return "nccl" in backend or backend.startswith("cuda")
    return "gloo" in backend or backend.startswith("cpu") or "mpi" in backend


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over all processes; every process gets the same result (a new tensor).

    A CUDA tensor under a CPU-only (gloo) group travels through the CPU, and back.
    """
    if not world().active:
        return t
    if _backend_handles(t):
        out = t.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out
    host = t.detach().to("cpu", copy=True)
    dist.all_reduce(host, op=dist.ReduceOp.SUM)
    return host.to(t.device)


def all_gather_objects(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (picklable objects)."""
    w = world()
    if not w.active:
        return [obj]
    out: list[Any] = [None] * w.size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not world().active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if world().active:
        dist.barrier()


# ------------------------------------------------------------------------------------ sharding
def shard_range(total: int, rank: int, size: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous share ``[start, stop)`` of ``total`` items: ``[r N / W, (r+1) N / W)``."""
    return (rank * total) // size, ((rank + 1) * total) // size


def shard_batches(batches: Sequence[Batch], rank: int, size: int) -> tuple[list[Batch], list[float]]:
    """This rank's part of replicated data, with global weights ``n / N``.

    The concatenated samples are cut into ``size`` contiguous ranges of near-equal length; batches
    wholly inside a rank's range are kept as they are, a batch straddling a boundary is split there.
    Over all ranks the weights sum to 1 and every sample appears exactly once.
    """
    sizes = [batch_size(b) for b in batches]
    total = sum(sizes)
    if total == 0:
        raise DiagnosticsError("no samples to shard")
    lo, hi = shard_range(total, rank, size)
    out_b: list[Batch] = []
    out_w: list[float] = []
    offset = 0
    for b, n in zip(batches, sizes):
        start, stop = max(lo, offset), min(hi, offset + n)
        if start < stop:
            piece = b if (start, stop) == (offset, offset + n) else slice_batch(b, start - offset, stop - offset)
            out_b.append(piece)
            out_w.append((stop - start) / total)
        offset += n
    return out_b, out_w


def data_fingerprint(batches: Sequence[Batch]) -> str:
    """A hash of the data as batched here (equal data and batching -> equal fingerprint on every rank)."""
    return fingerprint(batches)


@dataclass
class Shard:
    """This rank's batches and their global weights.

    Attributes:
        batches / weights: what this rank multiplies, weighted by ``n_b / N_total``.
        mode: ``replicated`` (every rank had the same data; it was cut) or ``presharded``.
        samples: samples on this rank; ``total``: over all ranks.
    """

    batches: list[Batch]
    weights: list[float]
    mode: str
    samples: int
    total: int


def shard_data(batches: Sequence[Batch], mode: str = "auto") -> Shard:
    """Shard ``batches`` over the process group (a collective: every rank must call it).

    Args:
        mode: ``replicated`` (cut the same data into per-rank ranges), ``presharded`` (keep each
            rank's own batches, weights from the global count) or ``auto``: replicated when every
            rank's data has the same fingerprint, else presharded.
    """
    if mode not in ("auto", "replicated", "presharded"):
        raise ValueError(f"mode must be auto, replicated or presharded, not {mode!r}")
    w = world()
    batches = list(batches)
    if not w.active:
        n = sum(batch_size(b) for b in batches)
        return Shard(batches, [batch_size(b) / n for b in batches], "replicated", n, n)
    if mode == "auto":
        prints = all_gather_objects(data_fingerprint(batches))
        mode = "replicated" if len(set(prints)) == 1 else "presharded"
    if mode == "replicated":
        local, weights = shard_batches(batches, w.rank, w.size)
        total = sum(batch_size(b) for b in batches)
        return Shard(local, weights, mode, sum(batch_size(b) for b in local), total)
    counts = all_gather_objects(sum(batch_size(b) for b in batches))
    total = int(sum(counts))
    if total == 0:
        raise DiagnosticsError("no rank holds any samples")
    return Shard(batches, [batch_size(b) / total for b in batches], mode, int(counts[w.rank]), total)


# ------------------------------------------------------------------------------- sweeps
def shard_items(items: Sequence[T]) -> list[tuple[int, T]]:
    """This rank's share of a list of work items (checkpoints): ``[(index, item), ...]``.

    Round-robin (``items[rank::world]``), so consecutive checkpoints, which cost about the same, are
    spread evenly. Without a process group: every item.
    """
    w = world()
    return [(i, item) for i, item in enumerate(items) if i % w.size == w.rank]


def gather_items(local: Sequence[tuple[int, Any]], n_items: int | None = None) -> list[Any]:
    """All ranks' ``(index, result)`` pairs -> results in index order, on every rank.

    Args:
        local: this rank's results, as produced for the indices of :func:`shard_items`.
        n_items: when given, check that every index ``0..n_items-1`` came back exactly once.
    """
    pairs = [p for part in all_gather_objects(list(local)) for p in part]
    pairs.sort(key=lambda p: p[0])
    if n_items is not None:
        got = [p[0] for p in pairs]
        if got != list(range(n_items)):
            raise DiagnosticsError(f"gathered results for items {got[:10]}..., expected 0..{n_items - 1} once each")
    return [p[1] for p in pairs]
