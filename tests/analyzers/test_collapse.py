"""Neural collapse against exact answers: simplex ETFs, dense float64 references, known noise laws."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from diagnostics.analyzers.collapse import (
    ANALYZER,
    CLASS_METRICS,
    ETF_METRICS,
    METRICS,
    CollapseConfig,
    analyze_collapse,
    neural_collapse,
)
from diagnostics.analyzers.registry import all_analyzers
from diagnostics.binding import resolve_binding
from diagnostics.checkpoint import load_checkpoint
from diagnostics.context import build_context
from diagnostics.errors import DiagnosticsError
from diagnostics.examples.digits import train_data
from diagnostics.plots import cosine_matrices
from diagnostics.spec import check_config

F64 = torch.float64


def simplex_etf(c: int, d: int, radius: float = 1.0, seed: int = 0) -> torch.Tensor:
    """``C x D`` rows ``radius * sqrt(C/(C-1)) P (e_c - 1/C)``: a simplex ETF centred at 0, ``||row|| = radius``."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, c, generator=g, dtype=F64))
    return radius * math.sqrt(c / (c - 1)) * (q @ (torch.eye(c, dtype=F64) - 1.0 / c)).T


def labels_for(counts: list[int]) -> torch.Tensor:
    return torch.cat([torch.full((n,), c, dtype=torch.int64) for c, n in enumerate(counts)])


def dense_reference(h: np.ndarray, y: np.ndarray, w: np.ndarray | None = None, b: np.ndarray | None = None) -> dict:
    """Papyan et al.'s definitions written out with N x D and D x D matrices (numpy, float64)."""
    classes = np.unique(y)
    c = len(classes)
    n = len(y)
    mu = np.stack([h[y == k].mean(0) for k in classes])
    mu_g = mu.mean(0)
    m = mu - mu_g
    resid = h - mu[np.searchsorted(classes, y)]
    sigma_w = resid.T @ resid / n
    sigma_b = m.T @ m / c
    out = {"nc1": float(np.trace(sigma_w @ np.linalg.pinv(sigma_b, rcond=1e-10)) / c)}
    norms = np.linalg.norm(m, axis=1)
    out["nc2_equinorm"] = float(norms.std(ddof=1) / norms.mean())
    unit = m / norms[:, None]
    cos = unit @ unit.T
    pairs = cos[np.triu_indices(c, 1)]
    out["nc2_equiangular"] = float(np.abs(pairs + 1 / (c - 1)).mean())
    out["nc2_cos_mean"] = float(pairs.mean())
    out["nc2_cos_std"] = float(pairs.std(ddof=1))
    var = np.array([((h[y == k] - mu[i]) ** 2).sum(1).mean() for i, k in enumerate(classes)])
    cd = [(var[i] + var[j]) / (2 * np.sum((mu[i] - mu[j]) ** 2)) for i in range(c) for j in range(i + 1, c)]
    out["cdnv"] = float(np.mean(cd))
    if w is not None:
        ws = w[classes]
        wn = np.linalg.norm(ws, axis=1)
        out["nc2_equinorm_classifier"] = float(wn.std(ddof=1) / wn.mean())
        wu = ws / wn[:, None]
        out["nc2_equiangular_classifier"] = float(np.abs((wu @ wu.T)[np.triu_indices(c, 1)] + 1 / (c - 1)).mean())
        out["nc3"] = float(np.sum((ws / np.linalg.norm(ws) - m / np.linalg.norm(m)) ** 2))
        logits = h @ w.T + (0 if b is None else b)
        nearest = classes[np.argmin(((h[:, None, :] - mu[None]) ** 2).sum(-1), axis=1)]
        out["nc4"] = float(np.mean(logits.argmax(1) != nearest))
    return out


def etf_with_classifier(c: int = 5, d: int = 7, offset_scale: float = 3.0):
    mu = simplex_etf(c, d, radius=2.0)
    g = torch.Generator().manual_seed(1)
    mu_g = offset_scale * torch.randn(d, generator=g, dtype=F64)
    w = 0.7 * mu  # self-dual: W rows are the centred class means, scaled
    b = -(w @ mu_g)  # the bias -W mu_G of the ETF classifier
    return mu, mu_g, w, b


# ------------------------------------------------------------------------------- exact ETFs
@pytest.mark.parametrize("counts", [[6, 6, 6, 6, 6], [3, 20, 7, 1, 11]], ids=["balanced", "imbalanced"])
def test_perfect_simplex_etf_reads_zero(counts):
    c, d = 5, 7
    mu, mu_g, w, b = etf_with_classifier(c, d)
    y = labels_for(counts)
    h = (mu + mu_g)[y]
    s = neural_collapse([(h, y)], weight=w, bias=b)
    for metric in ("nc1", "nc2_equinorm", "nc2_equinorm_classifier", "nc2_equiangular", "nc2_equiangular_classifier"):
        assert abs(s.values[metric]) < 1e-12, (metric, s.values[metric])
    assert s.values["nc2_cos_mean"] == pytest.approx(-1 / (c - 1), abs=1e-12)
    assert s.values["nc2_cos_std"] < 1e-12
    assert s.values["nc3"] < 1e-24
    assert s.values["nc4"] == 0.0
    assert s.values["cdnv"] < 1e-24
    off_diag = s.cosine[~torch.eye(c, dtype=torch.bool)]
    assert torch.allclose(off_diag, torch.full_like(off_diag, -1 / (c - 1)), atol=1e-12)


def test_imbalanced_etf_needs_unweighted_centring():
    """With a sample-weighted global mean the same ETF would look broken: the test can fail."""
    c, d = 4, 6
    mu = simplex_etf(c, d)
    counts = [1, 30, 5, 12]
    y = labels_for(counts)
    h = mu[y]
    s = neural_collapse([(h, y)])
    assert s.values["nc2_equinorm"] < 1e-12 and s.values["nc2_equiangular"] < 1e-12
    weighted = mu - h.mean(0)  # what sample-weighted centring would give
    norms = weighted.norm(dim=1)
    assert float(norms.std() / norms.mean()) > 0.1
    assert s.imbalanced and "nc2_orthogonal_frame" in s.values


def test_nc4_uses_the_bias():
    c, d = 5, 7
    mu, mu_g, w, b = etf_with_classifier(c, d, offset_scale=0.0)
    # put the global mean inside the ETF span, large, so that W h without bias favours one class
    mu_g = 4.0 * mu[0]
    b = -(w @ mu_g)
    y = labels_for([10] * c)
    g = torch.Generator().manual_seed(3)
    h = (mu + mu_g)[y] + 0.2 * torch.randn(len(y), d, generator=g, dtype=F64)
    with_bias = neural_collapse([(h, y)], weight=w, bias=b).values["nc4"]
    without = neural_collapse([(h, y)], weight=w, bias=None).values["nc4"]
    ref_with = dense_reference(h.numpy(), y.numpy(), w.numpy(), b.numpy())["nc4"]
    ref_without = dense_reference(h.numpy(), y.numpy(), w.numpy(), None)["nc4"]
    assert with_bias == pytest.approx(ref_with, abs=0) and without == pytest.approx(ref_without, abs=0)
    assert without > 0.5 and with_bias < without


# ------------------------------------------------------------------------- noisy features
def test_matches_dense_reference_on_noisy_features():
    c, d = 6, 9
    mu, mu_g, w, b = etf_with_classifier(c, d)
    counts = [15, 40, 22, 31, 9, 27]
    y = labels_for(counts)
    g = torch.Generator().manual_seed(7)
    h = (mu + mu_g)[y] + 0.6 * torch.randn(len(y), d, generator=g, dtype=F64)
    w_noisy = w + 0.1 * torch.randn(w.shape, generator=g, dtype=F64)
    s = neural_collapse([(h, y)], weight=w_noisy, bias=b)
    ref = dense_reference(h.numpy(), y.numpy(), w_noisy.numpy(), b.numpy())
    for metric, value in ref.items():
        assert s.values[metric] == pytest.approx(value, rel=1e-10, abs=1e-14), metric
    per_class_var = s.class_values["class_variance"]
    for k in range(c):
        exact = ((h[y == k] - h[y == k].mean(0)) ** 2).sum(1).mean()
        assert float(per_class_var[k]) == pytest.approx(float(exact), rel=1e-12)


def test_streaming_is_exact_for_any_batching():
    c, d = 4, 5
    mu, mu_g, w, b = etf_with_classifier(c, d)
    y = labels_for([13, 8, 21, 5])
    g = torch.Generator().manual_seed(11)
    perm = torch.randperm(len(y), generator=g)
    y = y[perm]
    h = (mu + mu_g)[y] + 0.3 * torch.randn(len(y), d, generator=g, dtype=F64)
    whole = neural_collapse([(h, y)], weight=w, bias=b).values
    cuts = [0, 1, 8, 9, 30, len(y)]
    parts = [(h[i:j], y[i:j]) for i, j in itertools.pairwise(cuts)]
    streamed = neural_collapse(parts, weight=w, bias=b).values
    assert whole.keys() == streamed.keys()
    for k in whole:
        assert streamed[k] == pytest.approx(whole[k], rel=1e-12, abs=1e-15), k


def test_nc1_of_etf_plus_isotropic_noise_follows_its_exact_law():
    """ETF means (radius r) plus N(0, sigma^2 I) noise centred within each class (so the sample class
    means are exactly the ETF). Then NC1 = sum_k u_k^T Sigma_W u_k / s_k^2 with s_k^2 = r^2 C/(C-1) on the
    C-1 directions of the ETF, and each projected within-class sum of squares is sigma^2 chi^2_{n_c - 1},
    independent across the orthonormal u_k. Hence exactly

        NC1 ~ sigma^2 (C-1) / (C r^2 N) * chi^2_{(N-C)(C-1)},
        E[NC1] = sigma^2 (C-1)^2 (N-C) / (C N r^2),  sd = E * sqrt(2 / ((N-C)(C-1))),

    which tends to sigma^2 (C-1)^2 / C for r = 1 as N grows ((N-C)/N is the finite-sample factor).
    Checked on one large draw (z-score) and on the mean of many small draws (standard error)."""
    c, d, sigma, r = 5, 12, 0.4, 1.5
    mu = simplex_etf(c, d, radius=r) + 2.0
    g = torch.Generator().manual_seed(5)

    def draw(n_per_class: int) -> float:
        y = labels_for([n_per_class] * c)
        eps = sigma * torch.randn(len(y), d, generator=g, dtype=F64)
        eps -= torch.stack([eps[y == k].mean(0) for k in range(c)])[y]
        return neural_collapse([(mu[y] + eps, y)]).values["nc1"]

    def law(n: int) -> tuple[float, float]:
        mean = sigma**2 * (c - 1) ** 2 * (n - c) / (c * n * r**2)
        return mean, mean * math.sqrt(2.0 / ((n - c) * (c - 1)))

    big = 2000
    mean, sd = law(c * big)
    assert abs(draw(big) - mean) < 4 * sd
    small, reps = 8, 150
    values = [draw(small) for _ in range(reps)]
    mean, sd = law(c * small)
    assert abs(float(np.mean(values)) - mean) < 4 * sd / math.sqrt(reps)
    assert float(np.std(values, ddof=1)) == pytest.approx(sd, rel=4 / math.sqrt(2 * (reps - 1)))


# ------------------------------------------------------------------------ regimes and frames
def test_more_classes_than_dimensions_plus_one_falls_back_to_cdnv():
    c, d = 8, 3
    g = torch.Generator().manual_seed(2)
    mu = 3.0 * torch.randn(c, d, generator=g, dtype=F64)
    y = labels_for([12] * c)
    h = mu[y] + 0.5 * torch.randn(len(y), d, generator=g, dtype=F64)
    s = neural_collapse([(h, y)])
    assert not s.etf_possible
    assert not set(ETF_METRICS) & set(s.values)
    assert any("simplex ETF needs D >= C - 1" in note for note in s.notes)
    assert s.values["cdnv"] == pytest.approx(dense_reference(h.numpy(), y.numpy())["cdnv"], rel=1e-12)
    assert "nc1" in s.values


def test_orthogonal_frame_of_dang_et_al():
    c, d = 4, 6
    q, _ = torch.linalg.qr(torch.randn(d, c, generator=torch.Generator().manual_seed(4), dtype=F64))
    lengths = torch.tensor([3.0, 1.0, 2.0, 0.5], dtype=F64)
    mu = (q * lengths).T  # orthogonal class means of different lengths (a general orthogonal frame)
    counts = [40, 5, 20, 2]
    y = labels_for(counts)
    w = 1.3 * mu
    s = neural_collapse([(mu[y], y)], weight=w, bias=torch.zeros(c, dtype=F64))
    assert s.values["nc2_orthogonal_frame"] < 1e-12
    assert s.values["nc2_orthogonal_frame_classifier"] < 1e-12
    # an ETF is not an orthogonal frame: the measure is the closed form of its normalised Gram
    etf = simplex_etf(c, d)
    s_etf = neural_collapse([(etf[y], y)])
    gram = (etf @ etf.T).numpy()
    diag = np.diag(np.diag(gram))
    exact = np.linalg.norm(gram / np.linalg.norm(gram) - diag / np.linalg.norm(diag))
    assert s_etf.values["nc2_orthogonal_frame"] == pytest.approx(exact, rel=1e-12)
    assert exact > 0.5
    balanced = neural_collapse([(etf[labels_for([5] * c)], labels_for([5] * c))])
    assert "nc2_orthogonal_frame" not in balanced.values


def test_scale_invariance_of_the_collapse_metrics():
    c, d = 5, 8
    mu, mu_g, w, b = etf_with_classifier(c, d)
    y = labels_for([10, 12, 9, 14, 11])
    g = torch.Generator().manual_seed(9)
    h = (mu + mu_g)[y] + 0.8 * torch.randn(len(y), d, generator=g, dtype=F64)
    base = neural_collapse([(h, y)], weight=w, bias=b).values
    scaled = neural_collapse([(1e3 * h, y)], weight=w, bias=1e3 * b).values
    for k in base:
        assert scaled[k] == pytest.approx(base[k], rel=1e-9, abs=1e-14), k


# -------------------------------------------------------------------------------- bad input
def test_bad_inputs_raise_one_line_errors():
    y = labels_for([3, 3])
    h = torch.randn(6, 4, dtype=F64)
    with pytest.raises(DiagnosticsError, match="6 samples for 10 classes"):
        neural_collapse([(h, y)], weight=torch.randn(10, 4, dtype=F64))
    with pytest.raises(DiagnosticsError, match="at least two classes"):
        neural_collapse([(h, torch.zeros(6, dtype=torch.int64))])
    with pytest.raises(DiagnosticsError, match="takes 5 features but the layer gives 4"):
        neural_collapse([(h, y)], weight=torch.randn(2, 5, dtype=F64))
    with pytest.raises(DiagnosticsError, match="not class labels"):
        neural_collapse([(h, torch.randn(6))])
    with pytest.raises(DiagnosticsError, match="needs class labels"):
        neural_collapse([(h, None)])
    with pytest.raises(DiagnosticsError, match="--pool must be one of mean, last, first, flatten, not 'max'"):
        check_config(CollapseConfig(pool="max"))
    with pytest.raises(DiagnosticsError, match="--imbalance-ratio must be >= 1"):
        check_config(CollapseConfig(imbalance_ratio=0.5))
    with pytest.raises(DiagnosticsError, match="--classifier and --no-use-classifier contradict"):
        check_config(CollapseConfig(classifier="head", use_classifier=False))


# --------------------------------------------------------------------------- the analyzer
def _digits_context(path, **kw):
    ck = load_checkpoint(path)
    binding = resolve_binding(ck.factories)
    return build_context(ck, binding, **kw)


def test_analyzer_on_digits_matches_features_computed_by_hand(digits_run):
    ctx = _digits_context(digits_run[-1], dtype="float64")
    result = analyze_collapse(CollapseConfig(layers=["features"], per_class=True), ctx)
    got = {r.metric: r.value for r in result.records if r.group == "features"}
    X, y = train_data()
    with torch.no_grad():
        h = ctx.model.features(X.to(F64))
    ref = dense_reference(
        h.numpy(), y.numpy(), ctx.model.head.weight.detach().numpy(), ctx.model.head.bias.detach().numpy()
    )
    for metric, value in ref.items():
        assert got[metric] == pytest.approx(value, rel=1e-9), metric
    assert result.metadata["classifier"] == "head"
    per_class = [r for r in result.records if r.metric == "class_count"]
    assert [r.index for r in per_class] == list(range(10))
    assert [int(r.value) for r in per_class] == torch.bincount(y).tolist()
    assert {r.group for r in per_class} == {f"features/class={k}" for k in range(10)}
    cosines = cosine_matrices(result.artifacts["cosine"])
    assert list(cosines) == ["features"] and cosines["features"].shape == (10, 10)
    assert list(cosines["features"].columns) == list(range(10))
    m = torch.stack([torch.as_tensor(h[y == c].mean(0)) for c in range(10)])
    m = m - m.mean(0)
    m = m / m.norm(dim=1, keepdim=True)
    assert np.allclose(cosines["features"].to_numpy(), (m @ m.T).numpy(), rtol=1e-9, atol=1e-12)


def test_layerwise_collapse_reports_classifier_metrics_where_they_apply(digits_run):
    ctx = _digits_context(digits_run[-1])
    result = analyze_collapse(CollapseConfig(layers=["features.1", "features.3"]), ctx)
    by_layer: dict[str, set[str]] = {}
    for r in result.records:
        by_layer.setdefault(r.group, set()).add(r.metric)
    assert set(by_layer) == {"features.1", "features.3"}
    assert {"nc3", "nc4", "nc2_equinorm_classifier"} <= by_layer["features.3"]
    assert not {"nc3", "nc4"} & by_layer["features.1"]
    assert {"nc1", "cdnv", "nc2_equinorm"} <= by_layer["features.1"]

    only_early = analyze_collapse(CollapseConfig(layers=["features.0"]), ctx)
    groups = {r.group for r in only_early.records}
    assert groups == {"features.0", "head:input"}
    assert any("head:input" in n for n in only_early.metadata["notes"])


def test_analyzer_skips_a_last_linear_that_is_not_the_classifier():
    class Proj(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Linear(4, 6)
            self.proj = nn.Linear(6, 2)  # a projection, fewer outputs than classes

        def forward(self, x):
            return self.proj(torch.tanh(self.body(x)))

    torch.manual_seed(0)
    model = Proj().double().eval()
    from diagnostics.context import Context

    x = torch.randn(40, 4, dtype=F64)
    y = torch.arange(4).repeat(10)
    ctx = Context(
        model=model,
        params=dict(model.named_parameters()),
        frozen={},
        batches=[(x, y)],
        loss_fn=lambda o, t: o.sum(),
        device=torch.device("cpu"),
        dtype=F64,
    )
    result = analyze_collapse(CollapseConfig(), ctx)
    assert {r.metric for r in result.records}.isdisjoint({"nc3", "nc4"})
    assert any("not the classifier" in n for n in result.metadata["notes"])
    with pytest.raises(DiagnosticsError, match="has 2 outputs but the labels go up to 3"):
        analyze_collapse(CollapseConfig(classifier="proj"), ctx)


def test_collapse_is_registered():
    spec = all_analyzers()["collapse"]
    assert spec.needs_targets and spec.config is CollapseConfig and not spec.uses_loss
    assert spec.make_config({"layers": ["features"], "per_class": True}).per_class
    with pytest.raises(DiagnosticsError, match=r"unknown option 'per_clas' in \[collapse\]; did you mean 'per_class'"):
        spec.make_config({"per_clas": True})


def test_every_metric_the_analyzer_can_emit_is_declared(digits_run):
    """Per-class rows, classifier metrics and the imbalance-only orthogonal frame are all declared."""
    declared = {m.name for m in ANALYZER.metrics}
    assert declared == set(METRICS) | set(CLASS_METRICS)
    assert all(m.definition and m.group for m in ANALYZER.metrics)
    ctx = _digits_context(digits_run[-1])
    cfg = CollapseConfig(layers=["features", "features.1"], per_class=True, imbalance_ratio=1.0 + 1e-9)
    result = analyze_collapse(cfg, ctx)
    emitted = {r.metric for r in result.records}
    assert emitted <= declared
    assert {"nc1", "nc4", "class_nc4", "class_cdnv"} <= emitted
    # counts 133..149: imbalanced for this ratio, so the analyzer reports the orthogonal-frame metrics
    assert {"nc2_orthogonal_frame", "nc2_orthogonal_frame_classifier"} <= emitted
    default = analyze_collapse(CollapseConfig(layers=["features"]), ctx)  # ratio 149/133 < 1.5
    assert "nc2_orthogonal_frame" not in {r.metric for r in default.records}


def test_report_figure_draws_the_cosines_of_the_last_checkpoint(digits_run):
    from diagnostics.plots import collapse_cosine_section

    parts = []
    for step, path in ((0, digits_run[0]), (200, digits_run[-1])):
        result = analyze_collapse(CollapseConfig(layers=["features", "features.1"]), _digits_context(path))
        part = result.artifacts["cosine"].copy()
        part.insert(0, "step", step)
        part.insert(0, "checkpoint", path.name)
        parts.append(part)
    import pandas as pd

    figures = collapse_cosine_section(pd.DataFrame(), {"cosine": pd.concat(parts[::-1], ignore_index=True)})
    assert len(figures) == 1
    name, title, fig = figures[0]
    assert name == "collapse-cosines" and f"at {digits_run[-1].name} (step 200)" in title
    assert [ax.get_title().split()[0] for ax in fig.axes if ax.get_title()] == ["features", "features.1"]
    assert collapse_cosine_section(pd.DataFrame(), {}) == []
