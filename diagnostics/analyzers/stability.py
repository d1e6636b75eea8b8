"""Stability under feature dropout: box stability (BoS) for detectors, prediction stability for classifiers.

Both analyzers compare one *clean* pass of the eval-mode model with several *dropout* passes in which
the output of one or more named modules (the input, for a name ``'module:input'``; by default the input
of the last ``nn.Linear``) is multiplied element-wise by ``m / (1 - p)``, ``m ~ Bernoulli(1 - p)``
(inverted dropout, so the expected activation is unchanged). Dropout is
applied by forward hooks only: the model stays in eval mode, so BatchNorm keeps its running
statistics and the model's own dropout layers stay off. Masks are drawn on the CPU from an explicit
``torch.Generator`` (stream ``k`` of the run's seed for pass ``k``) and then moved to the model's
device, so results do not depend on the device and the global RNG is never touched. Masks are drawn
batch by batch in data order, so they (not their distribution) depend on ``--batch-size``.

Each pass gives one number per metric; the record's ``value`` is the mean over the ``K`` passes and
``stderr`` its standard error ``s / sqrt(K)``. The metadata holds the per-pass values and a two-sided
t-interval ``mean ± t_{(1+c)/2, K-1} s / sqrt(K)`` (confidence ``c``, default 0.95), which is also one of
the result's notes (printed by the CLI). The interval is over dropout masks for the given images, not over
the sampling of images.

Metrics of ``bos`` (Yang, Wang, Chen, Dai, Zheng 2024, "Bounding Box Stability against Feature
Dropout Reflects Detector Generalization across Environments", ICLR):

* ``bos``: per image, the boxes of the clean pass (``n``) and of a dropout pass (``n'``), after the
  score threshold and the per-image cap, are matched by the Hungarian algorithm on ``-IoU``; the image
  score is ``sum_matched IoU / min(n, n')``. BoS of a pass = mean image score over the images where
  both sets are non-empty (the others are skipped and counted). 1 = boxes unchanged by dropout.
* ``bos_unmatched_fraction``: boxes left without a partner, ``sum_i |n_i - n'_i| / sum_i (n_i + n'_i)``
  over all images (skipped ones included).
* ``bos_skipped_images``: images skipped because a set was empty (mean count per pass).

Metrics of ``stability`` (classifier analogue; prediction agreement under MC-style feature dropout):

* ``prediction_agreement``: ``mean_i 1[argmax_c f(x_i)_c == argmax_c f~(x_i)_c]`` between the clean
  and a dropout pass.
* ``prediction_kl``: ``mean_i KL(p_i || q_i) = mean_i sum_c p_ic (log p_ic - log q_ic)`` with ``p`` the
  clean and ``q`` the dropout class probabilities (softmax of logits; sigmoid for one output).

:func:`correlate_bos` relates BoS to known mAP across test sets (Spearman, Pearson, linear fit,
leave-one-out RMSE of the predicted mAP), as in the paper's use of BoS to estimate mAP without labels;
:func:`correlate_files` does it from saved result files and a CSV of mAP (``diag bos-correlate``).

Importing this module loads no numerical library (torch, numpy, pandas and scipy are imported on first use),
so the declarations at the end serve ``diag --help`` cheaply.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diagnostics.errors import DiagnosticsError
from diagnostics.lazy import lazy_import
from diagnostics.progress import null_progress
from diagnostics.results import Deferred, Result, make_records
from diagnostics.spec import Analyzer, FileOutput, Metric, Section, check_config, option

if TYPE_CHECKING:
    from torch import nn

    from diagnostics.boxes import ImageStability
    from diagnostics.context import Context
    from diagnostics.progress import ProgressFn

torch = lazy_import("torch")
binding = lazy_import("diagnostics.binding")
np = lazy_import("numpy")
pd = lazy_import("pandas")
boxes_lib = lazy_import("diagnostics.boxes")
features = lazy_import("diagnostics.features")

BOS = "bos"
STABILITY = "stability"
INPUT_SUFFIX = ":input"  # = diagnostics.features.INPUT_SUFFIX
CORRELATE = "bos_correlate"
OUTPUT_TYPES = ("logits", "probs")
BOX_FORMATS = ("xyxy", "xywh", "cxcywh")  # = diagnostics.boxes.BOX_FORMATS (a test checks), without importing torch
EMPTY_RULES = ("skip", "zero")
PANEL_DROPOUT = "Dropout"
PANEL_BOXES = "Boxes"


# ------------------------------------------------------------------------------------- configs
@dataclass
class DropoutOptions:
    """Where and how features are dropped: the options ``bos`` and ``stability`` share.

    Attributes:
        modules: names of the modules whose outputs get dropout (``model.named_modules()`` names;
            ``'name:input'`` drops the module's input); empty: the input of the last ``nn.Linear``.
        p: element-wise dropout rate.
        passes: number of seeded dropout passes (the interval comes from their spread).
        confidence: level of the t-interval over passes.
    """

    modules: list[str] = option(
        default_factory=list,
        help="module whose output gets dropout, e.g. backbone.layer2; 'name:input' drops its input instead "
        "(default: the input of the last nn.Linear)",
        panel=PANEL_DROPOUT,
        short="-m",
        aliases=("--module",),
        metavar="MODULE",
    )
    p: float = option(
        0.15, help="element-wise dropout rate", panel=PANEL_DROPOUT, short="-p", min=0, max=1, max_open=True
    )
    passes: int = option(5, help="seeded dropout passes; their spread gives the interval", panel=PANEL_DROPOUT, min=1)
    confidence: float = option(
        0.95,
        help="level of the t-interval over passes",
        panel=PANEL_DROPOUT,
        min=0,
        max=1,
        min_open=True,
        max_open=True,
    )


@dataclass
class BosConfig(DropoutOptions):
    """Settings of :func:`analyze_bos` (options of ``diag bos``, ``[bos]`` in diag.toml).

    Attributes:
        modules, p, passes, confidence: see :class:`DropoutOptions`.
        score_threshold: boxes with a lower score are ignored (in both passes).
        max_boxes: keep at most this many highest-scoring boxes per image.
        box_format: ``xyxy`` (torchvision), ``xywh`` or ``cxcywh`` of the model's boxes.
        class_aware: pairs with different labels count as IoU 0 in the matching.
        empty: ``skip`` images where one set is empty (paper), or score them ``zero``.
        adapter: ``'pkg.mod:fn'`` with ``fn(output) -> [{'boxes', 'scores', 'labels'}, ...]`` for models
            whose output is not a torchvision-style list of dicts.
        label: the name of the test set (kept in the metadata; ``diag bos-correlate`` matches it to the mAP table).
        adapter_fn: for Python callers, the adapter as a callable (not a user option).
    """

    score_threshold: float = option(0.5, help="ignore boxes scored below this", panel=PANEL_BOXES)
    max_boxes: int = option(100, help="keep the N best-scored boxes per image", panel=PANEL_BOXES, min=1, metavar="N")
    box_format: str = option(
        "xyxy", help="box coordinates the model returns (xyxy: torchvision)", panel=PANEL_BOXES, choices=BOX_FORMATS
    )
    class_aware: bool = option(False, help="boxes of different labels never match", panel=PANEL_BOXES)
    empty: str = option(
        "skip",
        help="an image with one empty box set: skip it (the paper's convention, counted in bos_skipped_images) or "
        "score it zero",
        panel=PANEL_BOXES,
        choices=EMPTY_RULES,
    )
    adapter: str | None = option(
        None,
        help="'pkg.module:fn' turning the model output into [{'boxes','scores','labels'}, ...]",
        panel=PANEL_BOXES,
        metavar="SPEC",
    )
    label: str | None = option(None, help="name of this test set (stored in the metadata; used by bos-correlate)")
    adapter_fn: Callable[[Any], Any] | None = None

    def validate(self) -> None:
        """One adapter, not two."""
        if self.adapter is not None and self.adapter_fn is not None:
            raise DiagnosticsError("give the adapter once: as --adapter 'pkg.module:fn' or as adapter_fn, not both")


@dataclass
class StabilityConfig(DropoutOptions):
    """Settings of :func:`analyze_stability` (options of ``diag stability``, ``[stability]`` in diag.toml).

    Attributes:
        modules, p, passes, confidence: see :class:`DropoutOptions`.
        output_type: the model returns ``logits`` (softmax / sigmoid applied here) or ``probs``.
    """

    output_type: str = option(
        "logits",
        help="the model returns logits (softmax, or sigmoid for one output, applied here) or probs",
        panel=PANEL_DROPOUT,
        choices=OUTPUT_TYPES,
    )


# ---------------------------------------------------------------------------- feature dropout
def _base(name: str) -> str:
    """The module name of ``name`` (``'head:input'`` -> ``'head'``)."""
    return name[: -len(INPUT_SUFFIX)] if name.endswith(INPUT_SUFFIX) else name


def default_module(model: nn.Module) -> str:
    """The dropout site when none is named: the input of the last ``nn.Linear`` (``'<name>:input'``).

    Raises:
        DiagnosticsError: the model has no ``nn.Linear``; the message asks for ``--modules``.
    """
    found = features.find_classifier(model)
    if found is None:
        raise DiagnosticsError(
            "name at least one module to drop features at: --modules NAME (or --module, repeatable; e.g. "
            "backbone.layer2); the default, the input of the last nn.Linear, does not exist in this model"
        )
    return found[0] + INPUT_SUFFIX


def resolve_modules(model: nn.Module, names: Sequence[str]) -> dict[str, nn.Module]:
    """``{name: module}`` for each name (``'name:input'``: the module whose input gets dropout); no names: the
    :func:`default_module`. An unknown name is an error that lists close candidates."""
    named = dict(model.named_modules())
    out = {}
    for name in list(names) or [default_module(model)]:
        base = _base(name)
        if base in named and base != "":
            out[name] = named[base]
            continue
        candidates = [n for n in named if n]
        close = difflib.get_close_matches(base, candidates, n=5, cutoff=0.5)
        shown = close or candidates[:15]
        more = "" if close or len(candidates) <= 15 else f" ... ({len(candidates)} in all)"
        raise DiagnosticsError(
            f"the model has no module '{base}'; {'did you mean' if close else 'modules'}: {', '.join(shown)}{more}"
        )
    return out


def _apply_mask(obj: Any, p: float, generator: torch.Generator) -> Any:
    """Inverted element-wise dropout of every floating tensor in ``obj`` (nested containers too)."""
    if isinstance(obj, torch.Tensor):
        if not obj.is_floating_point():
            return obj
        keep = torch.rand(obj.shape, generator=generator) >= p  # drawn on the CPU: device-independent
        return obj * (keep.to(device=obj.device, dtype=obj.dtype) / (1.0 - p))
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(_apply_mask(o, p, generator) for o in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_apply_mask(o, p, generator) for o in obj)
    if isinstance(obj, Mapping):
        try:
            return type(obj)((k, _apply_mask(v, p, generator)) for k, v in obj.items())
        except TypeError:
            return {k: _apply_mask(v, p, generator) for k, v in obj.items()}
    return obj


@contextmanager
def feature_dropout(modules: Mapping[str, nn.Module], p: float, generator: torch.Generator) -> Iterator[dict[str, int]]:
    """Apply inverted dropout of rate ``p`` to the outputs of ``modules`` while the context is open (to the
    positional inputs for a name ending in ``':input'``).

    Yields a dict counting how often each module's hook fired (a module that never runs is a mistake).
    The model's train/eval state is not touched.
    """
    calls = {name: 0 for name in modules}

    def make_hook(name: str) -> Callable[..., Any]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> Any:
            calls[name] += 1
            return _apply_mask(output, p, generator)

        def pre_hook(module: nn.Module, inputs: Any) -> Any:
            calls[name] += 1
            return _apply_mask(inputs, p, generator)

        return pre_hook if name.endswith(INPUT_SUFFIX) else hook

    handles = [
        m.register_forward_pre_hook(make_hook(n)) if n.endswith(INPUT_SUFFIX) else m.register_forward_hook(make_hook(n))
        for n, m in modules.items()
    ]
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


def _check_fired(calls: Mapping[str, int]) -> None:
    idle = [n for n, c in calls.items() if c == 0]
    if idle:
        raise DiagnosticsError(
            f"module(s) {idle} never ran during the forward pass, so dropout there changes nothing; "
            "pick a module on the path from the input to the output"
        )


def _nested_modules(names: Sequence[str]) -> list[str]:
    return [a for a in names for b in names if a != b and _base(a).startswith(_base(b) + ".")]


# --------------------------------------------------------------------------------- statistics
@dataclass(frozen=True)
class PassSummary:
    """Mean, standard error and t-interval of a per-pass statistic."""

    mean: float
    stderr: float | None
    low: float | None
    high: float | None
    values: list[float]


def summarize_passes(values: Sequence[float], confidence: float = 0.95) -> PassSummary:
    """``mean``, ``s / sqrt(K)`` and the two-sided t-interval ``mean ± t_{(1+c)/2, K-1} s / sqrt(K)``.

    With one pass there is no spread: stderr and interval are None.
    """
    from scipy import stats

    v = np.asarray(values, dtype=np.float64)
    mean = float(v.mean())
    if len(v) < 2:
        return PassSummary(mean, None, None, None, v.tolist())
    se = float(v.std(ddof=1) / math.sqrt(len(v)))
    half = float(stats.t.ppf(0.5 + confidence / 2, len(v) - 1)) * se
    return PassSummary(mean, se, mean - half, mean + half, v.tolist())


def _summary_meta(s: PassSummary) -> dict[str, Any]:
    return {"mean": s.mean, "stderr": s.stderr, "ci": [s.low, s.high], "per_pass": s.values}


# ------------------------------------------------------------------------------- detections
def _count_images(inputs: Any, where: str) -> int:
    """Number of images in a batch's inputs: an ``[N, C, H, W]`` tensor, one ``[C, H, W]`` image, or a
    list/tuple of images (the detector is called with the inputs as the data gives them)."""
    if isinstance(inputs, torch.Tensor):
        if inputs.dim() == 4:
            return int(inputs.shape[0])
        if inputs.dim() == 3:
            return 1
    elif (
        isinstance(inputs, (list, tuple))
        and inputs
        and all(isinstance(t, torch.Tensor) and t.dim() == 3 for t in inputs)
    ):
        return len(inputs)
    raise DiagnosticsError(
        f"{where}: detector inputs must be [3, H, W] images, a list of them or an [N, 3, H, W] tensor; "
        f"got {binding.describe_shape(inputs)}"
    )


def _field(item: Any, key: str) -> Any:
    if isinstance(item, Mapping):
        return item.get(key)
    return getattr(item, key, None)


def _detectron_instances(item: Mapping[str, Any]) -> dict[str, Any] | None:
    inst = item.get("instances")
    boxes = getattr(inst, "pred_boxes", None)
    if boxes is None:
        return None
    return {
        "boxes": getattr(boxes, "tensor", boxes),
        "scores": getattr(inst, "scores", None),
        "labels": getattr(inst, "pred_classes", None),
    }


def parse_detections(output: Any, n_images: int, box_format: str = "xyxy") -> list[dict[str, torch.Tensor]]:
    """Model output -> one ``{'boxes' [K, 4] xyxy float64, 'scores' [K] | None, 'labels' [K] | None}``
    per image, on the CPU.

    Understood: a list of dicts with ``boxes`` (``scores``, ``labels`` optional; torchvision), a dict of
    per-image lists, and Detectron2's ``[{'instances': Instances}]``. Anything else needs an adapter.
    """
    if isinstance(output, Mapping) and isinstance(output.get("boxes"), (list, tuple)):
        keys = [k for k in ("boxes", "scores", "labels") if k in output]
        output = [{k: output[k][i] for k in keys} for i in range(len(output["boxes"]))]
    hint = "pass --adapter pkg.module:fn that turns it into [{'boxes', 'scores', 'labels'}, ...]"
    if not isinstance(output, (list, tuple)) or any(isinstance(item, torch.Tensor) for item in output):
        raise DiagnosticsError(
            f"the model returned {binding.describe_shape(output)}, not a list of per-image dicts with 'boxes' "
            f"(torchvision convention); {hint}"
        )
    if len(output) != n_images:
        raise DiagnosticsError(f"the model returned {len(output)} detection sets for {n_images} images; {hint}")
    out = []
    for i, item in enumerate(output):
        if isinstance(item, Mapping) and "instances" in item and "boxes" not in item:
            item = _detectron_instances(item) or item
        boxes = _field(item, "boxes")
        if boxes is None:
            raise DiagnosticsError(
                f"detection set {i} of the model output ({binding.describe_shape(item)}) has no 'boxes'; {hint}"
            )
        if not isinstance(boxes, torch.Tensor) or boxes.dim() != 2 or boxes.shape[-1] != 4:
            raise DiagnosticsError(
                f"detection set {i}: 'boxes' must be a [K, 4] tensor, got {binding.describe_shape(boxes)}"
            )
        k = int(boxes.shape[0])
        scores, labels = _field(item, "scores"), _field(item, "labels")
        for name, t in (("scores", scores), ("labels", labels)):
            if t is not None and (not isinstance(t, torch.Tensor) or t.reshape(-1).shape[0] != k):
                raise DiagnosticsError(f"detection set {i}: '{name}' must be a tensor with one entry per box ({k})")
        boxes = boxes_lib.to_xyxy(boxes.detach().to("cpu", torch.float64), box_format)
        if not bool(torch.isfinite(boxes).all()):
            raise DiagnosticsError(f"detection set {i} holds non-finite box coordinates (NaN or inf)")
        out.append(
            {
                "boxes": boxes,
                "scores": None if scores is None else scores.detach().to("cpu", torch.float64).reshape(-1),
                "labels": None if labels is None else labels.detach().cpu().reshape(-1),
            }
        )
    return out


def select_boxes(det: Mapping[str, Any], score_threshold: float, max_boxes: int) -> dict[str, Any]:
    """Boxes with ``score >= score_threshold``, the ``max_boxes`` highest-scoring first.

    Without scores every box is kept, in the given order, up to ``max_boxes``.
    """
    boxes, scores, labels = det["boxes"], det["scores"], det["labels"]
    if scores is None:
        idx = torch.arange(min(int(boxes.shape[0]), max_boxes))
    else:
        keep = torch.nonzero(scores >= score_threshold).reshape(-1)
        order = torch.argsort(scores[keep], descending=True, stable=True)
        idx = keep[order][:max_boxes]
    return {
        "boxes": boxes[idx],
        "scores": None if scores is None else scores[idx],
        "labels": None if labels is None else labels[idx],
    }


def _resolve_adapter(adapter: str | Callable[[Any], Any] | None) -> Callable[[Any], Any] | None:
    if adapter is None or callable(adapter):
        return adapter
    from diagnostics.binding import import_callable

    return import_callable(adapter, "detection adapter")


def _detect(
    ctx: Context,
    counts: list[int],
    adapter: Callable[[Any], Any] | None,
    config: BosConfig,
) -> list[dict[str, Any]]:
    """Run the detector over every batch -> selected detections per image."""
    out: list[dict[str, Any]] = []
    with torch.no_grad():
        for (inputs, _), n in zip(ctx.batches, counts):
            raw = ctx.model(inputs)
            if adapter is not None:
                try:
                    raw = adapter(raw)
                except DiagnosticsError:
                    raise
                except Exception as exc:
                    raise DiagnosticsError(f"the detection adapter raised {type(exc).__name__}: {exc}") from exc
            dets = parse_detections(raw, n, config.box_format)
            out.extend(select_boxes(d, config.score_threshold, config.max_boxes) for d in dets)
    return out


def _pass_scores(clean: list[dict[str, Any]], drop: list[dict[str, Any]], config: BosConfig) -> list[ImageStability]:
    return [
        boxes_lib.image_box_stability(
            c["boxes"],
            d["boxes"],
            c["labels"] if config.class_aware else None,
            d["labels"] if config.class_aware else None,
            empty=config.empty,
        )
        for c, d in zip(clean, drop)
    ]


def _model_notes(ctx: Context, modules: Mapping[str, nn.Module], config_p: float, passes: int) -> list[str]:
    notes = []
    nested = _nested_modules(list(modules))
    if nested:
        notes.append(f"module(s) {nested} sit inside another named module: their features get dropout twice")
    if config_p == 0:
        notes.append("--p 0: the dropout passes equal the clean pass, so the scores are exactly 1 / 0")
    if passes == 1:
        notes.append("one dropout pass: no confidence interval; use --passes >= 2")
    own = [n for n, m in ctx.model.named_modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd)]
    if own:
        notes.append(f"the model's own dropout layers {own[:3]} stay off (eval mode); dropout comes from --module only")
    return notes


# ------------------------------------------------------------------------------------ BoS
def _interval_note(metric: str, s: PassSummary, confidence: float) -> list[str]:
    """The t-interval over passes as one line (none with a single pass)."""
    if s.low is None or s.high is None:
        return []
    return [
        f"{metric} = {s.mean:.4f}, {100 * confidence:g}% t-interval over {len(s.values)} passes "
        f"[{s.low:.4f}, {s.high:.4f}]"
    ]


def _clean_detections(
    ctx: Context, counts: list[int], adapter: Callable[[Any], Any] | None, config: BosConfig, notes: list[str]
) -> list[dict[str, Any]]:
    """The clean pass's selected detections per image; an error when no image keeps a box."""
    clean = _detect(ctx, counts, adapter, config)
    n_images = sum(counts)
    if all(int(d["boxes"].shape[0]) == 0 for d in clean):
        raise DiagnosticsError(
            f"the detector finds no box with score >= {config.score_threshold} on any of the {n_images} images "
            "in the clean pass, so BoS is undefined; lower --score-threshold or check the model and data"
        )
    if not any(d["scores"] is not None for d in clean) and clean:
        notes.append("the model output has no 'scores': every box is kept (no --score-threshold), up to --max-boxes")
    return clean


@dataclass
class _BosPasses:
    """Per-pass statistics of the dropout passes and the per-image rows."""

    bos: list[float] = field(default_factory=list)
    unmatched_fraction: list[float] = field(default_factory=list)
    skipped: list[float] = field(default_factory=list)
    images_scored: list[float] = field(default_factory=list)
    dropout_boxes: list[int] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)

    def add(self, k: int, scores: list[ImageStability], clean_boxes: int) -> None:
        """Record pass ``k``; an error when no image has boxes in both passes."""
        scored = [s.score for s in scores if s.score is not None]
        n_drop = sum(s.n_dropout for s in scores)
        if not scored:
            raise DiagnosticsError(
                f"dropout pass {k}: no image has boxes in both the clean and the dropout pass "
                f"({len(scores)} images, {clean_boxes} clean boxes, {n_drop} boxes under "
                f"dropout), so BoS is undefined; lower --p, use another --module, or pass --empty zero"
            )
        self.bos.append(float(np.mean(scored)))
        self.unmatched_fraction.append(sum(s.unmatched for s in scores) / sum(s.n_clean + s.n_dropout for s in scores))
        self.skipped.append(float(sum(1 for s in scores if s.skipped)))
        self.images_scored.append(float(len(scored)))
        self.dropout_boxes.append(n_drop)
        self.rows.extend(
            {
                "image": i,
                "pass": k,
                "n_clean": s.n_clean,
                "n_dropout": s.n_dropout,
                "matched": s.matched,
                "unmatched": s.unmatched,
                "score": np.nan if s.score is None else s.score,
            }
            for i, s in enumerate(scores)
        )


def _skip_notes(skipped: float, n_images: int, no_clean: int, threshold: float) -> list[str]:
    notes = []
    if skipped > 0:
        notes.append(
            f"BoS skips {skipped:g} of {n_images} images per pass on average (an empty box set; "
            f"{no_clean} images have no clean box with score >= {threshold}); see bos_skipped_images"
        )
    if skipped > n_images / 2:
        notes.append(
            "more than half of the images are skipped: BoS describes only the images that keep boxes and is not "
            "comparable with test sets where few are skipped; lower --score-threshold or pass --empty zero"
        )
    return notes


def _bos_result(
    ctx: Context, config: BosConfig, clean: list[dict[str, Any]], passes: _BosPasses, notes: list[str]
) -> Result:
    n_images = len(clean)
    n_clean = [int(d["boxes"].shape[0]) for d in clean]
    no_clean = sum(1 for n in n_clean if n == 0)
    bos = summarize_passes(passes.bos, config.confidence)
    unm = summarize_passes(passes.unmatched_fraction, config.confidence)
    skp = summarize_passes(passes.skipped, config.confidence)
    notes = [*notes, *_skip_notes(skp.mean, n_images, no_clean, config.score_threshold)]
    notes += _interval_note("bos", bos, config.confidence)
    rows = [
        ("bos", bos.mean, bos.stderr),
        ("bos_unmatched_fraction", unm.mean, unm.stderr),
        ("bos_skipped_images", skp.mean, skp.stderr),
    ]
    metadata: dict[str, Any] = {
        "samples": n_images,
        "images": n_images,
        "bos": _summary_meta(bos),
        "bos_unmatched_fraction": _summary_meta(unm),
        "bos_skipped_images": _summary_meta(skp),
        "images_scored_per_pass": passes.images_scored,
        "images_without_clean_boxes": no_clean,
        "clean_boxes": sum(n_clean),
        "dropout_boxes_per_pass": passes.dropout_boxes,
        "definition": "BoS = mean over images of sum(IoU of Hungarian-matched boxes) / min(n, n'), "
        "clean vs feature-dropout pass (Yang et al. 2024); value = mean over passes, stderr over passes",
        "notes": notes,
    }
    if config.label is not None:
        metadata["label"] = config.label
    per_image = passes.rows
    artifacts = {"per_image": Deferred(lambda: pd.DataFrame(per_image))}  # a DataFrame once read
    return Result(make_records(ctx.checkpoint, ctx.step, BOS, rows), metadata, artifacts)


def analyze_bos(config: BosConfig, ctx: Context, progress: ProgressFn | None = None) -> Result:
    """Box stability score of a detector under feature dropout (see the module docstring).

    Args:
        config: the options (checked first).
        ctx: the detector's context (targets, if any, are not used).
        progress: ``progress(task, done, total)``.

    Returns:
        Records ``bos``, ``bos_unmatched_fraction``, ``bos_skipped_images`` (value = mean over passes,
        stderr = standard error over passes); metadata with the per-pass values, the t-intervals (also as a
        note), the box counts and ``label``; artifact ``per_image``, a DataFrame
        ``image, pass, n_clean, n_dropout, matched, unmatched, score`` (score NaN when skipped).

    Raises:
        DiagnosticsError: unknown module, output without boxes, no box on any image in the clean pass,
            or a dropout pass that leaves no image with boxes in both sets.
    """
    check_config(config)
    progress = progress or null_progress
    modules = resolve_modules(ctx.model, config.modules)
    adapter = config.adapter_fn or _resolve_adapter(config.adapter)
    counts = [_count_images(x, f"batch {i}") for i, (x, _) in enumerate(ctx.batches)]
    notes = _model_notes(ctx, modules, config.p, config.passes)
    clean = _clean_detections(ctx, counts, adapter, config, notes)
    clean_boxes = sum(int(d["boxes"].shape[0]) for d in clean)
    passes = _BosPasses()
    for k in range(config.passes):
        progress("bos dropout passes", k, config.passes)
        with feature_dropout(modules, config.p, ctx.generator(k)) as calls:
            drop = _detect(ctx, counts, adapter, config)
        _check_fired(calls)
        passes.add(k, _pass_scores(clean, drop, config), clean_boxes)
    progress("bos dropout passes", config.passes, config.passes)
    result = _bos_result(ctx, config, clean, passes, notes)
    result.metadata["modules"] = list(modules)
    return result


# ------------------------------------------------------------------------ prediction stability
def _class_log_probs(output: Any, output_type: str) -> torch.Tensor:
    """Classifier output -> ``[N, C]`` float64 log-probabilities (``C = 2`` for a single logit)."""
    if not isinstance(output, torch.Tensor):
        logits = _field(output, "logits")
        if not isinstance(logits, torch.Tensor):
            raise DiagnosticsError(
                f"the model returned {binding.describe_shape(output)}; prediction stability needs a [N, C] tensor of "
                "class scores (or an object with .logits)"
            )
        output = logits
    if not output.is_floating_point() or output.dim() not in (1, 2):
        raise DiagnosticsError(
            f"the model returned {binding.describe_shape(output)}; expected [N, C] class scores or [N] logits"
        )
    x = output.detach().to(torch.float64)
    if x.dim() == 2 and x.shape[1] == 1:
        x = x[:, 0]
    if x.dim() == 1:  # one logit/probability: the positive class of a binary problem
        if output_type == "logits":
            return torch.stack([torch.nn.functional.logsigmoid(-x), torch.nn.functional.logsigmoid(x)], 1)
        pr = x.clamp(0.0, 1.0)
        return torch.stack([torch.log1p(-pr), torch.log(pr)], 1)
    if output_type == "logits":
        return torch.log_softmax(x, 1)
    return torch.log(x.clamp(min=0.0) / x.clamp(min=0.0).sum(1, keepdim=True))


def kl_divergence(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Row-wise ``KL(p || q) = sum_c p_c (log p_c - log q_c)`` with ``0 log 0 = 0`` -> ``[N]``."""
    p = log_p.exp()
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))
    return terms.sum(1)


def _predict(ctx: Context, output_type: str) -> list[torch.Tensor]:
    """``[N_b, C]`` float64 log-probabilities of every batch (:meth:`~diagnostics.context.Context.forward`: a
    tuple of inputs is passed as positional arguments, a dict as keyword arguments)."""
    out = []
    with torch.no_grad():
        for x, _ in ctx.batches:
            out.append(_class_log_probs(ctx.forward(ctx.params, x), output_type).cpu())
    return out


def analyze_stability(config: StabilityConfig, ctx: Context, progress: ProgressFn | None = None) -> Result:
    """Prediction stability of a classifier under feature dropout (see the module docstring).

    Args:
        config: the options (checked first).
        ctx: the classifier's context (targets, if any, are not used).
        progress: ``progress(task, done, total)``.

    Returns:
        Records ``prediction_agreement`` and ``prediction_kl`` (value = mean over passes, stderr over
        passes); metadata with per-pass values and t-intervals (also as notes).
    """
    check_config(config)
    progress = progress or null_progress
    modules = resolve_modules(ctx.model, config.modules)
    notes = _model_notes(ctx, modules, config.p, config.passes)
    clean = _predict(ctx, config.output_type)
    n = sum(int(c.shape[0]) for c in clean)
    if any(not bool(torch.isfinite(c).all()) for c in clean):
        notes.append("some clean-pass probabilities are 0 (log = -inf); the KL may be infinite for those samples")
    agree: list[float] = []
    kl: list[float] = []
    for k in range(config.passes):
        progress("stability dropout passes", k, config.passes)
        with feature_dropout(modules, config.p, ctx.generator(k)) as calls:
            drop = _predict(ctx, config.output_type)
        _check_fired(calls)
        same = sum(int((c.argmax(1) == d.argmax(1)).sum()) for c, d in zip(clean, drop))
        agree.append(same / n)
        kl.append(float(sum(float(kl_divergence(c, d).sum()) for c, d in zip(clean, drop)) / n))
    progress("stability dropout passes", config.passes, config.passes)
    if not all(math.isfinite(v) for v in kl):
        raise DiagnosticsError(
            "prediction_kl is infinite: a dropout pass gives probability 0 to a class the clean pass does not; "
            "with --output-type probs the model's probabilities must be positive"
        )
    a = summarize_passes(agree, config.confidence)
    d = summarize_passes(kl, config.confidence)
    notes += _interval_note("prediction_agreement", a, config.confidence)
    notes += _interval_note("prediction_kl", d, config.confidence)
    rows = [("prediction_agreement", a.mean, a.stderr), ("prediction_kl", d.mean, d.stderr)]
    metadata = {
        "samples": n,
        "modules": list(modules),
        "prediction_agreement": _summary_meta(a),
        "prediction_kl": _summary_meta(d),
        "definition": "agreement = mean 1[argmax clean == argmax dropout]; kl = mean KL(p_clean || p_dropout)",
        "notes": notes,
    }
    return Result(make_records(ctx.checkpoint, ctx.step, STABILITY, rows), metadata)


# ------------------------------------------------------------------------------ BoS vs mAP
def correlate_bos(
    names: Sequence[str],
    bos: Sequence[float],
    map_values: Sequence[float],
    bos_stderr: Sequence[float | None] | None = None,
) -> Result:
    """How well BoS predicts mAP across test sets (Yang et al. 2024, Sec. 4).

    With one point per test set ``(BoS_s, mAP_s)``:

    * ``spearman_rho``, ``pearson_r``: rank and linear correlation (p-values in the metadata);
    * ``fit_slope``, ``fit_intercept``: least squares ``mAP ≈ slope * BoS + intercept`` (stderr = their
      standard errors), ``fit_r2`` its coefficient of determination;
    * ``loo_rmse``: ``sqrt(mean_s (mAP_s - mAP^(-s)_s)^2)`` where ``mAP^(-s)_s`` is predicted from the
      line fitted without set ``s``; ``loo_predicted_map`` (group = set) holds each prediction.

    Raises:
        DiagnosticsError: fewer than 3 sets, non-finite values, or constant BoS or mAP (no correlation).
    """
    from scipy import stats

    names = [str(n) for n in names]
    x = np.asarray(bos, dtype=np.float64)
    y = np.asarray(map_values, dtype=np.float64)
    if not (len(names) == len(x) == len(y)):
        raise DiagnosticsError(f"{len(names)} names, {len(x)} BoS values and {len(y)} mAP values; they must match")
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise DiagnosticsError(f"test set names must be unique; repeated: {dup}")
    if len(x) < 3:
        raise DiagnosticsError(f"bos-correlate needs at least 3 test sets (got {len(x)}): a line through 2 points")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise DiagnosticsError("BoS and mAP values must be finite numbers")
    for label, v in (("BoS", x), ("mAP", y)):
        if np.ptp(v) == 0:
            raise DiagnosticsError(
                f"all {label} values are equal ({v[0]:g}): the correlation is undefined; give test sets whose "
                f"{label} differs"
            )
    pear = stats.pearsonr(x, y)
    spear = stats.spearmanr(x, y)
    fit = stats.linregress(x, y)
    loo = np.empty_like(y)
    for i in range(len(x)):
        keep = np.arange(len(x)) != i
        if np.ptp(x[keep]) == 0:
            raise DiagnosticsError(
                f"leaving out '{names[i]}' leaves only equal BoS values: no line to fit; add test sets"
            )
        f = stats.linregress(x[keep], y[keep])
        loo[i] = f.slope * x[i] + f.intercept
    rmse = float(np.sqrt(np.mean((loo - y) ** 2)))
    rows: list[tuple] = [
        ("spearman_rho", float(spear.statistic)),
        ("pearson_r", float(pear.statistic)),
        ("fit_slope", float(fit.slope), float(fit.stderr)),
        ("fit_intercept", float(fit.intercept), float(fit.intercept_stderr)),
        ("fit_r2", float(fit.rvalue**2)),
        ("loo_rmse", rmse),
    ]
    rows += [("loo_predicted_map", float(loo[i]), None, None, names[i]) for i in range(len(x))]
    points = pd.DataFrame(
        {
            "set": names,
            "bos": x,
            "bos_stderr": [None] * len(x) if bos_stderr is None else list(bos_stderr),
            "map": y,
            "loo_predicted_map": loo,
        }
    )
    meta = {
        "analyzer": CORRELATE,
        "n_sets": len(x),
        "spearman_p": float(spear.pvalue),
        "pearson_p": float(pear.pvalue),
        "points": points.to_dict(orient="records"),
        "definition": "mAP ≈ slope·BoS + intercept (least squares); loo_rmse = RMSE of leave-one-out predictions",
        "notes": [] if len(x) >= 5 else [f"only {len(x)} test sets: correlations and p-values are very uncertain"],
    }
    return Result(make_records(CORRELATE, None, CORRELATE, rows), meta, {"points": points})


# ------------------------------------------------------------------------ BoS vs mAP from files
_KEY_COLUMNS = ("set", "name", "label", "test_set", "file", "dataset")
_VALUE_COLUMNS = ("map", "map50", "map@0.5", "ap", "value")


def _column(df: pd.DataFrame, wanted: tuple[str, ...], explicit: str | None, what: str, path: Path) -> str:
    lower = {str(c).strip().lower(): c for c in df.columns}
    if explicit is not None:
        if explicit.lower() not in lower:
            raise DiagnosticsError(f"'{path}' has no column '{explicit}'; columns: {', '.join(map(str, df.columns))}")
        return lower[explicit.lower()]
    for w in wanted:
        if w in lower:
            return lower[w]
    raise DiagnosticsError(
        f"'{path}' needs a {what} column named one of {', '.join(wanted)}; columns: {', '.join(map(str, df.columns))}"
    )


def read_map_table(path: Path, value_column: str | None = None) -> dict[str, float]:
    """``maps.csv`` -> ``{test set name: mAP}`` (columns ``set``/``name`` and ``map``, any case).

    Args:
        path: the CSV file.
        value_column: the mAP column (default: the first of ``map``, ``map50``, ``map@0.5``, ``ap``, ``value``).

    Returns:
        The mAP of each test set, by name.

    Raises:
        DiagnosticsError: a missing or unreadable file, no name or mAP column, a non-number, a name twice.
    """
    from diagnostics.results import check_input_file

    check_input_file(path, "mAP table", "a CSV of test sets and their mAP (columns such as 'set' and 'map')")
    try:
        df = pd.read_csv(path, keep_default_na=False, na_values=[""])  # 'n/a' or 'NA' is shown as written
    except Exception as exc:
        raise DiagnosticsError(f"cannot read '{path}' as CSV: {exc}") from exc
    vcol = _column(df, _VALUE_COLUMNS, value_column, "mAP", path)
    keys = [c for c in df.columns if c != vcol]
    kcol = next((c for c in keys if str(c).strip().lower() in _KEY_COLUMNS), keys[0] if keys else None)
    if kcol is None:
        raise DiagnosticsError(f"'{path}' needs a column naming the test sets (e.g. 'set') next to '{vcol}'")
    values = pd.to_numeric(df[vcol], errors="coerce")
    if values.isna().all():
        raw = ", ".join(repr(str(v)) for v in df[vcol].tolist()[:3])
        raise DiagnosticsError(
            f"'{path}': column '{vcol}' holds no numbers ({raw or 'no rows'}); name the mAP column with "
            f"--map-column (columns: {', '.join(map(str, df.columns))})"
        )
    if values.isna().any():
        rows = df.loc[values.isna(), [kcol, vcol]].head(5)
        bad = ", ".join(
            f"{str(k).strip() if pd.notna(k) else '(no name)'}: {'empty' if pd.isna(v) else repr(str(v))}"
            for k, v in rows.itertuples(index=False)
        )
        raise DiagnosticsError(f"'{path}': column '{vcol}' is not a number for {bad}; fix those rows")
    names = df[kcol].astype(str).str.strip()
    if names.duplicated().any():
        raise DiagnosticsError(f"'{path}': test sets listed twice: {sorted(set(names[names.duplicated()]))}")
    return dict(zip(names, values.astype(float)))


def result_point(path: Path, metric: str = BOS) -> tuple[list[str], float, float | None]:
    """One test set's ``(names to match, value, stderr)`` of ``metric`` from a saved result file.

    The names tried against the mAP table are, in order: the ``label`` of ``diag bos --label``, the file's
    stem, its name and its path.
    """
    from diagnostics.results import read_result

    res = read_result(path)
    rows = [r for r in res.records if r.metric == metric and r.group is None]
    if not rows:
        found = sorted({r.metric for r in res.records})
        raise DiagnosticsError(
            f"'{path}' holds no '{metric}' record (metrics there: {', '.join(found) or 'none'}); "
            f"write one with: diag bos CKPT ... --out {path.name}"
        )
    if len(rows) > 1:
        raise DiagnosticsError(f"'{path}' holds {len(rows)} '{metric}' records; give one result file per test set")
    keys = [k for k in (res.metadata.get("label"), path.stem, path.name, str(path)) if k]
    return keys, rows[0].value, rows[0].stderr


def correlate_files(
    results: Sequence[Path], map_table: Path, metric: str = BOS, map_column: str | None = None
) -> Result:
    """:func:`correlate_bos` over saved result files (one per test set) and a CSV of their known mAP.

    Args:
        results: result files of ``diag bos --out`` (or any analyzer writing ``metric``).
        map_table: the CSV read by :func:`read_map_table`.
        metric: the stability metric to correlate with mAP.
        map_column: the mAP column of the table (default: found by name).

    Returns:
        The :func:`correlate_bos` result; metadata ``metric`` and a note naming test sets without a file.

    Raises:
        DiagnosticsError: a file without the metric, a test set missing from the table, too few sets.
    """
    table = read_map_table(map_table, map_column)
    names, xs, ses, ys = [], [], [], []
    for path in results:
        keys, value, se = result_point(path, metric)
        key = next((k for k in keys if k in table), None)
        if key is None:
            raise DiagnosticsError(
                f"'{path}' (test set '{keys[0]}') is not listed in '{map_table}'; it lists: {', '.join(table)}"
            )
        names.append(key)
        xs.append(value)
        ses.append(se)
        ys.append(table[key])
    result = correlate_bos(names, xs, ys, ses)
    result.metadata["metric"] = metric
    unused = sorted(set(table) - set(names))
    if unused:
        result.metadata["notes"].append(f"'{map_table}' lists test sets without a result file: {unused}")
    return result


# ------------------------------------------------------------------------------------ declarations
_PASSES = "value = mean over the seeded dropout passes, stderr = their standard error s / sqrt(K)"
_YANG = "Yang, Wang, Chen, Dai, Zheng 2024 (ICLR)"

BOS_ANALYZER = Analyzer(
    name=BOS,
    summary="box stability score of a detector under feature dropout (Yang et al. 2024)",
    description="Box stability score (BoS, Yang et al. 2024): how much a detector's boxes move under feature "
    "dropout. Boxes of a clean pass and of --passes dropout passes (rate --p at --modules, BatchNorm in eval) are "
    "matched per image by the Hungarian algorithm on IoU; BoS = mean over images of sum(matched IoU) / min(n, n'). "
    "Higher = more stable; across test sets it tracks mAP (see bos-correlate).",
    config=BosConfig,
    run=analyze_bos,
    needs_targets=False,
    uses_loss=False,
    order=70,
    metrics=(
        Metric(
            "bos",
            "mean over images of sum(IoU of Hungarian-matched boxes) / min(n, n'), n and n' the boxes of the clean "
            f"and a feature-dropout pass (images with an empty set skipped); {_PASSES}",
            higher_is_better=True,
            headline=True,
            reference=_YANG,
        ),
        Metric(
            "bos_unmatched_fraction",
            f"sum_i |n_i - n'_i| / sum_i (n_i + n'_i): share of boxes left without a partner; {_PASSES}",
            higher_is_better=False,
            reference=_YANG,
        ),
        Metric(
            "bos_skipped_images",
            f"number of images skipped by BoS because the clean or the dropout box set is empty; {_PASSES}",
            unit="images",
            higher_is_better=False,
        ),
    ),
    outputs=(
        FileOutput(
            "per_image",
            "write the per-image, per-pass scores to FILE.csv",
            render="diagnostics.render:bos_per_image",
            require_suffix=".csv",
        ),
    ),
    sections=(
        Section(
            "Box stability under feature dropout",
            ("bos", "bos_unmatched_fraction", "bos_skipped_images"),
            "BoS = mean IoU of Hungarian-matched boxes between a clean and a feature-dropout pass (Yang et al. "
            "2024); 1 = boxes unmoved by dropout. Across test sets it tracks mAP; band = ±1 standard error over "
            "the dropout passes.",
        ),
    ),
)

STABILITY_ANALYZER = Analyzer(
    name=STABILITY,
    summary="agreement and KL of classifier predictions under feature dropout",
    description="Prediction stability of a classifier under feature dropout at --modules (BatchNorm stays in "
    "eval): prediction_agreement = share of samples whose argmax survives dropout; prediction_kl = mean "
    "KL(clean || dropout) of the class probabilities; both averaged over --passes seeded passes.",
    config=StabilityConfig,
    run=analyze_stability,
    needs_targets=False,
    uses_loss=False,
    order=72,
    metrics=(
        Metric(
            "prediction_agreement",
            f"mean_i 1[argmax_c f(x_i)_c = argmax_c f~(x_i)_c] between the clean and a feature-dropout pass; {_PASSES}",
            higher_is_better=True,
            headline=True,
        ),
        Metric(
            "prediction_kl",
            "mean_i sum_c p_ic (log p_ic - log q_ic), p the clean and q the feature-dropout class probabilities "
            f"(softmax, or sigmoid for one output); {_PASSES}",
            unit="nats",
            higher_is_better=False,
        ),
    ),
    sections=(
        Section(
            "Prediction stability under feature dropout",
            ("prediction_agreement", "prediction_kl"),
            "Share of predictions that survive feature dropout, and the KL divergence of the class probabilities "
            "from the clean pass; band = ±1 standard error over the dropout passes.",
        ),
    ),
)

ANALYZERS = (BOS_ANALYZER, STABILITY_ANALYZER)

# Metrics of ``diag bos-correlate`` (not an analyzer: it reads result files; declared for the documentation).
CORRELATE_METRICS = (
    Metric("spearman_rho", "Spearman rank correlation of BoS and mAP over the test sets", reference=_YANG),
    Metric("pearson_r", "Pearson correlation of BoS and mAP over the test sets", reference=_YANG),
    Metric("fit_slope", "slope of the least-squares line mAP = slope * BoS + intercept (stderr: its standard error)"),
    Metric(
        "fit_intercept",
        "intercept of the least-squares line mAP = slope * BoS + intercept (stderr: its standard error)",
    ),
    Metric("fit_r2", "coefficient of determination of the least-squares line", higher_is_better=True),
    Metric(
        "loo_rmse",
        "sqrt(mean_s (mAP_s - mAP^(-s)_s)^2), mAP^(-s)_s predicted by the line fitted without test set s",
        unit="mAP",
        higher_is_better=False,
    ),
    Metric(
        "loo_predicted_map",
        "mAP of a test set predicted from its BoS by the line fitted without it",
        unit="mAP",
        group="the test set",
    ),
)
