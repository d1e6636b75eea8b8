"""Shared fixtures. Tests mirror the package: tests/linalg, tests/analyzers, tests/cli."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from diagnostics.examples.digits import train_gd


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A short full-batch GD run on digits (MSE, lr 2.0, width 16): checkpoints at steps 0, 100, 200."""
    out = tmp_path_factory.mktemp("digits_run")
    return train_gd(out, lr=2.0, steps=200, save_every=100, width=16)


@pytest.fixture(scope="session")
def eos_pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Full-batch GD on digits (MSE, width 32, 800 steps) at lr 2.0 and 1.0.

    By the edge of stability, lambda_max of the lr=2.0 model sits near 2/lr = 1.0, while the lr=1.0
    model keeps sharpening towards 2.0: the smaller step size gives the sharper model."""
    root = tmp_path_factory.mktemp("eos_pair")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny full-batch steps: one thread is fastest, and immune to oversubscription
    try:
        return {
            "lr2": train_gd(root / "lr2", lr=2.0, steps=800, save_steps=[800])[0],
            "lr1": train_gd(root / "lr1", lr=1.0, steps=800, save_steps=[800])[0],
        }
    finally:
        torch.set_num_threads(threads)


@pytest.fixture()
def run_copy(digits_run: list[Path], tmp_path: Path) -> Path:
    """A private copy of the session's digits run (steps 0, 100, 200) that a test may change."""
    run = tmp_path / "run"
    run.mkdir()
    for p in digits_run:
        shutil.copy2(p, run / p.name)
    return run


@pytest.fixture(autouse=True)
def _isolate_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run every test in its own empty working directory (no stray diag.toml, no writes to the repo)."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(1234)
