"""Feature capture through forward hooks: names, pooling, streaming, bad layers, labels."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diagnostics.errors import DiagnosticsError
from diagnostics.examples.digits import build_cnn, build_mlp
from diagnostics.features import (
    available_layers,
    class_labels,
    default_feature_layer,
    find_classifier,
    pool_features,
    resolve_layers,
    stream_features,
)


def batches_of(x: torch.Tensor, size: int, y: torch.Tensor | None = None):
    return [(x[i : i + size], None if y is None else y[i : i + size]) for i in range(0, len(x), size)]


def assert_close_to_float32(got: torch.Tensor, ref: torch.Tensor, terms: int = 64) -> None:
    """|got - ref| <= terms * eps(float32) * max|ref|: the rounding of a float32 sum of ``terms`` products."""
    tol = terms * torch.finfo(torch.float32).eps * float(ref.abs().max())
    torch.testing.assert_close(got, ref.double(), rtol=0.0, atol=tol)


def all_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_captures_outputs_and_inputs_of_named_modules_batch_by_batch():
    model = build_mlp(width=8, depth=2).eval()
    x = torch.randn(23, 64)
    layers = resolve_layers(model, ["features.0", "features", "head:input", "head"])
    got = list(stream_features(model, batches_of(x, 10), layers))
    assert [fb.size for fb in got] == [10, 10, 3]
    feats = {name: torch.cat([fb.features[name] for fb in got]) for name in got[0].features}
    with torch.no_grad():
        pre = model.features[0](x)
        rep = model.features(x)
        out = model(x)
    assert all(t.dtype == torch.float64 for t in feats.values())
    # batches of 10/10/3 against one batch of 23: float32 matmuls may block (and so round) differently
    # by batch size, so compare up to float32 rounding of a 64-term dot product, not bit for bit
    for name, ref in (("features.0", pre), ("features", rep), ("head:input", rep), ("head", out)):
        assert_close_to_float32(feats[name], ref)
    assert all_hooks(model) == 0


def test_hooks_are_removed_when_the_consumer_stops_or_fails():
    model = build_mlp(width=8).eval()
    stream = stream_features(model, batches_of(torch.randn(30, 64), 10), resolve_layers(model, ["features"]))
    next(stream)
    assert all_hooks(model) > 0
    stream.close()
    assert all_hooks(model) == 0


def test_pooling_of_feature_maps_is_explicit():
    model = build_cnn(channels=4).eval()
    x = torch.randn(5, 1, 8, 8)
    layers = resolve_layers(model, ["features.2"])
    with pytest.raises(DiagnosticsError, match=r"shape \(5, 4, 8, 8\); pass --pool mean .* or --pool flatten"):
        list(stream_features(model, [(x, None)], layers))
    with torch.no_grad():
        fmap = model.features[:3](x)
    mean = next(stream_features(model, [(x, None)], layers, pool="mean")).features["features.2"]
    flat = next(stream_features(model, [(x, None)], layers, pool="flatten")).features["features.2"]
    assert torch.allclose(mean, fmap.mean(dim=(2, 3)).double(), rtol=1e-6)
    assert torch.equal(flat, fmap.flatten(1).double())
    with pytest.raises(DiagnosticsError, match="unknown --pool 'max'"):
        pool_features(fmap, "features.2", "max")


def test_unknown_layer_lists_the_available_ones():
    model = build_mlp(width=8).eval()
    with pytest.raises(DiagnosticsError) as info:
        resolve_layers(model, ["featurs"])
    msg = str(info.value)
    assert "unknown layer 'featurs'; did you mean 'features'" in msg
    for name in available_layers(model):
        assert name in msg
    assert "\n" not in msg


class Tupled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(4, 3, batch_first=True)
        self.head = nn.Linear(3, 2)
        self.act = nn.Tanh()
        self.spare = nn.Linear(3, 3)  # never called

    def forward(self, x):
        out, _ = self.rnn(x)
        h = self.act(out[:, -1])
        return self.head(self.act(h))  # act runs twice


def test_bad_layers_give_one_clear_line():
    model = Tupled().eval()
    x = torch.randn(6, 5, 4)
    # an LSTM returns (output, (h, c)): its first tensor [B, T, H] is used, with a note; the token axis needs --pool
    with pytest.raises(
        DiagnosticsError, match=r"token features of shape \[6, 5, 3\]: \[batch 6, tokens 5, features 3\]"
    ):
        list(stream_features(model, [(x, None)], resolve_layers(model, ["rnn"])))
    (last,) = list(stream_features(model, [(x, None)], resolve_layers(model, ["rnn"]), pool="last"))
    assert torch.equal(last.features["rnn"], model.rnn(x)[0][:, -1].double())
    assert any("returns a tuple; its first tensor [6, 5, 3]" in n for n in model.__dict__["_diagnostics_feature_notes"])
    with pytest.raises(DiagnosticsError, match="runs 2 times per forward pass"):
        list(stream_features(model, [(x, None)], resolve_layers(model, ["act"])))
    assert all_hooks(model) == 0
    with pytest.raises(DiagnosticsError, match="did not run in the model's forward pass"):
        list(stream_features(model, [(x, None)], resolve_layers(model, ["spare"])))
    with pytest.raises(DiagnosticsError, match="non-finite"):
        pool_features(torch.tensor([[1.0, float("nan")]]), "x")


def test_classifier_is_found_by_name_or_as_the_last_linear():
    model = build_mlp(width=8).eval()
    assert find_classifier(model)[0] == "head"
    assert find_classifier(model, "features.2")[0] == "features.2"
    assert default_feature_layer(model) == "head:input"
    with pytest.raises(DiagnosticsError, match="without a 2-d weight"):
        find_classifier(model, "features.1")
    with pytest.raises(DiagnosticsError, match="unknown classifier 'hed'; did you mean 'head'"):
        find_classifier(model, "hed")
    assert find_classifier(nn.Sequential(nn.Tanh())) is None
    with pytest.raises(DiagnosticsError, match="pass --layer NAME"):
        default_feature_layer(nn.Sequential(nn.Tanh()))


def test_class_labels():
    assert torch.equal(class_labels(torch.tensor([2, 0, 1])), torch.tensor([2, 0, 1]))
    onehot = torch.nn.functional.one_hot(torch.tensor([3, 1]), 4).float()
    assert torch.equal(class_labels(onehot), torch.tensor([3, 1]))
    with pytest.raises(DiagnosticsError, match="needs class labels"):
        class_labels(None)
    with pytest.raises(DiagnosticsError, match="not class labels"):
        class_labels(torch.tensor([0.2, 1.7]))
    with pytest.raises(DiagnosticsError, match="must be >= 0"):
        class_labels(torch.tensor([0, -1]))
