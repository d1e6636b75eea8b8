"""Neural collapse at any layer (Papyan, Han, Donoho 2020), streamed in float64.

Notation: ``N`` samples with labels ``y_i`` in ``C`` classes, features ``h_i`` in ``R^D`` at a layer;
``n_c`` samples in class ``c``; class means ``mu_c``; the **global mean is the unweighted mean of the
class means** ``mu_G = (1/C) sum_c mu_c`` (a sample-weighted mean would make a perfect simplex ETF look
broken under class imbalance); ``M = [mu_c - mu_G]`` (``C x D``, one row per class);
``Sigma_W = (1/N) sum_i (h_i - mu_{y_i})(h_i - mu_{y_i})^T`` (averaged over all samples);
``Sigma_B = (1/C) M^T M``. The classifier computes ``W h + b`` with ``W`` ``[classes, D]``; its rows
are matched to classes by label (``W_c`` = row ``c``).

Metrics (``group`` = layer):

* ``nc1 = Tr(Sigma_W Sigma_B^+) / C`` (NC1, within-class variability; ``^+`` = pseudo-inverse with
  singular values of ``M`` below ``rtol * max`` dropped). Computed as ``sum_k u_k^T Sigma_W u_k / s_k^2``
  with ``M^T = U S V^T``, so no ``D x D`` matrix is formed.
* ``nc2_equinorm = std_c ||mu_c - mu_G|| / mean_c ||mu_c - mu_G||`` and
  ``nc2_equinorm_classifier = std_c ||W_c|| / mean_c ||W_c||`` (NC2; ``std`` with ``ddof=1`` as in
  Papyan et al.'s code).
* ``nc2_equiangular = mean_{c<c'} |cos(mu_c - mu_G, mu_c' - mu_G) + 1/(C-1)|`` (0 for a simplex ETF);
  ``nc2_cos_mean = mean_{c<c'} cos(...)`` (a simplex ETF has ``-1/(C-1)``); ``nc2_cos_std`` (std over
  pairs, Papyan et al.'s "equiangularity"); ``nc2_equiangular_classifier`` likewise on the rows ``W_c``.
* ``nc3 = || W^T/||W||_F - M^T/||M||_F ||_F^2`` (NC3, self-duality; ``W`` restricted to the classes
  present, uncentred as in Papyan et al.).
* ``nc4 = (1/N) #{i : argmax_c (W h_i + b)_c != argmin_c ||h_i - mu_c||}`` (NC4, the classifier's
  decision *with its bias* against the nearest class mean).
* ``cdnv``: class-distance normalised variance (Galanti, Gyorgy, Hutter 2022),
  ``mean_{c<c'} (Var_c + Var_c') / (2 ||mu_c - mu_c'||^2)`` with ``Var_c = (1/n_c) sum_{i in c} ||h_i - mu_c||^2``.
  Always reported; it is the measure to read when ``C > D + 1``, where no simplex ETF exists in ``R^D``
  and the ETF metrics (``nc2_equiangular``, ``nc2_cos_mean``, ``nc2_cos_std`` and the classifier's) are
  omitted.
* ``nc2_orthogonal_frame`` (imbalanced data only, i.e. ``max n_c / min n_c >= imbalance_ratio``, 1.5 by
  default; Dang, Tran, Osher, Tran-The, Ho, Nguyen 2023, "Neural collapse in deep linear networks: from
  balanced to imbalanced data"): with ``G = Mu Mu^T`` the *uncentred* Gram of the class means,
  ``|| G/||G||_F - diag(G)/||diag(G)||_F ||_F`` (0 when the class means are orthogonal, of any lengths:
  the general orthogonal frame that MSE training converges to under imbalance);
  ``nc2_orthogonal_frame_classifier`` likewise with ``W W^T``.

Per class (``--per-class``; ``group = "<layer>/class=<c>"``, ``index = c``): ``class_count`` (``n_c``),
``class_variance`` (``Var_c``), ``class_mean_norm`` (``||mu_c - mu_G||``), ``class_cdnv`` (mean CDNV
against the other classes) and ``class_nc4`` (the NC4 mismatch rate within the class).

Two streamed passes over the data: class sums, then centred residuals (exact centring, no
cancellation). Memory is ``O(C D)``; no ``N x D`` or ``D x D`` matrix is held.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
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

NAME = "collapse"
ETF_METRICS = ("nc2_equiangular", "nc2_cos_mean", "nc2_cos_std", "nc2_equiangular_classifier")
METRICS = (
    "nc1",
    "nc2_equinorm",
    "nc2_equinorm_classifier",
    "nc2_equiangular",
    "nc2_equiangular_classifier",
    "nc2_cos_mean",
    "nc2_cos_std",
    "nc2_orthogonal_frame",
    "nc2_orthogonal_frame_classifier",
    "nc3",
    "nc4",
    "cdnv",
)
CLASS_METRICS = ("class_count", "class_variance", "class_mean_norm", "class_cdnv", "class_nc4")
# the per-layer figure of ``diag collapse --plot`` (more than one layer)
LAYER_PLOT_METRICS = ("nc1", "nc2_equinorm", "nc2_equiangular", "nc3", "nc4", "cdnv")


@dataclass
class CollapseConfig(FeatureOptions):
    """Settings of :func:`analyze_collapse` (options of ``diag collapse``, ``[collapse]`` in diag.toml).

    Attributes:
        layers, pool: where features are captured (:class:`~diagnostics.options.FeatureOptions`);
            ``layers`` None: the classifier's input.
        classifier: module name of the classifier; None: the last ``nn.Linear``.
        use_classifier: False skips the classifier metrics (``nc2_*_classifier``, ``nc3``, ``nc4``).
        per_class: also the per-class rows.
        rtol: singular values of ``M`` at or below ``rtol * max`` are treated as zero in ``Sigma_B^+``
            (default ``max(C, D) * float64 eps``).
        imbalance_ratio: data count as imbalanced (and the orthogonal-frame metrics are reported) when
            ``max_c n_c / min_c n_c`` reaches this.
    """

    classifier: str | None = option(
        None, help="module name of the classifier W h + b (default: the last nn.Linear)", metavar="MODULE"
    )
    use_classifier: bool = option(
        True, help="compute the classifier metrics nc2_*_classifier, nc3, nc4 (--no-use-classifier skips them)"
    )
    per_class: bool = option(False, help="also one row per class and metric")
    rtol: float | None = option(
        None,
        help="singular values of the centred class means at or below rtol * max count as zero in Sigma_B^+ "
        "(default: max(C, D) * float64 eps)",
        min=0,
        max=1,
        min_open=True,
        max_open=True,
    )
    imbalance_ratio: float = option(
        1.5, help="max_c n_c / min_c n_c from which the data count as imbalanced (orthogonal-frame metrics)", min=1
    )

    def validate(self) -> None:
        """Cross-option rules (single options are checked from their declarations)."""
        if self.classifier is not None and not self.use_classifier:
            raise DiagnosticsError("--classifier and --no-use-classifier contradict each other; pass one")


# --------------------------------------------------------------------------------- pass 1
@dataclass
class ClassMeans:
    """Result of pass 1: ``classes [C]`` (sorted labels), ``counts [C]``, ``means [C, D]`` (float64)."""

    classes: torch.Tensor
    counts: torch.Tensor
    means: torch.Tensor

    @property
    def n(self) -> int:
        """Total number of samples ``N = sum_c n_c``."""
        return int(self.counts.sum())


class ClassMeanAccumulator:
    """Streams ``(h [B, D], labels [B])`` into per-class counts and float64 sums."""

    def __init__(self) -> None:
        self.sums: torch.Tensor | None = None
        self.counts: torch.Tensor | None = None

    def update(self, h: torch.Tensor, labels: torch.Tensor) -> None:
        """Add one batch to the per-class float64 sums and counts.

        Args:
            h: features ``[B, D]`` (any dtype and device; accumulated in float64 on the CPU).
            labels: integer class labels ``[B]``, non-negative; the tables grow to ``max(labels) + 1`` rows.

        Raises:
            DiagnosticsError: when ``D`` differs from that of an earlier batch.
        """
        h = h.to(torch.float64).cpu()
        labels = labels.cpu()
        k = int(labels.max()) + 1 if labels.numel() else 0
        if self.sums is None:
            self.sums = torch.zeros(k, h.shape[1], dtype=torch.float64)
            self.counts = torch.zeros(k, dtype=torch.float64)
        assert self.counts is not None
        if h.shape[1] != self.sums.shape[1]:
            raise DiagnosticsError(f"feature dimension changed between batches ({self.sums.shape[1]} -> {h.shape[1]})")
        if k > self.sums.shape[0]:
            grow = k - self.sums.shape[0]
            self.sums = torch.cat([self.sums, torch.zeros(grow, h.shape[1], dtype=torch.float64)])
            self.counts = torch.cat([self.counts, torch.zeros(grow, dtype=torch.float64)])
        self.sums.index_add_(0, labels, h)
        self.counts.index_add_(0, labels, torch.ones(labels.shape[0], dtype=torch.float64))

    def finalize(self) -> ClassMeans:
        """Class means ``mu_c = (1/n_c) sum_{i in c} h_i`` of the classes seen at least once.

        Returns:
            The sorted present labels, their counts ``n_c`` and means ``[C, D]`` (float64).

        Raises:
            DiagnosticsError: when no sample was accumulated.
        """
        if self.sums is None or self.counts is None or float(self.counts.sum()) == 0:
            raise DiagnosticsError("no samples reached the feature accumulator; the data is empty")
        present = torch.nonzero(self.counts > 0).flatten()
        counts = self.counts[present]
        return ClassMeans(present, counts, self.sums[present] / counts[:, None])


def between_class_basis(means: ClassMeans, rtol: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``M^T = U S V^T`` with ``M = means - mu_G`` -> ``(U [D, r], s [r])`` over the non-zero singular values.

    The rows of ``M`` sum to zero, so ``rank M <= min(C - 1, D)``: at most that many are kept, and of
    those only singular values above ``rtol * max(s_1, max_c ||mu_c||)`` (centring a mean of norm
    ``||mu_c||`` leaves rounding errors of that order times the machine epsilon).
    """
    mu = means.means
    m = mu - mu.mean(0, keepdim=True)
    u, s, _ = torch.linalg.svd(m.T, full_matrices=False)
    c, d = m.shape
    rtol = max(c, d) * torch.finfo(torch.float64).eps if rtol is None else rtol
    scale = max(float(s[0]) if s.numel() else 0.0, float(mu.norm(dim=1).max()))
    keep = s > rtol * scale
    keep[min(c - 1, d) :] = False
    if scale == 0.0:
        keep[:] = False
    return u[:, keep], s[keep]


# --------------------------------------------------------------------------------- pass 2
@dataclass
class WithinClass:
    """Result of pass 2: per-class ``sq [C]`` = sum ||h - mu_c||^2, ``proj_sq [r]`` = sum (u_k^T (h - mu_y))^2,
    and per-class ``mismatch [C]`` counts of NC4 (None without a classifier)."""

    sq: torch.Tensor
    proj_sq: torch.Tensor
    mismatch: torch.Tensor | None


class WithinClassAccumulator:
    """Streams ``(h, labels)`` again, with the class means known: exact centred sums and NC4 counts."""

    def __init__(
        self,
        means: ClassMeans,
        basis: torch.Tensor,
        weight: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
    ) -> None:
        self.means = means
        self.basis = basis
        self.weight = weight
        self.bias = bias
        size = int(means.classes.max()) + 1
        self.index = torch.full((size,), -1, dtype=torch.int64)
        self.index[means.classes] = torch.arange(len(means.classes))
        c = len(means.classes)
        self.sq = torch.zeros(c, dtype=torch.float64)
        self.proj_sq = torch.zeros(basis.shape[1], dtype=torch.float64)
        self.mismatch = torch.zeros(c, dtype=torch.float64) if weight is not None else None
        self.mean_sq = (means.means**2).sum(1)

    def update(self, h: torch.Tensor, labels: torch.Tensor, h_classifier: torch.Tensor | None = None) -> None:
        """Add one batch of exactly centred residuals ``r_i = h_i - mu_{y_i}`` to the pass-2 sums.

        Accumulates ``||r_i||^2`` per class, ``(u_k^T r_i)^2`` per basis vector ``u_k`` and, with a
        classifier, the NC4 mismatches ``argmax_c (W h_i + b)_c != argmin_c ||h_i - mu_c||`` per class.

        Args:
            h: features ``[B, D]`` at the analysed layer (accumulated in float64 on the CPU).
            labels: integer class labels ``[B]``; every one must have been seen in pass 1.
            h_classifier: the classifier's input ``[B, D_W]`` when it differs from ``h``; None uses ``h``.

        Raises:
            DiagnosticsError: when a label was not seen in the first pass (the data changed between passes).
        """
        h = h.to(torch.float64).cpu()
        labels = labels.cpu()
        if labels.numel() and int(labels.max()) >= self.index.shape[0]:
            raise DiagnosticsError("the data changed between the two passes (a label unseen in the first pass)")
        idx = self.index[labels]
        if bool((idx < 0).any()):
            raise DiagnosticsError("the data changed between the two passes (a label unseen in the first pass)")
        r = h - self.means.means[idx]
        self.sq.index_add_(0, idx, (r * r).sum(1))
        if self.basis.shape[1]:
            self.proj_sq += ((r @ self.basis) ** 2).sum(0)
        if self.weight is not None:
            assert self.mismatch is not None
            hc = h if h_classifier is None else h_classifier.to(torch.float64).cpu()
            logits = hc @ self.weight.T
            if self.bias is not None:
                logits = logits + self.bias
            predicted = logits.argmax(1)
            dist = self.mean_sq[None, :] - 2.0 * (h @ self.means.means.T)
            nearest = self.means.classes[dist.argmin(1)]
            self.mismatch.index_add_(0, idx, (predicted != nearest).to(torch.float64))

    def finalize(self) -> WithinClass:
        """The accumulated pass-2 sums (``mismatch`` is None without a classifier)."""
        return WithinClass(self.sq, self.proj_sq, self.mismatch)


# ------------------------------------------------------------------------------- summary
@dataclass
class CollapseSummary:
    """Every number of the module docstring for one layer.

    ``values`` maps metric -> float (only the defined ones); ``class_values`` maps per-class metric ->
    tensor ``[C]``; ``cosine`` is the ``C x C`` matrix of ``cos(mu_c - mu_G, mu_c' - mu_G)``.
    """

    classes: torch.Tensor
    counts: torch.Tensor
    dim: int
    values: dict[str, float]
    class_values: dict[str, torch.Tensor]
    cosine: torch.Tensor
    etf_possible: bool
    imbalanced: bool
    imbalance_ratio: float
    between_rank: int
    notes: list[str] = field(default_factory=list)


def _cv(x: torch.Tensor) -> float | None:
    """Coefficient of variation ``std(ddof=1) / mean``; None for fewer than two values or a zero mean."""
    if x.numel() < 2 or float(x.mean()) == 0:
        return None
    return float(x.std(unbiased=True) / x.mean())


def _cosines(rows: torch.Tensor) -> torch.Tensor:
    norms = rows.norm(dim=1)
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    unit = rows / safe[:, None]
    return unit @ unit.T


def _orthogonal_frame(rows: torch.Tensor) -> float | None:
    gram = rows @ rows.T
    g_norm = gram.norm()
    diag = torch.diag(torch.diagonal(gram))
    d_norm = diag.norm()
    if float(g_norm) == 0 or float(d_norm) == 0:
        return None
    return float((gram / g_norm - diag / d_norm).norm())


def _pairs(c: int) -> torch.Tensor:
    """Indices ``[2, C(C-1)/2]`` of the class pairs ``c < c'``."""
    return torch.triu_indices(c, c, offset=1)


def _mean_geometry(m: torch.Tensor, cos: torch.Tensor, etf_possible: bool, notes: list[str]) -> dict[str, float]:
    """NC2 of the centred class means ``m [C, D]``: equinorm, and the ETF metrics where a simplex ETF exists."""
    c, d = m.shape
    norms = m.norm(dim=1)
    values: dict[str, float] = {}
    if (cv := _cv(norms)) is not None:
        values["nc2_equinorm"] = cv
    iu = _pairs(c)
    pair_cos = cos[iu[0], iu[1]]
    if etf_possible and c >= 2 and float(norms.min()) > 0:
        values["nc2_equiangular"] = float((pair_cos + 1.0 / (c - 1)).abs().mean())
        values["nc2_cos_mean"] = float(pair_cos.mean())
        if pair_cos.numel() >= 2:
            values["nc2_cos_std"] = float(pair_cos.std(unbiased=True))
    elif not etf_possible:
        notes.append(
            f"{c} classes in {d} dimensions: a simplex ETF needs D >= C - 1, so the ETF metrics are omitted; read cdnv"
        )
    elif c >= 2:
        notes.append("a class mean equals the global mean, so the cosines between class means are undefined")
    return values


def _variability(
    mu: torch.Tensor, m: torch.Tensor, counts: torch.Tensor, within: WithinClass, notes: list[str]
) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """CDNV (Galanti et al. 2022) and the per-class counts, variances, mean norms and CDNVs."""
    c = mu.shape[0]
    iu = _pairs(c)
    var = within.sq / counts
    pair_d2 = (torch.cdist(mu, mu) ** 2)[iu[0], iu[1]]
    pair_cdnv = (var[iu[0]] + var[iu[1]]) / (2.0 * pair_d2)
    finite = pair_d2 > 0
    values: dict[str, float] = {}
    if c >= 2 and bool(finite.any()):
        values["cdnv"] = float(pair_cdnv[finite].mean())
        if not bool(finite.all()):
            notes.append(f"{int((~finite).sum())} pair(s) of classes share a mean; left out of cdnv")
    full = torch.full((c, c), float("nan"), dtype=torch.float64)
    full[iu[0], iu[1]] = pair_cdnv
    full[iu[1], iu[0]] = pair_cdnv
    full[~torch.isfinite(full)] = float("nan")
    class_values = {
        "class_count": counts,
        "class_variance": var,
        "class_mean_norm": m.norm(dim=1),
        "class_cdnv": torch.nanmean(full, dim=1) if c >= 2 else torch.full((c,), float("nan")),
    }
    return values, class_values


def _classifier_geometry(w: torch.Tensor, m: torch.Tensor, etf_possible: bool, imbalanced: bool) -> dict[str, float]:
    """NC2 of the classifier rows ``w [C, D]`` (matched to the classes) and NC3 against the class means ``m``."""
    c = w.shape[0]
    values: dict[str, float] = {}
    if (cv := _cv(w.norm(dim=1))) is not None:
        values["nc2_equinorm_classifier"] = cv
    if etf_possible and c >= 2 and float(w.norm(dim=1).min()) > 0:
        iu = _pairs(c)
        wcos = _cosines(w)[iu[0], iu[1]]
        values["nc2_equiangular_classifier"] = float((wcos + 1.0 / (c - 1)).abs().mean())
    if float(w.norm()) > 0 and float(m.norm()) > 0:
        values["nc3"] = float(((w / w.norm() - m / m.norm()) ** 2).sum())
    if imbalanced and (of := _orthogonal_frame(w)) is not None:
        values["nc2_orthogonal_frame_classifier"] = of
    return values


def summarize(
    means: ClassMeans,
    within: WithinClass,
    basis_singular_values: torch.Tensor,
    weight: torch.Tensor | None = None,
    imbalance_ratio: float = 1.5,
) -> CollapseSummary:
    """Pass-1 and pass-2 statistics (+ the classifier's ``W``) -> :class:`CollapseSummary`."""
    counts, mu = means.counts, means.means
    c, d = mu.shape
    n = float(counts.sum())
    notes: list[str] = []
    values: dict[str, float] = {}
    m = mu - mu.mean(0, keepdim=True)
    etf_possible = c <= d + 1
    ratio = float(counts.max() / counts.min())
    imbalanced = ratio >= imbalance_ratio and ratio > 1.0
    s = basis_singular_values
    if bool((counts == 1).all()):
        notes.append("every class has a single sample, so the within-class variability is zero by construction")
    if s.numel() == 0:
        notes.append("the class means coincide (no between-class variation), so NC1 is undefined")
    else:
        values["nc1"] = float((within.proj_sq / (n * s**2)).sum())
    cos = _cosines(m)
    values.update(_mean_geometry(m, cos, etf_possible, notes))
    cdnv, class_values = _variability(mu, m, counts, within, notes)
    values.update(cdnv)
    if imbalanced and (of := _orthogonal_frame(mu)) is not None:
        values["nc2_orthogonal_frame"] = of
    if weight is not None:
        values.update(_classifier_geometry(weight.to(torch.float64)[means.classes], m, etf_possible, imbalanced))
        if within.mismatch is not None:
            values["nc4"] = float(within.mismatch.sum() / n)
            class_values["class_nc4"] = within.mismatch / counts
    return CollapseSummary(
        classes=means.classes,
        counts=counts,
        dim=d,
        values=values,
        class_values=class_values,
        cosine=cos,
        etf_possible=etf_possible,
        imbalanced=imbalanced,
        imbalance_ratio=ratio,
        between_rank=int(s.numel()),
        notes=notes,
    )


def summary_rows(summary: CollapseSummary, group: str, per_class: bool = False) -> list[tuple]:
    """Record rows ``(metric, value, stderr, index, group)`` of one layer."""
    rows: list[tuple] = [(m, summary.values[m], None, None, group) for m in METRICS if m in summary.values]
    if per_class:
        for metric in CLASS_METRICS:
            if metric not in summary.class_values:
                continue
            for label, value in zip(summary.classes.tolist(), summary.class_values[metric].tolist()):
                if value == value:  # not NaN
                    rows.append((metric, value, None, int(label), f"{group}/class={label}"))
    return rows


def _check_classes(means: ClassMeans, n_outputs: int | None, where: str) -> None:
    c = len(means.classes)
    if n_outputs is not None and means.n < n_outputs:
        raise DiagnosticsError(
            f"{where}: {means.n} samples for {n_outputs} classes; collapse needs at least one sample per class "
            "(raise --samples)"
        )
    if c < 2:
        raise DiagnosticsError(f"{where}: the data has {c} class; collapse needs at least two classes")


def neural_collapse(
    batches: Sequence[tuple[torch.Tensor, Any]] | Callable[[], Iterable[tuple[torch.Tensor, Any]]],
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    rtol: float | None = None,
    imbalance_ratio: float = 1.5,
) -> CollapseSummary:
    """Neural-collapse metrics of given features: ``batches`` of ``(h [B, D], labels [B])``.

    ``batches`` is a sequence (iterated twice) or a zero-argument callable giving a fresh iterable per
    pass. ``weight [K, D]`` and ``bias [K]`` are the classifier's (rows indexed by label).
    """

    def passes() -> Iterable[tuple[torch.Tensor, Any]]:
        return batches() if callable(batches) else batches

    acc = ClassMeanAccumulator()
    for h, y in passes():
        acc.update(h, features.class_labels(y))
    means = acc.finalize()
    _check_classes(means, None if weight is None else int(weight.shape[0]), "features")
    if weight is not None:
        _check_classifier_shape(weight, bias, means, "classifier")
    u, s = between_class_basis(means, rtol)
    w64 = None if weight is None else weight.to(torch.float64)
    b64 = None if bias is None else bias.to(torch.float64)
    within = WithinClassAccumulator(means, u, w64, b64)
    for h, y in passes():
        within.update(h, features.class_labels(y))
    return summarize(means, within.finalize(), s, w64, imbalance_ratio)


def _check_classifier_shape(weight: torch.Tensor, bias: torch.Tensor | None, means: ClassMeans, name: str) -> None:
    k, d = weight.shape
    if d != means.means.shape[1]:
        raise DiagnosticsError(
            f"classifier '{name}' takes {d} features but the layer gives {means.means.shape[1]}; pass the layer "
            "that feeds it"
        )
    if int(means.classes.max()) >= k:
        raise DiagnosticsError(
            f"classifier '{name}' has {k} outputs but the labels go up to {int(means.classes.max())}; pass "
            "--classifier with the layer that scores the classes, or --no-classifier"
        )
    if bias is not None and bias.numel() != k:
        raise DiagnosticsError(f"classifier '{name}' has {k} rows but {bias.numel()} bias entries")


# ------------------------------------------------------------------------------------ analyzer
def _same_features(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape:
        return False
    scale = float(b.abs().max()) if b.numel() else 0.0
    return bool(torch.allclose(a, b, rtol=1e-4, atol=1e-6 * (1.0 + scale)))


@dataclass
class _Plan:
    """Which layers are captured and analysed, and where the classifier's metrics apply.

    Attributes:
        requested: the layers asked for (or the classifier's input).
        layers: the resolved layers captured (``requested`` + the classifier's input).
        classifier: ``(name, module)`` of the classifier, or None.
        cls_key: ``'<classifier>:input'``, or None.
        matches: per analysed layer, whether its features are the classifier's input.
        analysed: the layers reported (``requested``, plus ``cls_key`` when none of them matches).
        weight, bias: the classifier's parameters (after pass 1).
    """

    requested: list[str]
    layers: list[Any]
    classifier: tuple[str, Any] | None
    cls_key: str | None
    matches: dict[str, bool]
    analysed: list[str] = field(default_factory=list)
    weight: Any = None
    bias: Any = None

    def classifier_of(self, name: str) -> tuple[Any, Any]:
        """``(weight, bias)`` for a layer whose features feed the classifier, else ``(None, None)``."""
        return (self.weight, self.bias) if self.matches.get(name) else (None, None)


def _plan(config: CollapseConfig, model: Any, notes: list[str]) -> _Plan:
    classifier = None
    if config.use_classifier:
        classifier = features.find_classifier(model, config.classifier)
        if classifier is None:
            notes.append("the model has no nn.Linear: classifier metrics (nc2_*_classifier, nc3, nc4) skipped")
    cls_key = None if classifier is None else classifier[0] + features.INPUT_SUFFIX
    if config.layers:
        requested = list(dict.fromkeys(config.layers))
    elif cls_key is not None:
        requested = [cls_key]
    else:
        raise DiagnosticsError("no layer given and no classifier to take the input of: pass --layer NAME")
    capture = requested + ([cls_key] if cls_key is not None and cls_key not in requested else [])
    matches = {name: cls_key is not None for name in requested}
    return _Plan(requested, features.resolve_layers(model, capture), classifier, cls_key, matches)


def _stream(plan: _Plan, ctx: Context, config: CollapseConfig) -> Iterable[Any]:
    return features.stream_features(
        ctx.model, ctx.batches, plan.layers, pool=config.pool, forward=lambda x: ctx.forward(ctx.params, x)
    )


def _class_means_pass(
    plan: _Plan, ctx: Context, config: CollapseConfig, progress: ProgressFn | None
) -> dict[str, ClassMeans]:
    """Pass 1: class sums of every captured layer, and which layers equal the classifier's input."""
    acc = {layer.name: ClassMeanAccumulator() for layer in plan.layers}
    tick = bind(progress, "collapse: class means")
    for i, fb in enumerate(_stream(plan, ctx, config)):
        labels = features.class_labels(fb.targets)
        for name, h in fb.features.items():
            acc[name].update(h, labels)
        if plan.cls_key is not None:
            for name in plan.requested:
                if plan.matches[name] and name != plan.cls_key:
                    plan.matches[name] = _same_features(fb.features[name], fb.features[plan.cls_key])
        tick(i + 1, len(ctx.batches))
    return {name: a.finalize() for name, a in acc.items()}


def _attach_classifier(plan: _Plan, means: dict[str, ClassMeans], config: CollapseConfig, notes: list[str]) -> None:
    """Take the classifier's ``W, b`` (or drop a last Linear that cannot be it) and fix the analysed layers."""
    plan.analysed = list(plan.requested)
    if plan.classifier is None:
        return
    name = plan.classifier[0]
    weight, bias = features.classifier_parameters(plan.classifier[1])
    some = means[plan.cls_key]
    if int(some.classes.max()) >= weight.shape[0] and config.classifier is None:
        notes.append(
            f"the last nn.Linear '{name}' has {weight.shape[0]} outputs but the labels go up to "
            f"{int(some.classes.max())}: it is not the classifier, so classifier metrics are skipped "
            "(name it with --classifier)"
        )
        plan.classifier = None
        plan.matches = dict.fromkeys(plan.requested, False)
        return
    _check_classifier_shape(weight, bias, some, name)
    plan.weight, plan.bias = weight, bias
    if not any(plan.matches.values()):
        plan.analysed.append(plan.cls_key)
        notes.append(
            f"none of the layers asked for is the input of the classifier '{name}', so the classifier "
            f"metrics are reported for '{plan.cls_key}'"
        )
        plan.matches[plan.cls_key] = True


def _check_analysed(plan: _Plan, means: dict[str, ClassMeans], notes: list[str]) -> None:
    n_outputs = None if plan.weight is None else int(plan.weight.shape[0])
    for name in plan.analysed:
        _check_classes(means[name], n_outputs, f"layer '{name}'")
        if n_outputs is not None and len(means[name].classes) < n_outputs:
            missing = sorted(set(range(n_outputs)) - set(means[name].classes.tolist()))
            notes.append(
                f"layer '{name}': classes {missing[:10]}{' ...' if len(missing) > 10 else ''} have no samples; "
                "metrics use the classes present"
            )


def _within_class_pass(
    plan: _Plan,
    means: dict[str, ClassMeans],
    bases: dict[str, tuple[torch.Tensor, torch.Tensor]],
    ctx: Context,
    config: CollapseConfig,
    progress: ProgressFn | None,
) -> dict[str, WithinClass]:
    """Pass 2: centred residuals, projections on the between-class subspace, NC4 mismatches."""
    within = {
        name: WithinClassAccumulator(means[name], bases[name][0], *plan.classifier_of(name)) for name in plan.analysed
    }
    tick = bind(progress, "collapse: within-class")
    for i, fb in enumerate(_stream(plan, ctx, config)):
        labels = features.class_labels(fb.targets)
        h_cls = fb.features.get(plan.cls_key) if plan.cls_key is not None else None
        for name in plan.analysed:
            within[name].update(fb.features[name], labels, h_cls if plan.matches.get(name) else None)
        tick(i + 1, len(ctx.batches))
    return {name: acc.finalize() for name, acc in within.items()}


def cosine_columns(summary: CollapseSummary, group: str) -> dict[str, Any]:
    """The ``C x C`` cosines between centred class means of one layer as the columns of a tidy frame
    ``group, class, other, cosine`` (``diagnostics.plots.cosine_matrices`` turns it back into matrices)."""
    labels = [int(c) for c in summary.classes.tolist()]
    c = len(labels)
    return {
        "group": group,
        "class": [a for a in labels for _ in range(c)],
        "other": labels * c,
        "cosine": summary.cosine.reshape(-1).tolist(),
    }


def _layer_info(summary: CollapseSummary, classifier: str | None) -> dict[str, Any]:
    labels = summary.classes.tolist()
    return {
        "classes": len(labels),
        "dim": summary.dim,
        "samples": int(summary.counts.sum()),
        "class_counts": {int(k): int(v) for k, v in zip(labels, summary.counts.tolist())},
        "etf_possible": summary.etf_possible,
        "imbalanced": summary.imbalanced,
        "imbalance_ratio": summary.imbalance_ratio,
        "between_class_rank": summary.between_rank,
        "classifier": classifier,
    }


def analyze_collapse(config: CollapseConfig, ctx: Context, progress: ProgressFn | None = None) -> Result:
    """Neural collapse at each layer of ``config.layers`` -> records (see module docstring).

    Classifier metrics are computed for the layers whose features *are* the classifier's input
    (checked on every batch); when none is, the classifier's input is analysed as well, as layer
    ``'<classifier>:input'``.

    Args:
        config: the options (checked first).
        ctx: the checkpoint's context; its data must carry class labels.
        progress: ``progress(task, done, total)``.

    Returns:
        Records ``group = layer`` (per class: ``group = '<layer>/class=<c>'``, ``index = c``); metadata
        ``layers``, ``classifier``, ``global_mean``, ``per_layer``, ``notes``; artifact ``cosine``, the tidy
        frame of :func:`cosine_columns` for every layer (built when read).
    """
    check_config(config)
    notes: list[str] = []
    plan = _plan(config, ctx.model, notes)
    means = _class_means_pass(plan, ctx, config, progress)
    _attach_classifier(plan, means, config, notes)
    _check_analysed(plan, means, notes)
    bases = {name: between_class_basis(means[name], config.rtol) for name in plan.analysed}
    within = _within_class_pass(plan, means, bases, ctx, config, progress)
    rows: list[tuple] = []
    per_layer: dict[str, Any] = {}
    cosines = []
    classifier = None if plan.classifier is None else plan.classifier[0]
    for name in plan.analysed:
        weight = plan.classifier_of(name)[0]
        summary = summarize(means[name], within[name], bases[name][1], weight, config.imbalance_ratio)
        rows += summary_rows(summary, name, config.per_class)
        notes += [f"layer '{name}': {note}" for note in summary.notes]
        cosines.append(cosine_columns(summary, name))
        per_layer[name] = _layer_info(summary, classifier if weight is not None else None)
    metadata = {
        "layers": plan.analysed,
        "classifier": classifier,
        "global_mean": "unweighted mean of the class means",
        "per_layer": per_layer,
        "notes": notes,
    }
    artifacts = {"cosine": concat_later(cosines)}  # a DataFrame once read: pandas only when it is tabulated
    return Result(make_records(ctx.checkpoint, ctx.step, NAME, rows), metadata, artifacts)


# ------------------------------------------------------------------------------------ declaration
_LAYER = "the layer (module name, or 'name:input')"
_PER_CLASS = "'<layer>/class=<c>'"
_PAPYAN = "Papyan, Han, Donoho 2020"


def _per_class(name: str, definition: str, unit: str = "", higher_is_better: bool | None = None) -> Metric:
    return Metric(
        name,
        definition + " (with --per-class)",
        unit=unit,
        higher_is_better=higher_is_better,
        index="the class label c",
        group=_PER_CLASS,
        reference=_PAPYAN,
    )


def _nc(
    name: str, definition: str, reference: str = _PAPYAN, headline: bool = False, hib: bool | None = False
) -> Metric:
    return Metric(name, definition, higher_is_better=hib, headline=headline, group=_LAYER, reference=reference)


def _plot_suffixes(config: CollapseConfig) -> tuple[str, ...]:
    return (".cosine.png", ".layers.png") if config.layers and len(config.layers) > 1 else (".cosine.png",)


METRIC_DECLARATIONS = (
    _nc(
        "nc1",
        "Tr(Sigma_W Sigma_B^+) / C: within-class covariance Sigma_W = (1/N) sum_i (h_i - mu_{y_i})(h_i - mu_{y_i})^T "
        "against the between-class covariance Sigma_B = (1/C) sum_c (mu_c - mu_G)(mu_c - mu_G)^T, mu_G = unweighted "
        "mean of the class means",
        headline=True,
    ),
    _nc(
        "nc2_equinorm",
        "std_c ||mu_c - mu_G|| / mean_c ||mu_c - mu_G|| (std with ddof 1): equal norms of the centred class means",
        headline=True,
    ),
    _nc("nc2_equinorm_classifier", "std_c ||W_c|| / mean_c ||W_c|| over the classifier rows W_c of the classes"),
    _nc(
        "nc2_equiangular",
        "mean over class pairs of |cos(mu_c - mu_G, mu_c' - mu_G) + 1/(C-1)| (0 for a simplex ETF; omitted when "
        "C > D + 1)",
        headline=True,
    ),
    _nc(
        "nc2_equiangular_classifier",
        "mean over class pairs of |cos(W_c, W_c') + 1/(C-1)| of the classifier rows (omitted when C > D + 1)",
    ),
    _nc(
        "nc2_cos_mean",
        "mean over class pairs of cos(mu_c - mu_G, mu_c' - mu_G); a simplex ETF has -1/(C-1)",
        hib=None,
    ),
    _nc(
        "nc2_cos_std", "std (ddof 1) over class pairs of cos(mu_c - mu_G, mu_c' - mu_G): Papyan et al.'s equiangularity"
    ),
    _nc(
        "nc2_orthogonal_frame",
        "|| G/||G||_F - diag(G)/||diag(G)||_F ||_F with G = Mu Mu^T the uncentred Gram of the class means (0 for "
        "orthogonal means of any lengths); only when max_c n_c / min_c n_c >= imbalance_ratio",
        reference="Dang, Tran, Osher, Tran-The, Ho, Nguyen 2023",
    ),
    _nc(
        "nc2_orthogonal_frame_classifier",
        "|| G/||G||_F - diag(G)/||diag(G)||_F ||_F with G = W W^T of the classifier rows; only for imbalanced data",
        reference="Dang, Tran, Osher, Tran-The, Ho, Nguyen 2023",
    ),
    _nc(
        "nc3",
        "|| W^T/||W||_F - M^T/||M||_F ||_F^2, M = [mu_c - mu_G]: distance between the normalised classifier and the "
        "normalised centred class means (self-duality)",
        headline=True,
    ),
    _nc(
        "nc4",
        "(1/N) #{i : argmax_c (W h_i + b)_c != argmin_c ||h_i - mu_c||}: share of samples where the classifier and "
        "the nearest class mean disagree",
        headline=True,
    ),
    _nc(
        "cdnv",
        "mean over class pairs of (Var_c + Var_c') / (2 ||mu_c - mu_c'||^2), Var_c = (1/n_c) sum_{i in c} "
        "||h_i - mu_c||^2 (class-distance normalised variance; defined for any C and D)",
        reference="Galanti, Gyorgy, Hutter 2022",
    ),
    _per_class("class_count", "n_c, the number of samples of class c", unit="samples"),
    _per_class("class_variance", "Var_c = (1/n_c) sum_{i in c} ||h_i - mu_c||^2", higher_is_better=False),
    _per_class("class_mean_norm", "||mu_c - mu_G||, the norm of the centred class mean"),
    _per_class("class_cdnv", "mean over c' != c of (Var_c + Var_c') / (2 ||mu_c - mu_c'||^2)", higher_is_better=False),
    _per_class(
        "class_nc4",
        "share of the samples of class c where argmax_k (W h_i + b)_k != argmin_k ||h_i - mu_k||",
        higher_is_better=False,
    ),
)

ANALYZER = Analyzer(
    name=NAME,
    summary="neural collapse NC1-NC4, CDNV, orthogonal frame (imbalance) at any layer",
    description="Neural collapse (Papyan et al. 2020): NC1, NC2 (equinorm, equiangularity), NC3, NC4 and CDNV at "
    "one or more layers, with the global mean taken as the unweighted mean of the class means.",
    config=CollapseConfig,
    run=analyze_collapse,
    needs_targets=True,
    uses_loss=False,
    metrics=METRIC_DECLARATIONS,
    order=45,
    outputs=(
        FileOutput(
            "plot",
            "write PREFIX.cosine.png (cosines between centred class means, per layer) and, with several layers, "
            "PREFIX.layers.png (the metrics against the layer)",
            render="diagnostics.render:collapse_figures",
            suffixes=_plot_suffixes,
        ),
    ),
    sections=(
        Section(
            "Neural collapse: variability",
            ("nc1", "cdnv"),
            "NC1 = Tr(Σ_W Σ_B⁺)/C compares the within-class spread of the features with the spread of the class "
            "means; CDNV does the same per pair of classes and exists for any number of classes (Papyan, Han, Donoho "
            "2020; Galanti et al. 2022). Both fall towards 0 under neural collapse.",
            log_y=True,
        ),
        Section(
            "Neural collapse: geometry and classifier",
            ("nc2_equinorm", "nc2_equiangular", "nc3", "nc4", "nc2_equinorm_classifier", "nc2_orthogonal_frame"),
            "NC2: centred class means of equal norm and maximal equal angles (a simplex ETF; under class imbalance "
            "an orthogonal frame); NC3: classifier rows aligned with the class means; NC4: the classifier decides "
            "like the nearest class mean. All tend to 0 under neural collapse.",
        ),
        Section(
            "Cosines between class means",
            (),
            "Cosines between the centred class means at the last checkpoint, per layer; a simplex ETF has -1/(C-1) "
            "off the diagonal.",
            figure="diagnostics.plots:collapse_cosine_section",
        ),
    ),
)
