"""Directions in parameter space, and the loss evaluated at many parameter points at once.

Directions (Li et al. 2018, "Visualizing the Loss Landscape of Neural Nets"):

* :func:`random_direction`: a Gaussian direction ``d ~ N(0, I)`` drawn from an explicit generator,
  then normalised by :func:`normalize_direction`:

  - ``filter`` (default): every output filter / row ``d_f`` of a tensor with ``dim >= 2`` (a slice along
    dim 0: a conv output channel, a linear output row) is rescaled to the norm of the matching filter of
    the weights, ``d_f <- d_f ||w_f|| / ||d_f||``; 1-d tensors (biases, norm parameters) are zeroed
    unless ``include_1d``, when each is rescaled as one filter. Scale-invariant networks (a filter
    followed by BatchNorm, a ReLU layer rescaled by ``a`` and the next by ``1/a``) give the same slice
    whatever the scale of the weights.
  - ``layer``: each tensor ``d_t <- d_t ||w_t|| / ||d_t||`` (1-d tensors as above).
  - ``unit``: the whole vector scaled to norm 1 (coordinates are Euclidean distances).
  - ``none``: as drawn.

  BatchNorm running statistics are buffers, not parameters, so they are never directions.
* :func:`orthogonalize`: Gram-Schmidt of a second direction against the first *within every
  normalisation unit* (filter, tensor or whole vector), each unit rescaled back to its norm, so the
  result is exactly orthogonal and still exactly normalised.
* :func:`hessian_directions`: unit top eigenvectors of the loss Hessian by Lanczos.

Evaluation: :class:`PointEvaluator` gives the context's full-data loss ``sum_b n_b L_b / N`` (``L_b`` as
:meth:`~diagnostics.context.Context.batch_loss` scales it: the mean over samples, or over counted targets
for token-level losses), the accuracy and optionally the predictions at ``K`` parameter points
``[K, dim]``, evaluating a chunk of points in one pass with ``torch.func.vmap`` over the context's
functional forward with stacked parameters (falling back to one point at a time where an op has no
batching rule), halving the chunk when memory runs out. Batches, model losses (``--loss model``) and
model outputs (a ``ModelOutput``'s logits are scored for accuracy) are handled as the context does.
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from diagnostics.binding import IGNORE_INDEX, output_tensor
from diagnostics.context import Batch, Context, batch_size
from diagnostics.errors import DiagnosticsError, one_line
from diagnostics.linalg.products import Layout

NORMALIZATIONS = ("filter", "layer", "unit", "none")
BACKENDS = ("auto", "vmap", "loop")
Params = dict[str, torch.Tensor]


# ------------------------------------------------------------------------------ flat parameter space
@dataclass(frozen=True)
class FlatSpace(Layout):
    """The flat concatenation of named tensors (in the order of ``names``), with their dtype and device.

    ``flatten``/``unflatten``/``slices``/``dim`` come from :class:`diagnostics.linalg.products.Layout`.
    """

    dtype: torch.dtype
    device: torch.device

    @classmethod
    def of(cls, params: Mapping[str, torch.Tensor]) -> FlatSpace:
        """The space of ``params`` (dict order); refuses an empty dict."""
        if not params:
            raise DiagnosticsError("no parameters to analyse")
        first = next(iter(params.values()))
        return cls(
            names=tuple(params),
            shapes=tuple(tuple(t.shape) for t in params.values()),
            numels=tuple(t.numel() for t in params.values()),
            dtype=first.dtype,
            device=first.device,
        )


# ----------------------------------------------------------------------------------- normalisation
def _check_mode(mode: str) -> None:
    if mode not in NORMALIZATIONS:
        raise DiagnosticsError(f"unknown normalisation '{mode}'; use one of {', '.join(NORMALIZATIONS)}")


def _units(t: torch.Tensor, mode: str) -> torch.Tensor:
    """View of ``t`` as ``[units, size]``: rows = filters (``filter``), one row (``layer``)."""
    if mode == "filter" and t.dim() >= 2:
        return t.reshape(t.shape[0], -1)
    return t.reshape(1, -1)


def _zeroed(t: torch.Tensor, mode: str, include_1d: bool) -> bool:
    return mode in ("filter", "layer") and t.dim() <= 1 and not include_1d


def normalize_direction(
    direction: Mapping[str, torch.Tensor],
    reference: Mapping[str, torch.Tensor],
    mode: str = "filter",
    include_1d: bool = False,
) -> Params:
    """Rescale a direction to the weights (Li et al. 2018); see the module docstring for the modes.

    Args:
        direction: ``{name: tensor}`` shaped like ``reference``.
        reference: the weights ``w``.
        mode: ``filter`` | ``layer`` | ``unit`` | ``none``.
        include_1d: rescale 1-d tensors (biases, norm parameters) as one filter instead of zeroing them.

    Returns:
        ``{name: tensor}``; a filter whose weights are all zero gets a zero direction.
    """
    _check_mode(mode)
    if mode == "none":
        return {n: d.clone() for n, d in direction.items()}
    if mode == "unit":
        total = math.sqrt(sum(float((d.double() ** 2).sum()) for d in direction.values()))
        if total == 0:
            raise DiagnosticsError("cannot normalise a zero direction")
        return {n: d / total for n, d in direction.items()}
    out: Params = {}
    for name, d in direction.items():
        w = reference[name]
        if _zeroed(d, mode, include_1d):
            out[name] = torch.zeros_like(d)
            continue
        du, wu = _units(d, mode), _units(w.to(d.dtype), mode)
        dn = du.norm(dim=1, keepdim=True)
        scale = torch.where(dn > 0, wu.norm(dim=1, keepdim=True) / dn.clamp_min(torch.finfo(d.dtype).tiny), 0.0)
        out[name] = (du * scale).reshape(d.shape)
    return out


def random_direction(
    params: Mapping[str, torch.Tensor],
    generator: torch.Generator,
    mode: str = "filter",
    include_1d: bool = False,
) -> Params:
    """A Gaussian direction drawn on the CPU in float64 (device-independent), then normalised.

    Shapes: ``{name: shape}`` -> ``{name: shape}`` in the dtype/device of ``params``.
    """
    _check_mode(mode)
    raw = {
        n: torch.randn(tuple(t.shape), generator=generator, dtype=torch.float64).to(dtype=t.dtype, device=t.device)
        for n, t in params.items()
    }
    return normalize_direction(raw, params, mode, include_1d)


def orthogonalize(
    first: Mapping[str, torch.Tensor],
    second: Mapping[str, torch.Tensor],
    mode: str = "filter",
) -> Params:
    """``second`` made orthogonal to ``first`` unit by unit (filters / tensors / whole vector).

    In each unit ``u``: ``s_u <- s_u - (<s_u, f_u> / <f_u, f_u>) f_u``, then rescaled to its former norm.
    Orthogonal units sum to orthogonal vectors, and the normalisation of ``second`` is kept exactly. A
    unit that is parallel to ``first`` (e.g. a one-element filter) becomes zero.
    """
    _check_mode(mode)
    if mode in ("unit", "none"):
        f = torch.cat([first[n].reshape(-1) for n in first])
        s = torch.cat([second[n].reshape(-1) for n in first])
        norm = s.norm()
        ff = torch.dot(f, f)
        s = s - (torch.dot(s, f) / ff) * f if ff > 0 else s
        s = s * (norm / s.norm()) if s.norm() > 0 else s
        space = FlatSpace.of(first)
        return space.unflatten(s)
    out: Params = {}
    for name, s in second.items():
        f = first[name]
        su, fu = _units(s, mode).clone(), _units(f, mode)
        norm = su.norm(dim=1, keepdim=True)
        ff = (fu * fu).sum(dim=1, keepdim=True)
        coef = torch.where(ff > 0, (su * fu).sum(dim=1, keepdim=True) / ff.clamp_min(torch.finfo(s.dtype).tiny), 0.0)
        su = su - coef * fu
        new = su.norm(dim=1, keepdim=True)
        tiny = 1e-12 * norm.clamp_min(torch.finfo(s.dtype).tiny)
        su = torch.where(new > tiny, su * (norm / new.clamp_min(torch.finfo(s.dtype).tiny)), 0.0)
        out[name] = su.reshape(s.shape)
    return out


def hessian_directions(
    ctx: Context,
    k: int,
    *,
    tol: float = 1e-3,
    max_iter: int = 300,
    generator: torch.Generator | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[list[Params], list[float], dict]:
    """The top-``k`` unit eigenvectors of the loss Hessian (Lanczos), signs fixed.

    Each eigenvector's sign is chosen so that its entry of largest magnitude is positive (eigenvectors
    are defined up to sign; this makes slices reproducible).

    Returns:
        (directions ``[{name: tensor}] * k``, eigenvalues (descending), Lanczos info).
    """
    from diagnostics.linalg.lanczos import lanczos
    from diagnostics.operators import hessian_operator

    op = hessian_operator(ctx)
    if k > op.dim:
        raise DiagnosticsError(f"asked for {k} Hessian directions of a {op.dim}-parameter model")
    res = lanczos(op, k_top=k, tol=tol, max_iter=max_iter, generator=generator, progress=progress)
    space = FlatSpace.of(ctx.params)
    dirs = []
    for j in range(k):
        v = res.eigenvectors[:, j]
        v = v / v.norm()
        if float(v[int(v.abs().argmax())]) < 0:
            v = -v
        dirs.append(space.unflatten(v.to(dtype=space.dtype, device=space.device)))
    info = {
        "iterations": res.iterations,
        "converged": res.converged,
        "hvps": op.hvp_count,
        "residuals": res.residuals.tolist(),
        "tol": tol,
    }
    return dirs, res.eigenvalues.tolist(), info


def filter_scales(
    params: Mapping[str, torch.Tensor],
    include_1d: bool = True,
) -> torch.Tensor:
    """``[dim]``: every entry's filter norm ``||w_f||`` (1-d tensors: the tensor's norm, or 0 if excluded).

    The diagonal map ``u -> scales * u`` takes the unit geometry of filter-normalised coordinates to
    weight space: a perturbation ``e = scales * u`` changes each filter by ``||u_f||`` times its norm.
    """
    parts = []
    for t in params.values():
        if t.dim() >= 2:
            rows = t.reshape(t.shape[0], -1)
            parts.append(rows.norm(dim=1, keepdim=True).expand_as(rows).reshape(-1))
        elif include_1d:
            parts.append(torch.full((t.numel(),), float(t.norm()), dtype=t.dtype, device=t.device))
        else:
            parts.append(torch.zeros(t.numel(), dtype=t.dtype, device=t.device))
    return torch.cat(parts)


def inner(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """``<a, b>`` summed over all tensors, in float64."""
    return float(sum((a[n].double() * b[n].double()).sum() for n in a))


# -------------------------------------------------------------------------------------- accuracy
def accuracy_kind(outputs: Any, targets: torch.Tensor, loss_name: str) -> str | None:
    """How to score predictions: ``argmax`` (class labels), ``argmax_soft`` (one-hot / probability
    targets), ``sign`` (one logit per sample with a BCE loss), or None (regression: no accuracy).

    Outputs that are not a tensor are scored on their prediction tensor (:func:`~diagnostics.binding.output_tensor`:
    a ``ModelOutput``'s logits, the first tensor of a tuple).
    """
    outputs = output_tensor(outputs)
    if not isinstance(outputs, torch.Tensor) or not isinstance(targets, torch.Tensor):
        return None
    if outputs.dim() == 2 and outputs.shape[1] > 1:
        if targets.dim() == 1 and not targets.is_floating_point():
            return "argmax"
        if targets.shape == outputs.shape and targets.is_floating_point():
            return "argmax_soft"
        return None
    if loss_name == "bce_with_logits" and outputs.numel() == targets.numel():
        return "sign"
    return None


def _predict(outputs: Any, kind: str) -> torch.Tensor:
    """Predicted labels ``[n]`` from the model's outputs (their prediction tensor, see :func:`accuracy_kind`)."""
    outputs = output_tensor(outputs)
    if kind in ("argmax", "argmax_soft"):
        return outputs.argmax(dim=1)
    return (outputs.reshape(-1) > 0).long()


def _truth(targets: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "argmax":
        return targets.long()
    if kind == "argmax_soft":
        return targets.argmax(dim=1)
    return (targets.reshape(-1) > 0.5).long()


def _scored(targets: torch.Tensor, kind: str | None) -> torch.Tensor:
    """``[n]`` bool: the samples accuracy counts (class labels other than cross-entropy's ignore_index -100)."""
    if kind == "argmax":
        return targets.reshape(-1) != IGNORE_INDEX
    return torch.ones(targets.shape[0], dtype=torch.bool, device=targets.device)


# ------------------------------------------------------------------------------------- evaluation
@dataclass
class PointStats:
    """What :meth:`PointEvaluator.evaluate` returns for ``K`` points.

    Attributes:
        loss: ``[K]`` float64, the full-data loss (the sample-weighted mean of the scaled batch losses).
        accuracy: ``[K]`` float64 fraction correct (of the labels the loss counts: -100 is not scored), or None
            when the task has no accuracy.
        predictions: ``[K, N]`` int64 predicted labels over all samples in batch order, when asked.
    """

    loss: torch.Tensor
    accuracy: torch.Tensor | None
    predictions: torch.Tensor | None = None


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError | MemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def _choose_backend(ctx: Context, backend: str) -> tuple[str, str]:
    """``auto`` -> ``vmap``, except for convolutional models on the CPU -> ``loop``.

    Under ``vmap``, a convolution with stacked weights becomes a grouped convolution, which CPU kernels
    run several times slower than one convolution per point (measured in ``benchmarks/bench_landscape.py``);
    everything else gains from batching, most on accelerators. The rule is static, so a run's numbers do
    not depend on timings.
    """
    if backend != "auto":
        return backend, "requested"
    convs = [m for m in ctx.model.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    if convs and ctx.device.type == "cpu":
        return "loop", "auto: convolutions on the CPU (grouped convolutions under vmap are slow)"
    return "vmap", "auto"


class PointEvaluator:
    """Loss / accuracy / predictions of ``ctx``'s model at many points of its parameter space.

    A point is a flat vector ``[dim]`` over ``ctx.params`` (see :class:`FlatSpace`); frozen
    parameters and buffers come from ``ctx.frozen`` unless a per-point override is given.

    Args:
        ctx: the context (model, data, loss).
        chunk: points per vmapped pass (halved automatically when memory runs out).
        backend: ``auto`` (vmap; one point at a time for convolutional models on the CPU, see
            :func:`_choose_backend`; falls back to the loop where vmap fails), ``vmap`` or ``loop``.
        bn_recompute: before evaluating a point, recompute every BatchNorm layer's running statistics
            on the data at that point (train-mode passes with cumulative averaging, momentum ``None``,
            as ``torch.optim.swa_utils.update_bn``), then evaluate in eval mode.
    """

    def __init__(self, ctx: Context, *, chunk: int = 32, backend: str = "auto", bn_recompute: bool = False) -> None:
        if backend not in BACKENDS:
            raise DiagnosticsError(f"unknown evaluation backend '{backend}'; use {', '.join(BACKENDS)}")
        if chunk < 1:
            raise DiagnosticsError(f"--chunk must be positive, got {chunk}")
        self.ctx = ctx
        self.space = FlatSpace.of(ctx.params)
        self.chunk = int(chunk)
        self.requested_backend = backend
        self.backend, self.backend_reason = _choose_backend(ctx, backend)
        self.bn_recompute = bn_recompute
        self.evaluations = 0
        self.notes: list[str] = []
        self.sizes = [batch_size(b) for b in ctx.batches]
        self.n = sum(self.sizes)
        self._bn_ctx: Context | None = None  # the context with BatchNorm layers in train mode
        self.bn_buffers = [
            f"{name}.{b}" if name else b
            for name, m in ctx.model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
            for b in ("running_mean", "running_var", "num_batches_tracked")
        ]
        if bn_recompute and not self.bn_buffers:
            self.notes.append("--bn-recompute: the model has no BatchNorm running statistics; nothing recomputed")
            self.bn_recompute = False
        self.kind = None
        if ctx.batches[0][1] is not None:
            with torch.no_grad():
                out0, _ = ctx.raw_outputs_and_loss(ctx.params, ctx.batches[0])
            self.kind = accuracy_kind(out0, ctx.batches[0][1], ctx.loss_name)
        # accuracy is over the counted labels: a -100 label (cross-entropy's ignore_index) is no sample to score
        self.scored = sum(int(_scored(b[1], self.kind).sum()) for b in ctx.batches) if self.kind else 0
        if self.kind and self.scored == 0:
            self.notes.append("every label is -100 (ignored by the loss): no accuracy to report")
            self.kind = None

    # -- one point / one chunk on one batch
    def _call(
        self, flat: torch.Tensor, buffers: Mapping[str, torch.Tensor], batch: Batch, kind: str | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(float64 loss ``L_b`` scaled as :meth:`Context.batch_loss`, predicted labels or None) at one point.

        ``buffers`` override the context's frozen tensors; the loss is the context's (dict batches as
        keyword arguments, ``--loss model`` labels, token weighting), so ``sum_b n_b L_b / N`` is the
        full-data loss.
        """
        out, loss = self.ctx.outputs_and_loss({**buffers, **self.space.unflatten(flat)}, batch)
        return loss.to(torch.float64), (None if kind is None else _predict(out, kind))

    def _chunk_stats(
        self, P: torch.Tensor, buffers: Mapping[str, torch.Tensor], want_pred: bool, backend: str
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """``P [k, dim]``, per-point ``buffers {name: [k, ...]}`` -> (loss [k], correct [k], pred [k, N])."""
        k = P.shape[0]
        loss = torch.zeros(k, dtype=torch.float64, device=P.device)
        correct = torch.zeros(k, dtype=torch.float64, device=P.device) if self.kind else None
        preds = []
        for batch, nb in zip(self.ctx.batches, self.sizes):
            if backend == "vmap":
                if self.kind is None:
                    fn = torch.func.vmap(
                        lambda p, b, batch=batch: self._call(p, b, batch, None)[0], in_dims=(0, 0), randomness="error"
                    )
                    lb, pb = fn(P, dict(buffers)), None
                else:
                    fn = torch.func.vmap(
                        lambda p, b, batch=batch: self._call(p, b, batch, self.kind), in_dims=(0, 0), randomness="error"
                    )
                    lb, pb = fn(P, dict(buffers))
            else:
                outs = [self._call(P[i], {n: t[i] for n, t in buffers.items()}, batch, self.kind) for i in range(k)]
                lb = torch.stack([o[0] for o in outs])
                pb = torch.stack([o[1] for o in outs]) if self.kind else None
            loss += lb * nb
            if self.kind:
                truth = _truth(batch[1], self.kind)
                hits = (pb == truth.unsqueeze(0)) & _scored(batch[1], self.kind).unsqueeze(0)
                correct += hits.sum(dim=1).to(torch.float64)
                if want_pred:
                    preds.append(pb)
        pred = torch.cat(preds, dim=1) if want_pred and self.kind else None
        return loss / self.n, (None if correct is None else correct / self.scored), pred

    def _recompute_bn(self, flat: torch.Tensor, buffers: Mapping[str, torch.Tensor]) -> Params:
        """Running statistics of every BatchNorm layer recomputed on the data at one point."""
        if self._bn_ctx is None:
            model = copy.deepcopy(self.ctx.model)
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.train()
                    m.momentum = None
            self._bn_ctx = replace(self.ctx, model=model)
        fresh: Params = {}
        for name in self.bn_buffers:
            ref = self.ctx.frozen[name]
            if name.endswith("running_mean") or name.endswith("num_batches_tracked"):
                fresh[name] = torch.zeros_like(ref)
            else:
                fresh[name] = torch.ones_like(ref)
        tensors = {**buffers, **self.space.unflatten(flat), **fresh}
        with torch.no_grad():
            for x, _ in self.ctx.batches:
                self._bn_ctx.forward(tensors, x)  # updates ``fresh`` in place
        return fresh

    # -- public
    def _run(
        self, P: torch.Tensor, bufs: dict[str, torch.Tensor], predictions: bool, backend: str
    ) -> list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]]:
        """Evaluate one slice of points with ``backend`` (BatchNorm statistics recomputed first if asked)."""
        if self.bn_recompute:
            per = [self._recompute_bn(P[i], {n: t[i] for n, t in bufs.items()}) for i in range(P.shape[0])]
            bufs = {**bufs, **{n: torch.stack([p[n] for p in per]) for n in self.bn_buffers}}
        return self._stats(P, bufs, predictions, backend)

    def _stats(
        self, P: torch.Tensor, bufs: dict[str, torch.Tensor], predictions: bool, backend: str
    ) -> list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]]:
        """``_chunk_stats``, halving the slice when memory runs out and falling back to the loop if vmap fails."""
        try:
            with torch.no_grad():
                out = self._chunk_stats(P, bufs, predictions, backend)
        except Exception as exc:
            if _is_oom(exc) and P.shape[0] > 1:
                half = P.shape[0] // 2
                self.chunk = max(1, min(self.chunk, half))
                self.notes.append(f"out of memory: evaluating {self.chunk} points per pass instead")
                first = self._stats(P[:half], {n: t[:half] for n, t in bufs.items()}, predictions, backend)
                return first + self._stats(P[half:], {n: t[half:] for n, t in bufs.items()}, predictions, backend)
            if _is_oom(exc):
                raise DiagnosticsError(
                    "out of memory evaluating one parameter point; use --samples or --batch-size"
                ) from exc
            if backend == "vmap" and self.requested_backend == "auto":
                self.backend = "loop"
                self.backend_reason = "vmap failed"
                message = one_line(exc, 160)
                self.notes.append(
                    f"batched evaluation (vmap) failed ({type(exc).__name__}: {message}); "
                    "points are evaluated one at a time"
                )
                return self._stats(P, bufs, predictions, "loop")
            raise
        self.evaluations += int(P.shape[0])
        return [out]

    def evaluate(
        self,
        points: torch.Tensor,
        *,
        buffers: Mapping[str, torch.Tensor] | None = None,
        predictions: bool = False,
    ) -> PointStats:
        """Statistics at ``points [K, dim]`` (optionally with per-point frozen tensors ``{name: [K, ...]}``)."""
        if points.dim() != 2 or points.shape[1] != self.space.dim:
            raise ValueError(f"points must be [K, {self.space.dim}], got {tuple(points.shape)}")
        points = points.to(dtype=self.space.dtype, device=self.space.device)
        buffers = dict(buffers or {})
        K = points.shape[0]
        parts: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]] = []
        start = 0
        while start < K:
            stop = min(start + self.chunk, K)
            sl = slice(start, stop)
            parts += self._run(points[sl], {n: t[sl] for n, t in buffers.items()}, predictions, self.backend)
            start = stop
        losses = [p[0] for p in parts]
        accs = [p[1] for p in parts if p[1] is not None]
        preds = [p[2] for p in parts if p[2] is not None]
        return PointStats(
            loss=torch.cat(losses).cpu() if losses else torch.zeros(0, dtype=torch.float64),
            accuracy=torch.cat(accs).cpu() if accs else None,
            predictions=torch.cat(preds).cpu() if preds else None,
        )

    def loss_at(self, flat: torch.Tensor) -> float:
        """The loss at one point (convenience)."""
        return float(self.evaluate(flat.reshape(1, -1)).loss[0])


# ---------------------------------------------------------------------------------- fingerprints
def tensors_digest(tensors: Mapping[str, torch.Tensor], h: hashlib._Hash | None = None) -> hashlib._Hash:
    """Feed names, shapes, dtypes and bytes of tensors into a sha256 (for cache keys)."""
    h = h or hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h
