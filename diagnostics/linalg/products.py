"""Hessian-vector products of one batch's loss, one function per backend.

Every product has the signature ``product(loss_fn, params, batch, V, *, autocast=None) -> HV`` with

* ``loss_fn(params, batch) -> scalar``: the mean loss ``L_b`` of one batch,
* ``params``: the point ``w`` as ``{name: tensor}``; vectors are their flat concatenation (``n`` entries,
  in the order of ``params``, see :class:`Layout`),
* ``V``: ``[n, k]`` tangent vectors; the result is ``H_b V`` with ``H_b = d^2 L_b / dw^2``, ``[n, k]``.

Backends:

* :func:`forward_over_reverse`: ``torch.func.jvp`` of ``torch.func.grad`` (Pearlmutter 1994), batched
  over the ``k`` columns with ``torch.func.vmap``: the data pass and the primal forward/backward are
  paid once for the whole block.
* :func:`reverse_over_reverse`: double backward, one backward pass per column through the graph of
  the gradient (works where an op lacks forward-mode rules or ``vmap`` support).
* :class:`CachedGraph`: double backward through each batch's gradient graph, built once and kept, as
  PyHessian does: later products cost one backward pass, at the price of keeping every batch's
  activations alive.

:class:`Product` picks one (``auto``: the cached graph for one batch, else forward-over-reverse,
falling back to double backward) and optionally ``torch.compile``-s it, falling back to eager with a
note when compilation fails.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from diagnostics.batches import Batch

LossFn = Callable[[Mapping[str, torch.Tensor], Batch], torch.Tensor]
ProductFn = Callable[..., torch.Tensor]
Params = Mapping[str, torch.Tensor]
MaybeDtype = torch.dtype | None
BACKENDS = ("auto", "cached", "forward", "reverse")
_DTYPE_NAMES = {
    "float16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}


def unit_roundoff(dtype: torch.dtype) -> float:
    """``u = eps / 2`` of a floating dtype."""
    return float(torch.finfo(dtype).eps) / 2


def as_dtype(value: torch.dtype | str | None, what: str) -> torch.dtype | None:
    """``"bfloat16" -> torch.bfloat16`` (``None`` and dtypes pass through).

    Args:
        value: a dtype, its name, or None.
        what: the option's name, for the error message.

    Returns:
        The dtype, or None.
    """
    if value is None or isinstance(value, torch.dtype):
        return value
    if value not in _DTYPE_NAMES:
        raise ValueError(f"{what}: unknown dtype {value!r}; use one of {', '.join(_DTYPE_NAMES)}")
    return _DTYPE_NAMES[value]


@dataclass(frozen=True)
class Layout:
    """Where each parameter sits in the flat vector: ``names``, ``shapes`` and ``numels`` in order."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    numels: tuple[int, ...]

    @classmethod
    def of(cls, params: Mapping[str, torch.Tensor]) -> Layout:
        """The layout of ``params`` (dict order)."""
        return cls(
            tuple(params), tuple(tuple(t.shape) for t in params.values()), tuple(t.numel() for t in params.values())
        )

    @property
    def dim(self) -> int:
        """``n``, the length of the flat vector."""
        return int(sum(self.numels))

    def flatten(self, tensors: Mapping[str, torch.Tensor] | Sequence[torch.Tensor]) -> torch.Tensor:
        """``{name: tensor}`` (or tensors in layout order) -> ``[n]``."""
        seq = [tensors[n] for n in self.names] if isinstance(tensors, Mapping) else list(tensors)
        return torch.cat([t.reshape(-1) for t in seq])

    def unflatten(self, v: torch.Tensor) -> dict[str, torch.Tensor]:
        """``[n]`` -> ``{name: tensor of the parameter's shape}`` (views of ``v``)."""
        parts = torch.split(v, list(self.numels))
        return {n: p.reshape(s) for n, p, s in zip(self.names, parts, self.shapes)}

    def slices(self) -> dict[str, slice]:
        """``{name: slice}`` of each parameter in the flat vector."""
        out, start = {}, 0
        for n, k in zip(self.names, self.numels):
            out[n] = slice(start, start + k)
            start += k
        return out


def math_attention() -> contextlib.AbstractContextManager:
    """``scaled_dot_product_attention`` restricted to its twice-differentiable math kernel.

    Fused attention kernels (flash, memory-efficient) have neither forward-mode rules nor a second
    derivative; the math kernel is made of differentiable primitives.
    """
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3: the old context manager
        return torch.backends.cuda.sdp_kernel(enable_flash=False, enable_mem_efficient=False, enable_math=True)
    return sdpa_kernel(SDPBackend.MATH)


def evaluate_loss(
    loss_fn: LossFn, params: Mapping[str, torch.Tensor], batch: Batch, autocast: torch.dtype | None = None
) -> torch.Tensor:
    """``loss_fn(params, batch)`` under ``torch.autocast(autocast)`` when given.

    Args:
        loss_fn: ``fn(params, batch) -> scalar``.
        params: ``{name: tensor}``.
        batch: one batch.
        autocast: ``torch.bfloat16`` / ``torch.float16`` to run the forward in mixed precision.

    Returns:
        The scalar loss.
    """
    if autocast is None:
        return loss_fn(params, batch)
    device = next(iter(params.values())).device
    with torch.autocast(device_type=device.type, dtype=autocast):
        return loss_fn(params, batch)


def forward_over_reverse(
    loss_fn: LossFn,
    params: Params,
    batch: Batch,
    V: torch.Tensor,
    *,
    autocast: MaybeDtype = None,
) -> torch.Tensor:
    """``H_b V`` by ``jvp(grad(L_b))`` (forward-over-reverse), vmapped over the columns of ``V``.

    Args:
        loss_fn: ``fn(params, batch) -> scalar`` mean loss of one batch.
        params: the point ``w`` as ``{name: tensor}`` (``n`` entries in all).
        batch: the batch.
        V: ``[n, k]`` tangent vectors.
        autocast: optional mixed-precision dtype of the forward.

    Returns:
        ``[n, k]``: ``H_b V``.
    """
    layout = Layout.of(params)

    def grad_flat(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return layout.flatten(torch.func.grad(lambda q: evaluate_loss(loss_fn, q, batch, autocast))(p))

    def one(v: torch.Tensor) -> torch.Tensor:
        return torch.func.jvp(grad_flat, (dict(params),), (layout.unflatten(v),))[1]

    if V.shape[1] == 1:
        return one(V[:, 0]).reshape(-1, 1)
    return torch.func.vmap(one, in_dims=1, out_dims=1)(V)


def _gradient_graph(
    loss_fn: LossFn, params: Mapping[str, torch.Tensor], batch: Batch, autocast: torch.dtype | None
) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """Fresh leaves for ``params`` and the gradient of ``L_b`` w.r.t. them, with its graph (``None``
    where a gradient does not depend on the parameters: its second derivative is zero)."""
    leaves = [t.detach().requires_grad_(True) for t in params.values()]
    with torch.enable_grad():
        loss = evaluate_loss(loss_fn, dict(zip(params, leaves)), batch, autocast)
        grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
    return leaves, [g if g is not None and g.requires_grad else None for g in grads]


def _directional(grads: list[torch.Tensor], parts: list[torch.Tensor]) -> torch.Tensor:
    """The scalar ``sum_i <grads_i, parts_i>`` (its gradient w.r.t. the leaves is ``H v``).

    Differentiating this scalar passes exactly ``parts`` into the gradient graph (the backward of a
    product with a constant is the constant), so the result is the same as ``torch.autograd.grad`` with
    ``grad_outputs=parts``, without the ``grad_outputs`` shape check that imports ``sympy`` (~0.2 s on
    the first product of a process).
    """
    total = (grads[0] * parts[0]).sum()
    for g, v in zip(grads[1:], parts[1:]):
        total = total + (g * v).sum()
    return total


def _backward_products(
    leaves: list[torch.Tensor], grads: list[torch.Tensor | None], V: torch.Tensor, retain: bool
) -> torch.Tensor:
    """``[n, k]``: one backward pass per column of ``V`` through the gradient graph ``grads(leaves)``.

    Each column's product is written straight into the ``[n, k]`` result (no per-column copies); only the
    slots of parameters the product does not reach are zero-filled.
    """
    used = [i for i, g in enumerate(grads) if g is not None]
    if not used:
        return torch.zeros(V.shape, dtype=V.dtype, device=V.device)
    out = torch.empty(V.shape, dtype=V.dtype, device=V.device)
    numels = [t.numel() for t in leaves]
    k = V.shape[1]
    for j in range(k):
        parts = torch.split(V[:, j], numels)
        scalar = _directional(
            [grads[i] for i in used], [parts[i].reshape(leaves[i].shape).to(grads[i].dtype) for i in used]
        )
        hv = torch.autograd.grad(scalar, leaves, retain_graph=retain or j < k - 1, allow_unused=True)
        for h, dest in zip(hv, torch.split(out[:, j], numels)):
            if h is None:
                dest.zero_()
            else:
                dest.copy_(h.detach().reshape(-1))
    return out


def reverse_over_reverse(
    loss_fn: LossFn,
    params: Params,
    batch: Batch,
    V: torch.Tensor,
    *,
    autocast: MaybeDtype = None,
) -> torch.Tensor:
    """``H_b V`` by double backward: the gradient with its graph, then one backward pass per column.

    Args:
        loss_fn: ``fn(params, batch) -> scalar`` mean loss of one batch.
        params: the point ``w`` as ``{name: tensor}`` (``n`` entries in all).
        batch: the batch.
        V: ``[n, k]`` tangent vectors.
        autocast: optional mixed-precision dtype of the forward.

    Returns:
        ``[n, k]``: ``H_b V``.
    """
    leaves, grads = _gradient_graph(loss_fn, params, batch, autocast)
    return _backward_products(leaves, grads, V, retain=False)


class CachedGraph:
    """Double backward through each batch's gradient graph, built on first use and kept.

    Called like the other products; the graph of a batch is keyed by the identity of ``params`` and
    ``batch`` (both are held, so the key stays unique while cached). Memory: every cached batch's
    activations, for the lifetime of this object.
    """

    def __init__(self) -> None:
        self.graphs: dict[tuple[int, int], tuple[Any, Any, list[torch.Tensor], list[torch.Tensor | None]]] = {}

    def __call__(
        self,
        loss_fn: LossFn,
        params: Params,
        batch: Batch,
        V: torch.Tensor,
        *,
        autocast: MaybeDtype = None,
    ) -> torch.Tensor:
        """``[n, k]``: ``H_b V`` through the kept graph of ``batch`` (see :func:`reverse_over_reverse`)."""
        key = (id(params), id(batch))
        if key not in self.graphs:
            self.graphs[key] = (params, batch, *_gradient_graph(loss_fn, params, batch, autocast))
        _, _, leaves, grads = self.graphs[key]
        return _backward_products(leaves, grads, V, retain=True)


def _own_copy(fn: ProductFn) -> ProductFn:
    """``fn`` with a code object of its own: dynamo keeps its compiled graphs (and its recompile budget)
    per code object, so every operator compiles its product for its own shapes without evicting, or
    being evicted by, another operator's (e.g. the per-layer operators of one analysis)."""
    code = fn.__code__.replace()  # type: ignore[attr-defined]
    copy = types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)  # type: ignore[attr-defined]
    copy.__kwdefaults__ = fn.__kwdefaults__  # type: ignore[attr-defined]
    return copy


class Compiled:
    """``torch.compile`` of a product, with a clean fallback to eager.

    Compiled with static shapes (``dynamic=False``: one graph per batch size and block width, which
    an operator has few of; symbolic shapes fail on forward-mode convolutions in current PyTorch). The
    first call runs the compiled function; if that raises, the eager function is tried: if it
    succeeds, compilation is given up for good and :attr:`note` says why; if it fails too, its error is
    raised (the problem is not compilation).
    """

    def __init__(self, fn: ProductFn, name: str) -> None:
        self.eager = fn
        self.name = name
        self.note: str | None = None
        self._compiled: ProductFn | None = None
        self._failed = False

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The compiled product (or the eager one once compilation has failed)."""
        if not self._failed:
            try:
                if self._compiled is None:
                    self._compiled = torch.compile(_own_copy(self.eager), dynamic=False)
                return self._compiled(*args, **kwargs)
            except Exception as exc:  # any compiler failure: decided below by trying eager
                reason = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]}"
            out = self.eager(*args, **kwargs)
            self._failed = True
            self.note = f"--compile: torch.compile of the {self.name} HVP failed ({reason}); eager products were used"
            return out
        return self.eager(*args, **kwargs)


class Product:
    """The per-batch HVP an operator uses: a backend, its fallback, and optional compilation.

    Args:
        backend: ``"auto"`` (cached graph for one batch, else forward-over-reverse falling back to
            double backward on the first product that fails), ``"cached"``, ``"forward"`` or
            ``"reverse"``.
        n_batches: how many batches the operator's data loop holds (for ``"auto"``).
        compile: wrap the forward-over-reverse and double-backward products in ``torch.compile`` (see
            :class:`Compiled`). The cached graph is not compiled (its products are backward passes
            through a kept graph), and ``"auto"`` keeps it for one batch: on CPU a product through it
            cost 1.4-1.7 gradients against 1.5-2.7 for compiled forward-over-reverse at one vector
            (``benchmarks/bench_compile.py``, an MLP, a CNN, a transformer); a note says so.

    Attributes:
        backend: the backend in use (``"auto"`` until a fallback to ``"reverse"`` happens).
    """

    def __init__(self, backend: str = "auto", *, n_batches: int = 1, compile: bool = False) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
        if backend == "auto" and n_batches == 1:
            backend = "cached"
        self.backend = backend
        self.compile = bool(compile)
        self._cached = CachedGraph() if backend == "cached" else None
        self._notes: list[str] = []
        if self.compile and backend == "cached":
            self._notes.append(
                "--compile does not apply to the cached backend (the choice of --backend auto for one batch; "
                "its products are backward passes through a kept graph, cheaper on CPU than compiled "
                "forward-over-reverse at one vector, see benchmarks/bench_compile.py); pass --backend forward "
                "to compile forward-over-reverse products"
            )
        self._forward = self._wrap(forward_over_reverse, "forward-over-reverse")
        self._reverse = self._wrap(reverse_over_reverse, "double-backward")

    def _wrap(self, fn: ProductFn, name: str) -> ProductFn:
        return Compiled(fn, name) if self.compile else fn

    @property
    def notes(self) -> list[str]:
        """Notes for the user (e.g. why compilation was given up)."""
        fns = (self._forward, self._reverse)
        return self._notes + [f.note for f in fns if isinstance(f, Compiled) and f.note is not None]

    @property
    def cached_graphs(self) -> int:
        """How many batch graphs the cached backend holds."""
        return 0 if self._cached is None else len(self._cached.graphs)

    def __call__(
        self,
        loss_fn: LossFn,
        params: Params,
        batch: Batch,
        V: torch.Tensor,
        *,
        autocast: MaybeDtype = None,
    ) -> torch.Tensor:
        """``[n, k]``: ``H_b V`` by the chosen backend (math attention kernel throughout)."""
        with math_attention():
            if self._cached is not None:
                return self._cached(loss_fn, params, batch, V, autocast=autocast)
            if self.backend in ("auto", "forward"):
                try:
                    return self._forward(loss_fn, params, batch, V, autocast=autocast)
                except (RuntimeError, NotImplementedError) as exc:
                    reason = _first_line(exc)
                    if self.backend == "forward":
                        from diagnostics.errors import DiagnosticsError

                        raise DiagnosticsError(
                            f"--backend forward: forward-mode differentiation fails on this model ({reason}); "
                            "pass --backend reverse (double backward) or --backend auto"
                        ) from exc
                    self.backend = "reverse"
                    self._notes.append(
                        f"forward-over-reverse products failed ({reason}); double backward (--backend reverse) "
                        "was used instead"
                    )
            return self._reverse(loss_fn, params, batch, V, autocast=autocast)


def _first_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (at most 160 characters)."""
    text = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {text[:160]}"


# ------------------------------------------------------------------------ curvature beyond the Hessian
#
# The generalised Gauss-Newton (GGN) of a loss ``L(w) = l(f(w, x), y)`` split at the model's outputs
# ``z = f(w, x)`` is ``G = J^T H_l J`` with ``J = dz/dw`` and ``H_l = d^2 l / dz^2`` (Schraudolph 2002;
# Martens 2014). Products ``G V`` never form ``J``: ``J V`` by forward mode (``jvp``), ``H_l`` in the
# output space (closed form, or autograd), ``J^T`` by reverse mode (``vjp``). The Hessian is
# ``H = G + sum_j (dl/dz_j) d^2 z_j / dw^2``; ``H - G`` is that second, "functional" part.
#
# An output-space curvature is ``curvature(outputs, batch) -> apply``, where ``apply(U)`` maps
# ``U [k, *outputs.shape]`` (``k`` output-space tangents) to ``M U`` of the same shape, ``M`` a symmetric
# matrix on the outputs of the whole batch (e.g. ``H_l`` of the batch's mean loss, block-diagonal over
# samples).

OutputCurvature = Callable[[torch.Tensor, Batch], Callable[[torch.Tensor], torch.Tensor]]


@dataclass(frozen=True)
class ModelLoss:
    """A batch loss split at the model's outputs: ``L_b(w) = loss(forward(w, inputs), targets)``.

    Batches are ``(inputs, targets)`` pairs. Called as ``model_loss(params, batch)`` it is the plain
    batch loss (a :data:`LossFn`), so the Hessian of the same split loss is available too.

    Attributes:
        forward: ``forward(params, inputs) -> outputs`` (a tensor ``z``).
        loss: ``loss(outputs, targets) -> scalar``, the mean loss of the batch.
    """

    forward: Callable[[Mapping[str, torch.Tensor], Any], torch.Tensor]
    loss: Callable[[torch.Tensor, Any], torch.Tensor]

    def __call__(self, params: Mapping[str, torch.Tensor], batch: Batch) -> torch.Tensor:
        """``L_b(w)``: the loss of the model's outputs on the batch's targets."""
        inputs, targets = batch
        return self.loss(self.forward(params, inputs), targets)

    def outputs(
        self, params: Mapping[str, torch.Tensor], inputs: Any, autocast: torch.dtype | None = None
    ) -> torch.Tensor:
        """``forward(params, inputs)`` (under autocast when given), checked to be a tensor."""
        if autocast is None:
            out = self.forward(params, inputs)
        else:
            device = next(iter(params.values())).device
            with torch.autocast(device_type=device.type, dtype=autocast):
                out = self.forward(params, inputs)
        if not isinstance(out, torch.Tensor):
            raise TypeError(
                f"the Gauss-Newton and Fisher products need the model to return a tensor (the loss's input), "
                f"got {type(out).__name__}"
            )
        return out


def _class_dim(outputs: torch.Tensor) -> int:
    return 0 if outputs.dim() == 1 else 1


def cross_entropy_hessian(outputs: torch.Tensor, batch: Batch) -> Callable[[torch.Tensor], torch.Tensor]:
    """``H_l`` of ``F.cross_entropy(z, y)`` (mean reduction, ``ignore_index=-100``) in the logits ``z``.

    Per sample (and per position of a ``[N, C, d1, ...]`` output) the Hessian of ``-log softmax(z)_y`` is
    ``diag(p) - p p^T`` with ``p = softmax(z)`` over the class axis (axis 1; axis 0 for an unbatched
    ``[C]`` output), independent of ``y``; the mean reduction weighs each position by
    ``1 / (number of positions not ignored)``. Probability targets ``t`` (float, summing to 1 over the
    classes as ``F.cross_entropy`` expects) weigh a position by ``sum_c t_c / (number of positions)``.

    Args:
        outputs: the logits ``z``.
        batch: ``(inputs, targets)``.

    Returns:
        ``apply(U [k, *z.shape]) -> H_l U``.
    """
    targets = batch[1]
    cdim = _class_dim(outputs)
    z = outputs.detach()
    p = torch.softmax(z, dim=cdim)
    if targets.is_floating_point():
        t = targets.to(p.dtype).reshape(z.shape)
        positions = z.numel() // z.shape[cdim]
        w = t.sum(dim=cdim) / positions
    else:
        keep = (targets != -100).to(p.dtype).reshape(z.shape[:cdim] + z.shape[cdim + 1 :])
        w = keep / keep.sum().clamp(min=1.0)
    w = w.unsqueeze(cdim)

    def apply(U: torch.Tensor) -> torch.Tensor:
        pu = p * U.to(p.dtype)
        return (w * (pu - p * pu.sum(dim=cdim + 1, keepdim=True))).to(U.dtype)

    return apply


def mse_hessian(outputs: torch.Tensor, batch: Batch) -> Callable[[torch.Tensor], torch.Tensor]:
    """``H_l = (2 / numel(z)) I`` of the mean squared error ``mean((z - y)^2)`` over every output entry.

    Args:
        outputs: the model's outputs ``z``.
        batch: ``(inputs, targets)`` (the Hessian does not depend on the targets).

    Returns:
        ``apply(U [k, *z.shape]) -> H_l U``.
    """
    scale = 2.0 / outputs.numel()
    return lambda U: scale * U


def bce_with_logits_hessian(outputs: torch.Tensor, batch: Batch) -> Callable[[torch.Tensor], torch.Tensor]:
    """``H_l = diag(sigma(z) (1 - sigma(z))) / numel(z)`` of the mean binary cross-entropy on logits ``z``.

    Args:
        outputs: the logits ``z``.
        batch: ``(inputs, targets)`` (the Hessian does not depend on the targets).

    Returns:
        ``apply(U [k, *z.shape]) -> H_l U``.
    """
    s = torch.sigmoid(outputs.detach())
    d = s * (1 - s) / outputs.numel()
    return lambda U: (d * U.to(d.dtype)).to(U.dtype)


def autograd_output_hessian(loss: Callable[[torch.Tensor, Any], torch.Tensor]) -> OutputCurvature:
    """``H_l`` of any loss by autograd: ``H_l u = jvp(grad_z loss)(u)`` (double backward as a fallback).

    Args:
        loss: ``loss(outputs, targets) -> scalar``.

    Returns:
        An output-space curvature (see :data:`OutputCurvature`).
    """

    def curvature(outputs: torch.Tensor, batch: Batch) -> Callable[[torch.Tensor], torch.Tensor]:
        targets = batch[1]
        z = outputs.detach()

        def grad_z(o: torch.Tensor) -> torch.Tensor:
            return torch.func.grad(lambda q: loss(q, targets))(o)

        def apply(U: torch.Tensor) -> torch.Tensor:
            try:
                return torch.func.vmap(lambda u: torch.func.jvp(grad_z, (z,), (u,))[1])(U)
            except (RuntimeError, NotImplementedError):
                leaf = z.clone().requires_grad_(True)
                with torch.enable_grad():
                    (g,) = torch.autograd.grad(loss(leaf, targets), leaf, create_graph=True)
                    cols = []
                    for j in range(U.shape[0]):
                        (h,) = torch.autograd.grad((g * U[j]).sum(), leaf, retain_graph=j < U.shape[0] - 1)
                        cols.append(h.detach())
                return torch.stack(cols)

        return apply

    return curvature


OUTPUT_HESSIANS: dict[str, OutputCurvature] = {
    "cross_entropy": cross_entropy_hessian,
    "mse": mse_hessian,
    "bce_with_logits": bce_with_logits_hessian,
}


def output_hessian(loss_name: str, loss: Callable[[torch.Tensor, Any], torch.Tensor]) -> OutputCurvature:
    """The closed-form ``H_l`` of a built-in loss (:data:`OUTPUT_HESSIANS`), else autograd's.

    Args:
        loss_name: the loss's name (``cross_entropy``, ``mse``, ``bce_with_logits``; anything else uses
            autograd).
        loss: ``loss(outputs, targets) -> scalar`` (used by the autograd fallback).

    Returns:
        An output-space curvature.
    """
    return OUTPUT_HESSIANS.get(loss_name) or autograd_output_hessian(loss)


def gauss_newton_forward(
    model_loss: ModelLoss,
    params: Params,
    batch: Batch,
    V: torch.Tensor,
    *,
    curvature: OutputCurvature,
    autocast: MaybeDtype = None,
) -> torch.Tensor:
    """``J^T M J V`` of one batch: ``J V`` by ``jvp`` (vmapped over the columns), ``M`` in the output space,
    ``J^T`` by one ``vjp`` (vmapped over the columns); ``J`` is never formed.

    With ``M = H_l`` this is the generalised Gauss-Newton matrix ``G_b`` of the batch's mean loss.

    Args:
        model_loss: the loss split at the outputs.
        params: the point ``w`` (``n`` entries in all).
        batch: ``(inputs, targets)``.
        V: ``[n, k]`` tangent vectors.
        curvature: the output-space matrix ``M`` (e.g. :func:`cross_entropy_hessian`).
        autocast: optional mixed-precision dtype of the forward.

    Returns:
        ``[n, k]``.
    """
    layout = Layout.of(params)
    inputs = batch[0]

    def f(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return model_loss.outputs(p, inputs, autocast)

    out, vjp_fn = torch.func.vjp(f, dict(params))

    def jv(v: torch.Tensor) -> torch.Tensor:
        return torch.func.jvp(f, (dict(params),), (layout.unflatten(v),))[1]

    JV = torch.func.vmap(jv, in_dims=1)(V)
    MJV = curvature(out.detach(), batch)(JV).to(out.dtype)

    def jtu(u: torch.Tensor) -> torch.Tensor:
        return layout.flatten(vjp_fn(u)[0])

    return torch.func.vmap(jtu, in_dims=0, out_dims=1)(MJV).to(V.dtype)


def gauss_newton_reverse(
    model_loss: ModelLoss,
    params: Params,
    batch: Batch,
    V: torch.Tensor,
    *,
    curvature: OutputCurvature,
    autocast: MaybeDtype = None,
) -> torch.Tensor:
    """``J^T M J V`` of one batch by reverse mode only (for ops without forward-mode rules).

    ``J v`` is the vector-Jacobian product of the linear map ``u -> J^T u`` (the "double-vjp trick"):
    with ``g(u) = J^T u`` built with its graph, ``J v = d<g(u), v>/du``. One backward pass per column
    for ``J V`` and one for ``J^T (M J V)``. Every backward pass differentiates a scalar (as
    :func:`_directional` does), never ``grad_outputs``, whose shape check imports ``sympy``.

    Args:
        model_loss: the loss split at the outputs.
        params: the point ``w``.
        batch: ``(inputs, targets)``.
        V: ``[n, k]``.
        curvature: the output-space matrix ``M``.
        autocast: optional mixed-precision dtype of the forward.

    Returns:
        ``[n, k]``.
    """
    names = list(params)
    leaves = [t.detach().requires_grad_(True) for t in params.values()]
    numels = [t.numel() for t in leaves]
    k = V.shape[1]
    with torch.enable_grad():
        out = model_loss.outputs(dict(zip(names, leaves)), batch[0], autocast)
        dummy = torch.zeros_like(out, requires_grad=True)
        gs = torch.autograd.grad((out * dummy).sum(), leaves, create_graph=True, allow_unused=True)
        used = [i for i, g in enumerate(gs) if g is not None and g.requires_grad]
        cols = []
        for j in range(k):
            parts = torch.split(V[:, j].to(out.dtype), numels)
            if used:
                scalar = _directional([gs[i] for i in used], [parts[i].reshape(leaves[i].shape) for i in used])
                (jv,) = torch.autograd.grad(scalar, dummy, retain_graph=True, allow_unused=True)
            else:
                jv = None
            cols.append(torch.zeros_like(out) if jv is None else jv.detach())
        MJV = curvature(out.detach(), batch)(torch.stack(cols)).to(out.dtype)
        res = []
        for j in range(k):
            grads = torch.autograd.grad((out * MJV[j]).sum(), leaves, retain_graph=j < k - 1, allow_unused=True)
            res.append(
                torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, leaves)])
            )
    return torch.stack(res, dim=1).detach().to(V.dtype)


class GaussNewtonProduct:
    """The per-batch ``J^T M J V`` an operator uses: forward mode with a reverse-mode fallback.

    Args:
        backend: ``"auto"`` (:func:`gauss_newton_forward`, falling back to :func:`gauss_newton_reverse`
            for good on the first product that fails), ``"forward"``, ``"reverse"``; ``"cached"`` (a Hessian
            backend) means ``"auto"`` here.
        compile: ``torch.compile`` the forward-mode product (see :class:`Compiled`).

    Attributes:
        backend: the backend in use.
    """

    def __init__(self, backend: str = "auto", *, compile: bool = False) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
        self.backend = "auto" if backend == "cached" else backend
        self._forward: ProductFn = Compiled(gauss_newton_forward, "Gauss-Newton") if compile else gauss_newton_forward

    @property
    def notes(self) -> list[str]:
        """Notes for the user (why compilation was given up)."""
        f = self._forward
        return [f.note] if isinstance(f, Compiled) and f.note is not None else []

    def __call__(
        self,
        model_loss: ModelLoss,
        params: Params,
        batch: Batch,
        V: torch.Tensor,
        *,
        curvature: OutputCurvature,
        autocast: MaybeDtype = None,
    ) -> torch.Tensor:
        """``[n, k]``: ``J^T M J V`` of ``batch``."""
        with math_attention():
            if self.backend in ("auto", "forward"):
                try:
                    return self._forward(model_loss, params, batch, V, curvature=curvature, autocast=autocast)
                except (RuntimeError, NotImplementedError):
                    if self.backend == "forward":
                        raise
                    self.backend = "reverse"
            return gauss_newton_reverse(model_loss, params, batch, V, curvature=curvature, autocast=autocast)


def _one_sample(sample: Batch) -> Batch:
    """A batch of one sample from a vmapped sample (every tensor leaf gets its sample axis back)."""
    from diagnostics.batches import map_leaves

    return map_leaves(lambda t: t.unsqueeze(0) if isinstance(t, torch.Tensor) else t, sample)


def per_sample_gradients(loss_fn: LossFn, params: Params, batch: Batch, *, autocast: MaybeDtype = None) -> torch.Tensor:
    """``G [n_b, n]``: row ``i`` is ``g_i = grad_w loss_fn(w, batch[i:i+1])``, the gradient of sample ``i``'s
    loss (the loss of the one-sample batch), by ``torch.func.vmap`` of ``torch.func.grad`` over the samples
    (a loop over the samples where ``vmap`` has no batching rule).

    Args:
        loss_fn: ``fn(params, batch) -> scalar`` mean loss.
        params: the point ``w``.
        batch: the batch (every leaf with a sample axis is split per sample).
        autocast: optional mixed-precision dtype of the forward.

    Returns:
        ``[n_b, n]`` in the parameters' dtype.
    """
    from diagnostics.batches import batch_size, slice_batch

    layout = Layout.of(params)

    def grad_of(b: Batch) -> torch.Tensor:
        return layout.flatten(torch.func.grad(lambda p: evaluate_loss(loss_fn, p, b, autocast))(dict(params)))

    with math_attention():
        try:
            return torch.func.vmap(lambda s: grad_of(_one_sample(s)))(batch)
        except (RuntimeError, NotImplementedError, ValueError, TypeError):
            n = batch_size(batch)
            return torch.stack([grad_of(slice_batch(batch, i, i + 1)) for i in range(n)])


def empirical_fisher_product(
    loss_fn: LossFn,
    params: Params,
    batch: Batch,
    V: torch.Tensor,
    *,
    autocast: MaybeDtype = None,
) -> torch.Tensor:
    """``F_b V = (1/n_b) G^T (G V)`` with ``G`` the batch's per-sample gradients (:func:`per_sample_gradients`).

    Summed over batches with weights ``n_b / N`` this is the empirical Fisher ``(1/N) sum_i g_i g_i^T``
    (uncentred; Kunstner, Balles, Hennig 2019 on how it differs from the Fisher). Only one batch's ``G``
    exists at a time.

    Args:
        loss_fn: ``fn(params, batch) -> scalar`` mean loss.
        params: the point ``w``.
        batch: the batch.
        V: ``[n, k]``.
        autocast: optional mixed-precision dtype of the forward.

    Returns:
        ``[n, k]``.
    """
    G = per_sample_gradients(loss_fn, params, batch, autocast=autocast).to(V.dtype)
    return G.T @ (G @ V) / G.shape[0]


def batch_gradient(
    loss_fn: LossFn, params: Mapping[str, torch.Tensor], batch: Batch, *, autocast: torch.dtype | None = None
) -> torch.Tensor:
    """``[n]``: the gradient of one batch's mean loss, ``grad_w L_b``."""
    layout = Layout.of(params)
    with math_attention():
        return layout.flatten(torch.func.grad(lambda p: evaluate_loss(loss_fn, p, batch, autocast))(dict(params)))


def class_losses(model_loss: ModelLoss, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``[N, C]``: ``l(z_i, c)``, the loss of sample ``i`` (a one-sample batch) were its label ``c``.

    Args:
        model_loss: its ``loss`` is evaluated.
        outputs: ``z [N, C]``.
        targets: the batch's integer targets ``[N]`` (their dtype is kept for the labels).

    Returns:
        ``[N, C]``.
    """
    classes = torch.arange(outputs.shape[1], device=outputs.device, dtype=targets.dtype)

    def one(z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return model_loss.loss(z.unsqueeze(0), c.unsqueeze(0))

    return torch.func.vmap(torch.func.vmap(one, in_dims=(None, 0)), in_dims=(0, None))(outputs, classes)


def label_gradients(model_loss: ModelLoss, outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``[N, S, C]``: ``r_is = grad_z l(z_i, labels[i, s])`` for ``labels [N, S]``."""

    def one(z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return model_loss.loss(z.unsqueeze(0), c.unsqueeze(0))

    g = torch.func.grad(one)
    return torch.func.vmap(torch.func.vmap(g, in_dims=(None, 0)), in_dims=(0, 0))(outputs.detach(), labels)
