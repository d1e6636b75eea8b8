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
