"""RankMe and related ranks against closed forms on constructed spectra."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from diagnostics.analyzers.rank import (
    RankConfig,
    analyze_rank,
    entropy_effective_rank,
    feature_spectra,
    participation_ratio,
    power_law_decay,
    rank_metrics,
    rankme,
    stable_rank,
)
from diagnostics.analyzers.registry import all_analyzers
from diagnostics.context import Context
from diagnostics.errors import DiagnosticsError

F64 = torch.float64


def centred_orthonormal(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """``N x k`` with orthonormal columns, each orthogonal to the all-ones vector (zero column means)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.cat([torch.ones(n, 1, dtype=F64), torch.randn(n, k, generator=g, dtype=F64)], 1)
    q, _ = torch.linalg.qr(a)
    return q[:, 1:]


def with_spectrum(n: int, d: int, cov_eigenvalues: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Centred ``N x D`` features whose covariance ``Z^T Z / N`` has exactly ``cov_eigenvalues`` (random basis)."""
    k = cov_eigenvalues.numel()
    g = torch.Generator().manual_seed(seed + 1)
    basis, _ = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=F64))
    return math.sqrt(n) * centred_orthonormal(n, k, seed) * cov_eigenvalues.sqrt() @ basis.T


def garrido_reference(z: np.ndarray, eps: float = 1e-7) -> float:
    """RankMe exactly as in Garrido et al. (2023), in numpy."""
    s = np.linalg.svd(z, compute_uv=False)
    p = s / s.sum() + eps
    return float(np.exp(-(p * np.log(p)).sum()))


# ------------------------------------------------------------------------------ pure metrics
@pytest.mark.parametrize("k", [1, 3, 10])
def test_rankme_of_known_rank_is_k_up_to_eps(k):
    n, d, eps = 200, 24, 1e-7
    z = with_spectrum(n, d, torch.full((k,), 2.5, dtype=F64)) + 0.0
    s = torch.linalg.svdvals(z)
    value = rankme(s, eps)
    # exact: k singular values equal, d - k zero -> p = 1/k + eps (k times) and eps (d - k times)
    p1, p0 = 1.0 / k + eps, eps
    exact = math.exp(-(k * p1 * math.log(p1) + (d - k) * p0 * math.log(p0)))
    assert value == pytest.approx(exact, rel=1e-8)
    # eps moves RankMe from k by at most (d - k) eps |log eps| + k eps (|log p1| + 1) relative
    bound = k * ((d - k) * eps * abs(math.log(eps)) + k * eps * (abs(math.log(p1)) + 1))
    assert abs(value - k) <= bound
    assert value == pytest.approx(garrido_reference(z.numpy(), eps), rel=1e-10)


def test_rankme_of_isotropic_gaussian_is_close_to_d():
    """For N x D standard Gaussian Z (N >> D), sigma_k^2/N follow Marchenko-Pastur with mean 1 and
    variance D/N, so sigma_k/sqrt(N) have variance D/(4N) and the entropy loses half the squared
    coefficient of variation: RankMe = D - D^2/(8N) to leading order."""
    n, d = 16384, 64
    z = torch.randn(n, d, generator=torch.Generator().manual_seed(0), dtype=F64)
    value = rankme(torch.linalg.svdvals(z))
    deficit = d * d / (8 * n)
    assert value < d
    assert d - value == pytest.approx(deficit, rel=0.15)


def test_rank_metrics_of_a_designed_covariance_spectrum():
    lam = torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5, 0.25], dtype=F64)
    z = with_spectrum(400, 10, lam) + torch.linspace(-3, 3, 10, dtype=F64)  # an offset: cov unchanged
    spec = feature_spectra(z)
    assert torch.allclose(spec.covariance_eigenvalues[:6], lam, rtol=1e-12)
    assert float(spec.covariance_eigenvalues[6:].abs().max()) < 1e-12
    values, _ = rank_metrics(spec, RankConfig())
    q = lam / lam.sum()
    assert values["effective_rank_cov"] == pytest.approx(math.exp(-float((q * q.log()).sum())), rel=1e-10)
    assert values["stable_rank"] == pytest.approx(float(lam.sum() / lam.max()), rel=1e-12)
    assert values["participation_ratio"] == pytest.approx(float(lam.sum() ** 2 / (lam**2).sum()), rel=1e-12)
    # RankMe sees the raw (uncentred) matrix: the offset adds a direction
    assert values["rankme"] == pytest.approx(garrido_reference(z.numpy()), rel=1e-10)
    centred = rank_metrics(feature_spectra(z - z.mean(0)), RankConfig())[0]
    assert centred["effective_rank_cov"] == pytest.approx(values["effective_rank_cov"], rel=1e-10)
    assert centred["rankme"] != pytest.approx(values["rankme"], rel=1e-3)


def test_alpha_req_recovers_an_exact_power_law():
    alpha = 1.7
    lam = torch.arange(1, 41, dtype=F64) ** -alpha
    fit = power_law_decay(lam)
    assert fit is not None and fit.alpha == pytest.approx(alpha, rel=1e-12) and fit.r2 == pytest.approx(1.0)
    assert (fit.kmin, fit.kmax) == (1, 40)
    # a different law beyond k = 20 does not touch a fit restricted to k <= 20
    bent = torch.cat([lam[:20], lam[19] * (torch.arange(2, 22, dtype=F64) / 1.0) ** -4.0])
    assert power_law_decay(bent, kmin=1, kmax=20).alpha == pytest.approx(alpha, rel=1e-12)
    assert power_law_decay(bent).alpha > alpha + 0.3
    # from features: the covariance of designed data has the same law
    z = with_spectrum(300, 50, lam[:30] * 4.0)
    values, info = rank_metrics(feature_spectra(z), RankConfig(alpha_kmax=30))
    assert values["alpha_req"] == pytest.approx(alpha, rel=1e-9)
    assert info["alpha_req_fit"]["kmax"] == 30
    assert power_law_decay(torch.tensor([1.0, 0.5], dtype=F64)) is None


def test_every_rank_metric_is_scale_invariant():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(150, 20, generator=g, dtype=F64) @ torch.randn(20, 20, generator=g, dtype=F64) + 1.0
    base, _ = rank_metrics(feature_spectra(z), RankConfig())
    for scale in (1e-4, 7.0, 1e5):
        scaled, _ = rank_metrics(feature_spectra(scale * z), RankConfig())
        for k in base:
            assert scaled[k] == pytest.approx(base[k], rel=1e-9), (k, scale)


def test_zero_spectrum_reads_zero():
    zero = torch.zeros(5, dtype=F64)
    assert rankme(zero) == 0.0
    assert entropy_effective_rank(zero) == 0.0
    assert stable_rank(zero) == 0.0
    assert participation_ratio(zero) == 0.0


# --------------------------------------------------------------------------------- analyzer
class TwoLayer(nn.Module):
    def __init__(self, d_in: int = 6, width: int = 8) -> None:
        super().__init__()
        self.encoder = nn.Linear(d_in, width)
        self.act = nn.Tanh()
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        return self.head(self.act(self.encoder(x)))


def make_context(n: int = 300, batch: int = 64, seed: int = 0, with_targets: bool = False) -> Context:
    torch.manual_seed(seed)
    model = TwoLayer().double().eval()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g, dtype=F64)
    y = torch.randint(0, 3, (n,), generator=g) if with_targets else None
    batches = [(x[i : i + batch], None if y is None else y[i : i + batch]) for i in range(0, n, batch)]
    return Context(
        model=model,
        params=dict(model.named_parameters()),
        frozen={},
        batches=batches,
        loss_fn=lambda o, t: o.sum(),
        device=torch.device("cpu"),
        dtype=F64,
        seed=seed,
    )


def test_analyzer_equals_the_metrics_of_features_computed_by_hand():
    ctx = make_context()
    result = analyze_rank(RankConfig(layers=["encoder", "act"]), ctx)
    x = torch.cat([b[0] for b in ctx.batches])
    with torch.no_grad():
        pre = ctx.model.encoder(x)
    for layer, feats in (("encoder", pre), ("act", torch.tanh(pre))):
        expected, _ = rank_metrics(feature_spectra(feats), RankConfig())
        got = {r.metric: r.value for r in result.records if r.group == layer}
        assert got.keys() == expected.keys()
        for k in expected:
            assert got[k] == pytest.approx(expected[k], rel=1e-12), (layer, k)
    spectrum = result.artifacts["spectrum"]
    assert set(spectrum["group"]) == {"encoder", "act"}
    assert list(spectrum[spectrum["group"] == "encoder"]["k"]) == list(range(1, 9))


def test_default_layer_is_the_input_of_the_last_linear():
    ctx = make_context()
    result = analyze_rank(RankConfig(), ctx)
    assert {r.group for r in result.records} == {"head:input"}
    by_hand = analyze_rank(RankConfig(layers=["act"]), ctx)
    assert [r.value for r in result.records] == [r.value for r in by_hand.records]


def test_subsample_is_seeded_and_capped():
    ctx = make_context(n=500)
    cfg = RankConfig(layers=["encoder"], max_samples=100)
    a = analyze_rank(cfg, ctx)
    b = analyze_rank(cfg, ctx)
    assert [r.value for r in a.records] == [r.value for r in b.records]
    assert a.metadata["samples_used"] == 100 and a.metadata["samples_total"] == 500
    assert "100 of 500 rows" in a.metadata["subsample"]
    other = analyze_rank(cfg, replace(ctx, seed=1))
    assert [r.value for r in other.records] != [r.value for r in a.records]
    full = analyze_rank(RankConfig(layers=["encoder"]), ctx)
    assert full.metadata["samples_used"] == 500 and "subsample" not in full.metadata


def test_bad_inputs():
    ctx = make_context()
    with pytest.raises(DiagnosticsError, match=r"unknown layer 'encodr'; did you mean 'encoder'\?"):
        analyze_rank(RankConfig(layers=["encodr"]), ctx)
    with pytest.raises(DiagnosticsError, match=r"over the .* budget; lower --max-samples or use --pool mean"):
        analyze_rank(RankConfig(layers=["encoder"], max_bytes=1000), ctx)
    with pytest.raises(DiagnosticsError, match="--max-samples must be >= 2, got 1"):
        analyze_rank(RankConfig(max_samples=1), ctx)
    with pytest.raises(DiagnosticsError, match="--pool must be one of mean, last, first, flatten, not 'max'"):
        analyze_rank(RankConfig(pool="max"), ctx)
    with pytest.raises(DiagnosticsError, match="--alpha-kmax"):
        RankConfig(alpha_kmin=5, alpha_kmax=6).validate()


def test_rankme_is_registered_and_needs_no_targets():
    spec = all_analyzers()["rankme"]
    assert not spec.needs_targets and spec.config is RankConfig
    result = spec.run(spec.make_config({"layers": ["encoder"]}), make_context(), None)
    assert {r.metric for r in result.records} == {
        "rankme",
        "effective_rank_cov",
        "stable_rank",
        "participation_ratio",
        "alpha_req",
    }
