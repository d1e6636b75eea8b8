"""Symmetric linear operators on flat vectors: a base with composition, a dense matrix, a base for
operators summed over data (:class:`DataOperator`) and the Hessian of a loss over data.

The Gauss-Newton, Fisher and empirical-Fisher operators (each a :class:`DataOperator`) live in
:mod:`diagnostics.linalg.curvature`.

An operator is a symmetric ``n x n`` matrix known through its products: ``shape == (n, n)`` (``dim ==
n``), ``dtype``, ``device``, ``matvec(v: [n]) -> [n]`` and ``matmat(V: [n, k]) -> [n, k]`` (``matvec`` is
``matmat`` of one column). ``matvec_count`` counts the columns multiplied; for the Hessian that is one
full-data Hessian-vector product per vector however many batches, micro-batches or processes the data
has. ``reduce`` is the all-reduce an operator's products go through when its data is sharded over
processes (None otherwise), so that methods running on it can vote on errors collectively.

Composition (each result is an operator; the inner one keeps counting its own products):

* ``c * A``, ``A * c``, ``-A``, :func:`scaled`: ``c A``;
* ``A + B``, ``A - B``: sums (e.g. ``H - GGN``);
* :func:`preconditioned`: ``D^-1/2 A D^-1/2`` for a positive diagonal ``d``, whose eigenvalues are those
  of ``D^-1 A`` (Adam's preconditioned sharpness, Cohen et al. 2022);
* :func:`restricted`: ``A[block, block] = P^T A P`` for a contiguous block of the flat vector (a
  parameter block; see :meth:`HessianOperator.group_slices`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from diagnostics.batches import Batch, batch_size
from diagnostics.linalg import memory
from diagnostics.linalg.data import DataLoop, Reduce
from diagnostics.linalg.products import (
    BACKENDS,
    Layout,
    LossFn,
    Product,
    as_dtype,
    batch_gradient,
    evaluate_loss,
    math_attention,
    unit_roundoff,
)

__all__ = [
    "BACKENDS",
    "DataOperator",
    "DenseOperator",
    "HessianOperator",
    "LinearOperator",
    "PreconditionedOperator",
    "RestrictedOperator",
    "ScaledOperator",
    "SumOperator",
    "dense_hessian",
    "preconditioned",
    "restricted",
    "scaled",
]


class LinearOperator:
    """Base of symmetric linear operators.

    A subclass calls ``super().__init__(dim, dtype, device)`` and implements ``_matmat(V: [n, k]) ->
    [n, k]``; :meth:`matmat` checks the shape, moves ``V`` to the operator's dtype and device and counts
    the columns. An operator whose products are summed over processes overrides :attr:`reduce`.

    Args:
        dim: ``n``; the operator is ``n x n``.
        dtype: dtype of its products.
        device: device of its products.
    """

    def __init__(self, dim: int, dtype: torch.dtype, device: torch.device | str) -> None:
        self._dim = int(dim)
        self._dtype = dtype
        self._device = torch.device(device)
        self.matvec_count = 0

    @property
    def shape(self) -> tuple[int, int]:
        """``(n, n)``."""
        return self._dim, self._dim

    @property
    def dim(self) -> int:
        """``n``."""
        return self._dim

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the vectors it acts on."""
        return self._dtype

    @property
    def device(self) -> torch.device:
        """The device of the vectors it acts on."""
        return self._device

    @property
    def reduce(self) -> Reduce | None:
        """The all-reduce over processes the products go through (None for a local operator)."""
        return None

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """``A V``.

        Args:
            V: ``[n, k]`` (moved to the operator's dtype and device).

        Returns:
            ``[n, k]``.
        """
        if V.dim() != 2 or V.shape[0] != self.dim:
            raise ValueError(f"matmat needs a [{self.dim}, k] matrix, got {tuple(V.shape)}")
        out = self._matmat(V.to(dtype=self.dtype, device=self.device))
        self.matvec_count += int(V.shape[1])
        return out

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``A v`` for ``v`` of shape ``[n]`` (``matmat`` of one column)."""
        if v.dim() != 1:
            raise ValueError(f"matvec needs a [{self.dim}] vector, got {tuple(v.shape)}")
        return self.matmat(v.reshape(-1, 1)).reshape(-1)

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # -- composition
    def __mul__(self, c: float) -> ScaledOperator:
        return ScaledOperator(self, c)

    __rmul__ = __mul__

    def __neg__(self) -> ScaledOperator:
        return ScaledOperator(self, -1.0)

    def __add__(self, other: LinearOperator) -> SumOperator:
        return SumOperator([self, other], [1.0, 1.0])

    def __sub__(self, other: LinearOperator) -> SumOperator:
        return SumOperator([self, other], [1.0, -1.0])


class DenseOperator(LinearOperator):
    """A symmetric matrix ``[n, n]`` as an operator (reference for tests and benchmarks)."""

    def __init__(self, matrix: torch.Tensor) -> None:
        if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"need a square matrix, got shape {tuple(matrix.shape)}")
        super().__init__(matrix.shape[0], matrix.dtype, matrix.device)
        self.matrix = matrix

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.matrix @ V


class ScaledOperator(LinearOperator):
    """``c A`` for a real scalar ``c``."""

    def __init__(self, op: LinearOperator, c: float) -> None:
        super().__init__(op.dim, op.dtype, op.device)
        self.op = op
        self.c = float(c)

    @property
    def reduce(self) -> Reduce | None:
        """The cross-process reduction of the wrapped operator (None: one process)."""
        return self.op.reduce

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.c * self.op.matmat(V)


class SumOperator(LinearOperator):
    """``sum_i c_i A_i`` of operators of one shape, dtype and device."""

    def __init__(self, ops: Sequence[LinearOperator], coefficients: Sequence[float]) -> None:
        ops = list(ops)
        if not ops or len(ops) != len(coefficients):
            raise ValueError(f"need as many coefficients as operators, got {len(coefficients)} for {len(ops)}")
        first = ops[0]
        for op in ops[1:]:
            if (op.dim, op.dtype, op.device) != (first.dim, first.dtype, first.device):
                raise ValueError(
                    f"cannot add a {op.dim}-dim {op.dtype} operator on {op.device} to a {first.dim}-dim "
                    f"{first.dtype} one on {first.device}"
                )
        super().__init__(first.dim, first.dtype, first.device)
        self.ops = ops
        self.coefficients = [float(c) for c in coefficients]

    @property
    def reduce(self) -> Reduce | None:
        """The cross-process reduction of the first term that has one."""
        return next((op.reduce for op in self.ops if op.reduce is not None), None)

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        out = self.coefficients[0] * self.ops[0].matmat(V)
        for c, op in zip(self.coefficients[1:], self.ops[1:]):
            out += c * op.matmat(V)
        return out


class PreconditionedOperator(LinearOperator):
    """``D^-1/2 A D^-1/2`` for a positive diagonal ``d`` (``[n]``): the eigenvalues of ``D^-1 A``.

    ``D^-1 A`` is similar to this symmetric matrix (``D^-1 A = D^-1/2 (D^-1/2 A D^-1/2) D^1/2``), so
    symmetric methods (Lanczos) apply.
    """

    def __init__(self, op: LinearOperator, d: torch.Tensor) -> None:
        if d.shape != (op.dim,):
            raise ValueError(f"the diagonal must have shape [{op.dim}], got {tuple(d.shape)}")
        if not bool(torch.isfinite(d).all()) or not bool((d > 0).all()):
            raise ValueError("the diagonal of a preconditioner must be finite and positive")
        super().__init__(op.dim, op.dtype, op.device)
        self.op = op
        self.scale = d.rsqrt().to(dtype=op.dtype, device=op.device)

    @property
    def reduce(self) -> Reduce | None:
        """The cross-process reduction of the wrapped operator (None: one process)."""
        return self.op.reduce

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        s = self.scale.unsqueeze(1)
        return s * self.op.matmat(s * V)


class RestrictedOperator(LinearOperator):
    """``A[block, block] = P^T A P``: the operator on a contiguous block of the flat vector.

    Each product embeds the block in a zero vector of length ``n`` and multiplies by ``A``; for the
    Hessian of a parameter block, ``diagnostics.operators.hessian_operator(ctx, names=...)`` gives the
    same matrix while differentiating w.r.t. the block alone (cheaper).
    """

    def __init__(self, op: LinearOperator, block: slice) -> None:
        start, stop, step = block.indices(op.dim)
        if step != 1 or stop <= start:
            raise ValueError(f"need a non-empty contiguous block of 0..{op.dim}, got {block}")
        super().__init__(stop - start, op.dtype, op.device)
        self.op = op
        self.block = slice(start, stop)

    @property
    def reduce(self) -> Reduce | None:
        """The cross-process reduction of the wrapped operator (None: one process)."""
        return self.op.reduce

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        full = torch.zeros(self.op.dim, V.shape[1], dtype=V.dtype, device=V.device)
        full[self.block] = V
        return self.op.matmat(full)[self.block]


def scaled(op: LinearOperator, c: float) -> ScaledOperator:
    """``c A`` (same as ``c * op``)."""
    return ScaledOperator(op, c)


def preconditioned(op: LinearOperator, d: torch.Tensor) -> PreconditionedOperator:
    """``D^-1/2 A D^-1/2`` for a positive diagonal ``d`` of shape ``[n]`` (eigenvalues of ``D^-1 A``)."""
    return PreconditionedOperator(op, d)


def restricted(op: LinearOperator, block: slice) -> RestrictedOperator:
    """``A[block, block]`` for a contiguous ``block`` of the flat vector (e.g. one parameter's slice)."""
    return RestrictedOperator(op, block)


class DataOperator(LinearOperator):
    """Base of the operators that sum a per-batch product over data: ``A V = sum_b w_b A_b V``.

    It holds the :class:`~diagnostics.linalg.data.DataLoop` (batches, weights ``n_b / N``, micro-batching,
    accumulation dtype, sharding), the point ``w`` and its flat :class:`Layout`, and splits the vectors
    of a product into blocks of at most ``max_vectors`` columns, each block one pass over the data.
    A subclass implements ``_batch_product(batch, V [n, k]) -> A_b V`` (and may set ``product``, whose
    ``backend`` and ``notes`` it reports). Subclasses: :class:`HessianOperator` here; the Gauss-Newton,
    Fisher and empirical-Fisher operators of :mod:`diagnostics.linalg.curvature`.

    Args:
        batch_loss: ``fn(params, batch) -> scalar`` mean loss of one batch.
        params: the point ``w`` as ``{name: tensor}``; the operator acts on their flat concatenation.
        data: a :class:`DataLoop`, or the batches (then ``loop_options`` build the loop: ``weights``,
            ``micro_batch``, ``accumulate_dtype``, ``reduce``).
        max_vectors: at most this many vectors per pass (bounds activation memory).
        autocast: run the forward (and its derivatives) under ``torch.autocast`` in ``bfloat16`` or
            ``float16``; parameters, vectors and the accumulation stay in the operator's dtype.
        memory_check: before the first product of each block width, estimate its memory from the
            activations autograd saves for the largest (micro-)batch and raise ``DiagnosticsError``
            with the requirement and a fix when it clearly exceeds the free memory of the device.
        **loop_options: ``weights``, ``micro_batch``, ``accumulate_dtype``, ``reduce`` of the
            :class:`DataLoop` built from a list of batches.
    """

    #: what the operator is (``"hessian"``, ``"ggn"``, ``"fisher"``, ``"empirical_fisher"``)
    kind = "operator"
    #: the micro-batch size the operator chose itself (:meth:`HessianOperator._split`); None: as given
    auto_micro_batch: int | None = None

    def __init__(
        self,
        batch_loss: LossFn,
        params: Mapping[str, torch.Tensor],
        data: DataLoop | Sequence[Batch],
        *,
        max_vectors: int = 16,
        autocast: torch.dtype | str | None = None,
        memory_check: bool = True,
        **loop_options: object,
    ) -> None:
        if not params:
            raise ValueError(f"{type(self).__name__} needs at least one parameter")
        unknown = sorted(set(loop_options) - {"weights", "micro_batch", "accumulate_dtype", "reduce"})
        if unknown:
            raise TypeError(f"{type(self).__name__} got unexpected keyword argument(s) {unknown}")
        if isinstance(data, DataLoop) and loop_options:
            raise ValueError(f"pass {sorted(loop_options)} to the DataLoop, not to the operator")
        self.loop = data if isinstance(data, DataLoop) else DataLoop(data, **loop_options)  # type: ignore[arg-type]
        self.autocast = as_dtype(autocast, "autocast")
        if self.autocast is not None and self.autocast not in (torch.bfloat16, torch.float16):
            raise ValueError(f"autocast must be bfloat16 or float16, not {self.autocast}")
        self.params = {k: v.detach() for k, v in params.items()}
        self.layout = Layout.of(self.params)
        first = next(iter(self.params.values()))
        super().__init__(self.layout.dim, first.dtype, first.device)
        self.batch_loss = batch_loss
        self.product: Any = None
        self.max_vectors = max(1, int(max_vectors))
        self.memory_check = bool(memory_check)
        self._checked_widths: set[int] = set()
        self._activation_bytes: int | None = None

    # -- bookkeeping
    @property
    def hvp_count(self) -> int:
        """Operator-vector products so far (``matvec_count``; Hessian-vector products for the Hessian)."""
        return self.matvec_count

    @property
    def backend(self) -> str:
        """The product backend in use."""
        return getattr(self.product, "backend", "auto")

    @property
    def notes(self) -> list[str]:
        """Notes for the user from the products (e.g. why ``compile`` fell back to eager)."""
        return list(getattr(self.product, "notes", []))

    @property
    def reduce(self) -> Reduce | None:
        """The data loop's cross-process reduction (None unless the data is sharded)."""
        return self.loop.reduce

    @property
    def names(self) -> list[str]:
        """The analysed parameter names, in flat-vector order."""
        return list(self.layout.names)

    def flatten(self, tensors: Mapping[str, torch.Tensor] | Sequence[torch.Tensor]) -> torch.Tensor:
        """``{name: tensor}`` -> ``[n]`` in the operator's order."""
        return self.layout.flatten(tensors)

    def unflatten(self, v: torch.Tensor) -> dict[str, torch.Tensor]:
        """``[n]`` -> ``{name: tensor}``."""
        return self.layout.unflatten(v)

    def group_slices(self) -> dict[str, slice]:
        """Where each parameter sits in the flat vector."""
        return self.layout.slices()

    # -- products
    def _batch_product(self, batch: Batch, V: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        """``[n, k] -> [n, k]``: one pass over the data per block of ``max_vectors`` columns."""
        k = int(V.shape[1])
        if self.memory_check and k:
            self.check_memory(min(k, self.max_vectors))
        if 0 < k <= self.max_vectors:  # one block: its sum is the result (no copy into a second buffer)
            return self._block_product(V).to(self.dtype)
        out = torch.empty(V.shape, dtype=self.dtype, device=self.device)
        for start in range(0, k, self.max_vectors):
            cols = slice(start, min(start + self.max_vectors, k))
            out[:, cols] = self._block_product(V[:, cols])
        return out

    def _block_product(self, W: torch.Tensor) -> torch.Tensor:
        """``[n, b] -> [n, b]``: one pass over the data, the batches' products weighted and summed."""
        return self.loop.weighted_sum(
            lambda batch: self._batch_product(batch, W), W.shape, dtype=self.dtype, device=self.device
        )

    def gradient(self) -> torch.Tensor:
        """``[n]``: the gradient of the mean loss over the data, ``sum_b w_b grad L_b`` (one data pass, not
        counted as a product)."""
        return self.loop.weighted_sum(
            lambda batch: batch_gradient(self.batch_loss, self.params, batch, autocast=self.autocast),
            (self.dim,),
            dtype=self.dtype,
            device=self.device,
        ).to(self.dtype)

    # -- memory
    def activation_bytes(self) -> int:
        """Bytes autograd saves for one backward of the largest (micro-)batch's loss (measured once)."""
        if self._activation_bytes is None:
            batch = self.loop.largest()
            if batch is None:
                self._activation_bytes = 0
            else:
                with math_attention():
                    self._activation_bytes = memory.activation_bytes(
                        lambda p: evaluate_loss(self.batch_loss, p, batch, self.autocast), self.params, self.device
                    )
        return self._activation_bytes

    def memory_required(self, k: int) -> int:
        """Estimated peak bytes of one product block of ``k`` vectors (see ``memory.hvp_block_bytes``)."""
        return memory.hvp_block_bytes(self.dim, k, self.dtype, self.activation_bytes())

    def check_memory(self, k: int) -> None:
        """Raise ``DiagnosticsError`` before a block of ``k`` vectors that clearly cannot fit.

        Under sharding the verdict is voted on, so every process raises together.
        """
        if k in self._checked_widths:
            return
        self._checked_widths.add(k)
        largest = self.loop.largest()
        block = memory.HvpBlock(
            self.dim, k, self.dtype, self.device, self.activation_bytes(), 0 if largest is None else batch_size(largest)
        )
        vote = None if self.reduce is None else (lambda failed: self.loop.any_process(failed, self.device))
        memory.check_hvp_block(block, mixed_precision=self.autocast is not None, vote=vote)


class HessianOperator(DataOperator):
    """``v -> H v`` with ``H = d^2/dw^2 sum_b w_b L_b(w)``, the Hessian of the mean loss over data.

    A :class:`~diagnostics.linalg.data.DataLoop` (batches, weights ``n_b / N``, micro-batching,
    accumulation dtype, sharding) sums a per-batch product
    (:class:`~diagnostics.linalg.products.Product`: forward-over-reverse with ``vmap``, double
    backward, or the cached gradient graph; optionally compiled) over the data. Vectors are split
    into blocks of at most ``max_vectors`` columns, each block one pass over the data, so ``matmat``
    on ``k`` vectors costs far less than ``k`` calls of ``matvec`` (``benchmarks/bench_scale.py``).

    Args:
        batch_loss: ``fn(params, batch) -> scalar`` mean loss of one batch.
        params: the point ``w`` as ``{name: tensor}``; the operator acts on their flat concatenation.
        data: a :class:`DataLoop`, or the batches.
        backend: ``"auto"``, ``"cached"``, ``"forward"`` or ``"reverse"`` (see ``Product``).
        compile: ``torch.compile`` the per-batch product (falls back to eager with a note in ``notes``).
        split: on the CPU, let the cached-graph products of a single batch run over micro-batches
            (:meth:`_split`; the loss must be a per-sample mean: pass it only for one). Not with
            ``micro_batch``, sharded data, ``autocast`` or another backend; ``auto_micro_batch`` is the
            size chosen, None if the batch was left whole.
        **options: ``max_vectors``, ``autocast``, ``memory_check`` and the loop options of
            :class:`DataOperator`.
    """

    kind = "hessian"

    def __init__(
        self,
        batch_loss: LossFn,
        params: Mapping[str, torch.Tensor],
        data: DataLoop | Sequence[Batch],
        *,
        backend: str = "auto",
        compile: bool = False,
        split: bool = False,
        **options: Any,
    ) -> None:
        super().__init__(batch_loss, params, data, **options)
        self.product = Product(backend, n_batches=len(self.loop.batches), compile=compile)
        loop = self.loop
        self._split_pending = (
            bool(split)
            and self.product.backend == "cached"
            and self.device.type == "cpu"
            and self.autocast is None
            and not loop.sharded
            and loop.micro_batch is None
            and len(loop.batches) == 1
        )

    @property
    def backend(self) -> str:
        """The product backend in use (``"auto"`` until a fallback to ``"reverse"``)."""
        return self.product.backend

    @property
    def notes(self) -> list[str]:
        """Notes for the user from the products (e.g. why ``compile`` fell back to eager)."""
        return self.product.notes

    def _batch_product(self, batch: Batch, V: torch.Tensor) -> torch.Tensor:
        return self.product(self.batch_loss, self.params, batch, V, autocast=self.autocast)

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        if self._split_pending:
            self._split_pending = False
            self._split()
        return super()._matmat(V)

    def _split(self) -> None:
        """Before the first product: cut the one batch into :func:`split_pieces` micro-batches when the loss
        over them, weighted ``n_piece / n``, equals the loss of the whole batch (:func:`separable`).

        On the CPU an HVP through a kept graph makes temporaries of ~4-5 times the saved activations; cut
        into pieces they shrink with the piece, while each piece's graph keeps its own gradient (one more
        parameter-sized vector per piece). The product is the same sum (``H = sum_p (n_p / n) H_p`` for a
        per-sample mean loss), in the same kept-graph backend.
        """
        batch, weight = self.loop.batches[0], self.loop.weights[0]
        n = batch_size(batch)
        if not weight > 0:
            return
        try:
            activations = self.activation_bytes()
        except Exception:  # the probe only informs the cut here; the memory check, when on, reports its failure
            return
        pieces = split_pieces(activations, self.dim * self.dtype.itemsize, n)
        if pieces < 2:
            return
        size = -(-n // pieces)
        loop = DataLoop([batch], [weight], micro_batch=size, accumulate_dtype=self.loop.accumulate_dtype)
        with math_attention():
            ok = separable(self.batch_loss, self.params, batch, loop.batches, [w / weight for w in loop.weights])
        if ok:
            self.loop, self.auto_micro_batch = loop, size


#: samples a micro-batch of :func:`split_pieces` holds at least (smaller matrix products lose efficiency)
MIN_PIECE = 64
#: saved activations a micro-batch of :func:`split_pieces` holds at least: below that an HVP's temporaries are
#: a few tens of MB at most, and the fixed cost of a product per piece would dominate (a small MLP on the
#: digits, 0.8 MB of activations: 2.25 s whole, 3.2 s in 7 pieces)
MIN_PIECE_BYTES = 8 << 20


def split_pieces(activation_bytes: int, param_bytes: int, samples: int) -> int:
    """How many micro-batches the products of one batch on the CPU are cut into: ``floor(sqrt(A / P))``.

    Per product, pieces hold ``k P + c A / k`` bytes (``A`` the saved activations of the whole batch, ``P``
    one parameter-sized vector, ``c ~ 4.5`` the HVP's temporaries per saved byte on the issue-13 MLP), least
    at ``k = sqrt(c A / P)``; half of that keeps the pieces large (fewer, wider matrix products, less fixed
    cost per piece). 1 (no split) when the activations are under four parameter vectors, and never pieces
    of fewer than :data:`MIN_PIECE` samples or :data:`MIN_PIECE_BYTES` of activations.
    """
    if param_bytes <= 0 or activation_bytes <= 0:
        return 1
    k = math.isqrt(int(activation_bytes) // int(param_bytes))
    return max(1, min(k, int(samples) // MIN_PIECE, int(activation_bytes) // MIN_PIECE_BYTES))


def separable(
    batch_loss: LossFn,
    params: Mapping[str, torch.Tensor],
    batch: Batch,
    pieces: Sequence[Batch],
    fractions: Sequence[float],
) -> bool:
    """Whether ``sum_p f_p L(piece_p)`` equals ``L(batch)`` to ``sqrt(u)`` of the losses' size (``u`` the unit
    roundoff of the parameters' dtype): a per-sample mean loss of a model that treats samples independently.

    A loss or model that couples the samples of a batch (a batch-level term, batch statistics) fails, and its
    batch is then left whole; so does a batch whose pieces the model cannot take (a leaf that is not per-sample,
    cut all the same). Two forwards without a graph.
    """
    with torch.no_grad():
        whole = float(evaluate_loss(batch_loss, params, batch))
        try:
            parts = [float(evaluate_loss(batch_loss, params, b)) for b in pieces]
        except Exception:  # any failure of the user's forward or loss on a piece: the batch stays as given
            return False
    total = math.fsum(f * v for f, v in zip(fractions, parts))
    scale = abs(whole) + math.fsum(f * abs(v) for f, v in zip(fractions, parts))
    tol = math.sqrt(unit_roundoff(next(iter(params.values())).dtype)) * scale
    return math.isfinite(whole) and math.isfinite(total) and abs(whole - total) <= tol


def dense_hessian(op: LinearOperator) -> torch.Tensor:
    """The full ``[n, n]`` matrix of a symmetric operator by ``n`` products, symmetrised (tests and tiny
    models only)."""
    eye = torch.eye(op.dim, dtype=op.dtype, device=op.device)
    H = op.matmat(eye)
    return 0.5 * (H + H.T)
