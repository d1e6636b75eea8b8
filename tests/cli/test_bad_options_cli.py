"""Bad options through the CLI: each gives exit 2 and one line naming the problem and the fix (never
"unexpected ..."), or, where the input is usable, a note instead of a silent change."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import tinymodels as tm
from cliutils import one_line_error
from diag_cli.main import app
from diagnostics.checkpoint import save_checkpoint

runner = CliRunner()
TINY = ["--model", "tinymodels:build_tiny", "--data", "tinymodels:tiny_data", "-q"]


def run(*args: object):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture()
def tiny(tmp_path: Path) -> Path:
    return save_checkpoint(tmp_path / "t.pt", tm.build_tiny(), step=3, lr=0.1)


def test_sharpness_with_a_ball_where_the_loss_overflows_is_an_error_not_zero(digits_run: list[Path]) -> None:
    for kind in ("worst", "adaptive", "average"):  # MSE: (1e30)^2 overflows float32
        r = run("sharpness", digits_run[-1], "--rho", "1e30", "--kind", kind, "--draws", "4", "--samples", "50", "-q")
        one_line_error(r, "the loss is", "smaller --")


def test_a_landscape_grid_too_large_is_refused_with_the_size(tiny: Path) -> None:
    r = run("landscape", tiny, "--steps", "100000", *TINY)
    one_line_error(r, "10,000,000,000 points", "--steps 1000 or fewer")
    r = run("landscape", tiny, "--steps", "100000", "--dims", "2", *TINY)
    one_line_error(r, "--steps 1000 or fewer")


@pytest.mark.parametrize("device", ["mps", "meta", "foo", "cuda:7", "xpu"])
def test_unavailable_devices_are_one_line_errors(tiny: Path, device: str, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    r = run("hessian", tiny, "--device", device, *TINY)
    one_line_error(r, f"'{device}'", "devices here: cpu")


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "mps", "meta"])
def test_unavailable_basis_devices_are_one_line_errors(tiny: Path, device: str, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    r = run("hessian", tiny, "--basis-device", device, *TINY)
    one_line_error(r, f"--basis-device '{device}'", "devices here: cpu")


def test_config_problems_name_the_file(tiny: Path, tmp_path: Path) -> None:
    r = run("hessian", tiny, "--config", tmp_path, *TINY)
    one_line_error(r, str(tmp_path), "is a folder")
    latin = tmp_path / "latin.toml"
    latin.write_bytes(b"seed = 1\n# caf\xe9\n")
    one_line_error(run("hessian", tiny, "--config", latin, *TINY), str(latin), "not UTF-8")
    wrapped = tmp_path / "wrapped.toml"
    wrapped.write_text('diag = "x"\n')
    one_line_error(run("hessian", tiny, "--config", wrapped, *TINY), str(wrapped), "must be a table")


def test_a_nan_learning_rate_gives_a_note_not_a_nan_threshold(tmp_path: Path) -> None:
    ck = save_checkpoint(tmp_path / "nan.pt", tm.build_tiny(), step=3, lr=0.1)
    raw = torch.load(ck, weights_only=True)
    raw["metadata"]["lr"] = math.nan
    torch.save(raw, ck)
    for command in ("hessian", "sharpness"):
        out = tmp_path / f"{command}.json"
        r = run(command, ck, "--max-iter", "3", "--format", "json", "--out", out, *TINY)
        assert r.exit_code == 0, r.output
        assert not [x for x in json.loads(r.stdout) if x["metric"].startswith("eos")]
        notes = json.loads(out.read_text())["metadata"]["notes"]
        assert any("learning rate is nan" in n and "--lr" in n for n in notes), notes


def test_more_samples_than_the_data_holds_is_noted(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "h.json"
    r = run("hessian", tiny, "--samples", "1000", "--format", "json", "--out", out, *TINY)
    assert r.exit_code == 0, r.output
    meta = json.loads(out.read_text())["metadata"]
    assert meta["samples"] == 23
    assert any("--samples 1000" in n and "all 23 were used" in n for n in meta["notes"]), meta["notes"]


def test_corrupt_optimizer_momentum_gives_a_note_not_a_crash(tmp_path: Path) -> None:
    model = tm.build_tiny()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    X, y = tm.tiny_data()
    torch.nn.functional.cross_entropy(model(X), y).backward()
    opt.step()
    path = save_checkpoint(tmp_path / "adam.pt", model, optimizer=opt, step=1)
    container = torch.load(path, weights_only=True)
    container["metadata"]["optimizer"]["hyperparameters"]["betas"] = [1.0, 0.999]  # (1 - beta1) = 0
    torch.save(container, path)
    for command in ("sharpness", "hessian"):
        r = run(command, path, *TINY[:-1], "-f", "json")
        assert r.exit_code == 0, r.output
        assert "beta1 = 1.0, not a number in [0, 1)" in r.stderr
        assert "eos_threshold" not in {rec["metric"] for rec in json.loads(r.stdout)}


def test_a_learning_rate_too_small_for_a_threshold_gives_a_note_not_inf(tiny: Path) -> None:
    r = run("hessian", tiny, "--lr", "1e-320", *TINY[:-1], "-f", "json")
    assert r.exit_code == 0, r.output
    assert "too small for a finite edge-of-stability threshold" in r.stderr
    assert not {"eos_threshold", "eos_ratio"} & {rec["metric"] for rec in json.loads(r.stdout)}
