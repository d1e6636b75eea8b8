"""diag compare's measurements against exact answers (float64): streamed CKA against the n x n formulas, eigenspace
overlap against dense Hessian eigenvectors, distances by hand, and the barrier of a permuted copy before and after
weight matching."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from diagnostics.analyzers.compare import (
    CKAAccumulator,
    CompareConfig,
    accuracy_barrier,
    analyze_compare,
    overlap_error_bound,
    subspace_overlap,
    weight_distances,
)
from diagnostics.analyzers.landscape import LandscapeConfig, analyze_interpolation
from diagnostics.context import Context
from diagnostics.directions import FlatSpace
from diagnostics.errors import DiagnosticsError
from tinymodels import model_context

F64, CPU = torch.float64, torch.device("cpu")


# ------------------------------------------------------------------------------------------- helpers
class MLP(nn.Module):
    def __init__(self, d: int = 4, h: int = 6, c: int = 3, act=torch.tanh) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, h), nn.Linear(h, c)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Deep(nn.Module):
    """A second architecture: softplus, LayerNorm, three layers of different widths."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.norm, self.fc2, self.fc3 = nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 4), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.softplus(self.fc2(self.norm(F.softplus(self.fc1(x))))))


def data(n: int = 40, seed: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 4, generator=g, dtype=F64)
    return X, (X[:, 0] + 0.5 * X[:, 1] > 0).long() + (X[:, 2] > 0.8).long()


def context(model: nn.Module, X: torch.Tensor, y: torch.Tensor | None, name: str, batch: int = 0) -> Context:
    return model_context(model.to(F64), X, y, name, batch)


def built(cls, seed: int, **kw) -> nn.Module:
    torch.manual_seed(seed)
    return cls(**kw).to(F64)


def values(result, metric: str) -> dict:
    return {r.group: r.value for r in result.records if r.metric == metric}


def train(model: nn.Module, X: torch.Tensor, y: torch.Tensor, steps: int = 200, lr: float = 1.0) -> nn.Module:
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(X), y).backward()
        opt.step()
    return model.eval()


# ----------------------------------------------------------------------------------------------- CKA
def direct_linear_cka(X: torch.Tensor, Y: torch.Tensor) -> float:
    """tr(K H L H) / sqrt(tr(K H K H) tr(L H L H)), K = XX^T, L = YY^T, H = I - 11^T/n (Kornblith et al. 2019)."""
    n = X.shape[0]
    H = torch.eye(n, dtype=F64) - 1.0 / n
    K, L = X @ X.T, Y @ Y.T

    def hsic(a, b):
        return float(torch.trace(a @ H @ b @ H))

    return hsic(K, L) / math.sqrt(hsic(K, K) * hsic(L, L))


def direct_debiased_cka(X: torch.Tensor, Y: torch.Tensor) -> float:
    """The unbiased HSIC of Song et al. (2012), eq. 5, on the n x n Gram matrices."""
    n = X.shape[0]
    one = torch.ones(n, dtype=F64)

    def hsic1(K, L):
        Kt, Lt = K - torch.diag(torch.diag(K)), L - torch.diag(torch.diag(L))
        return float(
            (
                torch.trace(Kt @ Lt)
                + (one @ Kt @ one) * (one @ Lt @ one) / ((n - 1) * (n - 2))
                - 2.0 / (n - 2) * (one @ Kt @ Lt @ one)
            )
            / (n * (n - 3))
        )

    K, L = X @ X.T, Y @ Y.T
    return hsic1(K, L) / math.sqrt(hsic1(K, K) * hsic1(L, L))


def streamed(X: torch.Tensor, Y: torch.Tensor, sizes=(7, 1, 12, 5, 15), shift: bool = True) -> CKAAccumulator:
    acc = CKAAccumulator(X.shape[1], Y.shape[1], X[:7].mean(0) if shift else None, Y[:7].mean(0) if shift else None)
    start = 0
    for s in sizes:
        acc.update(X[start : start + s], Y[start : start + s])
        start += s
    assert start == X.shape[0]
    return acc


@pytest.fixture
def features() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    X = torch.randn(40, 6, generator=g, dtype=F64) + 3.0  # far from centred: the centring must be right
    Y = torch.tanh(X[:, :5] @ torch.randn(5, 5, generator=g, dtype=F64)) + 0.3 * torch.randn(
        40, 5, generator=g, dtype=F64
    )
    return X, Y


def test_streamed_cka_equals_the_n_by_n_formulas(features) -> None:
    X, Y = features
    for shift in (True, False):
        acc = streamed(X, Y, shift=shift)
        assert acc.n == 40
        assert acc.linear() == pytest.approx(direct_linear_cka(X, Y), rel=1e-12)
        assert acc.debiased() == pytest.approx(direct_debiased_cka(X, Y), rel=1e-11)
    assert 0.1 < direct_linear_cka(X, Y) < 0.95  # a generic pair, not a trivially extreme value


def test_cka_of_identical_features_is_one(features) -> None:
    X, _ = features
    acc = streamed(X, X)
    assert acc.linear() == pytest.approx(1.0, abs=1e-13)
    assert acc.debiased() == pytest.approx(1.0, abs=1e-13)


def test_cka_is_invariant_to_orthogonal_transforms_scaling_and_translation(features) -> None:
    X, Y = features
    Q, _ = torch.linalg.qr(torch.randn(5, 5, generator=torch.Generator().manual_seed(1), dtype=F64))
    Y2 = 3.7 * Y @ Q + torch.arange(5, dtype=F64)
    for a, b in ((streamed(X, Y), streamed(X, Y2)), (streamed(X, Y2), streamed(X * 0.01 + 5, Y))):
        assert a.linear() == pytest.approx(b.linear(), rel=1e-11)
        assert a.debiased() == pytest.approx(b.debiased(), rel=1e-10)
    assert streamed(Y, Y2).linear() == pytest.approx(1.0, abs=1e-12)
    assert streamed(Y, Y2).debiased() == pytest.approx(1.0, abs=1e-12)


def test_cka_of_two_networks_equals_the_formula_on_stored_features() -> None:
    X, y = data()
    a, b = built(MLP, 0), built(MLP, 1, h=6)
    cfg = CompareConfig(metrics=["cka"], layers=["fc1", "fc2", "fc1=fc2"])
    res = analyze_compare(cfg, context(a, X, y, "a", batch=9), others=[context(b, X, y, "b")])
    with torch.no_grad():
        fa, fb = {"fc1": a.fc1(X), "fc2": a(X)}, {"fc1": b.fc1(X), "fc2": b(X)}
    lin, deb = values(res, "cka"), values(res, "cka_debiased")
    for label, (la, lb) in {"fc1": ("fc1", "fc1"), "fc2": ("fc2", "fc2"), "fc1=fc2": ("fc1", "fc2")}.items():
        assert lin[label] == pytest.approx(direct_linear_cka(fa[la], fb[lb]), rel=1e-11)
        assert deb[label] == pytest.approx(direct_debiased_cka(fa[la], fb[lb]), rel=1e-10)
    ctx = context(a, X, y, "a")  # one model object behind both sides: its hooks must not mix the two streams
    same = values(analyze_compare(cfg, ctx, others=[ctx]), "cka")
    assert same["fc1"] == pytest.approx(1.0, abs=1e-12) and same["fc2"] == pytest.approx(1.0, abs=1e-12)
    assert same["fc1=fc2"] == pytest.approx(direct_linear_cka(fa["fc1"], fa["fc2"]), rel=1e-11)
    assert res.metadata["cka"]["layers"]["fc1=fc2"]["dims"] == [6, 3]


# ------------------------------------------------------------------------------------------- overlap
def dense_top_eigenvectors(model: nn.Module, X: torch.Tensor, y: torch.Tensor, k: int, how: str) -> torch.Tensor:
    """Top-k eigenvectors of the dense Hessian (torch.func.hessian, or torch.autograd.functional.hessian: in torch
    2.13 torch.func's second derivatives of layer_norm jointly in its input and weight are wrong - the Hessian
    comes out asymmetric by O(1) - while autograd's are right)."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    space = FlatSpace.of(params)

    def loss(v: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(model, space.unflatten(v), (X,)), y)

    w = space.flatten(params)
    H = torch.func.hessian(loss)(w) if how == "func" else torch.autograd.functional.hessian(loss, w)
    assert torch.allclose(H, H.T, rtol=0, atol=1e-13)
    _, vecs = torch.linalg.eigh(H)
    return vecs[:, -k:]


@pytest.mark.parametrize(("arch", "how"), [(MLP, "func"), (Deep, "autograd")], ids=["tanh_mlp", "softplus_layernorm"])
def test_overlap_equals_dense_eigenvectors(arch, how: str) -> None:
    X, y = data()
    a, b = built(arch, 0), built(arch, 5)
    k = 3
    cfg = CompareConfig(metrics=["overlap"], top_k=k, tol=1e-10)
    res = analyze_compare(cfg, context(a, X, y, "a"), others=[context(b, X, y, "b")])
    exact = subspace_overlap(dense_top_eigenvectors(a, X, y, k, how), dense_top_eigenvectors(b, X, y, k, how))
    got = values(res, "eigenspace_overlap")[None]
    info = res.metadata["overlap"]
    assert info["a"]["converged"] and info["b"]["converged"]
    assert max(info["a"]["relative_residuals"] + info["b"]["relative_residuals"]) <= 1e-10
    assert got == pytest.approx(exact, abs=1e-8)
    assert abs(got - exact) <= info["error_bound"] + 1e-12
    assert 0.01 < exact < 0.99  # two different networks: neither the same nor orthogonal subspaces
    assert res.metadata["hvp_count"] == info["a"]["iterations"] + info["b"]["iterations"]
    itself = analyze_compare(cfg, context(a, X, y, "a"), others=[context(a, X, y, "a")])
    assert values(itself, "eigenspace_overlap")[None] == pytest.approx(1.0, abs=1e-12)


def test_overlap_of_a_permuted_copy_is_one_after_alignment() -> None:
    X, y = data()
    a = built(MLP, 0)
    b = permuted_copy(a, seed=3)
    cfg = CompareConfig(metrics=["overlap"], top_k=2, tol=1e-10, align="weights")
    res = analyze_compare(cfg, context(a, X, y, "a"), others=[context(b, X, y, "b")])
    assert values(res, "eigenspace_overlap")[None] == pytest.approx(1.0, abs=1e-8)
    assert values(res, "eigenspace_overlap_unaligned")[None] < 0.9


def test_overlap_helpers() -> None:
    U, _ = torch.linalg.qr(torch.randn(10, 3, dtype=F64))
    assert subspace_overlap(U, U) == pytest.approx(1.0)
    assert subspace_overlap(U[:, :2], torch.linalg.qr(torch.randn(10, 2, dtype=F64))[0]) <= 1.0
    assert overlap_error_bound(1.0, 3, 0.0, 0.0) == 0.0
    assert overlap_error_bound(0.5, 2, 1e-3, 2e-3) == pytest.approx(3e-3 * (2 * 1.0 + 3e-3) / 2)


# ----------------------------------------------------------------------------- distances and barriers
def permuted_copy(model: MLP, seed: int) -> MLP:
    """The same function with the hidden units permuted (by hand, not through diagnostics.alignment)."""
    p = torch.randperm(model.fc1.out_features, generator=torch.Generator().manual_seed(seed))
    out = MLP(model.fc1.in_features, model.fc1.out_features, model.fc2.out_features).to(F64)
    with torch.no_grad():
        out.fc1.weight.copy_(model.fc1.weight[p])
        out.fc1.bias.copy_(model.fc1.bias[p])
        out.fc2.weight.copy_(model.fc2.weight[:, p])
        out.fc2.bias.copy_(model.fc2.bias)
    assert not torch.equal(p, torch.arange(len(p)))
    return out.eval()


def test_weight_distances_by_hand() -> None:
    a = {"w": torch.tensor([3.0, 4.0], dtype=F64), "b": torch.tensor([0.0], dtype=F64)}
    b = {"w": torch.tensor([0.0, 4.0], dtype=F64), "b": torch.tensor([4.0], dtype=F64)}
    d = weight_distances(a, b, ["w", "b"])
    assert d["weight_distance"] == pytest.approx(5.0)
    assert d["relative_distance"] == pytest.approx(1.0)
    assert d["weight_cosine"] == pytest.approx(16 / (5 * math.sqrt(32)))
    assert math.isnan(weight_distances(a, b, ["b"])["relative_distance"])


def test_accuracy_barrier_is_the_drop_below_the_chord() -> None:
    alphas = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0, 1.5], dtype=F64)
    acc = torch.tensor([1.0, 0.8, 0.5, 0.9, 0.9, 0.0], dtype=F64)  # alpha 1.5 lies outside [0, 1]
    assert accuracy_barrier(alphas, acc) == pytest.approx((0.45, 0.5))
    assert accuracy_barrier(alphas[[0, 4]], acc[[0, 4]])[0] == pytest.approx(0.0)


@pytest.fixture(scope="module")
def trained() -> tuple[nn.Module, nn.Module]:
    """Two MLPs trained from different seeds on the same 60 samples."""
    X, y = data(60)
    return train(built(MLP, 0, h=8), X, y), train(built(MLP, 2, h=8), X, y, steps=150)


def test_permuted_copy_has_zero_aligned_barrier_and_identical_weights(trained) -> None:
    X, y = data(60)
    a = trained[0]
    b = permuted_copy(a, seed=1)
    ctx_a, ctx_b = context(a, X, y, "a"), context(b, X, y, "b")
    assert torch.allclose(a(X), b(X), atol=1e-13)
    cfg = CompareConfig(metrics=["distance", "barrier"], align="weights", keep_aligned=True)
    res = analyze_compare(cfg, ctx_a, others=[ctx_b])
    assert abs(values(res, "barrier")[None]) <= 1e-12
    assert abs(values(res, "accuracy_barrier")[None]) <= 1e-12
    loss_end = res.metadata["barrier"]["loss_a"]
    assert values(res, "barrier_unaligned")[None] > 5 * loss_end  # the raw line between them leaves the solution
    assert values(res, "accuracy_barrier_unaligned")[None] > 0.1
    assert values(res, "weight_distance")[None] == 0.0
    assert values(res, "weight_distance_unaligned")[None] > 1.0
    assert values(res, "weight_cosine")["fc1"] == pytest.approx(1.0, abs=1e-15)
    state = res.artifacts["aligned_checkpoint"]["state"]
    assert set(state) == set(a.state_dict())
    assert all(torch.equal(state[k], v) for k, v in a.state_dict().items())
    assert res.artifacts["aligned_checkpoint"]["metadata"]["aligned_to"] == "a"
    grid = res.artifacts["interpolation"]
    assert set(grid["aligned"]) == {True, False} and len(grid) == 2 * 11
    assert res.metadata["alignment"]["converged"]


def test_barrier_is_diag_landscapes_barrier(trained) -> None:
    X, y = data(60)
    a, b = trained
    ctx_a, ctx_b = context(a, X, y, "a"), context(b, X, y, "b")
    res = analyze_compare(CompareConfig(metrics=["barrier"], steps=9, refine_steps=10), ctx_a, others=[ctx_b])
    ref = analyze_interpolation(LandscapeConfig(dims=1, steps=9, refine_steps=10), ctx_a, ctx_b)
    assert values(res, "barrier")[None] == next(r.value for r in ref.records if r.metric == "barrier")
    assert "barrier_unaligned" not in {r.metric for r in res.records}
    # the accuracy barrier and the interpolation table come from the landscape's grid, read as plain columns
    grid = ref.artifacts["grid"]
    alphas, acc = (torch.tensor(grid[c].to_numpy(), dtype=torch.float64) for c in ("alpha", "accuracy"))
    assert values(res, "accuracy_barrier")[None] == accuracy_barrier(alphas, acc)[0]
    table = res.artifacts["interpolation"]
    assert list(table.columns) == [*grid.columns, "aligned"] and not table["aligned"].any()
    pd.testing.assert_frame_equal(table.drop(columns="aligned"), grid)


def test_distances_overall_and_per_layer() -> None:
    X, y = data()
    a, b = built(MLP, 0), built(MLP, 1)
    res = analyze_compare(CompareConfig(metrics=["distance"]), context(a, X, y, "a"), others=[context(b, X, y, "b")])
    sa = {n: p.detach() for n, p in a.named_parameters()}
    sb = {n: p.detach() for n, p in b.named_parameters()}
    dist = values(res, "weight_distance")
    assert dist[None] == pytest.approx(math.sqrt(sum(float(((sb[n] - sa[n]) ** 2).sum()) for n in sa)), rel=1e-14)
    fc1 = math.sqrt(
        float(((sb["fc1.weight"] - sa["fc1.weight"]) ** 2).sum() + ((sb["fc1.bias"] - sa["fc1.bias"]) ** 2).sum())
    )
    assert dist["fc1"] == pytest.approx(fc1, rel=1e-14)
    assert set(dist) == {None, "fc1", "fc2"}
    assert {r.checkpoint for r in res.records} == {"a"}


# -------------------------------------------------------------------------------------------- errors
def test_bad_requests_are_one_line_errors() -> None:
    X, y = data()
    a, b = built(MLP, 0), built(MLP, 1, h=7)
    ctx_a = context(a, X, y, "a")
    with pytest.raises(DiagnosticsError, match="two checkpoints"):
        analyze_compare(CompareConfig(), ctx_a)
    with pytest.raises(DiagnosticsError, match="different architectures"):
        analyze_compare(CompareConfig(), ctx_a, others=[context(b, X, y, "b")])
    with pytest.raises(DiagnosticsError, match="--align weights"):
        CompareConfig(keep_aligned=True).validate()
    with pytest.raises(DiagnosticsError, match="add cka"):
        analyze_compare(CompareConfig(metrics=["distance"], layers=["fc1"]), ctx_a, others=[ctx_a])
    with pytest.raises(DiagnosticsError, match="--metrics must be one of"):
        analyze_compare(CompareConfig(metrics=["nope"]), ctx_a, others=[ctx_a])
    unlabelled = context(a, X, None, "a")
    with pytest.raises(DiagnosticsError, match="barrier needs a loss"):
        analyze_compare(CompareConfig(metrics=["barrier"]), unlabelled, others=[unlabelled])
    ok = analyze_compare(CompareConfig(metrics=["cka", "distance"]), unlabelled, others=[unlabelled])
    assert values(ok, "cka")["fc2:input"] == pytest.approx(1.0)
