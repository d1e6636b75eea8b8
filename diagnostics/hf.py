"""transformers models: build the model of a model folder from its ``config.json``, never running its code.

A folder written by ``save_pretrained`` (or a ``checkpoint-N/`` folder of ``transformers.Trainer``) is
read by :mod:`diagnostics.checkpoint`; this module turns its ``config.json`` into a module:

* the configuration class is the one transformers registers for ``model_type`` (``AutoConfig.for_model``);
  a config carrying ``auto_map`` (code shipped with the folder) is built from its ``model_type`` when
  transformers knows it, and refused otherwise. ``trust_remote_code`` is never passed, no file of the
  folder is imported, nothing is downloaded (no hub name is ever resolved);
* the model class is ``architectures[0]`` looked up in transformers' own Auto mappings (e.g.
  ``GPT2LMHeadModel`` -> ``AutoModelForCausalLM``) and built with ``from_config``: only classes
  transformers itself defines;
* for analysis the key/value cache is off (``use_cache=False``) and attention uses the eager kernel
  (explicit, twice-differentiable operations).

transformers is an optional dependency: ``pip install 'training-diagnostics[hf]'``.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping
from typing import Any

from diagnostics.errors import DiagnosticsError, one_line

EXTRA = "pip install 'training-diagnostics[hf]'"
# config.json keys that are bookkeeping, not settings of the configuration class
_DROP_KEYS = ("auto_map", "model_type", "transformers_version", "_name_or_path", "custom_pipelines")


def require_transformers(what: str = "a transformers model folder") -> Any:
    """The ``transformers`` module, or a one-line error naming the extra that installs it."""
    try:
        import transformers
    except ImportError as exc:
        raise DiagnosticsError(f"{what} needs the transformers package, which is not installed: {EXTRA}") from exc
    return transformers


def _auto_class_for(transformers: Any, model_type: str, arch: str | None) -> tuple[Any, str]:
    """The Auto class whose mapping sends ``model_type`` to ``arch`` (``AutoModel`` without ``arch``)."""
    if arch is None:
        return transformers.AutoModel, "AutoModel"
    for name in sorted(n for n in dir(transformers) if n.startswith("AutoModel")):
        auto = getattr(transformers, name, None)
        mapping = getattr(getattr(auto, "_model_mapping", None), "_model_mapping", None)
        if not isinstance(mapping, Mapping):
            continue
        found = mapping.get(model_type)
        names = found if isinstance(found, (tuple, list)) else (found,)
        if arch in names:
            return auto, name
    raise DiagnosticsError(
        f"config.json names the architecture '{arch}', which no transformers Auto class maps model_type "
        f"'{model_type}' to; only model classes transformers itself defines are built (pass --model to build "
        "the model yourself)"
    )


def build_from_config(
    config: Mapping[str, Any], where: str = "the model folder", *, device: str | None = None
) -> tuple[Any, list[str]]:
    """``config.json`` -> (model in eval mode, notes), with transformers' own classes only.

    Args:
        config: the parsed ``config.json``.
        where: the folder, for messages.
        device: build under this default device; ``"meta"`` gives the model's shapes without allocating or
            initialising any weight (a config.json naming a huge model is checked before memory is used).

    Returns:
        The module and notes for the user (e.g. that ``auto_map`` was ignored).

    Raises:
        DiagnosticsError: transformers missing (names the extra), an unknown ``model_type``, remote code
            that transformers cannot replace, or an architecture outside transformers' mappings.
    """
    transformers = require_transformers()
    import torch
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    notes: list[str] = []
    model_type = config.get("model_type")
    archs = config.get("architectures") or []
    arch = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None
    known = isinstance(model_type, str) and model_type in CONFIG_MAPPING
    if "auto_map" in config:
        if not known:
            raise DiagnosticsError(
                f"{where}: config.json asks for code shipped with the folder (auto_map) for model_type "
                f"'{model_type}', which transformers does not define; code from a checkpoint never runs"
            )
        notes.append(
            f"{where}: config.json's auto_map (code shipped with the folder) is ignored; the model is built as "
            f"transformers' own '{model_type}'"
        )
    if not known:
        raise DiagnosticsError(
            f"{where}: config.json has model_type {model_type!r}, which this transformers "
            f"({transformers.__version__}) does not know; upgrade transformers or pass --model"
        )
    kwargs = {k: v for k, v in config.items() if k not in _DROP_KEYS}
    auto, auto_name = _auto_class_for(transformers, model_type, arch)
    try:
        hf_config = transformers.AutoConfig.for_model(model_type, **kwargs)
        hf_config.use_cache = False
        with torch.device(device) if device is not None else contextlib.nullcontext():
            model = auto.from_config(hf_config, attn_implementation="eager")
    except DiagnosticsError:
        raise
    except Exception as exc:
        msg = one_line(exc)
        raise DiagnosticsError(
            f"{where}: building '{arch or model_type}' from config.json with {auto_name} failed: "
            f"{type(exc).__name__}: {msg}"
        ) from exc
    if arch is not None and type(model).__name__ != arch:
        notes.append(f"{where}: config.json names '{arch}'; {auto_name} built '{type(model).__name__}'")
    model.eval()
    return model, notes


def ignored_key_patterns(model: Any) -> tuple[list[re.Pattern[str]], list[re.Pattern[str]]]:
    """A transformers model's own lists of keys a checkpoint may lack or carry (non-persistent buffers).

    Returns:
        (patterns of keys allowed missing, patterns of keys allowed unexpected); empty for other modules.
    """
    out = []
    for attr in ("_keys_to_ignore_on_load_missing", "_keys_to_ignore_on_load_unexpected"):
        raw = getattr(model, attr, None) or []
        out.append([re.compile(p) for p in raw if isinstance(p, str)])
    return out[0], out[1]


def is_causal_lm(model: Any) -> bool:
    """Whether a transformers model's own loss shifts the labels by one (a causal language model)."""
    try:
        from transformers.models.auto import modeling_auto
    except ImportError:
        return False
    names: set[str] = set()
    for v in modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        names.update(v if isinstance(v, (tuple, list)) else (v,))
    return any(cls.__name__ in names or cls.__name__.endswith("ForCausalLM") for cls in type(model).__mro__)


def disable_cache(model: Any) -> bool:
    """Turn the key/value cache off (``config.use_cache = False``); True when there was one to turn off."""
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "use_cache", False):
        config.use_cache = False
        return True
    return False
