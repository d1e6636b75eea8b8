"""DataFrame -> matplotlib Figure. Nothing else in the package draws; nothing here writes files.

Figures are built with ``matplotlib.figure.Figure`` (no pyplot state, no display needed).
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import pandas as pd
from matplotlib.figure import Figure


def density_figure(density: pd.DataFrame, title: str = "Hessian spectral density (SLQ)") -> Figure:
    """Spectral density curves, one per ``group`` (log-scaled density axis)."""
    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    ax = fig.add_subplot()
    for group, sub in density.groupby("group", sort=False):
        ax.semilogy(sub["eigenvalue"], sub["density"].clip(lower=1e-12), label=str(group) or "model", lw=1.2)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.axvline(0.0, color="0.6", lw=0.8, ls=":")
    if density["group"].nunique() > 1:
        ax.legend(fontsize="small")
    return fig


def figure_png(fig: Figure, dpi: int = 110) -> bytes:
    """Render a figure to PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


# ------------------------------------------------------------------ representation analyzers
def singular_value_figure(
    spectrum: pd.DataFrame,
    value: str = "singular_value",
    title: str = "Singular-value spectrum",
    ylabel: str = "singular value",
) -> Figure:
    """Log-log spectrum ``value`` against its rank ``k`` (1-based), one curve per ``group``.

    ``spectrum`` has columns ``group, k`` and ``value`` (e.g. the ``spectrum`` artifact of ``diag rankme``
    or ``diag weights``); zeros are left out (they have no logarithm).
    """
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.add_subplot()
    for group, sub in spectrum.groupby("group", sort=False):
        sub = sub[sub[value] > 0]
        ax.loglog(sub["k"], sub[value], marker=".", ms=3, lw=1.2, label=str(group))
    ax.set_xlabel("rank k")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="major", color="0.9", lw=0.6)
    if spectrum["group"].nunique() > 1:
        ax.legend(fontsize="small")
    return fig


def class_cosine_figure(cosines: dict[str, pd.DataFrame], title: str = "Cosines between centred class means") -> Figure:
    """Heatmaps of ``cos(mu_c - mu_G, mu_c' - mu_G)``, one panel per layer (a simplex ETF has -1/(C-1) off
    the diagonal)."""
    n = max(len(cosines), 1)
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig = Figure(figsize=(3.6 * cols + 0.8, 3.4 * rows + 0.4), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    image = None
    for ax, (layer, frame) in zip(axes.flat, cosines.items()):
        image = ax.imshow(frame.to_numpy(), vmin=-1.0, vmax=1.0, cmap="RdBu_r")
        labels = [str(c) for c in frame.columns]
        step = max(1, len(labels) // 12)
        ticks = list(range(0, len(labels), step))
        ax.set_xticks(ticks, [labels[i] for i in ticks], fontsize="small")
        ax.set_yticks(ticks, [labels[i] for i in ticks], fontsize="small")
        c = len(labels)
        ax.set_title(f"{layer}" + (f"  (ETF: {-1 / (c - 1):.3g})" if c > 1 else ""), fontsize="medium")
    for ax in list(axes.flat)[len(cosines) :]:
        ax.set_axis_off()
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label="cosine")
    fig.suptitle(title)
    return fig


def cosine_matrices(cosine: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The tidy ``cosine`` artifact of ``diag collapse`` (``group, class, other, cosine``) as one ``C x C`` matrix
    per layer (rows and columns labelled by class), in the order the layers appear."""
    out = {}
    for group, sub in cosine.groupby("group", sort=False):
        matrix = sub.pivot(index="class", columns="other", values="cosine")
        matrix.index.name = matrix.columns.name = None
        out[str(group)] = matrix
    return out


def collapse_cosine_section(frame: pd.DataFrame, artifacts: Mapping[str, pd.DataFrame | None]) -> list[tuple]:
    """Report figure of the collapse analyzer: the class-mean cosines of the last checkpoint, per layer.

    Args:
        frame: the run's records (unused: the figure comes from the artifact).
        artifacts: the collapse analyzer's artifacts over the run, ``{name: frame}``; ``cosine`` holds the tidy
            cosines of every checkpoint with ``checkpoint`` and ``step`` columns in front.

    Returns:
        ``[(name, title, Figure)]``; empty when no cosines were kept.
    """
    cosine = artifacts.get("cosine")
    if cosine is None or not len(cosine):
        return []
    title = "Cosines between centred class means"
    if "checkpoint" in cosine.columns:
        last = list(dict.fromkeys(cosine["checkpoint"]))[-1]
        if "step" in cosine.columns and cosine["step"].notna().all():
            last = cosine.loc[cosine["step"].astype(float).idxmax(), "checkpoint"]
        cosine = cosine[cosine["checkpoint"] == last]
        step = cosine["step"].iloc[0] if "step" in cosine.columns else None
        title += f" at {last}" + ("" if step is None or pd.isna(step) else f" (step {int(step)})")
    return [("collapse-cosines", title, class_cosine_figure(cosine_matrices(cosine), title=title))]


def layer_metrics_figure(
    records: pd.DataFrame,
    metrics: list[str] | None = None,
    title: str = "Neural collapse per layer",
) -> Figure:
    """Metric value against layer (in the order the layers first appear), one line per metric.

    ``records`` is a tidy results frame (columns ``metric, value, group``); rows with a ``/`` in the
    group (per-class rows) are left out. Positive-valued metrics use a log axis.
    """
    df = records[records["group"].notna() & ~records["group"].astype(str).str.contains("/", regex=False)]
    if metrics is not None:
        df = df[df["metric"].isin(metrics)]
    layers = list(dict.fromkeys(df["group"].astype(str)))
    pos = {g: i for i, g in enumerate(layers)}
    fig = Figure(figsize=(max(5.0, 1.1 * len(layers) + 3.0), 4.2), layout="constrained")
    ax = fig.add_subplot()
    positive = bool((df["value"] > 0).all()) and len(df) > 0
    for metric, sub in df.groupby("metric", sort=False):
        ax.plot([pos[str(g)] for g in sub["group"]], sub["value"], marker="o", lw=1.2, label=str(metric))
    if positive:
        ax.set_yscale("log")
    ax.set_xticks(range(len(layers)), layers, rotation=30, ha="right", fontsize="small")
    ax.set_xlabel("layer")
    ax.set_ylabel("value")
    ax.set_title(title)
    ax.grid(True, color="0.9", lw=0.6)
    if df["metric"].nunique() > 0:
        ax.legend(fontsize="small")
    return fig


# ---------------------------------------------------------------------------------------------
# Per-step figures of a whole run (diag run / diag report). Each takes the tidy records table
# (diagnostics.results.COLUMNS) of every checkpoint; the x axis is the training step, or the
# checkpoint order when some step is unknown. They raise ValueError when the metric is absent.

_STEP_LABEL = "training step"
_ORDER_LABEL = "checkpoint (in order)"


def steps_usable(frame: pd.DataFrame) -> bool:
    """Whether the steps can be the x axis: every checkpoint has one, and no two checkpoints share one (two
    seeds' ``step_1.pt`` would be drawn as one line that jumps between them)."""
    if not len(frame) or not frame["step"].notna().all():
        return False
    per = frame.drop_duplicates("checkpoint")["step"]
    return not per.duplicated().any()


def _with_x(frame: pd.DataFrame, order: list[str] | None = None) -> tuple[pd.DataFrame, str]:
    """``frame`` plus an ``_x`` column: the step, or the checkpoint's position when a step is missing or shared
    (:func:`steps_usable`)."""
    df = frame.copy()
    if steps_usable(df):
        df["_x"] = df["step"].astype("float64")
        return df, _STEP_LABEL
    names = list(dict.fromkeys(list(order or []) + list(df["checkpoint"])))
    position = {name: i for i, name in enumerate(names)}
    df["_x"] = df["checkpoint"].map(position).astype("float64")
    return df, _ORDER_LABEL


def _whole_model(df: pd.DataFrame) -> pd.DataFrame:
    """Rows of the whole model (``group`` null or empty)."""
    g = df["group"]
    return df[g.isna() | (g.astype(str) == "")]


def _series_label(group: object, index: object, metric: str) -> str:
    parts = []
    if group is not None and not pd.isna(group) and str(group) != "":
        parts.append(str(group))
    if index is not None and not pd.isna(index):
        parts.append(f"{metric}_{int(index)}")
    return " ".join(parts) or metric


def _draw_series(ax, df: pd.DataFrame, label: str, band: bool = True, **kwargs):
    """One line of ``value`` against ``_x`` with a +-stderr band when stderr is known."""
    import numpy as np

    df = df.sort_values("_x")
    x = df["_x"].to_numpy(dtype=float)
    y = df["value"].to_numpy(dtype=float)
    kwargs.setdefault("marker", "o")
    kwargs.setdefault("ms", 3)
    (line,) = ax.plot(x, y, label=label, **kwargs)
    se = df["stderr"].to_numpy(dtype=float)
    if band and np.isfinite(se).any():
        se = np.nan_to_num(se)
        ax.fill_between(x, y - se, y + se, color=line.get_color(), alpha=0.2, lw=0)
    return line


def _require(df: pd.DataFrame, what: str) -> None:
    if df.empty:
        raise ValueError(f"no {what} records to plot")


def metric_panels_figure(
    frame: pd.DataFrame,
    metrics: list[str],
    *,
    title: str,
    logy: tuple[str, ...] = (),
    order: list[str] | None = None,
    max_series: int = 8,
    max_panels: int = 12,
    thresholds: Sequence[tuple[pd.DataFrame, str]] = (),
) -> Figure:
    """Small multiples: one panel per metric in ``metrics`` that has records (at most ``max_panels``), a line
    per (group, index) with a +-stderr band where the stderr is known.

    Args:
        frame: tidy records (``checkpoint, step, metric, value, stderr, index, group``).
        metrics: the metrics, in panel order.
        title: the figure's title.
        logy: metrics drawn on a log axis (when all their values are positive).
        order: checkpoint order, for the x axis when a step is unknown.
        max_series: at most this many lines per panel (the first in record order).
        max_panels: at most this many panels.
        thresholds: ``(records of the threshold metric, label)``: dashed reference lines drawn on the first
            panel (the metric they bound), one value per checkpoint.

    Returns:
        The figure.

    Raises:
        ValueError: none of ``metrics`` has records.
    """
    present = [m for m in metrics if (frame["metric"] == m).any()][:max_panels]
    if not present:
        raise ValueError(f"none of {metrics} has records to plot")
    df, xlabel = _with_x(frame[frame["metric"].isin(present)], order)
    ncols = min(3, len(present))
    nrows = -(-len(present) // ncols)
    fig = Figure(figsize=(3.4 * ncols + 0.6 + (1.0 if ncols == 1 else 0.0), 2.9 * nrows + 0.4), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for n_panel, (ax, metric) in enumerate(zip(axes.flat, present)):
        sub = df[df["metric"] == metric]
        groups = sub.groupby(["group", "index"], dropna=False, sort=False)
        for n, ((group, index), part) in enumerate(groups):
            if n >= max_series:
                break
            _draw_series(ax, part, _series_label(group, index, metric), lw=1.3)
        drawn = 0
        if n_panel == 0:
            for records, label in thresholds:
                drawn += _draw_threshold(ax, records, label, order)
        if metric in logy and (sub["value"] > 0).all():
            ax.set_yscale("log")
        ax.set_title(metric if groups.ngroups <= max_series else f"{metric} (first {max_series})", fontsize="medium")
        ax.set_xlabel(xlabel, fontsize="small")
        ax.grid(alpha=0.3)
        if groups.ngroups > 1 or drawn:
            ax.legend(fontsize="x-small", loc="best")
    for ax in list(axes.flat)[len(present) :]:
        ax.set_visible(False)
    groups = {str(g) for g in df["group"] if g is not None and not pd.isna(g) and str(g) != ""}
    fig.suptitle(f"{title} ({groups.pop()})" if len(groups) == 1 else title)
    return fig


def _draw_threshold(ax, records: pd.DataFrame, label: str, order: list[str] | None) -> int:
    """A dashed reference line through the threshold value of each checkpoint (1 when drawn, else 0)."""
    t = _whole_model(records) if len(records) else records
    if t.empty:
        return 0
    t, _ = _with_x(t, order)
    t = t.sort_values("_x")
    ax.plot(t["_x"], t["value"], ls="--", color="k", lw=1.2, label=label)
    return 1


def _edges(x):
    """Cell edges around sorted centres ``x`` (half-way between neighbours; width 1 for one centre)."""
    import numpy as np

    x = np.asarray(x, dtype=float)
    if len(x) == 1:
        return np.array([x[0] - 0.5, x[0] + 0.5])
    mid = (x[1:] + x[:-1]) / 2
    return np.concatenate([[x[0] - (mid[0] - x[0])], mid, [x[-1] + (x[-1] - mid[-1])]])


def density_heatmap_figure(
    density: pd.DataFrame,
    frame: pd.DataFrame | None = None,
    *,
    order: list[str] | None = None,
    points: int = 300,
) -> Figure:
    """The Hessian spectral density of each checkpoint as a heatmap over steps (log10 colour scale).

    Args:
        density: columns ``checkpoint, step, group, eigenvalue, density`` (the SLQ artifact of each
            checkpoint); only the whole model (empty group) is drawn. Each checkpoint's curve is
            interpolated onto one common eigenvalue grid (zero outside its own grid).
        frame: records; when given, ``eigenvalue_0`` and ``bottom_eigenvalue_0`` are drawn on top.
        order: checkpoint names in plotting order, used for the x axis when a step is missing (then the
            x axis is the checkpoint's position); checkpoints not listed follow in order of appearance.
        points: number of points of the common eigenvalue grid (the heatmap's vertical resolution).

    Returns:
        A matplotlib ``Figure`` (x: step or position, y: eigenvalue, colour: ``log10`` density clipped at
        ``1e-6`` of its maximum).

    Raises:
        ValueError: when ``density`` holds no whole-model rows.
    """
    import numpy as np
    from matplotlib.colors import Normalize

    d = _whole_model(density) if "group" in density else density
    _require(d, "spectral density")
    d, xlabel = _with_x(d.assign(value=d["density"], stderr=float("nan")), order)
    lo, hi = float(d["eigenvalue"].min()), float(d["eigenvalue"].max())
    grid = np.linspace(lo, hi, points)
    xs, rows = [], []
    for x, sub in d.groupby("_x", sort=True):
        sub = sub.sort_values("eigenvalue")
        rows.append(np.interp(grid, sub["eigenvalue"], sub["density"], left=0.0, right=0.0))
        xs.append(float(x))
    Z = np.array(rows)
    floor = max(float(Z.max()), 1e-300) * 1e-6
    logZ = np.log10(np.maximum(Z, floor))
    fig = Figure(figsize=(7.2, 4.2), layout="constrained")
    ax = fig.add_subplot()
    mesh = ax.pcolormesh(
        _edges(xs), _edges(grid), logZ.T, shading="flat", cmap="magma", norm=Normalize(logZ.min(), logZ.max())
    )
    fig.colorbar(mesh, ax=ax, label="log10 density")
    if frame is not None:
        recs, _ = _with_x(_whole_model(frame), order)
        for metric, style in (("eigenvalue", "-"), ("bottom_eigenvalue", ":")):
            sub = recs[(recs["metric"] == metric) & (recs["index"] == 0)].sort_values("_x")
            if len(sub):
                ax.plot(sub["_x"], sub["value"], ls=style, color="cyan", lw=1.2, label=f"{metric}_0")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small", loc="upper left")
    ax.set_ylim(lo, hi)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("eigenvalue")
    ax.set_title("Hessian spectral density over training (SLQ)")
    return fig


def _grid_kind(grid: pd.DataFrame) -> pd.Series:
    """Per row of a landscape grid, the names of its coordinates (``("x",)``, ``("x", "y")``, ``("alpha",)``)."""
    coords = [c for c in ("x", "y", "alpha") if c in grid.columns]
    present = grid[coords].notna()
    return present.apply(lambda row: tuple(c for c in coords if row[c]), axis=1)


def landscape_figure(grid: pd.DataFrame, order: list[str] | None = None, max_curves: int = 8) -> Figure:
    """Loss-landscape slices of a run from the ``grid`` artifact of every checkpoint.

    Args:
        grid: the concatenated ``grid`` artifacts (:meth:`diagnostics.runs.SweepResult.artifact_frame`): columns
            ``checkpoint, step``, the coordinates (``x[, y]`` of a slice, ``alpha`` of a line) and ``loss``.
        order: checkpoint order, when a step is unknown.
        max_curves: at most this many checkpoints' curves per 1-D panel (evenly spread over the run).

    Returns:
        One panel per kind of grid: 1-D slices (and lines) as loss curves coloured by training step, 2-D
        slices as contours of the last checkpoint that has them.

    Raises:
        ValueError: the grid is empty.
    """
    import numpy as np
    from matplotlib import colormaps

    _require(grid, "landscape grid")
    df = grid.assign(value=grid["loss"], stderr=float("nan"), _kind=_grid_kind(grid))
    df = df[df["_kind"].map(len) > 0]
    _require(df, "landscape grid")
    df, xlabel = _with_x(df, order)
    kinds = list(dict.fromkeys(df["_kind"]))[:4]
    fig = Figure(figsize=(3.8 * len(kinds) + 0.8, 3.6), layout="constrained")
    axes = fig.subplots(1, len(kinds), squeeze=False)[0]
    cmap = colormaps["viridis"]
    for ax, names in zip(axes, kinds):
        sub = df[df["_kind"] == names]
        xs = sorted(sub["_x"].unique())
        if len(names) == 1:
            pick = xs if len(xs) <= max_curves else [xs[round(i)] for i in np.linspace(0, len(xs) - 1, max_curves)]
            span = (max(xs) - min(xs)) or 1.0
            for x in pick:
                part = sub[sub["_x"] == x].sort_values(names[0])
                first = part.iloc[0]
                ax.plot(
                    part[names[0]].to_numpy(dtype=float),
                    part["loss"].to_numpy(dtype=float),
                    color=cmap((x - min(xs)) / span),
                    lw=1.3,
                    label=f"step {first['step']}" if xlabel == _STEP_LABEL else str(first["checkpoint"]),
                )
            ax.set_xlabel(names[0])
            ax.set_ylabel("loss")
            ax.legend(fontsize="x-small", loc="best")
            ax.set_title("line between two checkpoints" if names == ("alpha",) else "1-D slice", fontsize="medium")
        else:
            last = sub[sub["_x"] == xs[-1]]
            first = last.iloc[0]
            tri = ax.tricontourf(
                last[names[0]].to_numpy(dtype=float),
                last[names[1]].to_numpy(dtype=float),
                last["loss"].to_numpy(dtype=float),
                levels=20,
                cmap="viridis",
            )
            ax.plot([0], [0], "r+", ms=10)
            fig.colorbar(tri, ax=ax, label="loss")
            ax.set_xlabel(names[0])
            ax.set_ylabel(names[1])
            at = f"step {first['step']}" if xlabel == _STEP_LABEL else str(first["checkpoint"])
            ax.set_title(f"2-D slice ({at})", fontsize="medium")
        ax.grid(alpha=0.3)
    fig.suptitle("Loss-landscape slices")
    return fig


def landscape_section(frame: pd.DataFrame, artifacts: Mapping[str, pd.DataFrame]) -> list[tuple[str, str, Figure]]:
    """The report figure of the landscape analyzer (:class:`~diagnostics.spec.Section` ``figure``).

    Args:
        frame: the analyzer's records (unused: the coordinates and losses are in the grid).
        artifacts: ``{"grid": every checkpoint's grid}`` (see :func:`landscape_figure`).

    Returns:
        ``[("landscape", title, figure)]``, or nothing without a grid.
    """
    grid = artifacts.get("grid")
    if grid is None or len(grid) == 0:
        return []
    order = list(dict.fromkeys(frame["checkpoint"])) if len(frame) else None
    return [("landscape", "Loss-landscape slices", landscape_figure(grid, order))]


def density_section(frame: pd.DataFrame, artifacts: Mapping[str, pd.DataFrame]) -> list[tuple[str, str, Figure]]:
    """The Hessian's spectral-density heatmap over training (:class:`~diagnostics.spec.Section` ``figure``).

    Args:
        frame: the analyzer's records (``eigenvalue_0`` and ``bottom_eigenvalue_0`` are drawn on top).
        artifacts: ``{"density": every checkpoint's SLQ density}`` (see :func:`density_heatmap_figure`).

    Returns:
        ``[("density", title, figure)]``, or nothing without a density.
    """
    density = artifacts.get("density")
    if density is None or len(density) == 0:
        return []
    order = list(dict.fromkeys(frame["checkpoint"])) if len(frame) else None
    records = frame if len(frame) else None
    fig = density_heatmap_figure(density, records, order=order)
    return [("density", "Hessian spectral density over training", fig)]


def bos_map_figure(
    points: pd.DataFrame,
    slope: float,
    intercept: float,
    title: str = "BoS vs mAP across test sets",
    xlabel: str = "bos",
) -> Figure:
    """Scatter of a stability score against mAP, one point per test set, with the least-squares line.

    ``points`` has columns ``set``, ``bos``, ``map`` and optionally ``bos_stderr`` (horizontal error
    bars: the standard error over dropout passes).
    """
    import numpy as np

    fig = Figure(figsize=(5.6, 4.2), layout="constrained")
    ax = fig.add_subplot()
    x = points["bos"].to_numpy(dtype=float)
    y = points["map"].to_numpy(dtype=float)
    xerr = None
    if "bos_stderr" in points and points["bos_stderr"].notna().any():
        xerr = pd.to_numeric(points["bos_stderr"], errors="coerce").fillna(0.0).to_numpy(dtype=float)
    ax.errorbar(x, y, xerr=xerr, fmt="o", ms=5, capsize=3, color="C0", label="test sets")
    for name, xi, yi in zip(points["set"], x, y):
        ax.annotate(str(name), (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize="x-small")
    pad = 0.05 * (x.max() - x.min() or 1.0)
    grid = np.linspace(x.min() - pad, x.max() + pad, 50)
    fit = f"mAP = {slope:.3g}·x {'+' if intercept >= 0 else '−'} {abs(intercept):.3g}"
    ax.plot(grid, slope * grid + intercept, color="C1", lw=1.2, label=fit)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("mAP")
    ax.set_title(title, fontsize="medium")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def landscape_curve_figure(grid: pd.DataFrame, title: str = "Loss along a direction") -> Figure:
    """A 1-D landscape grid (columns ``x`` or ``alpha``, ``loss``, optional ``accuracy``, ``chord``).

    Loss on the left axis, accuracy (when present) on the right; for an interpolation the chord
    ``(1-alpha) L(w_a) + alpha L(w_b)`` is dashed and the end points are marked, so the barrier is the
    largest gap between the two curves on [0, 1].
    """
    coord = "alpha" if "alpha" in grid.columns else "x"
    g = grid.sort_values(coord)
    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(g[coord], g["loss"], color="C0", lw=1.5, marker="o", ms=2.5, label="loss")
    if "chord" in g.columns:
        ends = g[(g[coord] >= 0) & (g[coord] <= 1)]
        ax.plot(ends[coord], ends["chord"], color="C0", ls="--", lw=1.0, label="chord (1-α)L_a + αL_b")
        for end in (0.0, 1.0):
            ax.axvline(end, color="0.6", lw=0.8, ls=":")
    else:
        ax.axvline(0.0, color="0.6", lw=0.8, ls=":")
    ax.set_xlabel(coord)
    ax.set_ylabel("loss", color="C0")
    handles, labels = ax.get_legend_handles_labels()
    if "accuracy" in g.columns and g["accuracy"].notna().any():
        ax2 = ax.twinx()
        ax2.plot(g[coord], g["accuracy"], color="C1", lw=1.2, label="accuracy")
        ax2.set_ylabel("accuracy", color="C1")
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, fontsize="small", loc="best")
    ax.set_title(title, fontsize="medium")
    ax.grid(alpha=0.3)
    return fig


def _landscape_mesh(grid: pd.DataFrame, value: str = "loss"):
    """Regular 2-D grid (columns ``x``, ``y``, ``value``) -> (X, Y, Z) arrays ``[ny, nx]``."""
    table = grid.pivot_table(index="y", columns="x", values=value, aggfunc="first").sort_index().sort_index(axis=1)
    import numpy as np

    X, Y = np.meshgrid(table.columns.to_numpy(dtype=float), table.index.to_numpy(dtype=float))
    return X, Y, table.to_numpy(dtype=float)


def landscape_contour_figure(grid: pd.DataFrame, title: str = "Loss landscape", levels: int = 30) -> Figure:
    """Filled contours of the loss on a 2-D landscape grid (columns ``x``, ``y``, ``loss``); centre marked."""
    X, Y, Z = _landscape_mesh(grid)
    fig = Figure(figsize=(5.6, 4.8), layout="constrained")
    ax = fig.add_subplot()
    filled = ax.contourf(X, Y, Z, levels=levels, cmap="viridis")
    ax.contour(X, Y, Z, levels=levels, colors="k", linewidths=0.3, alpha=0.5)
    fig.colorbar(filled, ax=ax, label="loss")
    ax.plot([0], [0], "r+", ms=12, mew=1.5)
    ax.set_xlabel("x (direction 1)")
    ax.set_ylabel("y (direction 2)")
    ax.set_aspect("equal")
    ax.set_title(title, fontsize="medium")
    return fig


def landscape_surface_figure(grid: pd.DataFrame, title: str = "Loss landscape") -> Figure:
    """A 3-D surface of the loss on a 2-D landscape grid (columns ``x``, ``y``, ``loss``)."""
    X, Y, Z = _landscape_mesh(grid)
    fig = Figure(figsize=(6.4, 5.2), layout="constrained")
    ax = fig.add_subplot(projection="3d")
    ax.plot_surface(X, Y, Z, cmap="viridis", linewidth=0, antialiased=True, alpha=0.95)
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.set_zlabel("loss")
    ax.set_title(title, fontsize="medium")
    return fig


# --------------------------------------------------------------------- curvature beyond the Hessian
def curvature_comparison_figure(
    frame: pd.DataFrame, order: list[str] | None = None, max_index: int = 3, title: str | None = None
) -> Figure:
    """Top eigenvalues of several curvatures over training: one panel per index, one line per curvature.

    Args:
        frame: records; ``curvature_eigenvalue`` rows (``group`` = ``curvature=<kind>``) are drawn.
        order: checkpoint order, for the x axis when a step is unknown.
        max_index: panels for indices ``0 .. max_index - 1``.
        title: the figure's title.

    Raises:
        ValueError: no ``curvature_eigenvalue`` records.
    """
    df = frame[frame["metric"] == "curvature_eigenvalue"]
    _require(df, "curvature_eigenvalue")
    df, xlabel = _with_x(df, order)
    indices = sorted(int(i) for i in df["index"].dropna().unique())[:max_index]
    fig = Figure(figsize=(3.6 * len(indices) + 0.6, 3.3), layout="constrained")
    axes = fig.subplots(1, len(indices), squeeze=False)[0]
    for ax, i in zip(axes, indices):
        sub = df[df["index"] == i]
        for group, part in sub.groupby("group", sort=False):
            _draw_series(ax, part, str(group).removeprefix("curvature="), lw=1.3)
        ax.set_title(f"eigenvalue {i} (0 = largest)", fontsize="medium")
        ax.set_xlabel(xlabel, fontsize="small")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small", loc="best")
    fig.suptitle(title or "Top eigenvalues of each curvature")
    return fig


def curvature_comparison_section(
    frame: pd.DataFrame, artifacts: Mapping[str, pd.DataFrame]
) -> list[tuple[str, str, Figure]]:
    """The curvature comparison of ``diag hessian --compare-curvatures`` (a section ``figure``)."""
    if not (frame["metric"] == "curvature_eigenvalue").any():
        return []
    order = list(dict.fromkeys(frame["checkpoint"]))
    title = "Gauss-Newton vs Hessian: top eigenvalues over training"
    return [("curvatures", title, curvature_comparison_figure(frame, order, title=title))]


def batch_sharpness_figure(frame: pd.DataFrame, order: list[str] | None = None) -> Figure:
    """Batch sharpness (± stderr) and the full-batch ``eigenvalue_0`` against the step, with the threshold 2/eta.

    Args:
        frame: records with ``batch_sharpness`` and, when present, ``eigenvalue`` (index 0, whole model)
            and ``eos_threshold``.
        order: checkpoint order, for the x axis when a step is unknown.

    Raises:
        ValueError: no ``batch_sharpness`` records.
    """
    whole = _whole_model(frame)
    bs = whole[whole["metric"] == "batch_sharpness"]
    _require(bs, "batch_sharpness")
    fig = Figure(figsize=(6.4, 3.8), layout="constrained")
    ax = fig.add_subplot()
    part, xlabel = _with_x(bs, order)
    _draw_series(ax, part, "batch sharpness E_B[g_B^T H_B g_B / |g_B|^2]", lw=1.4)
    lam = whole[(whole["metric"] == "eigenvalue") & (whole["index"] == 0)]
    if len(lam):
        _draw_series(ax, _with_x(lam, order)[0], "full-batch λ_max (eigenvalue_0)", lw=1.4, marker="s")
    thr = whole[whole["metric"] == "eos_threshold"]
    if len(thr):
        _draw_threshold(ax, thr, "stability threshold eos_threshold (2/η for SGD)", order)
    ax.set_xlabel(xlabel, fontsize="small")
    ax.set_ylabel("curvature")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small", loc="best")
    ax.set_title("Batch vs full-batch sharpness")
    return fig


def batch_sharpness_section(
    frame: pd.DataFrame, artifacts: Mapping[str, pd.DataFrame]
) -> list[tuple[str, str, Figure]]:
    """The batch-sharpness section of ``diag hessian --batch-sharpness`` (a section ``figure``)."""
    if not (frame["metric"] == "batch_sharpness").any():
        return []
    order = list(dict.fromkeys(frame["checkpoint"]))
    return [("batch-sharpness", "Batch vs full-batch sharpness against 2/η", batch_sharpness_figure(frame, order))]
