"""``diag rashomon`` through Typer's CliRunner: the digits example and the issue's 20-dim quadratic bowl."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from diag_cli.main import app

runner = CliRunner()

BOWL = """
import torch
from torch import nn

LAM = torch.linspace(1.0, 10.0, 20, dtype=torch.float64)


class Bowl(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(20, dtype=torch.float64))

    def forward(self, x):
        return x @ self.w


def build():
    return Bowl()


def data():
    # MSE = w^T X^T X w / n with X^T X / n = diag(LAM) / 2: the loss is w^T diag(LAM) w / 2, minimum 0 at w = 0
    return torch.diag(torch.sqrt(LAM * 20 / 2)), torch.zeros(20, dtype=torch.float64)
"""


def run(*args: object):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def bowl(tmp_path: Path) -> tuple[Path, Path]:
    (tmp_path / "bowl.py").write_text(BOWL)
    ckpt = tmp_path / "bowl.pt"
    torch.save({"w": torch.zeros(20, dtype=torch.float64)}, ckpt)
    return tmp_path / "bowl.py", ckpt


@pytest.mark.parametrize("seed", [3, 4])
def test_issue_ellipsoid_within_20_percent_for_any_seed(bowl: tuple[Path, Path], tmp_path: Path, seed: int) -> None:
    """theta 0.01 in a ball of radius 0.2: the ratio prod_i sqrt(2 theta / lambda_i) / r^20 = 2.08e-10."""
    module, ckpt = bowl
    exact = float(np.sum(0.5 * np.log(2 * 0.01 / np.linspace(1.0, 10.0, 20)))) - 20 * math.log(0.2)
    out = tmp_path / f"r{seed}.json"
    r = run("rashomon", ckpt, "--model", f"{module}:build", "--data", f"{module}:data", "--loss", "mse",
            "--dtype", "float64", "--theta", "0.01", "--radius", "0.2", "--seed", seed, "--chunk", "4096",
            "--format", "json", "--out", out, "-q")  # fmt: skip
    assert r.exit_code == 0, r.output
    records = {x["metric"]: x for x in json.loads(r.stdout)}
    assert set(records) == {"rashomon_ratio", "rashomon_log10_ratio"}  # regression: no pattern ratio
    assert records["rashomon_ratio"]["value"] == pytest.approx(math.exp(exact), rel=0.2)
    assert records["rashomon_log10_ratio"]["value"] == pytest.approx(math.log10(records["rashomon_ratio"]["value"]))
    meta = json.loads(out.read_text())["metadata"]
    est = meta["estimate"]
    assert meta["method"] == "subset" and meta["seed"] == seed
    assert est["log10_interval"][0] <= exact / math.log(10) <= est["log10_interval"][1]
    assert records["rashomon_log10_ratio"]["stderr"] == pytest.approx(est["log10_stderr"])
    assert meta["subset_simulation"]["replicates"] == 10 and meta["subset_simulation"]["finished"]


def test_subset_settings_reach_the_config_and_the_table(bowl: tuple[Path, Path]) -> None:
    module, ckpt = bowl
    r = run("rashomon", ckpt, "--model", f"{module}:build", "--data", f"{module}:data", "--loss", "mse",
            "--theta", "0.01", "--radius", "0.2", "--samples", "4000", "--replicates", "4", "--level-fraction", "0.2",
            "--max-levels", "3", "--method", "subset", "--chunk", "4096", "-q")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "method=subset" in r.stdout and "upper bound" in r.stdout and "evaluations=" in r.stdout


def test_removed_importance_sampling_is_a_one_line_error(bowl: tuple[Path, Path]) -> None:
    module, ckpt = bowl
    r = run("rashomon", ckpt, "--model", f"{module}:build", "--data", f"{module}:data", "--loss", "mse",
            "--method", "is", "-q")  # fmt: skip
    assert r.exit_code == 2 and "--method subset" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.output


def test_ratio_pattern_ratio_and_interval(digits_run: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    r = run("rashomon", digits_run[-1], "--theta", "0.01", "--radius", "0.5", "--samples", "300", "--method", "mc",
            "--data-samples", "200", "--format", "json", "--out", out, "-q")  # fmt: skip
    assert r.exit_code == 0, r.output
    records = {x["metric"]: x for x in json.loads(r.stdout)}
    meta = json.loads(out.read_text())["metadata"]
    est = meta["estimate"]
    assert est["draws"] == 300 and meta["samples"] == 200  # --samples: models; --data-samples: data
    assert est["interval"][0] <= records["rashomon_ratio"]["value"] <= est["interval"][1]
    assert records["rashomon_ratio"]["value"] == est["hits"] / 300
    assert 0 < records["rashomon_pattern_ratio"]["value"] <= 1
    assert "theta = 0.01" in meta["rashomon_set"]
    if est["hits"]:
        assert set(records) == {"rashomon_ratio", "rashomon_log10_ratio", "rashomon_pattern_ratio"}


def test_table_states_the_space_and_the_interval(digits_run: list[Path]) -> None:
    r = run("rashomon", digits_run[-1], "--radius", "0.2", "--draws", "100", "--geometry", "filter", "--method", "mc",
            "--data-samples", "100", "-q")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "rashomon_ratio" in r.stdout and "per-filter" in r.stdout and "interval" in r.stdout


@pytest.mark.parametrize(
    "args, word",
    [
        (["--theta", "-0.1"], "--theta"),
        (["--radius", "0"], "--radius"),
        (["--geometry", "cube"], "--geometry"),
        (["--replicates", "1"], "--replicates"),
        (["--level-fraction", "0.9"], "--level-fraction"),
        (["--samples", "500"], "--samples"),
    ],
)
def test_bad_input_exits_2_with_one_line(digits_run: list[Path], args: list[str], word: str) -> None:
    r = run("rashomon", digits_run[-1], *args, "-q")
    assert r.exit_code == 2 and word in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.output
