"""Renderers of the extra files a command writes: ``render(result, config) -> {suffix: bytes}``.

Each :class:`~diagnostics.spec.FileOutput` names one of these; the CLI writes the bytes to the paths that
:mod:`diagnostics.outputs` planned before the analysis ran. Figures come from :mod:`diagnostics.plots`.
"""

from __future__ import annotations

from typing import Any

from diagnostics.results import Result


def _png(fig: Any) -> bytes:
    from diagnostics.plots import figure_png

    return figure_png(fig)


def _title(result: Result, what: str) -> str:
    checkpoint = result.records[0].checkpoint if result.records else result.metadata.get("checkpoint", "")
    return f"{what}: {checkpoint}" if checkpoint else what


def rank_spectrum(result: Result, config: Any) -> dict[str, bytes]:
    """``diag rankme --plot PREFIX``: the singular values of the features, one curve per layer."""
    from diagnostics.plots import singular_value_figure

    fig = singular_value_figure(result.artifacts["spectrum"], title=_title(result, "Singular values of the features"))
    return {".spectrum.png": _png(fig)}


def hessian_density(result: Result, config: Any) -> dict[str, bytes]:
    """``diag hessian --density-out PREFIX``: the SLQ density as CSV and as a figure."""
    from diagnostics.plots import density_figure

    df = result.artifacts["density"]
    fig = density_figure(df, _title(result, "Hessian spectral density"))
    return {".csv": df.to_csv(index=False).encode(), ".png": _png(fig)}


def landscape_grid(result: Result, config: Any) -> dict[str, bytes]:
    """``diag landscape --grid-out FILE.csv``: the grid artifact (coordinates, loss, accuracy[, chord]) as CSV."""
    return {"": result.artifacts["grid"].to_csv(index=False).encode()}


def landscape_plot(result: Result, config: Any) -> dict[str, bytes]:
    """``diag landscape --plot PREFIX``: ``PREFIX.png`` (the curve along a direction or the line between two
    checkpoints, or the contours of a plane) and, for a plane, ``PREFIX_surface.png``."""
    from diagnostics.plots import landscape_contour_figure, landscape_curve_figure, landscape_surface_figure

    grid = result.artifacts["grid"]
    meta = result.metadata
    if meta.get("mode") == "interpolation":
        a, b = (meta.get("checkpoints") or ["", ""])[:2]
        title = f"{a} -> {b}: barrier {meta['barrier']['value']:.4g}"
        return {".png": _png(landscape_curve_figure(grid, title))}
    info = meta.get("directions") or {}
    kind = info.get("kind", "random")
    if "y" not in grid.columns:
        return {".png": _png(landscape_curve_figure(grid, _title(result, f"{kind} direction")))}
    title = _title(result, f"{kind} plane ({info.get('normalize', '')}-normalised)")
    return {
        ".png": _png(landscape_contour_figure(grid, title)),
        "_surface.png": _png(landscape_surface_figure(grid, title)),
    }
