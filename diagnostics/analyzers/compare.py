"""Comparing two checkpoints A and B: Hessian eigenspace overlap, representation similarity, weight distances and
loss barriers, optionally after weight matching (two seeds, two steps of a run, before/after fine-tuning).

Everything is measured on A's data (B is evaluated on the same batches). Metrics (``--metrics``):

* ``overlap`` -> ``eigenspace_overlap``: ``||U_A^T U_B||_F^2 / k`` of the top-``k`` Hessian eigenvectors
  (orthonormal columns of ``U``), 1 for the same subspace, ``k / n`` expected for random ones (the subspace
  overlap of Gur-Ari, Roberts & Dyer 2018, "Gradient Descent Happens in a Tiny Subspace"). The eigenvectors are
  Lanczos Ritz vectors whose *residuals* meet the tolerance, ``||H v - theta v|| <= tol |theta|``: an
  eigenvalue converges twice as fast as its eigenvector (its error is ``~ r^2 / gap`` while the vector's angle
  is ``~ r / gap``, Davis & Kahan 1970), so a tolerance on the eigenvalues alone would leave the vectors, and
  the overlap, far less accurate than the eigenvalues. ``k + 1`` pairs are computed so that the gap
  ``delta = theta_k - theta_{k+1}`` is known; the metadata report the residuals, the Davis-Kahan bound
  ``eps = ||R||_F / delta`` of each subspace's error and the resulting bound on the overlap,
  ``|O - O*| <= (eps_A + eps_B)(2 s + eps_A + eps_B) / k`` with ``s = sqrt(k (1 - O))`` (the ``sin Theta``
  distance is a metric). With ``--align weights`` B's eigenvectors are permuted like its weights.
* ``cka`` -> ``cka`` and ``cka_debiased`` per layer (or pair ``a_layer=b_layer``): linear centred kernel
  alignment of the features ``X`` (A) and ``Y`` (B) on the same samples (Kornblith, Norouzi, Lee & Hinton 2019,
  "Similarity of Neural Network Representations Revisited"):
  ``CKA = ||X_c^T Y_c||_F^2 / (||X_c^T X_c||_F ||Y_c^T Y_c||_F)`` with column-centred ``X_c, Y_c``; 1 for
  identical features, invariant to orthogonal transforms and isotropic scaling of either. ``cka_debiased``
  replaces each HSIC by the unbiased estimator of Song, Smola, Gretton, Bedo & Borgwardt (2012) (as in Nguyen,
  Raghu & Kornblith 2021), removing the bias of finite samples (``K~``: the Gram matrix with a zero diagonal)::

      HSIC_1(K, L) = [tr(K~ L~) + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n (n-3)).

  Both are *streamed* exactly: with ``a_i = ||x_i||^2``, ``b_i = ||y_i||^2``, ``s_x = sum x_i``,
  ``s_y = sum y_i``, every term is a sum over samples that one pass accumulates in float64
  (:class:`CKAAccumulator`)::

      tr(K~ L~) = ||X^T Y||_F^2 - sum a_i b_i,     1'K~1 = ||s_x||^2 - sum a_i,
      1'K~L~1   = s_x^T (X^T Y) s_y - s_y . sum a_i y_i - s_x . sum b_i x_i + sum a_i b_i,

  so no ``n x n`` Gram matrix and no subsample is needed (memory: ``X^T Y``, ``X^T X``, ``Y^T Y``). Features
  are shifted by the first batch's mean before accumulating (both estimators are translation invariant), which
  keeps the float64 sums well conditioned.
* ``distance`` -> ``weight_distance`` ``||w_B - w_A||``, ``relative_distance`` ``||w_B - w_A|| / ||w_A||`` and
  ``weight_cosine`` ``<w_A, w_B> / (||w_A|| ||w_B||)`` over the analysed parameters, and per layer (``group`` =
  module).
* ``barrier`` -> ``barrier``: the loss barrier on ``(1 - alpha) w_A + alpha w_B`` exactly as ``diag landscape``
  defines it (its functions compute it: grid maximum of ``L(alpha) - [(1-alpha) L(0) + alpha L(1)]`` refined by
  golden-section search; Frankle et al. 2020); ``accuracy_barrier``:
  ``max_alpha [(1-alpha) acc(0) + alpha acc(1)] - acc(alpha)`` over the grid.

``--align weights`` permutes B's hidden units to match A's first (weight matching, Ainsworth, Hayase &
Srinivasa 2023, "Git Re-Basin"; see :mod:`diagnostics.alignment`): a network and a copy of it with permuted
hidden units compute the same function, yet the raw barrier between them is large. With alignment the
weight-space metrics (overlap, distances, barriers) are measured against the permuted B, and the raw values
are also emitted as ``<metric>_unaligned``; CKA is unchanged by permutations. ``--save-aligned PATH`` writes
the permuted B as a checkpoint.

In a sweep (``diag run --analyzers compare``) every checkpoint is compared with the previous one of the run
(the records carry the later checkpoint's step); ``diag compare RUN_A RUN_B`` compares the checkpoints of two
runs with the same step (e.g. two seeds). Records belong to the first checkpoint given (``ctx``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from diagnostics.errors import DiagnosticsError
from diagnostics.lazy import lazy_import
from diagnostics.options import LAYERS_FLAGS, FeatureOptions
from diagnostics.progress import bind
from diagnostics.results import Result, concat_later, make_records, table_column
from diagnostics.spec import Analyzer, FileOutput, Metric, Section, check_config, option

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from diagnostics.context import Context
    from diagnostics.progress import ProgressFn

torch = lazy_import("torch")
features = lazy_import("diagnostics.features")
alignment = lazy_import("diagnostics.alignment")

NAME = "compare"
KINDS = ("overlap", "cka", "distance", "barrier")
ALIGNS = ("none", "weights")
OVERLAP_STREAM = 9_000  # the Lanczos start vector (the same for A and B)
ALIGN_STREAM = 9_001  # the order of the groups in weight matching
WEIGHT_METRICS = ("weight_distance", "relative_distance", "weight_cosine")


@dataclass
class CompareConfig(FeatureOptions):
    """Settings of :func:`analyze_compare` (options of ``diag compare``, ``[compare]`` in diag.toml).

    Attributes:
        layers, pool: where CKA reads features (:class:`~diagnostics.options.FeatureOptions`); an entry
            ``a=b`` compares A's layer ``a`` with B's layer ``b``.
        metrics: which comparisons (``overlap``, ``cka``, ``distance``, ``barrier``).
        align: ``none`` or ``weights`` (weight matching before overlap, distance and barrier).
        top_k: dimension of the Hessian eigenspaces compared.
        tol: relative residual every Ritz vector must reach.
        max_iter: Lanczos iteration cap per checkpoint.
        steps, refine_steps, bn_recompute: the interpolation grid of the barrier (as ``diag landscape``).
        align_sweeps: most sweeps of weight matching.
        max_bytes: memory budget of the CKA accumulators.
        keep_aligned: keep the permuted B's tensors in the result (set by ``--save-aligned``).
    """

    layers: list[str] | None = option(
        None,
        help="module names whose features CKA compares; 'a=b' pairs A's layer a with B's layer b; 'name:input' "
        "captures a module's input (default: the input of the last nn.Linear)",
        **LAYERS_FLAGS,
    )
    metrics: list[str] = option(
        default_factory=lambda: ["distance", "cka", "barrier"],
        help="comparisons: overlap (Hessian eigenspaces), cka (features), distance (weights), barrier (loss along "
        "the line)",
        choices=KINDS,
    )
    align: str = option(
        "none",
        help="weights: permute B's hidden units to match A's first (Git Re-Basin weight matching)",
        choices=ALIGNS,
    )
    top_k: int = option(5, help="dimension k of the top Hessian eigenspaces compared by overlap", min=1, short="-k")
    tol: float = option(
        1e-4,
        help="every Ritz vector's residual ||Hv - theta v|| <= tol |theta| (the eigenvectors, not only the "
        "eigenvalues, converge)",
        min=0,
        max=1,
        min_open=True,
        max_open=True,
    )
    max_iter: int = option(300, help="Lanczos iteration cap per checkpoint", min=1)
    steps: int = option(11, help="interpolation grid points between (and including) A and B", min=3)
    refine_steps: int = option(16, help="golden-section steps refining the barrier (0: grid maximum only)", min=0)
    bn_recompute: bool = option(False, help="recompute BatchNorm statistics at every interpolated point")
    align_sweeps: int = option(100, help="most sweeps over all permutations in weight matching", min=1)
    max_bytes: int = option(
        2 * 1024**3, help="memory budget in bytes of the CKA accumulators (X^T Y, X^T X, Y^T Y)", min=1, cli=False
    )
    keep_aligned: bool = field(default=False, repr=False)

    def validate(self) -> None:
        """Cross-option rules (single options are checked from their declarations)."""
        if not self.metrics:
            raise DiagnosticsError(f"--metrics is empty; choose from {', '.join(KINDS)}")
        if self.keep_aligned and self.align != "weights":
            raise DiagnosticsError("--save-aligned writes the permuted B: add --align weights")
        if self.layers and "cka" not in self.metrics:
            raise DiagnosticsError("--layers choose where CKA compares features: add cka to --metrics")


# ------------------------------------------------------------------------------------------- pure maths
def subspace_overlap(U: torch.Tensor, V: torch.Tensor) -> float:
    """``||U^T V||_F^2 / k`` for orthonormal columns ``U, V [n, k]``: the mean squared cosine of the
    principal angles between the two subspaces (1 = the same subspace, 0 = orthogonal ones)."""
    if U.shape != V.shape or U.dim() != 2:
        raise DiagnosticsError(f"subspaces of different shapes {tuple(U.shape)} and {tuple(V.shape)}")
    k = U.shape[1]
    return float((U.double().T @ V.double()).pow(2).sum()) / k


def overlap_error_bound(overlap: float, k: int, eps_a: float, eps_b: float) -> float:
    """Bound on ``|overlap - exact|`` when each subspace is within ``||sin Theta||_F <= eps`` of the exact one.

    ``k (1 - O) = ||sin Theta(U, V)||_F^2`` and ``||sin Theta||_F`` is a distance between subspaces, so it moves by
    at most ``eps_a + eps_b``: ``|O - O*| <= (eps_a + eps_b)(2 s + eps_a + eps_b) / k``, ``s = sqrt(k (1 - O))``.
    """
    e = eps_a + eps_b
    s = math.sqrt(max(0.0, k * (1.0 - overlap)))
    return e * (2 * s + e) / k


def weight_distances(
    a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], names: Sequence[str]
) -> dict[str, float]:
    """``weight_distance`` ``||b - a||``, ``relative_distance`` ``||b - a|| / ||a||`` and ``weight_cosine``
    ``<a, b> / (||a|| ||b||)`` over the tensors ``names`` (float64 sums; NaN where a norm is 0)."""
    aa = bb = ab = dd = 0.0
    for n in names:
        x, y = a[n].detach().double(), b[n].detach().double()
        aa += float((x * x).sum())
        bb += float((y * y).sum())
        ab += float((x * y).sum())
        dd += float(((y - x) ** 2).sum())
    dist = math.sqrt(dd)
    return {
        "weight_distance": dist,
        "relative_distance": dist / math.sqrt(aa) if aa > 0 else math.nan,
        "weight_cosine": ab / math.sqrt(aa * bb) if aa > 0 and bb > 0 else math.nan,
    }


def accuracy_barrier(alphas: torch.Tensor, accuracy: torch.Tensor) -> tuple[float, float]:
    """``max_{alpha in [0, 1]} [(1 - alpha) acc(0) + alpha acc(1)] - acc(alpha)`` over the grid -> (value, alpha).

    The drop of accuracy below the chord between the end points; 0 when accuracy never falls below it.
    """
    a, acc = alphas.double(), accuracy.double()
    a0, a1 = float(acc[a == 0][0]), float(acc[a == 1][0])
    inside = (a >= 0) & (a <= 1)
    drop = torch.where(inside, (1 - a) * a0 + a * a1 - acc, torch.tensor(-math.inf, dtype=torch.float64))
    j = int(torch.argmax(drop))
    return float(drop[j]), float(a[j])


class CKAAccumulator:
    """Streamed sums for linear CKA and debiased linear CKA between features ``X [n, p]`` and ``Y [n, q]``.

    ``update`` adds a batch of rows (float64); ``linear()`` and ``debiased()`` evaluate the estimators of the
    module docstring from the sums: ``X^T Y, X^T X, Y^T Y``, the column sums ``s_x, s_y``, the row norms
    ``a_i = ||x_i||^2, b_i = ||y_i||^2`` summed as ``sum a, sum b, sum a b, sum a^2, sum b^2`` and the weighted
    column sums ``sum a x, sum b y, sum a y, sum b x``. Rows are shifted by ``shift_x``/``shift_y`` first
    (both estimators are invariant to a common translation of the rows).
    """

    def __init__(self, p: int, q: int, shift_x: torch.Tensor | None = None, shift_y: torch.Tensor | None = None):
        f64 = torch.float64
        self.n = 0
        self.shift_x = None if shift_x is None else shift_x.double().reshape(1, p)
        self.shift_y = None if shift_y is None else shift_y.double().reshape(1, q)
        self.xty = torch.zeros(p, q, dtype=f64)
        self.xtx = torch.zeros(p, p, dtype=f64)
        self.yty = torch.zeros(q, q, dtype=f64)
        self.sx, self.sy = torch.zeros(p, dtype=f64), torch.zeros(q, dtype=f64)
        self.ax, self.bx = torch.zeros(p, dtype=f64), torch.zeros(p, dtype=f64)
        self.by, self.ay = torch.zeros(q, dtype=f64), torch.zeros(q, dtype=f64)
        self.sa = self.sb = self.sab = self.saa = self.sbb = 0.0

    @staticmethod
    def nbytes(p: int, q: int) -> int:
        """Memory of the accumulators of a ``p``- and a ``q``-dimensional layer."""
        return 8 * (p * q + p * p + q * q + 3 * (p + q))

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add rows ``x [b, p]`` (A's features) and ``y [b, q]`` (B's, same samples)."""
        if x.shape[0] != y.shape[0]:
            raise DiagnosticsError(f"A gives {x.shape[0]} feature rows and B {y.shape[0]} for the same batch")
        x = x.detach().to("cpu", torch.float64)
        y = y.detach().to("cpu", torch.float64)
        if self.shift_x is not None:
            x = x - self.shift_x
        if self.shift_y is not None:
            y = y - self.shift_y
        self.n += int(x.shape[0])
        self.xty += x.T @ y
        self.xtx += x.T @ x
        self.yty += y.T @ y
        self.sx += x.sum(0)
        self.sy += y.sum(0)
        a, b = (x * x).sum(1), (y * y).sum(1)
        self.sa += float(a.sum())
        self.sb += float(b.sum())
        self.sab += float((a * b).sum())
        self.saa += float((a * a).sum())
        self.sbb += float((b * b).sum())
        self.ax += a @ x
        self.bx += b @ x
        self.by += b @ y
        self.ay += a @ y

    def linear(self) -> float:
        """Linear CKA ``||X_c^T Y_c||_F^2 / (||X_c^T X_c||_F ||Y_c^T Y_c||_F)`` (NaN for constant features)."""
        n = self.n
        cxy = self.xty - torch.outer(self.sx, self.sy) / n
        cxx = self.xtx - torch.outer(self.sx, self.sx) / n
        cyy = self.yty - torch.outer(self.sy, self.sy) / n
        den = float(torch.linalg.matrix_norm(cxx) * torch.linalg.matrix_norm(cyy))
        return float(cxy.pow(2).sum()) / den if den > 0 else math.nan

    def _hsic1(self, tr: float, sum_k: float, sum_l: float, one_kl_one: float) -> float:
        n = self.n
        return (tr + sum_k * sum_l / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * one_kl_one) / (n * (n - 3))

    def hsic1(self) -> tuple[float, float, float]:
        """The unbiased HSIC (Song et al. 2012) of (K, L), (K, K) and (L, L), K = XX^T, L = YY^T."""
        if self.n < 4:
            raise DiagnosticsError(f"debiased CKA needs at least 4 samples, got {self.n}")
        sum_k = float(self.sx @ self.sx) - self.sa
        sum_l = float(self.sy @ self.sy) - self.sb
        kl = self._hsic1(
            float(self.xty.pow(2).sum()) - self.sab,
            sum_k,
            sum_l,
            float(self.sx @ self.xty @ self.sy) - float(self.sy @ self.ay) - float(self.sx @ self.bx) + self.sab,
        )
        kk = self._hsic1(
            float(self.xtx.pow(2).sum()) - self.saa,
            sum_k,
            sum_k,
            float(self.sx @ self.xtx @ self.sx) - 2 * float(self.sx @ self.ax) + self.saa,
        )
        ll = self._hsic1(
            float(self.yty.pow(2).sum()) - self.sbb,
            sum_l,
            sum_l,
            float(self.sy @ self.yty @ self.sy) - 2 * float(self.sy @ self.by) + self.sbb,
        )
        return kl, kk, ll

    def debiased(self) -> float:
        """Debiased linear CKA ``HSIC_1(K, L) / sqrt(HSIC_1(K, K) HSIC_1(L, L))`` (NaN when a denominator <= 0)."""
        kl, kk, ll = self.hsic1()
        return kl / math.sqrt(kk * ll) if kk > 0 and ll > 0 else math.nan


# ------------------------------------------------------------------------------------ the measurements
def _hessian_operator(ctx: Context) -> Any:
    try:  # the operator glue of diagnostics.operators, where present
        from diagnostics.operators import hessian_operator  # type: ignore[import-not-found]

        return hessian_operator(ctx)
    except ImportError:
        from diagnostics.linalg.operator import HessianOperator

        return HessianOperator.from_context(ctx)


def ritz_vectors(op: Any, k: int, tol: float, max_iter: int, generator: torch.Generator, progress: Any) -> Any:
    """Top-``k`` Lanczos Ritz pairs whose *vectors* meet ``tol``: ``||A v - theta v|| <= tol * |theta|``.

    Uses the ``vectors_tol`` option of :func:`diagnostics.linalg.lanczos.lanczos` where it exists, else its
    residual criterion (the same test). Both stop on the residual of the vector, not on the (quadratically
    smaller) error bound of the eigenvalue.
    """
    import inspect

    from diagnostics.linalg.lanczos import lanczos

    kwargs: dict[str, Any] = {"k_top": k, "tol": tol, "max_iter": max_iter, "generator": generator}
    if "vectors_tol" in inspect.signature(lanczos).parameters:
        kwargs["vectors_tol"] = tol
    else:
        kwargs["criterion"] = "residual"
    return lanczos(op, progress=progress, **kwargs)


def top_eigenspace(
    ctx: Context, k: int, config: CompareConfig, progress: ProgressFn | None, label: str
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The top-``k`` Hessian eigenvectors ``[n, k]`` (float64) of ``ctx``'s loss and how well they converged.

    ``k + 1`` Ritz pairs are computed (when the model has more than ``k`` parameters) so that the gap below
    the subspace, and with it the Davis-Kahan bound ``||R||_F / gap`` on the subspace's error, is known.
    """
    op = _hessian_operator(ctx)
    want = min(k + 1, op.dim)
    if k > op.dim:
        raise DiagnosticsError(f"--top-k {k} exceeds the {op.dim} analysed parameters")
    res = ritz_vectors(op, want, config.tol, config.max_iter, ctx.generator(OVERLAP_STREAM), bind(progress, label))
    theta = res.eigenvalues.double().cpu()
    resid = res.residuals.double().cpu()
    U = res.eigenvectors[:, :k].double().cpu()
    gap = float(theta[k - 1] - theta[k]) if want > k else math.inf
    r_f = float(resid[:k].norm())
    eps = r_f / gap if gap > 0 else math.inf
    info = {
        "eigenvalues": theta[:k].tolist(),
        "next_eigenvalue": float(theta[k]) if want > k else None,
        "residuals": resid[:k].tolist(),
        "relative_residuals": [float(r / abs(t)) if t != 0 else math.inf for r, t in zip(resid[:k], theta[:k])],
        "gap": gap,
        "sin_theta_bound": eps,
        "converged": bool(res.converged),
        "floor_tol": float(res.floor_tol),
        "dtype": str(op.dtype).removeprefix("torch."),
        "iterations": int(res.iterations),
    }
    return U, info


def stream_cka(
    ctx_a: Context, ctx_b: Context, pairs: Sequence[tuple[str, str]], config: CompareConfig, progress: Any
) -> dict[str, CKAAccumulator]:
    """One pass over A's data through both models: the CKA accumulators of every layer pair, by label."""
    layers_a = features.resolve_layers(ctx_a.model, [a for a, _ in pairs])
    layers_b = features.resolve_layers(ctx_b.model, [b for _, b in pairs])
    by_a = {layer.name: layer for layer in layers_a}
    by_b = {layer.name: layer for layer in layers_b}
    stream_a = features.stream_features(
        ctx_a.model, ctx_a.batches, layers_a, pool=config.pool, forward=lambda x: ctx_a.forward(ctx_a.params, x)
    )
    stream_b = features.stream_features(
        ctx_b.model, ctx_a.batches, layers_b, pool=config.pool, forward=lambda x: ctx_b.forward(ctx_b.params, x)
    )
    acc: dict[str, CKAAccumulator] = {}
    tick = bind(progress, "features")
    try:
        for i, (fa, fb) in enumerate(zip(stream_a, stream_b)):
            if not acc:
                need = 0
                for a, b in pairs:
                    need += CKAAccumulator.nbytes(
                        int(fa.features[by_a[a].name].shape[1]), int(fb.features[by_b[b].name].shape[1])
                    )
                if need > config.max_bytes:
                    dims = ", ".join(
                        f"{_label(a, b)}: {int(fa.features[a].shape[1])} x {int(fb.features[b].shape[1])}"
                        for a, b in pairs
                    )
                    raise DiagnosticsError(
                        f"the CKA sums of {dims} features need {need / 1024**3:.1f} GiB, over the "
                        f"{config.max_bytes / 1024**3:.1f} GiB budget; use --pool mean or fewer --layers"
                    )
                for a, b in pairs:
                    x, y = fa.features[a], fb.features[b]
                    acc[_label(a, b)] = CKAAccumulator(x.shape[1], y.shape[1], x.mean(0).cpu(), y.mean(0).cpu())
            for a, b in pairs:
                acc[_label(a, b)].update(fa.features[a], fb.features[b])
            tick(i + 1, len(ctx_a.batches))
    finally:
        stream_a.close()
        stream_b.close()
    return acc


def _label(a: str, b: str) -> str:
    return a if a == b else f"{a}={b}"


def layer_pairs(config: CompareConfig, ctx_a: Context) -> list[tuple[str, str]]:
    """``--layers`` as ``(A's layer, B's layer)`` pairs (default: the input of A's last ``nn.Linear`` in both)."""
    if not config.layers:
        name = features.default_feature_layer(ctx_a.model)
        return [(name, name)]
    out = []
    for item in config.layers:
        a, sep, b = item.partition("=")
        a, b = a.strip(), (b.strip() if sep else a.strip())
        if not a or not b:
            raise DiagnosticsError(f"--layers entry '{item}' is not NAME or A_NAME=B_NAME")
        out.append((a, b))
    return list(dict.fromkeys(out))


def interpolation(
    config: CompareConfig, ctx_a: Context, ctx_b: Context, progress: ProgressFn | None, label: str
) -> tuple[dict[str, Any], Any, list[str]]:
    """The line ``(1 - alpha) w_A + alpha w_B`` computed by ``diag landscape``'s functions.

    Returns:
        (barrier info: the landscape's ``barrier`` dict plus ``accuracy``, the grid as table parts (read as
        plain columns, so no DataFrame is built unless the table is asked for), notes).
    """
    from diagnostics.analyzers.landscape import LandscapeConfig, analyze_interpolation

    lc = LandscapeConfig(dims=1, steps=config.steps, refine_steps=config.refine_steps, bn_recompute=config.bn_recompute)
    res = analyze_interpolation(lc, ctx_a, ctx_b, _prefixed(progress, label))
    info = dict(res.metadata["barrier"])
    grid = res.artifacts.table_parts("grid")
    alphas = torch.tensor(table_column(grid, "alpha"), dtype=torch.float64)
    acc = torch.tensor(table_column(grid, "accuracy"), dtype=torch.float64)
    if bool(torch.isfinite(acc).all()):
        value, at = accuracy_barrier(alphas, acc)
        info["accuracy"] = {
            "value": value,
            "alpha": at,
            "accuracy_a": float(acc[alphas == 0][0]),
            "accuracy_b": float(acc[alphas == 1][0]),
        }
    notes = [n for n in res.metadata.get("notes") or [] if n not in ctx_a.notes]
    return info, grid, notes


def _prefixed(progress: ProgressFn | None, prefix: str) -> ProgressFn | None:
    if progress is None:
        return None
    return lambda task, done, total: progress(f"{prefix} {task}", done, total)


def _needs_targets(ctx: Context, what: str) -> None:
    if any(b[1] is None for b in ctx.batches):
        raise DiagnosticsError(f"--metrics {what} needs a loss, but the data gives inputs only; pass (inputs, targets)")


def _permute_vectors(spec: Any, perms: Any, ctx: Context, U: torch.Tensor) -> torch.Tensor:
    """Columns of ``U`` (flat over ``ctx.params``) permuted like the weights."""
    from diagnostics.directions import FlatSpace

    space = FlatSpace.of(ctx.params)
    cols = []
    for j in range(U.shape[1]):
        tensors = space.unflatten(U[:, j].double())
        cols.append(torch.cat([t.reshape(-1) for t in alignment.apply_permutations(spec, perms, tensors).values()]))
    return torch.stack(cols, 1).double()


def aligned_state_dict(ctx: Context, tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """``ctx.model.state_dict()`` with the (permuted) ``tensors`` in place, on the CPU (tied names included)."""
    canonical: dict[int, str] = {}
    for n, t in ctx.model.named_parameters(remove_duplicate=False):
        canonical.setdefault(id(t), n)
    for n, t in ctx.model.named_buffers(remove_duplicate=False):
        canonical.setdefault(id(t), n)
    out: dict[str, Any] = {}
    for key, v in ctx.model.state_dict(keep_vars=True).items():
        if isinstance(v, torch.Tensor):
            t = tensors.get(canonical.get(id(v), key), v)
            out[key] = t.detach().cpu().clone().contiguous()
        else:
            out[key] = v
    return out


@dataclass
class _Part:
    """What one comparison adds to the result: records, metadata entries, notes and Hessian-vector products."""

    rows: list[tuple] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    hvps: int = 0


@dataclass
class _Alignment:
    """B with its hidden units permuted to match A, and how (see :func:`_align_weights`)."""

    ctx_b: Context
    spec: Any
    perms: Any
    part: _Part


def _align_weights(config: CompareConfig, ctx_a: Context, ctx_b: Context) -> _Alignment:
    """Weight matching of B's hidden units to A's (Ainsworth, Hayase & Srinivasa 2023, "Git Re-Basin").

    Args:
        config: the options (``align_sweeps``).
        ctx_a: A's context (its first batch traces the permutation structure).
        ctx_b: B's context.

    Returns:
        The permuted B's context, the permutation spec and permutations, and the ``alignment`` metadata and notes.
    """
    spec = alignment.derive_spec(ctx_a.model, ctx_a.batches[0][0])
    tensors_a = {**ctx_a.frozen, **ctx_a.params}
    tensors_b = {**ctx_b.frozen, **ctx_b.params}
    match = alignment.weight_matching(
        spec, tensors_a, tensors_b, generator=ctx_a.generator(ALIGN_STREAM), max_sweeps=config.align_sweeps
    )
    permuted = alignment.apply_permutations(spec, match.perms, tensors_b)
    ctx_b_al = replace(
        ctx_b,
        params={n: permuted[n] for n in ctx_b.params},
        frozen={n: permuted[n] for n in ctx_b.frozen},
    )
    part = _Part()
    part.meta["alignment"] = {
        "method": "weight matching (Ainsworth et al. 2023)",
        "groups": [{"size": g.size, "label": g.label, "nested_in": g.parent} for g in spec.groups],
        **match.describe(),
    }
    part.notes += spec.notes
    if not match.converged:
        part.notes.append(f"weight matching did not settle within --align-sweeps {config.align_sweeps}")
    return _Alignment(ctx_b_al, spec, match.perms, part)


def _distance_part(ctx_a: Context, versions: Sequence[tuple[str, Context]]) -> _Part:
    """``weight_distance``, ``relative_distance``, ``weight_cosine`` overall and per module, for every B.

    Args:
        ctx_a: A's context.
        versions: ``(metric suffix, B's context)`` pairs (the aligned B, then the raw one).

    Returns:
        The records.
    """
    from diagnostics.context import parameter_groups

    part = _Part()
    names = list(ctx_a.params)
    for suffix, b in versions:
        for metric, value in weight_distances(ctx_a.params, b.params, names).items():
            part.rows.append((metric + suffix, value, None, None, None))
        for module, group in parameter_groups(names).items():
            for metric, value in weight_distances(ctx_a.params, b.params, group).items():
                part.rows.append((metric + suffix, value, None, None, module))
    return part


def _cka_part(config: CompareConfig, ctx_a: Context, ctx_b: Context, progress: ProgressFn | None) -> _Part:
    """``cka`` and ``cka_debiased`` of every layer pair, streamed over A's data.

    Args:
        config: the options (``layers``, ``pool``, ``max_bytes``).
        ctx_a: A's context.
        ctx_b: B's context on A's data.
        progress: ``progress(task, done, total)``.

    Returns:
        The records, the ``cka`` metadata and a note per layer without a value.
    """
    acc = stream_cka(ctx_a, ctx_b, layer_pairs(config, ctx_a), config, progress)
    part = _Part()
    cka_info: dict[str, Any] = {"samples": ctx_a.n_samples, "layers": {}}
    for label, a in acc.items():
        lin = a.linear()
        deb = a.debiased() if a.n >= 4 else math.nan
        for metric, value in (("cka", lin), ("cka_debiased", deb)):
            if math.isfinite(value):
                part.rows.append((metric, value, None, None, label))
        if not math.isfinite(lin):
            part.notes.append(f"layer '{label}': constant features in A or B, no CKA")
        elif not math.isfinite(deb):
            part.notes.append(
                f"layer '{label}': the unbiased HSIC of a checkpoint with itself is <= 0 on {a.n} samples, no cka_debiased"
            )
        cka_info["layers"][label] = {"dims": [int(a.xty.shape[0]), int(a.xty.shape[1])]}
    part.meta["cka"] = cka_info
    return part


def _overlap_notes(config: CompareConfig, info: Mapping[str, Any]) -> list[str]:
    """Notes on Ritz vectors that did not converge and on a poorly separated eigenspace."""
    from diagnostics.linalg.lanczos import unconverged_fix

    notes = []
    for who in ("A", "B"):
        side = info[who.lower()]
        if not side["converged"]:
            notes.append(
                f"overlap: the Ritz vectors of {who} did not reach --tol {config.tol} (largest relative residual "
                f"{max(side['relative_residuals']):.2g}): {unconverged_fix(side['floor_tol'], side['dtype'])}"
            )
    eps = info["a"]["sin_theta_bound"] + info["b"]["sin_theta_bound"]
    if not math.isfinite(eps) or eps > 0.1:
        notes.append(
            f"overlap: the top-{info['k']} eigenspaces are poorly separated from the rest (Davis-Kahan bound "
            f"{eps:.2g} on the subspace error); the overlap is uncertain by up to {info['error_bound']:.2g}"
        )
    return notes


def _overlap_part(
    config: CompareConfig, ctx_a: Context, ctx_b: Context, aligned: _Alignment | None, progress: ProgressFn | None
) -> _Part:
    """``eigenspace_overlap`` of the top-``k`` Hessian eigenspaces (B's permuted like its weights when aligned).

    Args:
        config: the options (``top_k``, ``tol``, ``max_iter``).
        ctx_a: A's context.
        ctx_b: B's (raw) context on A's data.
        aligned: the weight matching, or None.
        progress: ``progress(task, done, total)``.

    Returns:
        The records, the ``overlap`` metadata (convergence, error bounds), notes and the Lanczos iterations.
    """
    _needs_targets(ctx_a, "overlap")
    k = config.top_k
    Ua, info_a = top_eigenspace(ctx_a, k, config, progress, "overlap A")
    Ub, info_b = top_eigenspace(ctx_b, k, config, progress, "overlap B")
    part = _Part(hvps=info_a["iterations"] + info_b["iterations"])
    overlap_info: dict[str, Any] = {
        "k": k,
        "tol": config.tol,
        "stopping": "vector residual ||Hv - theta v|| <= tol |theta|",
        "a": info_a,
        "b": info_b,
    }
    versions = [("", Ub)]
    if aligned is not None:
        versions = [("", _permute_vectors(aligned.spec, aligned.perms, ctx_b, Ub)), ("_unaligned", Ub)]
    for suffix, V in versions:
        value = subspace_overlap(Ua, V)
        part.rows.append(("eigenspace_overlap" + suffix, value, None, None, None))
        overlap_info["error_bound" + suffix] = overlap_error_bound(
            value, k, info_a["sin_theta_bound"], info_b["sin_theta_bound"]
        )
    part.meta["overlap"] = overlap_info
    part.notes += _overlap_notes(config, overlap_info)
    return part


def _barrier_part(
    config: CompareConfig,
    ctx_a: Context,
    versions: Sequence[tuple[str, Context]],
    progress: ProgressFn | None,
    notes_before: Sequence[str] = (),
) -> tuple[_Part, list[dict[str, Any]]]:
    """``barrier`` and ``accuracy_barrier`` along the line from A to every B (as ``diag landscape``).

    Args:
        config: the options (``steps``, ``refine_steps``, ``bn_recompute``).
        ctx_a: A's context.
        versions: ``(metric suffix, B's context)`` pairs (the aligned B, then the raw one).
        progress: ``progress(task, done, total)``.
        notes_before: notes already made (the landscape's notes are not repeated).

    Returns:
        (the records, ``barrier<suffix>`` metadata and new notes; the grid of each B as table parts, with its
        ``aligned`` column).
    """
    _needs_targets(ctx_a, "barrier")
    part = _Part()
    frames: list[dict[str, Any]] = []
    for suffix, b in versions:
        info, grid, grid_notes = interpolation(config, ctx_a, b, progress, "barrier" + suffix.replace("_", " "))
        part.rows.append(("barrier" + suffix, info["value"], None, None, None))
        if "accuracy" in info:
            part.rows.append(("accuracy_barrier" + suffix, info["accuracy"]["value"], None, None, None))
        part.meta["barrier" + suffix] = info
        seen = [*notes_before, *part.notes]
        part.notes += [n for n in grid_notes if n not in seen]
        frames += [{**p, "aligned": bool(len(versions) > 1 and not suffix)} for p in grid]
    part.meta["barrier_definition"] = (
        "barrier = max over alpha in [0, 1] of L((1-alpha) w_a + alpha w_b) - [(1-alpha) L(w_a) + alpha L(w_b)]"
    )
    return part, frames


def _aligned_checkpoint(ctx_a: Context, ctx_b: Context, ctx_b_al: Context) -> dict[str, Any]:
    """The permuted B as ``{"state", "metadata"}`` for ``--save-aligned``.

    Args:
        ctx_a: A's context (named in the metadata).
        ctx_b: B's raw context (its checkpoint metadata is carried over).
        ctx_b_al: B's permuted context.

    Returns:
        The state dict (CPU) and the checkpoint metadata.
    """
    ck_meta = {k: v for k, v in ctx_b.checkpoint_metadata.items() if k in ("step", "lr", "optimizer", "factories")}
    ck_meta.update(
        aligned_to=ctx_a.checkpoint,
        alignment="weight matching (Ainsworth et al. 2023) of its hidden units to the first checkpoint",
        source=ctx_b.checkpoint,
    )
    if ctx_b.step is not None:
        ck_meta["step"] = ctx_b.step
    return {"state": aligned_state_dict(ctx_b, {**ctx_b_al.frozen, **ctx_b_al.params}), "metadata": ck_meta}


def analyze_compare(
    config: CompareConfig, ctx: Context, progress: ProgressFn | None = None, *, others: Sequence[Context] = ()
) -> Result:
    """Compare checkpoint A (``ctx``) with B (``others[0]``) on A's data -> records (see the module docstring).

    Args:
        config: the options.
        ctx: A's context (the records belong to it).
        progress: ``progress(task, done, total)``.
        others: ``[B's context]`` (same architecture).

    Returns:
        Records; metadata per comparison (overlap convergence and error bound, CKA samples, barriers, the
        alignment); artifacts ``interpolation`` (DataFrame ``alpha, loss, accuracy, chord, aligned``) and, with
        ``keep_aligned``, ``aligned_checkpoint`` (``{"state", "metadata"}`` for ``--save-aligned``).
    """
    from diagnostics.analyzers.landscape import check_same_architecture

    check_config(config)
    if len(others) != 1:
        raise DiagnosticsError(f"diag compare takes two checkpoints, got {1 + len(others)}")
    ctx_a, ctx_b = ctx, others[0].with_batches(ctx.batches)  # B on A's data
    check_same_architecture(ctx_a, ctx_b)
    kinds = list(dict.fromkeys(config.metrics))
    meta: dict[str, Any] = {
        "checkpoints": [ctx_a.checkpoint, ctx_b.checkpoint],
        "steps_of": [ctx_a.step, ctx_b.step],
        "metrics": kinds,
        "align": config.align,
    }
    aligned = _align_weights(config, ctx_a, ctx_b) if config.align == "weights" else None
    versions = [("", ctx_b)] if aligned is None else [("", aligned.ctx_b), ("_unaligned", ctx_b)]
    parts = [aligned.part] if aligned is not None else []
    if "distance" in kinds:
        parts.append(_distance_part(ctx_a, versions))
    if "cka" in kinds:
        parts.append(_cka_part(config, ctx_a, ctx_b, progress))
    if "overlap" in kinds:
        parts.append(_overlap_part(config, ctx_a, ctx_b, aligned, progress))
    artifacts: dict[str, Any] = {}
    if "barrier" in kinds:
        before = [n for p in parts for n in p.notes]
        part, frames = _barrier_part(config, ctx_a, versions, progress, before)
        parts.append(part)
        artifacts["interpolation"] = concat_later(frames)  # a DataFrame once read
    if config.keep_aligned and aligned is not None:
        artifacts["aligned_checkpoint"] = _aligned_checkpoint(ctx_a, ctx_b, aligned.ctx_b)
    for p in parts:
        meta.update(p.meta)
    meta["hvp_count"] = sum(p.hvps for p in parts)
    meta["notes"] = [n for p in parts for n in p.notes]
    rows = [r for p in parts for r in p.rows]
    return Result(make_records(ctx_a.checkpoint, ctx_a.step, NAME, rows), meta, artifacts)


_LAYER = "the layer (A's module name, or 'a=b' for A's layer a against B's layer b)"
_MODULE = "the module (null: all analysed parameters)"
_ALIGNED = " (after weight matching with --align weights)"


def _unaligned(metric: Metric) -> Metric:
    return replace(
        metric,
        name=metric.name + "_unaligned",
        definition=metric.definition.replace(_ALIGNED, "") + "; the raw checkpoints, emitted with --align weights",
        headline=False,
    )


_WEIGHT_SPACE = (
    Metric(
        "eigenspace_overlap",
        "||U_A^T U_B||_F^2 / k of the top-k Hessian eigenvectors (Ritz vectors with residual <= tol |theta|): 1 = "
        "the same subspace, k/n for random ones" + _ALIGNED,
        higher_is_better=None,
        headline=True,
        reference="Gur-Ari et al. 2018",
    ),
    Metric(
        "weight_distance",
        "||w_B - w_A||_2 over the analysed parameters, or one module's" + _ALIGNED,
        index="",
        group=_MODULE,
    ),
    Metric(
        "relative_distance",
        "||w_B - w_A||_2 / ||w_A||_2 over the analysed parameters, or one module's" + _ALIGNED,
        headline=True,
        group=_MODULE,
    ),
    Metric(
        "weight_cosine",
        "<w_A, w_B> / (||w_A|| ||w_B||) over the analysed parameters, or one module's" + _ALIGNED,
        group=_MODULE,
    ),
    Metric(
        "barrier",
        "max_{alpha in [0,1]} L((1-alpha) w_A + alpha w_B) - [(1-alpha) L(w_A) + alpha L(w_B)], as diag landscape: "
        "grid maximum refined by golden-section search" + _ALIGNED,
        unit="loss",
        higher_is_better=False,
        headline=True,
        reference="Frankle et al. 2020; Ainsworth et al. 2023",
    ),
    Metric(
        "accuracy_barrier",
        "max over the grid of [(1-alpha) acc(w_A) + alpha acc(w_B)] - acc((1-alpha) w_A + alpha w_B): the drop of "
        "accuracy below the chord" + _ALIGNED,
        higher_is_better=False,
        reference="Entezari et al. 2022",
    ),
)
_FEATURES = (
    Metric(
        "cka",
        "linear CKA ||X_c^T Y_c||_F^2 / (||X_c^T X_c||_F ||Y_c^T Y_c||_F) of A's and B's centred features on the "
        "same samples (streamed exactly)",
        higher_is_better=None,
        headline=True,
        group=_LAYER,
        reference="Kornblith et al. 2019",
    ),
    Metric(
        "cka_debiased",
        "HSIC_1(K, L) / sqrt(HSIC_1(K, K) HSIC_1(L, L)) with the unbiased HSIC estimator, K = XX^T, L = YY^T "
        "(streamed exactly)",
        higher_is_better=None,
        group=_LAYER,
        reference="Song et al. 2012; Nguyen et al. 2021",
    ),
)

ANALYZER = Analyzer(
    name=NAME,
    summary="Compare two checkpoints: Hessian eigenspace overlap, CKA of features, weight distance, loss barrier "
    "(optionally after weight matching)",
    description="Compare two checkpoints A and B (two seeds, two steps, before/after fine-tuning) on A's data.\n\n"
    "--metrics overlap (top-k Hessian eigenspaces), cka (linear and debiased CKA per layer), distance (weights, "
    "overall and per layer), barrier (loss and accuracy along (1-a) w_A + a w_B). --align weights permutes B's "
    "hidden units to match A's first (Git Re-Basin weight matching; structure derived by torch.fx) and also "
    "reports the raw values as *_unaligned. Given two run folders, the checkpoints of equal step are compared.",
    config=CompareConfig,
    order=60,
    run=analyze_compare,
    checkpoints=(2, 2),
    sweep_with="previous",
    needs_targets=False,
    metrics=(
        *_WEIGHT_SPACE,
        *(_unaligned(m) for m in _WEIGHT_SPACE),
        *_FEATURES,
    ),
    outputs=(
        FileOutput(
            "save_aligned",
            "write B with its hidden units permuted to match A as a checkpoint FILE.pt (needs --align weights)",
            render="diagnostics.render:compare_aligned_checkpoint",
            require_suffix=".pt",
            enables="keep_aligned",
        ),
        FileOutput(
            "plot",
            "write PREFIX.png: the loss along the line between the checkpoints (aligned and raw) or, for two runs, "
            "every comparison against the step",
            render="diagnostics.render:compare_plot",
            suffixes=(".png",),
        ),
    ),
    sections=(
        Section(
            "Checkpoint to checkpoint",
            (
                "weight_distance",
                "relative_distance",
                "weight_cosine",
                "eigenspace_overlap",
                "barrier",
                "accuracy_barrier",
                "barrier_unaligned",
            ),
            "Each checkpoint compared with the previous one of the run: how far the weights moved, how much the top "
            "Hessian eigenspace rotated (overlap 1 = unchanged), and whether the two are linearly connected (loss "
            "barrier 0).",
        ),
        Section(
            "Representation similarity",
            ("cka", "cka_debiased"),
            "Linear CKA (Kornblith et al. 2019) of each layer's features between consecutive checkpoints: 1 = the "
            "representation did not change up to rotation and scale.",
        ),
    ),
)
