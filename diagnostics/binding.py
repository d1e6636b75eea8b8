"""Bind a checkpoint to the code that gives it meaning: model factory, data and loss.

Sources, highest priority first:

1. explicit arguments / CLI flags (``--model pkg.mod:build --data pkg.mod:data --loss cross_entropy``);
2. a project file ``diag.toml`` (found in the working directory or given with ``--config``);
3. the factory names stored in a checkpoint by :func:`diagnostics.save_checkpoint`.

A spec is ``"package.module:callable"`` or, from flags and ``diag.toml`` only, ``"path/to/file.py:callable"``.

Security. A name found *inside a checkpoint* is imported only when

* it is an exact ``module:callable`` name: a dotted module path of identifiers, one identifier after the
  colon (no attribute path such as ``digits:torch.load``, no ``file.py``, no relative module);
* it is trusted: one of this package's example factories (the explicit list :data:`EXAMPLE_FACTORIES`,
  not a prefix), named in ``diag.toml`` (``model``/``data``/``loss`` or ``trusted_factories``), or the
  user passes ``trust_checkpoint=True`` (``--trust-checkpoint-factories``);
* the object found is *defined* in that module (``obj.__module__ == module``), so names a module merely
  imports (``digits:os``, ``mod:system`` after ``from os import system``) are refused.

The working directory is importable (a user's ``mymodels.py`` works with ``--model mymodels:build``) but
is searched *after* the installed packages while factories are imported and called, so a ``sklearn.py``
or ``torch.py`` lying in it never shadows the real package.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diagnostics.errors import DiagnosticsError
from diagnostics.lazy import lazy_import
from diagnostics.options import CONFIG_NAME, find_config, read_toml, unwrap_diag_table

# imported on first use: the command line checks its arguments (input_files, missing_factory_file) before
# torch is loaded
torch = lazy_import("torch")
F = lazy_import("torch.nn.functional")

# The example factories a checkpoint may name without being trusted otherwise: an explicit list of the
# model/data callables (never a prefix: the same modules also hold helpers such as train_gd that write files).
EXAMPLE_FACTORIES = frozenset(
    {
        "diagnostics.examples.digits:build_mlp",
        "diagnostics.examples.digits:build_cnn",
        "diagnostics.examples.digits:train_data",
        "diagnostics.examples.digits:test_data",
        "diagnostics.examples.digits:train_loader",
        "diagnostics.examples.detector:build_detector",
        "diagnostics.examples.detector:train_images",
        "diagnostics.examples.detector:test_images",
        "diagnostics.examples.grokking:build_model",
        "diagnostics.examples.grokking:train_data",
        "diagnostics.examples.grokking:val_data",
        "diagnostics.examples.tiny_gpt:build_gpt",
        "diagnostics.examples.tiny_gpt:zen_batches",
    }
)
_MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

LOSS_NAMES = ("cross_entropy", "mse", "nll", "bce_with_logits", "model")


# ---------------------------------------------------------------------------------- model outputs
IGNORE_INDEX = -100  # the ignore_index of torch's and transformers' cross-entropy: such targets are not counted
MODEL_LOSS = "model"
# the model of a transformers model folder: built from its config.json (diagnostics.hf), nothing imported
FOLDER_MODEL = "<config.json>"


def output_tensor(outputs: Any) -> torch.Tensor | None:
    """The prediction tensor of a model's outputs: the tensor itself, ``logits`` of a dict or
    ``ModelOutput``, else the first tensor of a dict (in order) or tuple; None when there is none."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, Mapping):
        if isinstance(outputs.get("logits"), torch.Tensor):
            return outputs["logits"]
        values = [v for k, v in outputs.items() if k != "loss"]
    elif isinstance(outputs, (tuple, list)):
        values = list(outputs)
    else:
        return None
    for v in values:
        found = output_tensor(v) if isinstance(v, (tuple, list, Mapping)) else v
        if isinstance(found, torch.Tensor):
            return found
    return None


def model_loss(outputs: Any) -> torch.Tensor | None:
    """The loss a model computed itself: ``outputs.loss`` / ``outputs["loss"]`` (None when absent)."""
    if isinstance(outputs, Mapping):
        value = outputs.get("loss")
    else:
        value = getattr(outputs, "loss", None)
    return value if isinstance(value, torch.Tensor) else None


def describe_shape(obj: Any) -> str:
    """``[8, 16, 50] float32``-style description of a tensor, or the structure of other outputs."""
    if isinstance(obj, torch.Tensor):
        return f"{list(obj.shape)} {str(obj.dtype).replace('torch.', '')}"
    if isinstance(obj, Mapping):
        inner = ", ".join(f"{k}: {describe_shape(v)}" for k, v in list(obj.items())[:6])
        return f"{type(obj).__name__}({inner})"
    if isinstance(obj, (tuple, list)):
        inner = ", ".join(describe_shape(v) for v in list(obj)[:6])
        return f"{type(obj).__name__}({inner}{', ...' if len(obj) > 6 else ''})"
    return type(obj).__name__


# ----------------------------------------------------------------------------------------- losses
def _prediction(outputs: Any, loss: str) -> torch.Tensor:
    pred = output_tensor(outputs)
    if pred is None:
        raise DiagnosticsError(
            f"loss '{loss}' needs a tensor of predictions, but the model returns {describe_shape(outputs)}; "
            "return the logits, or pass --loss model when the model computes its own loss"
        )
    return pred


def _class_layout(outputs: torch.Tensor, targets: torch.Tensor, loss: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [M, C], integer targets [M]) for class-index targets, or (outputs, targets) unchanged.

    Integer targets of shape ``[B, T]`` with outputs ``[B, T, C]`` (token level: the class axis last,
    as transformers models return) are flattened to ``[B*T, C]`` and ``[B*T]``; ``[N, C]`` with ``[N]``
    and channels-first ``[B, C, d1, ...]`` with ``[B, d1, ...]`` are kept as torch takes them.
    """
    if targets.is_floating_point() or outputs.dim() < 2:
        return outputs, targets
    if outputs.dim() == targets.dim() + 1 and tuple(outputs.shape[:-1]) == tuple(targets.shape):
        if outputs.dim() == 2:
            return outputs, targets.long()
        return outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1).long()
    channels_first = (
        outputs.dim() == targets.dim() + 1
        and outputs.shape[0] == targets.shape[0]
        and tuple(outputs.shape[2:]) == tuple(targets.shape[1:])
    )
    if channels_first:
        return outputs, targets.long()
    raise DiagnosticsError(
        f"loss '{loss}' got outputs {list(outputs.shape)} and integer targets {list(targets.shape)}; it takes "
        "[N, C] with [N], token-level [B, T, C] with [B, T] (ignore_index -100), or [B, C, d...] with [B, d...]; "
        "check --targets, or pass --loss model to use the model's own loss"
    )


def _mse(outputs: Any, targets: torch.Tensor) -> torch.Tensor:
    """Mean squared error; integer class labels with 2-d outputs are one-hot encoded first."""
    outputs = _prediction(outputs, "mse")
    if not targets.is_floating_point() and outputs.dim() == 2 and targets.dim() == 1:
        targets = F.one_hot(targets.long(), outputs.shape[1]).to(outputs.dtype)
    diff = outputs - targets.to(outputs.dtype).reshape(outputs.shape)
    # same value as F.mse_loss, written out because F.mse_loss's derivative formula breaks under
    # forward-over-reverse differentiation (torch.func.jvp of grad) with constant targets
    return (diff * diff).mean()


def _cross_entropy(outputs: Any, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy, mean over the counted targets (``ignore_index`` -100 not counted)."""
    logits, y = _class_layout(_prediction(outputs, "cross_entropy"), targets, "cross_entropy")
    return F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX)


def _nll(outputs: Any, targets: torch.Tensor) -> torch.Tensor:
    logp, y = _class_layout(_prediction(outputs, "nll"), targets.long(), "nll")
    return F.nll_loss(logp, y, ignore_index=IGNORE_INDEX)


def _bce_with_logits(outputs: Any, targets: torch.Tensor) -> torch.Tensor:
    outputs = _prediction(outputs, "bce_with_logits")
    return F.binary_cross_entropy_with_logits(outputs, targets.to(outputs.dtype).reshape(outputs.shape))


def _model_loss(outputs: Any, targets: Any) -> torch.Tensor:
    """The loss the model computed itself (``outputs.loss``), e.g. a transformers model given ``labels``."""
    value = model_loss(outputs)
    if value is None:
        raise DiagnosticsError(
            f"--loss model uses the loss the model returns (outputs.loss or outputs['loss']), but it returns "
            f"{describe_shape(outputs)}; pass the labels to the model (a dict batch with 'labels') or name a loss "
            f"({', '.join(LOSS_NAMES)})"
        )
    return value


def causal_lm_loss(outputs: Any, labels: torch.Tensor) -> torch.Tensor:
    """A transformers causal LM's own loss written out: the logits at ``t`` predict the label at ``t + 1``,
    ``-100`` labels are not counted, mean over the counted ones (``ForCausalLMLoss`` without
    ``num_items_in_batch``), computed in the logits' dtype (transformers upcasts to float32 only)."""
    logits = _prediction(outputs, MODEL_LOSS)
    shifted = logits[..., :-1, :].reshape(-1, logits.shape[-1])
    return F.cross_entropy(shifted, labels[..., 1:].reshape(-1).long(), ignore_index=IGNORE_INDEX)


LOSSES: dict[str, Callable[[Any, Any], torch.Tensor]] = {
    "cross_entropy": _cross_entropy,
    "mse": _mse,
    "nll": _nll,
    "bce_with_logits": _bce_with_logits,
    MODEL_LOSS: _model_loss,
}


def counted_targets(loss: str, targets: Any, *, shifted: bool = False) -> int | None:
    """How many targets a token-mean loss averages over in one batch, or None for a per-sample mean.

    For ``cross_entropy``, ``nll`` and ``model`` with integer targets: the entries that are not
    ``-100`` (``ignore_index``); with ``shifted`` (a causal LM's own loss, which predicts token ``t+1``
    from tokens ``<= t``) the first position of every row is dropped first. Other losses average over
    samples: None.
    """
    if loss not in ("cross_entropy", "nll", MODEL_LOSS) or not isinstance(targets, torch.Tensor):
        return None
    if targets.is_floating_point() or targets.is_complex() or targets.dim() == 0:
        return None
    y = targets[..., 1:] if shifted and targets.dim() >= 2 else targets
    return int((y != IGNORE_INDEX).sum())


# ---------------------------------------------------------------------------------- import specs
def _split_spec(spec: str, what: str) -> tuple[str, str]:
    if not isinstance(spec, str) or ":" not in spec or spec.startswith(":") or spec.endswith(":"):
        raise DiagnosticsError(f"{what} '{spec}' is not of the form 'package.module:callable' or 'file.py:callable'")
    module, _, attr = spec.rpartition(":")
    return module, attr


def check_checkpoint_spec(spec: Any, what: str = "factory") -> tuple[str, str]:
    """The ``(module, callable)`` of a name read from a checkpoint, or a one-line refusal.

    Only ``dotted.module:identifier``: no attribute path after the colon, no ``file.py``, no relative
    module, nothing but ASCII identifiers (so no look-alike or whitespace tricks).
    """
    if not isinstance(spec, str):
        raise DiagnosticsError(f"the checkpoint names a {what} that is a {type(spec).__name__}, not 'module:callable'")
    module, sep, attr = spec.partition(":")
    bad_module = not _MODULE_NAME.fullmatch(module) or module.endswith(".py")  # 'x.py' is a file, never a module
    if not sep or bad_module or not _IDENTIFIER.fullmatch(attr):
        raise DiagnosticsError(
            f"the checkpoint names the {what} '{spec}', which is not an exact 'package.module:callable' name "
            "(attribute paths, file paths and relative modules are never imported from a checkpoint); "
            f"pass --{what.split()[0]} yourself if you know the code"
        )
    return module, attr


def _is_cwd_entry(entry: str, cwd: str) -> bool:
    if entry in ("", "."):
        return True
    try:
        return os.path.realpath(entry) == cwd
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def cwd_searched_last() -> Iterator[None]:
    """While active, the working directory is on ``sys.path`` but *after* every other entry.

    ``python -m``, ``python -c`` and REPLs put the working directory first, where a stray ``sklearn.py``
    would shadow scikit-learn; the ``diag`` script does not put it on the path at all, where a user's
    ``mymodels.py`` would not be found. Factories are imported and called inside this context.
    """
    try:
        cwd = os.path.realpath(os.getcwd())
    except OSError:  # the working directory was removed: nothing to import from it
        yield
        return
    saved = list(sys.path)
    sys.path[:] = [p for p in saved if not _is_cwd_entry(p, cwd)] + [cwd]
    try:
        yield
    finally:
        sys.path[:] = saved


@contextlib.contextmanager
def running_user_code(spec: str, what: str, doing: str) -> Iterator[None]:
    """While a user's module is imported or its factory called: its ``print`` goes to stderr (stdout carries
    only the records: ``diag ... -f json | jq``), and a ``sys.exit`` in it becomes a one-line
    :class:`DiagnosticsError` instead of silently ending diag. ``KeyboardInterrupt`` still interrupts.

    Args:
        spec: the factory's spec, named in the error.
        what: its role (``"model"``, ``"data"``, ``"loss"``, ...).
        doing: ``"import"`` (the module at import time) or ``"call"`` (the factory itself).
    """
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    except SystemExit as exc:
        code = " ".join(repr(exc.code).split())[:80]
        fix = (
            "put the script part of the module under \"if __name__ == '__main__':\""
            if doing == "import"
            else "a factory must return its object, or raise an exception to report a problem"
        )
        where = "importing it" if doing == "import" else "it"
        raise DiagnosticsError(f"{what} '{spec}': {where} called sys.exit({code}); {fix}") from None


def _import_file(file: Path, spec: str, what: str) -> Any:
    """Import a user's ``file.py`` once per resolved path (as module ``_diag_user_<hash>``)."""
    if not file.is_file():
        raise _no_such_file(what, spec, file)
    mod_key = f"_diag_user_{abs(hash(str(file.resolve())))}"
    if mod_key in sys.modules:
        return sys.modules[mod_key]
    s = importlib.util.spec_from_file_location(mod_key, file)
    assert s is not None and s.loader is not None
    module = importlib.util.module_from_spec(s)
    sys.modules[mod_key] = module
    try:
        s.loader.exec_module(module)
    except BaseException:  # as importlib does: no half-run module for the next checkpoint to find
        sys.modules.pop(mod_key, None)
        raise
    return module


def import_callable(spec: str, what: str = "factory", *, from_checkpoint: bool = False) -> Callable[..., Any]:
    """Import ``"pkg.mod:attr"`` (the working directory is searched last) or ``"file.py:attr"``.

    Args:
        spec: ``"package.module:attr"`` or ``"path/file.py:attr"``; ``attr`` may be dotted (``Class.method``).
        what: the role of the callable (``"model"``, ``"data"``, ``"loss"``, ...), used in error messages.
        from_checkpoint: the name was read from a checkpoint: only an exact ``module:callable`` name
            (:func:`check_checkpoint_spec`) whose object is defined in that module is accepted. The caller
            has already checked that the name is trusted (:func:`resolve_binding`).

    Returns:
        The imported callable.

    Raises:
        DiagnosticsError: when the spec is malformed, the module cannot be imported or raises (or calls
            ``sys.exit``) on import, the attribute is missing or not callable, or (``from_checkpoint``) the
            object is defined elsewhere.
    """
    if from_checkpoint:
        module_name, attr = check_checkpoint_spec(spec, what)
    else:
        module_name, attr = _split_spec(spec, what)
    try:
        with running_user_code(spec, what, "import"):
            if module_name.endswith(".py"):
                module = _import_file(Path(module_name), spec, what)
            else:
                with cwd_searched_last():
                    module = importlib.import_module(module_name)
    except DiagnosticsError:
        raise
    except ModuleNotFoundError as exc:
        raise DiagnosticsError(
            f"{what} '{spec}': cannot import module '{module_name}' ({exc}); "
            "check the name and that it is importable from the working directory"
        ) from exc
    except Exception as exc:
        raise DiagnosticsError(
            f"{what} '{spec}': importing '{module_name}' raised {type(exc).__name__}: {exc}"
        ) from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = sorted(n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n)))
            raise DiagnosticsError(
                f"{what} '{spec}': module '{module_name}' has no attribute '{attr}'"
                + (f"; callables there: {', '.join(public[:12])}" if public else "")
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise DiagnosticsError(f"{what} '{spec}' is a {type(obj).__name__}, not a callable")
    if from_checkpoint:
        defined_in = getattr(obj, "__module__", None)
        if defined_in != module_name:
            raise DiagnosticsError(
                f"the checkpoint names the {what} '{spec}', but that object is defined in '{defined_in}', not in "
                f"'{module_name}' (only what a module defines is imported from a checkpoint); "
                f"pass --{what.split()[0]} yourself if you know the code"
            )
    return obj


def resolve_loss(
    spec: str | Callable | None,
    *,
    from_checkpoint: bool = False,
) -> tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], str]:
    """A loss name of :data:`LOSS_NAMES`, a ``module:fn`` spec, or a callable -> ``(fn, name)``.

    Built-in losses take the model's prediction tensor (:func:`output_tensor`: the logits of a dict or
    ``ModelOutput``, the first tensor of a tuple); ``model`` takes the loss the model returns; a
    ``module:fn`` loss gets the outputs as the model returns them.

    Args:
        spec: None (``cross_entropy``), a name of :data:`LOSS_NAMES`, a ``"module:fn"`` spec, or a callable
            ``fn(outputs, targets) -> scalar tensor``.
        from_checkpoint: the spec was read from a checkpoint (see :func:`import_callable`).

    Returns:
        ``(fn, name)``: the loss function and the name it is reported under.

    Raises:
        DiagnosticsError: for an unknown name without ``:``, or a ``module:fn`` spec that cannot be imported.
    """
    if spec is None:
        return LOSSES["cross_entropy"], "cross_entropy"
    if callable(spec):
        return spec, getattr(spec, "__name__", "custom")
    if spec in LOSSES:
        return LOSSES[spec], spec
    if ":" not in spec:
        raise DiagnosticsError(f"unknown loss '{spec}'; use one of {', '.join(LOSS_NAMES)} or 'package.module:fn'")
    with cwd_searched_last():
        return import_callable(spec, "loss", from_checkpoint=from_checkpoint), spec


# -------------------------------------------------------------------------------------- config
def load_config(path: Path | None) -> dict[str, Any]:
    """Parse ``diag.toml``. Top-level keys: model, data, loss, model_kwargs, data_kwargs, seed,
    samples, batch_size, dtype, trusted_factories (list of specs a checkpoint may name); tables named
    after analyzers (``[hessian]``) hold their defaults."""
    if path is None:
        return {}
    cfg = unwrap_diag_table(read_toml(path), path)  # the same reading (and errors) as the CLI's parse_project
    cfg["_path"] = str(path)
    return cfg


def input_files(config: str | Path | None = None, *specs: str | None) -> list[Path]:
    """Files a command reads besides its checkpoints: the project file and ``file.py`` factories.

    Args:
        config: ``--config`` (else ``./diag.toml`` when present).
        specs: the ``--model``/``--data``/``--loss`` flags; the specs of ``diag.toml`` are added.

    Returns:
        Paths that no output may overwrite (see :func:`diagnostics.outputs.plan_outputs`).
    """
    path = find_config(config)
    cfg = load_config(path) if path is not None else {}
    found = [path] if path is not None else []
    for spec in (*specs, cfg.get("model"), cfg.get("data"), cfg.get("loss")):
        file = factory_file(spec)
        if file is not None:
            found.append(file)
    return found


def factory_file(spec: Any) -> Path | None:
    """The file of a ``path/file.py:callable`` spec (None for a module name, a loss name or no spec)."""
    if isinstance(spec, str) and ":" in spec:
        module = spec.rpartition(":")[0]
        if module.endswith(".py"):
            return Path(module)
    return None


def _no_such_file(what: str, spec: str, file: Path) -> DiagnosticsError:
    return DiagnosticsError(f"{what} '{spec}': no such file '{file}'")


FACTORY_ROLES = {"model": "model factory", "data": "data factory", "loss": "loss"}


def missing_factory_file(**specs: str | None) -> None:
    """Refuse a ``file.py:callable`` spec whose file does not exist, before any checkpoint is read or torch is
    imported (the same message the import would give).

    Args:
        specs: ``model=``, ``data=``, ``loss=``: the specs a command will use, a flag or else diag.toml's (both
            win over a checkpoint's own, so each named file is imported once the command runs).

    Raises:
        DiagnosticsError: ``data factory 'x.py:data': no such file 'x.py'``.
    """
    for role, spec in specs.items():
        file = factory_file(spec)
        if file is not None and not file.is_file():
            raise _no_such_file(FACTORY_ROLES[role], str(spec), file)


# ------------------------------------------------------------------------------------- binding
@dataclass
class Binding:
    """Resolved specs for model, data and loss, and where each came from."""

    model: str | None = None
    data: str | None = None
    loss: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    data_kwargs: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    inputs: str | None = None
    targets: str | None = None

    def describe(self) -> dict[str, Any]:
        """The specs, kwargs and sources as a JSON-ready dict (``inputs``/``targets`` only when set)."""
        out = {
            "model": self.model,
            "data": self.data,
            "loss": self.loss,
            "model_kwargs": self.model_kwargs,
            "data_kwargs": self.data_kwargs,
            "sources": self.sources,
        }
        if self.inputs is not None or self.targets is not None:
            out.update(inputs=self.inputs, targets=self.targets)
        return out


def _is_trusted(spec: str, config: Mapping[str, Any], trust_checkpoint: bool) -> bool:
    """Exact-name trust: the example list, diag.toml's names, or the user's trust flag."""
    if trust_checkpoint or spec in EXAMPLE_FACTORIES:
        return True
    listed = {config.get("model"), config.get("data"), config.get("loss")}
    trusted = config.get("trusted_factories") or []
    if isinstance(trusted, str):
        trusted = [trusted]
    listed |= {t for t in trusted if isinstance(t, str)}
    return spec in listed


def _pick_part(
    part: str, flag: str | None, config: Mapping[str, Any], ck: Mapping[str, Any], trust_checkpoint: bool
) -> tuple[Any, str | None]:
    """``(spec, source)`` of one factory: the flag, else diag.toml, else the checkpoint's (if trusted).

    A checkpoint's name must be trusted (:func:`_is_trusted`) and of the exact ``module:callable`` form
    (:func:`check_checkpoint_spec`); a built-in loss name and a model folder's :data:`FOLDER_MODEL` need no
    trust (nothing is imported).
    """
    if flag:
        return flag, "flag"
    if config.get(part):
        return config[part], f"config {config.get('_path', CONFIG_NAME)}"
    if not ck.get(part):
        return None, None
    spec = ck[part]
    if part == "model" and spec == FOLDER_MODEL:
        return spec, "checkpoint (config.json of the model folder)"
    if part == "loss" and isinstance(spec, str) and spec in LOSSES:
        return spec, "checkpoint"
    if not isinstance(spec, str) or not _is_trusted(spec, config, trust_checkpoint):
        raise DiagnosticsError(
            f"the checkpoint names the {part} factory '{spec}', which is not trusted; "
            f"pass --{part} {spec} yourself, list it in diag.toml, "
            "or add --trust-checkpoint-factories if you trust where the checkpoint came from"
        )
    check_checkpoint_spec(spec, "loss" if part == "loss" else f"{part} factory")
    return spec, "checkpoint"


def _part_kwargs(
    part: str, spec: str, source: str | None, config: Mapping[str, Any], ck: Mapping[str, Any]
) -> dict[str, Any]:
    """The keyword arguments of the model or data factory, from where the factory itself came from.

    A flag takes diag.toml's ``<part>_kwargs`` only when diag.toml names the same factory.
    """
    kw_key = f"{part}_kwargs"
    if source == "flag":
        raw = config.get(kw_key) if config.get(part) == spec else None
    elif source and source.startswith("config"):
        raw = config.get(kw_key)
    else:
        raw = ck.get(kw_key)
    if raw is not None and not isinstance(raw, Mapping):
        where = "the checkpoint" if source == "checkpoint" else "diag.toml"
        raise DiagnosticsError(f"{kw_key} in {where} must be a table of keyword arguments, got {raw!r:.80}")
    return dict(raw or {})


def resolve_binding(
    checkpoint_factories: Mapping[str, Any] | None = None,
    *,
    model: str | None = None,
    data: str | None = None,
    loss: str | None = None,
    config: Mapping[str, Any] | None = None,
    trust_checkpoint: bool = False,
    require: tuple[str, ...] = ("model", "data"),
    inputs: str | None = None,
    targets: str | None = None,
) -> Binding:
    """Combine flags, ``diag.toml`` and checkpoint metadata into a :class:`Binding`.

    A transformers model folder names its model :data:`FOLDER_MODEL` (built from its ``config.json``,
    nothing imported), so it needs no ``--model``. ``inputs``/``targets`` (``--inputs``/``--targets``,
    else the top-level keys of ``diag.toml``) map the parts of dict or tuple batches.

    Raises:
        DiagnosticsError: a required part is missing, or a checkpoint names an untrusted factory.
    """
    config = config or {}
    ck = dict(checkpoint_factories or {})
    b = Binding()
    for part, flag in (("model", model), ("data", data), ("loss", loss)):
        spec, source = _pick_part(part, flag, config, ck, trust_checkpoint)
        setattr(b, part, spec)
        if source:
            b.sources[part] = source
        if part in ("model", "data") and spec:
            setattr(b, f"{part}_kwargs", _part_kwargs(part, spec, source, config, ck))
    for part, flag in (("inputs", inputs), ("targets", targets)):
        value = flag if flag is not None else config.get(part)
        if value is not None and not isinstance(value, str):
            value = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
        setattr(b, part, value)
    for part in require:
        if not getattr(b, part):
            raise DiagnosticsError(
                f"no {part} given: pass --{part} package.module:callable, set '{part}' in diag.toml, "
                "or save the checkpoint with diagnostics.save_checkpoint(..., "
                f"{part}_factory='package.module:callable')"
            )
    return b


def call_factory(spec: str, kwargs: Mapping[str, Any], what: str, *, from_checkpoint: bool = False) -> Any:
    """Import and call a factory, turning any failure into a one-line :class:`DiagnosticsError`.

    The call runs with the working directory searched last (:func:`cwd_searched_last`), so imports
    the factory makes lazily (e.g. scikit-learn inside a data function) find the installed packages,
    and inside :func:`running_user_code` (its prints go to stderr, a ``sys.exit`` is an error).
    """
    fn = import_callable(spec, what, from_checkpoint=from_checkpoint)
    if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
        raise DiagnosticsError(f"{what} '{spec}': keyword arguments must be a table of names, got {kwargs!r:.80}")
    try:
        with cwd_searched_last(), running_user_code(spec, what, "call"):
            return fn(**dict(kwargs))
    except DiagnosticsError:
        raise
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise DiagnosticsError(f"{what} '{spec}' raised {type(exc).__name__}: {msg}") from exc
