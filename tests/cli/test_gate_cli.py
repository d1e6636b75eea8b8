"""``diag baseline`` / ``diag check`` through Typer's CliRunner: exit codes, JSON, JUnit, annotations."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from diag_cli.main import app
from diagnostics.examples.digits import train_gd

runner = CliRunner()


def diag(*args, env=None):
    return runner.invoke(app, [str(a) for a in args], env=env)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """lr 2.0 (lambda_max ~ 2/lr = 1.0 at the edge of stability) and lr 1.0 (sharper) after 800 GD steps."""
    root = tmp_path_factory.mktemp("gate_cli")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {
            "base": train_gd(root / "lr2", lr=2.0, steps=800, save_steps=[800])[0],
            "sharp": train_gd(root / "lr1", lr=1.0, steps=800, save_steps=[800])[0],
        }
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def baseline_file(models, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("baseline") / "sharpness-baseline.json"
    r = diag("baseline", models["base"], "--replicates", "3", "--samples", "300", "--out", path, "-q")
    assert r.exit_code == 0, r.output
    assert "baseline: step_00800.pt: sharpness (lambda_max) mean" in r.stdout and "K=3" in r.stdout
    return path


def test_baseline_refuses_to_overwrite(models, baseline_file: Path) -> None:
    before = baseline_file.read_bytes()
    r = diag("baseline", models["base"], "--replicates", "3", "--out", baseline_file)
    assert r.exit_code == 2 and "exists; pass --force" in r.stderr
    assert baseline_file.read_bytes() == before
    bad = diag("baseline", models["base"], "--replicates", "1", "--out", baseline_file.with_name("k1.json"))
    assert bad.exit_code == 2 and "--replicates must be >= 2, got 1" in bad.stderr


def test_same_model_passes(models, baseline_file: Path, tmp_path: Path) -> None:
    out, junit = tmp_path / "gate.json", tmp_path / "junit.xml"
    r = diag("check", models["base"], "--baseline", baseline_file, "--out", out, "--junit", junit, "-q")
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("sharpness gate PASS")
    payload = json.loads(out.read_text())
    assert payload["verdict"] == "pass" and payload["ratio"] == pytest.approx(1.0, abs=1e-6)
    assert ET.parse(junit).getroot().get("failures") == "0"


def test_sharper_model_fails_with_exit_1(models, baseline_file: Path, tmp_path: Path) -> None:
    junit, summary = tmp_path / "junit.xml", tmp_path / "summary.md"
    env = {"GITHUB_ACTIONS": "true", "GITHUB_STEP_SUMMARY": str(summary)}
    r = diag("check", models["sharp"], "-b", baseline_file, "--tolerance", "0.10", "--junit", junit, env=env)
    assert r.exit_code == 1, r.output
    assert r.stdout.startswith("sharpness gate FAIL")
    assert "::error title=Sharpness gate failed::sharpness gate FAIL" in r.stdout
    assert r.stderr.strip().splitlines()[-1].startswith("diag: sharpness gate FAIL")
    suite = ET.parse(junit).getroot()
    assert suite.get("failures") == "1" and suite.find("testcase/failure") is not None
    assert "❌" in summary.read_text()
    js = diag("check", models["sharp"], "-b", baseline_file, "--format", "json", "-q")
    assert js.exit_code == 1
    payload = json.loads(js.stdout)
    assert payload["verdict"] == "fail" and payload["ratio_lower"] > 1.1 and len(payload["log_ratios"]) == 3
    lenient = diag("check", models["sharp"], "-b", baseline_file, "--tolerance", "1.0", "-q")
    assert lenient.exit_code == 0 and "::" not in lenient.stdout  # not under GitHub Actions: no annotations


def test_corrupt_or_mismatched_baseline_is_exit_2(models, baseline_file: Path, tmp_path: Path, digits_run) -> None:
    half = tmp_path / "half.json"
    half.write_bytes(baseline_file.read_bytes()[:200])
    r = diag("check", models["sharp"], "-b", half)
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert r.stderr.startswith("diag: error: ") and "is not a valid sharpness baseline" in r.stderr
    assert r.stderr.count("\n") == 1
    doc = json.loads(baseline_file.read_text())
    doc["replicates"][0]["subset_sha256"] = "f" * 64
    tampered = tmp_path / "tampered.json"
    tampered.write_text(json.dumps(doc))
    r = diag("check", models["sharp"], "-b", tampered)
    assert r.exit_code == 2 and "was modified after 'diag baseline' wrote it" in r.stderr
    other_arch = diag("check", digits_run[-1], "-b", baseline_file)
    assert other_arch.exit_code == 2 and "analysed parameters" in other_arch.stderr
    missing = diag("check", models["sharp"], "-b", tmp_path / "none.json")
    assert missing.exit_code == 2 and "no such baseline file" in missing.stderr
    neg = diag("check", models["sharp"], "-b", baseline_file, "--tolerance", "-0.5")
    assert neg.exit_code == 2 and "--tolerance" in neg.stderr
