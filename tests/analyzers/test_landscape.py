"""Landscape slices and interpolation against exact answers in float64."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from diagnostics.analyzers import landscape as landscape_module
from diagnostics.analyzers.landscape import (
    ANALYZER,
    LandscapeConfig,
    analyze_interpolation,
    analyze_landscape,
    golden_max,
    interpolation_axis,
    landscape_key,
    loss_barrier,
    run_landscape,
)
from diagnostics.analyzers.registry import all_analyzers
from diagnostics.binding import LOSSES
from diagnostics.context import Context
from diagnostics.directions import (
    FlatSpace,
    PointEvaluator,
    filter_scales,
    normalize_direction,
    orthogonalize,
    random_direction,
)
from diagnostics.errors import DiagnosticsError
from diagnostics.spec import check_config
from tinymodels import Vector, model_context

F64 = torch.float64
CPU = torch.device("cpu")


# ------------------------------------------------------------------------------------ fixtures
class MatrixQuadratic(nn.Module):
    """Outputs its weight matrix W [3, 4] and bias b [3]; the loss is a quadratic in (vec W, b)."""

    def __init__(self, W: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__()
        self.W = nn.Parameter(W.clone())
        self.b = nn.Parameter(b.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.W.reshape(-1), self.b])


def quadratic_problem(seed: int = 0, at_minimum: bool = False):
    g = torch.Generator().manual_seed(seed)
    n = 15
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    lam = torch.linspace(3.0, -0.5, n, dtype=F64)
    H = Q @ torch.diag(lam) @ Q.T
    H = 0.5 * (H + H.T)
    c = torch.randn(n, generator=g, dtype=F64)
    w = c.clone() if at_minimum else c + 0.4 * torch.randn(n, generator=g, dtype=F64)
    model = MatrixQuadratic(w[:12].reshape(3, 4), w[12:]).eval()

    def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        d = out - c
        return 0.5 * d @ H @ d

    ctx = Context(
        model=model,
        params={n_: p.detach() for n_, p in model.named_parameters()},
        frozen={},
        batches=[(torch.zeros(1, 1, dtype=F64), torch.zeros(1, dtype=F64))],
        loss_fn=loss_fn,
        device=CPU,
        dtype=F64,
        loss_name="quadratic",
    )
    return ctx, H, c, w


def flat(d: dict) -> torch.Tensor:
    return torch.cat([d["W"].reshape(-1), d["b"]])


class Scalar(nn.Module):
    def __init__(self, value: float) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([value], dtype=F64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w


def scalar_context(value: float, loss_fn) -> Context:
    m = Scalar(value).eval()
    return Context(
        model=m,
        params={"w": m.w.detach()},
        frozen={},
        batches=[(torch.zeros(1, 1, dtype=F64), torch.zeros(1, dtype=F64))],
        loss_fn=loss_fn,
        device=CPU,
        dtype=F64,
        checkpoint=f"w={value}",
        loss_name="custom",
    )


class ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4, eps=1e-300)  # positive (train mode needs it) yet below float64 resolution
        self.head = nn.Linear(4 * 16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.conv(x))).flatten(1))


def conv_bn_problem(seed: int = 0):
    torch.manual_seed(seed)
    model = ConvBN().double()
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(40, 1, 4, 4, generator=g, dtype=F64)
    y = torch.randint(0, 3, (40,), generator=g)
    model.train()
    model.bn.momentum = None
    with torch.no_grad():
        model(X)  # running statistics = the data's statistics
    model.bn.momentum = 0.1
    with torch.no_grad():
        model.bn.weight.uniform_(0.5, 1.5, generator=g)
        model.bn.bias.uniform_(-0.2, 0.2, generator=g)
    return model.eval(), X, y


# ---------------------------------------------------------------------------- quadratic slices
def test_one_d_slice_curvature_is_dT_H_d() -> None:
    ctx, H, c, w = quadratic_problem()
    steps, span = 9, 0.8
    res = analyze_landscape(LandscapeConfig(dims=1, steps=steps, span=span), ctx)
    d = flat(res.artifacts["directions"][0])
    L = torch.tensor(res.artifacts["grid"]["loss"].to_numpy())
    h = 2 * span / (steps - 1)
    second = (L[2:] - 2 * L[1:-1] + L[:-2]) / h**2
    torch.testing.assert_close(second, torch.full_like(second, float(d @ H @ d)), rtol=1e-9, atol=1e-10)
    first = (L[steps // 2 + 1] - L[steps // 2 - 1]) / (2 * h)
    assert float(first) == pytest.approx(float(d @ (H @ (w - c))), rel=1e-9)
    assert float(L[steps // 2]) == pytest.approx(float(0.5 * (w - c) @ H @ (w - c)), rel=1e-12)
    assert [r.metric for r in res.records] == ["loss"] * steps  # no accuracy for a regression-type loss
    # a record's index is its row of the grid; the coordinates live in the grid, not in the group
    assert [r.index for r in res.records] == list(range(steps)) and {r.group for r in res.records} == {None}
    x = res.artifacts["grid"]["x"]
    assert x[res.records[0].index] == pytest.approx(-0.8) and x[res.records[steps // 2].index] == 0.0
    assert [r.value for r in res.records] == res.artifacts["grid"]["loss"].tolist()


def test_two_d_slice_mixed_curvature_is_d1T_H_d2() -> None:
    ctx, H, c, w = quadratic_problem(seed=1)
    res = analyze_landscape(LandscapeConfig(dims=2, steps=5, span=0.5), ctx)
    d1, d2 = (flat(d) for d in res.artifacts["directions"])
    grid = res.artifacts["grid"]
    assert list(grid.columns) == ["x", "y", "loss", "accuracy"] and len(grid) == 25
    L = grid["loss"].to_numpy().reshape(5, 5)  # [i (x), j (y)]
    h = 0.25
    mixed = (L[3, 3] - L[3, 1] - L[1, 3] + L[1, 1]) / (4 * h**2)
    assert mixed == pytest.approx(float(d1 @ H @ d2), rel=1e-9)
    # every grid point equals the closed form
    xs = grid[["x", "y"]].to_numpy()
    for (x, y), value in zip(xs, grid["loss"]):
        p = w + x * d1 + y * d2 - c
        assert value == pytest.approx(float(0.5 * p @ H @ p), rel=1e-12, abs=1e-14)


def test_hessian_directions_give_the_eigenvalues_as_curvature() -> None:
    ctx, H, _, _ = quadratic_problem(seed=2)
    res = analyze_landscape(LandscapeConfig(direction="hessian", dims=2, steps=5, span=0.4, hessian_tol=1e-10), ctx)
    evals = np.linalg.eigvalsh(H.numpy())[::-1]
    meta = res.metadata["directions"]
    assert meta["normalize"] == "unit"
    np.testing.assert_allclose(meta["eigenvalues"], evals[:2], rtol=1e-9)
    d1, d2 = (flat(d) for d in res.artifacts["directions"])
    assert float(d1.norm()) == pytest.approx(1.0, rel=1e-12)
    assert abs(float(d1 @ d2)) < 1e-9
    L = res.artifacts["grid"]["loss"].to_numpy().reshape(5, 5)
    h = 0.2
    assert (L[3, 2] - 2 * L[2, 2] + L[1, 2]) / h**2 == pytest.approx(evals[0], rel=1e-8)
    assert (L[2, 3] - 2 * L[2, 2] + L[2, 1]) / h**2 == pytest.approx(evals[1], rel=1e-8)


# ---------------------------------------------------------------------------------- directions
def test_filter_normalisation_matches_each_filter_and_zeroes_1d() -> None:
    model, _, _ = conv_bn_problem()
    params = {n: p.detach() for n, p in model.named_parameters()}
    d = random_direction(params, torch.Generator().manual_seed(3), "filter")
    for name, t in params.items():
        if t.dim() >= 2:
            rows_d = d[name].reshape(t.shape[0], -1).norm(dim=1)
            rows_w = t.reshape(t.shape[0], -1).norm(dim=1)
            torch.testing.assert_close(rows_d, rows_w, rtol=1e-12, atol=0)
        else:
            assert bool((d[name] == 0).all()), name
    d1 = random_direction(params, torch.Generator().manual_seed(3), "filter", include_1d=True)
    for name, t in params.items():
        if t.dim() == 1:
            assert float(d1[name].norm()) == pytest.approx(float(t.norm()), rel=1e-12)
    layer = random_direction(params, torch.Generator().manual_seed(3), "layer")
    assert float(layer["conv.weight"].norm()) == pytest.approx(float(params["conv.weight"].norm()), rel=1e-12)
    unit = random_direction(params, torch.Generator().manual_seed(3), "unit")
    assert math.sqrt(sum(float((v**2).sum()) for v in unit.values())) == pytest.approx(1.0, rel=1e-12)
    # same generator state, same direction
    again = random_direction(params, torch.Generator().manual_seed(3), "filter")
    assert all(torch.equal(again[n], d[n]) for n in d)


@pytest.mark.parametrize("mode", ["filter", "layer", "unit", "none"])
def test_orthogonalize_is_exact_and_keeps_the_normalisation(mode: str) -> None:
    model, _, _ = conv_bn_problem()
    params = {n: p.detach() for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(4)
    a = random_direction(params, gen, mode)
    b = random_direction(params, gen, mode)
    o = orthogonalize(a, b, mode)
    fa = FlatSpace.of(params).flatten(a)
    fo = FlatSpace.of(params).flatten(o)
    assert abs(float(fa @ fo)) <= 1e-12 * float(fa.norm() * fo.norm())
    if mode == "filter":
        for name, t in params.items():
            if t.dim() >= 2:
                torch.testing.assert_close(
                    o[name].reshape(t.shape[0], -1).norm(dim=1),
                    t.reshape(t.shape[0], -1).norm(dim=1),
                    rtol=1e-12,
                    atol=0,
                )
    elif mode == "layer":
        assert float(o["head.weight"].norm()) == pytest.approx(float(params["head.weight"].norm()), rel=1e-12)
    else:
        assert float(fo.norm()) == pytest.approx(float(FlatSpace.of(params).flatten(b).norm()), rel=1e-12)


def test_orthogonalized_slice_reports_zero_cosine() -> None:
    model, X, y = conv_bn_problem()
    ctx = model_context(model, X, y)
    plain = analyze_landscape(LandscapeConfig(dims=2, steps=3), ctx)
    ortho = analyze_landscape(LandscapeConfig(dims=2, steps=3, orthogonalize=True), ctx)
    assert abs(plain.metadata["directions"]["cosine"]) > 1e-6
    assert abs(ortho.metadata["directions"]["cosine"]) < 1e-12


def test_filter_scales_give_each_entry_its_filter_norm() -> None:
    W = torch.tensor([[3.0, 4.0], [0.0, 1.0]], dtype=F64)
    b = torch.tensor([1.0, 2.0, 2.0], dtype=F64)
    s = filter_scales({"W": W, "b": b})
    torch.testing.assert_close(s, torch.tensor([5, 5, 1, 1, 3, 3, 3], dtype=F64))
    torch.testing.assert_close(filter_scales({"b": b}, include_1d=False), torch.zeros(3, dtype=F64))


def test_normalize_rejects_unknown_mode() -> None:
    with pytest.raises(DiagnosticsError, match="normalisation"):
        normalize_direction({"w": torch.ones(2)}, {"w": torch.ones(2)}, "bogus")


# ----------------------------------------------------------------------------------- invariances
def test_rescaling_a_batchnorm_preceded_filter_leaves_the_slice_unchanged() -> None:
    model, X, y = conv_bn_problem()
    scaled = copy.deepcopy(model)
    a = torch.tensor([0.1, 3.0, 7.5, 0.6], dtype=F64)
    with torch.no_grad():
        scaled.conv.weight.mul_(a.reshape(-1, 1, 1, 1))
        scaled.conv.bias.mul_(a)
        scaled.bn.running_mean.mul_(a)
        scaled.bn.running_var.mul_(a**2)
    cfg = LandscapeConfig(dims=2, steps=5, span=1.0)
    base = analyze_landscape(cfg, model_context(model, X, y))
    other = analyze_landscape(cfg, model_context(scaled, X, y))
    np.testing.assert_allclose(other.artifacts["grid"]["loss"], base.artifacts["grid"]["loss"], rtol=1e-10)
    np.testing.assert_array_equal(other.artifacts["grid"]["accuracy"], base.artifacts["grid"]["accuracy"])
    # with statistics recomputed on the data at every point, the same holds
    cfg_bn = LandscapeConfig(dims=1, steps=5, span=1.0, bn_recompute=True)
    b1 = analyze_landscape(cfg_bn, model_context(model, X, y))
    b2 = analyze_landscape(cfg_bn, model_context(scaled, X, y))
    np.testing.assert_allclose(b2.artifacts["grid"]["loss"], b1.artifacts["grid"]["loss"], rtol=1e-10)
    # un-normalised directions do see the rescaling (the test can fail)
    raw = LandscapeConfig(dims=2, steps=5, span=1.0, normalize="none")
    r1 = analyze_landscape(raw, model_context(model, X, y)).artifacts["grid"]["loss"].to_numpy()
    r2 = analyze_landscape(raw, model_context(scaled, X, y)).artifacts["grid"]["loss"].to_numpy()
    assert np.max(np.abs(r1 - r2)) > 1e-2


def test_rescaling_a_relu_pair_leaves_the_slice_unchanged() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(30, 5, generator=g, dtype=F64)
    y = torch.randint(0, 3, (30,), generator=g)
    scaled = copy.deepcopy(model)
    a = 4.0
    with torch.no_grad():
        scaled[0].weight.mul_(a)
        scaled[0].bias.mul_(a)
        scaled[2].weight.div_(a)
    for mode in ("filter", "layer"):
        cfg = LandscapeConfig(dims=2, steps=5, span=0.8, normalize=mode)
        l1 = analyze_landscape(cfg, model_context(model, X, y)).artifacts["grid"]["loss"]
        l2 = analyze_landscape(cfg, model_context(scaled, X, y)).artifacts["grid"]["loss"]
        np.testing.assert_allclose(l2, l1, rtol=1e-10)
    cfg = LandscapeConfig(dims=2, steps=5, span=0.8, normalize="unit")
    l1 = analyze_landscape(cfg, model_context(model, X, y)).artifacts["grid"]["loss"].to_numpy()
    l2 = analyze_landscape(cfg, model_context(scaled, X, y)).artifacts["grid"]["loss"].to_numpy()
    assert np.max(np.abs(l1 - l2)) > 1e-3


# ------------------------------------------------------------------------------------- barrier
def test_barrier_of_a_convex_quadratic_is_zero() -> None:
    H = torch.tensor([[2.0, 0.3], [0.3, 1.0]], dtype=F64)

    def loss_fn(out, y):
        return 0.5 * out @ H @ out

    ctx_a = vector_context(torch.tensor([1.0, -2.0], dtype=F64), loss_fn, "a")
    ctx_b = vector_context(torch.tensor([-0.5, 1.5], dtype=F64), loss_fn, "b")
    res = analyze_interpolation(LandscapeConfig(steps=11), ctx_a, ctx_b)
    barrier = [r for r in res.records if r.metric == "barrier"]
    assert len(barrier) == 1 and barrier[0].value == 0.0
    assert res.metadata["barrier"]["alpha"] in (0.0, 1.0)
    assert "max over alpha in [0, 1]" in res.metadata["barrier_definition"]
    # the chord lies above the loss everywhere inside
    grid = res.artifacts["grid"]
    assert (grid["loss"] <= grid["chord"] + 1e-15).all()


def vector_context(v: torch.Tensor, loss_fn, name: str) -> Context:
    m = Vector(v).eval()
    return Context(
        model=m,
        params={"v": m.v.detach()},
        frozen={},
        batches=[(torch.zeros(1, 1, dtype=F64), torch.zeros(1, dtype=F64))],
        loss_fn=loss_fn,
        device=CPU,
        dtype=F64,
        checkpoint=name,
        loss_name="custom",
    )


def double_well(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((out**2 - 1) ** 2).sum()


def test_barrier_of_the_double_well_is_one() -> None:
    a, b = scalar_context(-1.0, double_well), scalar_context(1.0, double_well)
    res = analyze_interpolation(LandscapeConfig(steps=21), a, b)
    value = next(r.value for r in res.records if r.metric == "barrier")
    assert value == 1.0
    assert res.metadata["barrier"]["alpha"] == 0.5
    # a grid that misses alpha = 0.5: the golden-section refinement finds the top
    coarse = analyze_interpolation(LandscapeConfig(steps=4, refine_steps=30), a, b)
    meta = coarse.metadata["barrier"]
    assert meta["grid_value"] == pytest.approx((1 / 9 - 1) ** 2, rel=1e-12)  # alpha = 1/3: x = -1/3
    assert meta["refined"] and next(r.value for r in coarse.records if r.metric == "barrier") == pytest.approx(
        1.0, abs=1e-9
    )
    assert meta["alpha"] == pytest.approx(0.5, abs=1e-4)


def test_interpolation_extrapolates_and_matches_direct_evaluation() -> None:
    a, b = scalar_context(-1.0, double_well), scalar_context(1.0, double_well)
    res = analyze_interpolation(LandscapeConfig(steps=9, alpha_min=-0.5, alpha_max=1.5), a, b)
    grid = res.artifacts["grid"]
    assert grid["alpha"].iloc[0] == -0.5 and grid["alpha"].iloc[-1] == 1.5
    for alpha, loss in zip(grid["alpha"], grid["loss"]):
        x = -1 + 2 * alpha
        assert loss == pytest.approx((x**2 - 1) ** 2, rel=1e-12, abs=1e-15)
    loss = [r for r in res.records if r.metric == "loss"]
    assert [grid["alpha"][r.index] for r in loss[:2]] == [-0.5, -0.25] and loss[0].group is None


def test_interpolation_axis_always_holds_both_checkpoints() -> None:
    ax = interpolation_axis(-0.3, 1.3, 5).tolist()
    assert 0.0 in ax and 1.0 in ax and ax[0] == -0.3 and ax[-1] == pytest.approx(1.3)
    assert ax == sorted(ax)
    assert interpolation_axis(0.0, 1.0, 3).tolist() == [0.0, 0.5, 1.0]


def test_loss_barrier_and_golden_max_on_known_functions() -> None:
    alphas = torch.tensor([-0.5, 0.0, 0.25, 0.5, 1.0, 1.5], dtype=F64)
    losses = torch.tensor([9.0, 1.0, 2.0, 1.5, 3.0, 9.0], dtype=F64)
    value, at = loss_barrier(alphas, losses)
    assert value == pytest.approx(2.0 - 1.5) and at == 0.25  # outside [0, 1] ignored
    with pytest.raises(ValueError):
        loss_barrier(torch.tensor([0.2, 0.5]), torch.tensor([1.0, 2.0]))
    x, fx = golden_max(lambda t: -((t - 0.3) ** 2), 0.0, 1.0, 40)
    assert x == pytest.approx(0.3, abs=1e-7) and fx == pytest.approx(0.0, abs=1e-13)


def test_interpolation_lerps_batchnorm_statistics_or_recomputes_them() -> None:
    model_a, X, y = conv_bn_problem(seed=0)
    model_b, _, _ = conv_bn_problem(seed=5)
    ca, cb = model_context(model_a, X, y, "a"), model_context(model_b, X, y, "b")
    res = analyze_interpolation(LandscapeConfig(steps=5), ca, cb)
    assert "bn.running_mean" in res.metadata["interpolated_buffers"]
    sa, sb = model_a.state_dict(), model_b.state_dict()
    for alpha, loss in zip(res.artifacts["grid"]["alpha"], res.artifacts["grid"]["loss"]):
        m = copy.deepcopy(model_a)
        mixed = {k: ((1 - alpha) * sa[k] + alpha * sb[k]) if sa[k].is_floating_point() else sa[k] for k in sa}
        m.load_state_dict(mixed)
        with torch.no_grad():
            direct = float(LOSSES["cross_entropy"](m.eval()(X), y))
        assert loss == pytest.approx(direct, rel=1e-12)
    res_vmap = analyze_interpolation(LandscapeConfig(steps=5, backend="vmap"), ca, cb)  # stacked buffers
    np.testing.assert_allclose(res_vmap.artifacts["grid"]["loss"], res.artifacts["grid"]["loss"], rtol=1e-12)
    rec = analyze_interpolation(LandscapeConfig(steps=3, bn_recompute=True, backend="vmap"), ca, cb)
    from torch.optim.swa_utils import update_bn

    for alpha, loss in zip(rec.artifacts["grid"]["alpha"], rec.artifacts["grid"]["loss"]):
        m = copy.deepcopy(model_a)
        m.load_state_dict(
            {k: ((1 - alpha) * sa[k] + alpha * sb[k]) if sa[k].is_floating_point() else sa[k] for k in sa}
        )
        update_bn([X], m)
        with torch.no_grad():
            direct = float(LOSSES["cross_entropy"](m.eval()(X), y))
        assert loss == pytest.approx(direct, rel=1e-10)


def test_interpolation_moves_the_parameters_the_model_does_not_train_too() -> None:
    """A layer frozen with ``requires_grad=False`` is part of each checkpoint: the line ends at checkpoint B
    (before, it kept A's frozen layer and ``loss_b`` was a hybrid's loss)."""
    models = []
    for seed in (0, 5):
        model, X, y = conv_bn_problem(seed=seed)
        model.conv.weight.requires_grad_(False)
        models.append(model)

    def context(model: nn.Module, name: str) -> Context:
        named = dict(model.named_parameters())
        frozen = {n: p.detach() for n, p in named.items() if not p.requires_grad}
        return replace(
            model_context(model, X, y, name),
            params={n: p.detach() for n, p in named.items() if p.requires_grad},
            frozen={**frozen, **{n: b.detach() for n, b in model.named_buffers()}},
        )

    res = analyze_interpolation(LandscapeConfig(steps=3), context(models[0], "a"), context(models[1], "b"))
    assert "conv.weight" in res.metadata["interpolated_buffers"]
    with torch.no_grad():
        loss_b = float(LOSSES["cross_entropy"](models[1](X), y))
    assert res.metadata["barrier"]["loss_b"] == pytest.approx(loss_b, rel=1e-12)
    assert float(res.artifacts["grid"]["loss"].iloc[-1]) == pytest.approx(loss_b, rel=1e-12)


def test_interpolation_refuses_different_architectures() -> None:
    a = vector_context(torch.zeros(2, dtype=F64), double_well, "a")
    b = vector_context(torch.zeros(3, dtype=F64), double_well, "b")
    with pytest.raises(DiagnosticsError, match="different architectures"):
        analyze_interpolation(LandscapeConfig(), a, b)
    model, X, y = conv_bn_problem()
    other = nn.Sequential(nn.Linear(16, 3)).double()
    with pytest.raises(DiagnosticsError, match="different architectures"):
        analyze_interpolation(LandscapeConfig(), model_context(model, X, y), model_context(other, X.flatten(1), y))


# ------------------------------------------------------------------------------ evaluation engine
def test_batched_vmap_evaluation_equals_the_loop_and_accuracy_is_right() -> None:
    model, X, y = conv_bn_problem()
    ctx = model_context(model, X, y, batch=16)  # ragged batches 16, 16, 8
    ev = PointEvaluator(ctx, chunk=5, backend="vmap")
    loop = PointEvaluator(ctx, backend="loop")
    space = FlatSpace.of(ctx.params)
    w = space.flatten(ctx.params)
    P = w + 0.3 * torch.randn(12, space.dim, generator=torch.Generator().manual_seed(0), dtype=F64)
    s1 = ev.evaluate(P, predictions=True)
    s2 = loop.evaluate(P, predictions=True)
    assert ev.backend == "vmap" and loop.backend == "loop"
    torch.testing.assert_close(s1.loss, s2.loss, rtol=1e-12, atol=1e-14)
    assert torch.equal(s1.predictions, s2.predictions) and torch.equal(s1.accuracy, s2.accuracy)
    for k in (0, 7):
        m = copy.deepcopy(model)
        torch.nn.utils.vector_to_parameters(P[k], m.parameters())
        with torch.no_grad():
            out = m.eval()(X)
        assert float(s1.loss[k]) == pytest.approx(float(LOSSES["cross_entropy"](out, y)), rel=1e-12)
        assert float(s1.accuracy[k]) == pytest.approx(float((out.argmax(1) == y).double().mean()), rel=1e-15)
        assert torch.equal(s1.predictions[k], out.argmax(1))


def test_auto_backend_is_static_loop_for_convolutions_on_cpu_and_vmap_otherwise() -> None:
    model, X, y = conv_bn_problem()
    conv = PointEvaluator(model_context(model, X, y))
    assert conv.backend == "loop" and "convolutions" in conv.backend_reason
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).double()
    assert PointEvaluator(model_context(mlp, X, y)).backend == "vmap"
    assert PointEvaluator(model_context(model, X, y), backend="vmap").backend == "vmap"


def test_landscape_records_loss_and_accuracy_with_coordinates() -> None:
    model, X, y = conv_bn_problem()
    res = analyze_landscape(LandscapeConfig(dims=2, steps=3, span=0.5), model_context(model, X, y))
    metrics = [r.metric for r in res.records]
    assert metrics.count("loss") == 9 and metrics.count("accuracy") == 9
    grid = res.artifacts["grid"]
    at_centre = grid.index[(grid["x"] == 0) & (grid["y"] == 0)].tolist()
    assert at_centre == [4]  # flat index i * steps + j of (x_1, y_1)
    centre = [r for r in res.records if r.index == 4]
    assert {r.metric for r in centre} == {"loss", "accuracy"} and {r.group for r in res.records} == {None}
    with torch.no_grad():
        out = model(X)
    assert centre[0].value == pytest.approx(float(LOSSES["cross_entropy"](out, y)), rel=1e-12)
    assert centre[1].value == pytest.approx(float((out.argmax(1) == y).double().mean()))
    assert res.metadata["evaluation"]["backend"] == "loop"  # auto on a CPU conv net
    assert res.metadata["loss_centre"] == pytest.approx(centre[0].value)


# ----------------------------------------------------------------------------------- resuming
def test_a_grid_resumes_from_points_already_done() -> None:
    ctx, *_ = quadratic_problem(seed=3)
    cfg = LandscapeConfig(dims=2, steps=6, chunk=4)
    seen: dict = {}
    full = analyze_landscape(cfg, ctx, on_points=seen.update)
    assert sorted(seen) == list(range(36)) and full.metadata["points_evaluated"] == 36
    first = {i: seen[i] for i in range(0, 36, 2)}
    calls: list = []
    resumed = analyze_landscape(cfg, ctx, done=first, on_points=lambda new: calls.append(sorted(new)))
    assert resumed.metadata["points_resumed"] == 18 and resumed.metadata["points_evaluated"] == 18
    assert sorted(i for c in calls for i in c) == list(range(1, 36, 2))
    # same values up to the rounding of a different chunking of the batched evaluation
    np.testing.assert_allclose([r.value for r in resumed.records], [r.value for r in full.records], rtol=1e-13)
    assert [(r.metric, r.index) for r in resumed.records] == [(r.metric, r.index) for r in full.records]
    with pytest.raises(DiagnosticsError, match="outside this grid"):
        analyze_landscape(cfg, ctx, done={99: (1.0, None)})


def test_cache_key_depends_on_what_fixes_the_values() -> None:
    ctx, *_ = quadratic_problem(seed=3)
    k = landscape_key(LandscapeConfig(), ctx)
    assert k == landscape_key(LandscapeConfig(chunk=3, backend="loop"), ctx)
    assert k != landscape_key(LandscapeConfig(steps=5), ctx)
    assert k != landscape_key(LandscapeConfig(), ctx.restrict(names=["W"]))
    other, *_ = quadratic_problem(seed=4)
    assert k != landscape_key(LandscapeConfig(), other)


# ---------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"dims": 3}, "--dims"),
        ({"steps": 1}, "--steps"),
        ({"span": 0.0}, "--span"),
        ({"span": -1.0}, "--span"),
        ({"direction": "pca"}, "--direction"),
        ({"normalize": "global"}, "--normalize"),
        ({"alpha_min": 1.0, "alpha_max": 0.0}, "--alpha-min"),
        ({"backend": "gpu"}, "--backend"),
        ({"chunk": 0}, "--chunk"),
        ({"steps": 100_000, "dims": 2}, "--steps 1000 or fewer"),
        ({"steps": 2_000_000, "dims": 1}, "--steps 1000000 or fewer"),
    ],
)
def test_bad_settings_are_one_line_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(DiagnosticsError, match=message) as info:
        check_config(LandscapeConfig(**kwargs))
    assert "\n" not in str(info.value)
    ctx, *_ = quadratic_problem()
    with pytest.raises(DiagnosticsError, match=message):  # the analyzer checks a config built in Python
        analyze_landscape(LandscapeConfig(**kwargs), ctx)


def test_a_default_plane_too_large_is_refused_before_anything_is_allocated(monkeypatch) -> None:
    ctx, *_ = quadratic_problem()

    def no_directions(*args, **kwargs):
        raise AssertionError("the grid size is checked before the directions are drawn")

    monkeypatch.setattr(landscape_module, "slice_directions", no_directions)
    with pytest.raises(DiagnosticsError, match=r"2-D grid of --steps 100000 has 10,000,000,000 points") as info:
        analyze_landscape(LandscapeConfig(steps=100_000), ctx)  # dims unset: a plane around one checkpoint
    assert "\n" not in str(info.value) and "--steps 1000 or fewer" in str(info.value)
    with pytest.raises(DiagnosticsError, match="--steps 1000000 or fewer"):  # the line is 1-D
        analyze_interpolation(LandscapeConfig(steps=2_000_000), ctx, ctx)


def test_a_grid_whose_records_do_not_fit_in_memory_is_refused(monkeypatch) -> None:
    from diagnostics.linalg import memory

    monkeypatch.setattr(memory, "available_bytes", lambda device: 1024**2)  # 1 MiB free
    with pytest.raises(DiagnosticsError, match="not enough memory on cpu.*use a smaller --steps"):
        landscape_module.check_grid_memory(landscape_module.check_grid_points(1000, 2))
    landscape_module.check_grid_memory(landscape_module.check_grid_points(10, 1))  # 40 KiB fits


def test_grid_points_with_a_non_finite_loss_are_noted() -> None:
    ctx, *_ = quadratic_problem()
    res = analyze_landscape(LandscapeConfig(dims=1, steps=5, span=1e200), ctx)  # float64 overflows at the ends
    losses = [r.value for r in res.records if r.metric == "loss"]
    bad = sum(not math.isfinite(v) for v in losses)
    assert 0 < bad < 5  # the centre is finite
    assert any(f"{bad} of 5 grid points have a non-finite loss" in n and "--span" in n for n in res.metadata["notes"])
    fine = analyze_landscape(LandscapeConfig(dims=1, steps=5, span=0.5), ctx)
    assert not any("non-finite" in n for n in fine.metadata["notes"])


def test_landscape_is_registered_for_sweeps() -> None:
    spec = all_analyzers()["landscape"]
    assert spec is ANALYZER and spec.config is LandscapeConfig and spec.run is run_landscape
    assert spec.checkpoints == (1, 2) and spec.resumable
    assert spec.make_config({"dims": 1, "steps": 7}).steps == 7
    with pytest.raises(DiagnosticsError, match=r"unknown option 'step' in \[landscape\]; did you mean 'steps'"):
        spec.make_config({"step": 7})


def test_choices_match_the_directions_module() -> None:
    from diagnostics import directions

    assert landscape_module.NORMALIZATIONS == directions.NORMALIZATIONS
    assert landscape_module.BACKENDS == directions.BACKENDS


def test_every_record_is_a_declared_metric_without_coordinates_in_group() -> None:
    declared = {m.name for m in ANALYZER.metrics}
    ctx, *_ = quadratic_problem(seed=5)
    a, b = scalar_context(-1.0, double_well), scalar_context(1.0, double_well)
    model, X, y = conv_bn_problem()
    results = [
        run_landscape(LandscapeConfig(dims=1, steps=3), ctx),
        run_landscape(LandscapeConfig(steps=5), a, others=[b]),
        run_landscape(LandscapeConfig(dims=2, steps=3), model_context(model, X, y)),
    ]
    for res in results:
        assert {r.metric for r in res.records} <= declared
        assert all(r.group is None for r in res.records)
        grid = res.artifacts["grid"]
        assert all(r.index is None or 0 <= r.index < len(grid) for r in res.records)
        for key in ("analyzer", "config", "seconds", "samples"):  # run_analyzer adds those
            assert key not in res.metadata
    assert "barrier" in {r.metric for r in results[1].records}
    assert results[1].metadata["barrier_definition"].startswith("barrier = max over alpha in [0, 1]")


class DictStore:
    """An in-memory store of partial work (the CLI's is a file)."""

    def __init__(self) -> None:
        self.saved: dict[str, object] = {}
        self.saves = 0

    def load(self, key: str) -> object:
        return self.saved.get(key)

    def save(self, key: str, data: object) -> None:
        self.saved = {key: json.loads(json.dumps(data))}  # what a JSON file would give back
        self.saves += 1


def test_run_landscape_resumes_from_a_store_under_its_own_key() -> None:
    ctx, *_ = quadratic_problem(seed=6)
    cfg = LandscapeConfig(dims=2, steps=4, chunk=5)
    store = DictStore()
    full = run_landscape(cfg, ctx, resume=store)
    key = landscape_key(cfg, ctx)
    assert list(store.saved) == [key] and store.saves == 4  # 16 points in chunks of 5
    assert len(store.saved[key]["points"]) == 16
    # keep every other point, as if interrupted: the rest is evaluated, the kept ones are not
    store.saved[key]["points"] = {i: v for i, v in store.saved[key]["points"].items() if int(i) % 2 == 0}
    again = run_landscape(cfg, ctx, resume=store)
    assert again.metadata["points_resumed"] == 8 and again.metadata["points_evaluated"] == 8
    np.testing.assert_allclose([r.value for r in again.records], [r.value for r in full.records], rtol=1e-13)
    # the line between two checkpoints has another key: nothing is reused from the slice
    a, b = scalar_context(-1.0, double_well), scalar_context(1.0, double_well)
    line = run_landscape(LandscapeConfig(steps=5), a, others=[b], resume=DictStore())
    assert line.metadata["points_resumed"] == 0 and line.metadata["mode"] == "interpolation"
    assert landscape_key(LandscapeConfig(steps=5), a, b) != landscape_key(LandscapeConfig(steps=5), a)
    bad = DictStore()
    bad.saved = {landscape_key(cfg, ctx): {"points": "garbage"}}
    with pytest.raises(DiagnosticsError, match="not readable"):
        run_landscape(cfg, ctx, resume=bad)


def test_slice_options_are_refused_on_the_line_between_two_checkpoints() -> None:
    a, b = scalar_context(-1.0, double_well), scalar_context(1.0, double_well)
    with pytest.raises(DiagnosticsError, match="--direction"):
        run_landscape(LandscapeConfig(direction="hessian"), a, others=[b])
    with pytest.raises(DiagnosticsError, match="1-D"):
        run_landscape(LandscapeConfig(dims=2), a, others=[b])
    line = run_landscape(LandscapeConfig(dims=1, steps=3), a, others=[b])  # dims 1 is the line itself
    assert line.metadata["grid"]["points"] == 3


def tiny_classifier_context(dtype: torch.dtype) -> Context:
    """The tiny classifier of ``tinymodels`` at its own weights, analysed in ``dtype``."""
    import tinymodels as tm

    X, y = tm.tiny_data()
    return tm.tiny_context([(X.to(dtype), y)], dtype=dtype)


def precision_notes(res) -> list[str]:
    return [n for n in res.metadata["notes"] if "--span" in n]


@pytest.mark.parametrize("dims", [1, 2])
@pytest.mark.parametrize("span", [1e-320, 1e-12])
def test_a_span_below_the_float32_precision_of_the_weights_is_a_note(span: float, dims: int) -> None:
    res = analyze_landscape(LandscapeConfig(span=span, steps=5, dims=dims), tiny_classifier_context(torch.float32))
    losses = res.artifacts["grid"]["loss"]
    assert (losses == res.metadata["loss_centre"]).all()
    assert precision_notes(res) == [
        f"--span {span!r} is below the float32 precision of the weights: no grid point changes any weight, so every "
        "point's loss is the centre's; use a larger --span or --dtype float64"
    ]


def test_a_span_below_the_float64_precision_does_not_suggest_float64() -> None:
    res = analyze_landscape(LandscapeConfig(span=1e-320, steps=3, dims=2), tiny_classifier_context(F64))
    assert precision_notes(res) == [
        "--span 1e-320 is below the float64 precision of the weights: no grid point changes any weight, so every "
        "point's loss is the centre's; use a larger --span"
    ]


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_a_normal_span_has_no_precision_note(dtype: torch.dtype) -> None:
    for dims in (1, 2):
        res = analyze_landscape(LandscapeConfig(span=0.5, steps=5, dims=dims), tiny_classifier_context(dtype))
        assert precision_notes(res) == []


class Ignores(nn.Module):
    """Constant logits: the loss does not depend on the parameter ``u`` at all."""

    def __init__(self) -> None:
        super().__init__()
        self.u = nn.Parameter(torch.randn(2, 3, generator=torch.Generator().manual_seed(0), dtype=F64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(x.shape[0], 3, dtype=x.dtype)


def test_weights_that_move_with_a_flat_loss_get_the_same_loss_note() -> None:
    X = torch.zeros(4, 2, dtype=F64)
    res = analyze_landscape(
        LandscapeConfig(span=1.0, steps=3, dims=2), model_context(Ignores(), X, torch.zeros(4).long())
    )
    assert precision_notes(res) == [
        f"every grid point has the same loss ({math.log(3):.6g}): --span 1.0 moves the weights by less than the "
        "float64 loss resolves, or the loss does not depend on these directions; use a larger --span"
    ]
