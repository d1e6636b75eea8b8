"""Micro-batching, vmapped blocks, block Lanczos, lockstep SLQ, mixed precision and memory checks.

Every reference is exact: a float64 Hessian from ``torch.func.hessian`` of the sample-weighted loss of
a tiny MLP over ragged batches, or a dense matrix with a known spectrum.
"""

from __future__ import annotations

import gc
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

from diagnostics.errors import DiagnosticsError
from diagnostics.linalg import memory
from diagnostics.linalg.data import split_batches
from diagnostics.linalg.density import slq
from diagnostics.linalg.lanczos import krylov_quadrature, lanczos, lanczos_tridiagonal
from diagnostics.linalg.operator import DenseOperator, HessianOperator, dense_hessian
from diagnostics.linalg.trace import hutchpp
from tinymodels import spectrum_matrix

EPS64 = torch.finfo(torch.float64).eps


def _problem(dtype: torch.dtype = torch.float64, n: int = 37, batch: int = 10):
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(dtype)
    params = {k: v.detach() for k, v in model.named_parameters()}
    X = torch.randn(n, 5, generator=gen, dtype=torch.float64).to(dtype)
    y = torch.randint(0, 3, (n,), generator=gen)
    batches = [(X[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]

    def batch_loss(p, b):
        return nn.functional.cross_entropy(functional_call(model, p, (b[0],)), b[1])

    return model, params, batches, batch_loss, (X, y)


def _reference_hessian(params, batch_loss, data) -> torch.Tensor:
    names = list(params)
    shapes = [params[k].shape for k in names]
    sizes = [params[k].numel() for k in names]

    def flat_loss(flat):
        parts = torch.split(flat, sizes)
        return batch_loss({k: t.reshape(s) for k, t, s in zip(names, parts, shapes)}, data)

    flat = torch.cat([params[k].reshape(-1) for k in names])
    return torch.func.hessian(flat_loss)(flat)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny products are dominated by overhead; one intra-op thread avoids oversubscribing the CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def problem():
    _, params, batches, batch_loss, data = _problem()
    H = _reference_hessian(params, batch_loss, data)
    return params, batches, batch_loss, H


# ----------------------------------------------------------------------------- micro-batching
@pytest.mark.parametrize("micro", [1, 3, 7, 10, 64])
def test_micro_batched_products_equal_plain(problem, micro):
    params, batches, batch_loss, H = problem
    plain = HessianOperator(batch_loss, params, batches)
    split = HessianOperator(batch_loss, params, batches, micro_batch=micro)
    expected_pieces = sum(math.ceil(len(b[1]) / micro) for b in batches)
    assert len(split.loop.batches) == expected_pieces
    assert sum(split.loop.weights) == pytest.approx(1.0, abs=1e-15)
    V = torch.randn(plain.dim, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    a, b = plain.matmat(V), split.matmat(V)
    scale = float((H @ V).abs().max())
    assert float((a - b).abs().max()) <= 64 * EPS64 * scale
    assert float((b - H @ V).abs().max()) <= 64 * EPS64 * scale
    assert split.hvp_count == plain.hvp_count == 5


def test_split_batches_weights_are_sample_fractions(problem):
    _, batches, _, _ = problem
    pieces, weights = split_batches(batches, [len(b[1]) / 37 for b in batches], 4)
    assert [len(p[1]) for p in pieces] == [4, 4, 2, 4, 4, 2, 4, 4, 2, 4, 3]
    assert weights == pytest.approx([len(p[1]) / 37 for p in pieces], abs=1e-16)
    assert torch.equal(torch.cat([p[0] for p in pieces]), torch.cat([b[0] for b in batches]))


def test_split_keeps_tuple_inputs_as_model_arguments():
    x1, x2, y = torch.arange(10.0), torch.arange(10.0) * 2, torch.arange(10)
    pieces, _ = split_batches([((x1, x2), y)], [1.0], 4)
    assert isinstance(pieces[0][0], tuple)
    assert torch.equal(pieces[2][0][1], x2[8:]) and torch.equal(pieces[2][1], y[8:])


def test_micro_batch_must_be_positive(problem):
    params, batches, batch_loss, _ = problem
    with pytest.raises(ValueError, match="micro_batch"):
        HessianOperator(batch_loss, params, batches, micro_batch=0)


@pytest.mark.parametrize("max_vectors", [1, 2, 16])
def test_vmapped_blocks_equal_single_products(problem, max_vectors):
    params, batches, batch_loss, H = problem
    op = HessianOperator(batch_loss, params, batches, max_vectors=max_vectors)
    V = torch.randn(op.dim, 7, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    cols = torch.stack([op.matvec(V[:, j]) for j in range(7)], dim=1)
    block = op.matmat(V)
    scale = float((H @ V).abs().max())
    assert float((block - cols).abs().max()) <= 64 * EPS64 * scale
    assert float((block - H @ V).abs().max()) <= 64 * EPS64 * scale


# ------------------------------------------------------------------------------ block Lanczos
@pytest.mark.parametrize("block_size", [2, 3, 4, 8])
def test_block_lanczos_matches_exact_spectrum(problem, block_size):
    params, batches, batch_loss, H = problem
    exact = torch.linalg.eigvalsh(H)
    op = HessianOperator(batch_loss, params, batches)
    tol = 1e-8
    res = lanczos(
        op,
        k_top=5,
        k_bottom=2,
        tol=tol,
        block_size=block_size,
        generator=torch.Generator().manual_seed(3),
        criterion="residual",
    )
    assert res.converged and res.block_size == block_size
    assert res.iterations == op.hvp_count
    top, bot = exact.flip(0)[:5], exact[:2]
    # |lambda - theta| <= residual <= tol |theta| (plus rounding of the reference)
    slack = 1e3 * EPS64 * float(exact.abs().max())
    assert torch.all((res.eigenvalues - top).abs() <= res.residuals + slack)
    assert torch.all((res.bottom_eigenvalues - bot).abs() <= res.bottom_residuals + slack)
    assert torch.all(res.residuals <= tol * res.eigenvalues.abs())
    # the residuals reported are the true ones of the returned vectors
    true_res = (H @ res.eigenvectors - res.eigenvectors * res.eigenvalues).norm(dim=0)
    assert torch.allclose(true_res, res.residuals, rtol=1e-3, atol=slack)
    assert torch.allclose(res.eigenvectors.T @ res.eigenvectors, torch.eye(5, dtype=torch.float64), atol=1e-10)


def test_block_and_single_vector_lanczos_agree(problem):
    params, batches, batch_loss, _ = problem
    tol = 1e-6
    single = lanczos(HessianOperator(batch_loss, params, batches), k_top=3, tol=tol)
    block = lanczos(HessianOperator(batch_loss, params, batches), k_top=3, tol=tol, block_size=4)
    bound = single.residuals + block.residuals
    assert torch.all((single.eigenvalues - block.eigenvalues).abs() <= bound)


def test_block_lanczos_resolves_a_repeated_top_eigenvalue():
    # spectrum {5, 5, 5, 4, 3.9, ...}: one Krylov space of a single vector holds one copy of 5 only
    n = 40
    eig = torch.cat([torch.tensor([5.0, 5.0, 5.0, 4.0]), torch.linspace(3.9, -1.0, n - 4)]).double()
    op = DenseOperator(spectrum_matrix(eig, 4))
    res = lanczos(op, k_top=4, tol=1e-10, block_size=3, generator=torch.Generator().manual_seed(5))
    assert res.converged
    assert torch.allclose(res.eigenvalues, eig[:4], atol=1e-9)


def test_block_lanczos_exhausts_small_space_exactly():
    n = 10
    eig = torch.linspace(-2, 3, n, dtype=torch.float64)
    op = DenseOperator(spectrum_matrix(eig, 6))
    res = lanczos(op, k_top=3, k_bottom=3, tol=1e-12, block_size=4)
    assert res.iterations <= n
    assert torch.allclose(res.eigenvalues, eig.flip(0)[:3], atol=1e-12)
    assert torch.allclose(res.bottom_eigenvalues, eig[:3], atol=1e-12)


def test_block_start_is_padded_with_random_columns():
    # a warm start of 2 columns with block_size 3 runs 3 vectors per product (the 2 combined + 2 random)
    n = 30
    eig = torch.linspace(-1, 4, n, dtype=torch.float64)
    op = DenseOperator(spectrum_matrix(eig, 6))
    res = lanczos(op, k_top=1, block_size=3, start=torch.ones(n, 2, dtype=torch.float64), tol=1e-10)
    assert res.block_size == 3 and res.converged
    assert float(res.eigenvalues[0]) == pytest.approx(4.0, abs=1e-9)


def test_cpu_basis_gives_the_same_result(problem):
    params, batches, batch_loss, _ = problem
    gen = torch.Generator().manual_seed(7)
    a = lanczos(HessianOperator(batch_loss, params, batches), k_top=4, tol=1e-8, generator=gen)
    gen = torch.Generator().manual_seed(7)
    b = lanczos(HessianOperator(batch_loss, params, batches), k_top=4, tol=1e-8, generator=gen, basis_device="cpu")
    assert a.iterations == b.iterations
    assert torch.equal(a.eigenvalues, b.eigenvalues)


def test_micro_batched_lanczos_equals_plain(problem):
    params, batches, batch_loss, _ = problem
    a = lanczos(HessianOperator(batch_loss, params, batches), k_top=2, tol=1e-6)
    b = lanczos(HessianOperator(batch_loss, params, batches, micro_batch=6), k_top=2, tol=1e-6)
    assert a.iterations == b.iterations
    assert torch.allclose(a.eigenvalues, b.eigenvalues, rtol=1e-12, atol=0)


def test_lanczos_residuals_are_float64_exact(problem):
    # the tridiagonal is assembled in float64, so tight tolerances are met and reported honestly
    params, batches, batch_loss, H = problem
    res = lanczos(HessianOperator(batch_loss, params, batches), k_top=5, tol=1e-10, criterion="residual")
    true_res = (H @ res.eigenvectors - res.eigenvectors * res.eigenvalues).norm(dim=0)
    assert float(true_res.max()) <= 1e-10 * float(res.eigenvalues.abs().max()) * 1.01
    assert torch.allclose(res.eigenvalues, torch.linalg.eigvalsh(H).flip(0)[:5], rtol=1e-10, atol=0)


# --------------------------------------------------------------------------------- SLQ, trace
def test_block_quadrature_is_exact_for_low_degree_polynomials(problem):
    # block Gauss quadrature from p probes and s block steps: V^T A^j V exact for j <= 2s - 1
    params, batches, batch_loss, H = problem
    op = HessianOperator(batch_loss, params, batches)
    starts = torch.randn(op.dim, 3, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    quad = krylov_quadrature(op, starts, 5)
    assert op.hvp_count == 3 * 5
    V = starts / starts.norm(dim=0)
    for j, (nodes, weights) in enumerate(quad):
        assert abs(float(weights.sum()) - 1) < 1e-12
        for d in range(10):
            exact = float(V[:, j] @ torch.linalg.matrix_power(H, d) @ V[:, j])
            assert float((weights * nodes**d).sum()) == pytest.approx(exact, rel=1e-8, abs=1e-12)
    # one probe: the tridiagonal of plain Lanczos
    alpha, beta = lanczos_tridiagonal(op, starts[:, 0], 5)
    assert alpha.numel() == 5 and beta.numel() == 4 and bool((beta > 0).all())


@pytest.mark.parametrize("block", [2, 4])
def test_slq_in_blocks_matches_the_spectrum_like_single_probes(problem, block):
    # block SLQ shares one block Krylov space between the probes of a block (block Gauss quadrature);
    # each probe's moments are exact to degree 2 steps - 1, so both estimate the same spectral moments
    params, batches, batch_loss, H = problem
    seq = slq(
        HessianOperator(batch_loss, params, batches), probes=4, steps=12, generator=torch.Generator().manual_seed(9)
    )
    blk = slq(
        HessianOperator(batch_loss, params, batches),
        probes=4,
        steps=12,
        generator=torch.Generator().manual_seed(9),
        block=block,
    )
    assert blk.matvecs == seq.matvecs == 4 * 12
    g = torch.Generator().manual_seed(9)
    vs = [(2 * torch.randint(0, 2, (H.shape[0],), generator=g, dtype=torch.int8) - 1).double() for _ in range(4)]
    for d in range(6):
        for i, v in enumerate(vs):
            exact = float(v @ torch.linalg.matrix_power(H, d) @ v) / float(v @ v)
            for res in (seq, blk):
                got = float((res.weights[i] * res.nodes[i] ** d).sum())
                assert got == pytest.approx(exact, rel=1e-8, abs=1e-12)


def test_hutchpp_on_micro_batches_equals_plain(problem):
    params, batches, batch_loss, _ = problem
    kw = {"sketch": 6, "min_samples": 10, "max_samples": 10}
    a = hutchpp(HessianOperator(batch_loss, params, batches), generator=torch.Generator().manual_seed(10), **kw)
    b = hutchpp(
        HessianOperator(batch_loss, params, batches, micro_batch=3), generator=torch.Generator().manual_seed(10), **kw
    )
    assert a.matvecs == b.matvecs
    assert a.value == pytest.approx(b.value, rel=1e-12)
    assert a.stderr == pytest.approx(b.stderr, rel=1e-9)


# -------------------------------------------------------------------------- mixed precision
def test_autocast_bfloat16_products_are_bf16_accurate():
    # functional_call substitutes every parameter, so one module serves float32 and float64 copies
    _, params, batches, batch_loss, _ = _problem(torch.float32, n=64, batch=16)
    ref = HessianOperator(batch_loss, {k: v.double() for k, v in params.items()}, [(x.double(), y) for x, y in batches])
    op = HessianOperator(batch_loss, params, batches, autocast="bfloat16")
    V = torch.randn(op.dim, 4, generator=torch.Generator().manual_seed(11))
    out = op.matmat(V)
    exact = ref.matmat(V.double())
    assert out.dtype == torch.float32
    rel = float((out.double() - exact).norm() / exact.norm())
    unit = 2.0**-8  # bfloat16 unit roundoff
    assert rel > torch.finfo(torch.float32).eps * 10  # it really ran in bfloat16
    assert rel < 4 * unit


def test_float64_accumulation_of_float32_products():
    _, params, batches, batch_loss, _ = _problem(torch.float32, n=40, batch=8)
    op = HessianOperator(batch_loss, params, batches, accumulate_dtype=torch.float64, backend="forward")
    V = torch.randn(op.dim, 3, generator=torch.Generator().manual_seed(12))
    out = op.matmat(V)
    assert out.dtype == torch.float32
    manual = torch.zeros(op.dim, 3, dtype=torch.float64)
    in_float32 = torch.zeros(op.dim, 3, dtype=torch.float32)
    for b, w in zip(op.loop.batches, op.loop.weights):
        term = HessianOperator(batch_loss, params, [b], backend="forward").matmat(V)
        manual += w * term.double()
        in_float32 += w * term

    def within_half_ulp(x: torch.Tensor) -> bool:
        # the float32 rounding of the float64 sum, up to the float64 order of summation (fused or not)
        a = manual.float().abs()
        ulp = (torch.nextafter(a, torch.tensor(float("inf"))) - a).double()
        return bool(((x.double() - manual).abs() <= 0.5 * ulp + 1e-12 * manual.abs()).all())

    assert within_half_ulp(out)
    assert not within_half_ulp(in_float32)  # float32 accumulation misses the bound: the check can fail


def test_autocast_rejects_full_precision_types(problem):
    params, batches, batch_loss, _ = problem
    with pytest.raises(ValueError, match="autocast"):
        HessianOperator(batch_loss, params, batches, autocast="float64")


# ----------------------------------------------------------------------------- memory checks
def test_activation_bytes_are_affine_in_batch_size():
    _, params, _, batch_loss, (X, y) = _problem(n=64)
    sizes = [8, 16, 24]
    got = [HessianOperator(batch_loss, params, [(X[:n], y[:n])]).activation_bytes() for n in sizes]
    assert got[0] > 0
    assert got[2] - got[1] == got[1] - got[0] > 0


def test_activation_bytes_keep_no_saved_output_alive():
    """The probe's saved tensors die with its graph; packing a saved output as itself would close a
    reference cycle (output -> grad_fn -> saved output) that autograd never frees (a leak per call)."""
    import weakref

    W = torch.randn(5, 3, dtype=torch.float64)
    x = torch.randn(7, 3, dtype=torch.float64)
    outputs: list = []

    def loss(p):
        h = torch.tanh(x @ p["w"].T)  # tanh saves its output
        outputs.append(weakref.ref(h))
        return h.sum()

    got = memory.activation_bytes(loss, {"w": W}, torch.device("cpu"))
    assert got == 7 * 5 * 8 + 7 * 3 * 8  # tanh's output and the matmul's input x
    gc.collect()
    assert outputs[0]() is None


def test_lanczos_refuses_a_basis_that_cannot_fit(problem, monkeypatch):
    params, batches, batch_loss, _ = problem
    op = HessianOperator(batch_loss, params, batches)
    need = op.dim * min(op.dim, 51) * 8
    monkeypatch.setattr(memory, "available_bytes", lambda device: need // 2)
    with pytest.raises(DiagnosticsError, match=r"Lanczos basis .*--max-iter") as info:
        lanczos(op, k_top=1, max_iter=50)
    assert memory.fmt_bytes(need) in str(info.value)
    assert op.hvp_count == 0  # refused before any work
    monkeypatch.setattr(memory, "available_bytes", lambda device: 2 * need)
    lanczos(op, k_top=1, max_iter=50, memory_check=True)


def test_hvp_block_refused_with_a_smaller_block_suggested(problem, monkeypatch):
    params, batches, batch_loss, _ = problem
    op = HessianOperator(batch_loss, params, batches, max_vectors=16)
    need16, need1 = op.memory_required(16), op.memory_required(1)
    free = (need1 + need16) // 2
    monkeypatch.setattr(memory, "available_bytes", lambda device: free)
    with pytest.raises(DiagnosticsError, match=r"HVP block of 16 vector\(s\).*--max-vectors (\d+)") as info:
        op.matmat(torch.zeros(op.dim, 16, dtype=torch.float64))
    k = int(str(info.value).split("--max-vectors ")[1].split(",")[0])
    assert 1 <= k < 16 and op.memory_required(k) <= 0.95 * free < op.memory_required(k + 1)
    assert op.hvp_count == 0
    op.matmat(torch.zeros(op.dim, 1, dtype=torch.float64))  # a single vector fits


def test_memory_check_can_be_disabled(problem, monkeypatch):
    params, batches, batch_loss, _ = problem
    monkeypatch.setattr(memory, "available_bytes", lambda device: 1)
    op = HessianOperator(batch_loss, params, batches, memory_check=False)
    res = lanczos(op, k_top=1, memory_check=False)
    assert res.converged


def test_dense_hessian_with_micro_batches(problem):
    params, batches, batch_loss, H = problem
    op = HessianOperator(batch_loss, params, batches, micro_batch=5, max_vectors=32)
    assert torch.allclose(dense_hessian(op), H, rtol=0, atol=64 * EPS64 * float(H.abs().max()))


# ----------------------------------------------------------------------------- attention models
def test_transformer_products_work_through_fused_attention():
    # on CPU, scaled_dot_product_attention dispatches to a flash kernel that has no forward-mode rule
    # and no second derivative; the operator must use the math kernel, in both backends
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, activation="gelu", batch_first=True)
    encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
    head = nn.Linear(8, 3)
    model = nn.ModuleDict({"encoder": encoder, "head": head}).double().eval()
    gen = torch.Generator().manual_seed(13)
    X = torch.randn(6, 4, 8, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (6,), generator=gen)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def batch_loss(p, b):
        tokens = functional_call(encoder, {k[8:]: v for k, v in p.items() if k.startswith("encoder.")}, (b[0],))
        logits = functional_call(head, {k[5:]: v for k, v in p.items() if k.startswith("head.")}, (tokens.mean(1),))
        return nn.functional.cross_entropy(logits, b[1])

    fwd = HessianOperator(batch_loss, params, [(X, y)], backend="forward")
    rev = HessianOperator(batch_loss, params, [(X, y)], backend="reverse")
    V = torch.randn(fwd.dim, 3, generator=gen, dtype=torch.float64)
    a, b = fwd.matmat(V), rev.matmat(V)
    assert fwd.backend == "forward"
    assert float((a - b).abs().max()) <= 1e3 * EPS64 * float(a.abs().max())
    sym = V.T @ a  # V^T H V is symmetric
    assert float((sym - sym.T).abs().max()) <= 1e3 * EPS64 * float(sym.abs().max())
