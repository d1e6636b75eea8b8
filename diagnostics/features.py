"""Capture activations at named modules through forward hooks, streamed over the data.

A *layer* is named as in ``model.named_modules()``:

* ``"features"`` or ``"layer1.0.conv1"``: the module's output;
* ``"head:input"``: the first positional input of the module (what a classifier sees).

Features with more than two dimensions are never flattened implicitly; ``--pool`` says how they become
vectors:

* token sequences ``[B, T, D]`` (the token axis is known when the batch carries token ids ``[B, T]`` or an
  ``attention_mask``, or the module is an embedding, a recurrent or a transformer layer): ``mean`` averages
  over the real tokens (``attention_mask == 1``), ``last`` / ``first`` take the last / first real token
  (left or right padding alike), ``flatten`` keeps ``T * D`` values (padding included);
* feature maps ``[B, C, *spatial]`` (channels-first as in ``Conv2d``): ``mean`` averages the trailing
  dimensions (one feature per channel), ``flatten`` keeps ``C * prod(spatial)``.

A module that returns a tuple, dict or ``ModelOutput`` (a transformers block) contributes its first tensor,
with a note. Captured features are cast to float64 so accumulators downstream never lose precision to the
model's dtype.

:func:`stream_features` yields one :class:`FeatureBatch` per data batch; nothing holds an ``N x D``
matrix unless the caller keeps one.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from diagnostics.errors import DiagnosticsError

POOLS = ("mean", "last", "first", "flatten")
TOKEN_POOLS = ("last", "first")
FEATURE_NOTES = "_diagnostics_feature_notes"  # the list of notes left on the model (read by describe_context)
INPUT_SUFFIX = ":input"


@dataclass(frozen=True)
class Layer:
    """A resolved layer name: the module and whether its input (not output) is captured."""

    name: str
    module_name: str
    module: nn.Module
    capture_input: bool


@dataclass
class FeatureBatch:
    """Features of one data batch: ``{layer: [B, D] float64}``, the batch's targets, its size."""

    features: dict[str, torch.Tensor]
    targets: Any
    size: int


def available_layers(model: nn.Module) -> list[str]:
    """Names of every submodule, in ``named_modules()`` order (the root module excluded)."""
    return [name for name, _ in model.named_modules() if name]


def _listing(names: Sequence[str], limit: int = 40) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def resolve_layers(model: nn.Module, layers: Sequence[str]) -> list[Layer]:
    """Layer names -> :class:`Layer` objects (duplicates dropped, order kept).

    Raises:
        DiagnosticsError: an unknown name; the message lists close matches and the available modules.
    """
    if not layers:
        raise DiagnosticsError("no layer given: pass --layer NAME (a module name of the model)")
    modules = dict(model.named_modules())
    names = available_layers(model)
    out: list[Layer] = []
    seen: set[str] = set()
    for raw in layers:
        name = str(raw).strip()
        if name in seen:
            continue
        seen.add(name)
        capture_input = name.endswith(INPUT_SUFFIX)
        module_name = name[: -len(INPUT_SUFFIX)] if capture_input else name
        if not module_name or module_name not in modules:
            close = difflib.get_close_matches(module_name, names, n=3)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise DiagnosticsError(
                f"unknown layer '{name}'{hint}; the model's modules are: {_listing(names)} "
                f"(append '{INPUT_SUFFIX}' to capture a module's input)"
            )
        out.append(Layer(name, module_name, modules[module_name], capture_input))
    return out


def find_classifier(model: nn.Module, name: str | None = None) -> tuple[str, nn.Module] | None:
    """The classifier: the module called ``name``, else the last ``nn.Linear`` of ``named_modules()``.

    A classifier computes ``W h + b`` with a 2-d ``weight`` ``[classes, D]`` (``bias`` optional).

    Returns:
        ``(name, module)``, or None when ``name`` is None and the model has no ``nn.Linear``.

    Raises:
        DiagnosticsError: ``name`` is not a module, or not one with a 2-d weight.
    """
    modules = dict(model.named_modules())
    if name is not None:
        if name not in modules or not name:
            close = difflib.get_close_matches(name, available_layers(model), n=3)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise DiagnosticsError(
                f"unknown classifier '{name}'{hint}; the model's modules are: {_listing(available_layers(model))}"
            )
        module = modules[name]
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise DiagnosticsError(
                f"classifier '{name}' is a {type(module).__name__} without a 2-d weight [classes, features]; "
                "pass the final linear layer with --classifier"
            )
        return name, module
    last = None
    for mname, module in model.named_modules():
        if mname and isinstance(module, nn.Linear):
            last = (mname, module)
    return last


def classifier_parameters(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(W [C, D], b [C] or None)`` of a classifier module, detached, in float64."""
    weight = module.weight.detach().to(torch.float64)
    bias = getattr(module, "bias", None)
    if isinstance(bias, torch.Tensor):
        bias = bias.detach().to(torch.float64).reshape(-1)
    else:
        bias = None
    return weight, bias


@dataclass(frozen=True)
class Tokens:
    """The token axis of a batch: ``length`` T and the ``[B, T]`` attention mask (None: every token is real)."""

    length: int
    mask: torch.Tensor | None = None


def token_info(inputs: Any) -> Tokens | None:
    """The token axis of a batch's model inputs, or None when they are not token sequences.

    Token ids are an integer ``[B, T]`` tensor (``input_ids`` of a dict, the first such tensor of a tuple);
    the mask is ``attention_mask`` of a dict, or a 0/1 tensor of the same shape following the ids in a tuple.
    """
    if isinstance(inputs, Mapping):
        mask = inputs.get("attention_mask")
        ids = inputs.get("input_ids")
        ref = ids if isinstance(ids, torch.Tensor) else mask
        if isinstance(ref, torch.Tensor) and ref.dim() == 2:
            m = mask if isinstance(mask, torch.Tensor) and mask.shape == ref.shape else None
            return Tokens(int(ref.shape[1]), m)
        return None
    parts = list(inputs) if isinstance(inputs, (tuple, list)) else [inputs]
    for i, t in enumerate(parts):
        if isinstance(t, torch.Tensor) and t.dim() == 2 and not (t.is_floating_point() or t.dtype == torch.bool):
            mask = None
            for other in parts[i + 1 :]:
                if isinstance(other, torch.Tensor) and other.shape == t.shape and not other.is_floating_point():
                    if bool(((other == 0) | (other == 1)).all()):
                        mask = other
                    break
            return Tokens(int(t.shape[1]), mask)
    return None


_SEQUENCE_MODULES = (
    nn.Embedding,
    nn.RNNBase,
    nn.MultiheadAttention,
    nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer,
    nn.TransformerEncoder,
    nn.TransformerDecoder,
)


def _token_axis(x: torch.Tensor, tokens: Tokens | None, module: nn.Module | None) -> int | None:
    """Which axis of a 3-d activation is the token axis (1 for ``[B, T, D]``, 2 for ``[B, D, T]``), or None."""
    if x.dim() != 3:
        return None
    if tokens is not None:
        if x.shape[1] == tokens.length:
            return 1
        if x.shape[2] == tokens.length:
            return 2
        return None
    if module is not None and isinstance(module, _SEQUENCE_MODULES):
        batch_first = getattr(module, "batch_first", True)
        return 1 if batch_first else None
    return None


def _real_tokens(x: torch.Tensor, tokens: Tokens | None, layer: str) -> torch.Tensor:
    """``[B, T]`` float64 weights of the real tokens (1 real, 0 padding)."""
    if tokens is None or tokens.mask is None:
        return torch.ones(x.shape[0], x.shape[1], dtype=torch.float64, device=x.device)
    m = tokens.mask.to(device=x.device, dtype=torch.float64)
    if m.shape != x.shape[:2]:
        raise DiagnosticsError(
            f"layer '{layer}': attention_mask {list(m.shape)} does not match the features' [batch, tokens] "
            f"{list(x.shape[:2])}"
        )
    if bool((m.sum(1) == 0).any()):
        raise DiagnosticsError(f"layer '{layer}': a sequence of the batch has no real token (attention_mask all 0)")
    return m


def pool_features(
    out: Any, layer: str, pool: str | None = None, *, tokens: Tokens | None = None, module: nn.Module | None = None
) -> torch.Tensor:
    """A captured activation -> ``[B, D]`` float64 features.

    ``[B, D]`` is kept; ``[B]`` becomes ``[B, 1]``. Token sequences ``[B, T, D]`` (see :func:`token_info`;
    ``[B, D, T]`` is transposed first) need ``pool``: ``"mean"`` is ``sum_t m_bt h_bt / sum_t m_bt`` with
    the attention mask ``m`` (1 for real tokens), ``"last"`` / ``"first"`` take ``h`` at the last / first
    ``t`` with ``m_bt = 1``, ``"flatten"`` keeps all ``T * D``. Feature maps ``[B, C, *spatial]`` need
    ``pool``: ``"mean"`` averages the trailing dimensions (per channel), ``"flatten"`` keeps all
    ``C * prod(spatial)``.

    Args:
        out: the activation.
        layer: its name, for messages.
        pool: ``mean``, ``last``, ``first`` or ``flatten``.
        tokens: the batch's token axis (:func:`token_info`).
        module: the module that produced it (recurrent and transformer layers have a token axis).

    Raises:
        DiagnosticsError: the activation is not a floating tensor, is not finite, or needs ``pool``.
    """
    if not isinstance(out, torch.Tensor):
        raise DiagnosticsError(
            f"layer '{layer}' gives a {type(out).__name__}, not a tensor; capture a submodule that returns "
            f"one tensor (or its input, '{layer.split(':')[0]}{INPUT_SUFFIX}')"
        )
    if not out.is_floating_point():
        raise DiagnosticsError(f"layer '{layer}' gives a {out.dtype} tensor; features must be floating point")
    if out.dim() == 0:
        raise DiagnosticsError(f"layer '{layer}' gives a scalar; capture a layer with one row per sample")
    if pool is not None and pool not in POOLS:
        raise DiagnosticsError(f"unknown --pool '{pool}'; use {', '.join(POOLS)}")
    x = out.detach()
    if x.dim() == 1:
        x = x.unsqueeze(1)
    elif x.dim() > 2:
        axis = _token_axis(x, tokens, module)
        if axis is not None:
            if axis == 2:
                x = x.transpose(1, 2)
            b, t, d = x.shape
            if pool is None:
                raise DiagnosticsError(
                    f"layer '{layer}' gives token features of shape {list(out.shape)}: [batch {b}, tokens {t}, "
                    f"features {d}]; pass --pool mean (over the real tokens), last or first (one token per "
                    "sequence), or flatten (all of them)"
                )
            if pool == "flatten":
                x = x.flatten(1)
            else:
                m = _real_tokens(x, tokens, layer)
                xd = x.to(torch.float64)
                if pool == "mean":
                    x = (xd * m.unsqueeze(-1)).sum(1) / m.sum(1, keepdim=True)
                else:
                    pos = torch.arange(t, device=x.device, dtype=torch.float64)
                    score = torch.where(m > 0, pos if pool == "last" else -pos, torch.full_like(pos, -math.inf))
                    idx = score.argmax(1)
                    x = xd[torch.arange(b, device=x.device), idx]
        else:
            if pool is None or pool in TOKEN_POOLS:
                why = f"--pool {pool} takes one token of a sequence, but it" if pool else "it"
                raise DiagnosticsError(
                    f"layer '{layer}' gives shape {tuple(out.shape)}; pass --pool mean (average over the trailing "
                    "dimensions, one feature per channel) or --pool flatten (all of them); "
                    f"{why} is read as [batch, channels, positions...] with no token axis (the batch carries no "
                    "token ids or attention_mask)"
                )
            x = x.flatten(2).mean(-1) if pool == "mean" else x.flatten(1)
    x = x.to(torch.float64)
    if not bool(torch.isfinite(x).all()):
        raise DiagnosticsError(f"layer '{layer}' gives non-finite values (NaN or inf); check the checkpoint")
    return x


def first_tensor(out: Any) -> Any:
    """A module's output as one tensor: itself, or the first tensor of a tuple, list, dict or ``ModelOutput``."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping):
        values = list(out.values())
    elif isinstance(out, (tuple, list)):
        values = list(out)
    else:
        return out
    for v in values:
        found = first_tensor(v)
        if isinstance(found, torch.Tensor):
            return found
    return out


def _note(model: nn.Module, text: str) -> None:
    notes = model.__dict__.setdefault(FEATURE_NOTES, [])
    if text not in notes:
        notes.append(text)


def _default_forward(model: nn.Module) -> Callable[[Any], Any]:
    def forward(inputs: Any) -> Any:
        if isinstance(inputs, Mapping):
            return model(**inputs)
        return model(*inputs) if isinstance(inputs, tuple) else model(inputs)

    return forward


def stream_features(
    model: nn.Module,
    batches: Iterable[tuple[Any, Any]],
    layers: Sequence[Layer],
    *,
    pool: str | None = None,
    forward: Callable[[Any], Any] | None = None,
) -> Iterator[FeatureBatch]:
    """Run the model over ``batches`` and yield the features of every layer, one batch at a time.

    Hooks are registered for the duration of the iteration and removed afterwards (also when the
    consumer stops early or an error is raised). Each hooked module must run exactly once per forward
    pass.

    Args:
        model: the module that owns the layers (in eval mode).
        batches: ``(inputs, targets)`` pairs.
        layers: from :func:`resolve_layers`.
        pool: how to reduce feature maps with more than two dimensions (see :func:`pool_features`).
        forward: ``fn(inputs) -> outputs`` (default: ``model(inputs)``).

    Yields:
        :class:`FeatureBatch` with ``features[name]`` of shape ``[B, D_name]`` in float64.
    """
    forward = forward or _default_forward(model)
    captured: dict[str, list[Any]] = {layer.name: [] for layer in layers}
    handles = []

    def output_hook(name: str):
        def fn(module, inputs, output):
            captured[name].append(output)

        return fn

    def input_hook(name: str):
        def fn(module, inputs):
            captured[name].append(inputs[0] if isinstance(inputs, tuple) and inputs else inputs)

        return fn

    for layer in layers:
        if layer.capture_input:
            handles.append(layer.module.register_forward_pre_hook(input_hook(layer.name)))
        else:
            handles.append(layer.module.register_forward_hook(output_hook(layer.name)))
    try:
        for x, y in batches:
            for values in captured.values():
                values.clear()
            with torch.no_grad():
                forward(x)
            tokens = token_info(x)
            feats: dict[str, torch.Tensor] = {}
            for layer in layers:
                values = captured[layer.name]
                if not values:
                    raise DiagnosticsError(
                        f"layer '{layer.name}' did not run in the model's forward pass; pick a module that "
                        "forward() calls"
                    )
                if len(values) > 1:
                    raise DiagnosticsError(
                        f"layer '{layer.name}' runs {len(values)} times per forward pass (a shared module); "
                        "capture a module that runs once"
                    )
                value = values[0]
                if not isinstance(value, torch.Tensor):
                    picked = first_tensor(value)
                    if isinstance(picked, torch.Tensor):
                        _note(
                            model,
                            f"layer '{layer.name}' returns a {type(value).__name__}; its first tensor "
                            f"{list(picked.shape)} is used as the features",
                        )
                        value = picked
                feats[layer.name] = pool_features(value, layer.name, pool, tokens=tokens, module=layer.module)
            sizes = {int(t.shape[0]) for t in feats.values()}
            if len(sizes) != 1:
                raise DiagnosticsError(
                    "the captured layers disagree on the batch size "
                    f"({', '.join(f'{k}: {int(v.shape[0])}' for k, v in feats.items())}); capture layers with "
                    "one row per sample"
                )
            size = sizes.pop()
            if isinstance(y, torch.Tensor) and y.dim() > 0 and int(y.shape[0]) != size:
                raise DiagnosticsError(
                    f"the captured features have {size} rows but the batch has {int(y.shape[0])} targets; "
                    "capture a layer with one row per sample"
                )
            yield FeatureBatch(feats, y, size)
    finally:
        for h in handles:
            h.remove()
        for values in captured.values():
            values.clear()


def class_labels(targets: Any) -> torch.Tensor:
    """Targets -> integer class labels ``[B]`` (int64, on the CPU).

    Accepts 1-d integer labels, or 2-d one-hot rows (exactly one 1 per row), e.g. MSE targets.

    Raises:
        DiagnosticsError: no targets, negative labels, or targets that are not class labels.
    """
    if targets is None:
        raise DiagnosticsError("the data gives no targets, but this analysis needs class labels (inputs, labels)")
    if not isinstance(targets, torch.Tensor):
        raise DiagnosticsError(f"class labels must be a tensor, got {type(targets).__name__}")
    y = targets.detach().cpu()
    if y.dim() == 1 and not y.is_floating_point() and y.dtype != torch.bool:
        labels = y.to(torch.int64)
    elif y.dim() == 2 and y.shape[1] > 1 and bool(((y == 0) | (y == 1)).all()) and bool((y.sum(1) == 1).all()):
        labels = y.argmax(1)
    else:
        raise DiagnosticsError(
            f"targets of shape {tuple(y.shape)} and dtype {y.dtype} are not class labels; this analysis needs "
            "integer labels [N] or one-hot rows [N, C]"
        )
    if labels.numel() and int(labels.min()) < 0:
        raise DiagnosticsError(f"class labels must be >= 0, got {int(labels.min())}")
    return labels


def default_feature_layer(model: nn.Module) -> str:
    """The penultimate representation: the input of the last ``nn.Linear`` (``'<name>:input'``).

    Raises:
        DiagnosticsError: the model has no ``nn.Linear``.
    """
    found = find_classifier(model)
    if found is None:
        raise DiagnosticsError(
            "the model has no nn.Linear whose input could serve as the default layer; pass --layer NAME "
            f"(modules: {_listing(available_layers(model))})"
        )
    return found[0] + INPUT_SUFFIX
