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
BACKENDS = ("auto", "cached", "forward", "reverse")
_DTYPE_NAMES = {
    "float16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}


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
    params: Mapping[str, torch.Tensor],
    batch: Batch,
    V: torch.Tensor,
    *,
    autocast: torch.dtype | None = None,
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


def _backward_products(
    leaves: list[torch.Tensor], grads: list[torch.Tensor | None], V: torch.Tensor, retain: bool
) -> torch.Tensor:
    """``[n, k]``: one backward pass per column of ``V`` through the gradient graph ``grads(leaves)``."""
    used = [i for i, g in enumerate(grads) if g is not None]
    if not used:
        return torch.zeros(V.shape, dtype=V.dtype, device=V.device)
    numels = [t.numel() for t in leaves]
    cols = []
    k = V.shape[1]
    for j in range(k):
        parts = torch.split(V[:, j], numels)
        hv = torch.autograd.grad(
            [grads[i] for i in used],
            leaves,
            grad_outputs=[parts[i].reshape(leaves[i].shape) for i in used],
            retain_graph=retain or j < k - 1,
            allow_unused=True,
        )
        flat = [(torch.zeros_like(p) if h is None else h).reshape(-1) for h, p in zip(hv, leaves)]
        cols.append(torch.cat(flat).detach())
    return torch.stack(cols, dim=1)


def reverse_over_reverse(
    loss_fn: LossFn,
    params: Mapping[str, torch.Tensor],
    batch: Batch,
    V: torch.Tensor,
    *,
    autocast: torch.dtype | None = None,
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
        params: Mapping[str, torch.Tensor],
        batch: Batch,
        V: torch.Tensor,
        *,
        autocast: torch.dtype | None = None,
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
        params: Mapping[str, torch.Tensor],
        batch: Batch,
        V: torch.Tensor,
        *,
        autocast: torch.dtype | None = None,
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
