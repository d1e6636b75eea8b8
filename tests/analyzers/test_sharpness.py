"""Sharpness against exact answers on quadratics; EoS thresholds and Adam's preconditioned sharpness."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.optimize import brentq
from torch import nn

from diagnostics.analyzers.eos import eos_threshold
from diagnostics.analyzers.registry import all_analyzers
from diagnostics.analyzers.sharpness import (
    SharpnessConfig,
    adam_preconditioner,
    analyze_sharpness,
    projected_ascent,
)
from diagnostics.binding import resolve_binding
from diagnostics.checkpoint import load_checkpoint, save_checkpoint
from diagnostics.context import Context, build_context
from diagnostics.errors import DiagnosticsError
from diagnostics.examples.digits import build_mlp, train_data, train_gd
from diagnostics.linalg.operator import DenseOperator, dense_hessian, preconditioned
from diagnostics.operators import hessian_operator
from diagnostics.spec import check_config
from tinymodels import Vector

F64 = torch.float64


def quadratic(seed: int = 0, n: int = 8, offset: float = 0.0, lam: torch.Tensor | None = None):
    """``L(v) = (v - c)^T H (v - c) / 2`` with a known spectrum; the context sits at ``c + offset * z``."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    if lam is None:
        lam = torch.linspace(4.0, -0.6, n, dtype=F64)
        lam[1] = 2.0  # gap: lambda_2 / lambda_1 = 1/2
    H = Q @ torch.diag(lam) @ Q.T
    H = 0.5 * (H + H.T)
    c = torch.randn(n, generator=g, dtype=F64)
    w = c + offset * torch.randn(n, generator=g, dtype=F64)

    def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        d = out - c
        return 0.5 * d @ H @ d

    m = Vector(w).eval()
    ctx = Context(
        model=m,
        params={"v": m.v.detach()},
        frozen={},
        batches=[(torch.zeros(1, 1, dtype=F64), torch.zeros(1, dtype=F64))],
        loss_fn=loss_fn,
        device=torch.device("cpu"),
        dtype=F64,
        loss_name="quadratic",
    )
    return ctx, H, c, w, lam


def trust_region_value(H: torch.Tensor, g: torch.Tensor, rho: float) -> float:
    """``max_{||e|| <= rho} g.e + e^T H e / 2`` by the secular equation (easy case, H indefinite ok)."""
    ev, V = np.linalg.eigh(H.numpy())
    gt = V.T @ g.numpy()
    top = ev.max()
    mu = brentq(lambda m: np.sqrt(((gt / (m - ev)) ** 2).sum()) - rho, top + 1e-14, top + 1e6)
    e = V @ (gt / (mu - ev))
    return float(g.numpy() @ e + 0.5 * e @ H.numpy() @ e)


def metric(result, name: str):
    found = [r for r in result.records if r.metric == name]
    assert len(found) == 1, [r.metric for r in result.records]
    return found[0]


# ------------------------------------------------------------------------------------ worst case
def test_worst_case_at_a_minimum_is_half_rho_squared_lambda_max() -> None:
    ctx, _, _, _, lam = quadratic()
    rho = 0.05
    res = analyze_sharpness(SharpnessConfig(kind="worst", rho=rho, eos=False), ctx)
    exact = 0.5 * rho**2 * float(lam.max())
    assert metric(res, "sharpness_worst").value == pytest.approx(exact, rel=1e-6)
    runs = res.metadata["worst"]["runs"]
    assert len(runs) == 3 and all(r["converged"] for r in runs)
    assert all(r["radius"] == pytest.approx(rho, rel=1e-12) for r in runs)  # the maximiser is on the sphere
    assert res.metadata["worst"]["one_step"] is None  # zero gradient: no SAM step, random starts only


def test_worst_case_away_from_the_minimum_is_the_trust_region_value() -> None:
    ctx, H, c, w, _ = quadratic(seed=1, offset=0.3)
    rho = 0.2
    res = analyze_sharpness(SharpnessConfig(kind="worst", rho=rho, eos=False), ctx)
    exact = trust_region_value(H, H @ (w - c), rho)
    assert metric(res, "sharpness_worst").value == pytest.approx(exact, rel=1e-8)
    # the one-step SAM approximation rho g/||g|| falls short of the solved value
    one_step = res.metadata["worst"]["one_step"]
    assert one_step < exact * (1 - 1e-3)


def test_projected_ascent_on_an_indefinite_quadratic() -> None:
    A = torch.diag(torch.tensor([-3.0, 1.0, 0.5], dtype=F64))

    def fg(u):
        return float(0.5 * u @ A @ u), A @ u

    res = projected_ascent(fg, torch.tensor([0.6, 0.6, 0.5], dtype=F64), 1.0, max_iter=200, tol=1e-12)
    assert res.value == pytest.approx(0.5, rel=1e-9) and res.converged
    assert abs(float(res.u[1])) == pytest.approx(1.0, rel=1e-6)


def test_projected_ascent_refuses_a_non_finite_loss_instead_of_calling_it_converged() -> None:
    from diagnostics.errors import DiagnosticsError

    def fg(u):  # NaN beyond radius 0.5: "no ascent step" would stop at the start and report its value
        value = float(u @ u) if float(u.norm()) <= 0.5 else math.nan
        return value, 2 * u

    with pytest.raises(DiagnosticsError, match="--rho") as info:
        projected_ascent(fg, torch.tensor([0.3, 0.0], dtype=F64), 1.0)
    assert "\n" not in str(info.value) and "nan" in str(info.value)


@pytest.mark.parametrize("kind", ["worst", "adaptive", "average"])
def test_a_loss_that_overflows_in_the_ball_is_an_error_not_zero(kind: str) -> None:
    from diagnostics.errors import DiagnosticsError

    ctx, *_ = quadratic()  # float64: (rho^2 lambda / 2) overflows for rho = 1e200
    with pytest.raises(DiagnosticsError, match=r"the loss is (nan|inf) .*smaller --(rho|sigma)") as info:
        analyze_sharpness(SharpnessConfig(kind=[kind], rho=1e200, draws=4, eos=False), ctx)
    assert "\n" not in str(info.value)


def test_ascent_norms_do_not_overflow_in_float32() -> None:
    from diagnostics.analyzers.sharpness import project_ball, safe_norm

    u = torch.full((4,), 1e30, dtype=torch.float32)  # ||u||^2 = 4e60 overflows float32
    assert safe_norm(u) == pytest.approx(2e30, rel=1e-6)
    assert safe_norm(project_ball(u, 1e29)) == pytest.approx(1e29, rel=1e-6)


def test_adaptive_sharpness_is_the_scaled_top_eigenvalue() -> None:
    ctx, H, _, w, _ = quadratic(seed=2)
    rho, eta = 0.3, 0.01
    res = analyze_sharpness(SharpnessConfig(kind="adaptive", rho=rho, adaptive_eta=eta, eos=False), ctx)
    T = torch.diag(w.abs() + eta)
    exact = 0.5 * rho**2 * float(torch.linalg.eigvalsh(T @ H @ T).max())
    assert metric(res, "sharpness_adaptive").value == pytest.approx(exact, rel=1e-6)
    assert res.metadata["adaptive"]["scaling"] == "T_w = |w| + eta"


def test_an_adaptive_eta_beyond_the_dtype_is_blamed_on_the_option_not_the_checkpoint() -> None:
    ctx, *_ = quadratic(seed=2)
    ctx = replace(ctx, params={"v": ctx.params["v"].float()}, dtype=torch.float32)
    with pytest.raises(DiagnosticsError) as err:  # |w| + 1e308 is inf in float32: every scaled point was NaN
        analyze_sharpness(SharpnessConfig(kind="adaptive", rho=0.1, adaptive_eta=1e308, eos=False), ctx)
    msg = str(err.value)
    assert "--adaptive-eta 1e+308 overflows float32" in msg and "smaller --adaptive-eta" in msg
    assert "checkpoint" not in msg and "\n" not in msg
    ctx64, H, _, w, _ = quadratic(seed=2)  # the same eta in float64 is a number: the closed form holds
    res = analyze_sharpness(SharpnessConfig(kind="adaptive", rho=1e-150, adaptive_eta=1e150, eos=False), ctx64)
    Tn = torch.diag((w.abs() + 1e150) / 1e150)  # T_w / eta; rho * eta = 1
    exact = 0.5 * float(torch.linalg.eigvalsh(Tn @ H @ Tn).max())
    assert metric(res, "sharpness_adaptive").value == pytest.approx(exact, rel=1e-6)


def test_adaptive_sharpness_is_invariant_to_rescaling_for_eta_zero() -> None:
    """ASAM's point: scaling coordinate i of the weights by a_i (and the loss accordingly) changes nothing."""
    ctx, H, c, w, _ = quadratic(seed=3)
    a = torch.tensor([0.5, 2.0, 3.0, 1.0, 0.2, 4.0, 1.5, 0.7], dtype=F64)

    def scaled_loss(out, y):
        d = out / a - c
        return 0.5 * d @ H @ d

    m = Vector(w * a).eval()
    other = Context(
        model=m,
        params={"v": m.v.detach()},
        frozen={},
        batches=ctx.batches,
        loss_fn=scaled_loss,
        device=ctx.device,
        dtype=F64,
    )
    cfg = SharpnessConfig(kind="adaptive", rho=0.2, adaptive_eta=0.0, eos=False)
    v1 = metric(analyze_sharpness(cfg, ctx), "sharpness_adaptive").value
    v2 = metric(analyze_sharpness(cfg, other), "sharpness_adaptive").value
    assert v2 == pytest.approx(v1, rel=1e-6)
    plain = SharpnessConfig(kind="worst", rho=0.2, eos=False)
    p1 = metric(analyze_sharpness(plain, ctx), "sharpness_worst").value
    p2 = metric(analyze_sharpness(plain, other), "sharpness_worst").value
    assert abs(p2 - p1) > 0.1 * p1  # the plain ball is not invariant


# ---------------------------------------------------------------------------------- average case
def test_average_case_converges_to_half_sigma_squared_trace() -> None:
    ctx, H, _, _, lam = quadratic(seed=4, offset=0.5)  # away from the minimum: antithetic pairs cancel g.e
    sigma, draws = 0.1, 4000
    res = analyze_sharpness(SharpnessConfig(kind="average", sigma=sigma, draws=draws, eos=False, chunk=1024), ctx)
    rec = metric(res, "sharpness_average")
    exact = 0.5 * sigma**2 * float(lam.sum())
    # each pair gives e^T H e / 2 exactly: variance sigma^4 ||H||_F^2 / 2
    se_theory = sigma**2 * float(torch.linalg.norm(H)) / math.sqrt(2 * draws)
    assert rec.stderr == pytest.approx(se_theory, rel=0.05)
    assert abs(rec.value - exact) <= 3 * rec.stderr
    small = analyze_sharpness(SharpnessConfig(kind="average", sigma=sigma, draws=400, eos=False, chunk=1024), ctx)
    assert metric(small, "sharpness_average").stderr == pytest.approx(rec.stderr * math.sqrt(10), rel=0.15)


def test_average_case_default_sigma_is_rho_over_sqrt_d() -> None:
    ctx, *_ = quadratic(seed=5)
    res = analyze_sharpness(SharpnessConfig(kind="average", rho=0.4, draws=10, eos=False), ctx)
    assert res.metadata["average"]["sigma"] == pytest.approx(0.4 / math.sqrt(8))
    assert res.metadata["average"]["sigma_rule"] == "rho / sqrt(d)"


def test_all_kinds_and_seeded_reproducibility() -> None:
    ctx, *_ = quadratic(seed=6, offset=0.2)
    cfg = SharpnessConfig(kind="all", rho=0.1, draws=20, eos=False)
    a, b = analyze_sharpness(cfg, ctx), analyze_sharpness(cfg, ctx)
    assert [r.metric for r in a.records] == ["sharpness_worst", "sharpness_adaptive", "sharpness_average"]
    assert [r.value for r in a.records] == [r.value for r in b.records]
    ctx.seed = 1
    c = analyze_sharpness(cfg, ctx)
    assert metric(c, "sharpness_average").value != metric(a, "sharpness_average").value


# ------------------------------------------------------------------------------ edge of stability
def _context(path: Path, dtype: str = "float64") -> Context:
    ck = load_checkpoint(path)
    binding = resolve_binding(ck.factories, model=None, data=None, loss=None, config={}, trust_checkpoint=False)
    return build_context(ck, binding, dtype=dtype)


def test_eos_threshold_for_gradient_descent_and_heavy_ball(tmp_path: Path) -> None:
    gd = train_gd(tmp_path / "gd", lr=0.3, steps=1, save_every=1, width=4)
    res = analyze_sharpness(SharpnessConfig(kind="average", draws=2), _context(gd[-1]))
    assert metric(res, "eos_threshold").value == pytest.approx(2 / 0.3)
    assert res.metadata["eos"]["kind"] == "gd"
    hb = train_gd(tmp_path / "hb", lr=0.3, steps=1, save_every=1, width=4, momentum=0.9)
    res = analyze_sharpness(SharpnessConfig(kind="average", draws=2), _context(hb[-1]))
    thr = eos_threshold(0.3, {"name": "SGD", "hyperparameters": {"momentum": 0.9}})
    assert metric(res, "eos_threshold").value == pytest.approx((2 + 2 * 0.9) / 0.3) == pytest.approx(thr.value)
    res = analyze_sharpness(SharpnessConfig(kind="average", draws=2, lr=0.1), _context(gd[-1]))
    assert metric(res, "eos_threshold").value == pytest.approx(2 / 0.1)  # --lr overrides


@pytest.mark.parametrize("lr", [math.nan, math.inf, -math.inf, -0.1, 0.0, None])
def test_a_learning_rate_that_is_no_step_size_gives_no_threshold(lr) -> None:
    from diagnostics.analyzers.eos import eos_notes, lr_note

    assert eos_threshold(lr, {}) is None
    assert eos_threshold(lr, {"name": "Adam", "hyperparameters": {"betas": [0.9, 0.999]}}) is None
    assert "pass --lr" in lr_note(lr) and "\n" not in lr_note(lr)
    corrupt = lr is not None and lr != 0
    assert eos_notes(lr) == ([lr_note(lr)] if corrupt else [])
    assert lr_note(0.1) is None and eos_notes(0.1) == []


@pytest.mark.parametrize("lr, word", [(math.nan, "not a finite number"), (-1.0, "negative")])
def test_sharpness_with_a_corrupt_checkpoint_learning_rate_notes_it(lr: float, word: str) -> None:
    ctx, *_ = quadratic()
    ctx.checkpoint_metadata = {"lr": lr}
    res = analyze_sharpness(SharpnessConfig(kind="worst", rho=0.1), ctx)
    assert [r.metric for r in res.records] == ["sharpness_worst"]  # no NaN (or negative) eos_threshold
    assert any(word in n and "--lr" in n for n in res.metadata["notes"])
    assert res.metadata["eos"]["lr"] == (str(lr) if math.isnan(lr) else lr)
    res = analyze_sharpness(SharpnessConfig(kind="worst", rho=0.1, lr=0.5), ctx)  # --lr overrides
    assert metric(res, "eos_threshold").value == pytest.approx(2 / 0.5)


def _adam_checkpoint(
    tmp_path: Path, save_state: bool = True, amsgrad: bool = False, group_lrs: tuple[float, float] | None = None
) -> tuple[Path, list, dict]:
    """Adam at lr 0.01 for 7 steps on the digits MLP. With ``group_lrs``, over two param groups (the first layer,
    the rest) whose learning rates are then set to ``group_lrs`` (as a schedule leaves them; 0 at the end of a
    linear decay)."""
    model = build_mlp(width=3, depth=1, seed=0)
    X, y = train_data(80)
    params = list(model.parameters())
    groups = [{"params": params[:2]}, {"params": params[2:]}] if group_lrs else params
    opt = torch.optim.Adam(groups, lr=0.01, betas=(0.8, 0.99), eps=1e-6, amsgrad=amsgrad)
    for _ in range(7):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
    for group, lr in zip(opt.param_groups, group_lrs or ()):
        group["lr"] = lr
    path = save_checkpoint(
        tmp_path / "adam.pt",
        model,
        step=7,
        optimizer=opt,
        model_factory="diagnostics.examples.digits:build_mlp",
        model_kwargs={"width": 3, "depth": 1},
        data_factory="diagnostics.examples.digits:train_data",
        data_kwargs={"n": 80},
        loss="cross_entropy",
        save_optimizer_state=save_state,
    )
    return path, params, opt.state


def test_adam_preconditioned_sharpness_matches_the_dense_reference(tmp_path: Path) -> None:
    path, params, state = _adam_checkpoint(tmp_path)
    ctx = _context(path)
    res = analyze_sharpness(SharpnessConfig(kind="average", draws=2, eig_tol=1e-6), ctx)
    # P from the live optimizer: (1 - b1^t) (sqrt(v / (1 - b2^t)) + eps)
    b1, b2, eps = 0.8, 0.99, 1e-6
    P = torch.cat(
        [
            (
                (1 - b1 ** float(state[p]["step"])) * ((state[p]["exp_avg_sq"].double() / (1 - b2**7)).sqrt() + eps)
            ).reshape(-1)
            for p in params
        ]
    )
    H = dense_hessian(hessian_operator(ctx))
    S = torch.diag(P.rsqrt())
    exact = float(torch.linalg.eigvalsh(S @ H @ S).max())
    rec = metric(res, "preconditioned_eigenvalue")
    assert rec.value == pytest.approx(exact, rel=1e-6)  # |lambda - theta| <= error bound <= tol |theta|
    assert rec.stderr <= 1e-6 * rec.value
    threshold = (2 + 2 * b1) / ((1 - b1) * 0.01)
    assert metric(res, "eos_threshold").value == pytest.approx(threshold)
    assert metric(res, "eos_ratio").value == pytest.approx(rec.value / threshold, rel=1e-12)
    assert res.metadata["eos"]["preconditioner"]["steps"] == [7.0]
    torch.testing.assert_close(adam_preconditioner(ctx, 0.01)[0], P, rtol=1e-12, atol=0)


def test_amsgrad_uses_the_running_maximum(tmp_path: Path) -> None:
    path, params, state = _adam_checkpoint(tmp_path, amsgrad=True)
    P, _ = adam_preconditioner(_context(path), 0.01)
    ref = torch.cat(
        [
            ((1 - 0.8**7) * ((state[p]["max_exp_avg_sq"].double() / (1 - 0.99**7)).sqrt() + 1e-6)).reshape(-1)
            for p in params
        ]
    )
    torch.testing.assert_close(P, ref, rtol=1e-12, atol=0)


def test_adam_without_saved_state_explains_what_is_missing(tmp_path: Path) -> None:
    path, _, _ = _adam_checkpoint(tmp_path, save_state=False)
    res = analyze_sharpness(SharpnessConfig(kind="average", draws=2), _context(path))
    assert metric(res, "eos_threshold").value == pytest.approx((2 + 2 * 0.8) / ((1 - 0.8) * 0.01))
    assert not [r for r in res.records if r.metric == "preconditioned_eigenvalue"]
    assert any("second moments" in n for n in res.metadata["notes"])


def test_param_groups_at_learning_rate_zero_are_left_out_of_the_preconditioned_sharpness(tmp_path: Path) -> None:
    path, params, state = _adam_checkpoint(tmp_path, group_lrs=(0.01, 0.0))
    ctx = _context(path)
    moving = list(ctx.params)[:2]
    res = analyze_sharpness(SharpnessConfig(kind="average", draws=2, eig_tol=1e-6, lr=0.01), ctx)
    # the exact answer over the parameters Adam still moves: S H[moving, moving] S
    sub = ctx.restrict(names=moving)
    P = torch.cat(
        [
            ((1 - 0.8**7) * ((state[p]["exp_avg_sq"].double() / (1 - 0.99**7)).sqrt() + 1e-6)).reshape(-1)
            for p in params[:2]
        ]
    )
    S = torch.diag(P.rsqrt())
    exact = float(torch.linalg.eigvalsh(S @ dense_hessian(hessian_operator(sub)) @ S).max())
    assert metric(res, "preconditioned_eigenvalue").value == pytest.approx(exact, rel=1e-6)
    assert res.metadata["eos"]["still_parameters"] == sum(p.numel() for p in params[2:])
    assert any("learning rate 0" in n and "other parameters" in n for n in res.metadata["notes"])


def test_every_param_group_at_learning_rate_zero_gives_a_note_not_a_crash(tmp_path: Path) -> None:
    path, _, _ = _adam_checkpoint(tmp_path, group_lrs=(0.0, 0.0))
    ctx = _context(path)
    assert ctx.lr == 0.0
    res = analyze_sharpness(SharpnessConfig(kind="average", draws=2), ctx)  # the checkpoint's own lr: 0
    assert not [r for r in res.records if r.metric.startswith(("eos", "preconditioned"))]
    assert "learning rate 0.0 at this checkpoint" in res.metadata["eos"]["note"]
    res = analyze_sharpness(SharpnessConfig(kind="average", draws=2, lr=0.01), ctx)  # a step size to compare with
    assert metric(res, "eos_threshold").value == pytest.approx((2 + 2 * 0.8) / ((1 - 0.8) * 0.01))
    assert not [r for r in res.records if r.metric == "preconditioned_eigenvalue"]
    assert any("every analysed parameter" in n for n in res.metadata["notes"])


def test_preconditioned_operator_is_S_A_S() -> None:
    g = torch.Generator().manual_seed(0)
    A = torch.randn(5, 5, generator=g, dtype=F64)
    A = A + A.T
    s = torch.rand(5, generator=g, dtype=F64) + 0.5
    op = preconditioned(DenseOperator(A), s**-2)  # D^-1/2 A D^-1/2 with D^-1/2 = diag(s)
    V = torch.randn(5, 3, generator=g, dtype=F64)
    torch.testing.assert_close(op.matmat(V), torch.diag(s) @ A @ torch.diag(s) @ V)
    torch.testing.assert_close(op.matvec(V[:, 0]), torch.diag(s) @ A @ torch.diag(s) @ V[:, 0])
    assert op.matvec_count == 4 and op.dim == 5 and op.dtype == F64


# ---------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rho": 0.0}, "--rho"),
        ({"rho": -1.0}, "--rho"),
        ({"rho": float("nan")}, "--rho"),
        ({"kind": "sharpest"}, "--kind"),
        ({"kind": "worst,bogus"}, "--kind"),
        ({"sigma": 0.0}, "--sigma"),
        ({"draws": 1}, "--draws"),
        ({"restarts": 0}, "--restarts"),
        ({"lr": -0.1}, "--lr"),
    ],
)
def test_bad_settings_are_one_line_errors(kwargs: dict, message: str) -> None:
    from diagnostics.errors import DiagnosticsError

    with pytest.raises(DiagnosticsError, match=message) as info:
        check_config(SharpnessConfig(**kwargs))
    assert "\n" not in str(info.value)


def test_sharpness_is_registered_for_sweeps() -> None:
    spec = all_analyzers()["sharpness"]
    assert spec.make_config({"kind": "worst,average", "rho": 0.1}).kinds == ["worst", "average"]


def test_a_ball_below_the_loss_rounding_is_noted() -> None:
    ctx, *_ = quadratic(seed=4, offset=1.0)  # away from the minimum: L(w) ~ 1, so float32 rounds at ~1e-7
    ctx32 = replace(ctx, params={"v": ctx.params["v"].float()}, dtype=torch.float32)
    res = analyze_sharpness(SharpnessConfig(kind="all", rho=1e-12, draws=4, eos=False), ctx32)
    notes = res.metadata["notes"]
    for label in ("worst-case", "adaptive", "average"):
        [note] = [n for n in notes if n.startswith(f"{label} sharpness")]
        assert "within the float32 rounding of the loss" in note and "--dtype float64" in note
    res = analyze_sharpness(SharpnessConfig(kind="all", rho=0.5, draws=4, eos=False), ctx32)
    assert not [n for n in res.metadata["notes"] if "rounding" in n]
    res = analyze_sharpness(SharpnessConfig(kind="worst", rho=1e-12, eos=False), ctx)  # float64 resolves it
    assert metric(res, "sharpness_worst").value > 0 and not res.metadata["notes"]
