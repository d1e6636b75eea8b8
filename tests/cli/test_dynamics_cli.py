"""``diag dynamics`` and ``diag run --analyzers dynamics`` on a short grokking-example run (p = 11)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import kwmodels as kw
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


# ------------------------------------------------- transformers layout: dict batches, outputs with .loss


def test_dict_batches_with_the_models_own_loss(tmp_path: Path) -> None:
    """The default --loss model gives the labels to the model; --softmax-dtypes re-runs it with keyword inputs."""
    from diagnostics.checkpoint import save_checkpoint

    path = save_checkpoint(tmp_path / "kw.pt", kw.build_classifier(), step=5)
    args = ["--model", kw.spec("build_classifier"), "--data", kw.spec("cls_batches"), "--dtype", "float64"]
    res = invoke("dynamics", str(path), *args, "--softmax-dtypes", "float32", "-f", "json", "-q")
    assert res.exit_code == 0, res.output
    got = records(res.stdout)
    model, batches = kw.build_classifier().double().eval(), kw.cls_batches()
    want = kw.gradient_cosine(model, lambda m: kw.sample_mean_loss(m, batches))
    assert got[(5, "gradient_weight_cosine", None)] == pytest.approx(want, rel=1e-10)
    for dtype in ("float64", "float32"):
        collapse = kw.collapse_fraction(model, batches, getattr(torch, dtype))
        assert got[(5, "softmax_collapse_fraction", dtype)] == collapse
    assert got[(5, "softmax_collapse_fraction", "float64")] < got[(5, "softmax_collapse_fraction", "float32")]


def test_token_level_model_loss_weights_batches_by_counted_targets(tmp_path: Path) -> None:
    """Batches of 3 and 2 sequences holding 5 and 8 counted labels: the gradient is that of the mean over the 13
    labels, not of the sample-weighted batch means."""
    from diagnostics.checkpoint import save_checkpoint

    path = save_checkpoint(tmp_path / "tagger.pt", kw.build_tagger(), step=2)
    args = ["--model", kw.spec("build_tagger"), "--data", kw.spec("token_batches"), "--dtype", "float64"]
    res = invoke("dynamics", str(path), *args, "-f", "json", "-q")
    assert res.exit_code == 0, res.output
    got = records(res.stdout)[(2, "gradient_weight_cosine", None)]
    model, batches = kw.build_tagger().double().eval(), kw.token_batches()
    token_mean = kw.gradient_cosine(model, lambda m: kw.token_mean_loss(m, batches))
    batch_mean = kw.gradient_cosine(model, lambda m: kw.batch_mean_loss(m, batches))
    assert got == pytest.approx(token_mean, rel=1e-10)
    assert abs(token_mean - batch_mean) > 1e-3


def test_save_pretrained_bert_folder_with_dict_batches(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    model = kw.build_bert()
    model.save_pretrained(tmp_path / "bert")
    args = ["--data", kw.spec("cls_batches"), "--dtype", "float64", "--softmax-dtypes", "float32", "-f", "json"]
    res = invoke("dynamics", str(tmp_path / "bert"), *args)
    assert res.exit_code == 0, res.output
    assert "not [batch, classes] logits" not in res.stderr
    got = {(m, g): v for (_, m, g), v in records(res.stdout).items()}
    model, batches = model.double(), kw.cls_batches()
    want = kw.gradient_cosine(model, lambda m: m(**kw.joined(batches)).loss)
    assert got[("gradient_weight_cosine", None)] == pytest.approx(want, rel=1e-9)
    for dtype in ("float64", "float32"):
        assert got[("softmax_collapse_fraction", dtype)] == kw.collapse_fraction(model, batches, getattr(torch, dtype))
