"""Operators against exact dense matrices in float64: the Hessian (torch.func.hessian), its per-batch
products, the data loop, composition, compilation, and the layering of the numerical core."""

from __future__ import annotations

import json

import pytest
import torch
from torch.func import functional_call, hessian

import tinymodels as tm
from diagnostics.context import Context
from diagnostics.errors import DiagnosticsError
from diagnostics.linalg import products
from diagnostics.linalg.data import DataLoop
from diagnostics.linalg.operator import (
    DenseOperator,
    HessianOperator,
    LinearOperator,
    dense_hessian,
    preconditioned,
    restricted,
    scaled,
)
from diagnostics.operators import hessian_operator
from freshpy import run_fresh

F64 = torch.float64
LINALG_MODULES = [
    "diagnostics.linalg",
    "diagnostics.linalg.data",
    "diagnostics.linalg.density",
    "diagnostics.linalg.lanczos",
    "diagnostics.linalg.memory",
    "diagnostics.linalg.operator",
    "diagnostics.linalg.products",
    "diagnostics.linalg.trace",
]


make_ctx = tm.tiny_context


def exact(ctx: Context, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    names = list(ctx.params)
    shapes = [ctx.params[n].shape for n in names]
    numels = [ctx.params[n].numel() for n in names]
    flat = torch.cat([ctx.params[n].reshape(-1) for n in names])

    def f(w):
        parts = dict(zip(names, (p.reshape(s) for p, s in zip(torch.split(w, numels), shapes))))
        return ctx.loss_fn(functional_call(ctx.model, parts, (X,)), y)

    return hessian(f)(flat)


def spd(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g, dtype=F64)
    return A + A.T


@pytest.fixture
def data():
    X, y = tm.tiny_data()
    return X.double(), y


# ------------------------------------------------------------------------------ the Hessian
@pytest.mark.parametrize("backend", ["forward", "reverse", "cached", "auto"])
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_hvp_matches_dense_hessian(data, backend: str, loss: str) -> None:
    X, y = data
    ctx = make_ctx([(X, y)], loss)
    H = exact(ctx, X, y)
    op = hessian_operator(ctx, backend=backend)
    assert op.shape == (op.dim, op.dim) == (43, 43) and op.dtype == F64 and op.device.type == "cpu"
    v = torch.randn(op.dim, dtype=F64, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(op.matvec(v), H @ v, rtol=1e-12, atol=1e-13)
    V = torch.randn(op.dim, 7, dtype=F64, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(op.matmat(V), H @ V, rtol=1e-12, atol=1e-13)
    assert op.hvp_count == op.matvec_count == 8


def test_ragged_batches_equal_one_full_batch(data) -> None:
    X, y = data
    H = exact(make_ctx([(X, y)]), X, y)
    ragged = [(X[i : i + 5], y[i : i + 5]) for i in range(0, len(y), 5)]  # 5,5,5,5,3
    op = hessian_operator(make_ctx(ragged))
    assert op.loop.weights == pytest.approx([5 / 23] * 4 + [3 / 23], abs=1e-16)
    assert torch.allclose(dense_hessian(op), H, rtol=1e-12, atol=1e-14)
    # equal weights per batch (what hessian-eigenthings does) would be measurably wrong
    wrong = hessian_operator(make_ctx(ragged), weights=[0.2] * 5)
    assert (dense_hessian(wrong) - H).abs().max() > 1e-3


def test_auto_backend_caches_one_batch_and_streams_several(data) -> None:
    X, y = data
    one = hessian_operator(make_ctx([(X, y)]))
    many = hessian_operator(make_ctx([(X[:10], y[:10]), (X[10:], y[10:])]))
    assert one.backend == "cached" and many.backend == "auto"
    cached_many = hessian_operator(make_ctx([(X[:10], y[:10]), (X[10:], y[10:])]), backend="cached")
    V = torch.randn(one.dim, 3, dtype=F64, generator=torch.Generator().manual_seed(4))
    ref = exact(make_ctx([(X, y)]), X, y) @ V
    for op in (one, many, cached_many):
        assert torch.allclose(op.matmat(V), ref, rtol=1e-12, atol=1e-13)
        assert torch.allclose(op.matmat(V), ref, rtol=1e-12, atol=1e-13)  # the kept graph gives the same again
    assert cached_many.product.cached_graphs == 2 and many.product.cached_graphs == 0


def test_vector_chunking_does_not_change_products(data) -> None:
    X, y = data
    ctx = make_ctx([(X, y)])
    V = torch.randn(43, 9, dtype=F64, generator=torch.Generator().manual_seed(2))
    a = hessian_operator(ctx, max_vectors=2).matmat(V)
    b = hessian_operator(ctx, max_vectors=16).matmat(V)
    assert torch.allclose(a, b, rtol=1e-13, atol=1e-15)


def test_parameter_block_by_names_equals_restriction(data) -> None:
    X, y = data
    ctx = make_ctx([(X, y)])
    H = exact(ctx, X, y)
    op = hessian_operator(ctx, names=["fc2.weight", "fc2.bias"])
    start = 5 * 4 + 5  # fc1.weight, fc1.bias come first
    assert torch.allclose(dense_hessian(op), H[start:, start:], rtol=1e-12, atol=1e-14)
    full = hessian_operator(ctx)
    sl = full.group_slices()
    block = restricted(full, slice(sl["fc2.weight"].start, sl["fc2.bias"].stop))
    assert block.shape == (18, 18)
    assert torch.allclose(dense_hessian(block), H[start:, start:], rtol=1e-12, atol=1e-14)
    assert full.hvp_count == 18 and block.matvec_count == 18


def test_flatten_roundtrip_and_slices(data) -> None:
    X, y = data
    op = hessian_operator(make_ctx([(X, y)]))
    v = torch.arange(op.dim, dtype=F64)
    assert torch.equal(op.flatten(op.unflatten(v)), v)
    sl = op.group_slices()
    assert sl["fc1.weight"] == slice(0, 20) and sl["fc2.bias"] == slice(op.dim - 3, op.dim)
    assert op.names == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]


def test_wrong_shapes_are_refused(data) -> None:
    X, y = data
    op = hessian_operator(make_ctx([(X, y)]))
    with pytest.raises(ValueError, match=r"\[43, k\]"):
        op.matmat(torch.zeros(42, 2, dtype=F64))
    with pytest.raises(ValueError, match=r"\[43\] vector"):
        op.matvec(torch.zeros(43, 1, dtype=F64))
    with pytest.raises(ValueError, match="backend"):
        HessianOperator(make_ctx([(X, y)]).batch_loss, op.params, [(X, y)], backend="fast")
    with pytest.raises(ValueError, match="DataLoop"):
        HessianOperator(make_ctx([(X, y)]).batch_loss, op.params, DataLoop([(X, y)]), micro_batch=3)
    assert op.hvp_count == 0


# ------------------------------------------------------------- micro-batches chosen by the operator
class BatchCentred(tm.Tiny):
    """Tiny whose logits are centred over the batch: its outputs depend on which samples share a batch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = super().forward(x)
        return z - z.mean(0, keepdim=True)


@pytest.fixture
def small_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let the tiny models' few KB of activations be cut (the real floor is MIN_PIECE_BYTES per piece)."""
    from diagnostics.linalg import operator

    monkeypatch.setattr(operator, "MIN_PIECE_BYTES", 1)


def test_split_pieces_rule() -> None:
    from diagnostics.linalg.operator import MIN_PIECE, MIN_PIECE_BYTES, split_pieces

    MB = MIN_PIECE_BYTES
    assert split_pieces(3 * MB, MB, 10_000) == 1  # activations under four parameter vectors: left whole
    assert split_pieces(4 * MB, MB, 10_000) == 2
    assert split_pieces(19_502_580, 4_505_640, 1797) == 2  # the issue-13 MLP over 1,797 digits: pieces of 899
    assert split_pieces(798_600, 13_864, 1437) == 1  # the demo's small MLP: 0.8 MB of activations, left whole
    assert split_pieces(100 * MB, MB, 10_000) == 10
    assert split_pieces(100 * MB, MB, 3 * MIN_PIECE + 1) == 3  # never pieces under MIN_PIECE samples
    assert split_pieces(100 * MB, MB, MIN_PIECE) == 1
    assert split_pieces(5 * MB, MB // 100, 10_000) == 5  # nor under MIN_PIECE_BYTES of activations
    assert split_pieces(0, 100, 10_000) == split_pieces(100, 0, 10_000) == 1


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_one_batch_is_cut_into_pieces_with_the_same_products(loss: str, small_pieces: None) -> None:
    X, y = tm.tiny_data(300)
    X = X.double()
    ctx = make_ctx([(X, y)], loss=loss)
    op = hessian_operator(ctx)
    V = torch.randn(op.dim, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    out = op.matmat(V)
    # 43 float64 parameters (344 bytes) against ~tens of KB of activations: as many pieces as MIN_PIECE allows
    assert op.auto_micro_batch == 75 and len(op.loop.batches) == 4 and op.product.cached_graphs == 4
    assert [len(b[1]) for b in op.loop.batches] == [75, 75, 75, 75]
    assert torch.allclose(out, exact(ctx, X, y) @ V, rtol=1e-12, atol=1e-13)
    assert op.backend == "cached" and op.hvp_count == 3


def test_a_ragged_last_piece_keeps_the_sample_weights(small_pieces: None) -> None:
    X, y = tm.tiny_data(203)
    X = X.double()
    ctx = make_ctx([(X, y)])
    op = hessian_operator(ctx)
    V = torch.randn(op.dim, 2, dtype=F64, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(op.matmat(V), exact(ctx, X, y) @ V, rtol=1e-12, atol=1e-13)
    assert op.auto_micro_batch == 68 and [len(b[1]) for b in op.loop.batches] == [68, 68, 67]


def test_batches_left_whole(small_pieces: None) -> None:
    X, y = tm.tiny_data(300)
    X = X.double()
    V = torch.randn(43, 1, dtype=F64, generator=torch.Generator().manual_seed(3))
    cases = {
        # a custom loss may not be a per-sample mean: never cut
        "custom loss": hessian_operator(
            make_ctx([(X, y)], loss=lambda out, t: torch.nn.functional.cross_entropy(out, t))
        ),
        # the user's micro-batches stand
        "micro_batch": hessian_operator(make_ctx([(X, y)]), micro_batch=100),
        # several batches stream through forward-over-reverse: nothing is kept to cut
        "two batches": hessian_operator(make_ctx([(X[:150], y[:150]), (X[150:], y[150:])])),
        # another backend than the kept graph
        "reverse": hessian_operator(make_ctx([(X, y)]), backend="reverse"),
        # asked not to
        "split=False": hessian_operator(make_ctx([(X, y)]), split=False),
        # the loss of the pieces is not the loss of the batch: the model couples its samples
        "coupled": hessian_operator(make_ctx([(X, y)], model=BatchCentred())),
    }
    for name, op in cases.items():
        batches = len(op.loop.batches)
        op.matmat(V)
        assert op.auto_micro_batch is None, name
        assert len(op.loop.batches) == batches, name
    assert len(cases["micro_batch"].loop.batches) == 3


def test_small_activations_are_left_whole() -> None:
    # the tiny model's few KB of activations are far under MIN_PIECE_BYTES: cutting would only add fixed costs
    X, y = tm.tiny_data(300)
    op = hessian_operator(make_ctx([(X.double(), y)]))
    op.matvec(torch.ones(op.dim, dtype=F64))
    assert op.auto_micro_batch is None and len(op.loop.batches) == 1 and op.product.cached_graphs == 1


def test_separable_tells_a_per_sample_mean_from_a_coupled_loss() -> None:
    from diagnostics.linalg.operator import separable

    X, y = tm.tiny_data(100)
    X = X.double()
    pieces, fractions = [(X[:60], y[:60]), (X[60:], y[60:])], [0.6, 0.4]
    mean = make_ctx([(X, y)])
    assert separable(mean.batch_loss, mean.params, (X, y), pieces, fractions)
    summed = make_ctx([(X, y)], loss=lambda out, t: torch.nn.functional.cross_entropy(out, t, reduction="sum"))
    assert not separable(summed.batch_loss, summed.params, (X, y), pieces, fractions)
    coupled = make_ctx([(X, y)], model=BatchCentred())
    assert not separable(coupled.batch_loss, coupled.params, (X, y), pieces, fractions)

    def whole_batches_only(params, batch):  # e.g. a leaf that is not per-sample, cut all the same
        if len(batch[1]) != 100:
            raise RuntimeError("shape '[100, 4]' is invalid for input of size 240")
        return mean.batch_loss(params, batch)

    assert not separable(whole_batches_only, mean.params, (X, y), pieces, fractions)
    # rounding is not coupling: float32 sums over different pieces differ by far less than sqrt(u)
    single = make_ctx([(X.float(), y)], dtype=torch.float32)
    assert separable(
        single.batch_loss,
        single.params,
        (X.float(), y),
        [(X[:60].float(), y[:60]), (X[60:].float(), y[60:])],
        fractions,
    )


# --------------------------------------------------------------------- per-batch products
@pytest.mark.parametrize(
    "product", [products.forward_over_reverse, products.reverse_over_reverse, products.CachedGraph()]
)
def test_each_product_is_the_batch_hessian(data, product) -> None:
    X, y = data
    ctx = make_ctx([(X, y)])
    batch = (X[:9], y[:9])
    H9 = exact(ctx, *batch)
    V = torch.randn(43, 4, dtype=F64, generator=torch.Generator().manual_seed(5))
    for _ in range(2):  # the cached graph answers the second call from the kept graph
        HV = product(ctx.batch_loss, ctx.params, batch, V)
        assert HV.shape == (43, 4)
        assert torch.allclose(HV, H9 @ V, rtol=1e-12, atol=1e-13)


def test_products_of_a_parameter_the_loss_ignores_are_zero(data) -> None:
    X, y = data
    ctx = make_ctx([(X, y)])
    params = {**ctx.params, "unused": torch.ones(2, dtype=F64)}
    V = torch.randn(45, 2, dtype=F64, generator=torch.Generator().manual_seed(6))
    ref = products.forward_over_reverse(ctx.batch_loss, params, (X, y), V)
    for product in (products.reverse_over_reverse, products.CachedGraph()):
        HV = product(ctx.batch_loss, params, (X, y), V)
        assert torch.allclose(HV, ref, rtol=1e-12, atol=1e-13)
        assert torch.equal(HV[-2:], torch.zeros(2, 2, dtype=F64))


def test_double_backward_products_leave_sympy_unimported() -> None:
    """A cached-graph product passes the tangent into the gradient graph without ``grad_outputs``, whose
    shape check imports sympy (~0.2 s of every ``diag`` run); the product is still the exact one."""
    script = (
        "import sys, torch\n"
        "from diagnostics.linalg import products\n"
        "torch.manual_seed(0)\n"
        "W = torch.randn(3, 4, dtype=torch.float64)\n"
        "x = torch.randn(5, 4, dtype=torch.float64)\n"
        "loss = lambda p, b: torch.tanh(b @ p['w'].T).pow(2).sum()\n"
        "V = torch.randn(12, 2, dtype=torch.float64)\n"
        "HV = products.CachedGraph()(loss, {'w': W}, x, V)\n"
        "imported = 'sympy' in sys.modules\n"
        "f = lambda w: loss({'w': w.reshape(3, 4)}, x)\n"
        "H = torch.autograd.functional.hessian(f, W.reshape(-1))\n"
        "assert torch.allclose(HV, H @ V, rtol=1e-12, atol=1e-13), (HV, H @ V)\n"
        "print(imported)\n"
    )
    assert run_fresh(script).strip() == "False"


def test_auto_falls_back_to_double_backward_once(data) -> None:
    X, y = data
    ctx = make_ctx([(X, y)])

    class NoForwardMode(torch.autograd.Function):
        @staticmethod
        def forward(x):
            return torch.tanh(x)

        @staticmethod
        def setup_context(ctx_, inputs, output):
            ctx_.save_for_backward(output)

        @staticmethod
        def backward(ctx_, g):
            (out,) = ctx_.saved_tensors
            return g * (1 - out * out)

    def loss(p, b):
        h = NoForwardMode.apply(b[0] @ p["fc1.weight"].T + p["fc1.bias"])
        return torch.nn.functional.cross_entropy(h @ p["fc2.weight"].T + p["fc2.bias"], b[1])

    halves = [(X[:12], y[:12]), (X[12:], y[12:])]
    op = HessianOperator(loss, ctx.params, halves)
    V = torch.randn(43, 3, dtype=F64, generator=torch.Generator().manual_seed(7))
    out = op.matmat(V)
    assert op.backend == "reverse"
    assert torch.allclose(out, exact(ctx, X, y) @ V, rtol=1e-12, atol=1e-13)
    with pytest.raises(DiagnosticsError, match=r"--backend forward: .* pass --backend reverse"):
        HessianOperator(loss, ctx.params, halves, backend="forward").matmat(V)


# --------------------------------------------------------------------------- the data loop
def test_data_loop_weighted_sum_and_accumulation(data) -> None:
    X, y = data
    batches = [(X[i : i + 5], y[i : i + 5]) for i in range(0, 23, 5)]
    loop = DataLoop(batches, micro_batch=2, accumulate_dtype="float64")
    assert len(loop.batches) == 14 and sum(loop.weights) == pytest.approx(1.0, abs=1e-15)
    assert not loop.sharded and loop.largest()[0].shape[0] == 2
    total = loop.weighted_sum(lambda b: b[0].float().mean(0), (4,), dtype=torch.float32, device=torch.device("cpu"))
    assert total.dtype == F64
    assert torch.allclose(total, X.sum(0) / 23, rtol=1e-6)  # mean of the samples, from float32 parts
    with pytest.raises(ValueError, match="at least one batch"):
        DataLoop([])
    with pytest.raises(ValueError, match="2 weights for 5 batches"):
        DataLoop(batches, [0.5, 0.5])
    with pytest.raises(ValueError, match="micro_batch"):
        DataLoop(batches, micro_batch=0)


def _other_process(result: torch.Tensor, failed: bool):
    """A reduce that adds a second process's contribution (``result`` and its failure flag)."""
    calls = []

    def reduce(t: torch.Tensor) -> torch.Tensor:
        calls.append(t.numel())
        other = torch.zeros_like(t)
        if t.numel() == result.numel() + 1:  # a product: the values, then the vote
            other[:-1] = result.reshape(-1)
            other[-1] = 1.0 if failed else 0.0
        else:
            other[0] = 1.0 if failed else 0.0
        return t + other

    return reduce, calls


def test_sharded_loop_sums_over_processes_and_votes_on_errors(data) -> None:
    X, y = data
    ctx = make_ctx([(X, y)])
    H = exact(ctx, X, y)
    V = torch.randn(43, 2, dtype=F64, generator=torch.Generator().manual_seed(8))
    mine, theirs = (X[:10], y[:10]), (X[10:], y[10:])
    their_part = (13 / 23) * (exact(ctx, *theirs) @ V)
    reduce, calls = _other_process(their_part, failed=False)
    op = HessianOperator(ctx.batch_loss, ctx.params, DataLoop([mine], [10 / 23], reduce=reduce))
    assert op.reduce is reduce and op.loop.sharded
    assert torch.allclose(op.matmat(V), H @ V, rtol=1e-12, atol=1e-13)
    assert calls == [1, 43 * 2 + 1]  # the memory vote, then the product with its error vote
    # another process fails: this one raises too instead of going on alone
    reduce, _ = _other_process(their_part, failed=True)
    op = HessianOperator(ctx.batch_loss, ctx.params, DataLoop([mine], [10 / 23], reduce=reduce), memory_check=False)
    with pytest.raises(DiagnosticsError, match="another process failed"):
        op.matmat(V)
    # this process fails: it still takes part in the collective, then raises its own error
    reduce, calls = _other_process(their_part, failed=False)

    def broken(p, b):
        raise RuntimeError("broken loss")

    op = HessianOperator(broken, ctx.params, DataLoop([mine], [10 / 23], reduce=reduce), backend="reverse")
    op.memory_check = False
    with pytest.raises(RuntimeError, match="broken loss"):
        op.matmat(V)
    assert calls == [43 * 2 + 1]


def test_a_process_without_data_takes_part(data) -> None:
    X, y = data
    ctx = make_ctx([(X, y)])
    V = torch.randn(43, 2, dtype=F64, generator=torch.Generator().manual_seed(9))
    full = exact(ctx, X, y) @ V
    reduce, _ = _other_process(full, failed=False)
    op = HessianOperator(ctx.batch_loss, ctx.params, DataLoop([], reduce=reduce))
    assert torch.allclose(op.matmat(V), full, rtol=1e-14, atol=0)


# ----------------------------------------------------------------------------- composition
def test_composition_equals_the_dense_formulas() -> None:
    A, B = spd(6, 1), spd(6, 2)
    a, b = DenseOperator(A), DenseOperator(B)
    V = torch.randn(6, 3, dtype=F64, generator=torch.Generator().manual_seed(3))
    d = torch.rand(6, generator=torch.Generator().manual_seed(4), dtype=F64) + 0.1
    Dm = torch.diag(d.rsqrt())
    cases = {
        "c A": (2.5 * a, 2.5 * A),
        "A c": (a * -0.5, -0.5 * A),
        "scaled": (scaled(a, 3.0), 3.0 * A),
        "-A": (-a, -A),
        "A + B": (a + b, A + B),
        "A - B": (a - b, A - B),
        "2 (A - B) + A": (2 * (a - b) + a, 3 * A - 2 * B),
        "D^-1/2 A D^-1/2": (preconditioned(a, d), Dm @ A @ Dm),
        "A[1:4, 1:4]": (restricted(a, slice(1, 4)), A[1:4, 1:4]),
    }
    for name, (op, M) in cases.items():
        assert isinstance(op, LinearOperator)
        assert op.shape == M.shape and op.dtype == F64 and op.device.type == "cpu", name
        W = V[: M.shape[0]]
        torch.testing.assert_close(op.matmat(W), M @ W, rtol=1e-13, atol=1e-13, msg=name)
        torch.testing.assert_close(op.matvec(W[:, 0]), M @ W[:, 0], rtol=1e-13, atol=1e-13, msg=name)
        assert op.matvec_count == 4, name
        assert op.reduce is None


def test_preconditioned_eigenvalues_are_those_of_D_inverse_A() -> None:
    A = spd(5, 5)
    d = torch.rand(5, generator=torch.Generator().manual_seed(6), dtype=F64) + 0.2
    op = preconditioned(DenseOperator(A), d)
    ours = torch.linalg.eigvalsh(dense_hessian(op))
    theirs = torch.linalg.eigvals(torch.diag(1 / d) @ A).real.sort().values
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)


def test_composition_refuses_what_does_not_fit() -> None:
    a = DenseOperator(spd(4))
    with pytest.raises(ValueError, match="cannot add"):
        a + DenseOperator(spd(3))
    with pytest.raises(ValueError, match="cannot add"):
        a + DenseOperator(spd(4).float())
    with pytest.raises(ValueError, match="positive"):
        preconditioned(a, torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=F64))
    with pytest.raises(ValueError, match="shape"):
        preconditioned(a, torch.ones(3, dtype=F64))
    with pytest.raises(ValueError, match="contiguous"):
        restricted(a, slice(0, 4, 2))
    with pytest.raises(ValueError, match="non-empty"):
        restricted(a, slice(3, 3))


def test_dense_operator_counts() -> None:
    A = torch.diag(torch.arange(1.0, 6.0, dtype=F64))
    op = DenseOperator(A)
    op.matvec(torch.ones(5, dtype=F64))
    op.matmat(torch.ones(5, 3, dtype=F64))
    assert op.matvec_count == 4 and op.dim == 5 and op.shape == (5, 5)
    with pytest.raises(ValueError):
        DenseOperator(torch.zeros(2, 3))


# ------------------------------------------------------------------------------- compile
def test_compile_falls_back_to_eager_with_a_note(data, monkeypatch) -> None:
    X, y = data
    ctx = make_ctx([(X, y)])

    def no_compiler(fn, **kwargs):
        def fail(*args, **kw):
            raise RuntimeError("no C++ compiler found\nsecond line")

        return fail

    monkeypatch.setattr(torch, "compile", no_compiler)
    op = hessian_operator(ctx, backend="forward", compile=True)
    assert op.notes == []
    V = torch.randn(43, 3, dtype=F64, generator=torch.Generator().manual_seed(10))
    assert torch.allclose(op.matmat(V), exact(ctx, X, y) @ V, rtol=1e-12, atol=1e-13)
    assert len(op.notes) == 1
    assert "--compile" in op.notes[0] and "RuntimeError: no C++ compiler found" in op.notes[0]
    assert "second line" not in op.notes[0]
    op.matmat(V)
    assert len(op.notes) == 1


def test_compile_says_it_does_not_apply_to_the_cached_graph(data) -> None:
    X, y = data
    for backend in ("cached", "auto"):  # auto: the cached graph for one batch
        op = hessian_operator(make_ctx([(X, y)]), backend=backend, compile=True)
        assert op.backend == "cached" and len(op.notes) == 1 and "does not apply to the cached" in op.notes[0]
    op = hessian_operator(make_ctx([(X[:10], y[:10]), (X[10:], y[10:])]), compile=True)
    assert op.backend == "auto" and op.notes == []  # several batches: forward-over-reverse, compiled


@pytest.mark.slow
def test_compiled_products_equal_eager(data) -> None:
    X, y = data
    ctx = make_ctx([(X, y)])
    V = torch.randn(43, 2, dtype=F64, generator=torch.Generator().manual_seed(11))
    eager = hessian_operator(ctx, backend="forward").matmat(V)
    op = hessian_operator(ctx, backend="forward", compile=True)
    out = op.matmat(V)
    assert op.notes == [], op.notes  # compiled for real (CPU, inductor)
    assert torch.allclose(out, eager, rtol=1e-10, atol=1e-12)
    assert torch.allclose(out, exact(ctx, X, y) @ V, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------ layering
def test_linalg_imports_nothing_above_it() -> None:
    """Each module of the numerical core pulls in no diagnostics module above it.

    One fresh interpreter imports the modules one after another and lists the diagnostics modules
    loaded after each: a module that imported one from above would add it at its own step.
    """
    allowed = ("diagnostics", "diagnostics.errors", "diagnostics.batches", "diagnostics.settings")  # leaves
    script = (
        "import importlib, json, sys\n"
        "out = {}\n"
        "for name in sys.argv[1:]:\n"
        "    importlib.import_module(name)\n"
        "    out[name] = sorted(m for m in sys.modules if m == 'diagnostics' or m.startswith('diagnostics.'))\n"
        "print(json.dumps(out))\n"
    )
    loaded = json.loads(run_fresh(script, *LINALG_MODULES))
    assert list(loaded) == LINALG_MODULES
    for module, names in loaded.items():
        assert module in names
        above = [m for m in names if m not in allowed and not m.startswith("diagnostics.linalg")]
        assert above == [], (module, above)
