"""A tiny single-class object detector trained on synthetic images (no downloads, no torchvision).

These factories are trusted: a checkpoint written by the example may name them and ``diag`` imports
them without flags.

* Images: ``[3, 32, 32]`` float tensors, a noisy grey background with 1-3 bright axis-aligned
  rectangles (6-14 px, non-overlapping) of random tint; the targets are torchvision-style dicts
  ``{'boxes' [K, 4] xyxy, 'labels' [K]}`` (label 1 = "rectangle").
* :func:`make_images`: a seeded set, optionally degraded by Gaussian noise, box blur or lowered contrast.
* :func:`build_detector`: a CenterNet-style detector (Zhou et al. 2019, "Objects as Points"): a
  conv backbone (``backbone.layer1`` stride 2, ``backbone.layer2`` stride 4, with BatchNorm) and a
  head predicting a centre heat map, a sub-cell offset and the log box size on the 8x8 grid. In
  eval mode ``model(images)`` returns, like torchvision detectors, one dict per image with
  ``boxes`` (xyxy, pixels), ``scores`` (descending) and ``labels``.
* :func:`train_detector`: Adam on the centre focal loss + L1 box regression; a few seconds on a CPU.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from diagnostics.checkpoint import save_checkpoint

IMAGE_SIZE = 32
STRIDE = 4
SIZE_SCALE = 8.0  # box sizes are predicted as log(size / SIZE_SCALE)
LABEL = 1


# ------------------------------------------------------------------------------------ data
def _place_boxes(gen: torch.Generator, max_objects: int) -> torch.Tensor:
    """1..max_objects non-overlapping boxes (xyxy, integer pixels) whose centres fall in distinct cells."""
    n = int(torch.randint(1, max_objects + 1, (1,), generator=gen))
    boxes: list[list[float]] = []
    cells: set[tuple[int, int]] = set()
    for _ in range(50 * n):
        if len(boxes) == n:
            break
        w, h = (int(v) for v in torch.randint(6, 15, (2,), generator=gen))
        x1 = int(torch.randint(0, IMAGE_SIZE - w + 1, (1,), generator=gen))
        y1 = int(torch.randint(0, IMAGE_SIZE - h + 1, (1,), generator=gen))
        cand = [x1, y1, x1 + w, y1 + h]
        cell = (int((x1 + w / 2) // STRIDE), int((y1 + h / 2) // STRIDE))
        overlap = any(
            cand[0] < b[2] + 1 and b[0] < cand[2] + 1 and cand[1] < b[3] + 1 and b[1] < cand[3] + 1 for b in boxes
        )
        if overlap or cell in cells:
            continue
        boxes.append([float(v) for v in cand])
        cells.add(cell)
    return torch.tensor(boxes, dtype=torch.float32)


def _blur(img: torch.Tensor, size: int) -> torch.Tensor:
    if size <= 1:
        return img
    kernel = torch.full((3, 1, size, size), 1.0 / (size * size))
    pad = size // 2
    out = F.conv2d(F.pad(img[None], (pad, size - 1 - pad, pad, size - 1 - pad), mode="replicate"), kernel, groups=3)
    return out[0]


def make_images(
    n: int = 64,
    seed: int = 1,
    noise: float = 0.0,
    blur: int = 0,
    contrast: float = 1.0,
    max_objects: int = 3,
) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """``n`` seeded synthetic images and their targets, optionally degraded.

    Args:
        n: number of images.
        seed: seed of the CPU generator that draws boxes, tints and noise (same seed -> same images).
        noise: std of extra Gaussian pixel noise (the clean images already carry std 0.05).
        blur: side of a box-blur kernel (0 or 1 = none).
        contrast: rectangles' brightness above the background is multiplied by this.
        max_objects: at most this many non-overlapping rectangles per image (the count is drawn
            uniformly from ``1..max_objects``), all of class ``LABEL``.

    Returns:
        ``(images, targets)``: a list of ``[3, 32, 32]`` float32 tensors and a list of
        ``{'boxes' [K, 4] xyxy, 'labels' [K] int64}``.
    """
    gen = torch.Generator().manual_seed(int(seed))
    images, targets = [], []
    for _ in range(n):
        boxes = _place_boxes(gen, max_objects)
        img = torch.full((3, IMAGE_SIZE, IMAGE_SIZE), 0.2)
        for b in boxes.tolist():
            x1, y1, x2, y2 = (int(v) for v in b)
            tint = 0.5 + 0.5 * torch.rand(3, 1, 1, generator=gen)
            img[:, y1:y2, x1:x2] = 0.2 + contrast * 0.8 * tint
        img = img + 0.05 * torch.randn(img.shape, generator=gen)
        img = _blur(img, blur)
        if noise > 0:
            img = img + noise * torch.randn(img.shape, generator=gen)
        images.append(img)
        targets.append({"boxes": boxes, "labels": torch.full((len(boxes),), LABEL, dtype=torch.int64)})
    return images, targets


def train_images(n: int = 512, seed: int = 0) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """The training set: ``n`` clean images (seed 0)."""
    return make_images(n, seed=seed)


def test_images(
    n: int = 64, seed: int = 1, noise: float = 0.0, blur: int = 0, contrast: float = 1.0
) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """A test set (seed 1 by default, disjoint draws from training), optionally degraded."""
    return make_images(n, seed=seed, noise=noise, blur=blur, contrast=contrast)


# ----------------------------------------------------------------------------------- model
def _conv(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class Backbone(nn.Module):
    """``layer1``: 3 -> c at stride 2; ``layer2``: c -> 2c at stride 4."""

    def __init__(self, channels: int = 8) -> None:
        super().__init__()
        self.layer1 = nn.Sequential(*_conv(3, channels), *_conv(channels, channels, 2))
        self.layer2 = nn.Sequential(*_conv(channels, 2 * channels, 2), *_conv(2 * channels, 2 * channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features ``[N, 2c, H/4, W/4]`` of images ``x`` ``[N, 3, H, W]``."""
        return self.layer2(self.layer1(x))


class TinyDetector(nn.Module):
    """CenterNet-style single-class detector on 32x32 images (8x8 output grid).

    ``forward(images)`` takes a list of ``[3, H, W]`` images or an ``[N, 3, H, W]`` tensor. In training
    mode it returns the raw ``[N, 5, H/4, W/4]`` map (heat logit, offset x/y logits, log w/h); in eval
    mode the decoded detections (see :meth:`decode`).
    """

    def __init__(self, channels: int = 8, max_detections: int = 20, min_score: float = 0.01) -> None:
        super().__init__()
        self.backbone = Backbone(channels)
        c = 2 * channels
        self.head = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, 5, 1))
        self.max_detections = max_detections
        self.min_score = min_score
        with torch.no_grad():  # start with a low heat everywhere (focal-loss prior, as in CenterNet)
            self.head[-1].bias[0] = -2.19

    def raw(self, images: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """The raw head output ``[N, 5, H/4, W/4]`` (heat logit, offset x/y logits, log w/h), in any mode."""
        x = torch.stack(list(images)) if isinstance(images, (list, tuple)) else images
        return self.head(self.backbone(x))

    def forward(self, images: torch.Tensor | list[torch.Tensor]) -> torch.Tensor | list[dict[str, torch.Tensor]]:
        """The raw map (:meth:`raw`) in training mode, the decoded detections (:meth:`decode`) in eval mode."""
        out = self.raw(images)
        return out if self.training else self.decode(out)

    def decode(self, out: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Raw map -> per image the ``max_detections`` strongest local maxima of the heat map (3x3 peak
        suppression) with score >= ``min_score``, as ``{'boxes', 'scores', 'labels'}``."""
        heat = torch.sigmoid(out[:, 0])
        peaks = heat == F.max_pool2d(heat[:, None], 3, stride=1, padding=1)[:, 0]
        score_map = torch.where(peaks, heat, torch.zeros_like(heat))
        n, gh, gw = heat.shape
        ys, xs = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
        ys, xs = ys.to(out.device, out.dtype), xs.to(out.device, out.dtype)
        cx = (xs + torch.sigmoid(out[:, 1])) * STRIDE
        cy = (ys + torch.sigmoid(out[:, 2])) * STRIDE
        w = torch.exp(out[:, 3].clamp(max=4.0)) * SIZE_SCALE
        h = torch.exp(out[:, 4].clamp(max=4.0)) * SIZE_SCALE
        boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1).reshape(n, -1, 4)
        flat = score_map.reshape(n, -1)
        k = min(self.max_detections, flat.shape[1])
        top, idx = flat.topk(k, dim=1)
        dets = []
        for i in range(n):
            keep = top[i] >= self.min_score
            sel = idx[i][keep]
            dets.append(
                {
                    "boxes": boxes[i, sel],
                    "scores": top[i][keep],
                    "labels": torch.full((int(keep.sum()),), LABEL, dtype=torch.int64, device=out.device),
                }
            )
        return dets


def build_detector(channels: int = 8, seed: int = 0) -> TinyDetector:
    """A :class:`TinyDetector` with a seeded initialisation."""
    torch.manual_seed(seed)
    return TinyDetector(channels=channels)


# -------------------------------------------------------------------------------- training
def _targets_map(targets: list[dict[str, torch.Tensor]], grid: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Targets -> (Gaussian centre heat [N, g, g], regression targets [N, 4, g, g], centre mask [N, g, g])."""
    n = len(targets)
    heat = torch.zeros(n, grid, grid)
    reg = torch.zeros(n, 4, grid, grid)
    mask = torch.zeros(n, grid, grid, dtype=torch.bool)
    ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    for i, t in enumerate(targets):
        for x1, y1, x2, y2 in t["boxes"].tolist():
            cx, cy = (x1 + x2) / 2 / STRIDE, (y1 + y2) / 2 / STRIDE
            gx, gy = min(int(cx), grid - 1), min(int(cy), grid - 1)
            g = torch.exp(-((xs - gx) ** 2 + (ys - gy) ** 2) / (2 * 0.8**2))
            heat[i] = torch.maximum(heat[i], g)
            mask[i, gy, gx] = True
            off = torch.tensor([cx - gx, cy - gy]).clamp(1e-3, 1 - 1e-3)
            reg[i, :2, gy, gx] = torch.log(off / (1 - off))  # logit of the sub-cell offset
            reg[i, 2, gy, gx] = torch.log(torch.tensor((x2 - x1) / SIZE_SCALE))
            reg[i, 3, gy, gx] = torch.log(torch.tensor((y2 - y1) / SIZE_SCALE))
    return heat, reg, mask


def detection_loss(out: torch.Tensor, heat: torch.Tensor, reg: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """CenterNet penalty-reduced focal loss on the heat map + L1 on offsets and log sizes at centres."""
    logit = out[:, 0]
    p = torch.sigmoid(logit).clamp(1e-4, 1 - 1e-4)
    pos = mask.float()
    neg = (1 - pos) * (1 - heat) ** 4
    focal = -(pos * (1 - p) ** 2 * torch.log(p) + neg * p**2 * torch.log(1 - p)).sum() / pos.sum().clamp(min=1)
    box = (out[:, 1:] - reg).abs().sum(1)
    return focal + (box * pos).sum() / pos.sum().clamp(min=1)


def train_detector(
    steps: int = 150,
    n_train: int = 512,
    batch_size: int = 32,
    lr: float = 3e-3,
    channels: int = 8,
    seed: int = 0,
    out: str | Path | None = None,
) -> TinyDetector:
    """Train :func:`build_detector` with Adam on :func:`train_images`; returns it in eval mode.

    With ``out`` the model is also saved as a self-describing checkpoint naming
    ``diagnostics.examples.detector:build_detector`` and ``:test_images`` (so ``diag bos out`` works).
    """
    model = build_detector(channels=channels, seed=seed)
    images, targets = train_images(n_train, seed=seed)
    x = torch.stack(images)
    heat, reg, mask = _targets_map(targets, IMAGE_SIZE // STRIDE)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(images), (batch_size,), generator=gen)
        batch = x[idx]
        flip = torch.rand(batch_size, generator=gen) < 0.5  # horizontal flips: boxes flip with them
        loss = detection_loss(
            model.raw(torch.where(flip[:, None, None, None], batch.flip(-1), batch)),
            *_flip(heat[idx], reg[idx], mask[idx], flip),
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    if out is not None:
        save_checkpoint(
            out,
            model,
            step=steps,
            optimizer=opt,
            model_factory="diagnostics.examples.detector:build_detector",
            model_kwargs={"channels": channels},
            data_factory="diagnostics.examples.detector:test_images",
            save_optimizer_state=False,
        )
    return model


def _flip(
    heat: torch.Tensor, reg: torch.Tensor, mask: torch.Tensor, flip: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mirror the target maps of the flipped samples (offset x becomes 1 - offset: logit negates)."""
    f3 = flip[:, None, None]
    heat = torch.where(f3, heat.flip(-1), heat)
    mask = torch.where(f3, mask.flip(-1), mask)
    rf = reg.flip(-1).clone()
    rf[:, 0] = -rf[:, 0]
    reg = torch.where(flip[:, None, None, None], rf, reg)
    return heat, reg, mask
