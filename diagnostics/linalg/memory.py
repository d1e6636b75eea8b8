"""Memory requirements of the numerical core, checked before allocating.

Two things grow with the model: the Lanczos basis (``dim x iterations`` numbers) and one vmapped
Hessian-vector-product block (activations of a batch, once for the primal pass and once per tangent
vector, plus a few ``dim x k`` blocks of vectors). Both are computed here and compared with the free
memory of the device they live on, so that a run that cannot fit stops at once with the numbers and
a fix instead of crashing with an out-of-memory error after minutes of work.

Free memory: ``torch.cuda.mem_get_info`` on CUDA (plus what PyTorch's caching allocator holds but does
not use); ``MemAvailable`` of ``/proc/meminfo`` on CPU, else ``os.sysconf`` (available physical pages).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch

from diagnostics.errors import DiagnosticsError

GiB = 1024**3


def fmt_bytes(n: float) -> str:
    """``1536 -> '1.5 KiB'``."""
    for unit, size in (("GiB", GiB), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} B"


def available_bytes(device: torch.device | str) -> int | None:
    """Free memory on ``device`` in bytes (``None`` when it cannot be told, e.g. MPS)."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        free, _ = torch.cuda.mem_get_info(index)
        cached = torch.cuda.memory_reserved(index) - torch.cuda.memory_allocated(index)
        return int(free + max(cached, 0))
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as fh:
                for line in fh:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        try:
            return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            return None
    return None


@dataclass(frozen=True)
class Requirement:
    """``nbytes`` needed on ``device`` for ``what``."""

    device: torch.device
    nbytes: int
    what: str


def lanczos_basis_bytes(dim: int, columns: int, dtype: torch.dtype) -> int:
    """Bytes of a ``[dim, columns]`` Krylov basis."""
    return int(dim) * int(columns) * torch.empty((), dtype=dtype).element_size()


def hvp_block_bytes(dim: int, k: int, dtype: torch.dtype, activation_bytes: int) -> int:
    """Peak bytes of one forward-over-reverse product of ``k`` vectors on one batch (an estimate).

    ``activation_bytes`` = what autograd saves for one backward of the batch's loss (measured). The
    primal pass saves it once; the tangent (jvp) of the forward and of the backward each carry one
    copy per vector, hence ``(1 + 2k)`` copies. Vectors: the input block, the output block, the
    parameter-shaped tangents and the gradient tangents (``4 dim k``), plus the parameters' gradient.
    """
    item = torch.empty((), dtype=dtype).element_size()
    return int(activation_bytes) * (1 + 2 * int(k)) + (4 * int(k) + 1) * int(dim) * item


def activation_bytes(
    loss: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    params: Mapping[str, torch.Tensor],
    device: torch.device,
) -> int:
    """Bytes autograd saves on ``device`` for one backward pass of ``loss(params)`` (measured).

    The forward runs once with fresh leaves that require gradients, under a
    ``saved_tensors_hooks`` pack hook that records every distinct saved tensor (by storage, dtype,
    shape and stride, so a tensor saved twice counts once).

    Args:
        loss: ``fn(params) -> scalar`` (e.g. one batch's loss).
        params: ``{name: tensor}``, the point.
        device: only tensors on this device are counted.

    Returns:
        The bytes of the saved activations.
    """
    seen: dict[tuple, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.device == device:
            key = (t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
            seen[key] = t.numel() * t.element_size()
        # kept (so no address is reused while the forward runs) but detached: a saved output packed as
        # itself would close a reference cycle (output -> grad_fn -> saved output) that autograd never
        # frees, leaking every saved output (~14 MB per call on the issue-13 MLP)
        return t.detach()

    leaves = {n: t.detach().requires_grad_(True) for n, t in params.items()}
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss(leaves)
    return int(sum(seen.values()))


@dataclass(frozen=True)
class HvpBlock:
    """One Hessian-vector-product block: ``k`` vectors of ``dim`` entries on a batch of ``samples``
    whose backward saves ``activation_bytes``."""

    dim: int
    k: int
    dtype: torch.dtype
    device: torch.device
    activation_bytes: int
    samples: int

    @property
    def nbytes(self) -> int:
        """Estimated peak bytes (see :func:`hvp_block_bytes`)."""
        return hvp_block_bytes(self.dim, self.k, self.dtype, self.activation_bytes)

    def widest_fitting(self, free: int) -> int:
        """The largest ``k`` whose block fits in ``0.95 free`` (0 if not even one)."""
        item = torch.empty((), dtype=self.dtype).element_size()
        act = self.activation_bytes
        return max(int((0.95 * free - (self.dim * item + act)) // (2 * act + 4 * self.dim * item)), 0)


def check_hvp_block(
    block: HvpBlock, *, mixed_precision: bool = False, vote: Callable[[bool], bool] | None = None
) -> None:
    """Raise :class:`DiagnosticsError` before an HVP block that clearly cannot fit, naming fixes.

    Args:
        block: the block about to run.
        mixed_precision: whether the forward already runs under autocast (else it is suggested on CUDA).
        vote: ``vote(failed) -> whether any process failed``; with it every process raises together,
            none is left waiting in a collective.
    """
    free = available_bytes(block.device)
    failed = free is not None and block.nbytes > 0.95 * free
    if vote is not None and vote(failed) and not failed:
        raise DiagnosticsError("another process ran out of memory for a Hessian-vector product block")
    if not failed:
        return
    fits_k = block.widest_fitting(int(free))
    fixes = []
    if 1 <= fits_k < block.k:
        fixes.append(f"--max-vectors {fits_k}")
    fixes.append(f"--micro-batch below {block.samples} (activations scale with it)")
    if not mixed_precision and block.device.type == "cuda":
        fixes.append("--autocast bfloat16")
    fixes.append("--params to analyse fewer parameters")
    what = (
        f"HVP block of {block.k} vector(s) on a batch of {block.samples} samples "
        f"(activations {fmt_bytes(block.activation_bytes)} x {1 + 2 * block.k}, vectors)"
    )
    check_fits([Requirement(block.device, block.nbytes, what)], "use " + ", ".join(fixes))


def check_fits(requirements: Iterable[Requirement], fixes: str, *, headroom: float = 0.95) -> None:
    """Raise :class:`DiagnosticsError` when the summed requirement on a device exceeds its free memory.

    Args:
        requirements: what will be allocated, per device (summed per device).
        fixes: how the user can lower it (appended to the message).
        headroom: use at most this fraction of the free memory.
    """
    per_device: dict[torch.device, list[Requirement]] = {}
    for r in requirements:
        per_device.setdefault(torch.device(r.device), []).append(r)
    for device, reqs in per_device.items():
        free = available_bytes(device)
        if free is None:
            continue
        total = sum(r.nbytes for r in reqs)
        if total > headroom * free:
            parts = " + ".join(f"{r.what} {fmt_bytes(r.nbytes)}" for r in reqs)
            raise DiagnosticsError(
                f"not enough memory on {device}: needs about {fmt_bytes(total)} ({parts}) but only "
                f"{fmt_bytes(free)} is free; {fixes}"
            )
