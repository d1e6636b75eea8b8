"""Edge-of-stability thresholds (diagnostics/analyzers/eos.py): the closed-form rules, and no threshold (with a
note saying why) where the learning rate or the optimizer metadata gives no finite one."""

from __future__ import annotations

import math

import pytest

from diagnostics.analyzers.eos import eos_notes, eos_threshold, lr_info, lr_note, threshold_note

SGD = {"name": "SGD", "hyperparameters": {"momentum": 0.9}}
NESTEROV = {"name": "SGD", "hyperparameters": {"momentum": 0.5, "nesterov": True}}
ADAM = {"name": "AdamW", "hyperparameters": {"betas": [0.8, 0.999]}}


def test_the_rules() -> None:
    assert eos_threshold(0.5, {}).value == pytest.approx(4.0)
    assert eos_threshold(0.5, SGD).value == pytest.approx(3.8 / 0.5)
    assert eos_threshold(0.5, NESTEROV).value == pytest.approx(3.0 / (2.0 * 0.5))
    assert eos_threshold(0.5, ADAM).value == pytest.approx(3.6 / (0.2 * 0.5))
    assert eos_threshold(0.5, {"name": "Adam"}).value == pytest.approx(3.8 / (0.1 * 0.5))  # default beta1 0.9
    assert eos_threshold(0.5, {"name": "Adam", "hyperparameters": {"betas": None}}).value == pytest.approx(76.0)
    for opt in ({}, SGD, NESTEROV, ADAM):
        assert threshold_note(0.5, opt) is None and eos_notes(0.5, opt) == []
        assert "note" not in lr_info(0.5, opt)


@pytest.mark.parametrize("opt", [{}, SGD, NESTEROV, ADAM])
def test_a_learning_rate_whose_threshold_overflows_gives_none_and_says_so(opt: dict) -> None:
    lr = 1e-320  # a positive, finite step size: 2/lr is inf in float64
    assert eos_threshold(lr, opt) is None
    note = threshold_note(lr, opt)
    assert "too small for a finite edge-of-stability threshold" in note and "--lr" in note and "\n" not in note
    assert eos_notes(lr, opt) == [note] and lr_info(lr, opt)["note"] == note
    assert lr_note(lr) is None  # the step size itself is fine
    assert eos_threshold(1e-300, opt).value > 1e300  # just above: a finite threshold


@pytest.mark.parametrize(
    "opt, shown",
    [
        ({"name": "Adam", "hyperparameters": {"betas": [1.0, 0.999]}}, "beta1 = 1.0"),  # divided by 1 - beta1
        ({"name": "Adam", "hyperparameters": {"betas": [float("nan"), 0.999]}}, "beta1 = nan"),
        ({"name": "Adam", "hyperparameters": {"betas": ["x", 0.999]}}, "beta1 = 'x'"),
        ({"name": "Adam", "hyperparameters": {"betas": [-0.5, 0.999]}}, "beta1 = -0.5"),
        ({"name": "SGD", "hyperparameters": {"momentum": 1.5}}, "momentum = 1.5"),
        ({"name": "SGD", "hyperparameters": {"momentum": 1.0, "nesterov": True}}, "momentum = 1.0"),
        ({"name": "SGD", "hyperparameters": {"momentum": "fast"}}, "momentum = 'fast'"),
        ({"name": "SGD", "hyperparameters": {"momentum": float("inf")}}, "momentum = inf"),
    ],
)
def test_corrupt_momentum_metadata_gives_no_threshold_and_a_note(opt: dict, shown: str) -> None:
    assert eos_threshold(0.1, opt) is None  # no ZeroDivisionError, no negative or NaN threshold
    note = threshold_note(0.1, opt)
    assert shown in note and "not a number in [0, 1)" in note and "\n" not in note
    assert eos_notes(0.1, opt) == [note]


def test_hyperparameters_that_are_not_a_mapping_fall_back_to_gradient_descent() -> None:
    assert eos_threshold(0.5, {"name": "SGD", "hyperparameters": [0.9]}).value == pytest.approx(4.0)


@pytest.mark.parametrize("lr", [math.nan, -0.1, math.inf])
def test_a_corrupt_learning_rate_is_noted_once_whatever_the_optimizer(lr: float) -> None:
    notes = eos_notes(lr, {"name": "Adam", "hyperparameters": {"betas": [1.0, 0.999]}})
    assert notes == [lr_note(lr)]  # the learning rate is the problem named, not the momentum
    assert threshold_note(lr, ADAM) is None


def test_an_unknown_or_zero_learning_rate_is_metadata_not_a_note() -> None:
    for lr in (None, 0.0):
        assert eos_notes(lr, SGD) == [] and eos_threshold(lr, SGD) is None
        assert lr_info(lr, SGD)["note"] == lr_note(lr)
