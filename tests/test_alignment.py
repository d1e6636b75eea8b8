"""Weight matching (diagnostics.alignment): derived permutation specifications keep the function exactly (float64),
and weight matching recovers a permuted copy exactly, for MLPs, conv nets with BatchNorm and transformer blocks
(residual stream, attention heads with per-head permutations, fused qkv, scaled_dot_product_attention,
nn.MultiheadAttention)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from diagnostics import alignment as al
from diagnostics.errors import DiagnosticsError
from diagnostics.examples.digits import build_cnn

F64 = torch.float64


# ------------------------------------------------------------------------------------------ models
class MLP(nn.Module):
    def __init__(self, d: int = 6, h: int = 7, c: int = 3) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(d, h), nn.Linear(h, h + 2), nn.Linear(h + 2, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.tanh(self.fc2(F.relu(self.fc1(x)))))


class ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.bn = nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 5, 3)
        self.fc = nn.Linear(5 * 2 * 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn(self.c1(x))), 2)
        return self.fc(torch.flatten(F.relu(self.c2(x)), 1))


class Block(nn.Module):
    """A pre-norm transformer block written in plain torch: causal multi-head attention and an MLP, both added to
    the residual stream."""

    def __init__(self, width: int = 8, heads: int = 2, fused: bool = False, sdpa: bool = False) -> None:
        super().__init__()
        self.heads, self.d, self.fused, self.sdpa = heads, width // heads, fused, sdpa
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        if fused:
            self.qkv = nn.Linear(width, 3 * width)
        else:
            self.q, self.k, self.v = (nn.Linear(width, width) for _ in range(3))
        self.o = nn.Linear(width, width)
        self.up, self.down = nn.Linear(width, 3 * width), nn.Linear(3 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, E = x.shape
        h = self.ln1(x)
        q, k, v = self.qkv(h).split(E, dim=2) if self.fused else (self.q(h), self.k(h), self.v(h))
        q, k, v = (t.view(B, T, self.heads, self.d).transpose(1, 2) for t in (q, k, v))
        if self.sdpa:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) / (k.size(-1) ** 0.5)
            att = att.masked_fill(torch.tril(torch.ones(T, T)) == 0, float("-inf"))
            y = F.softmax(att, dim=-1) @ v
        x = x + self.o(y.transpose(1, 2).contiguous().view(B, T, E))
        return x + self.down(F.gelu(self.up(self.ln2(x))))


class Transformer(nn.Module):
    def __init__(self, fused: bool = False, sdpa: bool = False, blocks: int = 2, heads: int = 2) -> None:
        super().__init__()
        self.emb = nn.Linear(5, 8)
        self.pos = nn.Parameter(0.1 * torch.randn(4, 8))
        self.blocks = nn.ModuleList([Block(8, heads, fused, sdpa) for _ in range(blocks)])
        self.lnf, self.head = nn.LayerNorm(8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x) + self.pos[: x.shape[1]]
        for block in self.blocks:
            h = block(h)
        return self.head(self.lnf(h).mean(1))


class TorchMHA(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Linear(5, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.ln, self.head = nn.LayerNorm(8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.head(self.ln(h + a).mean(1))


def _randomise(model: nn.Module, seed: int) -> nn.Module:
    """Generic weights everywhere (non-zero biases, BatchNorm statistics), float64, eval mode."""
    g = torch.Generator().manual_seed(seed)
    model = model.to(F64).eval()
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if t.is_floating_point():
                if "running_var" in name:
                    t.copy_(0.5 + torch.rand(t.shape, generator=g, dtype=F64))
                else:
                    t.copy_(0.5 * torch.randn(t.shape, generator=g, dtype=F64))
    return model


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in [*model.named_parameters(), *model.named_buffers()]}


CASES = {
    "mlp": (lambda: MLP(), lambda g: torch.randn(9, 6, generator=g, dtype=F64)),
    "conv_bn": (lambda: ConvBN(), lambda g: torch.randn(3, 2, 8, 8, generator=g, dtype=F64)),
    "transformer": (lambda: Transformer(), lambda g: torch.randn(3, 4, 5, generator=g, dtype=F64)),
    "transformer_fused_sdpa": (
        lambda: Transformer(fused=True, sdpa=True),
        lambda g: torch.randn(3, 4, 5, generator=g, dtype=F64),
    ),
    "multihead_attention": (lambda: TorchMHA(), lambda g: torch.randn(3, 4, 5, generator=g, dtype=F64)),
    # shape-dependent Python in forward (x.dim()), AdaptiveAvgPool2d and nn.Flatten in an nn.Sequential
    "digits_cnn": (lambda: build_cnn(channels=3), lambda g: torch.randn(4, 64, generator=g, dtype=F64)),
}


# ------------------------------------------------------------------------------------------- specs
def test_mlp_spec_permutes_rows_then_columns() -> None:
    spec = al.derive_spec(_randomise(MLP(), 0), torch.randn(4, 6, dtype=F64))
    assert [(g.size, g.parent) for g in spec.groups] == [(7, None), (9, None)]
    d = spec.describe()["axes"]
    assert d == {
        "fc1.weight": ["g0", None],
        "fc1.bias": ["g0"],
        "fc2.weight": ["g1", "g0"],
        "fc2.bias": ["g1"],
        "fc3.weight": [None, "g1"],
    }


def test_hand_written_permutation_of_an_mlp_is_undone_exactly() -> None:
    """B = A with hidden units permuted by hand (not by the spec): the function is unchanged and weight matching
    returns A's weights bit for bit."""
    a = _randomise(MLP(), 1)
    p1, p2 = torch.randperm(7), torch.randperm(9)
    sa = _state(a)
    sb = {
        "fc1.weight": sa["fc1.weight"][p1],
        "fc1.bias": sa["fc1.bias"][p1],
        "fc2.weight": sa["fc2.weight"][p2][:, p1],
        "fc2.bias": sa["fc2.bias"][p2],
        "fc3.weight": sa["fc3.weight"][:, p2],
        "fc3.bias": sa["fc3.bias"],
    }
    x = torch.randn(11, 6, dtype=F64)
    assert torch.allclose(functional_call(a, sb, (x,)), a(x), rtol=0, atol=1e-13)
    spec = al.derive_spec(a, x)
    match = al.weight_matching(spec, sa, sb)
    aligned = al.apply_permutations(spec, match.perms, sb)
    assert match.converged
    assert all(torch.equal(aligned[k], sa[k]) for k in sa)
    assert match.objective == sorted(match.objective)  # coordinate ascent never goes down


@pytest.mark.parametrize("case", list(CASES))
def test_random_permutations_from_the_spec_keep_the_function(case: str) -> None:
    build, data = CASES[case]
    g = torch.Generator().manual_seed(3)
    model = _randomise(build(), 3)
    x = data(g)
    spec = al.derive_spec(model, x)
    assert spec.groups
    state = _state(model)
    perms = al.random_permutations(spec, torch.Generator().manual_seed(4))
    permuted = al.apply_permutations(spec, perms, state)
    moved = [k for k in state if not torch.equal(permuted[k], state[k])]
    assert len(moved) >= len(spec.parameters) // 2
    assert torch.allclose(functional_call(model, permuted, (x,)), model(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("seed", [0, 1])
def test_weight_matching_recovers_a_permuted_copy_exactly(case: str, seed: int) -> None:
    build, data = CASES[case]
    torch.manual_seed(seed)
    model = _randomise(build(), 10 + seed)
    x = data(torch.Generator().manual_seed(seed))
    spec = al.derive_spec(model, x)
    state = _state(model)
    permuted = al.apply_permutations(spec, al.random_permutations(spec, torch.Generator().manual_seed(seed)), state)
    match = al.weight_matching(spec, state, permuted, generator=torch.Generator().manual_seed(0))
    aligned = al.apply_permutations(spec, match.perms, permuted)
    assert match.converged
    assert all(torch.equal(aligned[k], state[k]) for k in state)
    best = al.objective(spec, al.identity_permutations(spec), state, state)
    assert match.objective[-1] == pytest.approx(best, rel=1e-12)


def test_transformer_spec_has_a_residual_stream_and_nested_heads() -> None:
    model = _randomise(Transformer(), 0)
    spec = al.derive_spec(model, torch.randn(2, 4, 5, dtype=F64))
    axes = spec.describe()["axes"]
    residual = axes["emb.weight"][0]
    # one permutation of the residual stream through the embedding, every block, the final norm and the head
    for name in ("blocks.0.o.weight", "blocks.1.down.weight", "lnf.weight", "blocks.1.ln1.bias"):
        assert axes[name][0] == residual
    assert axes["head.weight"] == [None, residual] and axes["pos"] == [None, residual]
    # heads x dims within a head: queries and keys share the within-head permutation, values another one
    q, k, v = axes["blocks.0.q.weight"][0], axes["blocks.0.k.weight"][0], axes["blocks.0.v.weight"][0]
    assert q == k != v and axes["blocks.0.o.weight"][1] == v
    by_label = {g.label: g for g in spec.groups}
    heads = by_label["blocks.0.q.weight[0] factor 1/2"]
    assert heads.size == 2 and heads.parent is None
    nested = [g for g in spec.groups if g.parent == heads.index]
    assert [g.label for g in nested] == ["blocks.0.q.weight[0] factor 2/2", "blocks.0.v.weight[0] factor 2/2"]
    assert [g.size for g in nested] == [4, 4]  # q/k and v/o dimensions, one permutation per head
    assert axes["blocks.0.up.weight"][0] not in (residual, q)  # the MLP's hidden units


def test_per_head_permutations_differ_between_heads_and_keep_the_function() -> None:
    model = _randomise(Transformer(blocks=1, heads=2), 5)
    x = torch.randn(3, 4, 5, dtype=F64)
    spec = al.derive_spec(model, x)
    perms = al.identity_permutations(spec)
    heads = next(g for g in spec.groups if g.label == "blocks.0.q.weight[0] factor 1/2")
    qk = next(g for g in spec.groups if g.label == "blocks.0.q.weight[0] factor 2/2")
    assert qk.parent == heads.index
    perms[heads.index] = torch.tensor([1, 0])
    perms[qk.index] = torch.tensor([[2, 0, 3, 1], [1, 3, 0, 2]])  # a different permutation inside each head
    state = _state(model)
    permuted = al.apply_permutations(spec, perms, state)
    wq = state["blocks.0.q.weight"]
    expected = torch.cat([wq[4:][[2, 0, 3, 1]], wq[:4][[1, 3, 0, 2]]])
    assert torch.equal(permuted["blocks.0.q.weight"], expected)
    assert torch.equal(
        permuted["blocks.0.k.weight"],
        torch.cat([state["blocks.0.k.weight"][4:][[2, 0, 3, 1]], state["blocks.0.k.weight"][:4][[1, 3, 0, 2]]]),
    )
    assert torch.allclose(functional_call(model, permuted, (x,)), model(x), rtol=0, atol=1e-12)


class Stack(nn.Module):
    """Three blocks of width 64 with 4 heads: many groups share the residual stream."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Linear(6, 64)
        self.blocks = nn.ModuleList([Block(64, 4) for _ in range(3)])
        self.head = nn.Linear(64, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h.mean(1))


def test_the_anchored_start_recovers_a_deeper_transformer_where_the_identity_start_stalls() -> None:
    model = _randomise(Stack(), 0)
    x = torch.randn(3, 5, 6, dtype=F64)
    spec = al.derive_spec(model, x)
    state = _state(model)
    permuted = al.apply_permutations(spec, al.random_permutations(spec, torch.Generator().manual_seed(0)), state)
    best = al.objective(spec, al.identity_permutations(spec), state, state)
    match = al.weight_matching(spec, state, permuted)
    aligned = al.apply_permutations(spec, match.perms, permuted)
    assert all(torch.equal(aligned[k], state[k]) for k in state)
    stalled = al.weight_matching(spec, state, permuted, init=al.identity_permutations(spec))
    assert stalled.converged and stalled.objective[-1] < 0.5 * best


def test_matching_two_different_networks_never_ends_below_the_identity() -> None:
    a, b = _randomise(Transformer(), 1), _randomise(Transformer(), 2)
    spec = al.derive_spec(a, torch.randn(2, 4, 5, dtype=F64))
    match = al.weight_matching(spec, _state(a), _state(b))
    assert match.converged and match.objective[-1] >= match.objective[0]
    assert match.objective[1:] == sorted(match.objective[1:])


def test_a_model_without_hidden_units_is_left_unchanged() -> None:
    model = nn.Linear(4, 3).to(F64)
    spec = al.derive_spec(model, torch.randn(2, 4, dtype=F64))
    assert spec.groups == [] and "no hidden units" in spec.notes[0]
    match = al.weight_matching(spec, _state(model), _state(model))
    assert match.converged and match.perms == {}


# ---------------------------------------------------------------------------------------- limits
class Padded(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(7, 2)
        self.mixer = Pad()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.mixer(torch.tanh(self.fc1(x))))


class Pad(nn.Module):
    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.pad(h, (0, 1))


class PaddedInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 6), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(F.pad(x, (0, 1)))))


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = Gate()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.gate(x))


class Gate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.sum() > 0 else -x


class Cumulative(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)).cumsum(-1))


def test_an_unknown_operation_on_hidden_units_is_an_error_naming_its_module() -> None:
    with pytest.raises(DiagnosticsError, match=r"module 'mixer' \(Pad\), operation 'pad'.*--align none"):
        al.derive_spec(Padded().to(F64), torch.randn(3, 4, dtype=F64))


def test_an_unknown_operation_on_fixed_dimensions_is_harmless() -> None:
    model = _randomise(PaddedInput(), 0)
    spec = al.derive_spec(model, torch.randn(3, 5, dtype=F64))
    assert [g.size for g in spec.groups] == [6]


def test_data_dependent_control_flow_is_an_error_naming_the_module() -> None:
    with pytest.raises(DiagnosticsError, match=r"cannot trace module 'gate' \(Gate\) with torch.fx"):
        al.derive_spec(DataDependent().to(F64), torch.randn(3, 4, dtype=F64))


def test_a_position_dependent_operation_holds_its_dimension_fixed() -> None:
    model = _randomise(Cumulative(), 0)
    x = torch.randn(3, 4, dtype=F64)
    spec = al.derive_spec(model, x)
    assert spec.groups == []  # cumsum over the hidden units: no permutation survives
