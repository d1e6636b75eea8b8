"""Tiny factories for tests (importable as ``tinymodels`` because pytest puts tests/ on sys.path)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Tiny(nn.Module):
    def __init__(self, d_in: int = 4, hidden: int = 5, classes: int = 3) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def build_tiny(hidden: int = 5, seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    return Tiny(hidden=hidden)


class SqrtAtZero(Tiny):
    """Tiny with ``sqrt(offset)`` added to the logits, ``offset = 0``: the loss is finite, its derivatives are not."""

    def __init__(self) -> None:
        super().__init__()
        self.offset = nn.Parameter(torch.zeros(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + torch.sqrt(self.offset)


def build_sqrt_at_zero() -> SqrtAtZero:
    torch.manual_seed(0)
    return SqrtAtZero()


def tiny_data(n: int = 23) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    X = torch.randn(n, 4, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return X, y


def tiny_loader(batch: int = 5) -> list[tuple[torch.Tensor, torch.Tensor]]:
    X, y = tiny_data()
    return [(X[i : i + batch], y[i : i + batch]) for i in range(0, len(y), batch)]


class ShuffledLoader:
    """Re-iterable data that reshuffles every pass (like DataLoader(shuffle=True))."""

    def __init__(self) -> None:
        self.passes = 0

    def __iter__(self):
        X, y = tiny_data()
        g = torch.Generator().manual_seed(self.passes)
        self.passes += 1
        perm = torch.randperm(len(y), generator=g)
        X, y = X[perm], y[perm]
        return iter([(X[i : i + 8], y[i : i + 8]) for i in range(0, len(y), 8)])


def shuffled_loader() -> ShuffledLoader:
    return ShuffledLoader()


def inputs_only() -> torch.Tensor:
    return tiny_data()[0]


def empty_data() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)


def nan_data() -> tuple[torch.Tensor, torch.Tensor]:
    X, y = tiny_data()
    X[3, 1] = float("nan")
    return X, y


def raising_data():
    raise ValueError("the data server is down")


class NoisyTiny(Tiny):
    """Applies dropout with training=True inside forward: random even in eval mode."""

    def __init__(self) -> None:
        super().__init__()
        self.noise = _AlwaysDropout()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.noise(torch.tanh(self.fc1(x))))


class _AlwaysDropout(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, 0.5, training=True)


def build_noisy() -> NoisyTiny:
    torch.manual_seed(0)
    return NoisyTiny()


class StuckTraining(Tiny):
    """Overrides train() so that eval() leaves it in training mode."""

    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.5)

    def train(self, mode: bool = True):
        return super().train(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(torch.tanh(self.fc1(x))))


def build_stuck() -> StuckTraining:
    torch.manual_seed(0)
    return StuckTraining()


class BNNoStats(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 5)
        self.bn = nn.BatchNorm1d(5, track_running_stats=False)
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.bn(self.fc1(x))))


def build_bn_nostats() -> BNNoStats:
    torch.manual_seed(0)
    return BNNoStats()


def build_not_a_module() -> str:
    return "a string"


def build_raises():
    raise RuntimeError("CUDA out of memory in the factory")


def sum_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """A custom loss callable: mean squared logit plus cross-entropy."""
    return F.cross_entropy(outputs, targets) + 0.1 * (outputs**2).mean()


class Vector(nn.Module):
    """A model whose output is its only parameter ``v`` (the loss is then any function of ``v``)."""

    def __init__(self, v: torch.Tensor) -> None:
        super().__init__()
        self.v = nn.Parameter(v.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.v


def model_context(model: nn.Module, X: torch.Tensor, y: torch.Tensor | None, name: str = "model", batch: int = 0):
    """A float64 cross-entropy :class:`~diagnostics.context.Context` of ``model`` on ``(X, y)``, in batches of
    ``batch`` (0: one batch; the last one ragged)."""
    from diagnostics.binding import LOSSES
    from diagnostics.context import Context

    model = model.eval()
    batches = (
        [(X, y)]
        if not batch
        else [(X[i : i + batch], None if y is None else y[i : i + batch]) for i in range(0, len(X), batch)]
    )
    return Context(
        model=model,
        params={n: p.detach() for n, p in model.named_parameters()},
        frozen={n: b.detach() for n, b in model.named_buffers()},
        batches=batches,
        loss_fn=LOSSES["cross_entropy"],
        device=torch.device("cpu"),
        dtype=torch.float64,
        checkpoint=name,
        loss_name="cross_entropy",
    )


def tiny_context(
    batches, loss="cross_entropy", model: nn.Module | None = None, seed: int = 0, dtype: torch.dtype = torch.float64
):
    """A :class:`~diagnostics.context.Context` of :class:`Tiny` (or ``model``) in ``dtype`` on ``batches``;
    ``loss`` is a name of ``LOSSES`` or a callable ``fn(outputs, targets)`` (named ``custom``)."""
    from diagnostics.binding import LOSSES
    from diagnostics.context import Context

    model = (model or build_tiny()).to(dtype).eval()
    return Context(
        model=model,
        params={n: p.detach() for n, p in model.named_parameters()},
        frozen={},
        batches=batches,
        loss_fn=LOSSES[loss] if isinstance(loss, str) else loss,
        device=torch.device("cpu"),
        dtype=dtype,
        loss_name=loss if isinstance(loss, str) else "custom",
        seed=seed,
    )


def spectrum_matrix(eigs: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """``Q diag(eigs) Q^T`` in float64 with a seeded random orthogonal ``Q``: a designed symmetric operator."""
    n = eigs.numel()
    Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)))
    return Q @ torch.diag(eigs.double()) @ Q.T
