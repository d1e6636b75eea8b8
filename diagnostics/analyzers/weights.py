"""Data-free spectra of weight matrices, one row per layer and metric.

Every parameter with two or more dimensions is a layer's weight ``W`` (``group`` = the owning module,
e.g. ``features.0``; a conv kernel ``[out, in, k1, k2]`` is read as the ``out x (in k1 k2)`` matrix).
With singular values ``sigma_1 >= ... >= sigma_r`` of ``W`` (exact SVD in float64):

* ``spectral_norm = sigma_1 = ||W||_2``.
* ``stable_rank = ||W||_F^2 / ||W||_2^2 = sum_k sigma_k^2 / sigma_1^2`` (Rudelson & Vershynin 2007).
* ``effective_rank = exp(-sum_k p_k log p_k)``, ``p_k = sigma_k / sum_j sigma_j`` (Roy & Vetterli 2007).
* ``alpha``: the power-law exponent of the empirical spectral density of ``lambda_k = sigma_k^2``, the
  WeightWatcher "alpha" (Martin & Mahoney 2021, "Implicit self-regularization in deep neural
  networks"; Martin, Peng, Mahoney 2021): ``p(lambda) ~ lambda^-alpha`` for ``lambda >= lambda_min``,
  fitted by maximum likelihood with ``lambda_min`` chosen to minimise the Kolmogorov-Smirnov distance
  (Clauset, Shalizi, Newman 2009): ``alpha = 1 + n / sum_{lambda_k >= lambda_min} log(lambda_k / lambda_min)``;
  ``stderr = (alpha - 1) / sqrt(n)`` over the ``n`` tail eigenvalues. Omitted for layers with fewer than
  ``min_evals`` non-zero eigenvalues (a power law through a handful of points says nothing).
  Well-trained layers typically read 2 to 6 (Martin & Mahoney).

All four are properties of the weights alone: no data, no loss.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from diagnostics.analyzers.rank import entropy_effective_rank
from diagnostics.errors import DiagnosticsError
from diagnostics.lazy import lazy_import
from diagnostics.progress import bind
from diagnostics.results import Result, concat_later, make_records
from diagnostics.spec import Analyzer, FileOutput, Metric, Section, check_config, option

if TYPE_CHECKING:
    from torch import nn

    from diagnostics.context import Context
    from diagnostics.progress import ProgressFn

torch = lazy_import("torch")

NAME = "weights"
METRICS = ("spectral_norm", "stable_rank", "effective_rank", "alpha")


@dataclass
class WeightsConfig:
    """Settings of :func:`analyze_weights` (options of ``diag weights``, ``[weights]`` in diag.toml).

    Attributes:
        min_evals: fewest non-zero eigenvalues for an ``alpha`` fit.
        min_tail: fewest eigenvalues in the power-law tail when choosing ``lambda_min``.
        params: regex; only weights whose parameter name matches are analysed. For a bare module only (not a
            user option): on a checkpoint, the shared ``--params`` option restricts the context's parameters.
    """

    min_evals: int = option(10, help="fewest non-zero eigenvalues for a power-law alpha fit", min=2)
    min_tail: int = option(5, help="fewest eigenvalues in the power-law tail when choosing lambda_min", min=2)
    params: str | None = None

    def validate(self) -> None:
        """Cross-option rules (single options are checked from their declarations)."""
        if self.min_evals < self.min_tail:
            raise DiagnosticsError(f"--min-evals ({self.min_evals}) must be >= min_tail ({self.min_tail})")
        if self.params:
            try:
                re.compile(self.params)
            except re.error as exc:
                raise DiagnosticsError(f"--params '{self.params}' is not a valid regex: {exc}") from exc


@dataclass
class PowerLaw:
    """A fitted tail ``p(x) ~ x^-alpha`` for ``x >= xmin``; ``ks`` = Kolmogorov-Smirnov distance."""

    alpha: float
    stderr: float
    xmin: float
    n_tail: int
    ks: float


def powerlaw_fit(values: torch.Tensor, min_tail: int = 5, xmin: float | None = None) -> PowerLaw | None:
    """Continuous power-law MLE with the KS-optimal ``xmin`` (Clauset, Shalizi, Newman 2009).

    For a candidate ``xmin`` with tail ``x_1..x_n >= xmin``: ``alpha = 1 + n / sum_i log(x_i / xmin)``,
    fitted CDF ``F(x) = 1 - (x / xmin)^(1 - alpha)``, ``KS = max |F_empirical - F|`` on the tail. The
    candidate with the smallest KS (at least ``min_tail`` points) wins, unless ``xmin`` is given.

    Returns:
        the fit, or None when fewer than ``min_tail`` positive values exist or they are all equal.
    """
    x = torch.sort(values.to(torch.float64)[values > 0]).values
    n_all = x.numel()
    if n_all < min_tail:
        return None
    logs = torch.log(x)
    if xmin is not None:
        if xmin <= 0:
            raise DiagnosticsError(f"xmin must be positive, got {xmin}")
        j = int(torch.searchsorted(x, torch.tensor(xmin, dtype=torch.float64)))
        candidates = [(j, float(xmin))]
    else:
        candidates = [(j, float(x[j])) for j in range(0, n_all - min_tail + 1)]
    best: PowerLaw | None = None
    # suffix sums of log x: sum_{i >= j} log x_i
    suffix = torch.flip(torch.cumsum(torch.flip(logs, [0]), 0), [0])
    for j, lo in candidates:
        n = n_all - j
        if n < min_tail:
            continue
        denom = float(suffix[j]) - n * math.log(lo)
        if denom <= 0:
            continue
        alpha = 1.0 + n / denom
        tail = x[j:]
        fitted = 1.0 - (tail / lo) ** (1.0 - alpha)
        k = torch.arange(n, dtype=torch.float64)
        ks = float(torch.maximum((k + 1) / n - fitted, fitted - k / n).max())
        if best is None or ks < best.ks:
            best = PowerLaw(alpha=alpha, stderr=(alpha - 1.0) / n**0.5, xmin=lo, n_tail=n, ks=ks)
    return best


def weight_matrices(named: Mapping[str, torch.Tensor], pattern: str | None = None) -> dict[str, torch.Tensor]:
    """``{layer: W [out, fan_in]}`` for every parameter with >= 2 dims (conv kernels reshaped)."""
    rx = re.compile(pattern) if pattern else None
    out: dict[str, torch.Tensor] = {}
    for name, p in named.items():
        if p.dim() < 2 or (rx is not None and not rx.search(name)):
            continue
        group = name[: -len(".weight")] if name.endswith(".weight") else name
        if group in out:
            group = name
        out[group] = p.detach().reshape(p.shape[0], -1)
    return out


def weight_spectrum_metrics(
    matrix: torch.Tensor, config: WeightsConfig
) -> tuple[list[tuple[str, float, float | None]], torch.Tensor, PowerLaw | None]:
    """One weight matrix -> ``[(metric, value, stderr)]``, its singular values, the power-law fit.

    The SVD runs on the CPU in float64 whatever the model's device and dtype, so the numbers do not depend on them.
    """
    w = matrix.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(w).all()):
        raise DiagnosticsError("a weight matrix holds NaN or inf; check the checkpoint")
    s = torch.linalg.svdvals(w)
    top = float(s[0]) if s.numel() else 0.0
    rows: list[tuple[str, float, float | None]] = [("spectral_norm", top, None)]
    rows.append(("stable_rank", float((s**2).sum()) / top**2 if top > 0 else 0.0, None))
    rows.append(("effective_rank", entropy_effective_rank(s), None))
    lam = s**2
    nonzero = lam[lam > lam.max() * lam.numel() * torch.finfo(torch.float64).eps] if top > 0 else lam[:0]
    fit = None
    if nonzero.numel() >= config.min_evals:
        fit = powerlaw_fit(nonzero, min_tail=config.min_tail)
        if fit is not None:
            rows.append(("alpha", fit.alpha, fit.stderr))
    return rows, s, fit


def _source_weights(
    config: WeightsConfig, source: Any, checkpoint: str | None, step: int | None
) -> tuple[dict[str, torch.Tensor], str, int | None]:
    """``({layer: W}, checkpoint, step)`` of a :class:`Context` (its analysed parameters) or a bare module."""
    if isinstance(source, torch.nn.Module):
        named = dict(source.named_parameters())
        return weight_matrices(named, config.params), checkpoint or "model", step
    if not hasattr(source, "params") or not hasattr(source, "model"):
        raise DiagnosticsError(f"analyze_weights needs a Context or an nn.Module, got {type(source).__name__}")
    # the context's analysed parameters: --params (and requires_grad) already applied
    mats = weight_matrices(source.params, config.params)
    return mats, checkpoint or source.checkpoint, source.step if step is None else step


def analyze_weights(
    config: WeightsConfig,
    source: Context | nn.Module,
    progress: ProgressFn | None = None,
    *,
    checkpoint: str | None = None,
    step: int | None = None,
) -> Result:
    """Spectra of every weight matrix of a model (no data used).

    Args:
        config: the options (checked first).
        source: a :class:`~diagnostics.context.Context` (its analysed parameters, i.e. those matching
            ``--params``) or a bare ``nn.Module`` (every parameter, filtered by ``config.params``).
        progress: ``progress(task, done, total)``.
        checkpoint: the checkpoint name the records carry (default: the context's, or ``"model"`` for a module).
        step: the training step the records carry (default: the context's, or None for a module).

    Returns:
        One record per layer and metric (``group`` = layer); metadata ``layers``, ``per_layer`` (shape and
        the alpha fit), ``conv_reshape``, ``notes``; artifact ``spectrum``, a DataFrame ``group, k,
        singular_value`` (k 1-based).

    Raises:
        DiagnosticsError: on invalid options, a ``source`` that is neither a Context nor a module, or a
            model with no parameter of two or more dimensions (matching ``--params``).
    """
    check_config(config)
    mats, checkpoint, step = _source_weights(config, source, checkpoint, step)
    if not mats:
        what = f" matching '{config.params}'" if config.params else ""
        raise DiagnosticsError(f"the model has no weight matrix (a parameter with >= 2 dims){what}")
    rows: list[tuple] = []
    frames = []
    per_layer: dict[str, Any] = {}
    notes: list[str] = []
    tick = bind(progress, "weights")
    for i, (group, w) in enumerate(mats.items()):
        metric_rows, s, fit = weight_spectrum_metrics(w, config)
        rows += [(m, v, se, None, group) for m, v, se in metric_rows]
        per_layer[group] = {"shape": list(w.shape), "alpha_fit": None if fit is None else asdict(fit)}
        if fit is None:
            notes.append(
                f"layer '{group}': fewer than {config.min_evals} non-zero eigenvalues ({min(w.shape)} at most), "
                "no alpha"
            )
        frames.append({"group": group, "k": range(1, len(s) + 1), "singular_value": s.numpy()})
        tick(i + 1, len(mats))
    metadata: dict[str, Any] = {
        "layers": list(mats),
        "per_layer": per_layer,
        "conv_reshape": "a kernel [out, in, *k] is read as the matrix [out, in * prod(k)]",
        "notes": notes,
    }
    artifacts = {"spectrum": concat_later(frames)}  # a DataFrame once read: pandas only when it is tabulated
    return Result(make_records(checkpoint, step, NAME, rows), metadata, artifacts)


# ------------------------------------------------------------------------------------ declaration
_LAYER = "the layer: the module owning the weight (a conv kernel [out, in, *k] read as out x in*prod(k))"
_MARTIN = "Martin & Mahoney 2021; Clauset, Shalizi, Newman 2009"

ANALYZER = Analyzer(
    name=NAME,
    summary="data-free spectral norm, stable rank, effective rank and power-law alpha of weights",
    description="Spectral norm, stable rank, effective rank and power-law alpha (WeightWatcher-style) of every "
    "weight matrix, from the weights alone (the data is not used).",
    config=WeightsConfig,
    run=analyze_weights,
    needs_targets=False,
    needs_data=False,
    uses_loss=False,
    order=48,
    metrics=(
        Metric(
            "spectral_norm",
            "sigma_1 = ||W||_2, the largest singular value of the weight matrix W",
            headline=True,
            group=_LAYER,
        ),
        Metric(
            "stable_rank",
            "||W||_F^2 / ||W||_2^2 = sum_k sigma_k^2 / sigma_1^2",
            group=_LAYER,
            reference="Rudelson & Vershynin 2007",
        ),
        Metric(
            "effective_rank",
            "exp(-sum_k p_k log p_k), p_k = sigma_k / sum_j sigma_j over the singular values of W",
            group=_LAYER,
            reference="Roy & Vetterli 2007",
        ),
        Metric(
            "alpha",
            "power-law exponent of the eigenvalues lambda_k = sigma_k^2 of W^T W: MLE alpha = 1 + n / sum_{lambda_k "
            ">= lambda_min} log(lambda_k / lambda_min) with the KS-optimal lambda_min, stderr (alpha - 1)/sqrt(n); "
            "well-trained layers typically read 2 to 6",
            headline=True,
            group=_LAYER,
            reference=_MARTIN,
        ),
    ),
    outputs=(
        FileOutput(
            "plot",
            "write PREFIX.spectrum.png: the singular values of the weight matrices",
            render="diagnostics.render:weights_spectrum",
            suffixes=(".spectrum.png",),
        ),
    ),
    sections=(
        Section(
            "Weight spectra",
            METRICS,
            "Data-free spectra of every weight matrix: spectral norm, stable and effective rank, and the power-law "
            "exponent alpha of the eigenvalue density (Martin & Mahoney 2021; 2 to 6 in well-trained layers, "
            "lower = heavier-tailed).",
        ),
    ),
)
