"""From a context to operators: the glue between the analyzers and the numerical core.

:mod:`diagnostics.linalg` knows losses, parameters and batches, nothing of checkpoints, contexts or
process groups. Here a :class:`~diagnostics.context.Context` (its loss, analysed parameters and
batches) becomes a :class:`~diagnostics.linalg.operator.HessianOperator` or another curvature operator
(:func:`curvature_operator`: Gauss-Newton, Fisher, empirical Fisher, ``H - GGN``), and the data loop is
sharded over the ``torch.distributed`` group when asked (:mod:`diagnostics.distributed` cuts the data and
provides the all-reduce).

Token-level losses (a transformers LM's loss, cross-entropy on ``[B, T, V]`` logits) are means over the
counted targets, not over sequences: ``Context.batch_loss`` scales each batch's loss by its share of the
counted targets (``L_b T_b / n_b * N / T``), so the data loop's sample weights ``n_b / N`` give the
token-weighted mean ``sum_b T_b L_b / T`` exactly, micro-batches and data shards included.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from diagnostics import distributed
from diagnostics.batches import Batch, batch_size
from diagnostics.binding import LOSS_NAMES, output_tensor
from diagnostics.context import Context
from diagnostics.errors import DiagnosticsError
from diagnostics.linalg.curvature import (
    CURVATURES,
    EmpiricalFisherOperator,
    FunctionalHessianOperator,
    GaussNewtonOperator,
    SampledFisherCurvature,
)
from diagnostics.linalg.data import DataLoop
from diagnostics.linalg.operator import DataOperator, HessianOperator, LinearOperator
from diagnostics.linalg.products import ModelLoss, as_dtype, math_attention, output_hessian

#: losses whose Fisher equals their Gauss-Newton matrix (canonical-link exponential families), and the
#: predictive distribution each is the negative log-likelihood of
FISHER_IDENTITY = {
    "cross_entropy": "categorical softmax(z): F = GGN exactly",
    "bce_with_logits": "Bernoulli sigmoid(z): F = GGN exactly",
    "mse": (
        "Gaussian N(z, sigma^2 I) with sigma^2 = D/2 (D outputs per sample), whose negative log-likelihood is the "
        "mean squared error up to a constant: F = GGN; for noise variance s^2 multiply by D/(2 s^2)"
    ),
}


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
            ``max_vectors``, ``autocast``, ``compile``, ``memory_check``, ``split`` (the operator; ``split``
            defaults to True for a built-in loss).

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
    # a built-in loss is a per-sample (or counted-token) mean: its one batch may be cut into micro-batches on
    # the CPU (HessianOperator._split checks the loss values agree first, and never cuts given micro-batches);
    # a custom loss is left as batched
    options.setdefault("split", sub.loss_name in LOSS_NAMES)
    return HessianOperator(sub.batch_loss, sub.params, loop, **options)


def model_loss(ctx: Context) -> ModelLoss:
    """``ctx``'s batch loss split at the model's outputs: ``loss_fn(model(w, x), y)``.

    For a built-in loss the outputs are the model's prediction tensor (the logits of a dict or
    ``ModelOutput``, :func:`~diagnostics.binding.output_tensor`), which is what the loss takes; a custom
    ``module:fn`` loss gets the outputs as the model returns them (they must be a tensor).
    """
    if ctx.loss_name in LOSS_NAMES:

        def forward(params: Mapping[str, torch.Tensor], inputs: Any) -> Any:
            out = ctx.forward(params, inputs)
            pred = output_tensor(out)
            return out if pred is None else pred

        return ModelLoss(forward=forward, loss=ctx.loss_fn)
    return ModelLoss(forward=ctx.forward, loss=ctx.loss_fn)


def _check_split_loss(ctx: Context, kind: str) -> None:
    """Refuse, in one line, a context whose loss cannot be split at the model's outputs as ``l(z, y)``."""
    if ctx.loss_name == "model" or ctx.own_causal_loss:
        raise DiagnosticsError(
            f"--curvature {kind} needs the loss as a function of the model's outputs, but --loss model is computed "
            "inside the model; name the loss instead (e.g. --loss cross_entropy with next-token targets) or use "
            "--curvature hessian or empirical_fisher"
        )
    if ctx.token_weighted:
        raise DiagnosticsError(
            f"--curvature {kind} supports one target per sample, but these targets are token-level (a mean over "
            f"{ctx.counted} counted targets); use --curvature hessian or empirical_fisher, or give one target per sample"
        )


def _check_tensor_outputs(ctx: Context, loss: ModelLoss, batches: Sequence[Batch], kind: str) -> None:
    """One forward of the smallest batch: the model must return the tensor the loss takes."""
    if not batches:
        return
    smallest = min(batches, key=batch_size)
    try:
        with torch.no_grad(), math_attention():
            loss.outputs(ctx.params, smallest[0])
    except TypeError as exc:
        raise DiagnosticsError(
            f"--curvature {kind}: {exc}; wrap the model so that it returns the tensor its loss takes, or use "
            "--curvature hessian or empirical_fisher"
        ) from None


def _gauss_newton(
    ctx: Context,
    sub: Context,
    kind: str,
    loop: DataLoop,
    fisher_samples: int,
    generator: torch.Generator | None,
    options: dict[str, Any],
) -> GaussNewtonOperator:
    """The GGN, or the Fisher: the GGN where :data:`FISHER_IDENTITY` holds for the loss, else sampled labels.

    Args:
        ctx: the context (its loss).
        sub: the context restricted to the analysed block.
        kind: ``"ggn"`` or ``"fisher"``.
        loop: the data loop.
        fisher_samples: labels drawn per input for a sampled Fisher.
        generator: their random stream (default: stream 7 of the context's seed).
        options: operator options (``backend``, ``compile``, ``max_vectors``, ``autocast``, ...).

    Returns:
        The operator, with ``fisher_rule`` (exact identity) or ``fisher_samples`` (sampled) set for a Fisher.
    """
    _check_split_loss(ctx, kind)
    split = model_loss(sub)
    _check_tensor_outputs(sub, split, loop.batches, kind)
    name = ctx.loss_name
    if kind == "ggn" and name == "nll":
        raise DiagnosticsError(
            "--curvature ggn with --loss nll is zero: nll is linear in the model's outputs (log-probabilities); "
            "give the logits to --loss cross_entropy for the softmax's Gauss-Newton matrix, or use --curvature fisher"
        )
    if kind == "ggn" or name in FISHER_IDENTITY:
        op = GaussNewtonOperator(
            split, sub.params, loop, curvature=output_hessian(name, ctx.loss_fn), kind=kind, **options
        )
        if kind == "fisher":
            op.fisher_rule = FISHER_IDENTITY[name]  # type: ignore[attr-defined]
        return op
    curv = SampledFisherCurvature(
        split,
        sub.params,
        loop,
        samples=fisher_samples,
        generator=generator if generator is not None else ctx.generator(7),
        autocast=as_dtype(options.get("autocast"), "autocast"),
    )
    op = GaussNewtonOperator(split, sub.params, loop, curvature=curv, kind="fisher", **options)
    op.fisher_samples = int(fisher_samples)  # type: ignore[attr-defined]
    return op


def curvature_operator(
    ctx: Context,
    kind: str = "hessian",
    *,
    names: Sequence[str] | None = None,
    batches: Sequence[Batch] | None = None,
    shard: bool | None = None,
    fisher_samples: int = 16,
    generator: torch.Generator | None = None,
    **options: Any,
) -> LinearOperator:
    """The curvature matrix ``kind`` of ``ctx``'s mean loss over its batches (or ``batches``) w.r.t. ``names``.

    Args:
        ctx: the context.
        kind: one of :data:`~diagnostics.linalg.curvature.CURVATURES`: ``hessian``, ``ggn`` (closed-form
            output Hessian for cross_entropy, mse, bce_with_logits; autograd for a custom loss), ``fisher``
            (= GGN for the losses of :data:`FISHER_IDENTITY`, else sampled labels), ``empirical_fisher``,
            ``functional`` (``H - GGN``).
        names: restrict to these analysed parameters (the diagonal block).
        batches: use these batches instead of ``ctx.batches``.
        shard: shard the data over the process group (see :func:`data_loop`).
        fisher_samples: labels drawn per input for a sampled Fisher.
        generator: their random stream (default: stream 7 of the context's seed).
        **options: as for :func:`hessian_operator`.

    Returns:
        The operator (a :class:`~diagnostics.linalg.operator.DataOperator`, or a
        :class:`~diagnostics.linalg.curvature.FunctionalHessianOperator`). A sampled Fisher has
        ``fisher_samples`` set; others have ``fisher_rule`` where the exact identity was used.

    Raises:
        DiagnosticsError: a curvature the loss or model does not admit.
    """
    if kind not in CURVATURES:
        raise DiagnosticsError(f"unknown curvature '{kind}'; use one of {', '.join(CURVATURES)}")
    if kind == "hessian":
        return hessian_operator(ctx, names=names, batches=batches, shard=shard, **options)
    if kind == "functional":
        _check_split_loss(ctx, kind)
        h = hessian_operator(ctx, names=names, batches=batches, shard=shard, **options)
        options.pop("backend", None)
        g = curvature_operator(ctx, "ggn", names=names, batches=batches, shard=shard, backend=h.backend, **options)
        assert isinstance(g, GaussNewtonOperator)
        return FunctionalHessianOperator(h, g)
    sub = ctx if names is None else ctx.restrict(names=names)
    loop_keys = ("weights", "micro_batch", "accumulate_dtype")
    loop_options = {k: options.pop(k) for k in loop_keys if k in options}
    loop = data_loop(list(batches if batches is not None else sub.batches), shard=shard, **loop_options)
    if kind == "empirical_fisher":
        options.pop("backend", None)
        options.pop("compile", None)
        return EmpiricalFisherOperator(sub.batch_loss, sub.params, loop, **options)
    return _gauss_newton(ctx, sub, kind, loop, fisher_samples, generator, options)


__all__ = [
    "FISHER_IDENTITY",
    "DataOperator",
    "curvature_operator",
    "data_loop",
    "hessian_operator",
    "model_loss",
]
