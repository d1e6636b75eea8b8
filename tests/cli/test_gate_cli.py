"""``diag baseline`` / ``diag check`` through Typer's CliRunner: exit codes, JSON, JUnit, annotations."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from typer.testing import CliRunner

from diag_cli.main import app

runner = CliRunner()


def diag(*args, env=None):
    return runner.invoke(app, [str(a) for a in args], env=env)


@pytest.fixture(scope="module")
def models(eos_pair: dict[str, Path]) -> dict[str, Path]:
    """lr 2.0 (lambda_max ~ 2/lr = 1.0 at the edge of stability) and lr 1.0 (sharper) after 800 GD steps."""
    return {"base": eos_pair["lr2"], "sharp": eos_pair["lr1"]}


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
    assert bad.exit_code == 2 and "--replicates must be in [2, 1000], got 1" in bad.stderr


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


# ------------------------------------------------------------------------- fuzzer findings (tiny model)
TINY = ["--model", "tinymodels:build_tiny", "--data", "tinymodels:tiny_data"]  # 23 samples


@pytest.fixture()
def tiny(tmp_path: Path) -> Path:
    import tinymodels as tm
    from diagnostics.checkpoint import save_checkpoint

    return save_checkpoint(tmp_path / "t.pt", tm.build_tiny(), step=3, lr=0.1)


def test_baseline_refuses_replicates_beyond_the_cap_or_the_data_at_once(tiny: Path, tmp_path: Path) -> None:
    """Fuzzer A: --replicates 99999999999999999999 hung, and so did --replicates 100000 --samples 1 on 23 samples."""
    from cliutils import one_line_error

    out = tmp_path / "nb.json"
    huge = diag("baseline", tiny, *TINY, "--replicates", "99999999999999999999", "--out", out)
    one_line_error(huge, "diag: error: --replicates must be in [2, 1000], got 99999999999999999999")
    many = diag("baseline", tiny, *TINY, "--replicates", "100000", "--samples", "1", "--out", out)
    one_line_error(many, "--replicates must be in [2, 1000], got 100000")
    subsets = diag("baseline", tiny, *TINY, "--replicates", "30", "--samples", "1", "--out", out)
    one_line_error(
        subsets,
        "diag: error: --replicates 30 with --samples 1 needs 30 different subsets of 1 sample, but the data has 23 "
        "samples and so only 23 such subsets; lower --replicates to at most 23 or raise --samples",
    )
    assert not out.exists()


def test_check_refuses_flags_that_differ_from_the_baseline(tiny: Path, tmp_path: Path) -> None:
    """Fuzzer E1: --samples 5 --seed 7 --dtype float64 were silently replaced by the baseline's settings."""
    from cliutils import one_line_error

    base = tmp_path / "base.json"
    made = diag("baseline", tiny, *TINY, "--replicates", "3", "--samples", "10", "--out", base, "-q")
    assert made.exit_code == 0, made.output
    before = base.read_bytes()
    r = diag("check", tiny, *TINY, "-b", base, "--samples", "5", "--seed", "7", "--dtype", "float64")
    one_line_error(
        r,
        "diag: error: --samples 5, --seed 7 and --dtype float64 differ from the baseline's samples=10, seed=0 and "
        "dtype=float32, but diag check re-measures with the baseline's settings; drop them, or make a new baseline "
        "with 'diag baseline ... --samples 5 --seed 7 --dtype float64'",
    )
    one_line_error(diag("check", tiny, *TINY, "-b", base, "--batch-size", "4"), "--batch-size 4 differs")
    assert base.read_bytes() == before
    same = diag("check", tiny, *TINY, "-b", base, "--samples", "10", "--seed", "0", "--dtype", "float32", "-q")
    assert same.exit_code == 0 and same.stdout.startswith("sharpness gate PASS") and same.stderr == "", same.output
    plain = diag("check", tiny, *TINY, "-b", base, "-q")  # no flag: the baseline's settings, as before
    assert plain.exit_code == 0 and plain.stdout.startswith("sharpness gate PASS"), plain.output
