"""The data loop of an operator over data: weighted sums of per-batch products, micro-batched and
optionally summed over processes.

For a loss that is the sample-weighted mean of per-batch mean losses, ``L = sum_b w_b L_b`` with
``w_b = n_b / N``, every derivative is the same weighted sum: ``H v = sum_b w_b H_b v``. A
:class:`DataLoop` holds the batches and their weights and computes ``sum_b w_b f(b)`` for a per-batch
function ``f``, in an accumulation dtype of choice.

Sharding is a property of the loop, not of the process: a loop built with ``reduce`` (a callable that
sums a tensor over processes, e.g. ``torch.distributed.all_reduce``) holds this process's share of the
data with *global* weights ``n_b / N_total``, and every process gets the full sum. A failure on one
process is voted on in the same collective, so every process raises together instead of the others
waiting forever. How the data is cut and reduced lives above the numerical core
(:mod:`diagnostics.distributed`, glued in :mod:`diagnostics.operators`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from diagnostics.batches import Batch, batch_size, slice_batch
from diagnostics.errors import DiagnosticsError
from diagnostics.linalg.products import as_dtype

Reduce = Callable[[torch.Tensor], torch.Tensor]


def split_batches(
    batches: Sequence[Batch], weights: Sequence[float], micro_batch: int | None
) -> tuple[list[Batch], list[float]]:
    """Split every batch larger than ``micro_batch`` into pieces; piece weight ``w_b * n_piece / n_b``.

    For a loss that is a per-sample mean, ``sum_pieces (n_piece / n_b) L_piece = L_b``, so weighted sums
    over the pieces equal those over the batches (a ragged last piece included).

    Args:
        batches: the batches.
        weights: one weight per batch.
        micro_batch: the most samples per piece (None: no splitting).

    Returns:
        ``(pieces, piece weights)``.
    """
    if micro_batch is None:
        return list(batches), [float(w) for w in weights]
    out_b: list[Batch] = []
    out_w: list[float] = []
    for b, w in zip(batches, weights):
        n = batch_size(b)
        if n <= micro_batch:
            out_b.append(b)
            out_w.append(float(w))
            continue
        for start in range(0, n, micro_batch):
            stop = min(start + micro_batch, n)
            out_b.append(slice_batch(b, start, stop))
            out_w.append(float(w) * (stop - start) / n)
    return out_b, out_w


class DataLoop:
    """``sum_b w_b f(b)`` over (micro-)batches, accumulated in ``accumulate_dtype``, optionally reduced.

    Args:
        batches: the data (may be empty for a process that holds none, when ``reduce`` is given).
        weights: per-batch weights; default ``n_b / N`` (under sharding: the global ``n_b / N_total``).
        micro_batch: split batches larger than this into micro-batches of at most this many samples,
            each weighted ``w_b * n_micro / n_b`` (exact for per-sample mean losses; bounds activation
            memory).
        accumulate_dtype: accumulate the sum (and the reduction) in this dtype, e.g. float64 for float32
            products over many batches; default: the dtype of the products.
        reduce: ``reduce(t) -> sum of t over processes`` (every process gets the same result); this
            loop then holds one process's share.

    Attributes:
        batches: the (micro-)batches, in order.
        weights: their weights.
    """

    def __init__(
        self,
        batches: Sequence[Batch],
        weights: Sequence[float] | None = None,
        *,
        micro_batch: int | None = None,
        accumulate_dtype: torch.dtype | str | None = None,
        reduce: Reduce | None = None,
    ) -> None:
        batches = list(batches)
        if not batches and reduce is None:
            raise ValueError("a data loop needs at least one batch")
        if micro_batch is not None and int(micro_batch) < 1:
            raise ValueError(f"micro_batch must be positive, got {micro_batch}")
        if weights is None:
            sizes = [batch_size(b) for b in batches]
            weights = [s / float(sum(sizes)) for s in sizes]
        if len(weights) != len(batches):
            raise ValueError(f"{len(weights)} weights for {len(batches)} batches")
        self.micro_batch = None if micro_batch is None else int(micro_batch)
        self.batches, self.weights = split_batches(batches, weights, self.micro_batch)
        self.accumulate_dtype = as_dtype(accumulate_dtype, "accumulate_dtype")
        self.reduce = reduce

    @property
    def sharded(self) -> bool:
        """Whether the sum runs over processes (this loop holds one share of the data)."""
        return self.reduce is not None

    def largest(self) -> Batch | None:
        """The (micro-)batch with the most samples (None when this process holds none)."""
        return max(self.batches, key=batch_size) if self.batches else None

    def any_process(self, flag: bool, device: torch.device) -> bool:
        """Whether ``flag`` holds on any process (a collective under sharding: every process must call)."""
        if self.reduce is None:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], dtype=torch.float32, device=device)
        return float(self.reduce(t)[0]) > 0

    def weighted_sum(
        self,
        fn: Callable[[Batch], torch.Tensor],
        shape: Sequence[int],
        *,
        dtype: torch.dtype,
        device: torch.device,
    ) -> torch.Tensor:
        """``sum_b w_b fn(b)`` (summed over processes under sharding), in the accumulation dtype.

        Under sharding, an exception raised by ``fn`` on one process is voted on in the same
        all-reduce (one extra entry): the failing process re-raises it, the others raise
        :class:`DiagnosticsError`, so no process is left waiting in a collective.

        Args:
            fn: ``fn(batch) -> tensor of shape`` (e.g. ``H_b V``, ``[n, k]``).
            shape: the shape of every ``fn(b)`` and of the result.
            dtype: the dtype of the products (accumulated in ``accumulate_dtype`` when set).
            device: where the sum lives.

        Returns:
            A tensor of ``shape``, dtype ``accumulate_dtype or dtype``.
        """
        acc = self.accumulate_dtype or dtype
        size = math.prod(shape)
        flat = torch.empty(size + (1 if self.sharded else 0), dtype=acc, device=device)
        out = flat[:size].view(*shape)
        error: Exception | None = None
        written = False  # the first term is written over the uninitialised sum, the others added in place
        try:
            for batch, w in zip(self.batches, self.weights):
                term = fn(batch).to(acc)  # weighted in the accumulation dtype, as it is summed
                if written:
                    out.add_(term, alpha=w)
                else:
                    torch.mul(term, w, out=out)
                    written = True
        except Exception as exc:  # re-raised below, after every process has voted
            if self.reduce is None:
                raise
            error = exc
        if not written:  # no batch here (a process without data), or the first one failed
            out.zero_()
        if self.reduce is None:
            return out
        flat[size] = 1.0 if error is not None else 0.0
        total = self.reduce(flat)
        if error is not None:
            raise error
        if float(total[size]) > 0:
            raise DiagnosticsError("another process failed while computing its share of a product; see its error")
        return total[:size].view(*shape)
