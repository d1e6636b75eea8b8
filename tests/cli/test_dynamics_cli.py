"""``diag dynamics`` and ``diag run --analyzers dynamics`` on a short grokking-example run (p = 11)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from diag_cli.main import app
from diagnostics.checkpoint import load_checkpoint
from diagnostics.examples.grokking import train

runner = CliRunner()


@pytest.fixture(scope="module")
def grok_run(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Checkpoints at steps 0, 10, 20 of the example's training on (a + b) mod 11."""
    out = tmp_path_factory.mktemp("grok_run")
    return train(out, p=11, steps=20, save_every=10, lr=1e-2)


def records(text: str) -> dict[tuple, float]:
    return {(r["step"], r["metric"], r["group"]): r["value"] for r in json.loads(text)}


def invoke(*args: str):
    return runner.invoke(app, list(args))


def test_command_gives_every_metric_and_the_logged_values(grok_run: list[Path]) -> None:
    first, last = grok_run[0], grok_run[-1]
    res = invoke("dynamics", str(last), "--init", str(first), "--softmax-dtypes", "float64", "-f", "json", "-q")
    assert res.exit_code == 0, res.output
    got = records(res.stdout)
    keys = {(m, g) for _, m, g in got}
    assert {
        ("softmax_collapse_fraction", "float32"),
        ("softmax_collapse_fraction", "float64"),
        ("gradient_weight_cosine", None),
        ("zero_gradient_fraction", None),
        ("weight_norm", None),
        ("weight_norm", "embed.weight"),
        ("distance_from_init", None),
        ("distance_from_init", "hidden"),
        ("dormant_fraction", "act"),
        ("label_kernel_alignment", "head:input"),
    } <= keys
    meta = load_checkpoint(last).metadata
    for key in ("train_accuracy", "val_accuracy", "train_loss", "val_loss"):
        assert got[(20, key, None)] == pytest.approx(meta[key], rel=1e-12)
    # the weight norm is that of the checkpoint's tensors
    state = load_checkpoint(last).state_dict
    total = torch.cat([t.reshape(-1).double() for t in state.values()]).norm()
    assert got[(20, "weight_norm", None)] == pytest.approx(float(total), rel=1e-12)


def test_without_init_there_is_no_distance_and_a_warning(grok_run: list[Path]) -> None:
    res = invoke("dynamics", str(grok_run[-1]), "-f", "json")
    assert res.exit_code == 0, res.output
    assert not any(m == "distance_from_init" for _, m, _ in records(res.stdout))
    assert "--init" in res.stderr


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--tau", "-1"], "--tau"),
        (["--softmax-dtypes", "float8"], "--softmax-dtypes must be one of"),
        (["--init", "missing.pt"], "no such checkpoint"),
        (["--layers", "nope"], "unknown layer 'nope'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(grok_run: list[Path], args: list[str], fragment: str) -> None:
    res = invoke("dynamics", str(grok_run[-1]), *args)
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("diag: error: ") and fragment in lines[0], res.stderr
    assert res.stdout == ""


def test_sweep_measures_the_distance_from_the_runs_first_checkpoint(grok_run: list[Path], tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    for p in grok_run:
        shutil.copy(p, run / p.name)
    out = tmp_path / "out"
    swept = invoke("run", str(run), "--analyzers", "dynamics", "--out", str(out), "-f", "json", "-q")
    assert swept.exit_code == 0, swept.output
    got = records(swept.stdout)
    assert {g: v for (s, m, g), v in got.items() if s == 0 and m == "distance_from_init"} == {
        None: 0.0,
        "embed": 0.0,
        "hidden": 0.0,
        "head": 0.0,
    }
    for ck in grok_run[1:]:
        single = invoke("dynamics", str(ck), "--init", str(grok_run[0]), "-f", "json", "-q")
        assert single.exit_code == 0, single.output
        step = load_checkpoint(ck).step
        assert {k: v for k, v in got.items() if k[0] == step} == records(single.stdout)

    # a rerun is served from the cache; a new first checkpoint changes every distance, so all is recomputed
    again = invoke("run", str(run), "--analyzers", "dynamics", "--out", str(out), "-f", "json", "-q")
    assert records(again.stdout) == got
    manifest = json.loads((out / "diag-run.json").read_text())
    assert manifest["counts"]["cached"] == 3 and manifest["counts"]["computed"] == 0
    train(tmp_path / "other", p=11, steps=0, save_every=10, seed=1)
    shutil.copy(tmp_path / "other" / "step_00000.pt", run / "step_00000.pt")
    moved = invoke("run", str(run), "--analyzers", "dynamics", "--out", str(out), "-f", "json", "-q")
    assert moved.exit_code == 0, moved.output
    manifest = json.loads((out / "diag-run.json").read_text())
    assert manifest["counts"]["computed"] == 3
    new = records(moved.stdout)
    assert new[(20, "distance_from_init", None)] != pytest.approx(got[(20, "distance_from_init", None)])
    assert new[(20, "weight_norm", None)] == got[(20, "weight_norm", None)]


def test_sweep_takes_an_explicit_init_over_the_first_checkpoint(grok_run: list[Path], tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    for p in grok_run[1:]:
        shutil.copy(p, run / p.name)
    args = ["run", str(run), "--analyzers", "dynamics", "-f", "json", "-q"]
    implicit = records(invoke(*args, "--out", str(tmp_path / "o")).stdout)
    assert implicit[(10, "distance_from_init", None)] == 0.0  # step 10 is this run's first checkpoint
    explicit = invoke(*args, "--out", str(tmp_path / "o2"), f"--set=dynamics.init={grok_run[0]}")
    assert explicit.exit_code == 0, explicit.output
    single = invoke("dynamics", str(grok_run[1]), "--init", str(grok_run[0]), "-f", "json", "-q")
    value = records(explicit.stdout)[(10, "distance_from_init", None)]
    assert value > 0 and value == records(single.stdout)[(10, "distance_from_init", None)]
