"""Declarations -> options: types, bounds, choices, precedence flag > diag.toml > default, unknown keys."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from diagnostics.errors import DiagnosticsError
from diagnostics.options import BindingOptions, parse_project
from diagnostics.spec import FileOutput, option, params_of, resolve_config


@dataclass
class ToyConfig:
    top_k: int = option(1, help="how many", min=1, short="-k")
    tol: float = option(1e-3, help="tolerance", min=0, max=1, min_open=True, max_open=True)
    method: str = option("auto", help="how", choices=("auto", "exact"))
    layers: list[str] = option(default_factory=list, help="layers")
    per_layer: bool = option(False, help="per layer")
    lr: float | None = option(None, help="learning rate", min=0, min_open=True)
    internal: int = 3  # not an option

    def validate(self) -> None:
        if self.method == "exact" and self.top_k > 5:
            raise DiagnosticsError("--method exact takes --top-k <= 5")


def test_params_are_the_option_fields_with_their_types() -> None:
    ps = {p.name: p for p in params_of(ToyConfig)}
    assert list(ps) == ["top_k", "tol", "method", "layers", "per_layer", "lr"]
    assert ps["top_k"].kind is int and not ps["top_k"].optional and ps["top_k"].flag == "--top-k"
    assert ps["lr"].kind is float and ps["lr"].optional
    assert ps["layers"].kind is list and ps["layers"].default == []
    assert ps["per_layer"].flag == "--per-layer"


def test_flag_wins_over_table_which_wins_over_default() -> None:
    cfg = resolve_config(
        ToyConfig, flags={"top_k": None, "tol": 0.01}, table={"top_k": 4, "tol": 0.5}, table_name="toy"
    )
    assert cfg.top_k == 4 and cfg.tol == 0.01 and cfg.method == "auto" and cfg.internal == 3
    assert resolve_config(ToyConfig).top_k == 1


def test_table_values_are_coerced_and_checked_with_the_option_name() -> None:
    cfg = resolve_config(ToyConfig, table={"top_k": "3", "per_layer": "true", "layers": "a,b"}, table_name="toy")
    assert cfg.top_k == 3 and cfg.per_layer is True and cfg.layers == ["a", "b"]
    with pytest.raises(DiagnosticsError, match=r"toy.top_k must be an integer, got 'abc'"):
        resolve_config(ToyConfig, table={"top_k": "abc"}, table_name="toy")
    with pytest.raises(DiagnosticsError, match=r"toy.top_k must be an integer, got 2.5"):
        resolve_config(ToyConfig, table={"top_k": 2.5}, table_name="toy")
    with pytest.raises(DiagnosticsError, match=r"--tol must be in \(0, 1\), got 1.0"):
        resolve_config(ToyConfig, flags={"tol": 1.0})
    with pytest.raises(DiagnosticsError, match=r"--top-k must be >= 1, got 0"):
        resolve_config(ToyConfig, flags={"top_k": 0})
    with pytest.raises(
        DiagnosticsError, match=r"--method must be one of auto, exact, not 'exakt'; did you mean 'exact'\?"
    ):
        resolve_config(ToyConfig, flags={"method": "exakt"})
    with pytest.raises(DiagnosticsError, match="--method exact takes"):
        resolve_config(ToyConfig, flags={"method": "exact", "top_k": 6})


def test_unknown_table_key_is_an_error_with_did_you_mean() -> None:
    with pytest.raises(DiagnosticsError, match=r"unknown option 'top_kk' in \[toy\]; did you mean 'top_k'\?"):
        resolve_config(ToyConfig, table={"top_kk": 3}, table_name="toy")
    with pytest.raises(DiagnosticsError, match="unknown option 'internal'"):
        resolve_config(ToyConfig, table={"internal": 3}, table_name="toy")


def test_file_output_paths_from_a_prefix() -> None:
    fo = FileOutput("density_out", "x", "m:f", suffixes=(".csv", ".png"))
    assert fo.paths(Path("d/run"), None) == {".csv": Path("d/run.csv"), ".png": Path("d/run.png")}
    dyn = FileOutput("plot", "x", "m:f", suffixes=lambda cfg: (".png",) if cfg.top_k == 1 else ("_a.png", "_b.png"))
    assert list(dyn.paths(Path("p"), ToyConfig(top_k=2)).values()) == [Path("p_a.png"), Path("p_b.png")]


def test_project_file_keys_are_all_checked(tmp_path: Path) -> None:
    f = tmp_path / "diag.toml"
    f.write_text('model = "m:build"\nseed = 3\n[toy]\ntop_k = 2\n')
    project = parse_project(f, tables=["toy"])
    assert project.table("toy") == {"top_k": 2}
    b = project.binding({"seed": None, "samples": 10})
    assert isinstance(b, BindingOptions) and b.model == "m:build" and b.seed == 3 and b.samples == 10
    f.write_text('modle = "m:build"\n')
    with pytest.raises(DiagnosticsError, match=r"unknown option 'modle' in .*diag.toml; did you mean 'model'\?"):
        parse_project(f, tables=["toy"])
    f.write_text("[tyo]\ntop_k = 2\n")
    with pytest.raises(DiagnosticsError, match=r"unknown table \[tyo\] .*did you mean 'toy'\?"):
        parse_project(f, tables=["toy"])
    f.write_text('seed = "x"\n')
    with pytest.raises(DiagnosticsError, match="seed must be an integer"):
        parse_project(f, tables=["toy"]).binding()
