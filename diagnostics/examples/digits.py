"""scikit-learn's digits (1,797 8x8 images, shipped with scikit-learn, loaded offline) and small models.

These factories are trusted: a checkpoint written by the demo may name them and ``diag`` imports them
without flags. Data is standardised with the training split's statistics; the split is fixed (seed 0).

* :func:`train_data` / :func:`test_data`: ``(inputs [N, 64] float32, targets [N] int64)``.
* :func:`build_mlp`: ``64 -> width (x depth) -> 10`` with tanh (smooth, as in Cohen et al. 2021).
* :func:`build_cnn`: a small conv net on the 8x8 images (1 channel) with BatchNorm.
* :func:`train_gd`: full-batch gradient descent, saving self-describing checkpoints.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

from diagnostics.binding import LOSSES
from diagnostics.checkpoint import save_checkpoint

N_TEST = 360


@lru_cache(maxsize=1)
def _arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    X = bunch.data.astype(np.float64)
    y = bunch.target.astype(np.int64)
    perm = np.random.default_rng(0).permutation(len(y))
    test, train = perm[:N_TEST], perm[N_TEST:]
    mean = X[train].mean(0)
    std = X[train].std(0) + 1.0  # +1: several border pixels are constant
    X = (X - mean) / std
    return X[train], y[train], X[test], y[test]


def train_data(n: int | None = None, image: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The training split (1,437 samples): ``(X [N, 64] or [N, 1, 8, 8] if image, y [N])``."""
    X, y, _, _ = _arrays()
    if n is not None:
        X, y = X[:n], y[:n]
    Xt = torch.tensor(X, dtype=torch.float32)
    return (Xt.reshape(-1, 1, 8, 8) if image else Xt), torch.tensor(y)


def test_data(n: int | None = None, image: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The held-out split (360 samples)."""
    _, _, X, y = _arrays()
    if n is not None:
        X, y = X[:n], y[:n]
    Xt = torch.tensor(X, dtype=torch.float32)
    return (Xt.reshape(-1, 1, 8, 8) if image else Xt), torch.tensor(y)


def train_loader(batch_size: int = 256, n: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The training split as a list of batches (the last one ragged)."""
    X, y = train_data(n)
    return [(X[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(y), batch_size)]


class MLP(nn.Module):
    """``64 -> width -> ... -> 10`` with tanh; ``features`` is the penultimate representation."""

    def __init__(self, width: int = 32, depth: int = 2, in_dim: int = 64, classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        d = in_dim
        for _ in range(depth):
            layers += [nn.Linear(d, width), nn.Tanh()]
            d = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, classes]`` of inputs ``[N, 64]`` (or any ``[N, ...]`` that flattens to ``in_dim``)."""
        return self.head(self.features(x.flatten(1)))


def build_mlp(width: int = 32, depth: int = 2, seed: int = 0) -> MLP:
    """A tanh MLP for digits with a seeded initialisation."""
    torch.manual_seed(seed)
    return MLP(width=width, depth=depth)


class CNN(nn.Module):
    """conv(1->c) BN ReLU conv(c->2c) BN ReLU pool -> features [2c] -> head [10]."""

    def __init__(self, channels: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, 2 * channels, 3, padding=1),
            nn.BatchNorm2d(2 * channels),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(2 * channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, classes]`` of images ``[N, 1, 8, 8]`` (flat ``[N, 64]`` inputs are reshaped)."""
        if x.dim() == 2:
            x = x.reshape(-1, 1, 8, 8)
        return self.head(self.features(x))


def build_cnn(channels: int = 8, seed: int = 0) -> CNN:
    """A small BatchNorm CNN for digits, initialised after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    return CNN(channels=channels)


def gd_steps(model: nn.Module, opt: torch.optim.Optimizer, steps: int, loss: str = "mse") -> Iterator[int]:
    """Full-batch training on the digits training split: yields ``step`` (0 to ``steps``) *before* the
    update of that step, so the caller sees the weights after ``step`` updates; the last yield is ``steps``.

    Args:
        model: the MLP (or CNN with ``image`` data shapes it accepts) being trained in place.
        opt: its optimizer.
        steps: number of updates.
        loss: a name of :data:`diagnostics.binding.LOSSES`.
    """
    X, y = train_data()
    loss_fn = LOSSES[loss]
    for step in range(steps + 1):
        yield step
        if step == steps:
            return
        opt.zero_grad()
        loss_fn(model(X), y).backward()
        opt.step()


def trained_mlp(width: int = 32, steps: int = 500, lr: float = 2.0, depth: int = 2, seed: int = 0) -> MLP:
    """A digits MLP after ``steps`` full-batch GD steps (MSE, learning rate ``lr``), in eval mode, in memory."""
    model = build_mlp(width=width, depth=depth, seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in gd_steps(model, opt, steps):
        pass
    return model.eval()


def train_gd(
    out_dir: str | Path,
    *,
    lr: float = 0.1,
    steps: int = 2000,
    save_every: int = 200,
    loss: str = "mse",
    width: int = 32,
    depth: int = 2,
    seed: int = 0,
    momentum: float = 0.0,
    save_steps: Sequence[int] | None = None,
) -> list[Path]:
    """Full-batch gradient descent on the digits training split, saving self-describing checkpoints.

    Returns the checkpoint paths ``out_dir/step_XXXXX.pt`` (step 0 included).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = build_mlp(width=width, depth=depth, seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    wanted = set(save_steps) if save_steps is not None else set(range(0, steps + 1, save_every))
    paths = []
    for step in gd_steps(model, opt, steps, loss):
        if step in wanted:
            p = out / f"step_{step:05d}.pt"
            save_checkpoint(
                p,
                model,
                step=step,
                optimizer=opt,
                model_factory="diagnostics.examples.digits:build_mlp",
                model_kwargs={"width": width, "depth": depth},
                data_factory="diagnostics.examples.digits:train_data",
                loss=loss,
            )
            paths.append(p)
    return paths
