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


def collapse_figures(result: Result, config: Any) -> dict[str, bytes]:
    """``diag collapse --plot PREFIX``: the class-mean cosines per layer and, with several layers asked for, the
    metrics against the layer (the suffixes of :func:`diagnostics.analyzers.collapse._plot_suffixes`)."""
    from diagnostics.analyzers.collapse import LAYER_PLOT_METRICS
    from diagnostics.plots import class_cosine_figure, cosine_matrices, layer_metrics_figure

    cosines = cosine_matrices(result.artifacts["cosine"])
    out = {".cosine.png": _png(class_cosine_figure(cosines, title=_title(result, "Cosines between class means")))}
    if config.layers and len(config.layers) > 1:
        fig = layer_metrics_figure(
            result.frame(), list(LAYER_PLOT_METRICS), title=_title(result, "Neural collapse per layer")
        )
        out[".layers.png"] = _png(fig)
    return out


def weights_spectrum(result: Result, config: Any) -> dict[str, bytes]:
    """``diag weights --plot PREFIX``: the singular values of every weight matrix, one curve per layer."""
    from diagnostics.plots import singular_value_figure

    fig = singular_value_figure(result.artifacts["spectrum"], title=_title(result, "Singular values of the weights"))
    return {".spectrum.png": _png(fig)}


def bos_per_image(result: Result, config: Any) -> dict[str, bytes]:
    """``diag bos --per-image FILE.csv``: the per-image, per-pass scores."""
    return {"": result.artifacts["per_image"].to_csv(index=False).encode()}


def bos_fit(result: Result, config: Any) -> dict[str, bytes]:
    """``diag bos-correlate --plot FILE.png``: the stability metric against mAP with the least-squares line."""
    from diagnostics.plots import bos_map_figure

    metric = result.metadata.get("metric", "bos")
    records = {r.metric: r.value for r in result.records if r.group is None}
    fig = bos_map_figure(
        result.artifacts["points"],
        slope=records["fit_slope"],
        intercept=records["fit_intercept"],
        title=f"{metric} vs mAP: Spearman {records['spearman_rho']:.3f}, Pearson {records['pearson_r']:.3f}",
        xlabel=metric,
    )
    return {"": _png(fig)}


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


def compare_aligned_checkpoint(result: Result, config: Any) -> dict[str, bytes]:
    """``diag compare --align weights --save-aligned FILE.pt``: B with its hidden units permuted to match A.

    The file is a checkpoint of :func:`diagnostics.save_checkpoint`'s format (tensors and plain metadata only, so
    it loads with ``weights_only=True``): B's state dict in the analysis dtype, B's step/lr/factories, and
    ``aligned_to`` naming A.
    """
    import io

    import torch

    from diagnostics.checkpoint import FORMAT_TAG
    from diagnostics.errors import DiagnosticsError

    saved = result.artifacts.get("aligned_checkpoint")
    if not saved:
        raise DiagnosticsError("--save-aligned needs --align weights and two checkpoint files")
    buf = io.BytesIO()
    torch.save({"format": FORMAT_TAG, "model": saved["state"], "metadata": saved["metadata"]}, buf)
    return {"": buf.getvalue()}


def compare_plot(result: Result, config: Any) -> dict[str, bytes]:
    """``diag compare --plot PREFIX``: PREFIX.png.

    One pair of checkpoints with ``--metrics barrier``: the loss (and accuracy) on ``(1-alpha) w_A + alpha w_B``
    with the chord, aligned and raw. Otherwise (two runs): every comparison against the step.
    """
    from diagnostics.plots import metric_panels_figure

    frame = result.frame()
    grid = result.artifacts.get("interpolation")
    steps = frame["step"].nunique(dropna=False) if len(frame) else 0
    if grid is not None and steps <= 1 and "step" not in grid:
        fig = _interpolation_figure(grid, _title(result, "Loss between the checkpoints"))
    else:
        from diagnostics.analyzers.compare import ANALYZER

        metrics = [m.name for m in ANALYZER.metrics]
        fig = metric_panels_figure(frame, metrics, title="Checkpoint comparisons against the step")
    return {".png": _png(fig)}


def _interpolation_figure(grid: Any, title: str) -> Any:
    from matplotlib.figure import Figure

    has_acc = bool(grid["accuracy"].notna().any())
    fig = Figure(figsize=(9.5 if has_acc else 5.2, 3.6), layout="constrained")
    axes = fig.subplots(1, 2 if has_acc else 1, squeeze=False)[0]
    for aligned, part in grid.groupby("aligned", sort=False):
        label = "after weight matching" if aligned else "raw"
        style = "-" if aligned else "--"
        axes[0].plot(part["alpha"], part["loss"], style, marker="o", ms=3, label=f"loss, {label}")
        axes[0].plot(part["alpha"], part["chord"], ":", color="grey", lw=1)
        if has_acc:
            axes[1].plot(part["alpha"], part["accuracy"], style, marker="o", ms=3, label=label)
    axes[0].set_xlabel("alpha: (1 - alpha) w_A + alpha w_B")
    axes[0].set_ylabel("loss")
    axes[0].set_title(title, fontsize="medium")
    axes[0].legend(fontsize="small")
    if has_acc:
        axes[1].set_xlabel("alpha")
        axes[1].set_ylabel("accuracy")
        axes[1].legend(fontsize="small")
    return fig
