"""Rank of representations at any layer: RankMe and related spectral measures.

Features ``Z`` (``N x D``, float64) are captured at named modules (see :mod:`diagnostics.features`)
over at most ``max_samples`` rows (a seeded subsample; 25,600 by default as in Garrido et al.).
Two spectra are computed exactly with an SVD:

* ``sigma_k``: singular values of the raw (uncentred) ``Z``;
* ``lambda_k``: eigenvalues of the centred covariance ``(Z - 1 zbar^T)^T (Z - 1 zbar^T) / N``.

Metrics (one record each, ``group`` = layer):

* ``rankme``: Garrido, Balestriero, Najman, LeCun (2023), "RankMe: Assessing the downstream
  performance of pretrained self-supervised representations by their rank":
  ``p_k = sigma_k / sum_j sigma_j + eps``, ``RankMe = exp(-sum_k p_k log p_k)``, ``eps = 1e-7``.
* ``effective_rank_cov``: Roy & Vetterli (2007) effective rank of the centred covariance,
  ``q_k = lambda_k / sum_j lambda_j``, ``exp(-sum_k q_k log q_k)`` (``0 log 0 = 0``).
* ``stable_rank``: ``sum_k lambda_k / lambda_1 = ||Zc||_F^2 / ||Zc||_2^2`` of the centred features.
* ``participation_ratio``: ``(sum_k lambda_k)^2 / sum_k lambda_k^2`` (Gao et al. 2017).
* ``alpha_req``: Agrawal et al. (2022), "alpha-ReQ": the decay exponent ``alpha`` of
  ``lambda_k ~ k^-alpha``, fitted by least squares of ``log lambda_k`` on ``log k`` over
  ``k in [alpha_kmin, alpha_kmax]`` among the numerically non-zero eigenvalues.

All five are invariant to rescaling the features.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from diagnostics.errors import DiagnosticsError
from diagnostics.lazy import lazy_import
from diagnostics.options import FeatureOptions
from diagnostics.progress import bind
from diagnostics.results import Result, concat_later, make_records
from diagnostics.spec import Analyzer, FileOutput, Metric, Section, check_config, option

if TYPE_CHECKING:
    from diagnostics.context import Context
    from diagnostics.progress import ProgressFn

torch = lazy_import("torch")
features = lazy_import("diagnostics.features")

NAME = "rankme"
SUBSAMPLE_STREAM = 7_000  # generator stream of the row subsample (independent of other analyzers)
METRICS = ("rankme", "effective_rank_cov", "stable_rank", "participation_ratio", "alpha_req")


@dataclass
class RankConfig(FeatureOptions):
    """Settings of :func:`analyze_rank` (options of ``diag rankme``, ``[rankme]`` in diag.toml).

    Attributes:
        layers, pool: where features are captured (:class:`~diagnostics.options.FeatureOptions`).
        max_samples: rows used (a seeded subsample when the data has more).
        eps: RankMe's ``eps`` (Garrido et al.: 1e-7).
        alpha_kmin, alpha_kmax: the eigenvalue indices (1-based, inclusive) of the alpha-ReQ fit;
            ``alpha_kmax`` None: up to the numerical rank.
        max_bytes: memory budget for the stored float64 rows of all layers.
    """

    max_samples: int = option(
        25_600, help="rows of the embedding matrix, a seeded subsample when the data has more", min=2
    )
    eps: float = option(1e-7, help="RankMe's eps", min=0, max=1, min_open=True, max_open=True)
    alpha_kmin: int = option(1, help="first eigenvalue index of the alpha-ReQ fit", min=1)
    alpha_kmax: int | None = option(None, help="last eigenvalue index of the alpha-ReQ fit (default: numerical rank)")
    max_bytes: int = option(
        2 * 1024**3, help="memory budget in bytes for the stored float64 feature rows", min=1, cli=False
    )

    def validate(self) -> None:
        """Cross-option rules (single options are checked from their declarations)."""
        if self.alpha_kmax is not None and self.alpha_kmax < self.alpha_kmin + 2:
            raise DiagnosticsError(
                f"--alpha-kmax ({self.alpha_kmax}) must be at least --alpha-kmin + 2 ({self.alpha_kmin + 2}): "
                "a line through fewer than three points says nothing"
            )


# ------------------------------------------------------------------------------ pure metrics
def rankme(singular_values: torch.Tensor, eps: float = 1e-7) -> float:
    """RankMe (Garrido et al. 2023) from the singular values of the raw embedding matrix.

    ``p_k = sigma_k / sum_j sigma_j + eps``; ``RankMe = exp(-sum_k p_k log p_k)``.
    Zero for an all-zero matrix.
    """
    s = singular_values.to(torch.float64).clamp(min=0)
    total = s.sum()
    if float(total) == 0.0:
        return 0.0
    p = s / total + eps
    return float(torch.exp(-(p * torch.log(p)).sum()))


def entropy_effective_rank(values: torch.Tensor) -> float:
    """Roy & Vetterli (2007) effective rank of a non-negative spectrum.

    ``q_k = v_k / sum_j v_j``, ``exp(-sum_k q_k log q_k)`` with ``0 log 0 = 0``; 0 for a zero spectrum.
    """
    v = values.to(torch.float64).clamp(min=0)
    total = v.sum()
    if float(total) == 0.0:
        return 0.0
    q = v / total
    q = q[q > 0]
    return float(torch.exp(-(q * torch.log(q)).sum()))


def stable_rank(eigenvalues: torch.Tensor) -> float:
    """``sum_k lambda_k / max_k lambda_k`` (``||A||_F^2 / ||A||_2^2`` when ``lambda = sigma^2``); 0 if zero."""
    lam = eigenvalues.to(torch.float64).clamp(min=0)
    top = lam.max() if lam.numel() else torch.zeros((), dtype=torch.float64)
    return 0.0 if float(top) == 0.0 else float(lam.sum() / top)


def participation_ratio(eigenvalues: torch.Tensor) -> float:
    """``(sum_k lambda_k)^2 / sum_k lambda_k^2`` (Gao et al. 2017); 0 for a zero spectrum."""
    lam = eigenvalues.to(torch.float64).clamp(min=0)
    sq = (lam * lam).sum()
    return 0.0 if float(sq) == 0.0 else float(lam.sum() ** 2 / sq)


@dataclass
class PowerLawFit:
    """``log lambda_k = intercept - alpha log k`` over ``k in [kmin, kmax]``."""

    alpha: float
    intercept: float
    r2: float
    kmin: int
    kmax: int


def power_law_decay(
    eigenvalues: torch.Tensor, kmin: int = 1, kmax: int | None = None, rtol: float | None = None
) -> PowerLawFit | None:
    """Power-law decay ``lambda_k ~ k^-alpha`` by alpha-ReQ (Agrawal et al. 2022).

    ``alpha`` is minus the ordinary least-squares slope of ``log lambda_k`` against ``log k`` over
    ``kmin <= k <= kmax``; ``r2`` is the fit's coefficient of determination.

    Args:
        eigenvalues: the spectrum (any order; sorted descending here).
        kmin: first index of the fit, 1-based (``k = kmin`` is ``lambda_kmin``).
        kmax: last index of the fit, 1-based and inclusive, capped at the numerical rank; None: the numerical rank.
        rtol: eigenvalues ``<= rtol * lambda_1`` count as zero (default ``n * float64 eps``).

    Returns:
        the fit, or None when fewer than three non-zero eigenvalues fall in the range.
    """
    lam = torch.sort(eigenvalues.to(torch.float64), descending=True).values
    if lam.numel() == 0 or float(lam[0]) <= 0:
        return None
    rtol = lam.numel() * torch.finfo(torch.float64).eps if rtol is None else rtol
    rank = int((lam > rtol * lam[0]).sum())
    hi = rank if kmax is None else min(kmax, rank)
    if hi - kmin + 1 < 3:
        return None
    k = torch.arange(kmin, hi + 1, dtype=torch.float64)
    x, y = torch.log(k), torch.log(lam[kmin - 1 : hi])
    xm, ym = x.mean(), y.mean()
    slope = float(((x - xm) * (y - ym)).sum() / ((x - xm) ** 2).sum())
    intercept = float(ym - slope * xm)
    resid = y - (intercept + slope * x)
    ss_tot = float(((y - ym) ** 2).sum())
    r2 = 1.0 - float((resid**2).sum()) / ss_tot if ss_tot > 0 else 1.0
    return PowerLawFit(alpha=-slope, intercept=intercept, r2=r2, kmin=kmin, kmax=hi)


@dataclass
class Spectra:
    """``singular_values`` of raw ``Z`` and ``covariance_eigenvalues`` of the centred covariance (descending)."""

    singular_values: torch.Tensor
    covariance_eigenvalues: torch.Tensor
    samples: int
    dim: int


def feature_spectra(features: torch.Tensor) -> Spectra:
    """``Z [N, D]`` -> singular values of ``Z`` and eigenvalues of ``cov(Z) = Zc^T Zc / N`` (both exact SVDs)."""
    if features.dim() != 2:
        raise DiagnosticsError(f"features must be a matrix [N, D], got shape {tuple(features.shape)}")
    z = features.to(torch.float64)
    n, d = z.shape
    sv = torch.linalg.svdvals(z)
    zc = z - z.mean(0, keepdim=True)
    cov = torch.linalg.svdvals(zc) ** 2 / n
    return Spectra(sv, cov, n, d)


def rank_metrics(spectra: Spectra, config: RankConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """The five metrics of the module docstring from :class:`Spectra` -> ``({metric: value}, info)``."""
    values = {
        "rankme": rankme(spectra.singular_values, config.eps),
        "effective_rank_cov": entropy_effective_rank(spectra.covariance_eigenvalues),
        "stable_rank": stable_rank(spectra.covariance_eigenvalues),
        "participation_ratio": participation_ratio(spectra.covariance_eigenvalues),
    }
    info: dict[str, Any] = {"samples": spectra.samples, "dim": spectra.dim}
    fit = power_law_decay(spectra.covariance_eigenvalues, config.alpha_kmin, config.alpha_kmax)
    if fit is not None:
        values["alpha_req"] = fit.alpha
        info["alpha_req_fit"] = {"kmin": fit.kmin, "kmax": fit.kmax, "r2": fit.r2, "intercept": fit.intercept}
    else:
        info["alpha_req_fit"] = None
    return values, info


# ------------------------------------------------------------------------------------ analyzer
def _subsample_mask(n_total: int, max_samples: int, generator: torch.Generator) -> torch.Tensor | None:
    if n_total <= max_samples:
        return None
    mask = torch.zeros(n_total, dtype=torch.bool)
    mask[torch.randperm(n_total, generator=generator)[:max_samples]] = True
    return mask


def collect_features(
    config: RankConfig, ctx: Context, progress: ProgressFn | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Stream the data once and keep the (subsampled) float64 rows of every layer: ``{layer: [n, D]}``."""
    names = list(config.layers) if config.layers else [features.default_feature_layer(ctx.model)]
    layers = features.resolve_layers(ctx.model, names)
    n_total = ctx.n_samples
    mask = _subsample_mask(n_total, config.max_samples, ctx.generator(SUBSAMPLE_STREAM))
    n_keep = n_total if mask is None else config.max_samples
    kept: dict[str, list[torch.Tensor]] = {layer.name: [] for layer in layers}
    tick = bind(progress, "features")
    offset = 0
    checked = False
    for i, fb in enumerate(
        features.stream_features(
            ctx.model, ctx.batches, layers, pool=config.pool, forward=lambda x: ctx.forward(ctx.params, x)
        )
    ):
        if not checked:
            need = n_keep * sum(int(t.shape[1]) for t in fb.features.values()) * 8
            if need > config.max_bytes:
                dims = ", ".join(f"{k}: {int(t.shape[1])}" for k, t in fb.features.items())
                raise DiagnosticsError(
                    f"keeping {n_keep} rows of the features ({dims}) needs {need / 1024**3:.1f} GiB, over the "
                    f"{config.max_bytes / 1024**3:.1f} GiB budget; lower --max-samples or use --pool mean"
                )
            checked = True
        sel = None if mask is None else mask[offset : offset + fb.size]
        for name, feats in fb.features.items():
            rows = feats if sel is None else feats[sel.to(feats.device)]
            kept[name].append(rows.cpu())
        offset += fb.size
        tick(i + 1, len(ctx.batches))
    feats = {name: torch.cat(parts, 0) for name, parts in kept.items()}
    info = {"layers": [layer.name for layer in layers], "samples_total": n_total, "samples_used": n_keep}
    return feats, info


def analyze_rank(config: RankConfig, ctx: Context, progress: ProgressFn | None = None) -> Result:
    """RankMe and related ranks at each layer of ``config.layers`` -> records (``group`` = layer).

    Artifacts: ``spectrum``, a DataFrame ``group, k, singular_value, covariance_eigenvalue`` (k 1-based).
    """
    check_config(config)
    feats, info = collect_features(config, ctx, progress)
    rows: list[tuple] = []
    frames = []
    per_layer: dict[str, Any] = {}
    notes: list[str] = []
    for name, z in feats.items():
        spec = feature_spectra(z)
        values, linfo = rank_metrics(spec, config)
        for metric in METRICS:
            if metric in values:
                rows.append((metric, values[metric], None, None, name))
        if "alpha_req" not in values:
            notes.append(f"layer '{name}': fewer than three non-zero covariance eigenvalues, no alpha_req")
        if float(spec.singular_values.sum()) == 0.0:
            notes.append(f"layer '{name}': every feature is zero, so every rank reads 0")
        if spec.samples < spec.dim:
            notes.append(
                f"layer '{name}': {spec.samples} samples for {spec.dim} features, so ranks are capped at "
                f"{spec.samples}; raise --samples"
            )
        per_layer[name] = linfo
        k = len(spec.singular_values)
        frames.append(
            {
                "group": name,
                "k": range(1, k + 1),
                "singular_value": spec.singular_values.numpy(),
                "covariance_eigenvalue": spec.covariance_eigenvalues.numpy(),
            }
        )
    metadata: dict[str, Any] = {**info, "samples": info["samples_used"], "per_layer": per_layer, "notes": notes}
    if info["samples_total"] > info["samples_used"]:
        metadata["subsample"] = (
            f"{info['samples_used']} of {info['samples_total']} rows, drawn without replacement with seed "
            f"{ctx.seed} (stream {SUBSAMPLE_STREAM})"
        )
    artifacts = {"spectrum": concat_later(frames)}  # a DataFrame once read: pandas only when it is tabulated
    return Result(make_records(ctx.checkpoint, ctx.step, NAME, rows), metadata, artifacts)


_LAYER = "the layer (module name, or 'name:input')"
ANALYZER = Analyzer(
    name=NAME,
    summary="RankMe, effective rank, stable rank, participation ratio, alpha-ReQ of layer features",
    config=RankConfig,
    order=40,
    run=analyze_rank,
    needs_targets=False,
    uses_loss=False,
    metrics=(
        Metric(
            "rankme",
            "exp(-sum_k p_k log p_k), p_k = sigma_k / sum_j sigma_j + 1e-7, sigma = singular values of the raw "
            "N x D embedding matrix",
            higher_is_better=True,
            headline=True,
            group=_LAYER,
            reference="Garrido et al. 2023",
        ),
        Metric(
            "effective_rank_cov",
            "exp(entropy of q_k = lambda_k / sum_j lambda_j), lambda = eigenvalues of the centred covariance",
            higher_is_better=True,
            group=_LAYER,
            reference="Roy & Vetterli 2007",
        ),
        Metric("stable_rank", "sum_k lambda_k / lambda_1 of the centred covariance", group=_LAYER),
        Metric(
            "participation_ratio",
            "(sum_k lambda_k)^2 / sum_k lambda_k^2 of the centred covariance",
            group=_LAYER,
            reference="Gao et al. 2017",
        ),
        Metric(
            "alpha_req",
            "decay exponent alpha of lambda_k ~ k^-alpha, least squares of log lambda_k on log k",
            group=_LAYER,
            reference="Agrawal et al. 2022",
        ),
    ),
    outputs=(
        FileOutput(
            "plot",
            "write PREFIX.spectrum.png: the singular values of the features",
            render="diagnostics.render:rank_spectrum",
            suffixes=(".spectrum.png",),
        ),
    ),
    sections=(
        Section(
            "Representation rank",
            METRICS,
            "RankMe = exp(entropy of the normalised singular values of the raw embedding matrix) (Garrido et al. "
            "2023), with effective rank, stable rank and participation ratio of the centred features, per layer.",
        ),
    ),
)
