"""Edge-of-stability thresholds from optimizer metadata (Cohen et al. 2021, 2022).

* Gradient descent with step size ``eta``: sharpness ``lambda_max`` rises to and hovers near ``2/eta``.
* Heavy-ball momentum ``beta``: ``(2 + 2 beta) / eta``.
* Nesterov momentum ``beta``: ``(2 + 2 beta) / ((1 + 2 beta) eta)``.
* Adam (``beta1``): the *preconditioned* sharpness ``lambda_max(P^-1 H)`` hovers near
  ``(2 + 2 beta1) / ((1 - beta1) eta)`` (= 38/eta for beta1 = 0.9); the raw Hessian has no such threshold.
"""

from __future__ import annotations

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


def eos_threshold(lr: float | None, optimizer: Mapping[str, Any] | None = None) -> EosThreshold | None:
    """The stability threshold for the raw Hessian (GD / momentum), or Adam's preconditioned one.

    Returns None when the learning rate is unknown.
    """
    if lr is None or lr <= 0:
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
