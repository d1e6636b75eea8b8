"""Results writers: strict JSON everywhere (no NaN/Infinity tokens), infinite values kept and restored."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from diagnostics.results import (
    Record,
    Result,
    read_result,
    records_to_json,
    result_from_json_bytes,
    result_json_bytes,
    write_result,
)


def _strict_loads(text: str | bytes):
    """``json.loads`` that refuses the NaN/Infinity tokens strict JSON parsers reject."""

    def refuse(token: str):
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(text, parse_constant=refuse)


def _records() -> list[Record]:
    return [
        Record("a.pt", 1, "hessian", "eigenvalue_0", math.inf, stderr=-math.inf),
        Record("a.pt", 1, "hessian", "trace", -math.inf),
        Record("a.pt", 1, "hessian", "eos_ratio", math.nan, stderr=math.nan),
        Record("a.pt", 1, "hessian", "eigenvalue_1", 2.5, stderr=0.1),
    ]


def _metadata() -> dict:
    return {"residual": math.inf, "floor": float("nan"), "array": np.array([1.0, np.inf]), "f32": np.float32("nan")}


def test_records_json_is_strict_and_non_finite_values_are_null() -> None:
    rows = _strict_loads(records_to_json(_records()))
    assert [r["value"] for r in rows] == [None, None, None, 2.5]
    assert [r["stderr"] for r in rows] == [None, None, None, 0.1]


def test_result_json_is_strict_lists_infinities_and_round_trips() -> None:
    data = result_json_bytes(Result(_records(), _metadata()))
    payload = _strict_loads(data)
    assert payload["metadata"]["residual"] is None and payload["metadata"]["array"] == [1.0, None]
    assert payload["metadata"]["non_finite_values"] == [
        {"record": 0, "field": "value", "value": "inf"},
        {"record": 0, "field": "stderr", "value": "-inf"},
        {"record": 1, "field": "value", "value": "-inf"},
    ]
    back = result_from_json_bytes(data)
    assert [r.value for r in back.records[:2]] == [math.inf, -math.inf]
    assert back.records[0].stderr == -math.inf
    assert math.isnan(back.records[2].value) and back.records[2].stderr is None
    assert back.records[3] == _records()[3]


def test_a_results_file_of_null_values_reads_back_as_nan() -> None:
    data = json.dumps({"metadata": {}, "records": [{"checkpoint": "a", "step": 1, "analyzer": "x", "metric": "m"}]})
    (record,) = result_from_json_bytes(data.encode()).records
    assert math.isnan(record.value)


@pytest.mark.parametrize("suffix", [".json", ".csv", ".parquet", ".md"])
def test_metadata_of_every_format_is_strict_json(tmp_path: Path, suffix: str) -> None:
    path = write_result(Result(_records(), _metadata()), tmp_path / f"r{suffix}")
    if suffix == ".json":
        _strict_loads(path.read_bytes())
    elif suffix == ".csv":
        _strict_loads((tmp_path / "r.csv.meta.json").read_text())
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        _strict_loads(pq.read_table(path).schema.metadata[b"diagnostics"])
    else:
        block = path.read_text().split("```json", 1)[1].split("```", 1)[0]
        _strict_loads(block)
    if suffix != ".md":
        assert read_result(path).records[3].value == 2.5


def test_an_input_that_is_not_a_regular_file_is_named_as_such(tmp_path) -> None:
    from diagnostics.errors import DiagnosticsError
    from diagnostics.results import read_result

    cases = {
        tmp_path / "missing.json": "no such results file: '",
        tmp_path: "is a folder, not a results file",
        Path("/dev/null"): "is not a regular file, not a results file",
    }
    for path, fragment in cases.items():
        with pytest.raises(DiagnosticsError) as err:
            read_result(path)
        assert fragment in str(err.value) and "; pass a file diag wrote with --out" in str(err.value)


# ----------------------------------------------------------------- printed formats without pandas (issue 13)
def _pandas_table(records: list[Record], metadata: dict | None = None) -> str:
    """The table as the pandas implementation printed it (the reference the pandas-free one must match)."""
    import pandas as pd

    from diagnostics.results import _fmt_meta, _fmt_num, records_to_frame

    df = records_to_frame(records)
    lines: list[str] = []
    for (ckpt, step), sub in df.groupby(["checkpoint", "step"], dropna=False, sort=False):
        lines.append(f"{ckpt}" + ("" if pd.isna(step) else f"  (step {int(step)})"))
        show = pd.DataFrame(
            {
                "analyzer": sub["analyzer"],
                "metric": sub["metric"],
                "index": sub["index"].map(lambda x: "" if pd.isna(x) else str(int(x))),
                "group": sub["group"].map(lambda x: "" if x is None or pd.isna(x) else str(x)),
                "value": sub["value"].map(_fmt_num),
                "stderr": sub["stderr"].map(lambda x: "" if pd.isna(x) else _fmt_num(x)),
            }
        )
        for col in ("index", "group", "stderr"):
            if (show[col] == "").all():
                show = show.drop(columns=col)
        lines.append(show.to_string(index=False))
        lines.append("")
    if metadata:
        keys = [k for k in ("hvp_count", "seconds", "seed", "samples", "dtype", "device") if k in metadata]
        if keys:
            lines.append("# " + "  ".join(f"{k}={_fmt_meta(metadata[k])}" for k in keys))
    return "\n".join(lines).rstrip() + "\n"


def _pandas_markdown(records: list[Record]) -> str:
    import pandas as pd

    from diagnostics.results import COLUMNS, _fmt_num, records_to_frame

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in records_to_frame(records).itertuples(index=False):
        cells = []
        for v in row:
            if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
                cells.append("")
            elif isinstance(v, float):
                cells.append(_fmt_num(v))
            else:
                cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


EDGE_VALUES = [0.0, -0.0, 1.0, 1e16, 1e15, 1e-4, 1e-5, 5e-324, 0.1 + 0.2, 123456789.123, 2.0**70, -7.25e-9]
EDGE_VALUES += [math.inf, -math.inf, math.nan, 999999.5, 1e6, 0.001, 0.000999]


def _mixed_records(seed: int) -> list[Record]:
    """Records of two checkpoints (one without a step) with edge floats, missing cells and awkward names."""
    rng = np.random.default_rng(seed)
    names = ["eigenvalue", "trace", "a,comma", 'q"uote', "tab\there", "nl\nname", "ünï", "x" * 40]
    out = []
    for i in range(30):
        value = (
            EDGE_VALUES[i % len(EDGE_VALUES)]
            if i < len(EDGE_VALUES)
            else float(rng.standard_normal() * 10.0 ** rng.integers(-8, 9))
        )
        out.append(
            Record(
                checkpoint=["step_5.pt", "odd name, with comma.pt"][i % 2],
                step=[5, None][i % 2],
                analyzer=["hessian", "rankme"][int(rng.integers(2))],
                metric=names[int(rng.integers(len(names)))],
                value=value,
                stderr=None if rng.random() < 0.4 else float(rng.random()),
                index=None if rng.random() < 0.5 else int(rng.integers(-3, 200)),
                group=None if rng.random() < 0.5 else names[int(rng.integers(len(names)))],
            )
        )
    return out


@pytest.mark.parametrize("seed", range(5))
def test_printed_formats_match_the_pandas_ones_without_importing_pandas(seed: int) -> None:
    from diagnostics.results import format_markdown, format_table, records_to_csv, records_to_frame

    records = _mixed_records(seed)
    meta = {"hvp_count": 28, "seconds": 1.23456, "seed": 0, "dtype": "float32"}
    assert format_table(records, meta) == _pandas_table(records, meta)
    assert format_markdown(records) == _pandas_markdown(records)
    assert records_to_csv(records) == records_to_frame(records).to_csv(index=False)
    one = [r for r in records if r.step == 5][:3]  # only some columns filled: the empty ones are left out alike
    bare = [Record(r.checkpoint, r.step, r.analyzer, r.metric, r.value) for r in one]
    assert format_table(bare) == _pandas_table(bare)


def test_printing_records_imports_no_pandas() -> None:
    """``diag NAME`` prints its records as a table, CSV or Markdown without loading pandas (~0.3 s, ~65 MB)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from diagnostics.results import Record, format_table, format_markdown, records_to_csv\n"
        "r = [Record('a.pt', 1, 'hessian', 'eigenvalue', 2.5, 0.1, 0, None)]\n"
        "format_table(r, {'hvp_count': 3}); format_markdown(r, {'seed': 0}); records_to_csv(r)\n"
        "print(sorted(m for m in ('pandas', 'pyarrow', 'torch') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


# ----------------------------------------------------------------------------------- deferred artifacts
def test_a_deferred_artifact_is_built_once_on_first_read_and_shared_with_the_callers_dict() -> None:
    from diagnostics.results import Artifacts, Deferred

    built = []

    def build() -> list[int]:
        built.append(1)
        return [1, 2, 3]

    given = {"table": Deferred(build), "plain": 7}
    res = Result([], {}, given)
    assert isinstance(res.artifacts, Artifacts) and list(res.artifacts) == ["table", "plain"] and built == []
    assert "table" in res.artifacts and len(res.artifacts) == 2 and built == []  # keys alone build nothing
    assert res.artifacts["table"] == [1, 2, 3] and built == [1]
    assert dict(res.artifacts.items()) == {"table": [1, 2, 3], "plain": 7} and built == [1]  # kept, not rebuilt
    assert given["table"] == [1, 2, 3]  # the caller's dict is the result's, as before
    again = Result([], {}, res.artifacts)
    assert again.artifacts is res.artifacts
    lazy = Result([], {}, {"t": Deferred(build)})
    assert lazy.artifacts.get("t") == [1, 2, 3] and list(lazy.artifacts.values()) == [[1, 2, 3]] and built == [1, 1]
    assert lazy.artifacts.get("missing") is None and "missing" not in lazy.artifacts


def test_concat_later_builds_the_frame_pandas_concat_would() -> None:
    import pandas as pd

    from diagnostics.results import concat_later

    parts = [
        {"group": "fc1", "k": range(1, 4), "singular_value": np.array([3.0, 2.0, 1.0])},
        {"group": "fc2", "k": range(1, 3), "singular_value": np.array([5.0, np.nan])},
    ]
    want = pd.concat([pd.DataFrame(p) for p in parts], ignore_index=True)
    got = Result([], {}, {"spectrum": concat_later(parts)}).artifacts["spectrum"]
    pd.testing.assert_frame_equal(got, want)
    assert list(got.index) == [0, 1, 2, 3, 4] and got["group"].tolist() == ["fc1"] * 3 + ["fc2"] * 2


def test_a_deferred_tables_columns_are_read_without_building_it() -> None:
    """``table_parts``/``table_column`` give the columns the DataFrame would hold (a scalar repeated down its
    part) without building it; once built, the parts are the frame's own columns."""
    from diagnostics.results import concat_later, table_column

    parts = [
        {"group": "fc1", "k": range(1, 4), "value": np.array([3.0, 2.0, 1.0]), "acc": math.nan, "aligned": True},
        {"group": "fc2", "k": range(1, 3), "value": np.array([5.0, np.nan]), "acc": 0.5, "aligned": False},
    ]
    res = Result([], {}, {"t": concat_later(parts)})
    read = res.artifacts.table_parts("t")
    assert "<deferred>" in repr(res.artifacts)  # reading the parts built nothing
    frame = res.artifacts["t"]

    def same(xs: list, ys: list) -> bool:  # equal, NaN included
        return len(xs) == len(ys) and all(x == y or (x != x and y != y) for x, y in zip(xs, ys))

    for column in ("group", "k", "value", "acc", "aligned"):
        got = table_column(read, column)
        assert got.shape == (5,) and same(got.tolist(), frame[column].tolist()), column
        assert same(table_column(res.artifacts.table_parts("t"), column).tolist(), frame[column].tolist()), column
    assert table_column(read, "aligned").tolist() == [True] * 3 + [False] * 2
    with pytest.raises(KeyError):
        table_column(read, "missing")
    with pytest.raises(ValueError, match="at least one column of values"):
        table_column([{"only": 1.0}], "only")
    assert table_column([], "anything").shape == (0,)
