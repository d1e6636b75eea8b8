"""``diag hessian`` through Typer's CliRunner: outputs, files, config, and every kind of bad input."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

import tinymodels as tm
from diag_cli.main import app
from diagnostics.checkpoint import save_checkpoint
from diagnostics.results import COLUMNS

runner = CliRunner()
TINY = ["--model", "tinymodels:build_tiny", "--data", "tinymodels:tiny_data"]


def run(*args: str):
    return runner.invoke(app, list(args))


def assert_usage_error(result, fragment: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("diag: error: ") and fragment in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert result.stdout == ""


@pytest.fixture
def tiny_ckpt(tmp_path: Path) -> Path:
    opt = torch.optim.SGD(tm.build_tiny().parameters(), lr=0.1)
    return save_checkpoint(tmp_path / "tiny.pt", tm.build_tiny(), step=7, optimizer=opt)


def test_json_records_on_stdout(tiny_ckpt: Path) -> None:
    r = run(
        "hessian",
        str(tiny_ckpt),
        *TINY,
        "--top-k",
        "3",
        "--bottom-k",
        "1",
        "--trace",
        "--format",
        "json",
        "--dtype",
        "float64",
    )
    assert r.exit_code == 0, r.output
    recs = json.loads(r.stdout)
    assert {tuple(sorted(x)) for x in recs} == {tuple(sorted(COLUMNS))}
    metrics = [x["metric"] for x in recs]
    assert metrics.count("eigenvalue") == 3 and metrics.count("bottom_eigenvalue") == 1
    assert {"trace", "eos_ratio", "eos_threshold"} <= set(metrics)
    eig = [x["value"] for x in recs if x["metric"] == "eigenvalue"]
    assert eig == sorted(eig, reverse=True)
    assert all(x["step"] == 7 and x["checkpoint"] == "tiny.pt" for x in recs)


def test_table_and_csv_output(tiny_ckpt: Path) -> None:
    r = run("hessian", str(tiny_ckpt), *TINY)
    assert r.exit_code == 0 and "eigenvalue" in r.stdout and "hvp_count=" in r.stdout
    r = run("hessian", str(tiny_ckpt), *TINY, "-f", "csv")
    assert r.stdout.splitlines()[0] == "checkpoint,step,analyzer,metric,value,stderr,index,group"


@pytest.mark.parametrize("suffix", [".json", ".csv", ".parquet", ".md"])
def test_out_files_and_no_overwrite(tiny_ckpt: Path, tmp_path: Path, suffix: str) -> None:
    out = tmp_path / f"res{suffix}"
    r = run("hessian", str(tiny_ckpt), *TINY, "--out", str(out), "-q")
    assert r.exit_code == 0, r.output
    assert out.stat().st_size > 0
    if suffix == ".json":
        payload = json.loads(out.read_text())
        assert payload["metadata"]["hvp_count"] > 0 and payload["records"][0]["metric"] == "eigenvalue"
    if suffix == ".parquet":
        assert pd.read_parquet(out)["metric"].iloc[0] == "eigenvalue"
    before = out.read_bytes()
    r = run("hessian", str(tiny_ckpt), *TINY, "--out", str(out))
    assert_usage_error(r, "exists; pass --force")
    assert out.read_bytes() == before
    assert run("hessian", str(tiny_ckpt), *TINY, "--out", str(out), "--force").exit_code == 0


def test_out_refuses_to_overwrite_the_checkpoint(tiny_ckpt: Path) -> None:
    before = tiny_ckpt.read_bytes()
    r = run("hessian", str(tiny_ckpt), *TINY, "--out", str(tiny_ckpt), "--force")
    assert r.exit_code == 2 and tiny_ckpt.read_bytes() == before


def test_density_out_writes_csv_and_png(tiny_ckpt: Path, tmp_path: Path) -> None:
    prefix = tmp_path / "dens"
    r = run(
        "hessian", str(tiny_ckpt), *TINY, "--density-out", str(prefix), "--density-probes", "2", "--density-steps", "20"
    )
    assert r.exit_code == 0, r.output
    df = pd.read_csv(tmp_path / "dens.csv")
    assert list(df.columns) == ["group", "eigenvalue", "density"]
    assert (tmp_path / "dens.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "negative_mass" in r.stdout


def test_per_layer_and_per_class_groups(tiny_ckpt: Path) -> None:
    r = run("hessian", str(tiny_ckpt), *TINY, "--per-layer", "--per-class", "-f", "json")
    groups = {x["group"] for x in json.loads(r.stdout)}
    assert {None, "fc1", "fc2", "class=0", "class=1", "class=2"} <= groups


def test_self_describing_checkpoint_needs_no_flags(digits_run: list[Path]) -> None:
    r = run("hessian", str(digits_run[-1]), "--samples", "300", "-f", "json")
    assert r.exit_code == 0, r.output
    recs = {x["metric"]: x["value"] for x in json.loads(r.stdout)}
    assert recs["eos_threshold"] == pytest.approx(1.0)  # lr 2.0 -> 2/lr
    assert recs["eos_ratio"] == pytest.approx(recs["eigenvalue"] / 1.0)


def test_diag_toml_supplies_binding_and_defaults(tiny_ckpt: Path, tmp_path: Path) -> None:
    (tmp_path / "diag.toml").write_text(
        'model = "tinymodels:build_tiny"\ndata = "tinymodels:tiny_loader"\nseed = 5\n[hessian]\ntop_k = 2\n'
    )
    r = run("hessian", str(tiny_ckpt), "-f", "json")
    assert r.exit_code == 0, r.output
    assert [x["metric"] for x in json.loads(r.stdout)].count("eigenvalue") == 2


def test_untrusted_factory_named_in_checkpoint(tmp_path: Path) -> None:
    p = save_checkpoint(
        tmp_path / "s.pt", tm.build_tiny(), model_factory="tinymodels:build_tiny", data_factory="tinymodels:tiny_data"
    )
    assert_usage_error(run("hessian", str(p)), "not trusted")
    assert run("hessian", str(p), "--trust-checkpoint-factories").exit_code == 0


class _Exploit:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_bad_inputs_exit_2_with_one_line(tiny_ckpt: Path, tmp_path: Path) -> None:
    rand = tmp_path / "random.pt"
    rand.write_bytes(bytes(range(256)) * 8)
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(tiny_ckpt.read_bytes()[:300])
    evil = tmp_path / "evil.pt"
    marker = tmp_path / "pwned"
    torch.save({"model": _Exploit(marker)}, evil)
    raw = tmp_path / "evil.pkl"
    raw.write_bytes(pickle.dumps({"model": _Exploit(marker)}))
    wrong = tmp_path / "wrong.pt"
    torch.save(tm.build_tiny(hidden=7).state_dict(), wrong)
    nan = tmp_path / "nan.pt"
    sd = tm.build_tiny().state_dict()
    sd["fc1.bias"][0] = float("nan")
    torch.save(sd, nan)
    ck = str(tiny_ckpt)
    cases = [
        (("hessian", str(tmp_path / "missing.pt"), *TINY), "no such checkpoint"),
        (("hessian", str(rand), *TINY), "not a readable PyTorch checkpoint"),
        (("hessian", str(trunc), *TINY), "not a readable PyTorch checkpoint"),
        (("hessian", str(evil), *TINY), "weights_only"),
        (("hessian", str(raw), *TINY), "not a readable PyTorch checkpoint"),
        (("hessian", str(wrong), *TINY), "has shape (7, 4) in the checkpoint"),
        (("hessian", str(nan), *TINY), "NaN"),
        (("hessian", ck, "--model", "tinymodels:nope", "--data", "tinymodels:tiny_data"), "has no attribute 'nope'"),
        (("hessian", ck, "--model", "no_such_pkg_zz:build", "--data", "tinymodels:tiny_data"), "cannot import module"),
        (
            ("hessian", ck, "--model", "tinymodels:build_raises", "--data", "tinymodels:tiny_data"),
            "raised RuntimeError",
        ),
        (("hessian", ck, "--model", "tinymodels:build_tiny", "--data", "tinymodels:empty_data"), "empty"),
        (("hessian", ck, "--model", "tinymodels:build_tiny", "--data", "tinymodels:nan_data"), "1 NaN and 0 Inf"),
        (("hessian", ck, *TINY, "--loss", "hinge"), "unknown loss 'hinge'"),
        (("hessian", ck, *TINY, "--format", "xml"), "--format must be one of table, json, csv, md, not 'xml'"),
        (("hessian", ck, *TINY, "--top-k", "0"), "ask for at least one eigenvalue"),
        (("hessian", ck, *TINY, "--tol", "2"), "--tol must be in (0, 1)"),
        (("hessian", ck, *TINY, "--samples", "0"), "--samples must be >= 1, got 0"),
        (("hessian", ck, *TINY, "--dtype", "float16"), "--dtype must be one of float32, float64, not 'float16'"),
        (("hessian", ck, *TINY, "--params", "^conv"), "no parameter matches"),
        (("hessian", ck, *TINY, "--config", str(tmp_path / "nope.toml")), "no such config file"),
        (("hessian", ck), "no model given"),
    ]
    for args, fragment in cases:
        assert_usage_error(run(*args), fragment)
    assert not marker.exists()


@pytest.mark.parametrize("dtype,fix", [("float32", "run with --dtype float64"), ("float64", "check the model's")])
def test_an_infinite_second_derivative_stops_with_one_line(tmp_path: Path, dtype: str, fix: str) -> None:
    ck = save_checkpoint(tmp_path / "sqrt.pt", tm.build_sqrt_at_zero())
    r = run(
        "hessian",
        str(ck),
        "--model",
        "tinymodels:build_sqrt_at_zero",
        "--data",
        "tinymodels:tiny_data",
        "--dtype",
        dtype,
    )
    assert_usage_error(r, "returned NaN or Inf after 1 product(s)")
    assert fix in r.stderr


def test_unknown_option_is_a_usage_error(tiny_ckpt: Path) -> None:
    r = run("hessian", str(tiny_ckpt), "--no-such-flag")
    assert r.exit_code == 2 and "Traceback" not in r.output


def test_version_and_help() -> None:
    assert run("--version").stdout.startswith("diag ")
    r = run("hessian", "--help")
    assert r.exit_code == 0 and "--top-k" in r.stdout


def test_unconverged_note_names_the_float32_floor_or_the_budget(tiny_ckpt: Path) -> None:
    # tol=1e-9 is below float32 rounding: the note says so and names a tolerance that can be met, and
    # float64; a budget of 2 products is a budget problem: the note says --max-iter
    r = run("hessian", str(tiny_ckpt), *TINY, "--top-k", "2", "--tol", "1e-9", "--format", "json")
    assert r.exit_code == 0, r.output
    note = next(ln for ln in r.stderr.splitlines() if "Lanczos stopped" in ln)
    assert "below what float32 rounding allows here; use --tol " in note and "--dtype float64" in note, note
    assert "--max-iter" not in note
    suggested = note.split("use --tol ")[1].split()[0]
    again = run("hessian", str(tiny_ckpt), *TINY, "--top-k", "2", "--tol", suggested, "--format", "json")
    assert again.exit_code == 0 and "Lanczos stopped" not in again.stderr, again.stderr
    strict = run("hessian", str(tiny_ckpt), *TINY, "--top-k", "2", "--tol", "1e-9", "--strict-residual", "-f", "json")
    note = next(ln for ln in strict.stderr.splitlines() if "Lanczos stopped" in ln)
    assert "every error bound and residual met tol=1e-09" in note and "float32 rounding" in note, note
    short = run("hessian", str(tiny_ckpt), *TINY, "--top-k", "2", "--max-iter", "2", "--format", "json")
    assert short.exit_code == 0, short.output
    note = next(ln for ln in short.stderr.splitlines() if "Lanczos stopped" in ln)
    assert note.rstrip().endswith("raise --max-iter (each eigenvalue's error bound is in stderr)"), note
