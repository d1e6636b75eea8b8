"""Gauss-Newton, Fisher, empirical-Fisher and functional-Hessian operators against explicit float64 matrices.

References are built without the code under test: ``J`` by ``torch.func.jacrev``, the output Hessian
``H_l`` and the Hessian by ``torch.autograd.functional.hessian``, per-sample gradients by a plain loop of
``torch.autograd.grad``; then ``GGN = J^T H_l J``, ``EF = G^T G / N``, ``F = J^T diag(p) J`` (log-probability
outputs) and their ``numpy.linalg.eigh`` spectra.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import tinymodels as tm
from curvature_refs import (
    build_logsoftmax,
    dense_jacobian,
    dense_loss_hessian,
    dense_output_hessian,
    dense_per_sample_grads,
    eig_desc,
    flat_params,
    unflat,
)
from curvature_refs import dense_ggn as _dense_ggn
from diagnostics.binding import LOSSES
from diagnostics.errors import DiagnosticsError
from diagnostics.linalg import products
from diagnostics.linalg.curvature import (
    EmpiricalFisherOperator,
    FunctionalHessianOperator,
    GaussNewtonOperator,
    SampledFisherCurvature,
    sampled_fisher_stderr,
)
from diagnostics.linalg.data import DataLoop
from diagnostics.linalg.lanczos import lanczos
from diagnostics.linalg.operator import dense_hessian, restricted
from diagnostics.linalg.products import ModelLoss, output_hessian
from diagnostics.operators import curvature_operator, hessian_operator, model_loss
from freshpy import run_fresh

F64 = torch.float64


make_ctx = tm.tiny_context


def data(n=23, classes=3):
    X, y = tm.tiny_data(n)
    return X.double(), y % classes


def dense_ggn(ctx, batches):
    return _dense_ggn(ctx, batches)


def batches_of(X, y, size):
    return [(X[i : i + size], y[i : i + size]) for i in range(0, len(y), size)]


# ------------------------------------------------------------------------------- closed forms
@pytest.mark.parametrize(
    "name,shape,targets",
    [
        ("cross_entropy", (6, 4), "int"),
        ("cross_entropy", (6, 4), "ignore"),
        ("cross_entropy", (6, 4), "probs"),
        ("cross_entropy", (3, 4, 5), "int"),
        ("cross_entropy", (4,), "scalar"),
        ("mse", (6, 4), "float"),
        ("mse", (6, 4), "int"),
        ("bce_with_logits", (6, 4), "float"),
    ],
)
def test_closed_form_output_hessians_equal_autograd(name, shape, targets) -> None:
    g = torch.Generator().manual_seed(3)
    z = torch.randn(*shape, dtype=F64, generator=g)
    if targets == "int":
        y = torch.randint(0, shape[1] if len(shape) > 1 else shape[0], (shape[0], *shape[2:]), generator=g)
    elif targets == "ignore":
        y = torch.randint(0, shape[1], (shape[0],), generator=g)
        y[[1, 4]] = -100
    elif targets == "probs":
        y = torch.softmax(torch.randn(*shape, dtype=F64, generator=g), dim=1)
    elif targets == "scalar":
        y = torch.tensor(2)
    else:
        y = torch.rand(*shape, dtype=F64, generator=g)
    loss = LOSSES[name]
    H = dense_output_hessian(loss, z, y)
    U = torch.randn(3, *shape, dtype=F64, generator=g)
    closed = products.OUTPUT_HESSIANS[name](z, (None, y))(U)
    auto = products.autograd_output_hessian(loss)(z, (None, y))(U)
    ref = (H @ U.reshape(3, -1).T).T.reshape(U.shape)
    assert torch.allclose(closed, ref, rtol=1e-12, atol=1e-14)
    assert torch.allclose(auto, ref, rtol=1e-12, atol=1e-14)


def test_output_hessian_picks_autograd_for_a_custom_loss() -> None:
    def huber(z, y):
        return F.huber_loss(z, y.to(z.dtype).reshape(z.shape), delta=0.5)

    z = torch.randn(5, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(5, 2, dtype=F64)
    U = torch.randn(2, 5, 2, dtype=F64, generator=torch.Generator().manual_seed(1))
    got = output_hessian("huber", huber)(z, (None, y))(U)
    ref = (dense_output_hessian(huber, z, y) @ U.reshape(2, -1).T).T.reshape(U.shape)
    assert torch.allclose(got, ref, atol=1e-14)


# ------------------------------------------------------------------------------------- GGN
@pytest.mark.parametrize("loss", ["cross_entropy", "mse", "bce_with_logits"])
@pytest.mark.parametrize("backend", ["forward", "reverse"])
def test_ggn_equals_explicit_jt_hl_j(loss, backend) -> None:
    X, y = data()
    if loss == "bce_with_logits":
        y = F.one_hot(y, 3).double()
    batches = batches_of(X, y, 5)  # ragged: 5, 5, 5, 5, 3
    ctx = make_ctx(batches, loss)
    ref = dense_ggn(ctx, batches)
    op = curvature_operator(ctx, "ggn", backend=backend)
    assert isinstance(op, GaussNewtonOperator) and op.kind == "ggn"
    G = dense_hessian(op)
    assert torch.allclose(G, ref, rtol=1e-10, atol=1e-12)
    assert op.hvp_count == op.dim and op.backend == backend
    # PSD for these convex losses, and not the Hessian
    assert np.linalg.eigvalsh(G.numpy()).min() > -1e-12
    assert not torch.allclose(G, dense_loss_hessian(ctx, batches), atol=1e-6)


def test_ggn_of_a_custom_loss_uses_autograd_and_matches() -> None:
    def huber(z, y):
        return F.huber_loss(z, F.one_hot(y, z.shape[1]).to(z.dtype), delta=0.3)

    X, y = data()
    batches = batches_of(X, y, 8)
    ctx = make_ctx(batches, huber)
    G = dense_hessian(curvature_operator(ctx, "ggn"))
    assert torch.allclose(G, dense_ggn(ctx, batches), rtol=1e-10, atol=1e-12)


def test_ggn_micro_batches_and_sum_over_shards_are_exact() -> None:
    X, y = data()
    ctx = make_ctx([(X, y)])
    ref = dense_ggn(ctx, [(X, y)])
    V = torch.randn(43, 3, dtype=F64, generator=torch.Generator().manual_seed(2))
    micro = curvature_operator(ctx, "ggn", micro_batch=4)
    assert torch.allclose(micro.matmat(V), ref @ V, rtol=1e-10, atol=1e-12)
    # two "processes" holding halves, the reduce summing their shares
    parts = [(X[:12], y[:12]), (X[12:], y[12:])]
    shares = []
    for part in parts:
        loop = DataLoop([part], [12 / 23 if part[1].shape[0] == 12 else 11 / 23])
        op = GaussNewtonOperator(
            model_loss(ctx), ctx.params, loop, curvature=output_hessian("cross_entropy", ctx.loss_fn)
        )
        shares.append(op.matmat(V))
    assert torch.allclose(shares[0] + shares[1], ref @ V, rtol=1e-10, atol=1e-12)


def test_ggn_block_by_names_is_the_restricted_block() -> None:
    X, y = data()
    ctx = make_ctx([(X, y)])
    full = curvature_operator(ctx, "ggn")
    sl = full.group_slices()["fc2.weight"]
    block = dense_hessian(curvature_operator(ctx, "ggn", names=["fc2.weight"]))
    assert torch.allclose(block, dense_hessian(restricted(full, sl)), atol=1e-13)
    assert torch.allclose(block, dense_ggn(ctx, [(X, y)])[sl, sl], atol=1e-12)


def test_ggn_of_the_last_layer_equals_its_hessian() -> None:
    # z = W h + b is linear in the last layer's weights: its Hessian block has no functional part
    X, y = data()
    ctx = make_ctx([(X, y)])
    names = ["fc2.weight", "fc2.bias"]
    G = dense_hessian(curvature_operator(ctx, "ggn", names=names))
    H = dense_hessian(hessian_operator(ctx, names=names))
    assert torch.allclose(G, H, rtol=1e-10, atol=1e-12)


def test_ggn_refuses_nll_and_non_tensor_outputs() -> None:
    X, y = data()
    with pytest.raises(DiagnosticsError, match="nll is linear"):
        curvature_operator(make_ctx([(X, y)], "nll"), "ggn")

    class DictOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return {"logits": self.fc(x)}

    ctx = make_ctx([(X, y)], lambda o, t: F.cross_entropy(o["logits"], t), model=DictOut())
    with pytest.raises(DiagnosticsError, match="return a tensor"):
        curvature_operator(ctx, "ggn")


# -------------------------------------------------------------------------------- Fisher
@pytest.mark.parametrize("loss", ["cross_entropy", "bce_with_logits", "mse"])
def test_fisher_is_the_ggn_where_the_identity_holds(loss) -> None:
    X, y = data()
    if loss == "bce_with_logits":
        y = F.one_hot(y, 3).double()
    ctx = make_ctx(batches_of(X, y, 7), loss)
    fisher = curvature_operator(ctx, "fisher")
    assert fisher.kind == "fisher" and "GGN" in fisher.fisher_rule
    Fm = dense_hessian(fisher)
    assert torch.allclose(Fm, dense_ggn(ctx, batches_of(X, y, 7)), rtol=1e-10, atol=1e-12)


def test_cross_entropy_fisher_equals_the_expected_outer_product_of_sampled_label_gradients() -> None:
    # definition of the Fisher: E_{y ~ softmax(z)} [g(y) g(y)^T], summed exactly over the classes
    X, y = data()
    ctx = make_ctx([(X, y)])
    total = torch.zeros(43, 43, dtype=F64)
    with torch.no_grad():
        p = torch.softmax(ctx.model(X), 1)
    for i in range(len(y)):
        for c in range(3):
            leaves = {n: t.clone().requires_grad_(True) for n, t in ctx.params.items()}
            loss = F.cross_entropy(functional_call(ctx.model, leaves, (X[i : i + 1],)), torch.tensor([c]))
            g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, list(leaves.values()))])
            total += p[i, c] * torch.outer(g, g) / len(y)
    assert torch.allclose(dense_hessian(curvature_operator(ctx, "fisher")), total, rtol=1e-10, atol=1e-12)


def exact_nll_fisher(ctx, X):
    """``(1/N) sum_i J_i^T diag(p_i) J_i`` for log-probability outputs ``z_i`` (``p_i = exp(z_i)``)."""
    J = dense_jacobian(ctx, X)
    with torch.no_grad():
        p = ctx.model(X).exp().reshape(-1)
    return J.T @ (p[:, None] * J) / X.shape[0]


def test_sampled_fisher_converges_to_the_exact_fisher_with_covering_errors() -> None:
    X, y = data()
    ctx = make_ctx(batches_of(X, y, 6), "nll", model=build_logsoftmax())
    exact = eig_desc(exact_nll_fisher(ctx, X))[:3]
    misses, z_scores = 0, []
    for seed in range(12):
        op = curvature_operator(ctx, "fisher", fisher_samples=64, generator=torch.Generator().manual_seed(seed))
        assert op.fisher_samples == 64 and isinstance(op.curvature, SampledFisherCurvature)
        res = lanczos(op, k_top=3, tol=1e-10, criterion="residual")
        se = sampled_fisher_stderr(op, res.eigenvectors).numpy()
        est = res.eigenvalues.numpy()
        assert np.all(se > 0) and np.all(se < 0.2 * est)
        z = (est - exact) / se
        z_scores.extend(z.tolist())
        misses += int(np.sum(np.abs(z) > 2.5))
    # ~1% of |z| > 2.5 for a correct standard error; a wrong one (x2 too small) misses ~20%
    assert misses <= 3, z_scores
    assert 0.5 < np.std(z_scores) < 1.6, np.std(z_scores)
    # more samples, closer: 1024 draws per input shrink the error ~4x against 64
    big = curvature_operator(ctx, "fisher", fisher_samples=1024, generator=torch.Generator().manual_seed(99))
    res = lanczos(big, k_top=3, tol=1e-10, criterion="residual")
    se = sampled_fisher_stderr(big, res.eigenvectors).numpy()
    assert np.all(np.abs(res.eigenvalues.numpy() - exact) <= 4 * se)


def test_sampled_fisher_is_deterministic_psd_and_seeded() -> None:
    X, y = data()
    ctx = make_ctx([(X, y)], "nll", model=build_logsoftmax(), seed=5)
    a = dense_hessian(curvature_operator(ctx, "fisher", fisher_samples=4))
    b = dense_hessian(curvature_operator(ctx, "fisher", fisher_samples=4))
    assert torch.equal(a, b)
    assert np.linalg.eigvalsh(a.numpy()).min() > -1e-12
    c = dense_hessian(curvature_operator(ctx, "fisher", fisher_samples=4, generator=torch.Generator().manual_seed(1)))
    assert not torch.allclose(a, c)


def test_sampled_fisher_refuses_what_has_no_predictive_distribution() -> None:
    X, y = data()

    def unnormalised(z, t):  # not a negative log-likelihood: exp(-loss) does not sum to 1 over classes
        return F.cross_entropy(z, t) + 0.5

    with pytest.raises(DiagnosticsError, match="not a normalised negative log-likelihood"):
        curvature_operator(make_ctx([(X, y)], unnormalised), "fisher")

    def regression(z, t):
        return ((z - t) ** 2).mean() * 3

    with pytest.raises(DiagnosticsError, match="integer class targets"):
        curvature_operator(make_ctx([(X, torch.randn(23, 3, dtype=F64))], regression), "fisher")


# ------------------------------------------------------------------------------ empirical Fisher
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_empirical_fisher_equals_explicit_per_sample_gradients(loss) -> None:
    X, y = data()
    batches = batches_of(X, y, 5)
    ctx = make_ctx(batches, loss)
    G = dense_per_sample_grads(ctx, batches)
    ref = G.T @ G / G.shape[0]
    op = curvature_operator(ctx, "empirical_fisher")
    assert isinstance(op, EmpiricalFisherOperator)
    assert torch.allclose(dense_hessian(op), ref, rtol=1e-10, atol=1e-13)
    micro = curvature_operator(make_ctx([(X, y)], loss), "empirical_fisher", micro_batch=3)
    assert torch.allclose(dense_hessian(micro), ref, rtol=1e-10, atol=1e-13)
    # rank <= N, trace = mean squared gradient norm
    assert abs(float(torch.trace(ref)) - float((G * G).sum(1).mean())) < 1e-12


def test_per_sample_gradients_fall_back_to_a_loop() -> None:
    X, y = data()
    ctx = make_ctx([(X, y)])

    def no_vmap_loss(params, batch):  # .item() inside has no vmap rule
        x, t = batch
        out = functional_call(ctx.model, params, (x,))
        return F.cross_entropy(out, t) * (1.0 + 0.0 * float(out.detach().sum().item() * 0))

    G = products.per_sample_gradients(no_vmap_loss, ctx.params, (X[:4], y[:4]))
    assert torch.allclose(G, dense_per_sample_grads(ctx, [(X[:4], y[:4])]), atol=1e-14)


# -------------------------------------------------------------------------------- H - GGN
def test_functional_hessian_is_the_operator_difference() -> None:
    X, y = data()
    batches = batches_of(X, y, 9)
    ctx = make_ctx(batches)
    op = curvature_operator(ctx, "functional")
    assert isinstance(op, FunctionalHessianOperator)
    D = dense_hessian(op)
    ref = dense_loss_hessian(ctx, batches) - dense_ggn(ctx, batches)
    assert torch.allclose(D, ref, rtol=1e-9, atol=1e-11)
    assert op.hvp_count == 43 and op.hessian.hvp_count == 43 and op.ggn.hvp_count == 43
    # indefinite: both signs
    ev = np.linalg.eigvalsh(ref.numpy())
    assert ev.min() < -1e-6 < 1e-6 < ev.max()


# ----------------------------------------------------------------------------- eigenvalues
@pytest.mark.parametrize("kind", ["ggn", "fisher", "empirical_fisher", "functional"])
def test_lanczos_top_eigenvalues_within_tolerance_and_bound(kind) -> None:
    X, y = data()
    batches = batches_of(X, y, 8)
    ctx = make_ctx(batches)
    refs = {
        "ggn": lambda: dense_ggn(ctx, batches),
        "fisher": lambda: dense_ggn(ctx, batches),
        "empirical_fisher": lambda: (lambda G: G.T @ G / G.shape[0])(dense_per_sample_grads(ctx, batches)),
        "functional": lambda: dense_loss_hessian(ctx, batches) - dense_ggn(ctx, batches),
    }
    exact = eig_desc(refs[kind]())
    res = lanczos(curvature_operator(ctx, kind), k_top=3, k_bottom=1, tol=1e-6)
    assert res.converged
    err = np.abs(res.eigenvalues.numpy() - exact[:3])
    assert np.all(err <= res.error_bounds.numpy() + 1e-12)
    assert np.all(err <= 1e-6 * np.abs(exact[:3]) + 1e-12)
    # the bottom one: the GGN and the (empirical) Fisher are singular here (softmax's shift invariance), zero a
    # multiple eigenvalue that Krylov methods see once; the residual covers the error (the gap-theorem bound,
    # whose gap comes from the Ritz values, need not: a note for lanczos.py)
    assert abs(float(res.bottom_eigenvalues[0]) - exact[-1]) <= float(res.bottom_residuals[0])


def test_gradient_of_a_data_operator_is_the_full_batch_gradient() -> None:
    X, y = data()
    batches = batches_of(X, y, 5)
    ctx = make_ctx(batches)
    names, w = flat_params(ctx)
    leaves = w.clone().requires_grad_(True)
    L = sum(
        (len(t) / 23) * ctx.loss_fn(functional_call(ctx.model, unflat(ctx, names, leaves), (x,)), t) for x, t in batches
    )
    (ref,) = torch.autograd.grad(L, leaves)
    for kind in ("hessian", "ggn", "empirical_fisher", "functional"):
        assert torch.allclose(curvature_operator(ctx, kind).gradient(), ref, atol=1e-14)


def test_model_loss_is_the_batch_loss() -> None:
    X, y = data()
    ctx = make_ctx([(X, y)])
    split = model_loss(ctx)
    assert isinstance(split, ModelLoss)
    assert torch.equal(split(ctx.params, (X, y)), ctx.batch_loss(ctx.params, (X, y)))
    assert math.isfinite(float(split(ctx.params, (X, y))))


def test_curvature_module_imports_nothing_above_linalg() -> None:
    allowed = ("diagnostics", "diagnostics.errors", "diagnostics.batches", "diagnostics.settings")  # leaves
    script = (
        "import json, sys, diagnostics.linalg.curvature\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('diagnostics'))))\n"
    )
    above = [m for m in json.loads(run_fresh(script)) if m not in allowed and not m.startswith("diagnostics.linalg")]
    assert above == []


def test_reverse_gauss_newton_leaves_sympy_unimported() -> None:
    """The reverse-mode GGN (and the autograd output Hessian's fallback) differentiate scalars, never
    ``grad_outputs``, whose shape check imports sympy; the product is still ``J^T H_l J V`` exactly."""
    script = (
        "import sys, torch\n"
        "from diagnostics.linalg import products\n"
        "g = torch.Generator().manual_seed(0)\n"
        "W = torch.randn(3, 4, dtype=torch.float64, generator=g)\n"
        "x = torch.randn(5, 4, dtype=torch.float64, generator=g)\n"
        "y = torch.tensor([0, 1, 2, 1, 0])\n"
        "fwd = lambda p, inp: torch.tanh(inp @ p['w'].T)\n"
        "ce = lambda z, t: torch.nn.functional.cross_entropy(z, t)\n"
        "V = torch.randn(12, 2, dtype=torch.float64, generator=g)\n"
        "ml = products.ModelLoss(fwd, ce)\n"
        "out = products.gauss_newton_reverse(ml, {'w': W}, (x, y), V,\n"
        "                                    curvature=products.cross_entropy_hessian)\n"
        "imported = 'sympy' in sys.modules\n"
        "J = torch.autograd.functional.jacobian(lambda w: fwd({'w': w.reshape(3, 4)}, x).reshape(-1), W.reshape(-1))\n"
        "z = fwd({'w': W}, x)\n"
        "Hl = torch.autograd.functional.hessian(lambda o: ce(o.reshape(5, 3), y), z.reshape(-1))\n"
        "assert torch.allclose(out, J.T @ Hl @ J @ V, rtol=1e-12, atol=1e-13), (out, J.T @ Hl @ J @ V)\n"
        "print(imported)\n"
    )
    assert run_fresh(script).strip() == "False"
