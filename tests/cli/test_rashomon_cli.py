"""``diag rashomon`` through Typer's CliRunner: the digits example and the issue's 20-dim quadratic bowl."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import tinymodels as tm
from diag_cli.main import app
from diagnostics.checkpoint import save_checkpoint

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


def run_bowl(bowl: tuple[Path, Path], *args: object):
    """``diag rashomon`` on the bowl fixture's checkpoint with its model, data and the MSE loss."""
    module, ckpt = bowl
    return run("rashomon", ckpt, "--model", f"{module}:build", "--data", f"{module}:data", "--loss", "mse", *args)


@pytest.fixture
def bowl(tmp_path: Path) -> tuple[Path, Path]:
    (tmp_path / "bowl.py").write_text(BOWL)
    ckpt = tmp_path / "bowl.pt"
    torch.save({"w": torch.zeros(20, dtype=torch.float64)}, ckpt)
    return tmp_path / "bowl.py", ckpt


@pytest.mark.parametrize("seed", [3, 4])
def test_issue_ellipsoid_within_20_percent_for_any_seed(bowl: tuple[Path, Path], tmp_path: Path, seed: int) -> None:
    """theta 0.01 in a ball of radius 0.2: the ratio prod_i sqrt(2 theta / lambda_i) / r^20 = 2.08e-10."""
    exact = float(np.sum(0.5 * np.log(2 * 0.01 / np.linspace(1.0, 10.0, 20)))) - 20 * math.log(0.2)
    out = tmp_path / f"r{seed}.json"
    r = run_bowl(bowl, "--dtype", "float64", "--theta", "0.01", "--radius", "0.2", "--seed", seed, "--chunk", "4096",
                 "--format", "json", "--out", out, "-q")  # fmt: skip
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    records = {x["metric"]: x for x in rows if x["index"] is None}
    assert set(records) == {"rashomon_ratio", "rashomon_log10_ratio"}  # regression: no pattern ratio
    assert records["rashomon_ratio"]["value"] == pytest.approx(math.exp(exact), rel=0.2)
    assert records["rashomon_log10_ratio"]["value"] == pytest.approx(math.log10(records["rashomon_ratio"]["value"]))
    interval = {x["index"]: x["value"] for x in rows if x["metric"] == "rashomon_log10_interval"}
    assert interval[0] <= exact / math.log(10) <= interval[1]  # the interval covers the truth, read from the records
    meta = json.loads(out.read_text())["metadata"]
    est = meta["estimate"]
    assert meta["method"] == "subset" and meta["seed"] == seed and meta["analyzer"] == "rashomon"
    assert [interval[0], interval[1]] == pytest.approx(est["log10_interval"])
    assert records["rashomon_log10_ratio"]["stderr"] == pytest.approx(est["log10_stderr"])
    assert meta["subset_simulation"]["replicates"] == 10 and meta["subset_simulation"]["finished"]
    assert meta["config"]["draws"] == 100_000 and meta["config"]["subset_runs"] == 10  # the defaults


def test_subset_settings_reach_the_config(bowl: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    r = run_bowl(bowl, "--theta", "0.01", "--radius", "0.2", "--draws", "4000", "--subset-runs", "4",
                 "--level-fraction", "0.2", "--max-levels", "3", "--method", "subset", "--chunk", "4096",
                 "--out", out)  # fmt: skip
    assert r.exit_code == 0, r.output
    meta = json.loads(out.read_text())["metadata"]
    assert meta["config"] | {"draws": 4000, "subset_runs": 4, "level_fraction": 0.2, "max_levels": 3} == meta["config"]
    sub = meta["subset_simulation"]
    assert sub["replicates"] == 4 and sub["draws_per_level"] == 4000 and not sub["finished"]
    assert "upper bound" in meta["estimate"]["interval_kind"]
    assert "--max-levels (3) reached" in r.stderr  # the note, on stderr without -q
    assert "rashomon_log10_interval" in r.stdout and "rashomon_log10_ratio" not in r.stdout  # an upper bound only


def test_diag_toml_table_sets_the_declared_names(bowl: tuple[Path, Path], tmp_path: Path) -> None:
    module, ckpt = bowl
    (tmp_path / "diag.toml").write_text(
        f'model = "{module}:build"\ndata = "{module}:data"\nloss = "mse"\n'
        '[rashomon]\ndraws = 300\nmethod = "mc"\nradius = 0.2\n'
    )
    out = tmp_path / "r.json"
    r = run("rashomon", ckpt, "--config", tmp_path / "diag.toml", "--out", out, "-q")
    assert r.exit_code == 0, r.output
    meta = json.loads(out.read_text())["metadata"]
    assert meta["estimate"]["draws"] == 300 and meta["method"] == "mc" and meta["config"]["radius"] == 0.2
    (tmp_path / "diag.toml").write_text("[rashomon]\nsamples = 300\n")
    r = run("rashomon", ckpt, "--config", tmp_path / "diag.toml", "-q")
    assert r.exit_code == 2 and "unknown option 'samples' in [rashomon]" in r.stderr and "Traceback" not in r.output


@pytest.mark.parametrize("method", ["is", "quasi"])
def test_unknown_method_is_a_one_line_error(bowl: tuple[Path, Path], method: str) -> None:
    r = run_bowl(bowl, "--method", method, "-q")
    assert r.exit_code == 2 and "--method must be one of auto, mc, subset" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.output


def test_ratio_pattern_ratio_and_interval(digits_run: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    r = run("rashomon", digits_run[-1], "--theta", "0.01", "--radius", "0.5", "--draws", "300", "--method", "mc",
            "--samples", "200", "--format", "json", "--out", out, "-q")  # fmt: skip
    assert r.exit_code == 0, r.output
    records = {x["metric"]: x for x in json.loads(r.stdout) if x["index"] is None}
    meta = json.loads(out.read_text())["metadata"]
    est = meta["estimate"]
    assert est["draws"] == 300 and meta["samples"] == 200  # --draws: models; --samples: data
    assert est["interval"][0] <= records["rashomon_ratio"]["value"] <= est["interval"][1]
    assert records["rashomon_ratio"]["value"] == est["hits"] / 300
    assert 0 < records["rashomon_pattern_ratio"]["value"] <= 1
    assert "theta = 0.01" in meta["rashomon_set"]
    if est["hits"]:
        assert set(records) == {"rashomon_ratio", "rashomon_log10_ratio", "rashomon_pattern_ratio"}


def test_table_shows_the_interval_and_the_file_states_the_space(digits_run: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    r = run("rashomon", digits_run[-1], "--radius", "0.2", "--draws", "100", "--geometry", "filter", "--method", "mc",
            "--samples", "100", "--out", out, "-q")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "rashomon_ratio" in r.stdout and "rashomon_log10_interval" in r.stdout
    assert "per-filter" in json.loads(out.read_text())["metadata"]["hypothesis_space"]


@pytest.mark.parametrize(
    "args, word",
    [
        (["--theta", "-0.1"], "--theta"),
        (["--radius", "0"], "--radius"),
        (["--geometry", "cube"], "--geometry"),
        (["--subset-runs", "1"], "--subset-runs"),
        (["--level-fraction", "0.9"], "--level-fraction"),
        (["--draws", "500"], "--draws 500"),
        (["--draws", "5"], "--draws must be >= 10"),
    ],
)
def test_bad_input_exits_2_with_one_line(digits_run: list[Path], args: list[str], word: str) -> None:
    r = run("rashomon", digits_run[-1], *args, "-q")
    assert r.exit_code == 2 and word in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.output


def test_a_radius_where_the_float32_loss_overflows_warns_to_lower_it(tmp_path: Path) -> None:
    ckpt = save_checkpoint(tmp_path / "t.pt", tm.build_tiny(), step=3, lr=0.1)
    r = run("rashomon", ckpt, "--radius", "1e308", "--draws", "1000", "--model", "tinymodels:build_tiny",
            "--data", "tinymodels:tiny_data")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert (
        "diag: warning: 1000 of 1000 uniform draws in F (ball, radius 1e+308) have a non-finite loss (counted as "
        "outside the Rashomon set): F reaches where the float32 loss overflows; use a smaller --radius or --dtype "
        "float64"
    ) in r.stderr
    assert "raise --draws" not in r.stderr and "(lower --radius: the loss is not finite on most of F)" in r.stderr
