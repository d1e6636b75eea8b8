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


def _hyper(value: Any) -> float | None:
    """A momentum coefficient read from optimizer metadata as a float, None when it is not a number in ``[0, 1)``
    (corrupt metadata, or 1 and above: no stable step exists and the rules below divide by ``1 - beta``)."""
    if isinstance(value, bool):
        return None
    try:
        beta = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return beta if 0.0 <= beta < 1.0 else None


def _rule(lr: float, optimizer: Mapping[str, Any]) -> tuple[str, str, float | None, str]:
    """``(kind, rule, value, momentum)`` of the optimizer's threshold (``value`` None when its momentum
    coefficient is unusable; ``momentum`` names that coefficient as the metadata gave it)."""
    name = str(optimizer.get("name") or "").lower()
    hp = optimizer.get("hyperparameters") or {}
    hp = hp if isinstance(hp, Mapping) else {}
    if "adam" in name or "betas" in hp:
        betas = hp.get("betas") or [0.9, 0.999]
        first = betas[0] if isinstance(betas, (list, tuple)) and betas else betas
        b1 = _hyper(first)
        value = None if b1 is None else (2 + 2 * b1) / ((1 - b1) * lr)
        return "adam_preconditioned", "(2+2*beta1)/((1-beta1)*lr)", value, f"beta1 = {first!r}"
    raw = hp.get("momentum") or 0.0
    beta = _hyper(raw)
    if beta is None:
        return "heavy_ball", "(2+2*beta)/lr", None, f"momentum = {raw!r}"
    if beta > 0 and hp.get("nesterov"):
        return "nesterov", "(2+2*beta)/((1+2*beta)*lr)", (2 + 2 * beta) / ((1 + 2 * beta) * lr), ""
    if beta > 0:
        return "heavy_ball", "(2+2*beta)/lr", (2 + 2 * beta) / lr, ""
    return "gd", "2/lr", 2.0 / lr, ""


def threshold_note(lr: float | None, optimizer: Mapping[str, Any] | None = None) -> str | None:
    """Why a usable learning rate still gives no threshold (None when it gives one, or when ``lr`` itself
    is the reason: see :func:`lr_note`): a momentum coefficient outside ``[0, 1)`` in the optimizer metadata,
    or a learning rate so small that the threshold overflows (``2/lr`` is infinite for ``lr`` below ~1e-308)."""
    if not usable_lr(lr) or eos_threshold(lr, optimizer) is not None:
        return None
    _, rule, value, momentum = _rule(float(lr), optimizer or {})  # type: ignore[arg-type]
    if value is None:
        return (
            f"the checkpoint's optimizer metadata gives {momentum}, not a number in [0, 1): no edge-of-stability "
            f"threshold ({rule})"
        )
    return (
        f"learning rate {lr:g} is too small for a finite edge-of-stability threshold ({rule} = {value:g}): "
        "no threshold (--lr sets the step size)"
    )


def eos_notes(lr: float | None, optimizer: Mapping[str, Any] | None = None) -> list[str]:
    """User-facing notes on why there is no threshold when the metadata or ``--lr`` is unusable: a corrupt
    learning rate (NaN, inf, negative; :func:`lr_note`) or the :func:`threshold_note`. An unknown learning
    rate or 0 (a schedule's end) is not news and stays in the ``eos`` metadata only."""
    if lr is None or lr == 0:
        return []
    note = lr_note(lr) or threshold_note(lr, optimizer)
    return [note] if note is not None else []


def lr_info(lr: float | None, optimizer: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``eos`` metadata's start: the learning rate (a non-finite one as text, JSON has no such number) and,
    when it gives no threshold, the note saying why (:func:`lr_note`, :func:`threshold_note`)."""
    info: dict[str, Any] = {"lr": lr if lr is None or math.isfinite(lr) else str(lr)}
    note = lr_note(lr) or threshold_note(lr, optimizer)
    if note is not None:
        info["note"] = note
    return info


def eos_threshold(lr: float | None, optimizer: Mapping[str, Any] | None = None) -> EosThreshold | None:
    """The stability threshold for the raw Hessian (GD / momentum), or Adam's preconditioned one.

    Returns None when the learning rate is unknown or not a step size (0, negative, NaN, inf; see
    :func:`lr_note`), when the optimizer's momentum coefficient (``momentum``, Adam's ``beta1``) is not a
    number in ``[0, 1)``, or when the threshold is not a finite number (see :func:`threshold_note`).
    """
    if not usable_lr(lr):
        return None
    kind, rule, value, _ = _rule(float(lr), optimizer or {})  # type: ignore[arg-type]
    if value is None or not math.isfinite(value):
        return None
    return EosThreshold(value, kind, rule)
