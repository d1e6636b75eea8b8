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
    with pytest.raises(
        DiagnosticsError, match=r"--tol must be in \(0, 1\), got 1.0; drop it to use the default, 0.001$"
    ):
        resolve_config(ToyConfig, flags={"tol": 1.0})
    with pytest.raises(DiagnosticsError, match=r"--top-k must be >= 1, got 0; drop it to use the default, 1$"):
        resolve_config(ToyConfig, flags={"top_k": 0})
    with pytest.raises(DiagnosticsError, match=r"--lr must be > 0, got -1.0$"):  # no default to suggest
        resolve_config(ToyConfig, flags={"lr": -1.0})
    with pytest.raises(
        DiagnosticsError, match=r"toy.tol must be a finite number, got 'x{56}\.\.\.; drop it to use the default, 0.001$"
    ):
        resolve_config(ToyConfig, table={"tol": "x" * 60 + "y" * 1000}, table_name="toy")
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


def _one_line_error(fn, *args, match: str, **kwargs) -> str:
    with pytest.raises(DiagnosticsError, match=match) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_a_project_file_that_is_not_utf8_is_a_one_line_error(tmp_path: Path) -> None:
    f = tmp_path / "diag.toml"
    f.write_bytes(b"seed = 1\n# caf\xe9\n")  # Latin-1
    msg = _one_line_error(parse_project, f, ["toy"], match="not UTF-8")
    assert str(f) in msg and "0xe9" in msg and "re-save it as UTF-8" in msg
    f.write_bytes(b"\xff\xfe\x00")
    _one_line_error(parse_project, f, ["toy"], match="not UTF-8")


@pytest.mark.parametrize("text", ['diag = "x"\n', "diag = 3\n", "diag = [1, 2]\n"])
def test_diag_that_is_not_a_table_is_a_one_line_error(tmp_path: Path, text: str) -> None:
    f = tmp_path / "diag.toml"
    f.write_text(text)
    msg = _one_line_error(parse_project, f, ["toy"], match=r"'diag' in .*must be a table of options")
    assert str(f) in msg
    f.write_text("[diag]\nseed = 4\n[diag.toy]\ntop_k = 2\n")  # the [diag] wrapper still works
    project = parse_project(f, tables=["toy"])
    assert project.top == {"seed": 4} and project.table("toy") == {"top_k": 2}


def test_config_that_is_a_folder_says_so(tmp_path: Path) -> None:
    from diagnostics.options import find_config, read_toml

    msg = _one_line_error(find_config, tmp_path, match="is a folder, not a file")
    assert str(tmp_path) in msg and "no such" not in msg
    (tmp_path / "diag.toml").write_text("seed = 1\n")
    msg = _one_line_error(find_config, tmp_path, match="is a folder")
    assert f"--config {tmp_path / 'diag.toml'}" in msg
    _one_line_error(read_toml, tmp_path, match="is a folder")
    _one_line_error(find_config, tmp_path / "absent.toml", match="no such config file")


@pytest.mark.parametrize(
    "text, key",
    [
        ('model_kwargs = "x"\n', "model_kwargs"),
        ("data_kwargs = 3\n", "data_kwargs"),
        ("trusted_factories = 3\n", "trusted_factories"),
        ("trusted_factories = [1]\n", "trusted_factories"),
        ("analyzers = [1, 2]\n", "analyzers"),
    ],
)
def test_extra_keys_of_the_wrong_shape_are_one_line_errors(tmp_path: Path, text: str, key: str) -> None:
    f = tmp_path / "diag.toml"
    f.write_text(text)
    assert str(f) in _one_line_error(parse_project, f, ["toy"], match=f"'{key}' in .*must be")


def test_extra_keys_of_the_right_shape_are_kept(tmp_path: Path) -> None:
    f = tmp_path / "diag.toml"
    f.write_text('analyzers = "hessian"\ntrusted_factories = ["m:f"]\nmodel_kwargs = { width = 8 }\n')
    assert parse_project(f, ["toy"]).top == {
        "analyzers": "hessian",
        "trusted_factories": ["m:f"],
        "model_kwargs": {"width": 8},
    }


def test_file_output_prefix_drops_an_extension_the_suffixes_write() -> None:
    fo = FileOutput("plot", "a plot", "m:f", suffixes=(".png", "_surface.png"))
    assert fo.paths(Path("d/a.png"), None) == {".png": Path("d/a.png"), "_surface.png": Path("d/a_surface.png")}
    assert fo.paths(Path("d/a"), None) == {".png": Path("d/a.png"), "_surface.png": Path("d/a_surface.png")}
    assert fo.paths(Path("d/a.pdf"), None)[".png"] == Path("d/a.pdf.png")
    single = FileOutput("grid_out", "a grid", "m:f", require_suffix=".csv")
    assert single.paths(Path("g.csv"), None) == {"": Path("g.csv")}  # a single file is taken as given
    for bad in ("", ".", ".."):
        with pytest.raises(DiagnosticsError, match="names no file"):
            fo.paths(Path(bad), None)
