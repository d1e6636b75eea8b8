"""The sharpness gate: the paired one-sided rule, its calibration, and digits models at the edge of stability."""

from __future__ import annotations

import copy
import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from diagnostics.analyzers.hessian import HessianConfig, analyze_hessian
from diagnostics.binding import resolve_binding
from diagnostics.checkpoint import load_checkpoint
from diagnostics.context import build_context
from diagnostics.errors import DiagnosticsError
from diagnostics.gate import (
    MAX_REPLICATES,
    GateSettings,
    check_against_baseline,
    check_replicates_fit,
    decide,
    make_baseline,
    read_baseline,
    refuse_changed_settings,
    t_quantile,
    validate_baseline,
)

SETTINGS = GateSettings(replicates=3, samples=300, tol=1e-4)


def context(path: Path, **kwargs):
    ck = load_checkpoint(path)
    return build_context(ck, resolve_binding(ck.factories), **kwargs)


@pytest.fixture(scope="module")
def baseline_doc(eos_pair: dict[str, Path]) -> dict:
    return make_baseline(context(eos_pair["lr2"]), SETTINGS)


# ------------------------------------------------------------------------------------ the rule
def test_decide_follows_the_one_sided_t_bound() -> None:
    base = [1.0, 2.0, 4.0, 1.5]
    d = [0.20, 0.15, 0.25, 0.18]
    cand = [b * math.exp(x) for b, x in zip(base, d)]
    res = decide(base, cand, tolerance=0.10)
    mean, sd = float(np.mean(d)), float(np.std(d, ddof=1))
    t = 2.3533634348018264  # t_{0.95, 3}
    assert t_quantile(0.95, 3) == pytest.approx(t, rel=1e-12)
    assert res["mean"] == pytest.approx(mean) and res["sd"] == pytest.approx(sd)
    assert res["lower"] == pytest.approx(mean - t * sd / 2)
    assert res["threshold"] == pytest.approx(math.log(1.1))
    assert res["passed"] is False  # lower bound 0.137 > log 1.1 = 0.095
    assert decide(base, cand, tolerance=0.20)["passed"] is True  # log 1.2 = 0.182 > lower bound


def test_decide_with_zero_spread_uses_the_mean() -> None:
    base = [1.0, 2.0, 3.0]
    res = decide(base, [b * 1.05 for b in base], tolerance=0.10)
    assert res["sd"] == pytest.approx(0.0, abs=1e-15) and res["lower"] == pytest.approx(math.log(1.05))
    assert res["passed"] is True
    assert decide(base, [b * 1.05 for b in base], tolerance=0.04)["passed"] is False
    assert decide(base, base, tolerance=0.0)["passed"] is True


def test_decide_rejects_bad_input() -> None:
    with pytest.raises(DiagnosticsError, match="same number"):
        decide([1.0], [1.0], 0.1)
    with pytest.raises(DiagnosticsError, match="tolerance"):
        decide([1.0, 1.0], [1.0, 1.0], -0.1)
    with pytest.raises(DiagnosticsError, match="positive and finite"):
        decide([1.0, -1.0], [1.0, 1.0], 0.1)


def test_false_alarm_rate_at_the_tolerance_boundary_is_the_nominal_level() -> None:
    """When the candidate is exactly (1 + tol) times sharper, with Gaussian replicate noise, the gate
    fires with probability 1 - confidence (the t bound is exact for normal d_i); z would give ~8.5%."""
    rng = np.random.default_rng(0)
    trials, k, tol = 4000, 5, 0.10
    base = np.ones(k)
    fails = 0
    for _ in range(trials):
        d = math.log1p(tol) + 0.05 * rng.standard_normal(k)
        fails += not decide(base.tolist(), np.exp(d).tolist(), tol)["passed"]
    rate = fails / trials
    se = math.sqrt(0.05 * 0.95 / trials)
    assert abs(rate - 0.05) < 4 * se, rate
    # and at no change (an A/A comparison) it practically never fires
    aa = sum(
        not decide(base.tolist(), np.exp(0.05 * rng.standard_normal(k)).tolist(), tol)["passed"] for _ in range(2000)
    )
    assert aa / 2000 < 0.01


# --------------------------------------------------------------------------- digits at the EoS
def test_same_checkpoint_passes_with_identical_measurements(eos_pair, baseline_doc) -> None:
    report = check_against_baseline(context(eos_pair["lr2"]), baseline_doc, tolerance=0.10)
    assert report.passed
    assert report.candidate == pytest.approx(report.baseline, rel=1e-6)
    assert abs(report.mean_log_ratio) < 1e-6
    assert "PASS" in report.headline()


def test_smaller_step_size_is_sharper_and_fails(eos_pair, baseline_doc) -> None:
    base = baseline_doc["summary"]["mean"]
    assert 0.9 < base < 1.25  # lr 2.0: lambda_max hovers near 2/lr = 1.0
    report = check_against_baseline(context(eos_pair["lr1"]), baseline_doc, tolerance=0.10)
    assert not report.passed
    assert report.ratio_lower > 1.10 and report.lower_bound > math.log(1.1)
    assert "FAIL" in report.headline()
    assert check_against_baseline(context(eos_pair["lr1"]), baseline_doc, tolerance=1.0).passed


def test_baseline_records_settings_and_replicates_equal_diag_hessian(eos_pair, baseline_doc) -> None:
    doc = baseline_doc
    assert doc["settings"]["seeds"] == [0, 1, 2] and doc["settings"]["samples"] == 300
    assert doc["settings"]["dtype"] == "float32" and doc["data"]["samples_available"] == 1437
    hashes = [r["subset_sha256"] for r in doc["replicates"]]
    assert len(set(hashes)) == 3  # three different seeded subsets
    assert all(r["samples"] == 300 and r["converged"] for r in doc["replicates"])
    # replicate i is what `diag hessian --seed s_i --samples 300 --tol 1e-4` measures
    rep = doc["replicates"][1]
    ctx = context(eos_pair["lr2"], seed=rep["seed"], samples=300)
    value = analyze_hessian(HessianConfig(top_k=1, tol=1e-4), ctx).records[0].value
    assert value == pytest.approx(rep["sharpness"], rel=1e-4)
    assert validate_baseline(copy.deepcopy(doc)) == doc


def test_a_tolerance_below_float32_rounding_is_named_in_the_baseline_and_check_notes(eos_pair) -> None:
    # tol=1e-9 cannot be met in float32: the replicates record the tolerance the floor allowed, and both
    # notes name it (and float64) instead of suggesting --max-iter, which would not help
    settings = GateSettings(replicates=2, samples=300, tol=1e-9)
    doc = make_baseline(context(eos_pair["lr2"]), settings)
    floors = [r["floor_tol"] for r in doc["replicates"]]
    assert all(1e-9 < f < 1e-3 and not r["converged"] for f, r in zip(floors, doc["replicates"]))
    note = next(n for n in doc["notes"] if n.startswith("Lanczos did not reach"))
    assert "below what float32 rounding allows here; use --tol " in note and "--dtype float64" in note, note
    assert float(note.split("use --tol ")[1].split()[0]) >= max(floors)
    report = check_against_baseline(context(eos_pair["lr2"]), doc, tolerance=0.10)
    assert any("candidate replicate: the tolerance is below what float32" in n for n in report.notes), report.notes


def test_mismatched_baselines_are_refused(eos_pair, baseline_doc, digits_run) -> None:
    ctx = context(eos_pair["lr1"])
    tampered = copy.deepcopy(baseline_doc)
    tampered["replicates"][1]["subset_sha256"] = "0" * 64
    with pytest.raises(DiagnosticsError, match="replicate 1 .* different data subset"):
        check_against_baseline(ctx, tampered)
    with pytest.raises(DiagnosticsError, match="analysed parameters .* differ"):
        check_against_baseline(context(digits_run[-1]), baseline_doc)  # width 16 vs 32
    with pytest.raises(DiagnosticsError, match="measured in float32 but the check runs in float64"):
        check_against_baseline(context(eos_pair["lr1"], dtype="float64"), baseline_doc)
    other_data = copy.deepcopy(baseline_doc)
    other_data["data"]["samples_available"] = 1000
    with pytest.raises(DiagnosticsError, match="1437 samples but the baseline's had 1000"):
        check_against_baseline(ctx, other_data)
    other_loss = copy.deepcopy(baseline_doc)
    other_loss["data"]["loss"] = "cross_entropy"
    with pytest.raises(DiagnosticsError, match="loss 'cross_entropy'"):
        check_against_baseline(ctx, other_loss)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(format="something/1"), "format is 'something/1'"),
        (lambda d: d.update(format="diagnostics-sharpness-baseline/9"), "recreate it"),
        (lambda d: d.pop("replicates"), "no 'settings' or 'replicates'"),
        (lambda d: d["replicates"].pop(), "disagree"),
        (lambda d: d["replicates"][0].update(sharpness="big"), "no finite 'sharpness'"),
        (lambda d: d["replicates"][0].update(sharpness=float("nan")), "no finite 'sharpness'"),
        (
            lambda d: d["settings"].update(replicates=1, seeds=[0]) or d["replicates"].__delitem__(slice(1, None)),
            r"settings.replicates must be in \[2, 1000\], got 1",
        ),
    ],
)
def test_corrupt_baselines_are_refused(baseline_doc, edit, message) -> None:
    doc = copy.deepcopy(baseline_doc)
    edit(doc)
    with pytest.raises(DiagnosticsError, match=message):
        validate_baseline(doc, "b.json")


def test_read_baseline_errors(tmp_path: Path) -> None:
    with pytest.raises(DiagnosticsError, match="no such baseline file"):
        read_baseline(tmp_path / "nope.json")
    (tmp_path / "half.json").write_text('{"format": "diagnostics-sharpness-baseline/1", "sett')
    with pytest.raises(DiagnosticsError, match="not a valid sharpness baseline .*not JSON"):
        read_baseline(tmp_path / "half.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(DiagnosticsError, match="a JSON list"):
        read_baseline(tmp_path / "list.json")


def test_junit_and_github_annotation_formats(eos_pair, baseline_doc) -> None:
    report = check_against_baseline(context(eos_pair["lr1"]), baseline_doc, tolerance=0.10)
    suite = ET.fromstring(report.junit_xml().split("\n", 1)[1])
    assert suite.tag == "testsuite" and suite.get("tests") == "1" and suite.get("failures") == "1"
    case = suite.find("testcase")
    assert case is not None and case.find("failure") is not None
    assert case.find("failure").get("message") == report.headline()
    props = {p.get("name"): p.get("value") for p in suite.iter("property")}
    assert float(props["ratio"]) == pytest.approx(report.ratio)
    line = report.github_annotations()
    assert line.startswith("::error title=Sharpness gate failed::sharpness gate FAIL")
    assert line.count("\n") == 1 and "%25" in line  # '%' is escaped for workflow commands
    ok = check_against_baseline(context(eos_pair["lr2"]), baseline_doc, tolerance=0.10)
    assert ok.github_annotations().startswith("::notice title=Sharpness gate passed::")
    assert ET.fromstring(ok.junit_xml().split("\n", 1)[1]).get("failures") == "0"
    assert report.to_dict()["verdict"] == "fail" and ok.to_dict()["verdict"] == "pass"


# ------------------------------------------------------- baselines edited with a recomputed checksum
@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["replicates"][0].update(sharpness=0.0), r"replicate 0 has sharpness 0 <= 0"),
        (lambda d: d["replicates"][1].update(sharpness=-1.0), r"replicate 1 has sharpness -1 <= 0"),
        (lambda d: d["settings"].update(seed=-3), r"settings.seeds \[0, 1, 2\] do not follow settings.seed -3"),
        (lambda d: d["settings"].update(samples=10**9), r"replicate 0 measured 300 samples.*means 1437"),
        (lambda d: d["settings"].update(dtype="float16"), r"settings.dtype is 'float16'"),
    ],
)
def test_forged_baselines_blame_the_baseline_file(tmp_path: Path, baseline_doc, edit, message) -> None:
    from diagnostics.gate import baseline_checksum

    doc = copy.deepcopy(baseline_doc)
    edit(doc)
    doc["checksum"] = baseline_checksum(doc)  # a consistent checksum: only the content gives it away
    path = tmp_path / "forged.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(DiagnosticsError, match=rf"'{path}' is not a valid sharpness baseline \(.*{message}"):
        read_baseline(path)


def test_decide_names_which_side_is_not_positive() -> None:
    with pytest.raises(DiagnosticsError, match=r"got -1 in the baseline; the baseline is not usable"):
        decide([1.0, -1.0], [1.0, 1.0], 0.1)
    with pytest.raises(DiagnosticsError, match=r"got 0 in the candidate; the candidate model is not near"):
        decide([1.0, 1.0], [1.0, 0.0], 0.1)


def test_baseline_and_report_are_strict_json(eos_pair, baseline_doc) -> None:
    def refuse(token: str):
        raise ValueError(token)

    doc = copy.deepcopy(baseline_doc)
    doc["replicates"][0]["residual"] = float("inf")
    assert validate_baseline(doc)  # a non-finite residual is not an error...
    from diagnostics.results import strict_json

    json.loads(strict_json(doc), parse_constant=refuse)  # ...and is written as null
    report = check_against_baseline(context(eos_pair["lr2"]), baseline_doc)
    report.upper_bound = float("inf")
    json.loads(json.dumps(report.to_dict()), parse_constant=refuse)


def test_old_baseline_with_nan_tokens_still_verifies(tmp_path: Path, baseline_doc) -> None:
    from diagnostics.gate import baseline_checksum

    doc = copy.deepcopy(baseline_doc)
    doc["replicates"][0]["residual"] = float("nan")  # what an older diag could write (NaN token)
    doc["checksum"] = baseline_checksum(doc)
    path = tmp_path / "old.json"
    path.write_text(json.dumps(doc))
    assert "NaN" in path.read_text()
    assert read_baseline(path)["checksum"] == doc["checksum"]


# ------------------------------------------------------------- replicates that the data cannot hold
def tiny_context(tmp_path: Path):
    """The tiny model over all 23 samples of tiny_data (cheap: the refusals come before any Lanczos run)."""
    import tinymodels as tm
    from diagnostics.binding import Binding
    from diagnostics.checkpoint import save_checkpoint

    path = save_checkpoint(tmp_path / "t.pt", tm.build_tiny(), step=3, lr=0.1)
    return build_context(load_checkpoint(path), Binding(model="tinymodels:build_tiny", data="tinymodels:tiny_data"))


def test_baseline_refuses_more_replicates_than_distinct_subsets_before_measuring(tmp_path: Path, monkeypatch) -> None:
    """Fuzzer A: --replicates 100000 --samples 1 on 23 samples ran on (replicates draw subsets of --samples
    samples, possibly overlapping: more of them than there are distinct subsets repeats a measurement)."""
    import diagnostics.gate as gate

    ctx = tiny_context(tmp_path)

    def no_lanczos(*args, **kwargs):
        raise AssertionError("measured before refusing")

    monkeypatch.setattr(gate, "run_lanczos", no_lanczos)
    with pytest.raises(DiagnosticsError) as err:
        make_baseline(ctx, GateSettings(replicates=24, samples=1))
    assert str(err.value) == (
        "--replicates 24 with --samples 1 needs 24 different subsets of 1 sample, but the data has 23 samples and "
        "so only 23 such subsets; lower --replicates to at most 23 or raise --samples"
    )
    with pytest.raises(DiagnosticsError, match=r"only 23 such subsets; lower --replicates to at most 23"):
        make_baseline(ctx, GateSettings(replicates=30, samples=22))  # C(23, 22) = 23
    with pytest.raises(DiagnosticsError, match=rf"^--replicates must be in \[2, {MAX_REPLICATES}\], got 10000"):
        make_baseline(ctx, GateSettings(replicates=10**20))  # all the data: only the cap bounds K
    # what fits is accepted: at most C(n, samples) subsets, or any K (up to the cap) over all the data
    for settings in (
        GateSettings(replicates=23, samples=1),
        GateSettings(replicates=253, samples=2),  # C(23, 2) = 253
        GateSettings(replicates=MAX_REPLICATES),
        GateSettings(replicates=MAX_REPLICATES, samples=23),
        GateSettings(replicates=MAX_REPLICATES, samples=500),
    ):
        check_replicates_fit(settings, 23)
    with pytest.raises(DiagnosticsError, match="only 253 such subsets"):
        check_replicates_fit(GateSettings(replicates=254, samples=2), 23)
    check_replicates_fit(GateSettings(replicates=MAX_REPLICATES, samples=300), 10**6)  # C is huge, computed lazily


def test_baseline_replicates_are_capped_in_baseline_files(baseline_doc) -> None:
    doc = copy.deepcopy(baseline_doc)
    k = MAX_REPLICATES + 1
    doc["settings"].update(replicates=k, seeds=list(range(k)))
    doc["replicates"] = [dict(doc["replicates"][0], seed=i) for i in range(k)]
    with pytest.raises(DiagnosticsError, match=rf"settings.replicates must be in \[2, {MAX_REPLICATES}\]"):
        validate_baseline(doc, "b.json")


# ------------------------------------------------------- check flags that differ from the baseline's
def test_check_flags_equal_to_the_baseline_are_accepted(baseline_doc) -> None:
    refuse_changed_settings(baseline_doc, {})
    refuse_changed_settings(baseline_doc, {"samples": None, "seed": None, "batch_size": None, "dtype": None})
    refuse_changed_settings(baseline_doc, {"samples": 300, "seed": 0, "dtype": "float32"})
    everything = copy.deepcopy(baseline_doc)
    everything["settings"]["samples"] = None  # all 1437 samples: --samples 1437 or more selects the same
    refuse_changed_settings(everything, {"samples": 1437})
    refuse_changed_settings(everything, {"samples": 5000})
    old = copy.deepcopy(baseline_doc)
    old["settings"].pop("dtype")  # a baseline without a dtype: the flag chooses it (checked against the data)
    refuse_changed_settings(old, {"dtype": "float64"})


def test_check_flags_that_differ_from_the_baseline_are_refused(baseline_doc) -> None:
    """Fuzzer E1: diag check --samples 5 --seed 7 --dtype float64 ignored the flags and passed."""
    with pytest.raises(DiagnosticsError) as err:
        refuse_changed_settings(baseline_doc, {"samples": 5})
    assert str(err.value) == (
        "--samples 5 differs from the baseline's samples=300, but diag check re-measures with the baseline's "
        "settings; drop --samples, or make a new baseline with 'diag baseline ... --samples 5'"
    )
    with pytest.raises(DiagnosticsError) as err:
        refuse_changed_settings(baseline_doc, {"samples": 5, "seed": 7, "dtype": "float64"})
    assert str(err.value) == (
        "--samples 5, --seed 7 and --dtype float64 differ from the baseline's samples=300, seed=0 and "
        "dtype=float32, but diag check re-measures with the baseline's settings; drop them, or make a new "
        "baseline with 'diag baseline ... --samples 5 --seed 7 --dtype float64'"
    )
    with pytest.raises(DiagnosticsError, match=r"^--batch-size 64 differs from the baseline's batch_size=None "):
        refuse_changed_settings(baseline_doc, {"batch_size": 64})
    everything = copy.deepcopy(baseline_doc)
    everything["settings"]["samples"] = None
    with pytest.raises(DiagnosticsError, match=r"samples=None \(all the data\), but diag check"):
        refuse_changed_settings(everything, {"samples": 1436})
