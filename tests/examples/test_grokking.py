"""The grokking example: the modular-addition split, the model, checkpoints carrying the logged accuracies,
and the example script end to end on a short run."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd
import pytest
import torch

from diagnostics import build_context, load_checkpoint, resolve_binding
from diagnostics.examples.grokking import build_model, evaluate, train, train_data, val_data

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "grokking.py"


@pytest.mark.parametrize(("p", "fraction"), [(7, 0.3), (59, 0.4)])
def test_the_split_covers_every_pair_once_with_the_right_labels(p: int, fraction: float) -> None:
    x, y = train_data(p, fraction)
    xv, yv = val_data(p, fraction)
    assert len(y) == round(fraction * p * p) and len(y) + len(yv) == p * p
    pairs = {tuple(r) for r in torch.cat([x, xv]).tolist()}
    assert pairs == {(a, b) for a in range(p) for b in range(p)}
    assert torch.equal(y, (x[:, 0] + x[:, 1]) % p) and torch.equal(yv, (xv[:, 0] + xv[:, 1]) % p)
    again, _ = train_data(p, fraction)
    assert torch.equal(again, x)
    x[0, 0] = -1  # callers get copies
    assert int(train_data(p, fraction)[0][0, 0]) >= 0


def test_checkpoints_carry_the_logged_accuracies_and_rebuild_without_flags(tmp_path: Path) -> None:
    paths = train(tmp_path, p=7, steps=30, save_every=15, lr=1e-2)
    assert [load_checkpoint(p).step for p in paths] == [0, 15, 30]
    ck = load_checkpoint(paths[-1])
    ctx = build_context(ck, resolve_binding(ck.factories))
    acc, loss = evaluate(ctx.model, *train_data(7))
    assert ck.metadata["train_accuracy"] == pytest.approx(acc) and ck.metadata["train_loss"] == pytest.approx(loss)
    val_acc, _ = evaluate(ctx.model, *val_data(7))
    assert ck.metadata["val_accuracy"] == pytest.approx(val_acc)
    assert ctx.n_samples == round(0.4 * 49)
    assert build_model(p=7).embed.weight.shape == (7, 32)


def test_the_example_script_trains_analyses_and_reports(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("grokking_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out, run = tmp_path / "report", tmp_path / "run"
    threads = torch.get_num_threads()
    try:
        assert module.main(["--out", str(out), "--run-dir", str(run), "--steps", "200", "--save-every", "100"]) == 0
    finally:
        torch.set_num_threads(threads)  # the script sets one thread
    assert (out / "index.html").is_file() and (out / "report.md").is_file()
    table = pd.read_csv(out / "grokking_by_step.csv", index_col="step")
    assert list(table.index) == [0, 100, 200]
    assert table.loc[0, "distance_from_init"] == 0.0 and table.loc[200, "distance_from_init"] > 0
    for column in ("train_accuracy", "val_accuracy", "weight_norm", "softmax_collapse_fraction", "eigenvalue"):
        assert table[column].notna().all(), column
    assert table.loc[200, "train_accuracy"] == 1.0  # the training pairs are memorised within 100 steps
