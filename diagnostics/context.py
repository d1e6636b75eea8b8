"""Context: everything an analyzer needs, built from a checkpoint and a binding.

``Context`` = eval-mode model + analysed parameters as a dict + the rest (frozen parameters, buffers)
+ materialised batches + loss + device/dtype + seed. Building one also runs the determinism check:
two evaluations of the same batch must agree, and modules left in training mode, random layers,
BatchNorm without running statistics or shuffled/augmented data are named instead of silently
turning curvature estimates into noise.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from diagnostics.batches import Batch, batch_size, fingerprint
from diagnostics.binding import Binding, call_factory, resolve_loss
from diagnostics.checkpoint import Checkpoint, check_finite
from diagnostics.errors import DiagnosticsError
from diagnostics.seeding import stream_generator

DTYPES = {"float32": torch.float32, "float64": torch.float64}
_STRIP_PREFIXES = ("module.", "model.", "_orig_mod.", "net.", "network.")


# ------------------------------------------------------------------------------ small helpers
def to_device(obj: Any, device: torch.device, dtype: torch.dtype | None = None) -> Any:
    """Move tensors (nested in tuples/lists/dicts) to ``device``; cast floating ones to ``dtype``."""
    if isinstance(obj, torch.Tensor):
        if dtype is not None and obj.is_floating_point():
            return obj.to(device=device, dtype=dtype)
        return obj.to(device=device)
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(o, device, dtype) for o in obj)
    if isinstance(obj, Mapping):
        return {k: to_device(v, device, dtype) for k, v in obj.items()}
    return obj


def _as_pair(item: Any, where: str) -> Batch:
    if isinstance(item, (tuple, list)) and len(item) >= 2:
        return item[0], item[1]
    if isinstance(item, Mapping):
        for xk, yk in (("inputs", "targets"), ("x", "y"), ("input", "target"), ("images", "labels")):
            if xk in item:
                return item[xk], item.get(yk)
    if isinstance(item, torch.Tensor):
        return item, None
    raise DiagnosticsError(
        f"{where} yields {type(item).__name__} items; expected (inputs, targets) pairs or input tensors"
    )


def _subset_indices(n: int, samples: int, generator: torch.Generator) -> torch.Tensor:
    return torch.sort(torch.randperm(n, generator=generator)[:samples]).values


def _take(obj: Any, idx: torch.Tensor) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj[idx]
    if isinstance(obj, tuple) and obj and all(isinstance(t, torch.Tensor) for t in obj):
        return tuple(t[idx] for t in obj)  # several model arguments stay a tuple
    if isinstance(obj, (list, tuple)):
        return [obj[i] for i in idx.tolist()]
    if obj is None:
        return None
    raise DiagnosticsError(f"cannot subsample data of type {type(obj).__name__}")


def _split(x: Any, y: Any, size: int | None) -> list[Batch]:
    n = batch_size((x, y))
    if not size or size >= n:
        return [(x, y)]
    out = []
    for start in range(0, n, size):
        idx = torch.arange(start, min(start + size, n))
        out.append((_take(x, idx), _take(y, idx)))
    return out


def _concat(parts: Sequence[Any]) -> Any:
    if parts[0] is None:
        return None
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(parts, 0)
    if isinstance(parts[0], tuple) and all(isinstance(t, torch.Tensor) for t in parts[0]):
        return tuple(torch.cat(cols, 0) for cols in zip(*parts))
    return [item for p in parts for item in p]


def _is_image_list(obj: Any) -> bool:
    """A python list of ``[C, H, W]`` floating tensors: images of possibly different sizes (detectors)."""
    return (
        isinstance(obj, list)
        and len(obj) > 0
        and all(isinstance(t, torch.Tensor) and t.dim() == 3 and t.is_floating_point() for t in obj)
    )


def _image_list_data(data: Any) -> tuple[list, list | None] | None:
    """``[img, ...]`` or ``([img, ...], targets)`` (torchvision detection style) -> (images, targets)."""
    if _is_image_list(data):
        return data, None
    if (
        isinstance(data, tuple)
        and len(data) == 2
        and _is_image_list(data[0])
        and (data[1] is None or (isinstance(data[1], (list, tuple)) and len(data[1]) == len(data[0])))
    ):
        return data[0], (None if data[1] is None else list(data[1]))
    return None


@dataclass
class PreparedData:
    batches: list[Batch]
    notes: list[str]
    total_available: int


def prepare_batches(
    data: Any,
    *,
    batch_size_: int | None = None,
    samples: int | None = None,
    generator: torch.Generator | None = None,
    where: str = "data",
) -> PreparedData:
    """Materialise what a data callable returned into a fixed list of (inputs, targets) batches.

    Accepts ``(inputs, targets)`` tensors (or a bare input tensor), a python list of ``[C, H, W]``
    images or ``(images, per-image targets)`` (detectors; the list is the batch), or an iterable of
    batches (a DataLoader). ``samples`` draws a seeded subset without replacement. Batches are kept as given
    (ragged last batch included) unless ``samples`` or ``batch_size_`` asks for re-batching; every
    product over the data weights a batch by its size, so a ragged split is exact.
    """
    notes: list[str] = []
    gen = generator or torch.Generator().manual_seed(0)
    images = _image_list_data(data)
    if images is not None:  # a list of [C, H, W] images (with optional per-image targets) is one batch
        x, y = images
        n = len(x)
        if samples is not None and samples < n:
            idx = _subset_indices(n, samples, gen)
            x, y = _take(x, idx), _take(y, idx)
        return PreparedData(_split(x, y, batch_size_), notes, n)
    if isinstance(data, torch.Tensor) or (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and isinstance(data[0], torch.Tensor)
        and (data[1] is None or isinstance(data[1], torch.Tensor))
    ):
        x, y = (data, None) if isinstance(data, torch.Tensor) else data
        if y is not None and x.shape[0] != y.shape[0]:
            raise DiagnosticsError(f"{where}: inputs have {x.shape[0]} rows but targets {y.shape[0]}; they must match")
        n = int(x.shape[0]) if x.dim() else 0
        if n == 0:
            raise DiagnosticsError(f"{where} is empty (0 samples)")
        if samples is not None and samples < n:
            idx = _subset_indices(n, samples, gen)
            x, y = x[idx], (None if y is None else y[idx])
        return PreparedData(_split(x, y, batch_size_), notes, n)
    if isinstance(data, Iterable) and not isinstance(data, (str, bytes, Mapping)):
        items = [_as_pair(item, where) for item in data]
        if not items:
            raise DiagnosticsError(f"{where} yielded no batches")
        if iter(data) is not data:  # re-iterable: check two passes agree
            try:
                second = _as_pair(next(iter(data)), where)
                if fingerprint([second]) != fingerprint([items[0]]):
                    notes.append(
                        f"{where} gives different batches on two passes (shuffle=True or random "
                        "augmentation); one fixed pass of it is analysed"
                    )
            except StopIteration:
                pass
        total = sum(batch_size(b) for b in items)
        if total == 0:
            raise DiagnosticsError(f"{where} is empty (0 samples)")
        if samples is not None and samples < total:
            x = _concat([b[0] for b in items])
            y = _concat([b[1] for b in items])
            idx = _subset_indices(total, samples, gen)
            size = batch_size_ or batch_size(items[0])
            return PreparedData(_split(_take(x, idx), _take(y, idx), size), notes, total)
        if batch_size_:
            x = _concat([b[0] for b in items])
            y = _concat([b[1] for b in items])
            return PreparedData(_split(x, y, batch_size_), notes, total)
        return PreparedData(items, notes, total)
    raise DiagnosticsError(
        f"{where} returned a {type(data).__name__}; expected (inputs, targets) tensors or an iterable of batches"
    )


# ------------------------------------------------------------------------------------ context
@dataclass
class Context:
    """An eval-mode model at a checkpoint, with data and loss, ready for functional analysis.

    Attributes:
        model: the module in eval mode, on ``device``.
        params: analysed parameters ``{name: tensor}`` (detached leaves); the Hessian is over these.
        frozen: every other parameter and buffer, held fixed.
        batches: fixed list of ``(inputs, targets)`` on ``device``.
        loss_fn: ``fn(outputs, targets) -> scalar mean loss``.
    """

    model: nn.Module
    params: dict[str, torch.Tensor]
    frozen: dict[str, torch.Tensor]
    batches: list[Batch]
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    device: torch.device
    dtype: torch.dtype
    seed: int = 0
    checkpoint: str = "model"
    step: int | None = None
    checkpoint_metadata: dict[str, Any] = field(default_factory=dict)
    optimizer_state: dict[str, Any] | None = None
    loss_name: str = "cross_entropy"
    notes: list[str] = field(default_factory=list)
    binding: dict[str, Any] = field(default_factory=dict)

    # -- sizes and randomness
    @property
    def batch_sizes(self) -> list[int]:
        return [batch_size(b) for b in self.batches]

    @property
    def n_samples(self) -> int:
        return sum(self.batch_sizes)

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.params.values())

    def generator(self, stream: int = 0) -> torch.Generator:
        """A fresh CPU generator for random stream ``stream`` of this seed (device-independent draws)."""
        return torch.Generator().manual_seed((int(self.seed) * 1_000_003 + int(stream)) % (2**63 - 1))

    @property
    def lr(self) -> float | None:
        lr = self.checkpoint_metadata.get("lr")
        return None if lr is None else float(lr)

    # -- functional evaluation
    def forward(self, params: Mapping[str, torch.Tensor], inputs: Any) -> Any:
        """Model output with ``params`` substituted (``functional_call``; buffers from ``frozen``)."""
        args = tuple(inputs) if isinstance(inputs, tuple) else (inputs,)
        return functional_call(self.model, {**self.frozen, **params}, args)

    def batch_loss(self, params: Mapping[str, torch.Tensor], batch: Batch) -> torch.Tensor:
        x, y = batch
        if y is None:
            raise DiagnosticsError("the data gives no targets, but this analysis needs (inputs, targets)")
        return self.loss_fn(self.forward(params, x), y)

    def loss(self, params: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Sample-weighted mean loss over all batches: ``sum_b n_b L_b / N``."""
        params = self.params if params is None else params
        total = torch.zeros((), dtype=self.dtype, device=self.device)
        with torch.no_grad():
            for b, n in zip(self.batches, self.batch_sizes):
                total = total + self.batch_loss(params, b).to(self.dtype) * n
        return total / self.n_samples

    def restrict(self, pattern: str | None = None, names: Sequence[str] | None = None) -> Context:
        """A context whose analysed parameters are those matching ``pattern`` (regex) or ``names``."""
        everything = {**self.params}
        if names is not None:
            keep = [n for n in everything if n in set(names)]
        elif pattern:
            rx = compile_params(pattern)
            keep = [n for n in everything if rx.search(n)]
        else:
            return self
        if not keep:
            raise DiagnosticsError(
                f"no parameter matches '{pattern if names is None else names}'; parameters: "
                + ", ".join(list(everything)[:20])
            )
        params = {n: everything[n] for n in keep}
        frozen = {**self.frozen, **{n: t for n, t in everything.items() if n not in params}}
        return replace(self, params=params, frozen=frozen)

    def with_batches(self, batches: list[Batch]) -> Context:
        return replace(self, batches=batches)


def compile_params(pattern: str) -> re.Pattern[str]:
    """``--params REGEX`` compiled, or a one-line error naming what is wrong with it."""
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise DiagnosticsError(
            f"--params '{pattern}' is not a valid regular expression ({exc}); e.g. --params '^fc' or 'layer[12]'"
        ) from exc


def parameter_groups(names: Iterable[str]) -> dict[str, list[str]]:
    """Group parameter names by owning module: ``layer1.0.weight`` -> ``layer1.0``."""
    groups: dict[str, list[str]] = {}
    for n in names:
        owner = n.rsplit(".", 1)[0] if "." in n else n
        groups.setdefault(owner, []).append(n)
    return groups


# ----------------------------------------------------------------------------- building it up
def _fit_state_dict(model: nn.Module, state: dict[str, torch.Tensor], spec: str) -> dict[str, torch.Tensor]:
    want = model.state_dict()
    keys = set(want)
    if set(state) != keys:
        for prefix in _STRIP_PREFIXES:
            if state and all(k.startswith(prefix) for k in state):
                stripped = {k[len(prefix) :]: v for k, v in state.items()}
                if set(stripped) == keys or len(set(stripped) & keys) > len(set(state) & keys):
                    state = stripped
        # Lightning: only keys under 'model.' belong to the network
        if set(state) != keys:
            for prefix in _STRIP_PREFIXES:
                sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
                if set(sub) == keys:
                    state = sub
                    break
    missing = sorted(keys - set(state))
    unexpected = sorted(set(state) - keys)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s) {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        raise DiagnosticsError(f"the checkpoint does not fit the model built by '{spec}': {'; '.join(parts)}")
    for k, t in want.items():
        if tuple(state[k].shape) != tuple(t.shape):
            raise DiagnosticsError(
                f"the checkpoint does not fit the model built by '{spec}': '{k}' has shape "
                f"{tuple(state[k].shape)} in the checkpoint but {tuple(t.shape)} in the model"
            )
        got = state[k]
        if t.is_floating_point() and not got.is_floating_point():
            # load_state_dict would cast silently (complex: the imaginary part dropped with only a warning)
            raise DiagnosticsError(
                f"tensor '{k}' is {str(got.dtype).replace('torch.', '')} in the checkpoint but the model's is "
                f"{str(t.dtype).replace('torch.', '')}: only floating-point weights are analysed; "
                "save the real floating-point weights"
            )
    return state


def build_model(checkpoint: Checkpoint, binding: Binding, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Call the model factory, load the checkpoint's weights strictly, move to device/dtype, eval mode."""
    assert binding.model is not None
    from_ck = binding.sources.get("model") == "checkpoint"
    model = call_factory(binding.model, binding.model_kwargs, "model factory", from_checkpoint=from_ck)
    if not isinstance(model, nn.Module):
        raise DiagnosticsError(
            f"model factory '{binding.model}' returned a {type(model).__name__}, not a torch.nn.Module"
        )
    check_finite(checkpoint.state_dict, f"checkpoint '{checkpoint.name}'")
    state = _fit_state_dict(model, checkpoint.state_dict, binding.model)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise DiagnosticsError(
            f"loading '{checkpoint.name}' into '{binding.model}' failed: {str(exc).splitlines()[0]}"
        ) from exc
    model = model.to(device=device, dtype=dtype)
    model.eval()
    return model


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return default_device()
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise DiagnosticsError(f"unknown device '{name}'; use cpu, cuda, cuda:N or auto") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DiagnosticsError(f"device '{name}' asked for, but CUDA is not available here; use --device cpu")
    return dev


def resolve_dtype(name: str | torch.dtype | None) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name is None:
        return torch.float32
    if name not in DTYPES:
        raise DiagnosticsError(f"unknown dtype '{name}'; use {' or '.join(DTYPES)}")
    return DTYPES[name]


def build_context(
    checkpoint: Checkpoint,
    binding: Binding,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    seed: int = 0,
    samples: int | None = None,
    batch_size_: int | None = None,
    params: str | None = None,
    check: bool = True,
    need_targets: bool = True,
    need_data: bool = True,
) -> Context:
    """Checkpoint + binding -> :class:`Context` (model, data, loss), then the determinism check.

    Args:
        params: regex restricting the analysed parameters (others are held fixed).
        samples: seeded subset size of the data (stream 0 of ``seed``).
        check: run :func:`check_determinism` (and the finite-loss check when targets exist).
        need_data: False for data-free analyses (weight spectra): no data factory is called, the context
            has no batches and no determinism check runs.
    """
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    dt = resolve_dtype(dtype)
    if samples is not None and samples <= 0:
        raise DiagnosticsError(f"--samples must be positive, got {samples}")
    if batch_size_ is not None and batch_size_ <= 0:
        raise DiagnosticsError(f"--batch-size must be positive, got {batch_size_}")
    model = build_model(checkpoint, binding, dev, dt)
    loss_fn, loss_name = resolve_loss(binding.loss, from_checkpoint=binding.sources.get("loss") == "checkpoint")
    prepared = PreparedData([], [], None)
    if need_data:
        assert binding.data is not None
        raw = call_factory(
            binding.data,
            binding.data_kwargs,
            "data factory",
            from_checkpoint=binding.sources.get("data") == "checkpoint",
        )
        prepared = prepare_batches(
            raw,
            batch_size_=batch_size_,
            samples=samples,
            generator=stream_generator(seed, 0),
            where=f"data '{binding.data}'",
        )
    batches = [to_device(b, dev, dt) for b in prepared.batches]
    check_data(batches, f"data '{binding.data}'")
    if need_targets and any(b[1] is None for b in batches):
        raise DiagnosticsError(f"data '{binding.data}' gives inputs only; this analysis needs (inputs, targets)")
    named = dict(model.named_parameters())
    analysed = {n: p.detach() for n, p in named.items() if p.requires_grad}
    if not analysed:
        raise DiagnosticsError(f"model '{binding.model}' has no trainable parameters")
    frozen = {n: p.detach() for n, p in named.items() if n not in analysed}
    frozen.update({n: b for n, b in model.named_buffers()})
    meta = dict(checkpoint.metadata)
    meta["samples_available"] = prepared.total_available
    meta["sha256"] = checkpoint.sha256
    ctx = Context(
        model=model,
        params=analysed,
        frozen=frozen,
        batches=batches,
        loss_fn=loss_fn,
        device=dev,
        dtype=dt,
        seed=int(seed),
        checkpoint=checkpoint.name,
        step=checkpoint.step,
        checkpoint_metadata=meta,
        optimizer_state=checkpoint.optimizer_state,
        loss_name=loss_name,
        notes=list(prepared.notes),
        binding=binding.describe(),
    )
    if params:
        ctx = ctx.restrict(params)
    if check and need_data:
        ctx.notes.extend(check_determinism(ctx, need_loss=need_targets))
    return ctx


# ------------------------------------------------------------------------------- data and loss checks
def _count_nonfinite(obj: Any) -> tuple[int, int]:
    """(NaN count, Inf count) over every floating tensor in ``obj`` (nested tuples/lists/dicts)."""
    if isinstance(obj, torch.Tensor):
        if not (obj.is_floating_point() or obj.is_complex()):
            return 0, 0
        t = obj.detach()
        return int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
    if isinstance(obj, (list, tuple)):
        counts = [_count_nonfinite(o) for o in obj]
    elif isinstance(obj, Mapping):
        counts = [_count_nonfinite(o) for o in obj.values()]
    else:
        return 0, 0
    return sum(c[0] for c in counts), sum(c[1] for c in counts)


def check_data(batches: Sequence[Batch], where: str) -> None:
    """Every floating value of every batch is finite; else name the first bad batch.

    A NaN or Inf in the data does not always make the loss NaN (``tanh(inf) = 1``), but it makes
    gradients and Hessian-vector products NaN, so it is refused before any analysis.
    """
    for i, (x, y) in enumerate(batches):
        for part, obj in (("inputs", x), ("targets", y)):
            n_nan, n_inf = _count_nonfinite(obj)
            if n_nan or n_inf:
                raise DiagnosticsError(
                    f"{where}: batch {i} ({batch_size((x, y))} samples) has {n_nan} NaN and {n_inf} Inf values in "
                    f"its {part}; clean the data or drop those samples"
                )


def _describe(obj: Any) -> str:
    if isinstance(obj, torch.Tensor):
        return f"shape {tuple(obj.shape)}, {str(obj.dtype).replace('torch.', '')}"
    if isinstance(obj, (list, tuple)):
        return f"a {type(obj).__name__} of {len(obj)}"
    return type(obj).__name__


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, Mapping):
        return [t for o in obj.values() for t in _tensors(o)]
    return []


_DTYPE_WORDS = re.compile(r"dtype|scalar type|Long|Int|Byte|Bool|not implemented for", re.IGNORECASE)


def _forward_error(ctx: Context, inputs: Any, exc: Exception) -> DiagnosticsError:
    """A one-line explanation of why the model cannot take the data's inputs."""
    msg = " ".join(str(exc).split())[:240]
    model, data = ctx.binding.get("model"), ctx.binding.get("data")
    ints = [t for t in _tensors(inputs) if not (t.is_floating_point() or t.is_complex())]
    if ints and _DTYPE_WORDS.search(msg):
        kind = str(ints[0].dtype).replace("torch.", "")
        return DiagnosticsError(
            f"data '{data}' gives {kind} inputs but model '{model}' computes in {str(ctx.dtype).replace('torch.', '')} "
            f"({msg}); return floating-point inputs from the data callable (e.g. X.float())"
        )
    shape = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else None
    m = re.search(r"shapes cannot be multiplied \((\d+)x(\d+) and (\d+)x(\d+)\)", msg)
    if m:
        return DiagnosticsError(
            f"model '{model}' expects {m.group(3)} input features but data '{data}' gives inputs of shape {shape} "
            f"({m.group(2)} features; {msg}); check --data, --model and its model_kwargs"
        )
    m = re.search(r"expected input\[([^\]]*)\] to have (\d+) channels, but got (\d+) channels", msg)
    if m:
        return DiagnosticsError(
            f"model '{model}' expects {m.group(2)} input channels but data '{data}' gives inputs of shape {shape} "
            f"({m.group(3)} channels); check --data, --model and its model_kwargs"
        )
    return DiagnosticsError(
        f"model '{model}' fails on the first batch of data '{data}' (inputs: {_describe(inputs)}): "
        f"{type(exc).__name__}: {msg}"
    )


def _check_labels(ctx: Context, outputs: Any) -> None:
    """Integer labels of the built-in classification losses must index the model's outputs."""
    name = ctx.loss_name
    if name not in ("cross_entropy", "nll", "mse") or not isinstance(outputs, torch.Tensor) or outputs.dim() < 2:
        return
    classes = int(outputs.shape[1])
    for i, (_, y) in enumerate(ctx.batches):
        if not isinstance(y, torch.Tensor) or y.is_floating_point() or y.is_complex() or y.numel() == 0:
            continue
        if name == "mse" and not (outputs.dim() == 2 and y.dim() == 1):
            continue  # integer regression targets, not labels
        counted = y != -100 if name != "mse" else torch.ones_like(y, dtype=torch.bool)  # -100: ignore_index
        bad = ((y < 0) | (y >= classes)) & counted
        if bool(bad.any()):
            raise DiagnosticsError(
                f"data '{ctx.binding.get('data')}': batch {i} has label {int(y[bad][0])}, but the model has {classes} "
                f"outputs, so loss '{name}' needs labels 0..{classes - 1} ({classes} classes); fix the labels or "
                "the model's output size"
            )


def _checked_loss(ctx: Context, i: int, outputs: Any, targets: Any) -> torch.Tensor:
    """``loss_fn(outputs, targets)``, or a one-line error when it raises or returns something else than a
    scalar tensor."""
    name = ctx.loss_name
    try:
        value = ctx.loss_fn(outputs, targets)
    except DiagnosticsError:
        raise
    except Exception as exc:
        msg = " ".join(str(exc).split())[:200]
        raise DiagnosticsError(
            f"loss '{name}' raised {type(exc).__name__}: {msg} on batch {i} (outputs: {_describe(outputs)}; "
            f"targets: {_describe(targets)})"
        ) from exc
    if not isinstance(value, torch.Tensor):
        raise DiagnosticsError(
            f"loss '{name}' returned a {type(value).__name__}, not a tensor: compute it from the outputs with torch "
            "operations, so that it can be differentiated"
        )
    if value.numel() != 1:
        raise DiagnosticsError(
            f"loss '{name}' returned a tensor of shape {tuple(value.shape)}, not a scalar: return the mean over the "
            "batch (e.g. .mean())"
        )
    return value.reshape(())


def _check_loss(ctx: Context) -> None:
    """The loss is a differentiable scalar on every batch and finite on the whole data."""
    x0, y0 = ctx.batches[0]
    params = {n: p.detach().requires_grad_(True) for n, p in ctx.params.items()}
    with torch.enable_grad():
        first = _checked_loss(ctx, 0, ctx.forward(params, x0), y0)
    if not first.requires_grad:
        raise DiagnosticsError(
            f"loss '{ctx.loss_name}' does not depend on the model outputs through torch operations (the value it "
            "returns carries no gradient): no .item(), float() or torch.tensor(...) inside the loss"
        )
    total = first.detach().to(ctx.dtype) * batch_size(ctx.batches[0])
    with torch.no_grad():
        for i, (x, y) in enumerate(ctx.batches[1:], start=1):
            total = total + _checked_loss(ctx, i, ctx.forward(ctx.params, x), y).to(ctx.dtype) * batch_size((x, y))
    value = total / ctx.n_samples
    if not torch.isfinite(value):
        raise DiagnosticsError(
            f"the loss at checkpoint '{ctx.checkpoint}' is {float(value)}; check the data, the loss "
            "('--loss') and whether training diverged"
        )


# -------------------------------------------------------------------------------- determinism check
ROUNDING_ULPS = 1024


@dataclass(frozen=True)
class OutputDifference:
    """How far two evaluations are apart: the worst floating output tensor.

    Attributes:
        agree: every tensor within ``allowed``, integer outputs equal, structure equal.
        max_abs: ``max |a - b|`` of the worst tensor (``inf`` when shapes or structure differ).
        scale: ``max(|a|, |b|)`` over that tensor (the output magnitude).
        allowed: ``ROUNDING_ULPS * eps(dtype) * scale``: what float re-association may change.
    """

    agree: bool
    max_abs: float = 0.0
    scale: float = 0.0
    allowed: float = 0.0

    @property
    def relative(self) -> float:
        return self.max_abs / self.scale if self.scale > 0 else (0.0 if self.max_abs == 0 else math.inf)


def compare_outputs(a: Any, b: Any) -> OutputDifference:
    """Compare two evaluations of the same input up to float rounding.

    Floating tensors agree when ``max |a - b| <= 1024 * eps(dtype) * max(|a|, |b|)``: parallel reductions
    (multi-threaded BLAS, GPU kernels) sum in varying orders, which moves results by a few units of
    roundoff of the magnitudes involved; dropout or injected noise moves them by a sizeable fraction of
    the output. NaN in the same places counts as equal. Integer tensors and other values must be equal.

    Returns:
        The :class:`OutputDifference` of the tensor furthest from its allowance.
    """
    mismatch = OutputDifference(False, math.inf, math.nan, 0.0)
    worst, worst_ratio = OutputDifference(True), -1.0
    pairs: list[tuple[Any, Any]] = [(a, b)]
    while pairs:
        x, y = pairs.pop()
        if isinstance(x, torch.Tensor):
            if not isinstance(y, torch.Tensor) or x.shape != y.shape or x.dtype != y.dtype:
                return mismatch
            if not (x.is_floating_point() or x.is_complex()):
                if not torch.equal(x, y):
                    return mismatch
                continue
            wide = torch.complex128 if x.is_complex() else torch.float64
            xd, yd = x.detach().to(wide), y.detach().to(wide)
            diff = (xd - yd).abs()
            diff = torch.where(torch.isnan(xd) & torch.isnan(yd), torch.zeros_like(diff), diff)
            mags = torch.cat([xd.abs().flatten(), yd.abs().flatten()])
            mags = mags[torch.isfinite(mags)]
            scale = float(mags.max()) if mags.numel() else 0.0
            d = float(diff.max()) if diff.numel() else 0.0
            d = math.inf if math.isnan(d) else d
            info = torch.finfo(x.dtype)
            allowed = ROUNDING_ULPS * info.eps * scale + info.tiny
            if d / allowed > worst_ratio:
                worst, worst_ratio = OutputDifference(True, d, scale, allowed), d / allowed
        elif isinstance(x, (list, tuple)):
            if not isinstance(y, (list, tuple)) or len(x) != len(y):
                return mismatch
            pairs += list(zip(x, y))
        elif isinstance(x, Mapping):
            if not isinstance(y, Mapping) or x.keys() != y.keys():
                return mismatch
            pairs += [(x[k], y[k]) for k in x]
        elif x != y:
            return mismatch
    return replace(worst, agree=worst_ratio <= 1.0)


def _detached(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, (list, tuple)):
        return type(obj)(_detached(o) for o in obj) if not hasattr(obj, "_fields") else [_detached(o) for o in obj]
    if isinstance(obj, Mapping):
        return {k: _detached(v) for k, v in obj.items()}
    return obj


def _random_modules(model: nn.Module, batch: Batch, forward: Callable[[Any], Any]) -> list[str]:
    """Names of the modules whose outputs differ (beyond rounding) between two passes on the same input."""
    records: list[dict[str, Any]] = [{}, {}]
    handles = []
    current = {"i": 0}

    def hook(name):
        def fn(mod, inp, out):
            records[current["i"]][name] = (_detached(inp), _detached(out), type(mod).__name__)

        return fn

    for name, mod in model.named_modules():
        if name:
            handles.append(mod.register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            for i in (0, 1):
                current["i"] = i
                forward(batch[0])
    finally:
        for h in handles:
            h.remove()
    culprits = []
    for name, (inp, out, kind) in records[0].items():
        other = records[1].get(name)
        if other is not None and compare_outputs(inp, other[0]).agree and not compare_outputs(out, other[1]).agree:
            culprits.append(f"'{name}' ({kind})")
    return culprits


def check_determinism(ctx: Context, need_loss: bool = True) -> list[str]:
    """Two evaluations of the same batch must agree up to float rounding (:func:`compare_outputs`); name
    the culprit and say by how much when they do not. Also checks that the model takes the data's
    inputs, that integer labels fit its outputs and, with ``need_loss``, that the loss is a
    differentiable, finite scalar on every batch.

    Returns:
        notes (warnings) that do not stop the analysis, e.g. BatchNorm without running statistics.

    Raises:
        DiagnosticsError: modules stuck in training mode, random layers in eval mode, inputs the model
            cannot take, labels out of range, a loss that raises or is not a scalar, or a non-finite loss.
    """
    notes: list[str] = []
    training = [n for n, m in ctx.model.named_modules() if m.training]
    if training:
        raise DiagnosticsError(
            f"modules stay in training mode after model.eval(): {training[:5]}; dropout and BatchNorm "
            "would make every evaluation different. Do not override train()/eval() in the model"
        )
    for name, m in ctx.model.named_modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and not m.track_running_stats:
            notes.append(
                f"BatchNorm '{name}' keeps no running statistics, so it normalises with batch statistics "
                "even in eval mode: the results depend on --batch-size"
            )
    batch = ctx.batches[0]
    try:
        with torch.no_grad():
            out1 = ctx.forward(ctx.params, batch[0])
    except DiagnosticsError:
        raise
    except Exception as exc:
        raise _forward_error(ctx, batch[0], exc) from exc
    with torch.no_grad():
        out2 = ctx.forward(ctx.params, batch[0])
    diff = compare_outputs(out1, out2)
    if not diff.agree:
        culprits = _random_modules(ctx.model, batch, lambda x: ctx.forward(ctx.params, x))
        where = f" at {', '.join(culprits[:3])}" if culprits else ""
        by = (
            f"max abs difference {diff.max_abs:.3g} (relative {diff.relative:.3g} to the largest output "
            f"{diff.scale:.3g}; rounding allows {ROUNDING_ULPS} x eps = {diff.allowed / diff.scale if diff.scale else 0:.2g})"
            if math.isfinite(diff.max_abs)
            else "the outputs differ in shape, type or integer values"
        )
        raise DiagnosticsError(
            f"the model gives different outputs for the same batch in eval mode{where}: {by}; dropout applied "
            "with training=True, or random noise in forward(), would make curvature estimates noise. "
            "Make forward() deterministic in eval mode"
        )
    if need_loss:
        _check_labels(ctx, out1)
        _check_loss(ctx)
    return notes


def describe_context(ctx: Context) -> dict[str, Any]:
    """The run metadata every analyzer attaches to its result."""
    from diagnostics.results import package_versions

    return {
        "checkpoint": ctx.checkpoint,
        "step": ctx.step,
        "seed": ctx.seed,
        "samples": ctx.n_samples,
        "samples_available": ctx.checkpoint_metadata.get("samples_available"),
        "batches": len(ctx.batches),
        "n_params": ctx.n_params,
        "dtype": str(ctx.dtype).replace("torch.", ""),
        "device": str(ctx.device),
        "loss": ctx.loss_name,
        "binding": ctx.binding,
        "checkpoint_metadata": {
            k: v for k, v in ctx.checkpoint_metadata.items() if k in ("lr", "optimizer", "step_source")
        },
        "notes": list(ctx.notes),
        "versions": package_versions(),
    }
