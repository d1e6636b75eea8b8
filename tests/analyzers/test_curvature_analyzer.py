"""``diag hessian`` beyond the Hessian against dense float64 references: --curvature for every output,
--compare-curvatures, --gradient-alignment (dense eigenvectors), --batch-sharpness (dense per-batch Hessians),
--outliers (a designed spectrum), --block-heterogeneity, the sampled Fisher's covering errors, and the report
sections of a sweep."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import tinymodels as tm
from curvature_refs import (
    build_logsoftmax,
    dense_empirical_fisher,
    dense_ggn,
    dense_gradient,
    dense_jacobian,
    dense_loss_hessian,
    eig_desc,
)
from diagnostics.analyzers import curvature_metrics as cm
from diagnostics.analyzers.hessian import ANALYZER, HessianConfig, analyze_hessian, class_batches
from diagnostics.binding import Binding, resolve_binding
from diagnostics.checkpoint import load_checkpoint, save_checkpoint
from diagnostics.context import build_context, parameter_groups
from diagnostics.errors import DiagnosticsError
from diagnostics.linalg.density import slq
from diagnostics.linalg.lanczos import lanczos
from diagnostics.linalg.operator import DenseOperator
from diagnostics.runner import run_analyzer

F64 = torch.float64


def tiny_ctx(
    tmp_path: Path, data="tinymodels:tiny_data", loss="cross_entropy", lr=None, model="tinymodels:build_tiny", **kw
):
    m = build_logsoftmax() if model.endswith("build_logsoftmax") else tm.build_tiny()
    p = save_checkpoint(tmp_path / "t.pt", m, step=3, lr=lr)
    return build_context(
        load_checkpoint(p),
        Binding(model=model, data=data, loss=loss),
        dtype="float64",
        **kw,
    )


def values(result, metric, group=None):
    rows = [r for r in result.records if r.metric == metric and r.group == group]
    rows = sorted(rows, key=lambda r: -1 if r.index is None else r.index)
    return np.array([r.value for r in rows]), np.array([np.nan if r.stderr is None else r.stderr for r in rows])


REFERENCES = {
    "hessian": dense_loss_hessian,
    "ggn": dense_ggn,
    "fisher": dense_ggn,  # cross-entropy: F = GGN
    "empirical_fisher": dense_empirical_fisher,
    "functional": lambda ctx, b: dense_loss_hessian(ctx, b) - dense_ggn(ctx, b),
}


# ---------------------------------------------------------------------------- --curvature outputs
@pytest.mark.parametrize("kind", ["ggn", "fisher", "empirical_fisher", "functional"])
def test_every_output_follows_the_curvature(tmp_path: Path, kind: str) -> None:
    ctx = tiny_ctx(tmp_path, data="tinymodels:tiny_loader")
    M = REFERENCES[kind](ctx, ctx.batches)
    exact = eig_desc(M)
    cfg = HessianConfig(
        curvature=kind,
        top_k=3,
        bottom_k=1,
        tol=1e-8,
        trace=True,
        trace_rtol=0,
        trace_samples=60,
        density=True,
        density_probes=2,
        density_steps=20,
    )
    res = run_analyzer(ANALYZER, cfg, ctx)
    top, top_se = values(res, "eigenvalue")
    assert np.all(np.abs(top - exact[:3]) <= top_se + 1e-12) and np.all(np.abs(top - exact[:3]) <= 1e-7 * exact[0])
    bottom, _ = values(res, "bottom_eigenvalue")
    assert abs(bottom[0] - exact[-1]) <= 1e-6 * abs(exact[0])
    tr, tr_se = values(res, "trace")
    assert abs(tr[0] - float(torch.trace(M))) <= 4 * tr_se[0] + 1e-10
    assert res.metadata["curvature"]["kind"] == kind
    if kind == "fisher":
        assert res.metadata["curvature"]["fisher"].startswith("exact: categorical")


def test_per_layer_and_per_class_follow_the_curvature(tmp_path: Path) -> None:
    ctx = tiny_ctx(tmp_path)
    G = dense_ggn(ctx, ctx.batches)
    res = analyze_hessian(HessianConfig(curvature="ggn", top_k=2, tol=1e-9, per_layer=True, per_class=True), ctx)
    slices, start = {}, 0
    for n, p in ctx.params.items():
        slices[n] = slice(start, start + p.numel())
        start += p.numel()
    for layer, names in parameter_groups(ctx.params).items():
        idx = np.concatenate([np.arange(slices[n].start, slices[n].stop) for n in names])
        exact = eig_desc(G[np.ix_(idx, idx)])[:2]
        got, _ = values(res, "eigenvalue", layer)
        np.testing.assert_allclose(got, exact, rtol=1e-7)
    for c, parts in class_batches(ctx.batches).items():
        exact = eig_desc(dense_ggn(ctx, parts))[:2]
        got, _ = values(res, "eigenvalue", f"class={c}")
        np.testing.assert_allclose(got, exact, rtol=1e-7)


def test_compare_curvatures_gives_each_spectrum(tmp_path: Path) -> None:
    ctx = tiny_ctx(tmp_path, data="tinymodels:tiny_loader")
    kinds = ["hessian", "ggn", "empirical_fisher", "functional"]
    res = analyze_hessian(HessianConfig(top_k=3, tol=1e-8, compare_curvatures=kinds), ctx)
    for kind in kinds:
        exact = eig_desc(REFERENCES[kind](ctx, ctx.batches))[:3]
        got, se = values(res, "curvature_eigenvalue", f"curvature={kind}")
        assert np.all(np.abs(got - exact) <= se + 1e-12), kind
        np.testing.assert_allclose(got, exact, rtol=1e-7)
    # the primary curvature's comparison reuses its own Lanczos run
    assert res.metadata["curvatures"]["hessian"]["reused"]
    np.testing.assert_array_equal(
        values(res, "curvature_eigenvalue", "curvature=hessian")[0], values(res, "eigenvalue")[0]
    )


def test_a_trained_mse_model_has_ggn_close_to_hessian(digits_run) -> None:
    # near an interpolating minimum the residuals vanish and H - G with them (here only approximately)
    ck = load_checkpoint(digits_run[-1])
    ctx = build_context(ck, resolve_binding(ck.factories), dtype="float64", samples=200)
    res = analyze_hessian(HessianConfig(top_k=2, tol=1e-6, compare_curvatures=["hessian", "ggn", "functional"]), ctx)
    h = values(res, "curvature_eigenvalue", "curvature=hessian")[0]
    g = values(res, "curvature_eigenvalue", "curvature=ggn")[0]
    f = values(res, "curvature_eigenvalue", "curvature=functional")[0]
    assert np.all(np.abs(h - g) < 0.2 * h) and f[0] < 0.2 * h[0]


# ------------------------------------------------------------------------------ sampled Fisher
def test_sampled_fisher_eigenvalues_carry_a_covering_monte_carlo_error(tmp_path: Path) -> None:
    ctx = tiny_ctx(tmp_path, loss="nll", model="curvature_refs:build_logsoftmax")
    J = dense_jacobian(ctx, ctx.batches[0][0])
    with torch.no_grad():
        p = ctx.model(ctx.batches[0][0]).exp().reshape(-1)
    exact = eig_desc(J.T @ (p[:, None] * J) / len(ctx.batches[0][1]))
    z = []
    for seed in range(6):
        ctx.seed = seed
        res = analyze_hessian(HessianConfig(curvature="fisher", fisher_samples=32, top_k=2, tol=1e-9), ctx)
        got, se = values(res, "eigenvalue")
        assert np.all(se > 1e-6)  # the Monte-Carlo error, not only the Lanczos bound
        z += ((got - exact[:2]) / se).tolist()
        assert res.metadata["curvature"]["fisher"].startswith("sampled: 32 labels")
    assert max(abs(v) for v in z) < 3.5 and sum(abs(v) > 2 for v in z) <= 2, z


# --------------------------------------------------------------------------- gradient alignment
def test_gradient_alignment_matches_dense_eigenvectors(tmp_path: Path) -> None:
    ctx = tiny_ctx(tmp_path, data="tinymodels:tiny_loader")
    k = 5
    res = run_analyzer(
        ANALYZER, HessianConfig(top_k=k, tol=1e-6, gradient_alignment=True, compare_curvatures=["ggn"]), ctx
    )
    g = dense_gradient(ctx, ctx.batches).numpy()
    for group, M in ((None, dense_loss_hessian(ctx, ctx.batches)), ("curvature=ggn", dense_ggn(ctx, ctx.batches))):
        w, U = np.linalg.eigh(M.numpy())
        Uk = U[:, np.argsort(w)[::-1][:k]]
        overlaps = (Uk.T @ g) ** 2 / (g @ g)
        exact = overlaps.sum()
        got, bound = values(res, "gradient_alignment", group)
        assert abs(got[0] - exact) <= bound[0] + 1e-12 and abs(got[0] - exact) < 1e-8, (group, got, exact, bound)
        assert bound[0] < 1e-3  # separated eigenspaces: a useful bound
        per, _ = values(res, "gradient_overlap", group)
        np.testing.assert_allclose(per, overlaps, atol=1e-8)
        assert math.isclose(per.sum(), got[0], rel_tol=1e-12)
    info = res.metadata["curvatures"]["hessian"]
    assert info["criterion"] == "residual" and info["alignment"]["gap"] > 0
    assert all(r <= 1e-6 * abs(t) * 1.0001 for r, t in zip(info["residuals"], info["eigenvalues"]))


def test_davis_kahan_bound_covers_loose_eigenvectors() -> None:
    # a designed operator with a small gap after the 3rd eigenvalue and a loose tolerance: Lanczos's
    # vectors are rotated out of the true eigenspace, the bound must cover the alignment's error
    n = 60
    g0 = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=F64, generator=g0))
    lam = torch.cat([torch.tensor([10.0, 9.0, 8.0, 7.6], dtype=F64), torch.linspace(5.0, 0.1, n - 4, dtype=F64)])
    A = DenseOperator(Q @ torch.diag(lam) @ Q.T)
    covered, informative = 0, 0
    for tol in (3e-2, 1e-2):
        for seed in range(20):
            gen = torch.Generator().manual_seed(seed)
            g = torch.randn(n, dtype=F64, generator=gen)
            exact = float(((Q[:, :3].T @ g) ** 2).sum() / (g @ g))
            res = lanczos(A, k_top=4, tol=tol, generator=gen, criterion="residual")
            value, _, bound, _ = cm.alignment_from_ritz(
                res.eigenvectors, res.eigenvalues.tolist(), res.residuals.tolist(), g, 3
            )
            assert abs(value - exact) > 1e-8  # the vectors are loose: there is an error to cover
            covered += abs(value - exact) <= bound
            informative += bound < 0.25
    assert covered == 40 and informative >= 30


def test_alignment_is_undetermined_without_a_gap() -> None:
    v = torch.eye(4, dtype=F64)
    value, _, bound, gap = cm.alignment_from_ritz(
        v, [2.0, 1.0, 1.0, 0.5], [0.0, 0.0, 0.1, 0.0], torch.ones(4, dtype=F64), 2
    )
    assert value == pytest.approx(0.5) and bound == 1.0 and gap < 0
    assert cm.alignment_from_ritz(v, [2.0, 1.0], [0.0, 0.0], torch.ones(4, dtype=F64), 2)[2] == 1.0


# ----------------------------------------------------------------------------- batch sharpness
def test_batch_sharpness_from_dense_per_batch_hessians(tmp_path: Path) -> None:
    ctx = tiny_ctx(tmp_path, lr=0.5, batch_size_=5)  # 23 samples: batches 5,5,5,5 and a dropped 3
    res = run_analyzer(ANALYZER, HessianConfig(top_k=1, tol=1e-8, batch_sharpness=True), ctx)
    ratios = []
    for b in ctx.batches[:4]:
        H = dense_loss_hessian(ctx, [b])
        g = dense_gradient(ctx, [b])
        ratios.append(float(g @ H @ g / (g @ g)))
    ratios = np.array(ratios)
    got, se = values(res, "batch_sharpness")
    assert got[0] == pytest.approx(ratios.mean(), rel=1e-10)
    assert se[0] == pytest.approx(ratios.std(ddof=1) / 2, rel=1e-8)
    ratio, _ = values(res, "batch_sharpness_ratio")
    assert ratio[0] == pytest.approx(ratios.mean() * 0.5 / 2, rel=1e-10)  # threshold 2/lr = 4
    info = res.metadata["batch_sharpness"]
    assert info["batches"] == 4 and info["dropped_samples"] == 3 and info["hvps"] == 4
    assert any("last 3 samples" in n for n in res.metadata["notes"])
    # E_B[g^T H g / |g|^2] <= lambda_max of each batch, and here below the full-batch one too
    assert got[0] <= values(res, "eigenvalue")[0][0]


def test_batch_sharpness_on_one_batch_says_what_it_is(tmp_path: Path) -> None:
    ctx = tiny_ctx(tmp_path)
    res = analyze_hessian(HessianConfig(top_k=1, batch_sharpness=True), ctx)
    H, g = dense_loss_hessian(ctx, ctx.batches), dense_gradient(ctx, ctx.batches)
    got, se = values(res, "batch_sharpness")
    assert got[0] == pytest.approx(float(g @ H @ g / (g @ g)), rel=1e-10) and np.isnan(se[0])
    assert any("one batch" in n for n in res.metadata["notes"])
    assert not [r for r in res.records if r.metric == "batch_sharpness_ratio"]  # no learning rate known


# ----------------------------------------------------------------------------------- outliers
def test_outliers_of_a_designed_spectrum() -> None:
    # a bulk of 400 eigenvalues in [0, 1] and 6 outliers: the edge sits between, the count is 6
    n = 406
    g0 = torch.Generator().manual_seed(1)
    Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=F64, generator=g0))
    bulk = torch.rand(400, dtype=F64, generator=g0) ** 2
    lam = torch.cat([torch.tensor([9.0, 8.0, 6.5, 5.0, 4.0, 3.0], dtype=F64), bulk])
    A = DenseOperator(Q @ torch.diag(lam) @ Q.T)
    top = lanczos(A, k_top=12, tol=1e-8).eigenvalues.tolist()
    q = slq(A, probes=4, steps=80, generator=torch.Generator().manual_seed(2))
    count, edge, saturated = cm.count_outliers(top, q.nodes, q.weights, n)
    assert count == 6 and 1.0 <= edge < 3.0 and not saturated
    count, _, saturated = cm.count_outliers(top[:4], q.nodes, q.weights, n)
    assert count == 4 and saturated


def test_outliers_and_classes_in_the_records(tmp_path: Path) -> None:
    ctx = tiny_ctx(tmp_path)
    res = analyze_hessian(HessianConfig(top_k=2, outliers=True, outlier_k=6, compare_curvatures=["ggn"]), ctx)
    assert values(res, "num_classes")[0][0] == 3
    for group in (None, "curvature=ggn"):
        count = values(res, "outlier_count", group)[0][0]
        edge = values(res, "bulk_edge", group)[0][0]
        eig = res.metadata["curvatures"]["hessian" if group is None else "ggn"]["eigenvalues"][:6]
        assert count == sum(e > edge for e in eig)


# ------------------------------------------------------------------------------ block heterogeneity
def test_js_distance_and_its_mean() -> None:
    p = torch.tensor([0.2, 0.3, 0.5, 0.0])
    q = torch.tensor([0.0, 0.0, 0.0, 1.0])
    assert cm.js_distance(p, p) == 0.0
    assert cm.js_distance(p, q) == pytest.approx(1.0)
    r = torch.tensor([0.5, 0.5, 0.0, 0.0])
    m = 0.5 * (p + r)
    kl = lambda a: float(sum(a[i] * math.log2(a[i] / m[i]) for i in range(4) if a[i] > 0))  # noqa: E731
    assert cm.js_distance(p, r) == pytest.approx(math.sqrt(0.5 * kl(p) + 0.5 * kl(r)))
    assert cm.js_distance(p, r) == pytest.approx(cm.js_distance(r, p))
    mean, mat = cm.mean_pairwise_js([p, q, r])
    assert mean == pytest.approx((mat[0][1] + mat[0][2] + mat[1][2]) / 3) and mat[2][0] == mat[0][2]


def _block(name, nodes, weights=None):
    nodes = [torch.tensor(x, dtype=F64) for x in nodes]
    weights = weights or [torch.full((len(x),), 1.0 / len(x), dtype=F64) for x in nodes]
    return cm.BlockSpectrum(name, 10, float(max(max(x) for x in nodes)), 0.0, nodes, weights, 0, True)


def test_block_heterogeneity_of_designed_blocks() -> None:
    same = [_block(f"b{i}", [[0.0, 1.0, 2.0], [0.1, 1.1, 2.1]]) for i in range(3)]
    het = cm.block_heterogeneity(same, points=256)
    assert het.value == pytest.approx(0.0, abs=1e-12) and het.stderr == pytest.approx(0.0, abs=1e-12)
    apart = [_block("a", [[0.0, 0.1], [0.05, 0.1]]), _block("b", [[50.0, 50.1], [50.0, 50.2]])]
    het = cm.block_heterogeneity(apart, points=512)
    assert het.value == pytest.approx(1.0, abs=1e-6) and len(het.distances) == 2
    mixed = [*same[:2], apart[1]]
    het = cm.block_heterogeneity(mixed, points=512)
    assert 0.5 < het.value < 0.8 and het.stderr >= 0  # two pairs far apart, one identical
    with pytest.raises(ValueError):
        cm.block_heterogeneity(same[:1], points=64)


def test_block_heterogeneity_records(tmp_path: Path) -> None:
    ctx = tiny_ctx(tmp_path)
    cfg = HessianConfig(top_k=1, tol=1e-8, block_heterogeneity=True, density_probes=3, density_steps=15)
    res = analyze_hessian(cfg, ctx)
    H = dense_loss_hessian(ctx, ctx.batches)
    start = 0
    for name, p in ctx.params.items():
        sl = slice(start, start + p.numel())
        start += p.numel()
        got, se = values(res, "block_eigenvalue", name)
        exact = eig_desc(H[sl, sl])[0]
        assert abs(got[0] - exact) <= se[0] + 1e-12 and abs(got[0] - exact) <= 1e-7 * abs(exact)
    het, se = values(res, "block_heterogeneity")
    assert 0 < het[0] <= 1 and se[0] >= 0
    layers = analyze_hessian(HessianConfig(top_k=1, block_heterogeneity=True, blocks="layer"), ctx)
    assert {r.group for r in layers.records if r.metric == "block_eigenvalue"} == {"fc1", "fc2"}


# --------------------------------------------------------------------------------------- config
def test_bad_settings_are_one_line_errors(tmp_path: Path) -> None:
    ctx = tiny_ctx(tmp_path)
    with pytest.raises(DiagnosticsError, match="--curvature must be one of"):
        analyze_hessian(HessianConfig(curvature="gauss"), ctx)
    with pytest.raises(DiagnosticsError, match="--compare-curvatures must be one of"):
        analyze_hessian(HessianConfig(compare_curvatures=["ggn", "kfac"]), ctx)
    with pytest.raises(DiagnosticsError, match="nll is linear"):
        analyze_hessian(
            HessianConfig(curvature="ggn"), tiny_ctx(tmp_path, loss="nll", model="curvature_refs:build_logsoftmax")
        )


def test_a_custom_loss_gets_the_autograd_output_hessian(tmp_path: Path) -> None:
    mod = tmp_path / "huber_loss.py"
    mod.write_text(
        "import torch.nn.functional as F\n"
        "def huber(z, y):\n    return F.huber_loss(z, F.one_hot(y, z.shape[1]).to(z.dtype), delta=0.3)\n"
    )
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        ctx = tiny_ctx(tmp_path, loss="huber_loss:huber")
        res = analyze_hessian(HessianConfig(curvature="ggn", top_k=2, tol=1e-9), ctx)
        np.testing.assert_allclose(values(res, "eigenvalue")[0], eig_desc(dense_ggn(ctx, ctx.batches))[:2], rtol=1e-7)
        assert ctx.loss_fn(torch.zeros(2, 3, dtype=F64), torch.tensor([0, 1])) == pytest.approx(
            float(F.huber_loss(torch.zeros(2, 3), F.one_hot(torch.tensor([0, 1]), 3).float(), delta=0.3))
        )
    finally:
        sys.path.remove(str(tmp_path))


def test_the_declared_curvatures_are_the_operators() -> None:
    from diagnostics.analyzers import hessian
    from diagnostics.linalg.curvature import CURVATURES

    assert hessian.CURVATURES == CURVATURES
