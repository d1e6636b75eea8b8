"""Training phenomena measured at one checkpoint: grokking, loss of plasticity and the weight-norm story.

Every number is a cheap, exact function of the weights, the data and (for the distance) the initial weights;
no estimator is involved. With ``w`` the analysed parameters (``--params``; all trainable ones by default),
``L`` the mean loss over the analysed data and ``g = grad L(w)`` the full-batch gradient:

* ``softmax_collapse_fraction`` (group = dtype): the fraction of samples whose floating-point softmax output
  for the true class is exactly 1 in that dtype, so that the true-class entry of their cross-entropy gradient
  ``softmax - onehot`` is exactly 0 and the sample stops pulling its logit up (Prieto, Barsbey, Mediano, Birdal
  2025, "Grokking at the edge of numerical stability"). It is
  computed in the analysis dtype (``--dtype``) and in every dtype of ``--softmax-dtypes`` (the whole forward
  pass re-run with weights, buffers and inputs cast to it), and in float32 when the analysis runs in a
  lower precision.
* ``gradient_weight_cosine``: ``<g, w> / (||g|| ||w||)``. Prieto et al.'s naive loss minimisation: once the
  training data are fitted, the cheapest way to lower the loss is to scale the logits up, so ``-g`` points
  along ``w`` and the cosine approaches -1.
* ``zero_gradient_fraction``: the fraction of entries of ``g`` that are exactly zero (dead units, unused
  embedding rows, collapsed softmax).
* ``weight_norm``: ``||w||_2`` over all analysed parameters (group null) and of each parameter tensor
  (group = its name).
* ``distance_from_init``: ``||w - w_0|| / ||w_0||`` overall (group null) and per layer (group = the module
  owning the parameters), with ``w_0`` from ``--init CKPT``; ``diag run`` uses the run's first checkpoint
  when ``init`` is not set (Kumar, Bordelon, Gershman, Pehlevan 2024: lazy training barely moves ``w``).
* ``dormant_fraction`` (group = layer): Sokar, Agarwal, Castro, Evci (2023), "The dormant neuron phenomenon
  in deep reinforcement learning": unit ``i`` of layer ``l`` has score ``s_i = E_x |h_i(x)| / ((1/H) sum_k
  E_x |h_k(x)|)`` (``E_x`` over the analysed data, and over positions for feature maps and sequences); it is
  tau-dormant when ``s_i <= tau``. Layers: ``--layers``, else every ``nn.ReLU``/``nn.GELU`` module whose input
  is the output of an ``nn.Linear`` or ``nn.Conv*`` (through at most one normalisation layer), found by
  tracing one forward pass. A layer whose every unit reads zero is wholly dormant.
* ``label_kernel_alignment`` (group = layer): centred kernel alignment (Cortes, Mohri, Rostamizadeh 2012)
  between the Gram matrix ``K = Z Z^T`` of the features ``Z`` at ``--kernel-layer`` (default: the input of the
  last ``nn.Linear``) and the label Gram ``L = Y Y^T`` of the one-hot labels: ``<HKH, HLH>_F / (||HKH||_F
  ||HLH||_F)`` with ``H = I - 11^T/N``. Since ``HKH = Zc Zc^T`` it equals ``||Zc^T Yc||_F^2 / (||Zc^T Zc||_F
  ||Yc^T Yc||_F)`` for the column-centred ``Zc, Yc``; these co-moments are streamed over all samples (Chan et
  al.'s pairwise update, float64), so the value is exact with no subsample. Kumar et al. (2024) read the rise
  of such an alignment as the move from lazy to rich (feature-learning) dynamics that accompanies grokking.
* ``train_accuracy``, ``val_accuracy``, ``train_loss``, ``val_loss``: copied from the checkpoint's metadata
  when the training script stored them (``save_checkpoint(..., extra={"val_accuracy": ...})``), so that a
  report plots them against the step next to the measured quantities.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diagnostics.errors import DiagnosticsError
from diagnostics.lazy import lazy_import
from diagnostics.options import LAYERS_FLAGS, POOLS, FeatureOptions
from diagnostics.progress import bind
from diagnostics.results import Result, make_records
from diagnostics.spec import Analyzer, Metric, Section, check_config, option

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    from torch import nn

    from diagnostics.context import Context
    from diagnostics.progress import ProgressFn

torch = lazy_import("torch")
features = lazy_import("diagnostics.features")

NAME = "dynamics"
SOFTMAX_DTYPES = ("float16", "bfloat16", "float32", "float64")
LOGGED = ("train_accuracy", "val_accuracy", "train_loss", "val_loss")
ACTIVATIONS = ("ReLU", "GELU")
MAX_LISTED_UNITS = 64  # dormant unit indices listed in the metadata per layer


@dataclass
class DynamicsConfig(FeatureOptions):
    """Settings of :func:`analyze_dynamics` (options of ``diag dynamics``, ``[dynamics]`` in diag.toml).

    Attributes:
        layers: where dormant units are counted (default: every ReLU/GELU after a Linear/Conv).
        pool: how feature maps at ``kernel_layer`` become vectors (:class:`~diagnostics.options.FeatureOptions`).
        tau: the dormancy threshold on the normalised activation score.
        kernel_layer: where the label kernel alignment is measured.
        init: the checkpoint of the initial weights (``distance_from_init``).
        softmax_dtypes: further dtypes in which softmax collapse is counted.
        max_bytes: memory budget of the streamed co-moment matrix of the kernel alignment.
    """

    layers: list[str] | None = option(
        None,
        help="modules whose units are checked for dormancy; 'name:input' reads a module's input (default: every "
        "nn.ReLU/nn.GELU whose input is a Linear/Conv output)",
        **LAYERS_FLAGS,
    )
    pool: str | None = option(
        None, help="how feature maps at --kernel-layer with more than two dimensions become vectors", choices=POOLS
    )
    tau: float = option(
        0.025, help="a unit is dormant when its mean |activation| over the layer's mean is <= tau", min=0
    )
    kernel_layer: str | None = option(
        None,
        help="module whose features are aligned with the labels; 'name:input' reads its input (default: the input "
        "of the last nn.Linear)",
        metavar="MODULE",
    )
    init: Path | None = option(
        None,
        help="checkpoint of the initial weights, for distance_from_init (diag run: the run's first checkpoint)",
        metavar="CKPT",
    )
    softmax_dtypes: list[str] | None = option(
        None,
        help="also count softmax collapse with the forward pass in these dtypes (besides --dtype)",
        choices=SOFTMAX_DTYPES,
    )
    max_bytes: int = option(
        1024**3, help="memory budget in bytes of the kernel alignment's co-moment matrix", min=1, cli=False
    )


# ------------------------------------------------------------------------------ pure metrics
def softmax_collapsed(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Which samples' softmax output for the true class is exactly 1 in the dtype of ``logits``.

    ``p = softmax(z)`` is evaluated in ``logits.dtype`` (Prieto et al. 2025: the true class's probability
    rounds to 1 once ``sum_{j != y} exp(z_j - z_y)`` falls below half an ulp of 1, and the true-class entry
    of that sample's cross-entropy gradient ``p - onehot`` is exactly 0).

    Args:
        logits: ``[B, C]`` floating outputs.
        labels: ``[B]`` integer classes in ``[0, C)``.

    Returns:
        ``[B]`` booleans.
    """
    p = torch.softmax(logits, dim=-1)
    return p.gather(1, labels.reshape(-1, 1).to(device=logits.device, dtype=torch.int64)).reshape(-1) == 1


def cosine(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """``<a, b> / (||a|| ||b||)`` in float64; None when either vector is zero."""
    a, b = a.reshape(-1).to(torch.float64), b.reshape(-1).to(torch.float64)
    na, nb = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    if float(na) == 0.0 or float(nb) == 0.0:
        return None
    return float(torch.dot(a, b) / (na * nb))


def relative_distance(w: torch.Tensor, w0: torch.Tensor) -> float | None:
    """``||w - w0|| / ||w0||`` in float64 (Kumar et al. 2024's relative weight change); None when ``w0 = 0``."""
    w, w0 = w.reshape(-1).to(torch.float64), w0.reshape(-1).to(torch.float64)
    n0 = torch.linalg.vector_norm(w0)
    if float(n0) == 0.0:
        return None
    return float(torch.linalg.vector_norm(w - w0) / n0)


def dormant_units(scores: torch.Tensor, tau: float) -> torch.Tensor:
    """Sokar et al. (2023): unit ``i`` is tau-dormant when ``scores_i / mean_k scores_k <= tau``.

    Args:
        scores: ``[H]`` mean absolute activations ``E|h_i|`` of one layer's units (non-negative).
        tau: the threshold (0 counts only units that never activate).

    Returns:
        ``[H]`` booleans; every unit of a layer whose scores are all zero is dormant.
    """
    s = scores.to(torch.float64)
    mean = s.mean()
    if float(mean) == 0.0:
        return torch.ones_like(s, dtype=torch.bool)
    return s / mean <= tau


class CoMoments:
    """Streaming mean and co-moment matrix ``M = sum_n (x_n - mean)(x_n - mean)^T`` of rows, in float64.

    Batches are merged with the pairwise update of Chan, Golub, LeVeque (1979), which never forms the raw
    second moment ``sum x x^T`` and so loses nothing to cancellation when the mean is large.
    """

    def __init__(self, dim: int) -> None:
        self.n = 0
        self.mean = torch.zeros(dim, dtype=torch.float64)
        self.m = torch.zeros(dim, dim, dtype=torch.float64)

    def update(self, rows: torch.Tensor) -> None:
        """Add the rows ``[B, dim]``."""
        x = rows.to(device="cpu", dtype=torch.float64)
        nb = int(x.shape[0])
        if nb == 0:
            return
        mean_b = x.mean(0)
        xc = x - mean_b
        m_b = xc.T @ xc
        n = self.n + nb
        delta = mean_b - self.mean
        self.m += m_b + torch.outer(delta, delta) * (self.n * nb / n)
        self.mean += delta * (nb / n)
        self.n = n


def centred_alignment(zz: torch.Tensor, zy: torch.Tensor, yy: torch.Tensor) -> float | None:
    """Centred kernel alignment from the co-moments ``Zc^T Zc``, ``Zc^T Yc``, ``Yc^T Yc`` (Cortes et al. 2012).

    ``<HKH, HLH>_F / (||HKH||_F ||HLH||_F) = ||Zc^T Yc||_F^2 / (||Zc^T Zc||_F ||Yc^T Yc||_F)`` for ``K = Z Z^T``,
    ``L = Y Y^T``. None when either centred kernel is zero (constant features or a single label).
    """
    nz, ny = torch.linalg.matrix_norm(zz), torch.linalg.matrix_norm(yy)
    if float(nz) == 0.0 or float(ny) == 0.0:
        return None
    return float(torch.linalg.matrix_norm(zy) ** 2 / (nz * ny))


def label_kernel_alignment(z: torch.Tensor, labels: torch.Tensor, classes: int | None = None) -> float | None:
    """Centred alignment of ``K = Z Z^T`` with ``L = Y Y^T`` for the one-hot labels ``Y`` (see the module doc).

    Args:
        z: ``[N, D]`` features.
        labels: ``[N]`` integer classes.
        classes: the number of one-hot columns (default ``max(labels) + 1``; extra columns change nothing).

    Returns:
        The alignment in ``[0, 1]``, or None when a centred kernel is zero.
    """
    y = torch.nn.functional.one_hot(labels.long(), classes or int(labels.max()) + 1).to(torch.float64)
    acc = CoMoments(z.shape[1] + y.shape[1])
    acc.update(torch.cat([z.to(torch.float64), y], 1))
    d = z.shape[1]
    return centred_alignment(acc.m[:d, :d], acc.m[:d, d:], acc.m[d:, d:])


# ------------------------------------------------------------------------------------- layers
def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, torch.nn.Linear)


def _is_conv(module: nn.Module) -> bool:
    return isinstance(module, torch.nn.modules.conv._ConvNd)


def _is_norm(module: nn.Module) -> bool:
    nn_ = torch.nn
    return isinstance(
        module, (nn_.modules.batchnorm._NormBase, nn_.LayerNorm, nn_.GroupNorm, nn_.modules.instancenorm._InstanceNorm)
    )


def unit_axis(module: nn.Module) -> int:
    """The dimension that indexes units: the last for ``nn.Linear`` outputs, the channel dimension (1) else."""
    return -1 if _is_linear(module) else 1


def activation_layers(model: nn.Module, forward: Callable[[Any], Any], inputs: Any) -> tuple[dict[str, int], list[str]]:
    """The ``nn.ReLU``/``nn.GELU`` modules applied to a Linear/Conv output, found by tracing one forward pass.

    An activation qualifies when its input is the very tensor a ``nn.Linear`` or ``nn.Conv*`` returned, or
    that a normalisation layer returned from such a tensor. Activation modules called more than once per
    forward pass (shared modules) are left out.

    Args:
        model: the module (hooks are added to its leaf modules and removed again).
        forward: ``forward(inputs)`` runs the model.
        inputs: one batch of inputs.

    Returns:
        ``({name: unit axis}, notes)``; the axis is -1 after a Linear, 1 after a Conv.
    """
    calls: list[tuple[str, Any, Any, Any]] = []  # (name, module, input, output); keeps the tensors alive
    handles = []
    for name, module in model.named_modules():
        if name and not any(True for _ in module.children()):

            def hook(mod: Any, args: Any, out: Any, name: str = name) -> None:
                calls.append((name, mod, args[0] if isinstance(args, tuple) and args else None, out))

            handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            forward(inputs)
    finally:
        for h in handles:
            h.remove()
    counts: dict[str, int] = {}
    for name, *_ in calls:
        counts[name] = counts.get(name, 0) + 1
    produced: dict[int, int] = {}  # id(tensor) -> unit axis of the Linear/Conv that made it
    found: dict[str, int] = {}
    notes: list[str] = []
    for name, module, inp, out in calls:
        if _is_linear(module) or _is_conv(module):
            produced[id(out)] = unit_axis(module)
        elif _is_norm(module) and id(inp) in produced:
            produced[id(out)] = produced[id(inp)]
        elif type(module).__name__ in ACTIVATIONS and id(inp) in produced:
            if counts[name] > 1:
                notes.append(f"activation '{name}' runs {counts[name]} times per forward pass; left out")
            else:
                found[name] = produced[id(inp)]
    return found, notes


class _UnitScores:
    """Accumulates ``sum |h_i|`` and the number of rows per unit of one layer, from a forward hook."""

    def __init__(self, name: str, axis: int) -> None:
        self.name, self.axis = name, axis
        self.sums: torch.Tensor | None = None
        self.rows = 0
        self.calls = 0

    def add(self, out: Any) -> None:
        self.calls += 1
        if not isinstance(out, torch.Tensor) or not out.is_floating_point() or out.dim() < 2:
            raise DiagnosticsError(
                f"layer '{self.name}' gives {type(out).__name__ if not isinstance(out, torch.Tensor) else tuple(out.shape)}"
                "; dormant units need a floating tensor [B, units, ...] or [B, ..., units]"
            )
        a = out.detach().abs().to(torch.float64).movedim(self.axis, -1)
        a = a.reshape(-1, a.shape[-1])
        s = a.sum(0).cpu()
        if self.sums is None:
            self.sums = s
        elif self.sums.shape != s.shape:
            raise DiagnosticsError(f"layer '{self.name}' changes its number of units between batches")
        else:
            self.sums += s
        self.rows += int(a.shape[0])

    @property
    def scores(self) -> torch.Tensor:
        """``E |h_i|`` per unit."""
        assert self.sums is not None
        return self.sums / max(self.rows, 1)


# ------------------------------------------------------------------------------------ analyzer
def _labels(targets: Any) -> torch.Tensor | None:
    """Integer class labels of a batch's targets, or None when they are not class labels."""
    try:
        return features.class_labels(targets)
    except DiagnosticsError:
        return None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _forward_in(ctx: Context, dtype: torch.dtype, params: Mapping[str, torch.Tensor], x: Any) -> Any:
    """The model's output with weights, buffers and floating inputs cast to ``dtype`` (through
    :meth:`~diagnostics.context.Context.forward`: a dict of inputs is passed as keyword arguments)."""
    from diagnostics.context import to_device

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype) if t.is_floating_point() else t

    state = {k: cast(v) for k, v in {**ctx.frozen, **params}.items()}  # replaces every entry of ctx.frozen
    return ctx.forward(state, to_device(x, ctx.device, dtype))


def _logits(out: Any) -> torch.Tensor | None:
    """The ``[batch, classes]`` floating logits of a model's outputs: the tensor itself, or the ``logits`` of a
    dict, ``ModelOutput`` or tuple (:func:`~diagnostics.binding.output_tensor`); None when there are none."""
    from diagnostics.binding import output_tensor

    t = output_tensor(out)
    return t if isinstance(t, torch.Tensor) and t.dim() == 2 and t.is_floating_point() else None


def load_init(path: Path, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The initial weights of the analysed parameters, read from a checkpoint (no code runs), on the CPU.

    Keys are matched by name, allowing a common prefix on either side (``module.``, ``model.``...).

    Raises:
        DiagnosticsError: the file cannot be read, a parameter is missing or has another shape, or a value is
            not finite.
    """
    from diagnostics.checkpoint import check_finite, load_checkpoint

    state = load_checkpoint(path).state_dict
    names = list(params)
    if not names:
        return {}
    prefixes = [""]
    first = names[0]
    prefixes += [k[: -len(first)] for k in state if k.endswith("." + first)]  # saved keys carry a prefix
    best: dict[str, torch.Tensor] = {}
    for prefix in prefixes:
        got = {n: state[prefix + n] for n in names if prefix + n in state}
        if len(got) > len(best):
            best = got
    for n in names:  # the model's names carry a prefix the saved keys lack
        shorter = [n.split(".", cut)[-1] for cut in range(1, n.count(".") + 1)]
        found = next((s for s in shorter if s in state), None)
        if n not in best and found is not None:
            best[n] = state[found]
    missing = [n for n in names if n not in best]
    if missing:
        raise DiagnosticsError(
            f"--init '{path}' does not fit the model: it lacks {len(missing)} parameter(s) {missing[:5]}; pass the "
            "initial checkpoint of the same model"
        )
    for n in names:
        if tuple(best[n].shape) != tuple(params[n].shape):
            raise DiagnosticsError(
                f"--init '{path}' does not fit the model: '{n}' has shape {tuple(best[n].shape)} there but "
                f"{tuple(params[n].shape)} in the model"
            )
    check_finite(best, f"--init '{path}'")
    return {n: best[n].detach().cpu() for n in names}


def _hook_layers(
    config: DynamicsConfig, ctx: Context
) -> tuple[dict[str, Any], dict[str, int], str | None, bool, list[str]]:
    """Resolve the dormancy layers and the kernel layer -> ``(Layer objects, unit axes, kernel, kernel_given, notes)``."""
    notes: list[str] = []
    x0 = ctx.batches[0][0]
    if config.layers:
        layers = features.resolve_layers(ctx.model, config.layers)
        traced, _ = activation_layers(ctx.model, lambda x: ctx.forward(ctx.params, x), x0)
        axes = {
            layer.name: unit_axis(layer.module)
            if layer.capture_input
            else traced.get(layer.module_name, unit_axis(layer.module))
            for layer in layers
        }
    else:
        traced, notes = activation_layers(ctx.model, lambda x: ctx.forward(ctx.params, x), x0)
        layers = features.resolve_layers(ctx.model, list(traced)) if traced else []
        axes = dict(traced)
        if not traced:
            notes.append(
                "no nn.ReLU/nn.GELU module applied to a Linear/Conv output was found (functional activations are "
                "invisible to hooks), so no dormant_fraction; name the layers with --layers"
            )
    kernel = config.kernel_layer
    given = kernel is not None
    if kernel is None:
        found = features.find_classifier(ctx.model)
        if found is None:
            notes.append("the model has no nn.Linear, so no label_kernel_alignment; pass --kernel-layer")
        else:
            kernel = found[0] + features.INPUT_SUFFIX
    return {layer.name: layer for layer in layers}, axes, kernel, given, notes


@dataclass
class _Hooks:
    """The modules one pass over the data watches: unit scores of the dormancy layers, the kernel layer's output."""

    scorers: dict[str, _UnitScores]
    layers: dict[str, Any]
    kernel: Any = None
    kernel_given: bool = False
    captured: list[Any] = field(default_factory=list)
    handles: list[Any] = field(default_factory=list)

    def install(self) -> None:
        """Register the forward (pre-)hooks."""
        for name, layer in self.layers.items():
            s = self.scorers[name]
            if layer.capture_input:
                self.handles.append(layer.module.register_forward_pre_hook(lambda m, args, s=s: s.add(args[0])))
            else:
                self.handles.append(layer.module.register_forward_hook(lambda m, args, out, s=s: s.add(out)))
        if self.kernel is not None:
            captured = self.captured
            if self.kernel.capture_input:
                self.handles.append(
                    self.kernel.module.register_forward_pre_hook(lambda m, args: captured.append(args[0]))
                )
            else:
                self.handles.append(self.kernel.module.register_forward_hook(lambda m, args, out: captured.append(out)))

    def remove(self) -> None:
        """Remove every hook."""
        for h in self.handles:
            h.remove()
        self.handles.clear()


def _resolve_hooks(config: DynamicsConfig, ctx: Context) -> tuple[_Hooks, list[str]]:
    """The dormancy layers with their unit scorers and the kernel layer (hooks not yet installed) -> (hooks, notes)."""
    layer_objs, axes, kernel_name, kernel_given, notes = _hook_layers(config, ctx)
    hooks = _Hooks(scorers={name: _UnitScores(name, axes[name]) for name in layer_objs}, layers=layer_objs)
    if kernel_name is not None:
        hooks.kernel = features.resolve_layers(ctx.model, [kernel_name])[0]
    hooks.kernel_given = kernel_given
    return hooks, notes


@dataclass
class _Labels:
    """Integer class labels of every batch (None where a batch's targets are not class labels)."""

    per_batch: list[torch.Tensor | None]
    classes: int | None

    @property
    def ok(self) -> bool:
        """Whether every batch has class labels."""
        return all(y is not None for y in self.per_batch)


def _class_labels(ctx: Context) -> _Labels:
    """The class labels of ``ctx``'s batches and the number of classes (``max + 1``; None without labels)."""
    per_batch = [_labels(b[1]) for b in ctx.batches]
    labels = _Labels(per_batch, None)
    if labels.ok:
        labels.classes = max(int(y.max()) for y in per_batch if y is not None and y.numel()) + 1
    return labels


@dataclass
class _PassState:
    """What one pass over the data accumulates."""

    grad: dict[str, torch.Tensor]
    logits_ok: bool
    collapsed: int = 0
    kernel_acc: CoMoments | None = None
    kernel_note: str | None = None


def _check_single_calls(scorers: Mapping[str, _UnitScores], calls_before: Mapping[str, int]) -> None:
    """Every dormancy layer must run exactly once per forward pass."""
    for name, s in scorers.items():
        if s.calls - calls_before[name] != 1:
            raise DiagnosticsError(
                f"layer '{name}' runs {s.calls - calls_before[name]} times per forward pass; pick a module that runs "
                "once"
            )


def _count_collapse(state: _PassState, out: Any, labels: torch.Tensor | None, classes: int | None) -> None:
    """Add one batch's collapsed samples, or stop counting when the outputs are not logits covering the labels."""
    if not state.logits_ok:
        return
    logits = _logits(out)
    if logits is None or labels is None or classes is None or classes > logits.shape[1]:
        state.logits_ok = False
        return
    state.collapsed += int(softmax_collapsed(logits.detach(), labels).sum())


def _data_pass(
    config: DynamicsConfig,
    ctx: Context,
    params: Mapping[str, torch.Tensor],
    hooks: _Hooks,
    labels: _Labels,
    progress: ProgressFn | None,
) -> _PassState:
    """One pass: the summed gradient ``sum_b n_b grad L_b`` (float64), collapsed samples, unit scores, co-moments.

    ``L_b`` is the batch's loss as :meth:`~diagnostics.context.Context.outputs_and_loss` gives it (the labels
    passed to the model for ``--loss model``; scaled so that ``sum_b n_b L_b / N`` is the full-data loss, the
    mean over counted targets for a token-level loss), from the same forward pass whose outputs are read.
    """
    state = _PassState(
        grad={n: torch.zeros(p.shape, dtype=torch.float64, device=p.device) for n, p in params.items()},
        logits_ok=labels.ok,
    )
    tick = bind(progress, "batches")
    hooks.install()
    try:
        for i, ((x, y), n_b) in enumerate(zip(ctx.batches, ctx.batch_sizes)):
            hooks.captured.clear()
            calls_before = {name: s.calls for name, s in hooks.scorers.items()}
            out, loss = ctx.outputs_and_loss(params, (x, y))
            gs = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            for (name, _), g in zip(params.items(), gs):
                if g is not None:
                    state.grad[name] += g.detach().to(torch.float64) * n_b
            _check_single_calls(hooks.scorers, calls_before)
            _count_collapse(state, out, labels.per_batch[i], labels.classes)
            if hooks.kernel is not None and state.kernel_note is None and labels.ok:
                state.kernel_acc, state.kernel_note = _add_kernel_rows(
                    state.kernel_acc,
                    hooks.captured,
                    hooks.kernel.name,
                    config,
                    labels.per_batch[i],
                    labels.classes,
                    hooks.kernel_given,
                )
            tick(i + 1, len(ctx.batches))
    finally:
        hooks.remove()
    return state


def _softmax_rows(
    config: DynamicsConfig, ctx: Context, state: _PassState, labels: _Labels, notes: list[str]
) -> tuple[list[tuple], list[str]]:
    """``softmax_collapse_fraction`` in the analysis dtype, float32 below it and ``--softmax-dtypes``.

    Args:
        config: the options (``softmax_dtypes``).
        ctx: the context (further dtypes re-run its forward pass).
        state: the pass over the data (the count in the analysis dtype).
        labels: the class labels.
        notes: notes are appended here.

    Returns:
        (records, the dtypes counted).
    """
    analysis_dtype = _dtype_name(ctx.dtype)
    dtypes = [analysis_dtype]
    if torch.finfo(ctx.dtype).bits < 32:
        dtypes.append("float32")
    dtypes += [d for d in (config.softmax_dtypes or []) if d not in dtypes]
    rows: list[tuple] = []
    counted: list[str] = []
    if not labels.ok:
        notes.append("the targets are not class labels, so no softmax_collapse_fraction or label_kernel_alignment")
        return rows, counted
    if not state.logits_ok:
        notes.append(
            "the model's outputs are not [batch, classes] logits covering the labels, so no softmax_collapse_fraction"
        )
        return rows, counted
    for name in dtypes:
        if name == analysis_dtype:
            count = state.collapsed
        else:
            count = _collapsed_in(ctx, getattr(torch, name), labels.per_batch, notes)
            if count is None:
                continue
        rows.append(("softmax_collapse_fraction", count / ctx.n_samples, None, None, name))
        counted.append(name)
    if ctx.loss_name not in ("cross_entropy", "nll"):
        notes.append(f"the loss is {ctx.loss_name}; softmax collapse is read from the outputs taken as logits")
    return rows, counted


def _weight_rows(params: Mapping[str, torch.Tensor], grad: Mapping[str, torch.Tensor], notes: list[str]) -> list[tuple]:
    """``gradient_weight_cosine``, ``zero_gradient_fraction`` and ``weight_norm`` (overall and per tensor).

    Args:
        params: the analysed parameters.
        grad: their full-batch gradient (float64).
        notes: notes are appended here.

    Returns:
        The records.
    """
    w = torch.cat([p.detach().reshape(-1).to(torch.float64) for p in params.values()])
    g = torch.cat([t.reshape(-1) for t in grad.values()])
    rows: list[tuple] = []
    cos = cosine(g, w)
    if cos is None:
        notes.append("the gradient (or the weights) is exactly zero, so no gradient_weight_cosine")
    else:
        rows.append(("gradient_weight_cosine", cos))
    rows.append(("zero_gradient_fraction", float((g == 0).sum()) / max(g.numel(), 1)))
    rows.append(("weight_norm", float(torch.linalg.vector_norm(w))))
    for name, p in params.items():
        rows.append(("weight_norm", float(torch.linalg.vector_norm(p.detach().to(torch.float64))), None, None, name))
    return rows


def _dormant_rows(
    scorers: Mapping[str, _UnitScores], tau: float, notes: list[str]
) -> tuple[list[tuple], dict[str, Any]]:
    """``dormant_fraction`` per layer and the ``dormant`` metadata (units, dormant units, unit axis, indices).

    Args:
        scorers: the unit scores of each layer.
        tau: the dormancy threshold.
        notes: notes are appended here.

    Returns:
        (records, metadata by layer).
    """
    rows: list[tuple] = []
    dormant_meta: dict[str, Any] = {}
    for name, s in scorers.items():
        if s.sums is None:
            continue
        mask = dormant_units(s.scores, tau)
        idx = torch.nonzero(mask).reshape(-1).tolist()
        rows.append(("dormant_fraction", len(idx) / mask.numel(), None, None, name))
        dormant_meta[name] = {
            "units": mask.numel(),
            "dormant": len(idx),
            "unit_axis": s.axis,
            **({"dormant_units": idx} if len(idx) <= MAX_LISTED_UNITS else {}),
        }
        if float(s.scores.sum()) == 0.0:
            notes.append(f"layer '{name}': every unit reads exactly zero on the data (the whole layer is dormant)")
    return rows, dormant_meta


def _kernel_rows(
    state: _PassState, kernel: Any, classes: int | None, notes: list[str]
) -> tuple[list[tuple], dict[str, Any] | None]:
    """``label_kernel_alignment`` at the kernel layer from the streamed co-moments.

    Args:
        state: the pass over the data (co-moments or the note why there are none).
        kernel: the kernel layer, or None.
        classes: the number of classes.
        notes: notes are appended here.

    Returns:
        (records, the ``kernel_alignment`` metadata or None).
    """
    if state.kernel_note is not None:
        notes.append(state.kernel_note)
        return [], None
    acc = state.kernel_acc
    if acc is None or kernel is None:
        return [], None
    d = acc.m.shape[0] - int(classes or 0)
    value = centred_alignment(acc.m[:d, :d], acc.m[:d, d:], acc.m[d:, d:])
    info = {
        "layer": kernel.name,
        "features": d,
        "classes": classes,
        "samples": acc.n,
        "how": "exact, streamed over every analysed sample (no subsample)",
    }
    if value is None:
        notes.append(
            f"layer '{kernel.name}': the centred feature or label kernel is zero (constant features or a "
            "single class), so no label_kernel_alignment"
        )
        return [], info
    return [("label_kernel_alignment", value, None, None, kernel.name)], info


def _logged_rows(metadata: Mapping[str, Any]) -> list[tuple]:
    """The finite numbers the training script stored under ``LOGGED`` keys in the checkpoint's metadata."""
    rows: list[tuple] = []
    for key in LOGGED:
        value = metadata.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            rows.append((key, float(value)))
    return rows


def analyze_dynamics(config: DynamicsConfig, ctx: Context, progress: ProgressFn | None = None) -> Result:
    """Softmax collapse, gradient-weight cosine, weight norms, distance from init, dormant units, label alignment.

    One pass over the data computes the full-batch gradient (in the analysis dtype), the logits, the unit
    activation scores and the kernel layer's co-moments; each dtype of ``--softmax-dtypes`` other than the
    analysis dtype costs one more forward pass. See the module docstring for the definitions.

    Args:
        config: the options.
        ctx: the checkpoint's context.
        progress: ``progress(task, done, total)``.

    Returns:
        :class:`~diagnostics.results.Result` with the records; metadata ``tau``, ``dormant`` (units, dormant
        units per layer), ``kernel_alignment`` (layer, samples, how), ``softmax_dtypes``, ``init`` and ``notes``.
    """
    check_config(config)
    notes: list[str] = []
    meta: dict[str, Any] = {"tau": config.tau, "notes": notes}
    params = {n: p.detach().clone().requires_grad_(True) for n, p in ctx.params.items()}
    hooks, layer_notes = _resolve_hooks(config, ctx)
    notes += layer_notes
    labels = _class_labels(ctx)
    state = _data_pass(config, ctx, params, hooks, labels, progress)
    grad = {n: g / ctx.n_samples for n, g in state.grad.items()}

    rows, meta["softmax_dtypes"] = _softmax_rows(config, ctx, state, labels, notes)
    rows += _weight_rows(params, grad, notes)
    if config.init is not None:
        rows += _distance_rows(config.init, params, notes)
        meta["init"] = str(config.init)
    else:
        notes.append("no --init checkpoint, so no distance_from_init (diag run uses the run's first checkpoint)")
    dormant, meta["dormant"] = _dormant_rows(hooks.scorers, config.tau, notes)
    kernel, kernel_meta = _kernel_rows(state, hooks.kernel, labels.classes, notes)
    if kernel_meta is not None:
        meta["kernel_alignment"] = kernel_meta
    rows += dormant + kernel + _logged_rows(ctx.checkpoint_metadata)
    return Result(make_records(ctx.checkpoint, ctx.step, NAME, rows), meta)


def _add_kernel_rows(
    acc: CoMoments | None,
    captured: Sequence[Any],
    layer: str,
    config: DynamicsConfig,
    labels: torch.Tensor | None,
    classes: int | None,
    given: bool,
) -> tuple[CoMoments | None, str | None]:
    """Add one batch's ``[features, one-hot labels]`` rows; a problem with the default layer becomes a note."""
    try:
        if len(captured) != 1:
            raise DiagnosticsError(
                f"layer '{layer}' runs {len(captured)} times per forward pass; pick a module that runs once"
            )
        z = features.pool_features(captured[0], layer, config.pool)
        assert labels is not None and classes is not None
        if int(z.shape[0]) != labels.numel():
            raise DiagnosticsError(
                f"layer '{layer}' gives {int(z.shape[0])} rows for {labels.numel()} labels; pick a layer with one "
                "row per sample"
            )
        if acc is None:
            dim = int(z.shape[1]) + classes
            need = dim * dim * 8
            if need > config.max_bytes:
                raise DiagnosticsError(
                    f"the co-moments of layer '{layer}' ({int(z.shape[1])} features) need {need / 1024**3:.1f} GiB, "
                    f"over the {config.max_bytes / 1024**3:.1f} GiB budget; use --pool mean or another --kernel-layer"
                )
            acc = CoMoments(dim)
        elif acc.m.shape[0] != int(z.shape[1]) + classes:
            raise DiagnosticsError(f"layer '{layer}' changes its number of features between batches")
        y = torch.nn.functional.one_hot(labels, classes).to(torch.float64)
        acc.update(torch.cat([z.cpu(), y], 1))
        return acc, None
    except DiagnosticsError as exc:
        if given:
            raise
        return None, f"no label_kernel_alignment at the default layer: {exc}; choose one with --kernel-layer"


def _collapsed_in(
    ctx: Context, dtype: torch.dtype, labels: Sequence[torch.Tensor | None], notes: list[str]
) -> int | None:
    """Samples whose true-class softmax is exactly 1 with the forward pass in ``dtype`` (None: it failed)."""
    count = 0
    try:
        with torch.no_grad():
            for (x, _), y in zip(ctx.batches, labels):
                logits = _logits(_forward_in(ctx, dtype, ctx.params, x))
                if logits is None or y is None:
                    return None
                count += int(softmax_collapsed(logits, y).sum())
    except (RuntimeError, TypeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        notes.append(f"the forward pass in {_dtype_name(dtype)} failed ({first}); no softmax collapse in it")
        return None
    return count


def _distance_rows(path: Path, params: Mapping[str, torch.Tensor], notes: list[str]) -> list[tuple]:
    """``distance_from_init`` overall and per owning module."""
    from diagnostics.context import parameter_groups

    init = load_init(path, params)
    w = {n: p.detach().cpu().to(torch.float64) for n, p in params.items()}
    w0 = {n: t.to(torch.float64) for n, t in init.items()}
    rows: list[tuple] = []
    total = relative_distance(torch.cat([w[n].reshape(-1) for n in w]), torch.cat([w0[n].reshape(-1) for n in w]))
    if total is None:
        notes.append(f"the weights of --init '{path}' are all zero, so no overall distance_from_init")
    else:
        rows.append(("distance_from_init", total))
    for owner, names in parameter_groups(w).items():
        value = relative_distance(
            torch.cat([w[n].reshape(-1) for n in names]), torch.cat([w0[n].reshape(-1) for n in names])
        )
        if value is None:
            notes.append(f"layer '{owner}' starts at zero in --init, so no relative distance_from_init for it")
        else:
            rows.append(("distance_from_init", value, None, None, owner))
    return rows


_DTYPE = "the dtype of the forward pass (float32, float64, ...)"
_LOGGED = "copied from the checkpoint's metadata key of the same name when the training script stored it"
ANALYZER = Analyzer(
    name=NAME,
    summary="grokking and plasticity: softmax collapse, gradient-weight cosine, weight norm, distance from init, "
    "dormant units, label alignment",
    description="Training phenomena at a checkpoint: softmax collapse and naive loss minimisation (grokking), "
    "weight norms and distance from initialisation, dormant units and zero gradients (loss of plasticity), "
    "and the centred alignment of a layer's feature kernel with the labels.",
    config=DynamicsConfig,
    run=analyze_dynamics,
    sweep_with="first",
    reference_option="init",
    metrics=(
        Metric(
            "softmax_collapse_fraction",
            "fraction of samples whose floating-point softmax output for the true class is exactly 1, so the "
            "true-class entry of their cross-entropy gradient softmax - onehot is exactly 0",
            higher_is_better=False,
            headline=True,
            group=_DTYPE,
            reference="Prieto et al. 2025",
        ),
        Metric(
            "gradient_weight_cosine",
            "cos(grad L(w), w) = <g, w> / (||g|| ||w||) over the analysed parameters; near -1 the descent direction "
            "only scales the weights (naive loss minimisation)",
            reference="Prieto et al. 2025",
        ),
        Metric(
            "zero_gradient_fraction",
            "fraction of the analysed parameters whose full-batch gradient is exactly zero",
            higher_is_better=False,
            reference="Lyle et al. 2023",
        ),
        Metric(
            "weight_norm",
            "L2 norm ||w||_2 of all analysed parameters (group null) or of one parameter tensor",
            group="null for all analysed parameters; else the parameter's name",
        ),
        Metric(
            "distance_from_init",
            "relative distance ||w - w_0||_2 / ||w_0||_2 from the initial weights (--init; diag run: the run's "
            "first checkpoint)",
            group="null for all analysed parameters; else the module owning them",
            reference="Kumar et al. 2024",
        ),
        Metric(
            "dormant_fraction",
            "fraction of a layer's units whose mean |activation| divided by the layer's mean of those is <= tau "
            "(--tau, in the metadata)",
            higher_is_better=False,
            headline=True,
            group="the layer (module name)",
            reference="Sokar et al. 2023",
        ),
        Metric(
            "label_kernel_alignment",
            "centred kernel alignment <HKH, HLH>_F / (||HKH||_F ||HLH||_F) of the feature Gram K = Z Z^T with the "
            "one-hot label Gram L = Y Y^T, H = I - 11^T/N, streamed exactly over the data",
            group="the layer (--kernel-layer)",
            reference="Cortes et al. 2012; Kumar et al. 2024",
        ),
        Metric("train_accuracy", "training accuracy logged at this step, " + _LOGGED, higher_is_better=True),
        Metric(
            "val_accuracy", "validation accuracy logged at this step, " + _LOGGED, higher_is_better=True, headline=True
        ),
        Metric("train_loss", "training loss logged at this step, " + _LOGGED, unit="loss", higher_is_better=False),
        Metric("val_loss", "validation loss logged at this step, " + _LOGGED, unit="loss", higher_is_better=False),
    ),
    sections=(
        Section(
            "Accuracy and loss logged during training",
            ("train_accuracy", "val_accuracy", "train_loss", "val_loss"),
            "What the training script stored in each checkpoint. Grokking: the training accuracy reaches 1 long "
            "before the validation accuracy jumps.",
        ),
        Section(
            "Weight norm and distance from initialisation",
            ("weight_norm", "distance_from_init"),
            "||w|| of all parameters and per tensor, and ||w - w_0|| / ||w_0|| overall and per layer. Under weight "
            "decay the norm falls as the network generalises; a small relative distance means lazy dynamics "
            "(Kumar et al. 2024).",
        ),
        Section(
            "Softmax collapse and naive loss minimisation",
            ("softmax_collapse_fraction", "gradient_weight_cosine", "zero_gradient_fraction"),
            "Fraction of training samples whose true-class softmax is exactly 1 in floating point (their gradient "
            "vanishes), and cos(grad L, w): near -1 the gradient only scales the logits up (Prieto et al. 2025).",
        ),
        Section(
            "Dormant units and label alignment",
            ("dormant_fraction", "label_kernel_alignment"),
            "Fraction of tau-dormant units per layer (Sokar et al. 2023) and the centred alignment of a layer's "
            "feature kernel with the label kernel (Cortes et al. 2012; rises in rich, feature-learning dynamics).",
        ),
    ),
)
