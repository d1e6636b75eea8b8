"""Checkpoint reading/writing: every supported format, metadata, and hostile or broken files."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from diagnostics.checkpoint import check_finite, load_checkpoint, save_checkpoint, step_from_name
from diagnostics.errors import DiagnosticsError


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def assert_same_weights(state: dict, model: nn.Module) -> None:
    ref = model.state_dict()
    assert set(state) == set(ref)
    for k in ref:
        assert torch.equal(state[k], ref[k])


def test_plain_state_dict(tmp_path: Path) -> None:
    m = small_model()
    torch.save(m.state_dict(), tmp_path / "w.pt")
    ck = load_checkpoint(tmp_path / "w.pt")
    assert_same_weights(ck.state_dict, m)
    assert ck.metadata.get("step") is None
    assert len(ck.sha256) == 64


@pytest.mark.parametrize("key", ["model", "state_dict", "model_state_dict", "module"])
def test_weights_under_known_keys(tmp_path: Path, key: str) -> None:
    m = small_model()
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    torch.save({key: m.state_dict(), "step": 700, "optimizer": opt.state_dict()}, tmp_path / "c.pt")
    ck = load_checkpoint(tmp_path / "c.pt")
    assert_same_weights(ck.state_dict, m)
    assert ck.step == 700
    assert ck.lr == pytest.approx(0.05)
    assert ck.metadata["optimizer"]["hyperparameters"]["momentum"] == pytest.approx(0.9)
    assert ck.metadata["optimizer"]["name"] == "SGD"


def test_lightning_style_ckpt(tmp_path: Path) -> None:
    m = small_model()
    opt = torch.optim.Adam(m.parameters(), lr=3e-4)
    state = {f"model.{k}": v for k, v in m.state_dict().items()}
    payload = {
        "epoch": 3,
        "global_step": 1200,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": state,
        "optimizer_states": [opt.state_dict()],
        "lr_schedulers": [],
    }
    torch.save(payload, tmp_path / "epoch=3-step=1200.ckpt")
    ck = load_checkpoint(tmp_path / "epoch=3-step=1200.ckpt")
    assert ck.step == 1200
    assert ck.lr == pytest.approx(3e-4)
    assert ck.metadata["optimizer"]["name"] == "Adam"
    assert set(ck.state_dict) == set(state)


def test_safetensors_roundtrip_keeps_metadata(tmp_path: Path) -> None:
    m = small_model()
    save_checkpoint(
        tmp_path / "m.safetensors", m, step=42, lr=0.1, model_factory="diagnostics.examples.digits:build_mlp"
    )
    ck = load_checkpoint(tmp_path / "m.safetensors")
    assert_same_weights(ck.state_dict, m)
    assert ck.step == 42 and ck.lr == pytest.approx(0.1)
    assert ck.factories["model"] == "diagnostics.examples.digits:build_mlp"


def test_save_checkpoint_roundtrip_with_optimizer(tmp_path: Path) -> None:
    m = small_model()
    opt = torch.optim.SGD(m.parameters(), lr=0.2, momentum=0.5, nesterov=True)
    m(torch.randn(5, 4)).sum().backward()
    opt.step()
    p = save_checkpoint(
        tmp_path / "s.pt",
        m,
        step=9,
        optimizer=opt,
        model_factory="pkg.mod:build",
        data_factory="pkg.mod:data",
        loss="mse",
        model_kwargs={"width": 3},
    )
    ck = load_checkpoint(p)
    assert_same_weights(ck.state_dict, m)
    assert ck.step == 9 and ck.lr == pytest.approx(0.2)
    hp = ck.metadata["optimizer"]["hyperparameters"]
    assert ck.metadata["optimizer"]["name"] == "SGD" and hp["nesterov"] is True and hp["momentum"] == 0.5
    assert ck.factories == {
        "model": "pkg.mod:build",
        "data": "pkg.mod:data",
        "loss": "mse",
        "model_kwargs": {"width": 3},
    }
    assert "state" in ck.optimizer_state  # momentum buffers travel


def test_step_from_file_name(tmp_path: Path) -> None:
    torch.save(small_model().state_dict(), tmp_path / "step_02000.pt")
    ck = load_checkpoint(tmp_path / "step_02000.pt")
    assert ck.step == 2000 and ck.metadata["step_source"] == "file name"


@pytest.mark.parametrize(
    "name, step",
    [
        ("step_2000.pt", 2000),
        ("step_02000.pt", 2000),
        ("step-2000.pt", 2000),
        ("step2000.pt", 2000),
        ("step=120.ckpt", 120),
        ("epoch=3-step=120.ckpt", 120),
        ("model_step_300_final.pth", 300),
        ("global_step1200.pt", 1200),
        ("global_step_1200", 1200),
        ("iter_250.pt", 250),
        ("iteration-250.pt", 250),
        ("checkpoint-500", 500),
        ("checkpoint-500/model.safetensors", 500),
        ("run/step_40/weights.pt", 40),
        # issue 18: numbers that are not steps are not steps
        ("quad2.pt", None),
        ("resnet50.pt", None),
        ("ckpt_00050.pth", None),  # counts checkpoints, not steps
        ("epoch=3.ckpt", None),  # an epoch is not a step
        ("model-v2.pt", None),
        ("mystep_2.pt", None),
        ("my_checkpoint-500.pt", 500),
        ("mycheckpoint-500.pt", None),
        ("final.pt", None),
    ],
)
def test_step_only_from_recognised_name_patterns(name: str, step: int | None) -> None:
    assert step_from_name(name) == step


def test_unrecognised_names_give_no_step(tmp_path: Path) -> None:
    """Issue 18: quad2.pt was reported as step 2 (and resnet50.pt would be step 50)."""
    for name in ("quad2.pt", "resnet50.pt"):
        torch.save(small_model().state_dict(), tmp_path / name)
        ck = load_checkpoint(tmp_path / name)
        assert ck.step is None and "step_source" not in ck.metadata
    torch.save({"state_dict": small_model().state_dict(), "epoch": 3}, tmp_path / "e.ckpt")
    assert load_checkpoint(tmp_path / "e.ckpt").step is None  # metadata: global_step/step, not epoch
    torch.save({"state_dict": small_model().state_dict(), "epoch": 3, "global_step": 90}, tmp_path / "g.ckpt")
    assert load_checkpoint(tmp_path / "g.ckpt").step == 90


@pytest.mark.parametrize(
    "content, match",
    [
        (b"", "empty"),
        (
            bytes(
                torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(1), dtype=torch.uint8).tolist()
            ),
            "not a readable PyTorch checkpoint",
        ),
        (b"\x80\x02" + bytes(range(256)) * 4, "not a readable PyTorch checkpoint"),
        (b"PK\x03\x04" + bytes(range(200)), "not a readable PyTorch checkpoint"),
    ],
)
def test_broken_files(tmp_path: Path, content: bytes, match: str) -> None:
    p = tmp_path / "bad.pt"
    p.write_bytes(content)
    with pytest.raises(DiagnosticsError, match=match):
        load_checkpoint(p)


def test_truncated_checkpoint(tmp_path: Path) -> None:
    p = tmp_path / "t.pt"
    torch.save(small_model().state_dict(), p)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(DiagnosticsError, match="truncated or corrupt"):
        load_checkpoint(p)


def test_missing_and_directory(tmp_path: Path) -> None:
    with pytest.raises(DiagnosticsError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(DiagnosticsError, match="directory"):
        load_checkpoint(tmp_path)


class _Exploit:
    """Unpickling this runs os.system: a checkpoint must never get to do that."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_code_carrying_pickle_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    p = tmp_path / "evil.pt"
    torch.save({"model": small_model().state_dict(), "payload": _Exploit(marker)}, p)
    with pytest.raises(DiagnosticsError, match=r"asks to import 'posix.system'.*weights_only"):
        load_checkpoint(p)
    assert not marker.exists()
    # the same with a raw pickle (not a torch zip file)
    raw = tmp_path / "evil.pkl"
    raw.write_bytes(pickle.dumps(_Exploit(marker)))
    with pytest.raises(DiagnosticsError):
        load_checkpoint(raw)
    assert not marker.exists()


def test_dict_without_weights_lists_what_it_found(tmp_path: Path) -> None:
    torch.save({"weights": small_model().state_dict(), "step": 1}, tmp_path / "w.pt")
    with pytest.raises(DiagnosticsError, match=r"tensor dicts found under \['weights'\]"):
        load_checkpoint(tmp_path / "w.pt")


def test_non_dict_object(tmp_path: Path) -> None:
    torch.save([torch.zeros(2)], tmp_path / "l.pt")
    with pytest.raises(DiagnosticsError, match="holds a list"):
        load_checkpoint(tmp_path / "l.pt")


def test_nonfinite_weights_are_named() -> None:
    sd = small_model().state_dict()
    sd["2.weight"][0, 0] = float("nan")
    sd["2.weight"][1, 1] = float("inf")
    with pytest.raises(DiagnosticsError, match=r"'2.weight' has 1 NaN and 1 inf"):
        check_finite(sd, "checkpoint")


# ------------------------------------------------------------------ malformed diagnostics containers
def _tagged(tmp_path: Path, **entries) -> Path:
    from diagnostics.checkpoint import FORMAT_TAG

    path = tmp_path / "tagged.pt"
    torch.save({"format": FORMAT_TAG, **entries}, path)
    return path


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ({"model": 5}, r"'model' entry is an int, not a dict of tensors"),
        ({}, r"has no 'model' entry"),
        ({"model": {}}, r"'model' entry holds no tensors"),
        ({"model": {"w": torch.zeros(2), "b": "text"}}, r"'model' entry holds a str under 'b'"),
        ({"model": {"w": torch.zeros(2), "n": [1, 2]}}, r"'model' entry holds a list under 'n'"),
        ({"model": {"w": torch.zeros(2)}, "metadata": [1, 2]}, r"'metadata' entry is a list, not a dict"),
        ({"model": {"w": torch.zeros(2)}, "metadata": "x"}, r"'metadata' entry is a str, not a dict"),
        ({"model": {"w": torch.zeros(2)}, "optimizer": 3.5}, r"'optimizer' entry is a float, not a dict"),
    ],
)
def test_malformed_diagnostics_container_names_file_and_field(tmp_path: Path, entries: dict, message: str) -> None:
    path = _tagged(tmp_path, **entries)
    with pytest.raises(DiagnosticsError, match=message) as info:
        load_checkpoint(path)
    text = str(info.value)
    assert str(path) in text and "\n" not in text and "save_checkpoint" in text


def test_diagnostics_container_without_metadata_still_loads(tmp_path: Path) -> None:
    m = small_model()
    ck = load_checkpoint(_tagged(tmp_path, model=m.state_dict(), metadata=None))
    assert_same_weights(ck.state_dict, m)
    assert ck.optimizer_state is None


# ------------------------------------------------------------------ tensors that are not dense weights
def _with(tmp_path: Path, name: str, tensor: torch.Tensor) -> Path:
    sd = small_model().state_dict()
    sd["0.weight"] = tensor
    path = tmp_path / f"{name}.pt"
    torch.save({"model": sd}, path)
    return path


@pytest.mark.parametrize(
    ("name", "make", "message"),
    [
        ("coo", lambda w: w.to_sparse(), r"'0.weight' is a sparse_coo tensor.*to_dense"),
        ("csr", lambda w: w.to_sparse_csr(), r"'0.weight' is a sparse_csr tensor.*to_dense"),
        ("meta", lambda w: torch.empty_like(w, device="meta"), r"'0.weight' is a meta tensor \(shape only"),
    ],
)
def test_sparse_and_meta_tensors_are_refused_by_name(tmp_path: Path, name: str, make, message: str) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sparse CSR is "beta"
        tensor = make(small_model().state_dict()["0.weight"])
        path = _with(tmp_path, name, tensor)
        with pytest.raises(DiagnosticsError, match=message):
            load_checkpoint(path)
        with pytest.raises(DiagnosticsError, match=message):
            check_finite({"0.weight": tensor}, "checkpoint")


@pytest.mark.parametrize("dtype", ["float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz"])
def test_float8_weights_are_checked_for_finiteness(dtype: str) -> None:
    if not hasattr(torch, dtype):
        pytest.skip(f"torch has no {dtype}")
    w = torch.tensor([[0.5, -1.0], [2.0, 0.25]])
    check_finite({"w": w.to(getattr(torch, dtype))}, "checkpoint")  # finite: fine
    w[0, 0] = float("nan")
    with pytest.raises(DiagnosticsError, match=r"'w' has 1 NaN"):
        check_finite({"w": w.to(getattr(torch, dtype))}, "checkpoint")


def _npy(path: Path) -> None:
    import numpy as np

    with open(path, "wb") as fh:
        np.save(fh, np.zeros(3))


def _zip(path: Path) -> None:
    import zipfile

    with zipfile.ZipFile(path, "w") as z:
        z.writestr("notes.txt", "x")


def _safetensors(path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(path))


@pytest.mark.parametrize(
    "write, kind",
    [
        (lambda p: p.write_text("epoch 3: loss 0.1\n"), "is a text file"),
        (_zip, "is a zip archive without torch.save's data.pkl (it holds notes.txt)"),
        (_npy, "is a NumPy .npy array"),
        (lambda p: p.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(64)), "is an HDF5 file"),
        (lambda p: p.write_bytes(__import__("gzip").compress(b"abc")), "is a gzip archive"),
        (_safetensors, "is a safetensors file under another suffix (rename it to .safetensors)"),
    ],
)
def test_a_file_of_another_kind_is_named_as_such(tmp_path: Path, write, kind: str) -> None:
    path = tmp_path / "model.pt"
    write(path)
    with pytest.raises(DiagnosticsError) as err:
        load_checkpoint(path)
    msg = str(err.value)
    assert kind in msg and "not a PyTorch checkpoint" in msg and "\n" not in msg
    assert "Error:" not in msg and "enforce fail" not in msg  # no internal exception text


def test_a_truncated_checkpoint_is_still_called_truncated(tmp_path: Path) -> None:
    good = tmp_path / "good.pt"
    torch.save({"w": torch.zeros(64)}, good)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(DiagnosticsError, match="truncated or corrupt"):
        load_checkpoint(bad)


def test_steps_that_are_not_whole_int64_numbers_are_unknown(tmp_path: Path) -> None:
    from diagnostics.checkpoint import STEP_MAX, whole_step

    assert [whole_step(v) for v in (0, 7, 7.0, STEP_MAX)] == [0, 7, 7, STEP_MAX]
    for bad in (float("nan"), float("inf"), 1.5, -1, STEP_MAX + 1, 10**30, True, "7", None):
        assert whole_step(bad) is None
    sd = nn.Linear(2, 2).state_dict()
    for value in (float("nan"), 1.5, 2**70):  # int(nan) raised ValueError; 1.5 became 1; 2**70 broke int64 tables
        torch.save({"model": sd, "step": value}, tmp_path / "c.pt")
        assert load_checkpoint(tmp_path / "c.pt").step is None
    torch.save({"model": sd, "step": 12.0}, tmp_path / "c.pt")
    assert load_checkpoint(tmp_path / "c.pt").step == 12
    assert step_from_name(f"step_{10**30}.pt") is None and step_from_name(f"step_{STEP_MAX}.pt") == STEP_MAX
    torch.save(sd, tmp_path / f"step_{10**30}.pt")
    assert load_checkpoint(tmp_path / f"step_{10**30}.pt").step is None


@pytest.mark.parametrize(
    "value,shown",
    [(float("nan"), "nan"), (1e30, "1e+30"), (-3, "-3"), (2.5, "2.5"), (2**70, "an integer of 71 bits")],
)
def test_an_unusable_stored_step_says_why_and_what_was_used(tmp_path: Path, value: object, shown: str) -> None:
    from diagnostics.checkpoint import unusable_step_note

    sd = nn.Linear(2, 2).state_dict()
    torch.save({"model": sd, "step": value}, tmp_path / "last.pt")
    ck = load_checkpoint(tmp_path / "last.pt")
    assert ck.step is None and ck.metadata["step_unusable"] == shown
    note = unusable_step_note(ck)
    assert note is not None and f"the stored step {shown} is not a whole number" in note
    assert "the step is unknown" in note and note.endswith("save the step as an integer")
    torch.save({"model": sd, "global_step": value}, tmp_path / "step_40.pt")  # the name still gives one
    ck = load_checkpoint(tmp_path / "step_40.pt")
    assert ck.step == 40 and "so step 40 is taken from the file name" in str(unusable_step_note(ck))
    torch.save({"model": sd, "step": 7}, tmp_path / "ok.pt")
    assert unusable_step_note(load_checkpoint(tmp_path / "ok.pt")) is None


def test_stored_values_are_shown_without_their_repr() -> None:
    from diagnostics.checkpoint import shown_value

    nested: list = []
    for _ in range(60):
        nested = [nested, nested]  # its repr would take 2**60 steps
    assert shown_value(nested) == "a list" and shown_value({"a": 1}) == "a dict"
    assert shown_value("x" * 1000) == repr("x" * 30 + "...") and shown_value(10**5000) == "an integer of 16610 bits"
    assert shown_value(None) == "None" and shown_value(True) == "True"


@pytest.mark.parametrize("head", [b"2026-12-03 epoch 3: loss 0.1\n", b"%PDF-1.7\n", b"\x89PNG\r\n\x1a\n"])
def test_a_large_file_of_another_kind_is_refused_from_its_first_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, head: bytes
) -> None:
    import diagnostics.checkpoint as ck

    path = tmp_path / "step_5.pt"
    with open(path, "wb") as fh:
        fh.write(head * 200)  # a log fills its first 4 KiB with text
        fh.truncate(64 << 20)  # sparse: 64 MiB that the refusal never reads
    monkeypatch.setattr(ck.hashlib, "sha256", lambda *a: pytest.fail("the whole file was read and hashed"))
    with pytest.raises(DiagnosticsError, match="not a PyTorch checkpoint; pass the checkpoint file"):
        ck.read_checkpoint_file(path)


def test_head_kind_leaves_checkpoint_layouts_to_the_whole_file(tmp_path: Path) -> None:
    from diagnostics.checkpoint import HEAD_BYTES, head_kind

    torch.save({"w": torch.zeros(4)}, tmp_path / "zip.pt")
    torch.save({"w": torch.zeros(4)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    _safetensors(tmp_path / "w.safetensors")
    for name in ("zip.pt", "legacy.pt", "w.safetensors"):
        assert head_kind((tmp_path / name).read_bytes()[:HEAD_BYTES]) is None, name
    assert head_kind(b"") is None and head_kind(bytes(range(256))) is None
    # a multi-byte character cut by the 4 KiB head is still text
    assert head_kind(("x" * (HEAD_BYTES - 1) + "é").encode()[:HEAD_BYTES]) == "a text file"
    assert head_kind(b"loss \xff\xfe 0.1") is None


def test_trainer_state_steps_are_whole_numbers_or_say_why() -> None:
    from diagnostics.checkpoint import trainer_state_metadata

    assert trainer_state_metadata({"global_step": 5})["step"] == 5
    assert trainer_state_metadata({"global_step": 5.0})["step"] == 5  # JSON writers may give 5.0
    for value, shown in ((1.5, "1.5"), (-2, "-2"), ("12", "'12'"), ([3], "a list")):
        meta = trainer_state_metadata({"global_step": value})
        assert "step" not in meta and meta["step_unusable"] == shown
    assert trainer_state_metadata({}) == {}
