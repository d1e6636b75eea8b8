"""``diag landscape`` through Typer's CliRunner on the digits example."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

import tinymodels as tm
from diag_cli.main import app
from diagnostics.checkpoint import save_checkpoint
from diagnostics.examples.digits import train_gd

runner = CliRunner()
FAST = ["--samples", "200", "--seed", "0", "-q"]


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def test_two_d_slice_writes_grid_plots_and_records(digits_run: list[Path], tmp_path: Path) -> None:
    grid, prefix, out = tmp_path / "grid.csv", tmp_path / "plane", tmp_path / "res.json"
    r = run("landscape", digits_run[-1], "--dims", "2", "--steps", "5", "--span", "0.5", "--grid-out", grid,
            "--plot", prefix, "--out", out, "--format", "json", *FAST)  # fmt: skip
    assert r.exit_code == 0, r.output
    records = json.loads(r.stdout)
    assert {x["metric"] for x in records} == {"loss", "accuracy"} and len(records) == 50
    assert records[0]["group"] is None and records[0]["index"] == 0 and records[0]["analyzer"] == "landscape"
    df = pd.read_csv(grid)
    assert list(df.columns) == ["x", "y", "loss", "accuracy"] and len(df) == 25
    assert (df.loc[0, "x"], df.loc[0, "y"]) == (-0.5, -0.5)  # the record's index is the grid's row
    losses = {x["index"]: x["value"] for x in records if x["metric"] == "loss"}
    assert [losses[i] for i in range(25)] == pytest.approx(df["loss"].tolist(), rel=1e-12)
    centre = df[(df.x == 0) & (df.y == 0)]
    saved = json.loads(out.read_text())
    assert saved["metadata"]["loss_centre"] == pytest.approx(float(centre["loss"].iloc[0]))
    assert saved["metadata"]["directions"]["normalize"] == "filter"
    for suffix in (".png", "_surface.png"):  # the contours, and the surface
        assert (tmp_path / f"plane{suffix}").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "grid.csv.partial.json").exists()  # the implicit cache is removed when done


def test_existing_outputs_are_refused_without_force(digits_run: list[Path], tmp_path: Path) -> None:
    grid = tmp_path / "grid.csv"
    grid.write_text("mine\n")
    r = run("landscape", digits_run[-1], "--dims", "1", "--steps", "3", "--grid-out", grid, *FAST)
    assert r.exit_code == 2 and "exists" in r.stderr and "--force" in r.stderr
    assert grid.read_text() == "mine\n"
    (tmp_path / "p.png").write_text("mine")
    r = run("landscape", digits_run[-1], "--dims", "1", "--steps", "3", "--plot", tmp_path / "p", *FAST)
    assert r.exit_code == 2 and "p.png" in r.stderr
    r = run("landscape", digits_run[-1], "--dims", "1", "--steps", "3", "--grid-out", grid, "--force", *FAST)
    assert r.exit_code == 0, r.output
    assert len(pd.read_csv(grid)) == 3
    r = run("landscape", digits_run[-1], "--grid-out", tmp_path / "grid.txt", *FAST)
    assert r.exit_code == 2 and ".csv" in r.stderr


def test_interpolation_between_two_checkpoints_reports_the_barrier(digits_run: list[Path], tmp_path: Path) -> None:
    r = run("landscape", digits_run[0], digits_run[-1], "--steps", "5", "--alpha-min", "-0.5", "--alpha-max", "1.5",
            "--plot", tmp_path / "line", "--grid-out", tmp_path / "line.csv", "--out", tmp_path / "line.json",
            *FAST)  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "barrier" in r.stdout
    meta = json.loads((tmp_path / "line.json").read_text())["metadata"]
    assert meta["barrier_definition"].startswith("barrier = max over alpha in [0, 1]")
    assert meta["checkpoints"] == [digits_run[0].name, digits_run[-1].name] and meta["analyzer"] == "landscape"
    df = pd.read_csv(tmp_path / "line.csv")
    assert list(df.columns) == ["alpha", "loss", "accuracy", "chord"]
    assert df["alpha"].tolist() == [-0.5, 0.0, 0.5, 1.0, 1.5]
    assert (tmp_path / "line.png").exists() and not (tmp_path / "line_surface.png").exists()
    j = run("landscape", digits_run[0], digits_run[-1], "--steps", "5", "--format", "json", *FAST)
    barrier = [x for x in json.loads(j.stdout) if x["metric"] == "barrier"]
    inside = df[(df.alpha >= 0) & (df.alpha <= 1)]
    assert len(barrier) == 1 and barrier[0]["value"] >= float((inside["loss"] - inside["chord"]).max()) - 1e-7


def test_two_checkpoints_of_different_architectures_are_refused(digits_run: list[Path], tmp_path: Path) -> None:
    small = train_gd(tmp_path / "small", lr=0.5, steps=1, save_every=1, width=8)
    r = run("landscape", digits_run[-1], small[-1], *FAST)
    assert r.exit_code == 2
    assert "different architectures" in r.stderr and "Traceback" not in r.output
    r = run("landscape", digits_run[0], digits_run[-1], "--dims", "2", *FAST)
    assert r.exit_code == 2 and "1-D" in r.stderr
    r = run("landscape", digits_run[0], digits_run[-1], "--direction", "hessian", *FAST)
    assert r.exit_code == 2 and "--direction" in r.stderr


def test_bad_options_exit_2_with_one_line(digits_run: list[Path]) -> None:
    for args, word in ((["--span", "0"], "--span"), (["--dims", "3"], "--dims"), (["--normalize", "x"], "--normalize")):
        r = run("landscape", digits_run[-1], *args, *FAST)
        assert r.exit_code == 2 and word in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1


def test_an_interrupted_grid_continues_where_it_stopped(
    digits_run: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from diagnostics.directions import PointEvaluator

    common = ["landscape", digits_run[-1], "--dims", "2", "--steps", "4", "--chunk", "5", *FAST]
    reference = tmp_path / "reference.csv"
    assert run(*common, "--grid-out", reference).exit_code == 0

    original = PointEvaluator.evaluate
    calls = {"n": 0}

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(PointEvaluator, "evaluate", flaky)
    grid = tmp_path / "grid.csv"
    r = run(*common, "--grid-out", grid)
    assert r.exit_code == 130 and "rerun the same command" in r.stderr
    partial = tmp_path / "grid.csv.partial.json"
    saved = json.loads(partial.read_text())
    assert saved["analyzer"] == "landscape" and len(saved["data"]["points"]) == 10 and not grid.exists()

    monkeypatch.setattr(PointEvaluator, "evaluate", original)
    r = run(*common, "--grid-out", grid, "--out", tmp_path / "res.json")
    assert r.exit_code == 0, r.output
    meta = json.loads((tmp_path / "res.json").read_text())["metadata"]
    assert meta["points_resumed"] == 10 and meta["points_evaluated"] == 6
    pd.testing.assert_frame_equal(pd.read_csv(grid), pd.read_csv(reference), rtol=1e-6)
    assert not partial.exists()


def test_a_cache_of_another_grid_is_not_reused(digits_run: list[Path], tmp_path: Path) -> None:
    cache = tmp_path / "cache.json"
    assert run("landscape", digits_run[-1], "--dims", "1", "--steps", "3", "--cache", cache, *FAST).exit_code == 0
    assert len(json.loads(cache.read_text())["data"]["points"]) == 3  # an explicit cache is kept
    r = run("landscape", digits_run[-1], "--dims", "1", "--steps", "5", "--cache", cache, *FAST)
    assert r.exit_code == 2 and "different computation" in r.stderr and "--force" in r.stderr
    assert len(json.loads(cache.read_text())["data"]["points"]) == 3  # refused: left as it was
    r = run("landscape", digits_run[-1], "--dims", "1", "--steps", "5", "--cache", cache, "--force", *FAST)
    assert r.exit_code == 0 and len(json.loads(cache.read_text())["data"]["points"]) == 5
    again = run("landscape", digits_run[-1], "--dims", "1", "--steps", "5", "--cache", cache, "--format", "json", *FAST)
    assert again.exit_code == 0 and len(json.loads(again.stdout)) == 10


def test_hessian_direction_slice_from_the_shell(digits_run: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "res.json"
    r = run("landscape", digits_run[-1], "--direction", "hessian", "--dims", "1", "--steps", "3", "--span", "0.01",
            "--dtype", "float64", "--out", out, *FAST)  # fmt: skip
    assert r.exit_code == 0, r.output
    payload = json.loads(out.read_text())
    losses = [x["value"] for x in payload["records"] if x["metric"] == "loss"]
    top = payload["metadata"]["directions"]["eigenvalues"][0]
    # the slice along the unit top eigenvector curves like the top eigenvalue
    assert (losses[0] - 2 * losses[1] + losses[2]) / 0.01**2 == pytest.approx(top, rel=1e-3)


def test_a_span_below_the_weights_precision_warns_on_stderr(tmp_path: Path) -> None:
    ckpt = save_checkpoint(tmp_path / "t.pt", tm.build_tiny(), step=3, lr=0.1)
    tiny = ["--model", "tinymodels:build_tiny", "--data", "tinymodels:tiny_data", "--steps", "5"]
    r = run("landscape", ckpt, "--span", "1e-320", *tiny)
    assert r.exit_code == 0, r.output
    assert (
        "diag: warning: --span 1e-320 is below the float32 precision of the weights: no grid point changes any "
        "weight, so every point's loss is the centre's; use a larger --span or --dtype float64"
    ) in r.stderr
    r = run("landscape", ckpt, "--span", "0.5", *tiny)
    assert r.exit_code == 0, r.output
    assert "--span" not in r.stderr
