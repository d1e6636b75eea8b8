"""``diag compare`` through Typer's CliRunner on the digits example: aligned and raw barriers, eigenspace overlap,
the permuted checkpoint, two runs paired by step, and ``diag run`` comparing consecutive checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from diag_cli.main import app
from diagnostics.checkpoint import load_checkpoint
from diagnostics.examples.digits import train_gd
from diagnostics.runs import paired_checkpoints

runner = CliRunner()
FAST = ["--samples", "300", "-q"]


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def records(result) -> list[dict]:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def by_metric(rows: list[dict]) -> dict[tuple[str, str | None], float]:
    return {(r["metric"], r["group"]): r["value"] for r in rows}


def permuted_checkpoint(src: Path, dst: Path, seed: int = 0) -> Path:
    """The digits MLP of ``src`` with the hidden units of both layers permuted by hand (same function)."""
    payload = torch.load(src, weights_only=True)
    w = payload["model"]
    g = torch.Generator().manual_seed(seed)
    p0, p1 = (
        torch.randperm(w["features.0.bias"].numel(), generator=g),
        torch.randperm(w["features.2.bias"].numel(), generator=g),
    )
    w["features.0.weight"], w["features.0.bias"] = w["features.0.weight"][p0], w["features.0.bias"][p0]
    w["features.2.weight"], w["features.2.bias"] = w["features.2.weight"][p1][:, p0], w["features.2.bias"][p1]
    w["head.weight"] = w["head.weight"][:, p1]
    torch.save(payload, dst)
    return dst


def test_barrier_with_alignment_emits_aligned_and_raw_barriers(digits_run: list[Path], tmp_path: Path) -> None:
    a = digits_run[-1]
    b = permuted_checkpoint(a, tmp_path / "permuted.pt")
    saved = tmp_path / "aligned.pt"
    rows = records(
        run(
            "compare",
            a,
            b,
            "--metrics",
            "barrier",
            "--align",
            "weights",
            "--save-aligned",
            saved,
            "--dtype",
            "float64",
            "-f",
            "json",
            *FAST,
        )
    )
    values = by_metric(rows)
    assert {r["metric"] for r in rows} == {
        "barrier",
        "barrier_unaligned",
        "accuracy_barrier",
        "accuracy_barrier_unaligned",
    }
    assert abs(values[("barrier", None)]) < 1e-12 and abs(values[("accuracy_barrier", None)]) < 1e-12
    assert values[("barrier_unaligned", None)] > 0.01
    assert {r["checkpoint"] for r in rows} == {a.name} and {r["analyzer"] for r in rows} == {"compare"}
    ck = load_checkpoint(saved)  # a checkpoint like any other: loads without running code
    original = load_checkpoint(a)
    assert set(ck.state_dict) == set(original.state_dict)
    assert all(torch.equal(ck.state_dict[k], v.double()) for k, v in original.state_dict.items())
    assert ck.metadata["aligned_to"] == a.name and ck.step == original.step
    assert ck.factories["model"] == "diagnostics.examples.digits:build_mlp"
    rows = records(run("compare", saved, a, "--metrics", "distance", "--dtype", "float64", "-f", "json", *FAST))
    assert by_metric(rows)[("weight_distance", None)] == 0.0


def overlap(digits_run: list[Path], *args):
    """``diag compare`` of the run's second and third checkpoints, overlap only, records as JSON."""
    return run("compare", digits_run[1], digits_run[2], "--metrics", "overlap", "-f", "json", *args)


def test_overlap_top_k_emits_the_eigenspace_overlap(digits_run: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "overlap.json"
    rows = records(overlap(digits_run, "--top-k", "5", "--out", out, *FAST))
    assert [r["metric"] for r in rows] == ["eigenspace_overlap"]
    assert 0.0 < rows[0]["value"] <= 1.0 + 1e-6
    meta = json.loads(out.read_text())["metadata"]
    info = meta["overlap"]
    assert info["k"] == 5 and len(info["a"]["eigenvalues"]) == 5 and info["stopping"].startswith("vector residual")
    for side in ("a", "b"):
        if info[side]["converged"]:
            assert max(info[side]["relative_residuals"]) <= 1e-4
    assert meta["hvp_count"] > 0 and meta["analyzer"] == "compare"


def test_overlap_below_the_float32_floor_names_a_tolerance_that_can_be_met(
    digits_run: list[Path], tmp_path: Path
) -> None:
    # --tol 1e-9 on the Ritz vectors is below float32 rounding: the note says so (not "--max-iter", which
    # cannot help), the runs stop well short of the budget, and the tolerance it names is met on a rerun
    args = ["--top-k", "3", "--samples", "300"]  # not -q: the notes are what is tested
    out = tmp_path / "floor.json"
    r = overlap(digits_run, *args, "--tol", "1e-9", "--out", out)
    assert r.exit_code == 0, r.output
    info = json.loads(out.read_text())["metadata"]["overlap"]
    assert all(info[side]["iterations"] < 300 for side in ("a", "b"))  # the budget (--max-iter) is 300 each
    notes = [ln for ln in r.stderr.splitlines() if "did not reach --tol 1e-09" in ln]
    assert len(notes) == 2 and all("below what float32 rounding allows here" in n for n in notes), r.stderr
    assert all("--max-iter" not in n and "--dtype float64" in n for n in notes)
    suggested = max(float(n.split("use --tol ")[1].split()[0]) for n in notes)
    again = overlap(digits_run, *args, "--tol", suggested)
    assert again.exit_code == 0 and "did not reach" not in again.stderr, again.stderr


def test_save_aligned_and_bad_options_are_one_line_errors(digits_run: list[Path], tmp_path: Path) -> None:
    a, b = digits_run[1], digits_run[2]
    r = run("compare", a, b, "--save-aligned", tmp_path / "x.pt", *FAST)
    assert r.exit_code == 2 and "--align weights" in r.stderr and "Traceback" not in r.output
    r = run("compare", a, b, "--align", "weights", "--save-aligned", tmp_path / "x.txt", *FAST)
    assert r.exit_code == 2 and ".pt" in r.stderr
    r = run("compare", a, "--metrics", "distance", *FAST)
    assert r.exit_code == 2 and "2 checkpoint" in r.stderr
    r = run("compare", a, b, "--metrics", "distances", *FAST)
    assert r.exit_code == 2 and "did you mean 'distance'" in r.stderr
    assert not (tmp_path / "x.pt").exists()


MODEL_FILE = """
import torch
import torch.nn.functional as F
from torch import nn


class Pad(nn.Module):
    def forward(self, h):
        return F.pad(h, (0, 1))


class Padded(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.mixer, self.fc2 = nn.Linear(4, 6), Pad(), nn.Linear(7, 3)

    def forward(self, x):
        return self.fc2(self.mixer(torch.tanh(self.fc1(x))))


def build(seed=0):
    torch.manual_seed(seed)
    return Padded()


def data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(30, 4, generator=g), torch.randint(0, 3, (30,), generator=g)
"""


def test_a_model_alignment_cannot_handle_is_named(tmp_path: Path) -> None:
    from diagnostics.checkpoint import save_checkpoint

    (tmp_path / "padded.py").write_text(MODEL_FILE)
    import importlib.util

    spec = importlib.util.spec_from_file_location("padded_for_test", tmp_path / "padded.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    a = save_checkpoint(tmp_path / "a.pt", mod.build(0))
    b = save_checkpoint(tmp_path / "b.pt", mod.build(1))
    flags = ["--model", f"{tmp_path / 'padded.py'}:build", "--data", f"{tmp_path / 'padded.py'}:data", "-q"]
    r = run("compare", a, b, "--metrics", "barrier", "--align", "weights", *flags)
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "module 'mixer' (Pad)" in r.stderr and "--align none" in r.stderr
    assert records(run("compare", a, b, "--metrics", "barrier", "-f", "json", *flags))[0]["metric"] == "barrier"


@pytest.fixture(scope="module")
def second_run(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Another seed of the digits recipe, with one step the first run does not have."""
    out = tmp_path_factory.mktemp("seed1")
    return train_gd(out, lr=2.0, steps=200, width=16, seed=1, save_steps=[0, 100, 150, 200])


def test_two_runs_are_compared_step_by_step(digits_run: list[Path], second_run: list[Path], tmp_path: Path) -> None:
    run_a, run_b = digits_run[0].parent, second_run[0].parent
    out = tmp_path / "pairs.json"
    rows = records(
        run(
            "compare",
            run_a,
            run_b,
            "--metrics",
            "distance,cka",
            "--plot",
            tmp_path / "pairs",
            "--out",
            out,
            "-f",
            "json",
            *FAST,
        )
    )
    assert sorted({r["step"] for r in rows}) == [0, 100, 200]
    assert {r["checkpoint"] for r in rows} == {"step_00000.pt", "step_00100.pt", "step_00200.pt"}
    single = records(run("compare", digits_run[1], second_run[1], "--metrics", "distance,cka", "-f", "json", *FAST))
    at_100 = sorted((r["metric"], r["group"] or "", r["value"]) for r in rows if r["step"] == 100)
    assert at_100 == sorted((r["metric"], r["group"] or "", r["value"]) for r in single)
    meta = json.loads(out.read_text())["metadata"]
    assert [p["step"] for p in meta["pairs"]] == [0, 100, 200]
    assert any("150" in n for n in meta["notes"])
    assert (tmp_path / "pairs.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = run("compare", run_a, run_b, "--align", "weights", "--save-aligned", tmp_path / "x.pt", *FAST)
    assert r.exit_code == 2 and "one pair of checkpoints" in r.stderr


def test_paired_checkpoints_match_steps(digits_run: list[Path], second_run: list[Path]) -> None:
    pairs, notes = paired_checkpoints(digits_run[0].parent, second_run[0].parent)
    assert [(a.step, b.step) for a, b in pairs] == [(0, 0), (100, 100), (200, 200)]
    assert notes == ["steps only in the second run are left out: 150"]


def test_one_pair_plot_draws_the_line(digits_run: list[Path], tmp_path: Path) -> None:
    r = run(
        "compare",
        digits_run[1],
        digits_run[2],
        "--metrics",
        "barrier",
        "--align",
        "weights",
        "--steps",
        "5",
        "--plot",
        tmp_path / "line",
        *FAST,
    )
    assert r.exit_code == 0, r.output
    assert (tmp_path / "line.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_sweep_compares_each_checkpoint_with_the_previous(digits_run: list[Path], tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for ck in digits_run:
        (run_dir / ck.name).write_bytes(ck.read_bytes())
    out = tmp_path / "out"
    base = ["run", run_dir, "--analyzers", "compare", "--set", "compare.metrics=distance,cka", "--out", out, *FAST]
    rows = records(run(*base, "-f", "json"))
    assert sorted({r["step"] for r in rows}) == [100, 200]  # the first checkpoint has no previous one
    single = records(run("compare", digits_run[2], digits_run[1], "--metrics", "distance,cka", "-f", "json", *FAST))
    at_200 = sorted((r["metric"], r["group"] or "", r["value"]) for r in rows if r["step"] == 200)
    assert at_200 == sorted((r["metric"], r["group"] or "", r["value"]) for r in single)
    manifest = json.loads((out / "diag-run.json").read_text())
    assert [c["status"]["compare"] for c in manifest["checkpoints"]] == ["none", "computed", "computed"]
    again = run(*base)
    assert again.exit_code == 0 and "0 computed, 2 from cache" in again.stdout
    # a changed checkpoint changes its own comparison and the next one's (whose key holds its hash)
    payload = torch.load(digits_run[1], weights_only=True)
    payload["model"]["head.bias"] = payload["model"]["head.bias"] + 0.01
    torch.save(payload, run_dir / digits_run[1].name)
    third = run(*base)
    assert third.exit_code == 0 and "2 computed, 0 from cache" in third.stdout


def test_two_model_folders_are_two_checkpoints_not_two_runs(tmp_path: Path) -> None:
    """``save_pretrained`` / Trainer ``checkpoint-N`` folders are checkpoints: two of them are compared with each
    other, not paired step by step as runs (they have no steps to pair)."""
    pytest.importorskip("transformers")
    import hfmodels as hm

    a, b = hm.build_gpt(seed=0), hm.build_gpt(seed=1)
    a.save_pretrained(tmp_path / "a")
    b.save_pretrained(tmp_path / "b")
    rows = records(run("compare", tmp_path / "a", tmp_path / "b", "--data", "hfmodels:gpt_batches", "--metrics",
                       "distance", "--dtype", "float64", "-f", "json", "-q"))  # fmt: skip
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    exact = torch.sqrt(sum(((pa[n].detach().double() - pb[n].detach().double()) ** 2).sum() for n in pa))
    assert by_metric(rows)[("weight_distance", None)] == pytest.approx(float(exact), rel=1e-9)
