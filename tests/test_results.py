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
