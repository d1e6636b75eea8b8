"""Context: everything an analyzer needs, built from a checkpoint and a binding.

``Context`` = eval-mode model + analysed parameters as a dict + the rest (frozen parameters, buffers)
+ materialised batches + loss + device/dtype + seed. Building one also runs the determinism check:
two evaluations of the same batch must agree, and modules left in training mode, random layers,
BatchNorm without running statistics or shuffled/augmented data are named instead of silently
turning curvature estimates into noise.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from diagnostics import batches as B
from diagnostics.batches import Batch, batch_size, fingerprint
from diagnostics.binding import Binding, call_factory, describe_shape, resolve_loss
from diagnostics.checkpoint import Checkpoint, check_finite
from diagnostics.errors import DiagnosticsError, one_line
from diagnostics.seeding import stream_generator

DTYPES = {"float32": torch.float32, "float64": torch.float64}
FEATURE_NOTES = "_diagnostics_feature_notes"  # notes diagnostics.features leaves on a model (a list)
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


# ------------------------------------------------------------------------------------ batch layouts
# keys of a dict batch taken as its targets when --targets does not name one, in this order
TARGET_KEYS = ("labels", "label", "targets", "target", "y")


@dataclass(frozen=True)
class BatchLayout:
    """Which parts of a batch are the model's inputs and which its targets (``--inputs``/``--targets``).

    Attributes:
        inputs: dict keys (or tuple positions) passed to the model, in order; None: every part that is
            not the targets.
        targets: the dict key (or tuple position) of the targets; None: the first of :data:`TARGET_KEYS`
            in a dict, the second item of a tuple (with ``--inputs``: the second item unless it is an input, else the one item the inputs leave).
    """

    inputs: tuple[str, ...] | None = None
    targets: str | None = None

    @classmethod
    def parse(cls, inputs: str | Sequence[str] | None = None, targets: str | None = None) -> BatchLayout:
        """``--inputs "input_ids,attention_mask"`` and ``--targets labels`` -> a layout."""
        if isinstance(inputs, str):
            inputs = [k.strip() for k in inputs.split(",")]
        keys = tuple(k for k in (inputs or []) if k)
        if inputs is not None and not keys:
            raise DiagnosticsError("--inputs names no key; pass --inputs KEY[,KEY] (dict keys or tuple positions)")
        target = str(targets).strip() if targets is not None else None
        if target is not None and target in keys:
            raise DiagnosticsError(f"--targets '{target}' is also one of --inputs {','.join(keys)}; name it once")
        return cls(keys or None, target or None)

    @property
    def given(self) -> bool:
        """Whether ``--inputs`` or ``--targets`` named anything (else the layout is inferred per batch)."""
        return self.inputs is not None or self.targets is not None


def numpy_to_torch(obj: Any) -> Any:
    """Every numpy array (and numpy scalar) of a batch becomes a tensor (a copy; dtypes kept)."""
    import numpy as np

    def convert(leaf: Any) -> Any:
        if isinstance(leaf, np.ndarray):
            if leaf.dtype == object:
                raise DiagnosticsError(
                    f"the data holds a numpy array of Python objects (shape {leaf.shape}); give numeric arrays"
                )
            return torch.from_numpy(np.array(leaf, copy=True))
        if isinstance(leaf, np.generic):
            return torch.as_tensor(leaf.item())
        if isinstance(leaf, list) and leaf and all(isinstance(x, np.ndarray) for x in leaf):
            return [convert(x) for x in leaf]
        return leaf

    return B.map_leaves(convert, obj)


def _keys_text(keys: Sequence[Any]) -> str:
    return ", ".join(str(k) for k in keys)


def _position(key: str, n: int, where: str, flag: str) -> int:
    try:
        i = int(key)
    except ValueError:
        raise DiagnosticsError(
            f"{where} yields tuples of {n} items; {flag} '{key}' must be a position 0..{n - 1}"
        ) from None
    if not -n <= i < n:
        raise DiagnosticsError(f"{where} yields tuples of {n} items; {flag} {key} is not a position 0..{n - 1}")
    return i % n


def _is_mask_like(ids: Any, mask: Any) -> bool:
    """``mask`` is an attention mask for the token ids ``ids``: a bool or 0/1 integer tensor of the
    same ``[B, T]`` shape whose rows are contiguous (right or left padding)."""
    if not (isinstance(ids, torch.Tensor) and isinstance(mask, torch.Tensor)):
        return False
    if ids.dim() != 2 or ids.shape != mask.shape or ids.is_floating_point() or mask.is_floating_point():
        return False
    if ids.dtype == torch.bool:
        return False
    m = mask.to(torch.int64)
    if not bool(((m == 0) | (m == 1)).all()):
        return False
    step = m[:, 1:] - m[:, :-1]
    return bool((step <= 0).all(dim=1).logical_or((step >= 0).all(dim=1)).all())


def split_item(
    item: Any, layout: BatchLayout, where: str, notes: list[str] | None = None, info: dict[str, Any] | None = None
) -> Batch:
    """One batch as the data gives it -> ``(inputs, targets)``.

    * a tensor: ``(tensor, None)``;
    * a tuple or list: ``(item[0], item[1])`` (further items such as sample indices are ignored); a
      ``(token ids [B, T], attention mask [B, T])`` pair is taken as two inputs without targets, with a
      note; ``--inputs 0,1 --targets 2`` picks positions;
    * a dict: targets under ``--targets`` or the first of :data:`TARGET_KEYS`; the inputs are the other
      keys (or ``--inputs``), kept as a dict and passed to the model as keyword arguments.

    Raises:
        DiagnosticsError: a key or position that is not there, listing what the batch holds and the flags.
    """
    if isinstance(item, torch.Tensor):
        if layout.given:
            raise DiagnosticsError(
                f"{where} yields bare tensors (shape {list(item.shape)}), which have no keys for --inputs/--targets; "
                "drop those flags or yield (inputs, targets) tuples or dicts"
            )
        return item, None
    if isinstance(item, Mapping):
        return _split_mapping(item, layout, where, info)
    if isinstance(item, (tuple, list)) and item:
        return _split_sequence(item, layout, where, notes)
    raise DiagnosticsError(
        f"{where} yields {type(item).__name__} items; expected (inputs, targets) pairs, dicts of tensors "
        "(map their keys with --inputs KEY[,KEY] and --targets KEY) or input tensors"
    )


def _split_mapping(item: Mapping, layout: BatchLayout, where: str, info: dict[str, Any] | None) -> Batch:
    """A dict batch -> ``(inputs dict, targets)``: targets under ``--targets`` or the first of
    :data:`TARGET_KEYS`, inputs under ``--inputs`` or every other key."""
    keys = list(item)
    if layout.targets is not None:
        if layout.targets not in item:
            raise DiagnosticsError(
                f"{where} yields dicts with keys {_keys_text(keys)}; --targets '{layout.targets}' is not one of them"
            )
        target_key: Any = layout.targets
    else:
        target_key = next((k for k in TARGET_KEYS if k in item), None)
    if layout.inputs is not None:
        missing = [k for k in layout.inputs if k not in item]
        if missing:
            raise DiagnosticsError(
                f"{where} yields dicts with keys {_keys_text(keys)}; --inputs {','.join(missing)} "
                f"{'is' if len(missing) == 1 else 'are'} not among them"
            )
        input_keys = list(layout.inputs)
    else:
        input_keys = [k for k in keys if k != target_key]
    if not input_keys:
        raise DiagnosticsError(
            f"{where} yields dicts with keys {_keys_text(keys)} and no model inputs besides the targets "
            f"'{target_key}'; name them with --inputs KEY[,KEY] (and the targets with --targets KEY)"
        )
    if info is not None:
        info["target_key"] = target_key
    return {k: item[k] for k in input_keys}, (item[target_key] if target_key is not None else None)


def _split_sequence(item: Sequence, layout: BatchLayout, where: str, notes: list[str] | None) -> Batch:
    """A tuple/list batch -> ``(inputs, targets)`` by position (``--inputs``/``--targets`` pick them)."""
    n = len(item)
    if layout.given:
        t = None if layout.targets is None else _position(layout.targets, n, where, "--targets")
        if layout.inputs is not None:
            idx = [_position(k, n, where, "--inputs") for k in layout.inputs]
            if t is None:  # the default targets, as without --inputs: the second item, else the one item left
                rest = [i for i in range(n) if i not in idx]
                t = 1 if 1 in rest else (rest[0] if len(rest) == 1 else None)
        else:
            idx = [0] if t != 0 else [1]
        inputs = item[idx[0]] if len(idx) == 1 else tuple(item[i] for i in idx)
        return inputs, (None if t is None else item[t])
    if n == 1:
        return item[0], None
    if n == 2 and _is_mask_like(item[0], item[1]):
        if notes is not None and not any("attention mask" in x for x in notes):
            notes.append(
                f"{where} yields (token ids, 0/1 mask) pairs of the same shape [B, T]: taken as two model "
                "inputs (ids, attention mask) without targets; pass --inputs 0 --targets 1 if the second "
                "item is the targets"
            )
        return (item[0], item[1]), None
    return item[0], item[1]


def _is_tensor_like(obj: Any) -> bool:
    import numpy as np

    return isinstance(obj, (torch.Tensor, np.ndarray))


def _is_whole_data(data: Any) -> bool:
    """The data callable returned all the data at once: a tensor, an ``(inputs, targets)`` tuple of
    tensors (or several inputs), or a dict of tensors."""
    if isinstance(data, torch.Tensor):
        return True
    if isinstance(data, Mapping):
        return bool(data) and all(_is_tensor_like(v) or v is None for v in data.values())
    if isinstance(data, tuple) and 2 <= len(data) <= 3:
        first = data[0]
        inputs_ok = _is_tensor_like(first) or (
            isinstance(first, tuple) and bool(first) and all(_is_tensor_like(t) for t in first)
        )
        return inputs_ok and all(_is_tensor_like(v) or v is None for v in data[1:])
    if isinstance(data, list) and len(data) == 2 and all(_is_tensor_like(v) or v is None for v in data):
        return _is_tensor_like(data[0])
    return False


def samples_note(samples: int | None, available: int, where: str = "the data") -> list[str]:
    """A note when ``--samples`` asks for more than the data holds (then every sample is used), else none."""
    if samples is None or samples <= available:
        return []
    return [f"--samples {samples} is more than the {available} samples of {where}: all {available} were used"]


def _subset_indices(n: int, samples: int, generator: torch.Generator) -> torch.Tensor:
    return torch.sort(torch.randperm(n, generator=generator)[:samples]).values


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
    """The data as a fixed list of batches, ready for every analyzer.

    Attributes:
        batches: ``(inputs, targets)`` batches, in order (the last one may be smaller).
        notes: what was inferred or changed on the way (layout, conversions), for the result's metadata.
        total_available: the number of samples in the data before ``--samples`` drew a subset (None when
            there is no data).
        target_key: the dict key the targets were taken from (dict batches only).
    """

    batches: list[Batch]
    notes: list[str]
    total_available: int
    target_key: str | None = None  # the dict key the targets were found under (dict batches)


def _check_rows(batch: Batch, where: str) -> int:
    """The batch's sample count; every tensor with a sample axis must agree on it."""
    sizes = {int(t.shape[0]) for t in B.tensors(batch) if t.dim() > 0}
    if len(sizes) > 1:
        x, y = batch
        xs = [int(t.shape[0]) for t in B.tensors(x) if t.dim() > 0]
        ys = [int(t.shape[0]) for t in B.tensors(y) if t.dim() > 0]
        if xs and ys and len(set(xs)) == 1 and len(set(ys)) == 1:
            raise DiagnosticsError(f"{where}: inputs have {xs[0]} rows but targets {ys[0]}; they must match")
        raise DiagnosticsError(
            f"{where}: the parts of a batch disagree on the number of samples ({sorted(sizes)}); every tensor "
            "needs the sample axis first"
        )
    return sizes.pop() if sizes else 0


def prepare_batches(
    data: Any,
    *,
    batch_size_: int | None = None,
    samples: int | None = None,
    generator: torch.Generator | None = None,
    where: str = "data",
    layout: BatchLayout | None = None,
) -> PreparedData:
    """Materialise what a data callable returned into a fixed list of (inputs, targets) batches.

    Accepts all the data at once (a tensor, an ``(inputs, targets)`` tuple whose inputs may be a tuple of
    several tensors, a dict of tensors), a python list of ``[C, H, W]`` images or ``(images, per-image
    targets)`` (detectors; the list is the batch), or an iterable of batches (a DataLoader) of any of
    these forms (:func:`split_item`). numpy arrays are converted to tensors. ``samples`` draws a seeded
    subset without replacement. Batches are kept as given (ragged last batch included) unless
    ``samples`` or ``batch_size_`` asks for re-batching; every product over the data weights a batch by
    its size (or, for token-level losses, by its number of counted targets), so a ragged split is exact.
    """
    layout = layout or BatchLayout()
    notes: list[str] = []
    info: dict[str, Any] = {}
    gen = generator or torch.Generator().manual_seed(0)
    data = numpy_to_torch(data) if not isinstance(data, (str, bytes)) and _has_numpy(data) else data
    images = _image_list_data(data)
    if images is not None:  # a list of [C, H, W] images (with optional per-image targets) is one batch
        x, y = images
        n = len(x)
        batch: Batch = (x, y)
        if samples is not None and samples < n:
            batch = B.take(batch, _subset_indices(n, samples, gen))
        notes += samples_note(samples, n, where)
        return PreparedData(B.split(batch, batch_size_), notes, n, info.get("target_key"))
    if _is_whole_data(data):
        batch = split_item(data, layout, where, notes, info)
        n = _check_rows(batch, where)
        if n == 0:
            raise DiagnosticsError(f"{where} is empty (0 samples)")
        if samples is not None and samples < n:
            batch = B.take(batch, _subset_indices(n, samples, gen))
        notes += samples_note(samples, n, where)
        return PreparedData(B.split(batch, batch_size_), notes, n, info.get("target_key"))
    if isinstance(data, Iterable) and not isinstance(data, (str, bytes, Mapping)):
        items = _read_batches(data, layout, where, notes, info)
        total = sum(batch_size(b) for b in items)
        if total == 0:
            raise DiagnosticsError(f"{where} is empty (0 samples)")
        if samples is not None and samples < total:
            subset = B.take(B.concat(items), _subset_indices(total, samples, gen))
            items = B.split(subset, batch_size_ or batch_size(items[0]))
        elif batch_size_:
            items = B.split(B.concat(items), batch_size_)
        notes += samples_note(samples, total, where)
        return PreparedData(items, notes, total, info.get("target_key"))
    raise DiagnosticsError(
        f"{where} returned a {type(data).__name__}; expected (inputs, targets) tensors, a dict of tensors or an "
        "iterable of batches"
    )


def _read_batches(
    data: Iterable, layout: BatchLayout, where: str, notes: list[str], info: dict[str, Any]
) -> list[Batch]:
    """One pass over an iterable of batches, split into ``(inputs, targets)``; a re-iterable whose second
    pass differs (shuffling, random augmentation) gets a note: the first pass is what is analysed."""
    items = []
    for item in data:
        item = numpy_to_torch(item) if _has_numpy(item) else item
        items.append(split_item(item, layout, where, notes, info))
    if not items:
        raise DiagnosticsError(f"{where} yielded no batches")
    for b in items:
        _check_rows(b, where)
    if iter(data) is not data:  # re-iterable: check two passes agree
        try:
            first = next(iter(data))
        except StopIteration:
            return items
        second = split_item(numpy_to_torch(first) if _has_numpy(first) else first, layout, where)
        if fingerprint([second]) != fingerprint([items[0]]):
            notes.append(
                f"{where} gives different batches on two passes (shuffle=True or random augmentation); one fixed "
                "pass of it is analysed"
            )
    return items


def _has_numpy(obj: Any) -> bool:
    import sys

    if "numpy" not in sys.modules:
        return False
    import numpy as np

    if isinstance(obj, (np.ndarray, np.generic)):
        return True
    if isinstance(obj, (tuple, list)):
        return any(_has_numpy(o) for o in obj[:64])
    if isinstance(obj, Mapping):
        return any(_has_numpy(o) for o in obj.values())
    return False


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
    label_key: str = "labels"
    shifted_labels: bool = False
    token_weighted: bool = False
    counted: int | None = None
    own_causal_loss: bool = False  # --loss model of a transformers causal LM, recomputed in float64

    def __post_init__(self) -> None:
        if self.token_weighted and self.counted is None:
            self.counted = self._count_all(self.batches)

    # -- what the loss averages over
    def batch_count(self, batch: Batch) -> int | None:
        """Counted targets of one batch for a token-mean loss (:func:`~diagnostics.binding.counted_targets`)."""
        from diagnostics.binding import counted_targets

        return counted_targets(self.loss_name, batch[1], shifted=self.shifted_labels)

    def _count_all(self, batches: Sequence[Batch]) -> int:
        counts = [self.batch_count(b) for b in batches]
        return int(sum(c if c is not None else batch_size(b) for c, b in zip(counts, batches)))

    @property
    def weighting(self) -> str:
        """How batches are weighted in the full-data loss, in words (stated in every result's metadata)."""
        if not self.token_weighted:
            return "samples: the loss is the mean over samples; each batch is weighted by its number of samples"
        shift = " (labels shifted by one: the model's own causal-LM loss)" if self.shifted_labels else ""
        return (
            f"tokens: the loss is the mean over the {self.counted} counted targets; each batch is weighted by its "
            f"number of counted targets{shift}, targets equal to -100 are not counted"
        )

    # -- sizes and randomness
    @property
    def batch_sizes(self) -> list[int]:
        """The number of samples of each batch, in order."""
        return [batch_size(b) for b in self.batches]

    @property
    def n_samples(self) -> int:
        """The number of samples over all batches."""
        return sum(self.batch_sizes)

    @property
    def n_params(self) -> int:
        """The number of scalar entries of the analysed parameters (the dimension of the parameter space)."""
        return sum(p.numel() for p in self.params.values())

    def generator(self, stream: int = 0) -> torch.Generator:
        """A fresh CPU generator for random stream ``stream`` of this seed (device-independent draws)."""
        return torch.Generator().manual_seed((int(self.seed) * 1_000_003 + int(stream)) % (2**63 - 1))

    @property
    def lr(self) -> float | None:
        """The learning rate stored with the checkpoint; None when unknown."""
        lr = self.checkpoint_metadata.get("lr")
        return None if lr is None else float(lr)

    # -- functional evaluation
    def forward(self, params: Mapping[str, torch.Tensor], inputs: Any, **extra: Any) -> Any:
        """Model output with ``params`` substituted (``functional_call``; buffers from ``frozen``).

        A tuple of inputs is passed as positional arguments, a dict as keyword arguments (``extra``
        keyword arguments are added, e.g. the labels for ``--loss model``).
        """
        if isinstance(inputs, Mapping):
            args: tuple = ()
            kwargs = {**inputs, **extra}
        else:
            args = tuple(inputs) if isinstance(inputs, tuple) else (inputs,)
            kwargs = dict(extra)
        return functional_call(self.model, {**self.frozen, **params}, args, kwargs or None)

    def raw_batch_loss(self, params: Mapping[str, torch.Tensor], batch: Batch) -> torch.Tensor:
        """The loss of one batch as the loss function computes it (a token mean for token-level losses)."""
        return self.raw_outputs_and_loss(params, batch)[1]

    def raw_outputs_and_loss(self, params: Mapping[str, torch.Tensor], batch: Batch) -> tuple[Any, torch.Tensor]:
        """The model's outputs on one batch and the batch's loss as the loss function computes it (one forward).

        ``params`` may also name buffers or frozen parameters: they replace those of ``frozen`` (a per-point
        override, e.g. recomputed BatchNorm statistics). With ``--loss model`` the labels are passed to the
        model under ``label_key``.
        """
        x, y = batch
        if y is None:
            raise DiagnosticsError("the data gives no targets, but this analysis needs (inputs, targets)")
        if self.own_causal_loss:
            from diagnostics.binding import causal_lm_loss

            out = self.forward(params, x)
            return out, causal_lm_loss(out, y)
        out = self.forward(params, x, **{self.label_key: y}) if self.loss_name == "model" else self.forward(params, x)
        return out, self.loss_fn(out, y)

    def batch_scale(self, batch: Batch) -> float:
        """The factor :meth:`batch_loss` applies to the raw loss of ``batch`` (1 for a per-sample mean; for a
        token-mean loss ``(T_b / n_b) (N / T)``, 0 for a batch without counted targets)."""
        if not self.token_weighted:
            return 1.0
        count = self.batch_count(batch)
        if count == 0:
            return 0.0
        return (count / batch_size(batch)) * (self.n_samples / max(int(self.counted or 1), 1))

    def outputs_and_loss(self, params: Mapping[str, torch.Tensor], batch: Batch) -> tuple[Any, torch.Tensor]:
        """The model's outputs on one batch and its loss ``L_b`` scaled as :meth:`batch_loss` scales it."""
        scale = self.batch_scale(batch)
        out, loss = self.raw_outputs_and_loss(params, batch)
        return out, _scaled(loss, scale, params)

    def batch_loss(self, params: Mapping[str, torch.Tensor], batch: Batch) -> torch.Tensor:
        """The batch's loss ``L_b``, scaled so that the sample-weighted mean over batches is the full-data loss.

        For a per-sample mean this is the loss itself. For a token-mean loss (``counted`` targets ``T``
        over ``N`` samples in all) it is ``L_b * (T_b / n_b) * (N / T)``, so that
        ``sum_b (n_b / N) L'_b = sum_b T_b L_b / T``: the mean over every counted target of the data, for
        any batching (micro-batches and data shards compute their own ``T_b``). A batch without counted
        targets contributes zero.
        """
        scale = self.batch_scale(batch)
        if scale == 0.0:  # no forward needed
            return _zero_of(params)
        return _scaled(self.raw_batch_loss(params, batch), scale, params)

    def loss(self, params: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Mean loss over all data: ``sum_b n_b L_b / N`` (for token-level losses the mean over counted
        targets, see :meth:`batch_loss`)."""
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
        """The same model and loss over other batches (a token-level loss recounts its targets)."""
        return replace(self, batches=batches, counted=None)


def _zero_of(params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """A zero loss that depends on the floating-point weights (its gradient is zero, not missing or NaN)."""
    return sum(p.sum() for p in params.values() if p.is_floating_point()) * 0.0


def _scaled(loss: torch.Tensor, scale: float, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``loss * scale`` (:meth:`Context.batch_scale`); at scale 0 (no counted target: the raw token mean is 0/0)
    a zero tied to the weights instead."""
    if scale == 0.0:
        return _zero_of(params)
    return loss if scale == 1.0 else loss * scale


def compile_params(pattern: str) -> re.Pattern[str]:
    """``--params REGEX`` compiled, or a one-line error naming what is wrong with it."""
    try:
        return re.compile(pattern)
    except (re.error, OverflowError, RecursionError) as exc:  # 'a{99999999999}': OverflowError
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
def _strip_wrappers(state: dict[str, torch.Tensor], keys: set[str]) -> dict[str, torch.Tensor]:
    """Keys saved from wrapped models: ``torch.compile`` (``_orig_mod.``, also inside submodules), DDP and
    DataParallel (``module.``), Lightning (``model.``) and similar prefixes, removed until the keys fit."""
    if any("_orig_mod." in k for k in state) and not any("_orig_mod." in k for k in keys):
        state = {k.replace("_orig_mod.", ""): v for k, v in state.items()}
    changed = True
    while changed and set(state) != keys:
        changed = False
        for prefix in _STRIP_PREFIXES:
            if state and all(k.startswith(prefix) for k in state):
                stripped = {k[len(prefix) :]: v for k, v in state.items()}
                if set(stripped) == keys or len(set(stripped) & keys) > len(set(state) & keys):
                    state, changed = stripped, True
                    break
    # Lightning: only keys under 'model.' belong to the network
    if set(state) != keys:
        for prefix in _STRIP_PREFIXES:
            sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            if set(sub) == keys:
                return sub
    return state


def tied_groups(model: nn.Module) -> list[list[str]]:
    """State-dict keys that name one shared tensor (tied weights such as GPT-2's ``lm_head.weight`` and
    ``transformer.wte.weight``); ``save_pretrained`` stores only one key of each group."""
    by_id: dict[int, list[str]] = {}
    for name, t in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(t), []).append(name)
    for name, t in model.named_buffers(remove_duplicate=False):
        by_id.setdefault(id(t), []).append(name)
    return [names for names in by_id.values() if len(names) > 1]


def _fit_state_dict(model: nn.Module, state: dict[str, torch.Tensor], spec: str) -> dict[str, torch.Tensor]:
    from diagnostics.hf import ignored_key_patterns

    want = model.state_dict()
    keys = set(want)
    state = _strip_wrappers(dict(state), keys)
    for group in tied_groups(model):  # a tied weight saved under one of its names fills the others
        present = [k for k in group if k in state]
        if present:
            for k in group:
                state.setdefault(k, state[present[0]])
    may_miss, may_carry = ignored_key_patterns(model)
    missing = sorted(k for k in keys - set(state) if not any(p.search(k) for p in may_miss))
    unexpected = sorted(k for k in set(state) - keys if not any(p.search(k) for p in may_carry))
    state = {k: v for k, v in state.items() if k in keys}
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s) {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        raise DiagnosticsError(f"the checkpoint does not fit the model built by '{spec}': {'; '.join(parts)}")
    for k, t in want.items():
        if k not in state:
            continue
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


def module_bytes(model: nn.Module) -> int:
    """Bytes of a module's parameters and buffers (each shared tensor once; a ``meta`` module's too)."""
    seen: dict[int, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        seen.setdefault(id(t), t.numel() * t.element_size())
    return sum(seen.values())


def check_model_fits(model: nn.Module, what: str) -> None:
    """Refuse (one line) to build ``model`` (given as a ``meta`` skeleton) when it would not fit in free memory."""
    from diagnostics.linalg.memory import Requirement, check_fits

    check_fits(
        [Requirement(torch.device("cpu"), module_bytes(model), what)],
        "pass the folder of the model you trained (its config.json and weights), or --model to build it yourself",
    )


def _check_skeleton(skeleton: nn.Module, checkpoint: Checkpoint, binding: Binding, what: str) -> None:
    """Before a model is built from data a checkpoint carries (config.json, factory arguments): its ``meta``
    ``skeleton`` must fit the checkpoint's weights (keys, shapes) and, as ``what``, the free memory."""
    _fit_state_dict(skeleton, checkpoint.state_dict, binding.model)
    check_model_fits(skeleton, what)


def _meta_model(binding: Binding) -> nn.Module | None:
    """The factory's model built under the ``meta`` device (shapes without memory), or None when the factory
    cannot build one there (the real call then reports any error).

    A dry run: what the factory prints or warns is dropped here (the real call, which follows, says it once).
    """
    import contextlib
    import io
    import warnings

    try:
        with contextlib.ExitStack() as quiet:
            quiet.enter_context(contextlib.redirect_stdout(io.StringIO()))
            quiet.enter_context(contextlib.redirect_stderr(io.StringIO()))
            quiet.enter_context(warnings.catch_warnings())
            warnings.simplefilter("ignore")
            quiet.enter_context(torch.device("meta"))
            model = call_factory(binding.model, binding.model_kwargs, "model factory", from_checkpoint=True)
    except DiagnosticsError:  # call_factory turns every failure into one
        return None
    return model if isinstance(model, nn.Module) else None


def build_model(
    checkpoint: Checkpoint, binding: Binding, device: torch.device, dtype: torch.dtype, notes: list[str] | None = None
) -> nn.Module:
    """Build the model (the factory, or a model folder's ``config.json``), load the checkpoint's weights
    strictly (tied weights saved once are filled in), move to device/dtype, eval mode, caches off."""
    from diagnostics.binding import FOLDER_MODEL
    from diagnostics.hf import build_from_config, disable_cache

    assert binding.model is not None
    if binding.model == FOLDER_MODEL:
        if checkpoint.model_config is None:
            raise DiagnosticsError(
                f"'{checkpoint.name}' is not a transformers model folder; pass --model package.module:callable"
            )
        # config.json is data from the folder: its shapes are checked against the weights (and the model's size
        # against free memory) on a model of shapes alone, before one that allocates and initialises is built
        skeleton, _ = build_from_config(checkpoint.model_config, f"'{checkpoint.name}'", device="meta")
        _check_skeleton(skeleton, checkpoint, binding, f"the model config.json of '{checkpoint.name}' describes")
        model, built_notes = build_from_config(checkpoint.model_config, f"'{checkpoint.name}'")
        if notes is not None:
            notes.extend(built_notes)
    else:
        from_ck = binding.sources.get("model") == "checkpoint"
        if from_ck:  # the keyword arguments are data from the checkpoint: check what they build first
            skeleton = _meta_model(binding)
            if skeleton is not None:
                _check_skeleton(
                    skeleton, checkpoint, binding, f"the model the checkpoint's arguments give '{binding.model}'"
                )
        model = call_factory(binding.model, binding.model_kwargs, "model factory", from_checkpoint=from_ck)
    if not isinstance(model, nn.Module):
        raise DiagnosticsError(
            f"model factory '{binding.model}' returned a {type(model).__name__}, not a torch.nn.Module"
        )
    check_finite(checkpoint.state_dict, f"checkpoint '{checkpoint.name}'")
    state = _fit_state_dict(model, checkpoint.state_dict, binding.model)
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise DiagnosticsError(
            f"loading '{checkpoint.name}' into '{binding.model}' failed: {str(exc).splitlines()[0]}"
        ) from exc
    model = model.to(device=device, dtype=dtype)
    model.eval()
    if disable_cache(model) and notes is not None:
        notes.append("the model's key/value cache is turned off for the analysis (use_cache=False)")
    return model


def default_device() -> torch.device:
    """``cuda`` when CUDA is available, else ``cpu``."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# Device types an analysis can run on (``meta`` holds no data; others lack the operations or a backend here).
DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")


def available_devices() -> list[str]:
    """The devices this machine can analyse on: ``cpu``, every CUDA device, MPS and every XPU when present."""
    out = ["cpu"]
    if torch.cuda.is_available():
        out += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        out.append("mps")
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        out += [f"xpu:{i}" for i in range(xpu.device_count())]
    return out


def _device_key(dev: torch.device) -> tuple[str, int]:
    """``(type, index)`` with no index meaning device 0 (``cuda`` = ``cuda:0`` for availability)."""
    return dev.type, 0 if dev.index is None else int(dev.index)


def check_device(name: str, available: Sequence[str], flag: str = "--device") -> torch.device:
    """The ``torch.device`` named ``name`` if it is one of ``available`` (pure: availability is passed in).

    Args:
        name: a device string (``cpu``, ``cuda``, ``cuda:N``, ``mps``, ``xpu:N``).
        available: what :func:`available_devices` returns.
        flag: the option's name for the message (``--device``, ``--basis-device``).

    Returns:
        The device (``cpu`` for any ``cpu:N``: there is one CPU device).

    Raises:
        DiagnosticsError: a name ``torch.device`` does not parse, a device type no analysis can run on
            (``meta``, ``hpu``, ...) or a device this machine does not have; the message lists what it has.
    """
    hint = f"devices here: {', '.join(available)}; pass one of them" + (" or auto" if flag == "--device" else "")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise DiagnosticsError(f"unknown {flag} '{name}'; {hint}") from exc
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type not in DEVICE_TYPES:
        why = "holds no data (shapes only)" if dev.type == "meta" else "is not supported"
        raise DiagnosticsError(f"{flag} '{name}': the {dev.type} device {why}; {hint}")
    have = {_device_key(torch.device(a)) for a in available}
    if _device_key(dev) not in have:
        kind = {"cuda": "CUDA", "mps": "MPS", "xpu": "XPU"}[dev.type]
        same = [a for a in available if torch.device(a).type == dev.type]
        what = f"{len(same)} {kind} device(s)" if same else f"no {kind} device"
        raise DiagnosticsError(f"{flag} '{name}' is not available: this machine has {what}; {hint}")
    return dev


def resolve_device(name: str | None, flag: str = "--device") -> torch.device:
    """The device named by ``--device`` (or ``--basis-device``), checked against this machine.

    Args:
        name: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"``, ``"xpu:N"``, or None/``"auto"``
            (:func:`default_device`).
        flag: the option's name for the message.

    Returns:
        The device.

    Raises:
        DiagnosticsError: an unknown name, an unsupported device type (``meta``) or a device this machine
            lacks (CUDA without CUDA, ``cuda:7`` with one GPU), listing the devices available.
    """
    if name in (None, "auto"):
        return default_device()
    return check_device(str(name), available_devices(), flag)


def resolve_dtype(name: str | torch.dtype | None) -> torch.dtype:
    """The floating dtype named by ``--dtype``.

    Args:
        name: ``"float32"``, ``"float64"``, a ``torch.dtype`` (returned as is), or None (float32).

    Returns:
        The dtype.

    Raises:
        DiagnosticsError: for any other name.
    """
    if isinstance(name, torch.dtype):
        return name
    if name is None:
        return torch.float32
    if name not in DTYPES:
        raise DiagnosticsError(f"unknown dtype '{name}'; use {' or '.join(DTYPES)}")
    return DTYPES[name]


def _accepts(model: nn.Module, names: Sequence[str]) -> bool:
    """Whether ``model.forward`` takes every one of ``names`` as a keyword argument."""
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return True
    ps = sig.parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in ps.values()):
        return True
    ok = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return all(n in ps and ps[n].kind in ok for n in names)


def bind_inputs(model: nn.Module, batches: list[Batch], where: str, notes: list[str]) -> list[Batch]:
    """Dict inputs are passed as keyword arguments when ``model.forward`` takes those names, else
    positionally in the dict's order (``{image, label}`` for ``forward(x)``), with a note."""
    if not batches:
        return batches
    first = batches[0][0]
    if not isinstance(first, Mapping) or _accepts(model, [str(k) for k in first]):
        return batches
    keys = list(first)
    notes.append(
        f"{where} yields dicts whose inputs {', '.join(map(str, keys))} are not all argument names of "
        f"{type(model).__name__}.forward; they are passed positionally in that order (choose them with --inputs)"
    )

    def positional(x: Any) -> Any:
        values = tuple(x[k] for k in keys)
        return values[0] if len(values) == 1 else values

    return [(positional(x), y) for x, y in batches]


def align_optimizer_state(
    model: nn.Module, state: Mapping[str, Any] | None
) -> tuple[dict[str, Any] | None, str | None]:
    """An optimizer ``state_dict`` re-ordered so that its parameters follow ``model.named_parameters()``.

    Param groups list parameter indices, not names. They are matched to names by, in this order: the
    groups' own ``param_names`` (optimizers built from ``named_parameters()``); the order of
    ``named_parameters()`` when it fits every state entry's shape; transformers ``Trainer``'s two groups
    (weight decay on every parameter except biases and normalisation weights, then the rest, each in
    ``named_parameters()`` order). The result has one param group per run of consecutive parameters of
    the same original group (hyper-parameters kept) and ``param_names`` added.

    Returns:
        (the re-ordered state, or the state unchanged when nothing needed doing or no rule fits;
        a note saying which rule matched, or None).
    """
    if not isinstance(state, Mapping) or not isinstance(state.get("param_groups"), list):
        return (dict(state) if isinstance(state, Mapping) else None), None
    groups = [g for g in state["param_groups"] if isinstance(g, Mapping)]
    entries = state.get("state") or {}
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    shapes = {n: tuple(p.shape) for n, p in named}
    ids = [(gi, pid) for gi, g in enumerate(groups) for pid in g.get("params", [])]
    if len(ids) != len(named):
        return dict(state), None

    def fits(order: Sequence[str]) -> bool:
        for name, (_, pid) in zip(order, ids):
            entry = entries.get(pid, entries.get(str(pid)))
            v = entry.get("exp_avg_sq", entry.get("exp_avg")) if isinstance(entry, Mapping) else None
            if isinstance(v, torch.Tensor) and tuple(v.shape) != shapes.get(name):
                return False
        return True

    order: list[str] | None = None
    rule = None
    names_given = [n for g in groups for n in (g.get("param_names") or [])]
    if len(names_given) == len(ids) and set(names_given) == set(shapes):
        order, rule = names_given, "the optimizer's param_names"
    elif fits([n for n, _ in named]):
        return dict(state), None  # already in named_parameters() order
    elif len(groups) == 2:
        decay = set(_decay_parameter_names(model))
        trainer = [n for n, _ in named if n in decay] + [n for n, _ in named if n not in decay]
        sizes = [len(g.get("params", [])) for g in groups]
        if sizes[0] == sum(1 for n, _ in named if n in decay) and fits(trainer):
            order, rule = trainer, "transformers Trainer's param groups (weight decay, then no weight decay)"
    if order is None:
        return dict(state), (
            "the optimizer state's parameter order could not be matched to the model's parameter names; "
            "Adam preconditioning (diag sharpness) may refuse it"
        )
    new_groups = _regroup(groups, ids, order, [n for n, _ in named])
    return {**dict(state), "param_groups": new_groups}, f"optimizer state matched to parameter names by {rule}"


def _regroup(
    groups: list[Mapping[str, Any]], ids: list[tuple[int, Any]], order: list[str], names: list[str]
) -> list[dict[str, Any]]:
    """Param groups following ``names``: one group per run of consecutive parameters of the same original
    group (``ids[i] = (group, state id)`` of the parameter ``order[i]``), hyper-parameters kept,
    ``param_names`` added."""
    position = {name: i for i, name in enumerate(order)}
    new_groups: list[dict[str, Any]] = []
    last = None
    for name in names:
        gi, pid = ids[position[name]]
        if gi != last:
            g = {k: v for k, v in groups[gi].items() if k not in ("params", "param_names")}
            new_groups.append({**g, "params": [], "param_names": []})
            last = gi
        new_groups[-1]["params"].append(pid)
        new_groups[-1]["param_names"].append(name)
    return new_groups


def _decay_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters the transformers ``Trainer`` decays: not in a LayerNorm, not a bias or norm."""
    patterns = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]
    try:
        from transformers import Trainer

        return list(Trainer.get_decay_parameter_names(None, model))  # type: ignore[arg-type]
    except Exception:  # transformers missing or its helper changed: the same rule, written out
        rx = [re.compile(p) for p in patterns]
        out = []
        for mod_name, mod in model.named_modules():
            if isinstance(mod, nn.LayerNorm):
                continue
            for pname, _ in mod.named_parameters(recurse=False):
                full = f"{mod_name}.{pname}" if mod_name else pname
                if not any(r.search(full.lower()) for r in rx):
                    out.append(full)
        return out


def _default_loss(ctx: Context, target_key: str | None) -> bool:
    """``--loss model`` by default: the batches are dicts carrying labels and the model returns a loss."""
    if not ctx.batches:
        return False
    x, y = ctx.batches[0]
    if target_key not in ("labels", "label") or y is None or not isinstance(x, Mapping):
        return False
    from diagnostics.binding import model_loss

    try:
        with torch.no_grad():
            out = ctx.forward(ctx.params, x, **{ctx.label_key: y})
    except Exception:
        return False
    return model_loss(out) is not None


def _load_batches(
    binding: Binding,
    *,
    seed: int,
    samples: int | None,
    batch_size_: int | None,
    where: str,
) -> PreparedData:
    """Call the data factory (its source rule applies) and cut its output into seeded batches."""
    assert binding.data is not None
    raw = call_factory(
        binding.data,
        binding.data_kwargs,
        "data factory",
        from_checkpoint=binding.sources.get("data") == "checkpoint",
    )
    return prepare_batches(
        raw,
        batch_size_=batch_size_,
        samples=samples,
        generator=stream_generator(seed, 0),
        where=where,
        layout=BatchLayout.parse(binding.inputs, binding.targets),
    )


def _require_targets(batches: list[Batch], where: str) -> None:
    """Refuse inputs-only data for an analysis that needs targets, naming ``--targets`` for dict batches."""
    if not any(b[1] is None for b in batches):
        return
    keys = list(batches[0][0]) if isinstance(batches[0][0], Mapping) else None
    hint = (
        f"; its dicts have keys {', '.join(map(str, keys))} and none of {', '.join(TARGET_KEYS)}: name the "
        "targets with --targets KEY"
        if keys
        else ""
    )
    raise DiagnosticsError(f"{where} gives inputs only; this analysis needs (inputs, targets){hint}")


def _split_parameters(model: nn.Module, name: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(analysed, frozen)``: trainable parameters, and the other parameters plus every buffer."""
    named = dict(model.named_parameters())
    analysed = {n: p.detach() for n, p in named.items() if p.requires_grad}
    if not analysed:
        raise DiagnosticsError(f"model '{name}' has no trainable parameters")
    frozen = {n: p.detach() for n, p in named.items() if n not in analysed}
    frozen.update({n: b for n, b in model.named_buffers()})
    return analysed, frozen


def _checkpoint_metadata(
    checkpoint: Checkpoint, model: nn.Module, available: int | None, notes: list[str]
) -> tuple[dict[str, Any], Any]:
    """The context's checkpoint metadata and the optimizer state matched to the model's parameter names.

    How Adam's state was matched to names goes to the metadata (``optimizer_matching``), not to the notes;
    a failed match is a note.
    """
    from diagnostics.checkpoint import unusable_step_note

    meta = dict(checkpoint.metadata)
    meta["samples_available"] = available
    meta["sha256"] = checkpoint.sha256
    step_note = unusable_step_note(checkpoint)
    if step_note:
        notes.append(step_note)
    if meta.get("optimizer_note"):
        notes.append(str(meta["optimizer_note"]))
    optimizer_state, opt_note = align_optimizer_state(model, checkpoint.optimizer_state)
    if opt_note and opt_note.startswith("optimizer state matched"):
        meta["optimizer_matching"] = opt_note
    elif opt_note:
        notes.append(opt_note)
    return meta, optimizer_state


def _use_model_loss(ctx: Context, target_key: str | None, explicit_loss: bool) -> None:
    """Default to the model's own loss when the batches carry labels it accepts; a causal LM's float64 loss.

    transformers computes a causal LM's loss in float32; for a float64 analysis the same loss (labels shifted
    by one, -100 ignored, mean over counted tokens) is computed from the logits.
    """
    from diagnostics.binding import MODEL_LOSS
    from diagnostics.hf import is_causal_lm

    if not explicit_loss and _default_loss(ctx, target_key):
        ctx.loss_fn, ctx.loss_name = resolve_loss(MODEL_LOSS)
        ctx.binding["loss"] = MODEL_LOSS
        ctx.binding.setdefault("sources", {})["loss"] = "default: the batches carry labels and the model returns a loss"
    ctx.shifted_labels = ctx.loss_name == MODEL_LOSS and is_causal_lm(ctx.model)
    if ctx.shifted_labels and ctx.dtype == torch.float64 and type(ctx.model).__module__.startswith("transformers."):
        ctx.own_causal_loss = True
        ctx.notes.append(
            "--loss model: transformers computes a causal LM's loss in float32; for the float64 analysis the same "
            "loss (labels shifted by one, -100 ignored, mean over counted tokens) is computed in float64 from the "
            "logits"
        )


def _token_weighting(ctx: Context, where: str) -> None:
    """Mark a context whose loss averages over counted tokens (not samples) and count them."""
    from diagnostics.binding import counted_targets
    from diagnostics.hf import is_causal_lm

    counts = [counted_targets(ctx.loss_name, y, shifted=ctx.shifted_labels) for _, y in ctx.batches]
    ctx.token_weighted = any(
        c is not None and (c != batch_size(b) or b[1].dim() >= 2) for c, b in zip(counts, ctx.batches)
    )
    if not ctx.token_weighted:
        return
    ctx.counted = sum(int(c or 0) for c in counts)
    if ctx.counted == 0:
        raise DiagnosticsError(
            f"{where}: every target is -100 (ignore_index), so the loss averages over nothing; check the labels"
        )
    if ctx.loss_name in ("cross_entropy", "nll") and is_causal_lm(ctx.model):
        ctx.notes.append(
            f"loss '{ctx.loss_name}' compares the logits at position t with the targets at position t; a causal "
            "LM's own loss shifts the labels by one (use --loss model, or shift the targets in the data)"
        )


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
        checkpoint: the loaded checkpoint.
        binding: model, data and loss factories (:func:`diagnostics.binding.resolve_binding`).
        device: ``cpu``, ``cuda[:i]``, ``mps`` or None for the best available.
        dtype: ``float32``/``float64``/... or None for the checkpoint's.
        seed: seeds the data subset (stream 0) and every analyzer's streams.
        samples: seeded subset size of the data (stream 0 of ``seed``).
        batch_size_: re-batch the data to this size.
        params: regex restricting the analysed parameters (others are held fixed).
        check: run :func:`check_determinism` (and the finite-loss check when targets exist).
        need_targets: refuse inputs-only data.
        need_data: False for data-free analyses (weight spectra): no data factory is called, the context
            has no batches and no determinism check runs.

    Returns:
        The :class:`Context`, restricted to ``params`` when given.
    """
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    dt = resolve_dtype(dtype)
    if samples is not None and samples <= 0:
        raise DiagnosticsError(f"--samples must be positive, got {samples}")
    if batch_size_ is not None and batch_size_ <= 0:
        raise DiagnosticsError(f"--batch-size must be positive, got {batch_size_}")
    notes: list[str] = []
    model = build_model(checkpoint, binding, dev, dt, notes)
    loss_fn, loss_name = resolve_loss(binding.loss, from_checkpoint=binding.sources.get("loss") == "checkpoint")
    where = f"data '{binding.data}'"
    prepared = PreparedData([], [], None)
    if need_data:
        prepared = _load_batches(binding, seed=seed, samples=samples, batch_size_=batch_size_, where=where)
    notes.extend(prepared.notes)
    batches = bind_inputs(model, [to_device(b, dev, dt) for b in prepared.batches], where, notes)
    check_data(batches, where)
    if need_targets:
        _require_targets(batches, where)
    analysed, frozen = _split_parameters(model, str(binding.model))
    meta, optimizer_state = _checkpoint_metadata(checkpoint, model, prepared.total_available, notes)
    target_key = prepared.target_key
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
        optimizer_state=optimizer_state,
        loss_name=loss_name,
        notes=notes,
        binding=binding.describe(),
        label_key=target_key if target_key and _accepts(model, [target_key]) else "labels",
    )
    _use_model_loss(ctx, target_key, explicit_loss=binding.loss is not None)
    _token_weighting(ctx, where)
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
    msg = one_line(exc, 240)
    model, data = ctx.binding.get("model"), ctx.binding.get("data")
    m = re.search(r"unexpected keyword argument '([^']+)'|missing \d+ required positional argument", msg)
    if isinstance(exc, TypeError) and m:
        keys = ", ".join(map(str, inputs)) if isinstance(inputs, Mapping) else None
        seen = f"the batches have keys {keys}" if keys else f"the inputs are {describe_shape(inputs)}"
        return DiagnosticsError(
            f"model '{model}' cannot be called with the inputs of data '{data}' ({msg}); {seen}: choose the model "
            "inputs with --inputs KEY[,KEY] (dict keys or tuple positions) and the targets with --targets KEY"
        )
    ints = [t for t in _tensors(inputs) if not (t.is_floating_point() or t.is_complex())]
    if ints and _DTYPE_WORDS.search(msg) and not any(n in type(ctx.model).__name__ for n in ("LMHead", "ForCausalLM")):
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
        f"model '{model}' fails on the first batch of data '{data}' (inputs: {describe_shape(inputs)}): "
        f"{type(exc).__name__}: {msg}; check --data and --inputs/--targets (which parts of a batch go to the model)"
    )


def _check_labels(ctx: Context, outputs: Any) -> None:
    """Integer labels of the built-in classification losses must index the model's outputs."""
    from diagnostics.binding import output_tensor

    name = ctx.loss_name
    outputs = output_tensor(outputs)
    if name not in ("cross_entropy", "nll", "mse") or not isinstance(outputs, torch.Tensor) or outputs.dim() < 2:
        return
    y0 = ctx.batches[0][1]
    # the outputs are of the first batch: token-level ([B, T, C] with [B, T]) is decided there
    token_level = isinstance(y0, torch.Tensor) and outputs.dim() > 2 and tuple(outputs.shape[:-1]) == tuple(y0.shape)
    classes = int(outputs.shape[-1] if token_level else outputs.shape[1])
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
                f"outputs, so loss '{name}' needs labels 0..{classes - 1} ({classes} classes; -100 is ignored); fix "
                "the labels or the model's output size"
            )


def _checked_loss(ctx: Context, i: int, params: Mapping[str, torch.Tensor], batch: Batch) -> torch.Tensor:
    """The batch's (scaled, see :meth:`Context.batch_loss`) loss, or a one-line error when the model or the
    loss raises or the loss is not a scalar tensor."""
    name = ctx.loss_name
    x, y = batch
    count, n = (ctx.batch_count(batch) if ctx.token_weighted else None), batch_size(batch)
    if count == 0:
        return sum(p.sum() for p in params.values()) * 0.0
    extra = {ctx.label_key: y} if name == "model" and not ctx.own_causal_loss else {}
    try:
        outputs = ctx.forward(params, x, **extra)
    except DiagnosticsError:
        raise
    except Exception as exc:
        raise _forward_error(ctx, x, exc) from exc
    try:
        if ctx.own_causal_loss:
            from diagnostics.binding import causal_lm_loss

            value = causal_lm_loss(outputs, y)
        else:
            value = ctx.loss_fn(outputs, y)
    except DiagnosticsError:
        raise
    except Exception as exc:
        from diagnostics.binding import describe_shape

        msg = one_line(exc)
        raise DiagnosticsError(
            f"loss '{name}' raised {type(exc).__name__}: {msg} on batch {i} (outputs: {describe_shape(outputs)}; "
            f"targets: {describe_shape(y)}); check --loss and --targets"
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
    value = value.reshape(())
    if count is not None:
        value = value * ((count / n) * (ctx.n_samples / max(int(ctx.counted or 1), 1)))
    return value


def _check_loss(ctx: Context) -> None:
    """The loss is a differentiable scalar on every batch and finite on the whole data."""
    params = {n: p.detach().requires_grad_(True) for n, p in ctx.params.items()}
    with torch.enable_grad():
        first = _checked_loss(ctx, 0, params, ctx.batches[0])
    if not first.requires_grad:
        raise DiagnosticsError(
            f"loss '{ctx.loss_name}' does not depend on the model outputs through torch operations (the value it "
            "returns carries no gradient): no .item(), float() or torch.tensor(...) inside the loss"
        )
    total = first.detach().to(ctx.dtype) * batch_size(ctx.batches[0])
    with torch.no_grad():
        for i, b in enumerate(ctx.batches[1:], start=1):
            total = total + _checked_loss(ctx, i, ctx.params, b).to(ctx.dtype) * batch_size(b)
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
        """``max_abs / scale`` (0 when both are 0, ``inf`` when only the scale is 0)."""
        return self.max_abs / self.scale if self.scale > 0 else (0.0 if self.max_abs == 0 else math.inf)


def compare_outputs(a: Any, b: Any) -> OutputDifference:
    """Compare two evaluations of the same input up to float rounding.

    Floating tensors agree when ``max |a - b| <= 1024 * eps(dtype) * max(|a|, |b|)``: parallel reductions
    (multi-threaded BLAS, GPU kernels) sum in varying orders, which moves results by a few units of
    roundoff of the magnitudes involved; dropout or injected noise moves them by a sizeable fraction of
    the output. NaN in the same places counts as equal. Integer tensors must be equal; tuples, lists, dicts
    and ``ModelOutput``s are walked; other objects (a ``DynamicCache``, None) are not compared: only tensors.

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
        # anything else (a key/value cache object, None, numbers) is not an output to compare
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
            k: v
            for k, v in ctx.checkpoint_metadata.items()
            if k in ("lr", "optimizer", "step_source", "lr_source", "optimizer_matching")
        },
        "loss_weighting": ctx.weighting,
        "counted_targets": ctx.counted if ctx.token_weighted else None,
        "notes": list(dict.fromkeys([*ctx.notes, *getattr(ctx.model, FEATURE_NOTES, [])])),
        "versions": package_versions(),
    }
