"""The record schema, conversion to pandas, and the writers.

Every analyzer returns tidy records, one measured number each::

    {checkpoint, step, analyzer, metric, value, stderr, index, group}

``stderr``, ``index`` and ``group`` may be null. ``index`` orders e.g. eigenvalues (0 = largest);
``group`` names a layer, parameter group or class. A :class:`Result` bundles the records with the run
metadata (seed, sample count, tolerances, HVP count, seconds, package versions) and optional artifacts
(arrays such as a density grid) that the CLI or the report layer may write.
"""

from __future__ import annotations

import json
import math
import platform
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from diagnostics.errors import DiagnosticsError
from diagnostics.lazy import lazy_import
from diagnostics.outputs import RECORD_SUFFIXES, atomic_write_bytes

pd = lazy_import("pandas")

COLUMNS = ["checkpoint", "step", "analyzer", "metric", "value", "stderr", "index", "group"]
OUTPUT_SUFFIXES = RECORD_SUFFIXES


@dataclass(frozen=True)
class Record:
    """One measured number."""

    checkpoint: str
    step: int | None
    analyzer: str
    metric: str
    value: float
    stderr: float | None = None
    index: int | None = None
    group: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["value"] = _clean_float(out["value"])
        out["stderr"] = _clean_float(out["stderr"])
        return out


@dataclass
class Result:
    """Records plus the metadata that travels with them and optional named artifacts."""

    records: list[Record]
    metadata: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, Any] = field(default_factory=dict)

    def frame(self) -> pd.DataFrame:
        return records_to_frame(self.records)


def _clean_float(x: Any) -> float | None:
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) else x


def make_records(
    checkpoint: str,
    step: int | None,
    analyzer: str,
    rows: Iterable[tuple],
) -> list[Record]:
    """Build records from ``(metric, value[, stderr[, index[, group]]])`` tuples."""
    out = []
    for row in rows:
        metric, value, *rest = row
        rest = list(rest) + [None] * (3 - len(rest))
        stderr, index, group = rest
        out.append(
            Record(
                checkpoint=checkpoint,
                step=step,
                analyzer=analyzer,
                metric=metric,
                value=float(value),
                stderr=None if stderr is None else float(stderr),
                index=None if index is None else int(index),
                group=None if group is None else str(group),
            )
        )
    return out


def records_to_frame(records: Sequence[Record]) -> pd.DataFrame:
    """Records -> tidy DataFrame with exactly :data:`COLUMNS` (nullable integer step/index)."""
    df = pd.DataFrame([r.to_dict() for r in records], columns=COLUMNS)
    df["step"] = df["step"].astype("Int64")
    df["index"] = df["index"].astype("Int64")
    df["value"] = df["value"].astype("float64")
    df["stderr"] = df["stderr"].astype("float64")
    df["group"] = df["group"].astype("object")
    return df


def _none(x: Any) -> Any:
    """None for the missing-value markers a table may hold (None, NaN, pd.NA)."""
    return None if x is None or x is pd.NA or (isinstance(x, float) and math.isnan(x)) else x


def frame_to_records(df: pd.DataFrame) -> list[Record]:
    """Inverse of :func:`records_to_frame`."""
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise DiagnosticsError(f"results table lacks the columns {missing}; expected {COLUMNS}")
    out = []
    for row in df[COLUMNS].itertuples(index=False):
        d = row._asdict()
        out.append(
            Record(
                checkpoint=str(d["checkpoint"]),
                step=None if _none(d["step"]) is None else int(d["step"]),
                analyzer=str(d["analyzer"]),
                metric=str(d["metric"]),
                value=float(d["value"]),
                stderr=None if _none(d["stderr"]) is None else float(d["stderr"]),
                index=None if _none(d["index"]) is None else int(d["index"]),
                group=None if _none(d["group"]) is None else str(d["group"]),
            )
        )
    return out


def package_versions() -> dict[str, str]:
    """Versions of the packages that produced a result (for the run metadata)."""
    import importlib.metadata as md

    versions = {"python": platform.python_version()}
    for name in ("training-diagnostics", "torch", "numpy", "scipy", "pandas", "pyhessian"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    return versions


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return str(obj)


def records_to_json(records: Sequence[Record], indent: int | None = 2) -> str:
    """The JSON array printed by ``--format json``."""
    return json.dumps([r.to_dict() for r in records], indent=indent, default=_json_default)


def format_table(records: Sequence[Record], metadata: dict[str, Any] | None = None) -> str:
    """A readable fixed-width table for the terminal, grouped by checkpoint."""
    if not records:
        return "(no records)"
    df = records_to_frame(records)
    lines: list[str] = []
    for (ckpt, step), sub in df.groupby(["checkpoint", "step"], dropna=False, sort=False):
        header = f"{ckpt}" + ("" if pd.isna(step) else f"  (step {int(step)})")
        lines.append(header)
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


def _fmt_num(x: float) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "nan"
    if x == 0 or 1e-3 <= abs(x) < 1e6:
        return f"{x:.6g}"
    return f"{x:.4e}"


def _fmt_meta(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.3g}"
    return str(x)


def format_markdown(records: Sequence[Record], metadata: dict[str, Any] | None = None) -> str:
    df = records_to_frame(records)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in df.itertuples(index=False):
        cells = []
        for v in row:
            if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
                cells.append("")
            elif isinstance(v, float):
                cells.append(_fmt_num(v))
            else:
                cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    if metadata:
        lines += ["", "<details><summary>run metadata</summary>", "", "```json"]
        lines.append(json.dumps(metadata, indent=2, default=_json_default))
        lines += ["```", "", "</details>"]
    return "\n".join(lines) + "\n"


def result_json_bytes(result: Result) -> bytes:
    """The ``.json`` form of a result: ``{"metadata": {...}, "records": [...]}``."""
    payload = {
        "metadata": json.loads(json.dumps(result.metadata, default=_json_default)),
        "records": [r.to_dict() for r in result.records],
    }
    return json.dumps(payload, indent=2, default=_json_default).encode()


def result_from_json_bytes(data: bytes, path: str | Path = "results") -> Result:
    """Inverse of :func:`result_json_bytes` (also a bare JSON array of records)."""
    payload = json.loads(data)
    if isinstance(payload, list):
        payload = {"records": payload, "metadata": {}}
    if not isinstance(payload, dict) or "records" not in payload:
        raise DiagnosticsError(f"'{path}' is not a diagnostics results file (no 'records')")
    df = pd.DataFrame(payload["records"], columns=COLUMNS)
    return Result(frame_to_records(df), payload.get("metadata") or {})


def write_result(result: Result, path: str | Path) -> Path:
    """Write records and metadata to ``path`` by its suffix (.json .csv .parquet .md).

    * ``.json``: ``{"metadata": {...}, "records": [...]}``
    * ``.csv``: the tidy table; metadata in a sidecar ``<name>.meta.json``
    * ``.parquet``: the tidy table; metadata in the file's key-value metadata (key ``diagnostics``)
    * ``.md``: a Markdown table followed by the metadata
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in OUTPUT_SUFFIXES:
        raise DiagnosticsError(
            f"cannot write '{path}': unknown suffix '{path.suffix}'; use one of {', '.join(OUTPUT_SUFFIXES)}"
        )
    meta_json = json.dumps(result.metadata, indent=2, default=_json_default)
    if suffix == ".json":
        atomic_write_bytes(path, result_json_bytes(result))
    elif suffix == ".csv":
        atomic_write_bytes(path, result.frame().to_csv(index=False).encode())
        atomic_write_bytes(path.with_name(path.name + ".meta.json"), meta_json.encode())
    elif suffix == ".parquet":
        import io

        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pandas(result.frame(), preserve_index=False)
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), b"diagnostics": meta_json})
        buf = io.BytesIO()
        pq.write_table(table, buf)
        atomic_write_bytes(path, buf.getvalue())
    else:
        atomic_write_bytes(path, format_markdown(result.records, result.metadata).encode())
    return path


def read_result(path: str | Path) -> Result:
    """Read what :func:`write_result` wrote (also a bare JSON array of records)."""
    path = Path(path)
    if not path.is_file():
        raise DiagnosticsError(f"no such results file: '{path}'")
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            return result_from_json_bytes(path.read_bytes(), path)
        if suffix == ".csv":
            df = pd.read_csv(path)
            meta_path = path.with_name(path.name + ".meta.json")
            meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
            return Result(frame_to_records(df), meta)
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            raw = (table.schema.metadata or {}).get(b"diagnostics")
            return Result(frame_to_records(table.to_pandas()), json.loads(raw) if raw else {})
    except DiagnosticsError:
        raise
    except Exception as exc:  # corrupt file of a known type
        raise DiagnosticsError(f"cannot read results file '{path}': {type(exc).__name__}: {exc}") from exc
    raise DiagnosticsError(f"cannot read results from '{path}': use a .json, .csv or .parquet file")
