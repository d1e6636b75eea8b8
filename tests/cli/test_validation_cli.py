"""Issue 10, failures 6-10: wrong dtypes, bad data/losses/options/baselines, the determinism check, k > dim,
tampered baselines. Each gives exit 2 and one specific line (never "unexpected ...")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import tinymodels as tm
from diag_cli.main import app
from diagnostics.checkpoint import save_checkpoint

runner = CliRunner()
TINY = ["--model", "tinymodels:build_tiny", "--data", "tinymodels:tiny_data"]

BAD = """
import torch
import tinymodels as tm


def labels_99():
    X, y = tm.tiny_data()
    y[5] = 99
    return X, y


def labels_minus_3():
    X, y = tm.tiny_data()
    y[0] = -3
    return X, y


def inf_batches():
    X, y = tm.tiny_data()
    X[12, 2] = float("inf")
    return [(X[i : i + 5], y[i : i + 5]) for i in range(0, 23, 5)]


def nan_batches():
    X, y = tm.tiny_data()
    X[21, 0] = float("nan")
    return [(X[i : i + 5], y[i : i + 5]) for i in range(0, 23, 5)]


def integer_inputs():
    X, y = tm.tiny_data()
    return (X * 10).long(), y


def five_features():
    X, y = tm.tiny_data()
    return torch.cat([X, X[:, :1]], 1), y


def vector_loss(outputs, targets):
    return torch.nn.functional.cross_entropy(outputs, targets, reduction="none")


def float_loss(outputs, targets):
    return float(torch.nn.functional.cross_entropy(outputs, targets))


def raising_loss(outputs, targets):
    raise ValueError("targets must be one-hot here")


def detached_loss(outputs, targets):
    return torch.tensor(torch.nn.functional.cross_entropy(outputs, targets).item())
"""


def diag(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def assert_line(result, *fragments: str) -> str:
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("diag: error: "), result.stderr
    assert "unexpected" not in lines[0] and "Traceback" not in result.output, lines[0]
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def bad(tmp_path: Path) -> str:
    p = tmp_path / "bad_inputs.py"
    p.write_text(BAD)
    return str(p)


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    return save_checkpoint(tmp_path / "tiny.pt", tm.build_tiny(), step=3, lr=0.1)


# ------------------------------------------------------------------------------ 6: wrong dtypes
@pytest.mark.parametrize(
    "name, dtype, kind",
    [
        ("fc1.weight", torch.complex64, "complex64"),
        ("fc2.bias", torch.int64, "int64"),
        ("fc1.bias", torch.bool, "bool"),
    ],
)
def test_non_floating_weights_are_refused_naming_the_tensor(tmp_path: Path, name: str, dtype, kind: str) -> None:
    sd = tm.build_tiny().state_dict()
    sd[name] = sd[name].to(dtype)
    p = tmp_path / "w.pt"
    torch.save(sd, p)
    assert_line(diag("hessian", p, *TINY), f"'{name}'", kind, "float")
    assert_line(diag("weights", p, "--model", "tinymodels:build_tiny"), f"'{name}'", kind)


# ---------------------------------------------------------------------- 7: specific error lines
@pytest.mark.parametrize(
    "data, loss, fragments",
    [
        ("labels_99", "cross_entropy", ["label 99", "3 classes", "batch 0"]),
        ("labels_minus_3", "cross_entropy", ["label -3", "3 classes"]),
        ("labels_99", "nll", ["label 99", "3 classes"]),
        ("labels_99", "mse", ["label 99", "3 classes"]),
        ("inf_batches", "cross_entropy", ["batch 2", "Inf", "inputs"]),
        ("nan_batches", "cross_entropy", ["batch 4", "NaN", "inputs"]),
        ("integer_inputs", "cross_entropy", ["int64 inputs", "float32", ".float()"]),
        ("five_features", "cross_entropy", ["expects 4 input features", "(23, 5)"]),
    ],
)
def test_bad_data_gets_a_specific_line(ckpt: Path, bad: str, data: str, loss: str, fragments: list[str]) -> None:
    r = diag("hessian", ckpt, "--model", "tinymodels:build_tiny", "--data", f"{bad}:{data}", "--loss", loss)
    assert_line(r, *fragments)


@pytest.mark.parametrize(
    "loss, fragments",
    [
        ("vector_loss", ["returned a tensor of shape (23,)", "not a scalar", ".mean()"]),
        ("float_loss", ["returned a float", "not a tensor"]),
        ("raising_loss", ["raised ValueError: targets must be one-hot here", "batch 0"]),
        ("detached_loss", ["does not depend on the model outputs"]),
    ],
)
@pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad=True to a scalar")
def test_bad_losses_get_a_specific_line(ckpt: Path, bad: str, loss: str, fragments: list[str]) -> None:
    assert_line(diag("hessian", ckpt, *TINY, "--loss", f"{bad}:{loss}"), *fragments)


def test_invalid_params_regex(ckpt: Path) -> None:
    assert_line(diag("hessian", ckpt, *TINY, "--params", "("), "--params '('", "not a valid regular expression")
    assert_line(diag("weights", ckpt, "--model", "tinymodels:build_tiny", "--params", "("), "--params '('")
    huge = "a{99999999999}"  # re raises OverflowError, not re.error, for a repeat count beyond its range
    assert_line(diag("hessian", ckpt, *TINY, "--params", huge), f"--params '{huge}'", "not a valid regular expression")


def test_set_option_of_the_wrong_type(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    save_checkpoint(run / "step_1.pt", tm.build_tiny())
    r = diag("run", run, *TINY, "--out", tmp_path / "o", "--set", "hessian.top_k=abc")
    assert_line(r, "hessian.top_k", "integer", "'abc'")
    (tmp_path / "diag.toml").write_text('[hessian]\ntol = "tight"\n')
    r = diag("run", run, *TINY, "--out", tmp_path / "o", "--config", tmp_path / "diag.toml")
    assert_line(r, "hessian.tol", "number", "'tight'", "diag.toml")


# ------------------------------------------------------------------- 7 and 10: baseline files
@pytest.fixture
def baseline(ckpt: Path, tmp_path: Path) -> Path:
    out = tmp_path / "base.json"
    r = diag("baseline", ckpt, *TINY, "--replicates", "3", "--samples", "20", "--out", out, "-q")
    assert r.exit_code == 0, r.output
    return out


def _edit(path: Path, fn) -> None:
    doc = json.loads(path.read_text())
    fn(doc)
    path.write_text(json.dumps(doc, indent=2))


def test_baseline_with_fractional_samples(ckpt: Path, baseline: Path) -> None:
    _edit(baseline, lambda d: d["settings"].update(samples=300.5))
    assert_line(diag("check", ckpt, *TINY, "--baseline", baseline), "settings.samples", "300.5", "whole number")


def test_baseline_without_parameter_hash(ckpt: Path, baseline: Path) -> None:
    _edit(baseline, lambda d: d["parameters"].pop("sha256"))
    assert_line(diag("check", ckpt, *TINY, "--baseline", baseline), "parameters.sha256")


def test_halved_baseline_is_refused_as_modified(ckpt: Path, baseline: Path) -> None:
    """Issue 10.10: a halved baseline passed as a 2x regression."""

    def halve(doc):
        for r in doc["replicates"]:
            r["sharpness"] /= 2
        for k in ("mean", "sd", "min", "max"):
            doc["summary"][k] /= 2

    _edit(baseline, halve)
    r = diag("check", ckpt, *TINY, "--baseline", baseline)
    assert_line(r, "was modified", "diag baseline", "--force")


def test_untouched_baseline_still_checks(ckpt: Path, baseline: Path) -> None:
    _edit(baseline, lambda d: None)  # re-serialised (other whitespace) but the same content
    r = diag("check", ckpt, *TINY, "--baseline", baseline, "-q")
    assert r.exit_code == 0, r.output
    assert "PASS" in r.stdout


# ------------------------------------------------------------------------- 9: k above the dimension
def test_top_k_above_the_dimension_is_refused_before_any_hvp(ckpt: Path) -> None:
    """Issue 10.9: --top-k 5000 on a 1,482-parameter model ran for 120 s and quietly returned 1,482 values."""
    assert_line(diag("hessian", ckpt, *TINY, "--top-k", "5000"), "--top-k 5000", "43", "--top-k 43")
    assert_line(diag("hessian", ckpt, *TINY, "--bottom-k", "44"), "--bottom-k 44", "43")
    assert_line(diag("hessian", ckpt, *TINY, "--params", "fc2.weight", "--top-k", "16"), "15")
    r = diag("hessian", ckpt, *TINY, "--top-k", "43", "-f", "json", "--dtype", "float64")
    assert r.exit_code == 0, r.output
    assert sum(x["metric"] == "eigenvalue" for x in json.loads(r.stdout)) == 43


def test_top_and_bottom_overlapping_is_said(ckpt: Path) -> None:
    r = diag("hessian", ckpt, *TINY, "--top-k", "40", "--bottom-k", "10", "-f", "json", "--dtype", "float64")
    assert r.exit_code == 0, r.output
    assert sum(x["metric"] == "bottom_eigenvalue" for x in json.loads(r.stdout)) == 3
    assert "bottom" in r.stderr and "overlap" in r.stderr
