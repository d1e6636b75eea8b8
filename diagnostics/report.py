"""Post-hoc report of a whole run: tidy records + figures -> one self-contained HTML file and Markdown.

Everything the report shows comes from the analyzers' declarations (:mod:`diagnostics.spec`), not from
lists kept here:

* **sections**: each analyzer with records contributes its :class:`~diagnostics.spec.Section` s, in registry
  order. A section draws its ``metrics`` against the training step (one panel per metric, a line per
  index/group, up to ``max_series``; a +-1 stderr band where the records carry one - with ``--replicates K``
  the standard error across the ``K`` data subsets), its ``thresholds`` as dashed lines on the panel of its
  first metric, each labelled with the formula and the value it draws (``Threshold.label``, ``{rule}`` from
  the run info, e.g. ``(2+2β)/η = 7.6`` with heavy-ball momentum), or, when it names a ``figure``, that
  function's figures instead (``figure(frame, artifacts) -> [(name, title, Figure)]``; its ``metrics``
  then say which metrics it shows). A section whose records are absent is left out, so a run analysed
  with the Hessian alone gets the Hessian's sections only.
* **other metrics**: metrics of an analyzer that none of its sections shows (undeclared ones too, e.g. of
  a user analyzer passed as ``specs``) get one generic figure per analyzer, a panel per metric.
* **tables**: the key table has one column per metric declared ``headline=True`` (index 0 of an indexed
  one, e.g. ``eigenvalue_0``); the metric overview lists every metric with one value per checkpoint with
  its first/last/min/max and its declared definition.
* **metadata** is read through :class:`~diagnostics.runner.RunInfo` (per checkpoint and analyzer) and
  :class:`SweepManifest` (the sweep's manifest), never as free-form dicts.

The HTML embeds every figure as a base64 ``data:`` URI and has no scripts or external resources, so it
opens from disk with no server; the Markdown links the same figures as PNG files under ``figures/``.
Nothing here writes files: :meth:`Report.files` gives the bytes, the CLI (or an example script) writes them.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from diagnostics.lazy import lazy_import
from diagnostics.results import COLUMNS
from diagnostics.runner import RunInfo
from diagnostics.spec import Analyzer, Metric, Section, Threshold, load_callable

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from pandas import DataFrame

pd = lazy_import("pandas")
plots = lazy_import("diagnostics.plots")

DPI = 110
MAX_RECORD_ROWS = 2000  # the full records table is embedded in the HTML up to this many rows
KEY_COLUMN_LIMIT = 10


@dataclass(frozen=True)
class Declared:
    """What the report knows about one analyzer: the metrics and sections it declares (empty when none)."""

    name: str
    metrics: tuple[Metric, ...] = ()
    sections: tuple[Section, ...] = ()

    def metric(self, name: str) -> Metric | None:
        """The declaration of one metric (None when undeclared)."""
        return next((m for m in self.metrics if m.name == name), None)

    @property
    def shown(self) -> set[str]:
        """Metrics some section shows (as lines, in a custom figure or as a threshold)."""
        return {m for s in self.sections for m in (*s.metrics, *(t.metric for t in s.thresholds))}


def declarations(specs: Mapping[str, Any] | None = None) -> dict[str, Declared]:
    """Every analyzer's declarations, in registry order; ``specs`` (e.g. user analyzers of a sweep) are added.

    Args:
        specs: ``{name: Analyzer}`` (or a legacy spec, which declares nothing) overriding/adding to the registry.

    Returns:
        ``{name: Declared}``; an analyzer that is not an :class:`~diagnostics.spec.Analyzer` (a legacy spec)
        declares nothing, so each of its metrics gets a generic panel.
    """
    from diagnostics.analyzers.registry import all_analyzers

    found: dict[str, Any] = {**all_analyzers(), **dict(specs or {})}
    out = {}
    for name, spec in found.items():
        if isinstance(spec, Analyzer):
            out[name] = Declared(name, tuple(spec.metrics), tuple(spec.sections))
        else:
            out[name] = Declared(name)
    return out


# ------------------------------------------------------------------------------------------- metadata
@dataclass
class CheckpointEntry:
    """One checkpoint of the sweep manifest."""

    checkpoint: str = ""
    step: int | None = None
    step_source: str | None = None
    sha256: str = ""
    status: dict[str, str] = field(default_factory=dict)


@dataclass
class Failure:
    """A result the sweep could not compute."""

    checkpoint: str = ""
    analyzer: str = ""
    message: str = ""


def _typed(cls: type, data: Any) -> Any:
    """``cls(**known keys of data)`` (unknown keys ignored; a non-mapping gives the defaults)."""
    data = data if isinstance(data, Mapping) else {}
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names and v is not None})


@dataclass
class SweepManifest:
    """Typed view of a sweep's metadata (:meth:`diagnostics.runs.SweepResult.metadata`, ``diag-run.json``).

    Attributes:
        run, run_name: the run folder and its name.
        settings: what was run and how it was bound (:class:`diagnostics.runs.SweepSettings`).
        analyzer_configs: each analyzer's option values.
        checkpoints: the run's checkpoints with their step, its source, hash and per-analyzer status.
        counts: results computed, cached and failed.
        failures: the results that could not be computed.
        results: ``{checkpoint: {analyzer: RunInfo}}`` (the manifest keeps a summary of each).
        notes: warnings collected from the results.
        versions: package versions.
        created: when the sweep's metadata was made.
    """

    run: str = ""
    run_name: str = "run"
    settings: Any = None
    analyzer_configs: dict[str, Any] = field(default_factory=dict)
    checkpoints: list[CheckpointEntry] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    failures: list[Failure] = field(default_factory=list)
    results: dict[str, dict[str, RunInfo]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    created: str = ""

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any] | None) -> SweepManifest:
        """Read a sweep's metadata dict (missing keys take their defaults)."""
        from diagnostics.runs import SweepSettings

        meta = dict(meta or {})
        results = {
            str(ck): {str(a): RunInfo.from_metadata(m or {}) for a, m in (per or {}).items()}
            for ck, per in (meta.get("results") or {}).items()
        }
        return cls(
            run=str(meta.get("run") or ""),
            run_name=str(meta.get("run_name") or "run"),
            settings=SweepSettings.from_description(meta.get("settings")),
            analyzer_configs=dict(meta.get("analyzer_configs") or {}),
            checkpoints=[_typed(CheckpointEntry, c) for c in meta.get("checkpoints") or []],
            counts={str(k): int(v) for k, v in (meta.get("counts") or {}).items()},
            failures=[_typed(Failure, f) for f in meta.get("failures") or []],
            results=results,
            notes=[str(n) for n in meta.get("notes") or []],
            versions={str(k): str(v) for k, v in (meta.get("versions") or {}).items()},
            created=str(meta.get("created") or ""),
        )

    def run_infos(self) -> dict[tuple[str, str], RunInfo]:
        """``{(checkpoint, analyzer): RunInfo}`` of the results the manifest summarises."""
        return {(ck, a): info for ck, per in self.results.items() for a, info in per.items()}


# ------------------------------------------------------------------------------------- report types
@dataclass
class ReportFigure:
    """One figure of the report: ``key`` names its PNG file (``figures/<key>.png``)."""

    key: str
    title: str
    caption: str
    png: bytes


@dataclass
class Report:
    """A rendered report: the HTML page, the Markdown page and the figures as PNG bytes."""

    title: str
    html: str
    markdown: str
    figures: list[ReportFigure] = field(default_factory=list)

    def files(self) -> dict[str, bytes]:
        """``{relative path: bytes}``: ``index.html``, ``report.md`` and ``figures/<key>.png``."""
        out = {"index.html": self.html.encode(), "report.md": self.markdown.encode()}
        for f in self.figures:
            out[f"figures/{f.key}.png"] = f.png
        return out


@dataclass
class RunData:
    """Everything a report is built from.

    Attributes:
        frame: the tidy records of every checkpoint (:data:`diagnostics.results.COLUMNS`).
        manifest: the sweep's metadata.
        artifacts: ``{analyzer: {name: DataFrame}}``: each table artifact of every checkpoint, with
            ``checkpoint, step`` columns (:meth:`diagnostics.runs.SweepResult.artifact_frame`).
        runs: ``{(checkpoint, analyzer): RunInfo}``.
        analyzers: the declarations (:func:`declarations`).
    """

    frame: DataFrame
    manifest: SweepManifest
    artifacts: dict[str, dict[str, DataFrame]]
    runs: dict[tuple[str, str], RunInfo]
    analyzers: dict[str, Declared]

    @property
    def order(self) -> list[str]:
        """The checkpoints in run order."""
        listed = [c.checkpoint for c in self.manifest.checkpoints]
        return listed or list(dict.fromkeys(self.frame["checkpoint"]))

    def declared(self, analyzer: str) -> Declared:
        """One analyzer's declarations (empty for an unknown analyzer)."""
        return self.analyzers.get(analyzer) or Declared(analyzer)

    def infos(self, analyzer: str) -> list[RunInfo]:
        """The run infos of one analyzer, over the checkpoints."""
        return [info for (_, a), info in self.runs.items() if a == analyzer]

    def analyzer_order(self) -> list[str]:
        """Analyzers with records: declared ones in registry order, then the others in record order."""
        present = list(dict.fromkeys(self.frame["analyzer"]))
        return [a for a in self.analyzers if a in present] + [a for a in present if a not in self.analyzers]


# ------------------------------------------------------------------------------------------ tables
def _is_whole(group: Any) -> bool:
    return group is None or (isinstance(group, float) and math.isnan(group)) or group is pd.NA or str(group) == ""


def _is_series_group(group: Any) -> bool:
    """A group that names a series (the whole model, a layer, a parameter group), not a sub-group such as
    one class of a layer (``layer/class=3``)."""
    return _is_whole(group) or "/" not in str(group)


def _column_name(metric: str, index: Any, group: Any) -> str:
    name = metric if index is None or pd.isna(index) else f"{metric}_{int(index)}"
    return name if _is_whole(group) else f"{name}@{group}"


def _one_value(frame: DataFrame, analyzers: Mapping[str, Declared]) -> DataFrame:
    """Rows that give one value per checkpoint: no index, or index 0 of a headline (or undeclared) metric."""

    def index_ok(row: Any) -> bool:
        if pd.isna(row.index_):
            return True
        if int(row.index_) != 0:
            return False
        decl = analyzers.get(row.analyzer)
        metric = decl.metric(row.metric) if decl is not None else None
        return metric is None or metric.headline

    view = frame.rename(columns={"index": "index_"})
    keep = [index_ok(r) for r in view[["analyzer", "metric", "index_"]].itertuples(index=False)]
    return frame.loc[pd.Series(keep, index=frame.index, dtype=bool) & frame["group"].map(_is_series_group).astype(bool)]


def summary_table(frame: DataFrame, analyzers: Mapping[str, Declared] | None = None) -> DataFrame:
    """One row per checkpoint (in order), one column per metric with one value per checkpoint.

    A metric is a column when it has no index, or at index 0 when it is declared ``headline`` (``eigenvalue_0``)
    or undeclared, and a single group over the run (the whole model, or e.g. the one layer RankMe was measured
    at: ``rankme@head:input``). Per-point (landscape grid), per-layer and per-class metrics are left out (they
    are in the records and the figures). A name used by two analyzers is prefixed with the analyzer.

    Args:
        frame: the tidy records.
        analyzers: the declarations (default: :func:`declarations`).

    Returns:
        Columns ``checkpoint, step`` and one per metric.
    """
    analyzers = declarations() if analyzers is None else analyzers
    if frame.empty:
        return pd.DataFrame(columns=["checkpoint", "step"])
    df = _one_value(frame, analyzers).copy()
    df["_g"] = df["group"].map(lambda g: "" if _is_whole(g) else str(g))
    n_groups = df.groupby(["analyzer", "metric"])["_g"].transform("nunique")
    df = df[n_groups == 1]
    df["column"] = [_column_name(m, i, g) for m, i, g in zip(df["metric"], df["index"], df["group"])]
    owners = df.groupby("column")["analyzer"].nunique()
    clash = set(owners[owners > 1].index)
    df["column"] = [f"{a}.{c}" if c in clash else c for a, c in zip(df["analyzer"], df["column"])]
    order = list(dict.fromkeys(frame["checkpoint"]))
    steps = frame.drop_duplicates("checkpoint").set_index("checkpoint")["step"]
    table = df.pivot_table(index="checkpoint", columns="column", values="value", aggfunc="first", sort=False)
    table = table.reindex(order)
    table.insert(0, "step", steps.reindex(order).astype("Int64"))
    table = table.reset_index()
    table.columns.name = None
    return table


def _base(column: str) -> str:
    """``hessian.eigenvalue_0@fc1`` -> ``eigenvalue_0``."""
    return column.split("@", 1)[0].split(".", 1)[-1]


def _metric_of(column: str) -> str:
    """``eigenvalue_0@fc1`` -> ``eigenvalue``; ``trace`` -> ``trace``."""
    return re.sub(r"_\d+$", "", _base(column))


def headline_names(analyzers: Mapping[str, Declared]) -> list[str]:
    """Column names of the headline metrics, in registry and declaration order (``eigenvalue`` and
    ``eigenvalue_0`` both, since the table names an indexed metric with its index)."""
    out: list[str] = []
    for decl in analyzers.values():
        for m in decl.metrics:
            if m.headline:
                out += [m.name, f"{m.name}_0"]
    return list(dict.fromkeys(out))


def key_columns(
    table: DataFrame, analyzers: Mapping[str, Declared] | None = None, limit: int = KEY_COLUMN_LIMIT
) -> DataFrame:
    """The per-checkpoint table narrowed to the headline metrics that exist (the first columns without any).

    Args:
        table: :func:`summary_table`.
        analyzers: the declarations (default: :func:`declarations`).
        limit: at most this many metric columns.

    Returns:
        ``checkpoint, step`` and the chosen columns.
    """
    analyzers = declarations() if analyzers is None else analyzers
    cols = list(table.columns[2:])
    chosen = [c for name in headline_names(analyzers) for c in cols if _base(c) == name]
    chosen = list(dict.fromkeys(chosen))[:limit] or cols[:limit]
    return table[["checkpoint", "step", *chosen]]


def _definition(column: str, frame: DataFrame, analyzers: Mapping[str, Declared]) -> str:
    owner = column.split(".", 1)[0] if "." in column.split("@", 1)[0] else None
    metric = _metric_of(column)
    candidates = [owner] if owner else list(dict.fromkeys(frame.loc[frame["metric"] == metric, "analyzer"]))
    for a in candidates:
        decl = analyzers.get(a)
        found = decl.metric(metric) if decl is not None else None
        if found is not None:
            return found.definition + (f" ({found.reference})" if found.reference else "")
    return ""


def metric_overview(frame: DataFrame, analyzers: Mapping[str, Declared] | None = None) -> DataFrame:
    """Per metric of :func:`summary_table`: value at the first and last checkpoint, minimum and maximum (with
    their steps), and the metric's declared definition.

    Args:
        frame: the tidy records.
        analyzers: the declarations (default: :func:`declarations`).

    Returns:
        Columns ``metric, first, last, min, min at, max, max at, checkpoints, definition``.
    """
    analyzers = declarations() if analyzers is None else analyzers
    table = summary_table(frame, analyzers)
    rows = []
    for col in table.columns[2:]:
        s = table[col]
        valid = s.notna()
        if not valid.any():
            continue
        first_i, last_i = valid.idxmax(), valid[::-1].idxmax()
        rows.append(
            {
                "metric": col,
                "first": s[first_i],
                "last": s[last_i],
                "min": s.min(),
                "min at": _where(table, s.idxmin()),
                "max": s.max(),
                "max at": _where(table, s.idxmax()),
                "checkpoints": int(valid.sum()),
                "definition": _definition(col, frame, analyzers),
            }
        )
    columns = ["metric", "first", "last", "min", "min at", "max", "max at", "checkpoints", "definition"]
    return pd.DataFrame(rows, columns=columns)


def _where(table: DataFrame, i: Any) -> str:
    step = table.loc[i, "step"]
    return f"step {int(step)}" if not pd.isna(step) else str(table.loc[i, "checkpoint"])


# ------------------------------------------------------------------------------------ thresholds
_RULE_SYMBOLS = (("beta1", "β₁"), ("beta", "β"), ("lr", "η"), ("eta", "η"), ("*", ""))


def pretty_rule(rule: str) -> str:
    """A rule as recorded (``(2+2*beta)/lr``) as it reads in a figure (``(2+2β)/η``)."""
    for plain, symbol in _RULE_SYMBOLS:
        rule = rule.replace(plain, symbol)
    return rule


def rule_of(info: RunInfo) -> str | None:
    """The threshold formula an analyzer recorded: the ``rule`` of a section of its own metadata (``eos.rule``)."""
    details = info.details
    eos = details.get("eos")
    if isinstance(eos, Mapping) and eos.get("rule"):
        return str(eos["rule"])
    for value in details.values():
        if isinstance(value, Mapping) and value.get("rule"):
            return str(value["rule"])
    return None


def _num(x: float) -> str:
    return f"{x:.4g}"


def threshold_label(threshold: Threshold, values: Iterable[float], infos: Sequence[RunInfo]) -> str:
    """The label of a threshold line: its formula and the value it draws (``(2+2β)/η = 7.6``).

    Args:
        threshold: the declaration (``label`` with ``{rule}`` and ``{value}``).
        values: the threshold's value at each checkpoint (a range is shown when they differ).
        infos: the run infos of those checkpoints (the formula is their recorded ``rule``; when checkpoints
            recorded different rules, all are named; without any, the threshold metric's name stands in).

    Returns:
        The label.
    """
    rules = list(dict.fromkeys(pretty_rule(r) for r in (rule_of(i) for i in infos) if r))
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not finite:
        value = "?"
    else:
        lo, hi = min(finite), max(finite)
        value = _num(lo) if math.isclose(lo, hi, rel_tol=1e-9, abs_tol=0.0) else f"{_num(lo)}–{_num(hi)}"
    slots = {"rule": " or ".join(rules) or threshold.metric, "value": value, "metric": threshold.metric}
    return threshold.label.format_map(_Slots(slots))


class _Slots(dict):
    """``str.format_map`` mapping that leaves unknown ``{names}`` as they are."""

    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


# --------------------------------------------------------------------------------------- figures
def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "figure"


def _safe_key(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", key)


def _series(frame: DataFrame) -> DataFrame:
    """Rows that form per-step series (no sub-groups such as per-class rows)."""
    return frame.loc[frame["group"].map(_is_series_group).astype(bool)]


def _band_text(frame: DataFrame, infos: Sequence[RunInfo]) -> str:
    if not frame["stderr"].notna().any():
        return ""
    k = max((i.replicates for i in infos), default=1)
    if k > 1:
        return f" Bands: ±1 standard error across {k} disjoint data subsets (--replicates {k})."
    return " Bands: ±1 standard error (or error bound) of each value."


@dataclass
class SectionFigure:
    """A figure of a section before it is rendered: ``key`` names its file."""

    key: str
    title: str
    caption: str
    figure: Figure


def section_figures(data: RunData, analyzer: str, section: Section) -> list[SectionFigure]:
    """The figures of one section of one analyzer (nothing when its records are absent).

    Args:
        data: the run.
        analyzer: the analyzer's name.
        section: its declaration.

    Returns:
        A custom figure function's figures, or one figure of the section's metrics against the step with
        its threshold lines.

    Raises:
        ValueError: a figure could not be drawn (the caller turns it into a note).
    """
    own = data.frame[data.frame["analyzer"] == analyzer]
    if section.figure is not None:
        made = load_callable(section.figure)(own, data.artifacts.get(analyzer, {}))
        return [SectionFigure(name, title, section.text, fig) for name, title, fig in made]
    series = _series(own[own["metric"].isin(section.metrics)])
    metrics = [m for m in section.metrics if (series["metric"] == m).any()]
    if not metrics:
        return []
    infos = data.infos(analyzer)
    lines, labels = [], []
    for th in section.thresholds:
        records = own[own["metric"] == th.metric]
        if len(records):
            by_ck = {ck: info for (ck, a), info in data.runs.items() if a == analyzer}
            th_infos = [by_ck[c] for c in dict.fromkeys(records["checkpoint"]) if c in by_ck] or infos
            label = threshold_label(th, records["value"], th_infos)
            lines.append((records, label))
            labels.append(label)
    fig = plots.metric_panels_figure(
        series,
        metrics,
        title=section.title,
        logy=tuple(metrics) if section.log_y else (),
        order=data.order,
        max_series=section.max_series,
        thresholds=lines,
    )
    caption = section.text
    if labels:
        caption += f" Dashed: {'; '.join(labels)}."
    caption += _band_text(series, infos)
    return [SectionFigure(_slug(section.title), section.title, caption.strip(), fig)]


def other_metrics_figure(data: RunData, analyzer: str) -> list[SectionFigure]:
    """One generic figure of the metrics of ``analyzer`` that none of its sections shows (a panel each)."""
    decl = data.declared(analyzer)
    own = _series(data.frame[data.frame["analyzer"] == analyzer])
    rest = own[~own["metric"].isin(decl.shown)]
    metrics = list(dict.fromkeys(rest["metric"]))
    if not metrics:
        return []
    title = f"{analyzer}: other metrics" if decl.sections else analyzer
    caption = (
        f"Metrics of the '{analyzer}' analyzer against the training step, one line per layer/group/index."
        + _band_text(rest, data.infos(analyzer))
    )
    fig = plots.metric_panels_figure(rest, metrics, title=title, order=data.order, max_panels=12)
    return [SectionFigure(f"analyzer-{analyzer}", title, caption, fig)]


def report_figures(data: RunData, dpi: int = DPI) -> tuple[list[ReportFigure], list[str]]:
    """Every section of every analyzer with records, then each analyzer's other metrics -> ``(figures, notes)``.

    A figure that fails to draw becomes a note instead of failing the report.
    """
    figures: list[ReportFigure] = []
    notes: list[str] = []
    keys: set[str] = set()
    for analyzer in data.analyzer_order():
        decl = data.declared(analyzer)
        plans: list[tuple[str, Any]] = [(s.title, s) for s in decl.sections] + [("other metrics", None)]
        for title, section in plans:
            try:
                made = section_figures(data, analyzer, section) if section else other_metrics_figure(data, analyzer)
            except ValueError as exc:
                notes.append(f"figure '{title}' of {analyzer} left out: {exc}")
                continue
            for f in made:
                key = _safe_key(f.key)
                if key in keys:
                    key = _safe_key(f"{analyzer}-{f.key}")
                while key in keys:
                    key += "_"
                keys.add(key)
                figures.append(ReportFigure(key, f.title, f.caption, plots.figure_png(f.figure, dpi=dpi)))
    return figures, notes


# ------------------------------------------------------------------------------------ rendering
def _fmt(x: Any) -> str:
    if x is None or x is pd.NA:
        return ""
    if isinstance(x, float):
        if math.isnan(x):
            return ""
        if x == 0 or 1e-3 <= abs(x) < 1e6:
            return f"{x:.5g}"
        return f"{x:.4e}"
    return str(x)


def _html_table(df: DataFrame, cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = []
    for row in df.itertuples(index=False):
        cells = []
        for v in row:
            num = isinstance(v, (int, float)) and not isinstance(v, bool)
            cells.append(f"<td{' class=num' if num else ''}>{html.escape(_fmt(v))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (
        f'<div class="scroll"><table class="{cls}"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></div>"
    )


def _md_table(df: DataFrame) -> str:
    def cell(v: Any) -> str:
        return _fmt(v).replace("|", "\\|")

    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1100px;padding:1.2rem 2rem;
color:#1d1d1f;line-height:1.45}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{font-size:1.25rem;border-bottom:1px solid #ddd;padding-bottom:.2rem;
margin-top:2rem}
.sub{color:#555;margin-top:0}nav ul{columns:2;padding-left:1.2rem}figure{margin:0}
figure img{max-width:100%;height:auto;border:1px solid #eee}figcaption{color:#444;font-size:.9rem;margin-top:.3rem}
table{border-collapse:collapse;font-size:.85rem;margin:.5rem 0}th,td{border:1px solid #ddd;padding:.2rem .5rem;
text-align:left}th{background:#f5f5f7}td.num{text-align:right;font-variant-numeric:tabular-nums}
.scroll{overflow-x:auto}pre{background:#f5f5f7;padding:.6rem;overflow-x:auto;font-size:.8rem}
.warn{background:#fff4e5;border-left:4px solid #f0a020;padding:.4rem .8rem}dt{font-weight:600}
dd{margin:0 0 .4rem 1rem}footer{color:#777;font-size:.8rem;margin-top:2rem}
"""


def _sorted_set(values: Iterable[Any]) -> list[Any]:
    return sorted({v for v in values if v is not None and v != ""}, key=str)


def _samples_text(infos: Sequence[RunInfo], requested: int | None) -> str:
    used = _sorted_set(i.samples for i in infos)
    avail = _sorted_set(i.samples_available for i in infos)
    text = f"{', '.join(map(str, used)) or '?'} analysed"
    if avail:
        text += f" of {', '.join(map(str, avail))} available"
    return text + f" ({'seeded subset of ' + str(requested) if requested else 'all data'})"


def metadata_items(manifest: SweepManifest, infos: Sequence[RunInfo]) -> list[tuple[str, str]]:
    """(label, text) pairs of the run metadata worth a line in the report."""
    s = manifest.settings
    binding = {k: v for k, v in (("model", s.model), ("data", s.data), ("loss", s.loss)) if v}
    if s.config.get("_path"):
        binding["config"] = s.config["_path"]
    seeds = _sorted_set(i.seed for i in infos)
    items = [
        ("run folder", manifest.run),
        ("binding", ", ".join(f"{k}={v}" for k, v in binding.items()) or "from checkpoint metadata"),
        ("seed", str(s.seed) if s.seed is not None else ", ".join(map(str, seeds))),
        ("samples", _samples_text(infos, s.samples)),
    ]
    replicates = max((i.replicates for i in infos), default=1)
    if replicates > 1:
        items.append(
            ("replicates", f"{replicates} disjoint data subsets; values are their mean, bands ±1 standard error")
        )
    for key in ("batch_size", "dtype", "device", "params", "pattern"):
        if getattr(s, key) is not None:
            items.append((key.replace("_", " "), str(getattr(s, key))))
    devices = _sorted_set(i.device for i in infos)
    if devices and s.device is None:
        items.append(("device", ", ".join(devices)))
    n_params = _sorted_set(i.n_params for i in infos)
    if n_params:
        items.append(("parameters analysed", ", ".join(map(str, n_params))))
    hvps = sum(int(i.hvp_count or 0) for i in infos)
    secs = sum(float(i.seconds or 0.0) for i in infos)
    if hvps or secs:
        items.append(("compute", f"{hvps} Hessian-vector products, {secs:.1f} s of analysis"))
    c = manifest.counts
    if c:
        text = (
            f"{c.get('computed', 0)} results computed, {c.get('cached', 0)} from the cache, {c.get('failed', 0)} failed"
        )
        items.append(("this sweep", text))
    versions = manifest.versions or next((i.versions for i in infos if i.versions), {})
    if versions:
        items.append(("versions", ", ".join(f"{k} {v}" for k, v in versions.items())))
    return items


def _checkpoint_table(manifest: SweepManifest) -> DataFrame:
    rows = [
        {
            "checkpoint": c.checkpoint,
            "step": c.step,
            "step from": c.step_source,
            "sha256": c.sha256[:12],
            "analyzers": ", ".join(f"{a}: {s}" for a, s in c.status.items()),
        }
        for c in manifest.checkpoints
    ]
    return pd.DataFrame(rows, columns=["checkpoint", "step", "step from", "sha256", "analyzers"])


@dataclass
class _Page:
    """The parts of a report page, rendered to HTML and Markdown."""

    title: str
    subtitle: str
    overview: DataFrame
    key_table: DataFrame
    figures: list[ReportFigure]
    notes: list[str]
    failures: int
    items: list[tuple[str, str]]
    checkpoints: DataFrame
    configs: dict[str, Any]
    records: DataFrame


def _html(p: _Page, version: str) -> str:
    toc = [("summary", "Summary")] + [(f"fig-{f.key}", f.title) for f in p.figures]
    if p.notes:
        toc.append(("notes", "Warnings and notes"))
    toc += [("metadata", "Run metadata"), ("records", "All records")]
    h: list[str] = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<link rel="icon" href="data:,">',
        f"<title>{html.escape(p.title)}</title><style>{_CSS}</style></head><body>",
        f"<header><h1>{html.escape(p.title)}</h1><p class=sub>{html.escape(p.subtitle)}</p></header>",
        "<nav><ul>" + "".join(f'<li><a href="#{a}">{html.escape(t)}</a></li>' for a, t in toc) + "</ul></nav>",
        '<section id="summary"><h2>Summary</h2>',
    ]
    if p.failures:
        h.append(f'<p class="warn">{p.failures} result(s) could not be computed; see the notes below.</p>')
    if len(p.overview):
        h.append("<h3>Metrics over the run</h3>" + _html_table(p.overview))
    if len(p.key_table):
        h.append("<h3>Per checkpoint</h3>" + _html_table(p.key_table))
    h.append("</section>")
    for f in p.figures:
        data = base64.b64encode(f.png).decode()
        h.append(
            f'<section id="fig-{f.key}"><h2>{html.escape(f.title)}</h2><figure>'
            f'<img src="data:image/png;base64,{data}" alt="{html.escape(f.title)}">'
            f"<figcaption>{html.escape(f.caption)}</figcaption></figure></section>"
        )
    if p.notes:
        h.append('<section id="notes"><h2>Warnings and notes</h2><ul>')
        h += [f"<li>{html.escape(n)}</li>" for n in p.notes]
        h.append("</ul></section>")
    h.append('<section id="metadata"><h2>Run metadata</h2><dl>')
    h += [f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in p.items]
    h.append("</dl>")
    if len(p.checkpoints):
        h.append("<h3>Checkpoints</h3>" + _html_table(p.checkpoints))
    if p.configs:
        h.append("<h3>Analyzer settings</h3>")
        for name, cfg in p.configs.items():
            h.append(f"<p><b>{html.escape(name)}</b></p><pre>{html.escape(json.dumps(cfg, indent=2))}</pre>")
    n = len(p.records)
    h.append(f'<section id="records"><h2>All records</h2><p>{n} records')
    h.append(" (also in <code>records.csv</code> and <code>records.parquet</code> next to this file).</p>")
    if 0 < n <= MAX_RECORD_ROWS:
        h.append(f"<details><summary>show the table</summary>{_html_table(p.records[COLUMNS])}</details>")
    elif n:
        h.append(f"<p>The table has more than {MAX_RECORD_ROWS} rows; open records.csv.</p>")
    h.append("</section>")
    h.append(f"<footer>diag {html.escape(version)} — training-dynamics diagnostics</footer></body></html>")
    return "\n".join(h) + "\n"


def _md_text(text: str) -> str:
    """User text (a title, a note) for Markdown: ``<``, ``>`` and ``&`` as entities, so a title such as
    ``<script>`` shows as written instead of being taken as HTML by a Markdown viewer."""
    return html.escape(" ".join(str(text).split()), quote=False)


def _markdown(p: _Page) -> str:
    m: list[str] = [f"# {_md_text(p.title)}", "", _md_text(p.subtitle), "", "## Summary", ""]
    if p.failures:
        m += [f"> **{p.failures} result(s) could not be computed**; see the notes below.", ""]
    if len(p.overview):
        m += ["### Metrics over the run", "", _md_table(p.overview), ""]
    if len(p.key_table):
        m += ["### Per checkpoint", "", _md_table(p.key_table), ""]
    for f in p.figures:
        m += [f"## {f.title}", "", f"![{f.title}](figures/{f.key}.png)", "", f.caption, ""]
    if p.notes:
        m += ["## Warnings and notes", ""] + [f"- {_md_text(n)}" for n in p.notes] + [""]
    m += ["## Run metadata", ""] + [f"- **{k}**: {v}" for k, v in p.items] + [""]
    if len(p.checkpoints):
        m += ["### Checkpoints", "", _md_table(p.checkpoints), ""]
    if p.configs:
        m += ["### Analyzer settings", ""]
        for name, cfg in p.configs.items():
            m += [f"**{name}**", "", "```json", json.dumps(cfg, indent=2), "```", ""]
    m += ["## All records", "", f"{len(p.records)} records in `records.csv` and `records.parquet`.", ""]
    return "\n".join(m)


def _subtitle(data: RunData, version: str) -> str:
    frame = data.frame
    steps = frame["step"].dropna()
    analyzers = list(dict.fromkeys(frame["analyzer"]))
    n_ck = len(data.order)
    span = f"steps {int(steps.min())}–{int(steps.max())}" if len(steps) else "steps unknown"
    return (
        f"{n_ck} checkpoint{'s' if n_ck != 1 else ''} ({span}); analyzers: {', '.join(analyzers) or 'none'}; "
        f"{len(frame)} records; generated {data.manifest.created} by diag {version}"
    )


def shared_step_notes(frame: pd.DataFrame, shown: int = 3) -> list[str]:
    """A note when checkpoints share a step (two seeds' ``step_1.pt``, a renamed copy): the figures then plot
    the checkpoints in order instead of against the step."""
    per = frame.drop_duplicates("checkpoint")[["checkpoint", "step"]].dropna()
    shared = per[per["step"].duplicated(keep=False)]
    if shared.empty:
        return []
    groups = [
        f"{', '.join(map(str, g['checkpoint'].tolist()[:shown]))} at step {int(step)}"
        for step, g in shared.groupby("step", sort=True)
    ]
    more = f" and {len(groups) - shown} more steps" if len(groups) > shown else ""
    return [
        f"checkpoints share a step ({'; '.join(groups[:shown])}{more}): the figures plot the checkpoints in order, "
        "not against the step; analyse each run folder (e.g. each seed) on its own to compare steps"
    ]


def render_report(data: RunData, title: str | None = None) -> Report:
    """A :class:`RunData` -> :class:`Report` (HTML, Markdown, PNG figures)."""
    from diagnostics import __version__

    m = data.manifest
    title = title or f"Training diagnostics: {m.run_name}"
    figures, fig_notes = report_figures(data)
    summary = summary_table(data.frame, data.analyzers)
    notes = [f"{f.checkpoint} [{f.analyzer}] failed: {f.message}" for f in m.failures] + m.notes + fig_notes
    notes += shared_step_notes(data.frame)
    page = _Page(
        title=title,
        subtitle=_subtitle(data, __version__),
        overview=metric_overview(data.frame, data.analyzers),
        key_table=key_columns(summary, data.analyzers) if len(summary) else summary,
        figures=figures,
        notes=notes,
        failures=len(m.failures),
        items=metadata_items(m, list(data.runs.values())),
        checkpoints=_checkpoint_table(m),
        configs=m.analyzer_configs,
        records=data.frame,
    )
    return Report(title=title, html=_html(page, __version__), markdown=_markdown(page), figures=figures)


def run_data(
    frame: DataFrame,
    metadata: Mapping[str, Any] | None = None,
    *,
    artifacts: Mapping[str, Mapping[str, DataFrame]] | None = None,
    runs: Mapping[tuple[str, str], RunInfo | Mapping[str, Any]] | None = None,
    specs: Mapping[str, Any] | None = None,
) -> RunData:
    """The inputs of a report, read and typed (arguments as for :func:`build_report`).

    Raises:
        ValueError: the records lack a column.
    """
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"records table lacks the columns {missing}")
    manifest = SweepManifest.from_metadata(metadata)
    if runs is None:
        infos = manifest.run_infos()
    else:
        infos = {k: v if isinstance(v, RunInfo) else RunInfo.from_metadata(v) for k, v in runs.items()}
    return RunData(
        frame=frame,
        manifest=manifest,
        artifacts={a: dict(named) for a, named in (artifacts or {}).items()},
        runs=infos,
        analyzers=declarations(specs),
    )


def build_report(
    frame: DataFrame,
    metadata: Mapping[str, Any] | None = None,
    *,
    artifacts: Mapping[str, Mapping[str, DataFrame]] | None = None,
    runs: Mapping[tuple[str, str], RunInfo | Mapping[str, Any]] | None = None,
    specs: Mapping[str, Any] | None = None,
    title: str | None = None,
) -> Report:
    """Records (+ the sweep's metadata, artifacts and run infos) -> :class:`Report`.

    Args:
        frame: the tidy records of every checkpoint (:data:`diagnostics.results.COLUMNS`), in checkpoint order.
        metadata: the sweep's metadata (:meth:`diagnostics.runs.SweepResult.metadata`), read as
            :class:`SweepManifest`.
        artifacts: ``{analyzer: {name: DataFrame}}``, each table artifact of every checkpoint with ``checkpoint,
            step`` columns (e.g. ``{"hessian": {"density": ...}, "landscape": {"grid": ...}}``), for the sections'
            custom figures.
        runs: ``{(checkpoint, analyzer): RunInfo or result metadata}``; default: the manifest's summaries.
        specs: analyzers besides the registry's (e.g. user analyzers of the sweep), see :func:`declarations`.
        title: the report's title (default from the run's name).

    Returns:
        The report.

    Raises:
        ValueError: the records lack a column.
    """
    return render_report(run_data(frame, metadata, artifacts=artifacts, runs=runs, specs=specs), title)


def report_from_sweep(result: Any, title: str | None = None, specs: Mapping[str, Any] | None = None) -> Report:
    """:func:`build_report` of a :class:`diagnostics.runs.SweepResult` (its table artifacts and run infos).

    Args:
        result: the sweep.
        title: the report's title.
        specs: the analyzers the sweep ran besides the registry's (its ``specs``).

    Returns:
        The report.
    """
    names: dict[str, set[str]] = {}
    for (_, analyzer), res in result.results.items():
        for name, value in res.artifacts.items():
            if isinstance(value, pd.DataFrame):
                names.setdefault(analyzer, set()).add(name)
    artifacts = {
        a: {n: df for n in sorted(ns) if (df := result.artifact_frame(a, n)) is not None} for a, ns in names.items()
    }
    runs = {key: RunInfo.from_metadata(res.metadata) for key, res in result.results.items()}
    return build_report(result.frame, result.metadata(), artifacts=artifacts, runs=runs, specs=specs, title=title)
