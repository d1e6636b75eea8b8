"""The record schema, conversion to pandas, and the writers.

Every analyzer returns tidy records, one measured number each::

    {checkpoint, step, analyzer, metric, value, stderr, index, group}

``stderr``, ``index`` and ``group`` may be null. ``index`` orders e.g. eigenvalues (0 = largest);
``group`` names a layer, parameter group or class. A :class:`Result` bundles the records with the run
metadata (seed, sample count, tolerances, HVP count, seconds, package versions) and optional artifacts
(arrays such as a density grid) that the CLI or the report layer may write.
"""

from __future__ import annotations

import csv
import io
import json
import math
import platform
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from diagnostics.errors import DiagnosticsError, one_line
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
        """The fields as a dict; a NaN ``value`` or ``stderr`` becomes None (JSON null)."""
        out = asdict(self)
        out["value"] = _clean_float(out["value"])
        out["stderr"] = _clean_float(out["stderr"])
        return out


@dataclass(frozen=True)
class Deferred:
    """An artifact built on first use: ``build()`` returns it (e.g. a DataFrame, so that a command whose
    result nobody tabulates never imports pandas)."""

    build: Callable[[], Any]


@dataclass(frozen=True)
class DeferredTable(Deferred):
    """A table (:func:`concat_later`) built on first use, whose ``parts`` (``{column: values}`` each) can be read
    as plain columns without building it (:meth:`Artifacts.table_parts`, :func:`table_column`)."""

    parts: tuple[dict[str, Any], ...] = ()


class Artifacts(MutableMapping[str, Any]):
    """A result's named artifacts; a :class:`Deferred` value is built the first time it is read (``[]``,
    ``get``, ``items``, ``values``) and kept."""

    def __init__(self, items: Mapping[str, Any] | None = None) -> None:
        # a plain dict is held, not copied: the caller's dict and the result see the same artifacts
        self._items: dict[str, Any] = items if isinstance(items, dict) else dict(items or {})

    def __getitem__(self, name: str) -> Any:
        value = self._items[name]
        if isinstance(value, Deferred):
            value = self._items[name] = value.build()
        return value

    def __setitem__(self, name: str, value: Any) -> None:
        self._items[name] = value

    def __delitem__(self, name: str) -> None:
        del self._items[name]

    def __contains__(self, name: object) -> bool:
        return name in self._items  # (the Mapping default reads the value, which would build it)

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def table_parts(self, name: str) -> list[dict[str, Any]]:
        """The table ``name`` as ``{column: values}`` parts, without building a deferred one (and so without
        pandas); a table already built is one part of its columns (as NumPy arrays)."""
        value = self._items[name]
        if isinstance(value, DeferredTable):
            return [dict(p) for p in value.parts]
        value = self[name]
        return [{str(c): value[c].to_numpy() for c in value.columns}]

    def __repr__(self) -> str:
        shown = {k: "<deferred>" if isinstance(v, Deferred) else type(v).__name__ for k, v in self._items.items()}
        return f"Artifacts({shown})"


def concat_later(parts: Sequence[Mapping[str, Any]]) -> DeferredTable:
    """A table built on first use: one DataFrame per part (``{column: values}``, a scalar repeated down the
    part's rows), concatenated with a fresh ``0..`` index. The values are held until then (arrays, not copies)."""
    held = [dict(p) for p in parts]
    return DeferredTable(partial(_concat_parts, held), tuple(held))


def table_column(parts: Sequence[Mapping[str, Any]], name: str) -> Any:
    """Column ``name`` of the table the ``parts`` make (:func:`concat_later`) as one NumPy array, without pandas:
    a scalar in a part is repeated down that part's rows, as the DataFrame would."""
    import numpy as np

    pieces = []
    for part in parts:
        rows = next((len(v) for v in part.values() if np.ndim(v) > 0), None)
        if rows is None:
            raise ValueError("a table part needs at least one column of values, not only scalars")
        value = part[name]
        pieces.append(np.asarray(value) if np.ndim(value) > 0 else np.full(rows, value))
    return np.concatenate(pieces) if pieces else np.empty(0)


def _concat_parts(parts: list[dict[str, Any]]) -> pd.DataFrame:
    return pd.concat([pd.DataFrame(p) for p in parts], ignore_index=True)


@dataclass
class Result:
    """Records plus the metadata that travels with them and optional named artifacts (:class:`Artifacts`:
    a :class:`Deferred` value is built on first use)."""

    records: list[Record]
    metadata: dict[str, Any] = field(default_factory=dict)
    artifacts: MutableMapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.artifacts, Artifacts):
            self.artifacts = Artifacts(self.artifacts)

    def frame(self) -> pd.DataFrame:
        """The records as a DataFrame with exactly :data:`COLUMNS` (:func:`records_to_frame`)."""
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


def records_to_csv(records: Sequence[Record]) -> str:
    """The records as CSV with the :data:`COLUMNS` header: floats in their shortest round-trip form, missing
    values empty, fields quoted only where needed; the text ``records_to_frame(records).to_csv(index=False)``
    writes, without importing pandas."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    for r in records:
        d = r.to_dict()
        writer.writerow(["" if d[c] is None else repr(d[c]) if isinstance(d[c], float) else str(d[c]) for c in COLUMNS])
    return buf.getvalue()


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
                value=float("nan") if _none(d["value"]) is None else float(d["value"]),
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


def finite_or_none(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, inf, -inf) replaced by None, in nested dicts, lists and
    tuples too: strict JSON has no such numbers (``NaN``/``Infinity`` tokens break most parsers)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return finite_or_none(obj.tolist())
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


def strict_json(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` that always writes strict JSON: non-finite floats become null (:func:`finite_or_none`),
    arrays become lists, other objects their ``str``; ``allow_nan=False`` catches anything that slips by."""
    return json.dumps(finite_or_none(obj), allow_nan=False, default=_json_default, **kwargs)


def non_finite_values(records: Sequence[Record]) -> list[dict[str, Any]]:
    """``[{"record": i, "field": "value" | "stderr", "value": "inf" | "-inf"}]`` for each infinite number of
    ``records`` (JSON writes them as null; NaN already means missing and is not listed)."""
    out = []
    for i, r in enumerate(records):
        for name in ("value", "stderr"):
            x = getattr(r, name)
            if x is not None and math.isinf(float(x)):
                out.append({"record": i, "field": name, "value": "inf" if float(x) > 0 else "-inf"})
    return out


def records_to_json(records: Sequence[Record], indent: int | None = 2) -> str:
    """The JSON array printed by ``--format json`` (strict JSON: a NaN or infinite value is null)."""
    return strict_json([r.to_dict() for r in records], indent=indent)


def format_table(records: Sequence[Record], metadata: dict[str, Any] | None = None) -> str:
    """A readable fixed-width table for the terminal, grouped by checkpoint (in order of appearance).

    Each column is right-justified to its widest cell, one space apart, as ``DataFrame.to_string(index=False)``
    lays it out, without importing pandas (printing a few records must not cost its import); ``index``,
    ``group`` and ``stderr`` are left out of a checkpoint's table where every cell is empty.
    """
    if not records:
        return "(no records)"
    groups: dict[tuple[str, int | None], list[dict[str, Any]]] = {}
    for r in records:
        d = r.to_dict()
        groups.setdefault((d["checkpoint"], d["step"]), []).append(d)
    lines: list[str] = []
    for (ckpt, step), rows in groups.items():
        lines.append(f"{ckpt}" + ("" if step is None else f"  (step {int(step)})"))
        columns = {
            "analyzer": [str(d["analyzer"]) for d in rows],
            "metric": [str(d["metric"]) for d in rows],
            "index": ["" if d["index"] is None else str(int(d["index"])) for d in rows],
            "group": ["" if d["group"] is None else str(d["group"]) for d in rows],
            "value": [_fmt_num(d["value"]) for d in rows],
            "stderr": ["" if d["stderr"] is None else _fmt_num(d["stderr"]) for d in rows],
        }
        shown = {k: v for k, v in columns.items() if k not in ("index", "group", "stderr") or any(v)}
        lines.append(fixed_width(shown))
        lines.append("")
    if metadata:
        keys = [k for k in ("hvp_count", "seconds", "seed", "samples", "dtype", "device") if k in metadata]
        if keys:
            lines.append("# " + "  ".join(f"{k}={_fmt_meta(metadata[k])}" for k in keys))
    return "\n".join(lines).rstrip() + "\n"


_ESCAPED = str.maketrans({"\t": "\\t", "\r": "\\r", "\n": "\\n"})


def fixed_width(columns: Mapping[str, Sequence[str]]) -> str:
    """``{header: cells}`` as lines of right-justified columns one space apart (tabs and line breaks in a
    cell shown escaped, so every row stays one line)."""
    cols = [[h.translate(_ESCAPED), *(c.translate(_ESCAPED) for c in cells)] for h, cells in columns.items()]
    widths = [max(len(c) for c in col) for col in cols]
    return "\n".join(" ".join(col[i].rjust(w) for col, w in zip(cols, widths)) for i in range(len(cols[0])))


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
    """Records as a Markdown table with the :data:`COLUMNS`, then the metadata in a collapsed JSON block.

    Args:
        records: the rows; floats print with 6 significant digits (``.4e`` outside ``[1e-3, 1e6)``), missing
            values as empty cells.
        metadata: run metadata, appended inside ``<details>`` as indented JSON; omitted when empty or None.

    Returns:
        The Markdown text, ending in a newline.
    """
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in records:
        d = r.to_dict()
        cells = []
        for v in (d[c] for c in COLUMNS):
            if v is None or (isinstance(v, float) and math.isnan(v)):
                cells.append("")
            elif isinstance(v, float):
                cells.append(_fmt_num(v))
            else:
                cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    if metadata:
        lines += ["", "<details><summary>run metadata</summary>", "", "```json"]
        lines.append(strict_json(metadata, indent=2))
        lines += ["```", "", "</details>"]
    return "\n".join(lines) + "\n"


NON_FINITE_KEY = "non_finite_values"


def result_json_bytes(result: Result) -> bytes:
    """The ``.json`` form of a result: ``{"metadata": {...}, "records": [...]}``, strict JSON.

    A NaN or infinite number is written as null; each infinite record value or stderr is listed in
    ``metadata["non_finite_values"]`` (:func:`non_finite_values`), so the file still says so and
    :func:`result_from_json_bytes` restores it.
    """
    metadata = dict(result.metadata)
    metadata.pop(NON_FINITE_KEY, None)
    infinite = non_finite_values(result.records)
    if infinite:
        metadata[NON_FINITE_KEY] = infinite
    payload = {"metadata": metadata, "records": [r.to_dict() for r in result.records]}
    return strict_json(payload, indent=2).encode()


def _restore_infinite(records: list[Record], listed: Any) -> list[Record]:
    """``records`` with the infinite numbers that ``metadata["non_finite_values"]`` lists put back."""
    from dataclasses import replace

    if not isinstance(listed, list):
        return records
    for item in listed:
        if not isinstance(item, Mapping) or item.get("value") not in ("inf", "-inf"):
            continue
        i, name = item.get("record"), item.get("field")
        if isinstance(i, int) and 0 <= i < len(records) and name in ("value", "stderr"):
            records[i] = replace(records[i], **{name: float(item["value"])})
    return records


def result_from_json_bytes(data: bytes, path: str | Path = "results") -> Result:
    """Inverse of :func:`result_json_bytes` (also a bare JSON array of records)."""
    try:
        payload = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise DiagnosticsError(f"'{path}' is not valid JSON ({one_line(exc)}); write it again") from exc
    if isinstance(payload, list):
        payload = {"records": payload, "metadata": {}}
    if not isinstance(payload, dict) or not isinstance(payload.get("records"), list):
        raise DiagnosticsError(f"'{path}' is not a diagnostics results file (no 'records')")
    metadata = payload.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise DiagnosticsError(f"'{path}' is not a diagnostics results file ('metadata' is not an object)")
    df = pd.DataFrame(payload["records"], columns=COLUMNS)
    return Result(_restore_infinite(frame_to_records(df), metadata.get(NON_FINITE_KEY)), metadata)


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
    meta_json = strict_json(result.metadata, indent=2)
    if suffix == ".json":
        atomic_write_bytes(path, result_json_bytes(result))
    elif suffix == ".csv":
        atomic_write_bytes(path, records_to_csv(result.records).encode())
        atomic_write_bytes(path.with_name(path.name + ".meta.json"), meta_json.encode())
    elif suffix == ".parquet":
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


def check_input_file(path: Path, what: str, fix: str) -> None:
    """Refuse an input path that is not a regular file, saying what it is instead (missing, a folder, a device or
    pipe) and what to pass (``fix``).

    Raises:
        DiagnosticsError: one line naming the path.
    """
    if path.is_file():
        return
    if not path.exists():
        raise DiagnosticsError(f"no such {what}: '{path}'; pass {fix}")
    kind = "a folder" if path.is_dir() else "not a regular file"
    raise DiagnosticsError(f"'{path}' is {kind}, not a {what}; pass {fix}")


def read_result(path: str | Path) -> Result:
    """Read what :func:`write_result` wrote (also a bare JSON array of records)."""
    path = Path(path)
    check_input_file(path, "results file", "a file diag wrote with --out (.json, .csv or .parquet)")
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
