"""Boxes: IoU, Hungarian matching, the per-image box-stability score, and average precision.

Pure functions over tensors; nothing here touches a model. Boxes are ``[K, 4]`` tensors in ``xyxy``
(``x1, y1, x2, y2`` with ``x2 >= x1``, ``y2 >= y1``), the torchvision / Detectron convention;
:func:`to_xyxy` converts ``xywh`` and ``cxcywh``. Geometry is computed in float64.

* :func:`box_iou`: ``IoU(a, b) = |a ∩ b| / |a ∪ b|``.
* :func:`match_boxes`: Hungarian matching on ``-IoU`` (``scipy.optimize.linear_sum_assignment``).
* :func:`image_box_stability`: the image score of BoS (Yang et al. 2024, "Bounding Box Stability
  against Feature Dropout Reflects Detector Generalization across Environments", ICLR):
  ``s = sum_{(i,j) matched} IoU(b_i, b'_j) / min(n, n')``; undefined (the image is skipped) when one
  set is empty.
* :func:`average_precision`: VOC-style all-point interpolated AP at an IoU threshold, and
  :func:`mean_average_precision` over classes (mAP@0.5 by default).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from diagnostics.errors import DiagnosticsError

BOX_FORMATS = ("xyxy", "xywh", "cxcywh")


def to_xyxy(boxes: torch.Tensor, fmt: str = "xyxy") -> torch.Tensor:
    """``[K, 4]`` boxes in ``fmt`` -> ``[K, 4]`` in ``xyxy``.

    ``xywh`` is ``(x1, y1, width, height)``; ``cxcywh`` is ``(centre x, centre y, width, height)``.
    """
    if fmt not in BOX_FORMATS:
        raise DiagnosticsError(f"unknown box format '{fmt}'; use one of {', '.join(BOX_FORMATS)}")
    if fmt == "xyxy":
        return boxes
    a, b, w, h = boxes.unbind(-1)
    if fmt == "xywh":
        return torch.stack([a, b, a + w, b + h], -1)
    return torch.stack([a - w / 2, b - h / 2, a + w / 2, b + h / 2], -1)


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """``[K, 4]`` xyxy -> ``[K]`` areas ``(x2 - x1)^+ (y2 - y1)^+`` (inverted boxes have area 0)."""
    b = boxes.to(torch.float64)
    return (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of ``a [N, 4]`` and ``b [M, 4]`` (xyxy) -> ``[N, M]`` float64 in [0, 1].

    ``IoU = |a ∩ b| / (|a| + |b| - |a ∩ b|)``. Two boxes whose union has zero area (degenerate boxes)
    have IoU 1 when they are identical and 0 otherwise.
    """
    a = a.to(torch.float64).reshape(-1, 4)
    b = b.to(torch.float64).reshape(-1, 4)
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    iou = torch.where(union > 0, inter / union.clamp(min=torch.finfo(torch.float64).tiny), 0.0)
    same = (a[:, None, :] == b[None, :, :]).all(-1)
    return torch.where((union <= 0) & same, 1.0, iou)


@dataclass(frozen=True)
class Matching:
    """A one-to-one matching between two box sets.

    Attributes:
        rows: indices into the first set of the matched pairs (``min(n, n')`` of them).
        cols: indices into the second set, aligned with ``rows``.
        iou: IoU of each matched pair (float64).
        n_a: size ``n`` of the first set.
        n_b: size ``n'`` of the second set.
    """

    rows: np.ndarray
    cols: np.ndarray
    iou: np.ndarray
    n_a: int
    n_b: int

    @property
    def unmatched(self) -> int:
        """Boxes left without a partner: ``n + n' - 2 min(n, n') = |n - n'|``."""
        return self.n_a + self.n_b - 2 * len(self.rows)


def match_boxes(
    a: torch.Tensor,
    b: torch.Tensor,
    labels_a: torch.Tensor | None = None,
    labels_b: torch.Tensor | None = None,
) -> Matching:
    """Hungarian matching maximising the total IoU: ``linear_sum_assignment(-IoU)``.

    With labels, pairs of different labels count as IoU 0 (they may still be paired when nothing
    better is left; their IoU then adds 0).

    Args:
        a: first box set ``[n, 4]``, xyxy (``x1, y1, x2, y2``).
        b: second box set ``[n', 4]``, xyxy.
        labels_a: class labels ``[n]`` of ``a``; used only together with ``labels_b``.
        labels_b: class labels ``[n']`` of ``b``; with both given, the matching is class-aware.

    Returns:
        The ``min(n, n')`` matched pairs and their IoUs (no pairs when either set is empty).
    """
    n_a, n_b = int(a.shape[0]), int(b.shape[0])
    if n_a == 0 or n_b == 0:
        empty = np.zeros(0, dtype=np.int64)
        return Matching(empty, empty, np.zeros(0), n_a, n_b)
    iou = box_iou(a, b)
    if labels_a is not None and labels_b is not None:
        iou = torch.where(labels_a.reshape(-1, 1).cpu() == labels_b.reshape(1, -1).cpu(), iou, 0.0)
    m = iou.numpy()
    rows, cols = linear_sum_assignment(-m)
    return Matching(rows.astype(np.int64), cols.astype(np.int64), m[rows, cols], n_a, n_b)


@dataclass(frozen=True)
class ImageStability:
    """Box stability of one image: the score (None when skipped) and the counts behind it."""

    score: float | None
    n_clean: int
    n_dropout: int
    matched: int
    unmatched: int

    @property
    def skipped(self) -> bool:
        """True when the image has no score (both sets empty, or one empty under ``empty="skip"``)."""
        return self.score is None


def image_box_stability(
    clean: torch.Tensor,
    dropout: torch.Tensor,
    labels_clean: torch.Tensor | None = None,
    labels_dropout: torch.Tensor | None = None,
    empty: str = "skip",
) -> ImageStability:
    """Per-image BoS score (Yang et al. 2024): ``sum_matched IoU / min(n, n')``.

    Boxes of the clean pass (``n``) and of a dropout pass (``n'``) are matched by
    :func:`match_boxes`; the score is the mean IoU over the ``min(n, n')`` matched pairs, so it is 1
    for identical sets and 0 when no matched pair overlaps. Boxes beyond ``min(n, n')`` are unmatched.

    Args:
        clean: boxes ``[n, 4]`` (xyxy) predicted without dropout.
        dropout: boxes ``[n', 4]`` (xyxy) predicted with dropout active.
        labels_clean: class labels ``[n]`` of ``clean``; with ``labels_dropout``, matching is class-aware.
        labels_dropout: class labels ``[n']`` of ``dropout``.
        empty: what to do when exactly one set is empty: ``"skip"`` (the paper's convention; score
            None) or ``"zero"`` (score 0: every box vanished or appeared). Two empty sets are always
            skipped.

    Returns:
        The score in [0, 1] (None when skipped) with ``n``, ``n'`` and the matched/unmatched counts.

    Raises:
        DiagnosticsError: when ``empty`` is neither ``"skip"`` nor ``"zero"``.
    """
    if empty not in ("skip", "zero"):
        raise DiagnosticsError(f"unknown empty-set policy '{empty}'; use 'skip' or 'zero'")
    m = match_boxes(clean, dropout, labels_clean, labels_dropout)
    if m.n_a == 0 or m.n_b == 0:
        score = 0.0 if (empty == "zero" and m.n_a + m.n_b > 0) else None
        return ImageStability(score, m.n_a, m.n_b, 0, m.unmatched)
    score = float(m.iou.sum() / min(m.n_a, m.n_b))
    return ImageStability(score, m.n_a, m.n_b, len(m.rows), m.unmatched)


# ----------------------------------------------------------------------------- average precision
def average_precision(recall: np.ndarray, precision: np.ndarray) -> float:
    """All-point interpolated AP (PASCAL VOC 2010+): ``sum_k (r_k - r_{k-1}) max_{r >= r_k} p(r)``.

    Args:
        recall: cumulative recall ``TP_k / #ground truth`` ``[K]`` over detections sorted by descending score.
        precision: cumulative precision ``TP_k / k`` ``[K]``, aligned with ``recall``.

    Returns:
        AP in [0, 1] (0 for empty inputs).
    """
    r = np.concatenate([[0.0], np.asarray(recall, dtype=np.float64), [1.0]])
    p = np.concatenate([[0.0], np.asarray(precision, dtype=np.float64), [0.0]])
    p = np.maximum.accumulate(p[::-1])[::-1]  # precision envelope
    steps = np.nonzero(r[1:] != r[:-1])[0]
    return float(np.sum((r[steps + 1] - r[steps]) * p[steps + 1]))


def _as_list(x: Sequence[Mapping[str, torch.Tensor]], what: str) -> list[Mapping[str, torch.Tensor]]:
    out = list(x)
    for i, d in enumerate(out):
        if not isinstance(d, Mapping) or "boxes" not in d:
            raise DiagnosticsError(f"{what} {i} is not a dict with 'boxes'")
    return out


def class_average_precision(
    detections: Sequence[Mapping[str, torch.Tensor]],
    ground_truth: Sequence[Mapping[str, torch.Tensor]],
    label: int | None = None,
    iou_threshold: float = 0.5,
) -> float | None:
    """AP of one class (or of all boxes when ``label`` is None) at ``iou_threshold``.

    Detections over all images are sorted by score; each is a true positive when its best-IoU
    unclaimed ground-truth box of the same image (and class) has ``IoU >= iou_threshold``
    (greedy, highest score first, as in PASCAL VOC / COCO), otherwise a false positive.
    ``precision = TP / (TP + FP)``, ``recall = TP / #ground truth``; AP by :func:`average_precision`.

    Returns:
        AP in [0, 1], or None when the class has no ground-truth box.
    """
    dets = _as_list(detections, "detection")
    gts = _as_list(ground_truth, "ground truth")
    if len(dets) != len(gts):
        raise DiagnosticsError(f"{len(dets)} detection sets for {len(gts)} ground-truth sets; they must match")
    scored: list[tuple[float, int, int]] = []  # (score, image, det index)
    gt_boxes: list[torch.Tensor] = []
    n_gt = 0
    det_boxes: list[torch.Tensor] = []
    for i, (d, g) in enumerate(zip(dets, gts)):
        gb = g["boxes"].reshape(-1, 4)
        db = d["boxes"].reshape(-1, 4)
        ds = d.get("scores")
        ds = torch.ones(db.shape[0]) if ds is None else ds.reshape(-1)
        if label is not None:
            gl, dl = g.get("labels"), d.get("labels")
            if gl is None or dl is None:
                raise DiagnosticsError("per-class AP needs 'labels' in detections and ground truth")
            gb = gb[gl.reshape(-1).cpu() == label]
            keep = dl.reshape(-1).cpu() == label
            db, ds = db[keep], ds[keep]
        gt_boxes.append(gb.detach().cpu())
        det_boxes.append(db.detach().cpu())
        n_gt += int(gb.shape[0])
        scored.extend((float(s), i, k) for k, s in enumerate(ds.detach().cpu().tolist()))
    if n_gt == 0:
        return None
    if not scored:
        return 0.0
    scored.sort(key=lambda t: (-t[0], t[1], t[2]))
    claimed = [torch.zeros(int(g.shape[0]), dtype=torch.bool) for g in gt_boxes]
    ious = [box_iou(d, g) if d.shape[0] and g.shape[0] else None for d, g in zip(det_boxes, gt_boxes)]
    tp = np.zeros(len(scored))
    for rank, (_, i, k) in enumerate(scored):
        if ious[i] is None:
            continue
        row = ious[i][k].clone()
        row[claimed[i]] = -1.0
        j = int(torch.argmax(row))
        if float(row[j]) >= iou_threshold:
            claimed[i][j] = True
            tp[rank] = 1.0
    ctp = np.cumsum(tp)
    precision = ctp / np.arange(1, len(scored) + 1)
    recall = ctp / n_gt
    return average_precision(recall, precision)


def mean_average_precision(
    detections: Sequence[Mapping[str, torch.Tensor]],
    ground_truth: Sequence[Mapping[str, torch.Tensor]],
    iou_threshold: float = 0.5,
    class_aware: bool = True,
) -> float:
    """Mean average precision (mAP) at ``iou_threshold`` over the classes that have ground-truth boxes.

    The mean of :func:`class_average_precision` over those classes; a single class-agnostic AP when
    ``class_aware`` is False or any detection or ground-truth dict lacks ``labels``.

    Args:
        detections: one dict per image with ``boxes [K, 4]`` (xyxy), optional ``scores [K]`` (all 1 when
            absent) and ``labels [K]``.
        ground_truth: one dict per image, aligned with ``detections``, with ``boxes [G, 4]`` and ``labels [G]``.
        iou_threshold: minimum IoU for a detection to count as a true positive.
        class_aware: average per-class APs (True) or pool all boxes into one class (False).

    Returns:
        mAP in [0, 1].

    Raises:
        DiagnosticsError: when the ground truth holds no boxes, an entry is not a dict with ``boxes``, or
            the numbers of detection and ground-truth sets differ.
    """
    gts = _as_list(ground_truth, "ground truth")
    has_labels = all("labels" in g for g in gts) and all("labels" in d for d in detections)
    if not (class_aware and has_labels):
        ap = class_average_precision(detections, gts, None, iou_threshold)
        if ap is None:
            raise DiagnosticsError("mAP is undefined: the ground truth holds no boxes")
        return ap
    classes = sorted({int(c) for g in gts for c in g["labels"].reshape(-1).tolist()})
    aps = [class_average_precision(detections, gts, c, iou_threshold) for c in classes]
    aps = [a for a in aps if a is not None]
    if not aps:
        raise DiagnosticsError("mAP is undefined: the ground truth holds no boxes")
    return float(np.mean(aps))
