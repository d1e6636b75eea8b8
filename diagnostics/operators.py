"""From a context to operators: the glue between the analyzers and the numerical core.

:mod:`diagnostics.linalg` knows losses, parameters and batches, nothing of checkpoints, contexts or
process groups. Here a :class:`~diagnostics.context.Context` (its loss, analysed parameters and
batches) becomes a :class:`~diagnostics.linalg.operator.HessianOperator`, and the data loop is sharded
over the ``torch.distributed`` group when asked (:mod:`diagnostics.distributed` cuts the data and
provides the all-reduce).

Token-level losses (a transformers LM's loss, cross-entropy on ``[B, T, V]`` logits) are means over the
counted targets, not over sequences: ``Context.batch_loss`` scales each batch's loss by its share of the
counted targets (``L_b T_b / n_b * N / T``), so the data loop's sample weights ``n_b / N`` give the
token-weighted mean ``sum_b T_b L_b / T`` exactly, micro-batches and data shards included.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from diagnostics import distributed
from diagnostics.batches import Batch
from diagnostics.context import Context
from diagnostics.linalg.data import DataLoop
from diagnostics.linalg.operator import HessianOperator


def data_loop(
    batches: Sequence[Batch],
    *,
    shard: bool | None = None,
    weights: Sequence[float] | None = None,
    micro_batch: int | None = None,
    accumulate_dtype: torch.dtype | str | None = None,
) -> DataLoop:
    """The data loop over ``batches``, sharded over the process group or local.

    Sharded: this process keeps its share (:func:`diagnostics.distributed.shard_data`: replicated data
    is cut into per-rank ranges, pre-sharded data kept) with global weights ``n_b / N_total``, and
    every sum is all-reduced (:func:`diagnostics.distributed.all_reduce_sum`).

    Args:
        batches: the data (on a sharded run: this process's data, the same on every rank when replicated).
        shard: shard over the initialised process group; ``None``: when
            :func:`diagnostics.distributed.data_parallel_active` (a group of more than one process,
            outside ``local_only``). A collective when sharding: every rank must call.
        weights: per-batch weights (local loops only; default ``n_b / N``).
        micro_batch: split batches into micro-batches of at most this many samples.
        accumulate_dtype: accumulation dtype of the sums.

    Returns:
        The :class:`DataLoop`.
    """
    if shard is None:
        shard = distributed.data_parallel_active()
    if not shard:
        return DataLoop(batches, weights, micro_batch=micro_batch, accumulate_dtype=accumulate_dtype)
    if weights is not None:
        raise ValueError("weights cannot be given for sharded data: they are the global sample fractions")
    part = distributed.shard_data(batches)
    return DataLoop(
        part.batches,
        part.weights,
        micro_batch=micro_batch,
        accumulate_dtype=accumulate_dtype,
        reduce=distributed.all_reduce_sum,
    )


def hessian_operator(
    ctx: Context,
    *,
    names: Sequence[str] | None = None,
    batches: Sequence[Batch] | None = None,
    shard: bool | None = None,
    **options: Any,
) -> HessianOperator:
    """The Hessian of ``ctx``'s mean loss over its batches (or ``batches``) w.r.t. ``names`` (default all).

    Args:
        ctx: the context (loss, analysed parameters, batches).
        names: restrict to these analysed parameters (the diagonal block of the full Hessian).
        batches: use these batches instead of ``ctx.batches`` (e.g. one class's samples).
        shard: shard the data over the process group (see :func:`data_loop`).
        **options: ``weights``, ``micro_batch``, ``accumulate_dtype`` (the data loop) and ``backend``,
            ``max_vectors``, ``autocast``, ``compile``, ``memory_check`` (the operator).

    Returns:
        The :class:`HessianOperator`.
    """
    sub = ctx if names is None else ctx.restrict(names=names)
    if batches is not None and sub.token_weighted:
        # a token-mean loss scales each batch by its share of the counted targets: count those of these batches
        sub = sub.with_batches(list(batches))
    loop_keys = ("weights", "micro_batch", "accumulate_dtype")
    loop_options = {k: options.pop(k) for k in loop_keys if k in options}
    loop = data_loop(list(batches if batches is not None else sub.batches), shard=shard, **loop_options)
    return HessianOperator(sub.batch_loss, sub.params, loop, **options)
