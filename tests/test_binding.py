"""Binding: import specs, losses, diag.toml, priorities, and the security rule for checkpoint factories."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from diagnostics.binding import (
    LOSSES,
    call_factory,
    check_checkpoint_spec,
    find_config,
    import_callable,
    load_config,
    resolve_binding,
    resolve_loss,
)
from diagnostics.errors import DiagnosticsError


def write_module(folder: Path, name: str, body: str) -> Path:
    p = folder / f"{name}.py"
    p.write_text(body)
    return p


def test_import_from_module_in_cwd_and_from_file(tmp_path: Path) -> None:
    write_module(tmp_path, "mymods_a", "def build():\n    return 41\n")
    assert import_callable("mymods_a:build")() == 41
    f = write_module(tmp_path, "other_file", "def make(x=1):\n    return x + 1\n")
    assert import_callable(f"{f}:make")(x=2) == 3


@pytest.mark.parametrize(
    "spec, match",
    [
        ("no_colon", "not of the form"),
        ("definitely_not_a_module_xyz:build", "cannot import module"),
        ("json:not_there", "has no attribute 'not_there'"),
        ("json:__doc__", "not a callable"),
        ("missing_file.py:build", "no such file"),
    ],
)
def test_import_errors_are_one_line(spec: str, match: str) -> None:
    with pytest.raises(DiagnosticsError, match=match) as exc:
        import_callable(spec)
    assert "\n" not in str(exc.value)


def test_module_that_raises_on_import(tmp_path: Path) -> None:
    write_module(tmp_path, "broken_mod_b", "raise RuntimeError('boom at import')\n")
    with pytest.raises(DiagnosticsError, match="raised RuntimeError: boom at import"):
        import_callable("broken_mod_b:build")


def test_factory_that_raises() -> None:
    with pytest.raises(DiagnosticsError, match=r"model factory 'math:sqrt' raised TypeError"):
        call_factory("math:sqrt", {"nonsense": 1}, "model factory")


def test_factory_calling_sys_exit_is_a_one_line_error(tmp_path: Path) -> None:
    # was: SystemExit went through, and diag ended with the factory's status and no word
    write_module(tmp_path, "exits_c", "import sys\n\ndef build():\n    sys.exit('no GPU here')\n")
    with pytest.raises(DiagnosticsError, match=r"model 'exits_c:build': it called sys.exit\('no GPU here'\)") as exc:
        call_factory("exits_c:build", {}, "model")
    assert "\n" not in str(exc.value) and "must return" in str(exc.value)


@pytest.mark.parametrize("spec", ["exits_on_import_d:build", "exits_on_import_e.py:build"])
def test_module_calling_sys_exit_on_import_is_a_one_line_error(spec: str, tmp_path: Path) -> None:
    name = spec.split(":")[0].removesuffix(".py")
    write_module(tmp_path, name, "import sys\n\ndef build():\n    return 1\n\nsys.exit(4)\n")
    for _ in range(2):  # the half-run module is not kept: the second import says the same
        with pytest.raises(DiagnosticsError, match=r"importing it called sys.exit\(4\); put the script part"):
            call_factory(spec, {}, "data")


def test_keyboard_interrupt_in_a_factory_still_interrupts(tmp_path: Path) -> None:
    write_module(tmp_path, "ctrl_c_f", "def build():\n    raise KeyboardInterrupt\n")
    with pytest.raises(KeyboardInterrupt):
        call_factory("ctrl_c_f:build", {}, "model")


def test_factory_prints_go_to_stderr(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # was: on stdout, in the middle of --format json records
    write_module(tmp_path, "noisy_g", "print('at import')\n\ndef build():\n    print('at call')\n    return 5\n")
    assert call_factory("noisy_g:build", {}, "model") == 5
    assert resolve_loss("noisy_g:build")[1] == "noisy_g:build"
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == "at import\nat call\n"


def test_losses() -> None:
    out = torch.randn(6, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    assert torch.allclose(LOSSES["cross_entropy"](out, y), F.cross_entropy(out, y))
    assert torch.allclose(LOSSES["mse"](out, y), F.mse_loss(out, F.one_hot(y, 4).double()))
    assert torch.allclose(LOSSES["mse"](out, out * 2), F.mse_loss(out, out * 2))
    logp = out.log_softmax(1)
    assert torch.allclose(LOSSES["nll"](logp, y), F.nll_loss(logp, y))
    t = (torch.rand(6, 4) > 0.5).double()
    assert torch.allclose(LOSSES["bce_with_logits"](out, t), F.binary_cross_entropy_with_logits(out, t))
    assert resolve_loss("mse")[1] == "mse"
    assert resolve_loss("torch.nn.functional:l1_loss")[0] is F.l1_loss
    with pytest.raises(DiagnosticsError, match="unknown loss 'hinge'"):
        resolve_loss("hinge")


def test_priorities_flags_then_config_then_checkpoint(tmp_path: Path) -> None:
    ck = {
        "model": "diagnostics.examples.digits:build_mlp",
        "data": "diagnostics.examples.digits:train_data",
        "loss": "mse",
        "model_kwargs": {"width": 16},
    }
    b = resolve_binding(ck)
    assert (b.model, b.data, b.loss) == (ck["model"], ck["data"], "mse")
    assert b.model_kwargs == {"width": 16} and b.sources["model"] == "checkpoint"
    cfg = {"data": "diagnostics.examples.digits:test_data", "_path": "diag.toml"}
    b = resolve_binding(ck, config=cfg, loss="cross_entropy")
    assert b.data == cfg["data"] and b.sources["data"].startswith("config")
    assert b.loss == "cross_entropy" and b.sources["loss"] == "flag"


def test_untrusted_checkpoint_factory_is_refused() -> None:
    ck = {"model": "os:system", "data": "diagnostics.examples.digits:train_data"}
    with pytest.raises(DiagnosticsError, match="not trusted"):
        resolve_binding(ck)
    # listed in diag.toml -> allowed; explicit trust flag -> allowed
    assert resolve_binding(ck, config={"trusted_factories": ["os:system"]}).model == "os:system"
    assert resolve_binding(ck, trust_checkpoint=True).model == "os:system"
    # a user flag always wins and never consults the checkpoint's name
    assert resolve_binding(ck, model="diagnostics.examples.digits:build_mlp").model.endswith("build_mlp")


def test_missing_parts_say_how_to_fix() -> None:
    with pytest.raises(DiagnosticsError, match="no model given: pass --model"):
        resolve_binding({})


def test_config_file(tmp_path: Path) -> None:
    (tmp_path / "diag.toml").write_text(
        'model = "diagnostics.examples.digits:build_mlp"\nmodel_kwargs = { width = 8 }\nseed = 3\n[hessian]\ntop_k = 4\n'
    )
    path = find_config(None, tmp_path)
    cfg = load_config(path)
    assert cfg["seed"] == 3 and cfg["hessian"]["top_k"] == 4
    b = resolve_binding({}, config=cfg, data="diagnostics.examples.digits:train_data")
    assert b.model_kwargs == {"width": 8}
    (tmp_path / "bad.toml").write_text("model = [unclosed")
    with pytest.raises(DiagnosticsError, match="not valid TOML"):
        load_config(tmp_path / "bad.toml")
    with pytest.raises(DiagnosticsError, match="no such config file"):
        find_config(tmp_path / "absent.toml")


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"model = '\xff'\n", "not UTF-8 text"),
        (b'diag = "x"\n', "must be a table"),
    ],
)
def test_config_file_errors_are_one_line(tmp_path: Path, content: bytes, match: str) -> None:
    path = tmp_path / "diag.toml"
    path.write_bytes(content)
    with pytest.raises(DiagnosticsError, match=match):
        load_config(path)
    with pytest.raises(DiagnosticsError, match="is a folder"):
        load_config(tmp_path)


@pytest.mark.parametrize(
    "spec",
    [
        "diagnostics.examples.digits:torch.load",
        "diagnostics.examples:digits.build_mlp",
        "/tmp/x.py:build",
        "x.py:build",
        ".relative:build",
        "mod:build ",
        "mod:",
        "mød:build",
        ["not", "a", "string"],
    ],
)
def test_checkpoint_specs_must_be_exact_module_callable_names(spec) -> None:
    with pytest.raises(DiagnosticsError, match="not an exact 'package.module:callable' name|not 'module:callable'"):
        check_checkpoint_spec(spec, "model factory")
    with pytest.raises(DiagnosticsError):
        resolve_binding({"model": spec, "data": "diagnostics.examples.digits:train_data"}, trust_checkpoint=True)


def test_checkpoint_names_must_be_defined_where_named() -> None:
    assert import_callable("json:dumps", from_checkpoint=True) is json.dumps
    with pytest.raises(DiagnosticsError, match="defined in 'posix', not in 'os'"):
        import_callable("os:system", "model factory", from_checkpoint=True)
    # a flag is the user's own choice: re-exports work there
    assert import_callable("os:getcwd")() == os.getcwd()


def test_checkpoint_kwargs_must_be_a_table() -> None:
    ck = {"model": "diagnostics.examples.digits:build_mlp", "data": "diagnostics.examples.digits:train_data"}
    with pytest.raises(DiagnosticsError, match="model_kwargs in the checkpoint must be a table"):
        resolve_binding({**ck, "model_kwargs": [1, 2]})
