"""Edge-of-stability thresholds from optimizer metadata (Cohen et al. 2021, 2022).

* Gradient descent with step size ``eta``: sharpness ``lambda_max`` rises to and hovers near ``2/eta``.
* Heavy-ball momentum ``beta``: ``(2 + 2 beta) / eta``.
* Nesterov momentum ``beta``: ``(2 + 2 beta) / ((1 + 2 beta) eta)``.
* Adam (``beta1``): the *preconditioned* sharpness ``lambda_max(P^-1 H)`` hovers near
  ``(2 + 2 beta1) / ((1 - beta1) eta)`` (= 38/eta for beta1 = 0.9); the raw Hessian has no such threshold.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class EosThreshold:
    """An edge-of-stability sharpness threshold and the rule that produced it.

    Attributes:
        value: the threshold on ``lambda_max`` (units of 1/lr; e.g. ``2/eta`` for gradient descent).
        kind: ``"gd"``, ``"heavy_ball"``, ``"nesterov"`` or ``"adam_preconditioned"`` (the last applies to
            the preconditioned sharpness ``lambda_max(P^-1 H)``, not the raw Hessian).
        rule: the formula as text, e.g. ``"(2+2*beta)/lr"``.
    """

    value: float
    kind: str  # "gd", "heavy_ball", "nesterov", "adam_preconditioned"
    rule: str


def usable_lr(lr: float | None) -> bool:
    """Whether ``lr`` is a step size a threshold can be computed from: a finite number above 0."""
    return lr is not None and math.isfinite(lr) and lr > 0


def lr_note(lr: float | None) -> str | None:
    """Why ``lr`` gives no edge-of-stability threshold (None when it does).

    Unknown (None), 0 (the end of a decaying schedule), not a number or infinite (corrupt metadata), or
    negative (not a step size): each says so and names ``--lr``.
    """
    if usable_lr(lr):
        return None
    if lr is None:
        return "learning rate unknown (pass --lr): no edge-of-stability threshold"
    if lr == 0:
        return (
            f"learning rate {lr} at this checkpoint (the end of a decaying schedule?): no edge-of-stability "
            "threshold; pass --lr to measure against another step size"
        )
    what = "not a finite number" if not math.isfinite(lr) else "negative, not a step size"
    return f"the checkpoint's learning rate is {lr} ({what}): no edge-of-stability threshold; pass --lr"


def invalid_lr_notes(lr: float | None) -> list[str]:
    """The :func:`lr_note` as a user-facing note when ``lr`` is corrupt (NaN, inf, negative); an unknown
    learning rate or 0 (a schedule's end) is not news and stays in the ``eos`` metadata only."""
    if lr is None or usable_lr(lr) or lr == 0:
        return []
    return [str(lr_note(lr))]


def lr_info(lr: float | None) -> dict[str, Any]:
    """The ``eos`` metadata's start: the learning rate (a non-finite one as text, JSON has no such number) and,
    when it gives no threshold, the :func:`lr_note` saying why."""
    info: dict[str, Any] = {"lr": lr if lr is None or math.isfinite(lr) else str(lr)}
    note = lr_note(lr)
    if note is not None:
        info["note"] = note
    return info


def eos_threshold(lr: float | None, optimizer: Mapping[str, Any] | None = None) -> EosThreshold | None:
    """The stability threshold for the raw Hessian (GD / momentum), or Adam's preconditioned one.

    Returns None when the learning rate is unknown or not a step size (0, negative, NaN, inf; see
    :func:`lr_note`).
    """
    if not usable_lr(lr):
        return None
    optimizer = optimizer or {}
    name = str(optimizer.get("name") or "").lower()
    hp = optimizer.get("hyperparameters") or {}
    if "adam" in name or "betas" in hp:
        betas = hp.get("betas") or [0.9, 0.999]
        b1 = float(betas[0])
        return EosThreshold((2 + 2 * b1) / ((1 - b1) * lr), "adam_preconditioned", "(2+2*beta1)/((1-beta1)*lr)")
    beta = float(hp.get("momentum") or 0.0)
    if beta > 0 and hp.get("nesterov"):
        return EosThreshold((2 + 2 * beta) / ((1 + 2 * beta) * lr), "nesterov", "(2+2*beta)/((1+2*beta)*lr)")
    if beta > 0:
        return EosThreshold((2 + 2 * beta) / lr, "heavy_ball", "(2+2*beta)/lr")
    return EosThreshold(2.0 / lr, "gd", "2/lr")
