"""``diag landscape`` through Typer's CliRunner on a transformers model folder with dict batches.

The batches are HF dicts (``input_ids``, ``attention_mask``, ``labels``) with padding, so the model takes
keyword arguments, computes its own loss (``--loss model`` by default) and the loss is the mean over the
counted (shifted, non-padding) tokens, which the two batches hold in other proportions than their
sequences. The expected centre loss is written out from the logits of transformers' own model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

import hfmodels as hm
from diag_cli.main import app

runner = CliRunner()


def token_mean_loss(folder: Path) -> tuple[float, float]:
    """(mean next-token cross-entropy over every counted token, the sample-weighted mean of batch means)."""
    import transformers

    model = transformers.GPT2LMHeadModel.from_pretrained(folder, local_files_only=True).double().eval()
    total, count, means, sizes = 0.0, 0, [], []
    with torch.no_grad():
        for b in hm.gpt_batches():
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            z, y = logits[:, :-1].reshape(-1, logits.shape[-1]), b["labels"][:, 1:].reshape(-1)
            total += float(F.cross_entropy(z, y, ignore_index=-100, reduction="sum"))
            count += int((y != -100).sum())
            means.append(float(F.cross_entropy(z, y, ignore_index=-100)))
            sizes.append(b["input_ids"].shape[0])
    return total / count, sum(m * n for m, n in zip(means, sizes)) / sum(sizes)


def test_landscape_of_a_transformers_folder_on_dict_batches(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    hm.build_gpt().save_pretrained(tmp_path / "gpt")
    out = tmp_path / "res.json"
    r = runner.invoke(
        app,
        ["landscape", str(tmp_path / "gpt"), "--data", "hfmodels:gpt_batches", "--dtype", "float64",
         "--dims", "1", "--steps", "3", "--span", "0.5", "--out", str(out), "-q"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    meta = json.loads(out.read_text())["metadata"]
    want, batch_means = token_mean_loss(tmp_path / "gpt")
    assert abs(want - batch_means) > 1e-3 * want  # the token weighting matters for these batches
    assert meta["loss_centre"] == pytest.approx(want, rel=1e-10)
    assert meta["loss"] == "model" and meta["loss_weighting"].startswith("tokens:")
