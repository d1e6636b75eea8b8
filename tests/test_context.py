"""Context building: data preparation, state-dict fitting, determinism check and its culprits."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

import tinymodels as tm
from diagnostics.binding import Binding
from diagnostics.checkpoint import load_checkpoint, save_checkpoint
from diagnostics.context import batch_size, build_context, parameter_groups, prepare_batches
from diagnostics.errors import DiagnosticsError


def ckpt(tmp_path: Path, model: torch.nn.Module, name: str = "m.pt") -> Path:
    return save_checkpoint(tmp_path / name, model, step=5, lr=0.1)


def binding(model: str = "tinymodels:build_tiny", data: str = "tinymodels:tiny_data", loss: str = "cross_entropy"):
    return Binding(model=model, data=data, loss=loss)


def test_prepare_tensors_subset_is_seeded_and_sorted() -> None:
    X, y = tm.tiny_data()
    a = prepare_batches((X, y), samples=10, generator=torch.Generator().manual_seed(3))
    b = prepare_batches((X, y), samples=10, generator=torch.Generator().manual_seed(3))
    c = prepare_batches((X, y), samples=10, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a.batches[0][0], b.batches[0][0])
    assert not torch.equal(a.batches[0][0], c.batches[0][0])
    assert a.total_available == 23 and batch_size(a.batches[0]) == 10


def test_prepare_rebatches_ragged() -> None:
    X, y = tm.tiny_data()
    p = prepare_batches((X, y), batch_size_=10)
    assert [batch_size(b) for b in p.batches] == [10, 10, 3]
    p = prepare_batches(tm.tiny_loader(5))
    assert [batch_size(b) for b in p.batches] == [5, 5, 5, 5, 3]
    p = prepare_batches(tm.tiny_loader(5), samples=12, batch_size_=5)
    assert [batch_size(b) for b in p.batches] == [5, 5, 2]


def test_prepare_warns_about_shuffled_data() -> None:
    p = prepare_batches(tm.shuffled_loader())
    assert any("different batches on two passes" in n for n in p.notes)
    assert not prepare_batches(tm.tiny_loader()).notes


@pytest.mark.parametrize(
    "data, match",
    [
        ((torch.zeros(0, 4), torch.zeros(0)), "empty"),
        ((torch.zeros(5, 4), torch.zeros(4)), "5 rows but targets 4"),
        ([], "yielded no batches"),
        ({"a": 1}, "expected \\(inputs, targets\\)"),
        ([1, 2, 3], "yields int items"),
    ],
)
def test_prepare_bad_data(data, match: str) -> None:
    with pytest.raises(DiagnosticsError, match=match):
        prepare_batches(data)


def test_build_context_basics(tmp_path: Path) -> None:
    m = tm.build_tiny()
    ctx = build_context(load_checkpoint(ckpt(tmp_path, m)), binding(), dtype="float64", seed=1)
    assert not ctx.model.training
    assert ctx.dtype == torch.float64 and all(p.dtype == torch.float64 for p in ctx.params.values())
    assert set(ctx.params) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    assert ctx.n_samples == 23 and ctx.step == 5 and ctx.lr == pytest.approx(0.1)
    X, y = tm.tiny_data()
    ref = torch.nn.functional.cross_entropy(m.double()(X.double()), y).detach()
    assert float(ctx.loss()) == pytest.approx(float(ref), rel=1e-12)
    sub = ctx.restrict("^fc2")
    assert set(sub.params) == {"fc2.weight", "fc2.bias"} and "fc1.weight" in sub.frozen
    assert float(sub.loss()) == pytest.approx(float(ref), rel=1e-12)
    with pytest.raises(DiagnosticsError, match="no parameter matches"):
        ctx.restrict("^conv")
    assert parameter_groups(ctx.params) == {"fc1": ["fc1.weight", "fc1.bias"], "fc2": ["fc2.weight", "fc2.bias"]}


def test_ragged_loader_loss_equals_full_batch(tmp_path: Path) -> None:
    ck = load_checkpoint(ckpt(tmp_path, tm.build_tiny()))
    full = build_context(ck, binding(), dtype="float64")
    ragged = build_context(ck, binding(data="tinymodels:tiny_loader"), dtype="float64")
    assert len(ragged.batches) == 5
    assert float(ragged.loss()) == pytest.approx(float(full.loss()), rel=1e-13)


def test_state_dict_with_prefix_is_fitted(tmp_path: Path) -> None:
    m = tm.build_tiny()
    torch.save(
        {"state_dict": {f"model.{k}": v for k, v in m.state_dict().items()}, "global_step": 3}, tmp_path / "l.ckpt"
    )
    ctx = build_context(load_checkpoint(tmp_path / "l.ckpt"), binding())
    assert torch.equal(ctx.params["fc1.weight"], m.fc1.weight.detach())


def test_wrong_keys_and_shapes_are_listed(tmp_path: Path) -> None:
    sd = tm.build_tiny().state_dict()
    sd.pop("fc2.bias")
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "k.pt")
    with pytest.raises(
        DiagnosticsError, match=r"missing 1 key\(s\) \['fc2.bias'\]; unexpected 1 key\(s\) \['extra.weight'\]"
    ):
        build_context(load_checkpoint(tmp_path / "k.pt"), binding())
    ck = load_checkpoint(ckpt(tmp_path, tm.build_tiny(hidden=7), "wide.pt"))
    with pytest.raises(DiagnosticsError, match=r"'fc1.weight' has shape \(7, 4\) in the checkpoint but \(5, 4\)"):
        build_context(ck, binding())


def test_factory_problems(tmp_path: Path) -> None:
    ck = load_checkpoint(ckpt(tmp_path, tm.build_tiny()))
    with pytest.raises(DiagnosticsError, match="returned a str, not a torch.nn.Module"):
        build_context(ck, binding(model="tinymodels:build_not_a_module"))
    with pytest.raises(DiagnosticsError, match="raised RuntimeError: CUDA out of memory in the factory"):
        build_context(ck, binding(model="tinymodels:build_raises"))
    with pytest.raises(DiagnosticsError, match="data factory 'tinymodels:raising_data' raised ValueError"):
        build_context(ck, binding(data="tinymodels:raising_data"))
    with pytest.raises(DiagnosticsError, match="empty"):
        build_context(ck, binding(data="tinymodels:empty_data"))
    with pytest.raises(DiagnosticsError, match="gives inputs only"):
        build_context(ck, binding(data="tinymodels:inputs_only"))
    assert build_context(ck, binding(data="tinymodels:inputs_only"), need_targets=False).n_samples == 23


def test_nan_data_is_reported_naming_the_batch(tmp_path: Path) -> None:
    ck = load_checkpoint(ckpt(tmp_path, tm.build_tiny()))
    with pytest.raises(DiagnosticsError, match=r"batch 0 \(23 samples\) has 1 NaN and 0 Inf values in its inputs"):
        build_context(ck, binding(data="tinymodels:nan_data"))


def test_nan_weights_are_reported(tmp_path: Path) -> None:
    m = tm.build_tiny()
    with torch.no_grad():
        m.fc2.weight[0, 0] = float("inf")
    with pytest.raises(DiagnosticsError, match="'fc2.weight' has 0 NaN and 1 inf"):
        build_context(load_checkpoint(ckpt(tmp_path, m)), binding())


def test_determinism_check_names_the_random_module(tmp_path: Path) -> None:
    ck = load_checkpoint(ckpt(tmp_path, tm.build_noisy()))
    with pytest.raises(
        DiagnosticsError, match=r"different outputs for the same batch in eval mode at 'noise' \(_AlwaysDropout\)"
    ):
        build_context(ck, binding(model="tinymodels:build_noisy"))


def test_modules_stuck_in_training_mode(tmp_path: Path) -> None:
    ck = load_checkpoint(ckpt(tmp_path, tm.build_stuck()))
    with pytest.raises(DiagnosticsError, match=r"stay in training mode after model.eval\(\): \[''"):
        build_context(ck, binding(model="tinymodels:build_stuck"))


def test_batchnorm_without_running_stats_is_a_warning(tmp_path: Path) -> None:
    ck = load_checkpoint(ckpt(tmp_path, tm.build_bn_nostats()))
    ctx = build_context(ck, binding(model="tinymodels:build_bn_nostats"))
    assert any("BatchNorm 'bn' keeps no running statistics" in n for n in ctx.notes)


def test_generator_streams_are_reproducible(tmp_path: Path) -> None:
    ctx = build_context(load_checkpoint(ckpt(tmp_path, tm.build_tiny())), binding(), seed=11)
    a = torch.randn(5, generator=ctx.generator(2))
    b = torch.randn(5, generator=ctx.generator(2))
    c = torch.randn(5, generator=ctx.generator(3))
    assert torch.equal(a, b) and not torch.equal(a, c)


REORDERED = """
import torch
from torch import nn


class ReorderedSum(nn.Module):
    \"\"\"Computes the same function on every call, but sums a large cancelling term in an order that
    alternates between calls, as a multi-threaded BLAS may: outputs differ by float rounding only.\"\"\"

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        small = self.fc(x)
        if self.calls % 2:  # through 1024: rounded to the float32 spacing there (1.2e-4)
            return (small + 1024.0) - 1024.0
        return small


def build():
    torch.manual_seed(0)
    return ReorderedSum()
"""


def test_determinism_check_tolerates_rounding_differences(tmp_path: Path) -> None:
    """Issue 10.8: a spurious 'different outputs ... in eval mode' on a valid model. Two evaluations that
    differ by float non-associativity (here: the same sum in two orders) are the same model."""
    (tmp_path / "reordered.py").write_text(REORDERED)
    spec = f"{tmp_path / 'reordered.py'}:build"
    from diagnostics.binding import call_factory

    model = call_factory(spec, {}, "model")
    ck = load_checkpoint(save_checkpoint(tmp_path / "r.pt", model))
    x = tm.tiny_data()[0]
    with torch.no_grad():
        a, b = model(x), model(x)
    assert not torch.allclose(a, b, rtol=1e-5, atol=1e-5)  # the rounding differences are real
    ctx = build_context(ck, binding(model=spec))
    assert ctx.n_params == 15


def test_determinism_message_says_by_how_much(tmp_path: Path) -> None:
    ck = load_checkpoint(ckpt(tmp_path, tm.build_noisy()))
    with pytest.raises(DiagnosticsError) as exc:
        build_context(ck, binding(model="tinymodels:build_noisy"))
    msg = str(exc.value)
    assert re.search(r"max abs difference [0-9.e+-]+ \(relative [0-9.e+-]+", msg), msg
    assert "rounding allows" in msg


# ------------------------------------------------------------------------------------------ devices
@pytest.mark.parametrize(
    "name, available, words",
    [
        ("mps", ["cpu"], ["--device 'mps' is not available", "no MPS device", "devices here: cpu"]),
        ("cuda", ["cpu"], ["no CUDA device", "devices here: cpu"]),
        ("cuda:7", ["cpu", "cuda:0", "cuda:1"], ["2 CUDA device(s)", "devices here: cpu, cuda:0, cuda:1"]),
        ("xpu:0", ["cpu", "cuda:0"], ["no XPU device"]),
        ("meta", ["cpu"], ["meta device holds no data"]),
        ("hpu", ["cpu"], ["hpu device is not supported"]),
        ("foo", ["cpu"], ["unknown --device 'foo'", "devices here: cpu", "or auto"]),
        ("cuda:-1", ["cpu", "cuda:0"], ["unknown --device 'cuda:-1'"]),
    ],
)
def test_unavailable_or_unsupported_devices_are_one_line_errors(name: str, available: list, words: list) -> None:
    from diagnostics.context import check_device

    with pytest.raises(DiagnosticsError) as info:
        check_device(name, available)
    msg = str(info.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_available_devices_are_accepted_and_cpu_has_no_index() -> None:
    from diagnostics.context import check_device

    assert check_device("cuda:1", ["cpu", "cuda:0", "cuda:1"]) == torch.device("cuda:1")
    assert check_device("cuda", ["cpu", "cuda:0"]) == torch.device("cuda")
    assert check_device("mps", ["cpu", "mps"]) == torch.device("mps")
    assert check_device("cpu:3", ["cpu"]) == torch.device("cpu")  # one CPU device; tensors report plain 'cpu'
    with pytest.raises(DiagnosticsError, match="--basis-device 'cuda'") as info:
        check_device("cuda", ["cpu"], "--basis-device")
    assert "auto" not in str(info.value)


def test_resolve_device_checks_this_machine(monkeypatch) -> None:
    from diagnostics.context import available_devices, resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert available_devices()[0] == "cpu" and not any(d.startswith("cuda") for d in available_devices())
    for name in ("cuda", "cuda:7", "meta", "foo"):
        with pytest.raises(DiagnosticsError, match="devices here: cpu"):
            resolve_device(name)
    assert resolve_device(None) == resolve_device("auto") == torch.device("cpu")


def test_basis_device_is_checked_when_the_options_are(monkeypatch) -> None:
    from diagnostics.analyzers.hessian import HessianConfig
    from diagnostics.spec import check_config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("cuda", "cuda:0", "mps", "meta"):
        with pytest.raises(DiagnosticsError, match=f"--basis-device '{name}'"):
            check_config(HessianConfig(basis_device=name))
    check_config(HessianConfig(basis_device="cpu"))


# ------------------------------------------------------------------------------------------ samples
def test_more_samples_than_the_data_holds_is_noted_not_silent() -> None:
    from diagnostics.context import samples_note

    X, y = tm.tiny_data()  # 23 samples
    for data in ((X, y), tm.tiny_loader(5)):
        p = prepare_batches(data, samples=100)
        assert sum(batch_size(b) for b in p.batches) == 23
        assert any("--samples 100" in n and "all 23" in n for n in p.notes), p.notes
        assert not any("--samples" in n for n in prepare_batches(data, samples=23).notes)
    assert samples_note(None, 5) == [] and samples_note(5, 5) == []


def test_the_samples_note_reaches_the_context(tmp_path: Path) -> None:
    ctx = build_context(load_checkpoint(ckpt(tmp_path, tm.build_tiny())), binding(), samples=1000)
    assert ctx.n_samples == 23
    assert any("--samples 1000" in n and "all 23 were used" in n for n in ctx.notes), ctx.notes


def test_tuple_targets_default_to_the_second_item_also_with_inputs_given() -> None:
    from diagnostics.context import BatchLayout, split_item

    x, y, i = torch.randn(3, 4), torch.tensor([0, 1, 2]), torch.arange(3)
    inputs, targets = split_item((x, y), BatchLayout.parse("0"), "data")
    assert inputs is x and targets is y  # --inputs 0: the targets are still the second item (as --help says)
    inputs, targets = split_item((x, y, i), BatchLayout.parse("0"), "data")
    assert inputs is x and targets is y
    inputs, targets = split_item((y, x), BatchLayout.parse("1"), "data")
    assert inputs is x and targets is y  # a pair: the other item
    inputs, targets = split_item((x, i, y), BatchLayout.parse("0,1"), "data")
    assert inputs[0] is x and inputs[1] is i and targets is y  # the second item is an input: the one left
    inputs, targets = split_item((x, i), BatchLayout.parse("0,1"), "data")
    assert inputs[0] is x and inputs[1] is i and targets is None  # every item is an input
    inputs, targets = split_item((x, y, i), BatchLayout.parse("0", "2"), "data")
    assert inputs is x and targets is i  # --targets still picks


def _checkpoint_naming_build_mlp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, around, model_kwargs: dict, data: str = "tinymodels:tiny_data"
) -> tuple:
    """A checkpoint of a width-8 digits MLP that names ``build_mlp`` with ``model_kwargs``, and the binding
    ``resolve_binding`` takes from it; ``build_mlp`` is replaced by ``around(real_build_mlp, **kwargs)`` (named as
    the real one, so it passes the origin check)."""
    import diagnostics.examples.digits as digits

    real = digits.build_mlp

    def wrapped(**kwargs):
        return around(real, **kwargs)

    wrapped.__module__, wrapped.__qualname__ = real.__module__, real.__qualname__
    monkeypatch.setattr(digits, "build_mlp", wrapped)
    factory = "diagnostics.examples.digits:build_mlp"
    path = save_checkpoint(tmp_path / "m.pt", real(width=8, depth=2), model_factory=factory, model_kwargs=model_kwargs)
    bound = Binding(
        model=factory, model_kwargs=model_kwargs, data=data, loss="cross_entropy", sources={"model": "checkpoint"}
    )
    return load_checkpoint(path), bound


def test_checkpoint_arguments_naming_a_huge_model_are_refused_before_it_is_built(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    devices = []

    def recording(real, **kwargs):
        devices.append(torch.get_default_device().type)
        return real(**kwargs)

    # 268 MB, initialised, for weights of a few kilobytes
    ck, bound = _checkpoint_naming_build_mlp(tmp_path, monkeypatch, recording, {"width": 8192, "depth": 2})
    with pytest.raises(
        DiagnosticsError, match=r"'features.0.weight' has shape \(8, 64\) in the checkpoint but \(8192, 64\)"
    ):
        build_context(ck, bound)
    assert devices == ["meta"]


def test_a_checkpoint_named_factory_speaks_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # the meta-device dry run before the real build must not repeat the factory's prints or warnings
    import warnings

    def chatty(real, **kwargs):
        print("building the MLP")
        print("factory note", file=sys.stderr)
        warnings.warn("width is small", UserWarning, stacklevel=1)
        return real(**kwargs)

    (tmp_path / "digits_like.py").write_text(
        "import torch\n\ndef data():\n    g = torch.Generator().manual_seed(0)\n"
        "    return torch.rand(12, 64, generator=g), torch.arange(12) % 10\n"
    )
    data = f"{tmp_path / 'digits_like.py'}:data"
    ck, bound = _checkpoint_naming_build_mlp(tmp_path, monkeypatch, chatty, {"width": 8, "depth": 2}, data)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        build_context(ck, bound)
    out, err = capsys.readouterr()
    assert out == ""  # user code prints to stderr (stdout is for results)
    assert err.count("building the MLP") == 1 and err.count("factory note") == 1
    assert [str(w.message) for w in caught].count("width is small") == 1


def test_a_checkpoint_with_an_unusable_step_gets_a_note(tmp_path: Path) -> None:
    model = tm.build_tiny()
    torch.save({"model": model.state_dict(), "step": float("nan")}, tmp_path / "final.pt")
    bound = Binding(model="tinymodels:build_tiny", data="tinymodels:tiny_data", loss="cross_entropy")
    ctx = build_context(load_checkpoint(tmp_path / "final.pt"), bound)
    assert ctx.step is None
    assert any("the stored step nan is not a whole number" in n and "the step is unknown" in n for n in ctx.notes)
    torch.save({"model": model.state_dict(), "step": 3}, tmp_path / "good.pt")
    assert not any("stored step" in n for n in build_context(load_checkpoint(tmp_path / "good.pt"), bound).notes)
