"""``diag rankme``, ``diag collapse`` and ``diag weights`` through Typer's CliRunner."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from diag_cli.main import app
from diagnostics.analyzers.collapse import CollapseConfig, analyze_collapse
from diagnostics.analyzers.rank import RankConfig, analyze_rank
from diagnostics.analyzers.registry import all_analyzers
from diagnostics.analyzers.weights import WeightsConfig, analyze_weights
from diagnostics.binding import import_callable, resolve_binding
from diagnostics.checkpoint import load_checkpoint, save_checkpoint
from diagnostics.context import build_context
from diagnostics.spec import params_of

runner = CliRunner()

TOY = """
import torch
from torch import nn


class Pair(nn.Module):
    def forward(self, x):
        return x, -x


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(5, 6)
        self.pair = Pair()
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h, _ = self.pair(torch.tanh(self.encoder(x)))
        return self.head(h)


def build():
    torch.manual_seed(0)
    return Toy()


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(60, 5, generator=g), torch.arange(3).repeat(20)


def inputs_only():
    return torch.randn(60, 5, generator=torch.Generator().manual_seed(1))
"""


@pytest.fixture
def toy(tmp_path: Path) -> Path:
    (tmp_path / "toy.py").write_text(TOY)
    save_checkpoint(tmp_path / "toy.pt", import_callable(f"{tmp_path / 'toy.py'}:build")())
    return tmp_path


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def by_key(output: str) -> dict[tuple, float]:
    return {(r["metric"], r["group"]): r["value"] for r in json.loads(output)}


def library_context(path: Path, **kw):
    ck = load_checkpoint(path)
    return build_context(ck, resolve_binding(ck.factories), **kw)


def one_line_error(res) -> str:
    assert res.exit_code == 2, res.output
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("diag: error: "), res.stderr
    assert "Traceback" not in res.output
    return lines[0]


# ---------------------------------------------------------------------------------- rankme
def test_rankme_json_equals_the_library(digits_run):
    res = invoke("rankme", digits_run[-1], "--layer", "features", "--layer", "features.0", "-f", "json")
    assert res.exit_code == 0, res.output
    got = by_key(res.stdout)
    ctx = library_context(digits_run[-1], need_targets=False)
    expected = analyze_rank(RankConfig(layers=["features", "features.0"]), ctx)
    assert got == {(r.metric, r.group): r.value for r in expected.records}
    assert {g for _, g in got} == {"features", "features.0"}


def test_rankme_subsample_plot_and_out(digits_run):
    res = invoke("rankme", digits_run[-1], "--samples", "300", "--plot", "fig", "--out", "r.json", "-q")
    assert res.exit_code == 0, res.output
    assert Path("fig.spectrum.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads(Path("r.json").read_text())
    assert saved["metadata"]["samples"] == 300
    assert {r["group"] for r in saved["records"]} == {"head:input"}
    again = invoke("rankme", digits_run[-1], "--samples", "300", "--plot", "fig")
    assert "'fig.spectrum.png' exists; pass --force" in one_line_error(again)
    assert invoke("rankme", digits_run[-1], "--samples", "300", "--plot", "fig", "--force").exit_code == 0


def test_rankme_works_on_inputs_only_data(toy):
    res = invoke("rankme", "toy.pt", "--model", "toy.py:build", "--data", "toy.py:inputs_only", "-f", "json")
    assert res.exit_code == 0, res.output
    assert ("rankme", "head:input") in by_key(res.stdout)


# -------------------------------------------------------------------------------- collapse
def test_collapse_json_equals_the_library(digits_run):
    res = invoke("collapse", digits_run[-1], "--layer", "features", "--classifier", "head", "--per-class", "-f", "json")
    assert res.exit_code == 0, res.output
    got = by_key(res.stdout)
    ctx = library_context(digits_run[-1])
    expected = analyze_collapse(CollapseConfig(layers=["features"], classifier="head", per_class=True), ctx)
    assert got == {(r.metric, r.group): r.value for r in expected.records}
    for metric in ("nc1", "nc2_equinorm", "nc2_equinorm_classifier", "nc2_equiangular", "nc3", "nc4", "cdnv"):
        assert (metric, "features") in got
    assert ("class_variance", "features/class=3") in got


def test_layerwise_collapse_with_plots(digits_run):
    res = invoke("collapse", digits_run[-1], "-l", "features.1", "-l", "features.3", "--plot", "nc", "-f", "csv", "-q")
    assert res.exit_code == 0, res.output
    table = pd.read_csv(io.StringIO(res.stdout))
    metrics = {g: set(sub["metric"]) for g, sub in table.groupby("group")}
    assert set(metrics) == {"features.1", "features.3"}
    assert "nc4" in metrics["features.3"] and "nc4" not in metrics["features.1"]
    assert "nc1" in metrics["features.1"]
    for kind in ("cosine", "layers"):
        assert Path(f"nc.{kind}.png").read_bytes()[:4] == b"\x89PNG"


def test_collapse_bad_input_exits_2_with_one_line(digits_run, toy):
    msg = one_line_error(invoke("collapse", digits_run[-1], "--layer", "encoder"))
    assert "unknown layer 'encoder'" in msg and "features.0" in msg and "head" in msg
    msg = one_line_error(invoke("collapse", digits_run[-1], "--samples", "5"))
    assert "5 samples for 10 classes" in msg
    msg = one_line_error(invoke("collapse", "toy.pt", "--model", "toy.py:build", "--data", "toy.py:inputs_only"))
    assert "'toy.py:inputs_only' gives inputs only; this analysis needs (inputs, targets)" in msg
    msg = one_line_error(invoke("collapse", "toy.pt", "--model", "toy.py:build", "--data", "toy.py:data", "-l", "pair"))
    assert "layer 'pair' gives a tuple, not a tensor" in msg
    msg = one_line_error(invoke("collapse", digits_run[-1], "--pool", "max"))
    assert "--pool must be one of mean, last, first, flatten, not 'max'" in msg
    msg = one_line_error(invoke("collapse", digits_run[-1], "--classifier", "head", "--no-use-classifier"))
    assert "--classifier and --no-use-classifier contradict" in msg
    msg = one_line_error(invoke("collapse", digits_run[-1], "--classifier", "features.1"))
    assert "without a 2-d weight" in msg


def test_rankme_unknown_layer_lists_the_modules(toy):
    msg = one_line_error(invoke("rankme", "toy.pt", "--model", "toy.py:build", "--data", "toy.py:data", "-l", "enc"))
    assert "did you mean 'encoder'" in msg and "encoder, pair, head" in msg


# --------------------------------------------------------------------------------- weights
def test_weights_needs_no_data(digits_run):
    res = invoke("weights", digits_run[-1], "-f", "json", "--plot", "w")
    assert res.exit_code == 0, res.output
    got = by_key(res.stdout)
    model = build_context(*_ck_binding(digits_run[-1]), dtype="float64").model
    expected = analyze_weights(WeightsConfig(), model)
    assert got == {(r.metric, r.group): r.value for r in expected.records}
    assert {g for _, g in got} == {"features.0", "features.2", "head"}
    assert Path("w.spectrum.png").read_bytes()[:4] == b"\x89PNG"


def test_weights_with_an_explicit_model(toy):
    res = invoke(
        "weights", "toy.pt", "--model", "toy.py:build", "--data", "toy.py:data", "-f", "json", "--min-evals", "5"
    )
    assert res.exit_code == 0, res.output
    got = by_key(res.stdout)
    w = import_callable(f"{Path.cwd() / 'toy.py'}:build")().encoder.weight.detach().double()
    assert got[("spectral_norm", "encoder")] == pytest.approx(float(torch.linalg.matrix_norm(w, 2)), rel=1e-12)
    assert ("alpha", "encoder") in got and ("alpha", "head") not in got
    assert "must be >= min_tail" in one_line_error(
        invoke("weights", "toy.pt", "--model", "toy.py:build", "--min-evals", "3")
    )
    msg = one_line_error(invoke("weights", "toy.pt"))
    assert "no model given" in msg


def test_weights_needs_no_data_factory(toy):
    res = invoke("weights", "toy.pt", "--model", "toy.py:build", "-f", "json")
    assert res.exit_code == 0, res.output
    assert ("spectral_norm", "encoder") in by_key(res.stdout)


def _ck_binding(path: Path):
    ck = load_checkpoint(path)
    return ck, resolve_binding(ck.factories)


def test_conv_feature_maps_need_an_explicit_pool(tmp_path):
    from diagnostics.examples.digits import build_cnn

    save_checkpoint(
        tmp_path / "cnn.pt",
        build_cnn(channels=4),
        model_factory="diagnostics.examples.digits:build_cnn",
        model_kwargs={"channels": 4},
        data_factory="diagnostics.examples.digits:train_data",
        data_kwargs={"n": 200, "image": True},
    )
    msg = one_line_error(invoke("rankme", "cnn.pt", "--layer", "features.5"))
    assert "shape (200, 8, 8, 8); pass --pool mean" in msg
    res = invoke("collapse", "cnn.pt", "--layer", "features.5", "--pool", "mean", "-f", "json")
    assert res.exit_code == 0, res.output
    got = by_key(res.stdout)
    # the channel means of the last ReLU are what AdaptiveAvgPool + Flatten hand to the head
    assert ("nc4", "features.5") in got and ("nc1", "head:input") not in got
    ranks = {}
    for pool in ("mean", "flatten"):
        out = invoke("rankme", "cnn.pt", "--layer", "features.5", "--pool", pool, "-f", "json")
        assert out.exit_code == 0, out.output
        ranks[pool] = by_key(out.stdout)[("rankme", "features.5")]
    assert ranks["mean"] <= 8 < ranks["flatten"]  # 8 channels pooled; 8 x 8 x 8 flattened


# ------------------------------------------------------------------------ generated commands
@pytest.mark.parametrize("name", ["collapse", "weights", "rankme"])
def test_help_shows_the_declared_options(name):
    analyzer = all_analyzers()[name]
    res = runner.invoke(app, [name, "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    for p in params_of(analyzer.config):
        if not p.info.cli:
            assert p.flag not in res.stdout
            continue
        assert p.flag in res.stdout, p.flag
        for alias in p.info.aliases:
            assert alias in res.stdout, alias
    for fo in analyzer.outputs:
        assert "--" + fo.name.replace("_", "-") in res.stdout
    if name == "collapse":
        assert "--no-use-classifier" in res.stdout and "--layer" in res.stdout and "--imbalance-ratio" in res.stdout


@pytest.mark.parametrize(
    ("name", "key", "known"), [("collapse", "per_clas", "per_class"), ("weights", "min_eval", "min_evals")]
)
def test_unknown_key_in_the_analyzer_table_exits_2_with_did_you_mean(name, key, known, digits_run):
    Path("diag.toml").write_text(f"[{name}]\n{key} = 3\n")
    msg = one_line_error(invoke(name, digits_run[-1]))
    assert f"unknown option '{key}' in [{name}]; did you mean '{known}'?" in msg


def test_collapse_options_come_from_the_diag_toml_table_and_flags_win(digits_run):
    Path("diag.toml").write_text('[collapse]\nlayers = ["features.1"]\nper_class = true\n')
    res = invoke("collapse", digits_run[-1], "-f", "json", "--out", "c.json")
    assert res.exit_code == 0, res.output
    saved = json.loads(Path("c.json").read_text())
    assert saved["metadata"]["config"]["layers"] == ["features.1"] and saved["metadata"]["config"]["per_class"]
    assert ("class_count", "features.1/class=0") in by_key(res.stdout)
    res = invoke("collapse", digits_run[-1], "--no-per-class", "--layer", "features", "-f", "json")
    assert res.exit_code == 0, res.output
    assert {g for _, g in by_key(res.stdout)} == {"features"}
