"""Modular addition ``(a + b) mod p`` and a small MLP that groks it (Power et al. 2022), made in code.

These factories are trusted: a checkpoint written by :func:`train` names them and ``diag`` imports them
without flags. The data is every pair ``(a, b)`` with ``0 <= a, b < p``, split once at random (seed
``split_seed``) into a training fraction and the validation rest, so every call gives the same split.

* :func:`train_data` / :func:`val_data`: ``(inputs [N, 2] int64, targets [N] int64)``.
* :func:`build_model`: learned embeddings of ``a`` and ``b`` (one table), concatenated, one ReLU hidden layer,
  a linear read-out to ``p`` classes.
* :func:`train`: full-batch AdamW with weight decay, checkpoints every ``save_every`` steps with the training
  and validation accuracy and loss in their metadata (``save_checkpoint(..., extra=...)``).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from diagnostics.checkpoint import save_checkpoint

P = 59
FRACTION = 0.4
SPLIT_SEED = 0


@lru_cache(maxsize=8)
def _split(p: int, fraction: float, split_seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if p < 2 or not 0 < fraction < 1:
        raise ValueError(f"need p >= 2 and 0 < fraction < 1, got p={p}, fraction={fraction}")
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    x = torch.stack([a.reshape(-1), b.reshape(-1)], 1)
    y = (x[:, 0] + x[:, 1]) % p
    perm = torch.randperm(p * p, generator=torch.Generator().manual_seed(split_seed))
    n_train = round(fraction * p * p)
    train, val = perm[:n_train].sort().values, perm[n_train:].sort().values
    return x[train], y[train], x[val], y[val]


def train_data(
    p: int = P, fraction: float = FRACTION, split_seed: int = SPLIT_SEED
) -> tuple[torch.Tensor, torch.Tensor]:
    """The training pairs: ``(x [N, 2] = (a, b), y [N] = (a + b) mod p)``, ``N = round(fraction p^2)``."""
    x, y, _, _ = _split(p, fraction, split_seed)
    return x.clone(), y.clone()


def val_data(p: int = P, fraction: float = FRACTION, split_seed: int = SPLIT_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """The held-out pairs (the other ``p^2 - N``)."""
    _, _, x, y = _split(p, fraction, split_seed)
    return x.clone(), y.clone()


class ModAddMLP(nn.Module):
    """``(a, b) -> [E a, E b] -> Linear -> ReLU -> Linear -> p logits`` (one embedding table ``E``)."""

    def __init__(self, p: int = P, dim: int = 32, hidden: int = 128) -> None:
        super().__init__()
        self.embed = nn.Embedding(p, dim)
        self.hidden = nn.Linear(2 * dim, hidden)
        self.act = nn.ReLU()
        self.head = nn.Linear(hidden, p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.hidden(self.embed(x).flatten(1))))


def build_model(p: int = P, dim: int = 32, hidden: int = 128, seed: int = 0) -> ModAddMLP:
    """The MLP with a seeded initialisation (PyTorch's defaults)."""
    torch.manual_seed(seed)
    return ModAddMLP(p=p, dim=dim, hidden=hidden)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """``(accuracy, mean cross-entropy)`` of ``model`` on ``(x, y)``."""
    out = model(x)
    return float((out.argmax(1) == y).double().mean()), float(F.cross_entropy(out, y))


def train(
    out_dir: str | Path,
    *,
    p: int = P,
    fraction: float = FRACTION,
    dim: int = 32,
    hidden: int = 128,
    steps: int = 2500,
    save_every: int = 100,
    lr: float = 5e-3,
    weight_decay: float = 1.0,
    betas: tuple[float, float] = (0.9, 0.98),
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> list[Path]:
    """Full-batch AdamW on the training pairs; a checkpoint ``out_dir/step_XXXXX.pt`` every ``save_every`` steps.

    Each checkpoint's metadata holds ``train_accuracy``, ``val_accuracy``, ``train_loss`` and ``val_loss`` at
    that step, and the factories that rebuild the model and the training data.

    Returns:
        The checkpoint paths (step 0 and the last step included).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = build_model(p=p, dim=dim, hidden=hidden, seed=seed)
    x, y = train_data(p, fraction)
    xv, yv = val_data(p, fraction)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=betas)
    data_kwargs: dict[str, Any] = {"p": p, "fraction": fraction}
    paths = []
    for step in range(steps + 1):
        if step % save_every == 0 or step == steps:
            model.eval()
            train_acc, train_loss = evaluate(model, x, y)
            val_acc, val_loss = evaluate(model, xv, yv)
            model.train()
            path = save_checkpoint(
                out / f"step_{step:05d}.pt",
                model,
                step=step,
                optimizer=opt,
                model_factory="diagnostics.examples.grokking:build_model",
                model_kwargs={"p": p, "dim": dim, "hidden": hidden},
                data_factory="diagnostics.examples.grokking:train_data",
                data_kwargs=data_kwargs,
                loss="cross_entropy",
                extra={
                    "train_accuracy": train_acc,
                    "val_accuracy": val_acc,
                    "train_loss": train_loss,
                    "val_loss": val_loss,
                },
            )
            paths.append(path)
            if log is not None:
                log(f"step {step:5d}: train acc {train_acc:.3f} loss {train_loss:.3g}, val acc {val_acc:.3f}")
        if step == steps:
            break
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return paths
