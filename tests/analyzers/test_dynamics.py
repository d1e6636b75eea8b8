"""The dynamics analyzer against hand computations on designed tensors and models (float64 unless stated)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diagnostics.analyzers.dynamics import (
    CoMoments,
    DynamicsConfig,
    activation_layers,
    analyze_dynamics,
    centred_alignment,
    cosine,
    dormant_units,
    label_kernel_alignment,
    relative_distance,
    softmax_collapsed,
)
from diagnostics.checkpoint import save_checkpoint
from diagnostics.context import Context
from diagnostics.errors import DiagnosticsError

F64 = torch.float64


# ------------------------------------------------------------------------------ softmax collapse
def two_class_logits(gaps: list[float], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``[gap, 0]`` with the true class 0: the other class's share is ``s = exp(-gap)``."""
    z = torch.tensor([[g, 0.0] for g in gaps], dtype=dtype)
    return z, torch.zeros(len(gaps), dtype=torch.long)


def test_a_logit_gap_that_saturates_float32_softmax_counts_as_collapsed():
    z, y = two_class_logits([20.0, 10.0], torch.float32)
    # exp(-20) = 2.1e-9 is below half an ulp of 1 in float32 (2^-24 = 6.0e-8): 1 + s rounds to 1
    # exp(-10) = 4.5e-5 is not: the true class reads 0.99995
    assert softmax_collapsed(z, y).tolist() == [True, False]
    # the wrong class is never collapsed, whatever the gap
    assert softmax_collapsed(z, torch.ones(2, dtype=torch.long)).tolist() == [False, False]


@pytest.mark.parametrize(("dtype", "mantissa_bits"), [(torch.float32, 24), (F64, 53)])
def test_collapse_sets_in_where_the_other_classes_fall_below_half_an_ulp(dtype, mantissa_bits):
    """The true class is the largest, so torch computes 1 / (1 + s) with ``s = sum_j exp(z_j - z_y)``; it reads
    exactly 1 once ``fl(1 + s) = 1``, i.e. ``s < 2^-mantissa_bits`` (half the spacing of floats above 1)."""
    boundary = mantissa_bits * math.log(2)  # gap at which exp(-gap) = 2^-bits
    gaps = [g / 4 for g in range(4, 4 * 60)]
    gaps = [g for g in gaps if abs(g - boundary) > 0.3]
    z, y = two_class_logits(gaps, dtype)
    assert softmax_collapsed(z, y).tolist() == [g > boundary for g in gaps]


def test_float32_and_float64_disagree_between_their_boundaries():
    gaps = [10.0, 25.0, 50.0]  # float32 boundary 16.6, float64 boundary 36.7
    assert softmax_collapsed(*two_class_logits(gaps, torch.float32)).tolist() == [False, True, True]
    assert softmax_collapsed(*two_class_logits(gaps, F64)).tolist() == [False, False, True]


def test_collapse_with_many_classes_sums_the_other_classes():
    # 1000 other classes each 15 below the true one: s = 1000 exp(-15) = 3.1e-4 -> not collapsed in float32,
    # although each alone (3.1e-7) is tiny; 1000 classes 30 below: s = 9.4e-11 -> collapsed
    z = torch.zeros(2, 1001)
    z[0, 0], z[1, 0] = 15.0, 30.0
    assert softmax_collapsed(z, torch.zeros(2, dtype=torch.long)).tolist() == [False, True]


# ---------------------------------------------------------------------------- small pure helpers
def test_cosine_and_relative_distance_are_the_textbook_formulas():
    a = torch.tensor([3.0, 4.0, 0.0], dtype=F64)
    b = torch.tensor([4.0, -3.0, 5.0], dtype=F64)
    assert cosine(a, b) == pytest.approx(0.0, abs=1e-15)
    assert cosine(a, 2 * a) == pytest.approx(1.0, rel=1e-15)
    assert cosine(a, -a) == pytest.approx(-1.0, rel=1e-15)
    assert cosine(a, torch.zeros(3)) is None
    assert relative_distance(b, a) == pytest.approx(math.sqrt(1 + 49 + 25) / 5, rel=1e-15)
    assert relative_distance(a, a) == 0.0
    assert relative_distance(a, torch.zeros(3)) is None


def test_dormant_units_are_scores_at_most_tau_times_the_layer_mean():
    scores = torch.tensor([0.0, 1.0, 2.0, 0.01, 2.99], dtype=F64)  # mean 1.2
    assert dormant_units(scores, 0.0).tolist() == [True, False, False, False, False]
    assert dormant_units(scores, 0.025).tolist() == [True, False, False, True, False]  # 0.01 / 1.2 = 0.0083
    assert dormant_units(scores, 1.0).tolist() == [True, True, False, True, False]  # 1 / 1.2 <= 1
    assert dormant_units(torch.zeros(4), 0.0).all()  # a wholly dead layer


# ------------------------------------------------------------------------------- kernel alignment
def alignment_by_hand(z: torch.Tensor, labels: torch.Tensor) -> float:
    """<HKH, HLH>_F / (||HKH||_F ||HLH||_F) with the N x N matrices written out."""
    n = z.shape[0]
    y = F.one_hot(labels).to(F64)
    h = torch.eye(n, dtype=F64) - torch.full((n, n), 1.0 / n, dtype=F64)
    kc = h @ (z @ z.T) @ h
    lc = h @ (y @ y.T) @ h
    return float((kc * lc).sum() / (torch.linalg.matrix_norm(kc) * torch.linalg.matrix_norm(lc)))


def random_features(n: int = 40, d: int = 6, classes: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    z = torch.randn(n, d, generator=g, dtype=F64) + 0.7 * F.one_hot(labels, d).to(F64)
    return z, labels


def test_features_equal_to_the_one_hot_labels_align_perfectly():
    labels = torch.tensor([0, 1, 2, 1, 0, 2, 2, 1])
    y = F.one_hot(labels).to(F64)
    assert label_kernel_alignment(y, labels) == pytest.approx(1.0, rel=1e-14)
    assert label_kernel_alignment(torch.cat([y, torch.zeros(8, 3, dtype=F64)], 1), labels) == pytest.approx(1.0)


def test_alignment_equals_the_n_by_n_formula():
    z, labels = random_features()
    assert label_kernel_alignment(z, labels) == pytest.approx(alignment_by_hand(z, labels), rel=1e-12)


def test_alignment_is_invariant_to_rotations_and_isotropic_scaling_of_the_features():
    z, labels = random_features()
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(3), dtype=F64))
    base = label_kernel_alignment(z, labels)
    assert label_kernel_alignment(z @ q, labels) == pytest.approx(base, rel=1e-12)
    assert label_kernel_alignment(37.5 * z, labels) == pytest.approx(base, rel=1e-12)
    # ... but not to an anisotropic scaling
    assert label_kernel_alignment(z * torch.tensor([10.0, 1, 1, 1, 1, 1], dtype=F64), labels) != pytest.approx(base)


def test_streamed_co_moments_equal_the_one_shot_ones_even_far_from_the_origin():
    z, labels = random_features(n=53)
    rows = torch.cat([z + 1e4, F.one_hot(labels).to(F64)], 1)  # a large mean: raw moments would cancel
    acc = CoMoments(rows.shape[1])
    for part in torch.split(rows, [1, 7, 20, 25]):
        acc.update(part)
    centred = rows - rows.mean(0)
    assert acc.n == 53
    assert torch.allclose(acc.mean, rows.mean(0), rtol=1e-14, atol=0)
    assert torch.allclose(acc.m, centred.T @ centred, rtol=1e-9, atol=1e-6)
    d = z.shape[1]
    value = centred_alignment(acc.m[:d, :d], acc.m[:d, d:], acc.m[d:, d:])
    assert value == pytest.approx(alignment_by_hand(z, labels), rel=1e-9)


def test_alignment_is_undefined_for_constant_features_or_a_single_class():
    labels = torch.tensor([0, 1, 0, 1])
    assert label_kernel_alignment(torch.ones(4, 3, dtype=F64), labels) is None
    assert label_kernel_alignment(torch.randn(4, 3, dtype=F64), torch.zeros(4, dtype=torch.long)) is None


# ---------------------------------------------------------------------------------- a designed model
class ReluNet(nn.Module):
    def __init__(self, d_in: int = 4, hidden: int = 6, classes: int = 3) -> None:
        super().__init__()
        self.fc = nn.Linear(d_in, hidden)
        self.act = nn.ReLU()
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.fc(x)))


DEAD = [1, 4]  # units whose pre-activation is -1 on every input
SMALL = 2  # a unit whose activation is the constant 1e-3


def planted_model(seed: int = 0) -> ReluNet:
    torch.manual_seed(seed)
    model = ReluNet().double()
    with torch.no_grad():
        for i in DEAD:
            model.fc.weight[i] = 0.0
            model.fc.bias[i] = -1.0
        model.fc.weight[SMALL] = 0.0
        model.fc.bias[SMALL] = 1e-3
    return model.eval()


def make_context(model: nn.Module, n: int = 50, batch: int = 16, seed: int = 0, **kw) -> Context:
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, 4, generator=g, dtype=F64)
    y = torch.randint(0, 3, (n,), generator=g)
    batches = [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]
    dtype = next(model.parameters()).dtype
    return Context(
        model=model,
        params={k: p.detach() for k, p in model.named_parameters()},
        frozen={},
        batches=batches,
        loss_fn=lambda o, t: F.cross_entropy(o, t),
        device=torch.device("cpu"),
        dtype=dtype,
        checkpoint="designed",
        step=3,
        **kw,
    )


def values(result, metric: str) -> dict:
    return {r.group: r.value for r in result.records if r.metric == metric}


def all_data(ctx: Context) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cat([b[0] for b in ctx.batches]), torch.cat([b[1] for b in ctx.batches])


def test_default_layers_are_the_relu_after_the_linear():
    model = planted_model()
    found, notes = activation_layers(model, model, torch.randn(3, 4, dtype=F64))
    assert found == {"act": -1} and notes == []


def test_planted_dead_relus_are_found_exactly():
    ctx = make_context(planted_model())
    result = analyze_dynamics(DynamicsConfig(tau=0.0), ctx)
    assert values(result, "dormant_fraction") == {"act": pytest.approx(len(DEAD) / 6, abs=0)}
    assert result.metadata["dormant"]["act"]["dormant_units"] == DEAD
    assert result.metadata["tau"] == 0.0


def test_dormancy_with_tau_follows_the_scores_computed_by_hand():
    ctx = make_context(planted_model())
    x, _ = all_data(ctx)
    with torch.no_grad():
        scores = ctx.model.act(ctx.model.fc(x)).abs().mean(0)
    ratio = scores / scores.mean()
    tau = float(ratio[SMALL]) * 1.5  # catches the small unit, not the live ones
    assert (ratio[[i for i in range(6) if i not in DEAD and i != SMALL]] > tau).all()
    result = analyze_dynamics(DynamicsConfig(tau=tau), ctx)
    assert result.metadata["dormant"]["act"]["dormant_units"] == sorted([*DEAD, SMALL])
    assert values(result, "dormant_fraction")["act"] == pytest.approx(3 / 6, abs=0)


def test_gradient_metrics_and_weight_norms_equal_direct_computations():
    ctx = make_context(planted_model(), n=50, batch=16)  # ragged batches: 16, 16, 16, 2
    result = analyze_dynamics(DynamicsConfig(), ctx)
    x, y = all_data(ctx)
    params = {k: p.clone().requires_grad_(True) for k, p in ctx.params.items()}
    loss = F.cross_entropy(torch.func.functional_call(ctx.model, params, (x,)), y)
    grads = torch.autograd.grad(loss, list(params.values()))
    g = torch.cat([t.reshape(-1) for t in grads])
    w = torch.cat([p.detach().reshape(-1) for p in params.values()])
    expected_cos = float(torch.dot(g, w) / (g.norm() * w.norm()))
    assert values(result, "gradient_weight_cosine")[None] == pytest.approx(expected_cos, rel=1e-10)
    # the dead units' incoming weights and biases and their outgoing weights get exactly zero gradient
    zero = len(DEAD) * 4 + len(DEAD) + 3 * len(DEAD)
    assert values(result, "zero_gradient_fraction")[None] == zero / w.numel()
    assert int((g == 0).sum()) == zero
    norms = values(result, "weight_norm")
    assert norms[None] == pytest.approx(float(torch.linalg.norm(w)), rel=1e-14)
    for name, p in ctx.params.items():
        assert norms[name] == pytest.approx(float(torch.linalg.norm(p)), rel=1e-14)
    assert set(norms) == {None, *ctx.params}


def test_label_alignment_at_the_default_layer_is_that_of_the_head_input():
    ctx = make_context(planted_model())
    result = analyze_dynamics(DynamicsConfig(), ctx)
    x, y = all_data(ctx)
    with torch.no_grad():
        z = ctx.model.act(ctx.model.fc(x))
    assert values(result, "label_kernel_alignment") == {"head:input": pytest.approx(alignment_by_hand(z, y), rel=1e-10)}
    info = result.metadata["kernel_alignment"]
    assert info["samples"] == 50 and "no subsample" in info["how"]
    other = analyze_dynamics(DynamicsConfig(kernel_layer="fc"), ctx)
    with torch.no_grad():
        pre = ctx.model.fc(x)
    assert values(other, "label_kernel_alignment")["fc"] == pytest.approx(alignment_by_hand(pre, y), rel=1e-10)


class Scaled(nn.Module):
    """Logits = x exactly (identity weights), so the softmax gaps are the inputs' gaps."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(torch.eye(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)


def test_softmax_collapse_fraction_per_dtype_of_the_forward_pass():
    model = Scaled().double().eval()
    x = torch.tensor([[10.0, 0.0], [25.0, 0.0], [50.0, 0.0], [0.0, 3.0]], dtype=F64)
    y = torch.tensor([0, 0, 0, 1])
    ctx = make_context(model)
    ctx.batches = [(x[:3], y[:3]), (x[3:], y[3:])]
    config = DynamicsConfig(softmax_dtypes=["float32", "bfloat16", "float16"])
    got = values(analyze_dynamics(config, ctx), "softmax_collapse_fraction")
    # gap 10: collapsed only where exp(-10) = 4.5e-5 < 2^-bits: bfloat16 (2^-8) and float16 (2^-11);
    # gap 25: also float32 (2^-24); gap 50: also float64 (2^-53); gap 3 never (exp(-3) = 0.05)
    assert got == {"float64": 1 / 4, "float32": 2 / 4, "bfloat16": 3 / 4, "float16": 3 / 4}


def test_distance_from_an_identical_init_is_zero_and_from_a_moved_one_as_computed(tmp_path: Path):
    model = planted_model()
    ctx = make_context(model)
    same = save_checkpoint(tmp_path / "same.pt", model)
    result = analyze_dynamics(DynamicsConfig(init=same), ctx)
    assert values(result, "distance_from_init") == {None: 0.0, "fc": 0.0, "head": 0.0}
    # move the head only: the distance is ||delta|| / ||w_0|| overall and for 'head', zero for 'fc'
    start = planted_model()
    with torch.no_grad():
        start.head.weight.add_(0.5)
    moved = save_checkpoint(tmp_path / "moved.pt", start)
    got = values(analyze_dynamics(DynamicsConfig(init=moved), ctx), "distance_from_init")
    w0 = torch.cat([p.detach().reshape(-1) for p in start.parameters()])
    head0 = torch.cat([start.head.weight.reshape(-1), start.head.bias]).detach()
    assert got[None] == pytest.approx(math.sqrt(18 * 0.25) / float(w0.norm()), rel=1e-12)
    assert got["head"] == pytest.approx(math.sqrt(18 * 0.25) / float(head0.norm()), rel=1e-12)
    assert got["fc"] == 0.0


def test_init_keys_with_a_prefix_still_match(tmp_path: Path):
    model = planted_model()
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    path = tmp_path / "ddp.pt"
    torch.save(state, path)
    result = analyze_dynamics(DynamicsConfig(init=path), make_context(model))
    assert values(result, "distance_from_init")[None] == 0.0


def test_an_init_of_another_model_is_a_clear_error(tmp_path: Path):
    other = save_checkpoint(tmp_path / "other.pt", nn.Linear(3, 3))
    with pytest.raises(DiagnosticsError, match="does not fit the model"):
        analyze_dynamics(DynamicsConfig(init=other), make_context(planted_model()))
    wide = ReluNet(hidden=7)
    path = save_checkpoint(tmp_path / "wide.pt", wide)
    with pytest.raises(DiagnosticsError, match=r"'fc.weight' has shape \(7, 4\)"):
        analyze_dynamics(DynamicsConfig(init=path), make_context(planted_model()))


def test_logged_values_are_copied_from_the_checkpoint_metadata():
    meta = {"train_accuracy": 1.0, "val_accuracy": 0.25, "val_loss": float("nan"), "train_loss": True, "lr": 0.1}
    result = analyze_dynamics(DynamicsConfig(), make_context(planted_model(), checkpoint_metadata=meta))
    got = {
        r.metric: r.value
        for r in result.records
        if r.metric in ("train_accuracy", "val_accuracy", "train_loss", "val_loss")
    }
    assert got == {"train_accuracy": 1.0, "val_accuracy": 0.25}


def test_a_model_without_relu_modules_gets_a_note_and_the_rest():
    class Smooth(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 5)
            self.head = nn.Linear(5, 3)

        def forward(self, x):
            return self.head(torch.relu(self.fc(x)))  # functional: invisible to hooks

    torch.manual_seed(0)
    result = analyze_dynamics(DynamicsConfig(), make_context(Smooth().double().eval()))
    assert not values(result, "dormant_fraction")
    assert any("--layers" in n for n in result.metadata["notes"])
    named = analyze_dynamics(DynamicsConfig(layers=["head:input"], tau=0.0), make_context(Smooth().double().eval()))
    assert set(values(named, "dormant_fraction")) == {"head:input"}


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.pool(self.relu(self.bn(self.conv(x)))).flatten(1))


def test_conv_channels_behind_a_norm_layer_are_units():
    torch.manual_seed(0)
    model = ConvNet().double().eval()
    with torch.no_grad():  # channel 2: BatchNorm maps everything to -1 -> dead after the ReLU
        model.bn.weight[2] = 0.0
        model.bn.bias[2] = -1.0
    found, _ = activation_layers(model, model, torch.randn(2, 1, 5, 5, dtype=F64))
    assert found == {"relu": 1}
    ctx = make_context(model)
    g = torch.Generator().manual_seed(5)
    ctx.batches = [(torch.randn(8, 1, 5, 5, generator=g, dtype=F64), torch.randint(0, 3, (8,), generator=g))]
    result = analyze_dynamics(DynamicsConfig(tau=0.0), ctx)
    assert values(result, "dormant_fraction") == {"relu": 0.25}
    assert result.metadata["dormant"]["relu"]["dormant_units"] == [2]


def test_a_shared_activation_module_is_left_out_of_the_defaults():
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.act = nn.Linear(4, 4), nn.Linear(4, 4), nn.ReLU()

        def forward(self, x):
            return self.b(self.act(self.a(self.act(x))))

    model = Shared()
    found, notes = activation_layers(model, model, torch.randn(2, 4))
    assert found == {} and "runs 2 times" in notes[0]


def test_options_are_checked():
    ctx = make_context(planted_model())
    with pytest.raises(DiagnosticsError, match="--tau"):
        analyze_dynamics(DynamicsConfig(tau=-0.1), ctx)
    with pytest.raises(DiagnosticsError, match="--softmax-dtypes"):
        analyze_dynamics(DynamicsConfig(softmax_dtypes=["float8"]), ctx)
    with pytest.raises(DiagnosticsError, match="unknown layer 'nope'"):
        analyze_dynamics(DynamicsConfig(layers=["nope"]), ctx)
    with pytest.raises(DiagnosticsError, match="unknown layer 'nope'"):
        analyze_dynamics(DynamicsConfig(kernel_layer="nope"), ctx)


def test_every_emitted_metric_is_declared():
    from diagnostics.analyzers.dynamics import ANALYZER

    declared = {m.name for m in ANALYZER.metrics}
    ctx = make_context(planted_model(), checkpoint_metadata={k: 0.5 for k in ("train_accuracy", "val_accuracy")})
    result = analyze_dynamics(DynamicsConfig(), ctx)
    assert {r.metric for r in result.records} <= declared


# ----------------------------------------------------- transformers layout: dict batches, outputs with .loss
def kw_context(model: nn.Module, batches: list[dict], loss: str = "model", token_weighted: bool = False) -> Context:
    """A float64 context as ``build_context`` makes it for dict batches: inputs passed as keyword arguments,
    labels under ``labels`` (given to the model for ``--loss model``)."""
    from diagnostics.binding import LOSSES

    model = model.double().eval()
    return Context(
        model=model,
        params={k: p.detach() for k, p in model.named_parameters()},
        frozen={},
        batches=[({k: v for k, v in b.items() if k != "labels"}, b["labels"]) for b in batches],
        loss_fn=LOSSES[loss],
        device=torch.device("cpu"),
        dtype=F64,
        loss_name=loss,
        label_key="labels",
        token_weighted=token_weighted,
    )


@pytest.mark.parametrize("loss", ["model", "cross_entropy"])
def test_dict_batches_and_output_objects_give_the_cosine_and_collapse_computed_by_hand(loss: str):
    """``--loss model`` passes the labels to the model; ``cross_entropy`` reads the logits of its output."""
    import kwmodels as kw

    batches = kw.cls_batches()  # 20 + 12 samples
    model = kw.build_classifier().double().eval()
    ctx = kw_context(model, batches, loss=loss)
    result = analyze_dynamics(DynamicsConfig(softmax_dtypes=["float32"]), ctx)
    want = kw.gradient_cosine(model, lambda m: kw.sample_mean_loss(m, batches))
    assert values(result, "gradient_weight_cosine")[None] == pytest.approx(want, rel=1e-10)
    # the logits of the output object are read, in float64 and with the forward pass re-run in float32
    collapse = {d: kw.collapse_fraction(model, batches, getattr(torch, d)) for d in ("float64", "float32")}
    assert values(result, "softmax_collapse_fraction") == collapse
    assert 0 < collapse["float64"] < collapse["float32"] < 1  # the scaled logits saturate float32 more often
    assert not any("not [batch, classes] logits" in n or "failed" in n for n in result.metadata["notes"])
    with torch.no_grad():
        z = torch.cat([model.features(b["input_ids"], b["attention_mask"]) for b in batches])
    y = torch.cat([b["labels"] for b in batches])
    assert values(result, "label_kernel_alignment") == {
        "classifier:input": pytest.approx(alignment_by_hand(z, y), rel=1e-10)
    }


@pytest.mark.parametrize("loss", ["model", "cross_entropy"])
def test_a_token_level_loss_weights_batches_by_their_counted_targets(loss: str):
    """Batches of 3 and 2 sequences with 5 and 8 counted targets: the full-data loss is the mean over the 13
    targets, not the sample-weighted mean of the two batch means."""
    import kwmodels as kw

    batches = kw.token_batches()
    model = kw.build_tagger().double().eval()
    ctx = kw_context(model, batches, loss=loss, token_weighted=True)
    assert ctx.counted == 13
    got = values(analyze_dynamics(DynamicsConfig(), ctx), "gradient_weight_cosine")[None]
    token_mean = kw.gradient_cosine(model, lambda m: kw.token_mean_loss(m, batches))
    batch_mean = kw.gradient_cosine(model, lambda m: kw.batch_mean_loss(m, batches))
    assert got == pytest.approx(token_mean, rel=1e-10)
    assert abs(token_mean - batch_mean) > 1e-3  # the two weightings disagree, so the check is not vacuous
