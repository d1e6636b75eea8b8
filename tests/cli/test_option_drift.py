"""The drifts issue 11 found between flags, diag.toml keys and fields, each through the real commands."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from diag_cli.main import app

runner = CliRunner()


def diag(*args) -> object:
    return runner.invoke(app, [str(a) for a in args])


def test_hessian_per_layer_from_diag_toml_is_honoured(digits_run: list[Path], tmp_path: Path) -> None:
    # was: exit 0 and the key silently ignored
    (tmp_path / "diag.toml").write_text("[hessian]\nper_layer = true\ntop_k = 1\n")
    res = diag("hessian", digits_run[-1], "--samples", "200", "-f", "json", "-q")
    assert res.exit_code == 0, res.output
    groups = {r["group"] for r in json.loads(res.stdout) if r["metric"] == "eigenvalue"}
    assert None in groups and len(groups) > 1  # the whole model and each layer


def test_trace_samples_is_one_name_for_flag_key_and_set(digits_run: list[Path], tmp_path: Path) -> None:
    # was: `diag run` exited 2 "unknown option(s) ['trace_samples']" (the field was trace_max_samples)
    run = tmp_path / "run"
    run.mkdir()
    (run / digits_run[-1].name).write_bytes(digits_run[-1].read_bytes())
    common = ["--analyzers", "hessian", "--samples", "200", "-f", "json", "-q"]
    sets = ["--set", "hessian.trace=true", "--set", "hessian.trace_samples=7", "--set", "hessian.top_k=1"]
    res = diag("run", run, *common, *sets, "--out", tmp_path / "o")
    assert res.exit_code == 0, res.output
    assert any(r["metric"] == "trace" for r in json.loads(res.stdout))
    flag = diag("hessian", digits_run[-1], "--trace", "--trace-samples", "7", "--top-k", "1", "--samples", "200", "-q")
    assert flag.exit_code == 0, flag.output
    (tmp_path / "diag.toml").write_text("[hessian]\ntrace_max_samples = 7\n")
    old = diag("hessian", digits_run[-1], "--samples", "200", "-q")
    assert old.exit_code == 2 and "unknown option 'trace_max_samples' in [hessian]" in old.stderr


def test_layers_is_the_key_of_the_layer_flag(digits_run: list[Path], tmp_path: Path) -> None:
    # was: the flag --layer, the key layers, and rankme read `samples` for its field max_samples
    by_flag = diag("rankme", digits_run[-1], "--layer", "features.1", "--samples", "300", "-f", "json", "-q")
    (tmp_path / "diag.toml").write_text('[rankme]\nlayers = ["features.1"]\n')
    by_key = diag("rankme", digits_run[-1], "--samples", "300", "-f", "json", "-q")
    assert by_flag.exit_code == 0 and by_key.exit_code == 0, by_flag.output + by_key.output
    assert json.loads(by_flag.stdout) == json.loads(by_key.stdout)
    assert {r["group"] for r in json.loads(by_key.stdout)} == {"features.1"}
