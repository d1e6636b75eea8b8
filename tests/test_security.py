"""Hostile checkpoints and working directories: no code ever runs, exit 2, one line on stderr.

Every case plants a marker file that the attack would create (a shell command, an unpickled object,
an imported module, a factory call) and runs it through ``diag hessian``, ``diag weights`` and
``diag run`` (Typer's CliRunner, in process). A case passes when the command exits 2 with exactly one
``diag: error:`` line on stderr, no traceback, and the marker was never created.

Issue 10, failure 1: a checkpoint naming ``diagnostics.examples.digits:torch.serialization.os.system``
(or ``...:torch.load`` with ``weights_only=False``) ran a shell command with no flag. Failure 2: a
``sklearn.py`` in the working directory shadowed scikit-learn.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from diag_cli.main import app
from diagnostics.binding import import_callable, resolve_binding
from diagnostics.checkpoint import load_checkpoint, save_checkpoint
from diagnostics.errors import DiagnosticsError
from diagnostics.examples.digits import build_mlp

runner = CliRunner()
DIGITS_MLP = "diagnostics.examples.digits:build_mlp"
DIGITS_DATA = "diagnostics.examples.digits:train_data"


def diag(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def assert_refused(result, marker: Path, fragment: str = "") -> None:
    """Exit 2, exactly one ``diag: error:`` line on stderr, no traceback, and the marker never made."""
    assert not marker.exists(), f"code ran: {marker} was created"
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("diag: error: "), lines[0]
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.output


class _System:
    """Unpickling this runs ``os.system(command)``."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _touch(marker: Path) -> str:
    return f"touch {marker}"


def _model() -> torch.nn.Module:
    return build_mlp(width=4)


# ------------------------------------------------------------------------- hostile file content
def _pickle_torch_zip(path: Path, marker: Path) -> None:
    torch.save({"model": _model().state_dict(), "payload": _System(_touch(marker))}, path)


def _pickle_raw(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps({"model": _System(_touch(marker))}, protocol=2))


def _pickle_legacy_torch(path: Path, marker: Path) -> None:
    torch.save({"model": _System(_touch(marker))}, path, _use_new_zipfile_serialization=False)


def _pickle_protocol0_exec(path: Path, marker: Path) -> None:
    code = f"__import__('os').system('touch {marker}')"
    path.write_bytes(b"cbuiltins\nexec\n(V" + code.encode() + b"\ntR.")


def _pickle_inst_popen(path: Path, marker: Path) -> None:
    path.write_bytes(b"(V" + _touch(marker).encode() + b"\nios\npopen\n.")


def _pickle_in_zip_data_pkl(path: Path, marker: Path) -> None:
    """A torch zip whose data.pkl itself (not a nested object) is the os.system call."""
    good = io.BytesIO()
    torch.save(_model().state_dict(), good)
    src = zipfile.ZipFile(io.BytesIO(good.getvalue()))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("data.pkl"):
                data = pickle.dumps(_System(_touch(marker)), protocol=2)
            dst.writestr(info, data)


def _zip_path_traversal(path: Path, marker: Path) -> None:
    torch.save(_model().state_dict(), path)
    rel = os.path.relpath(marker, path.parent)
    with zipfile.ZipFile(path, "a") as zf:
        zf.writestr("../" * 8 + str(marker).lstrip("/"), b"escaped")
        zf.writestr(rel, b"escaped")


def _zip_bomb(path: Path, marker: Path) -> None:
    """A torch archive whose data.pkl inflates to 64 MiB of zeros (torch.save never compresses)."""
    good = io.BytesIO()
    torch.save(_model().state_dict(), good)
    src = zipfile.ZipFile(io.BytesIO(good.getvalue()))
    with zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            if info.filename.endswith("data.pkl"):
                dst.writestr(info.filename, b"\0" * (64 << 20), compress_type=zipfile.ZIP_DEFLATED)
            else:
                dst.writestr(info, src.read(info))


def _zip_lying_sizes(path: Path, marker: Path) -> None:
    """Central directory claims a 4 GiB member in a tiny file."""
    torch.save(_model().state_dict(), path)
    data = bytearray(path.read_bytes())
    pos = data.rfind(b"PK\x01\x02")  # last central directory header
    struct.pack_into("<I", data, pos + 24, 0xFFFFFFF0)  # uncompressed size
    path.write_bytes(bytes(data))


def _safetensors(path: Path, header: dict | bytes, body: bytes = b"", length: int | None = None) -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + body)


def _st_huge_header(path: Path, marker: Path) -> None:
    _safetensors(path, {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, length=2**62)


def _st_not_json(path: Path, marker: Path) -> None:
    _safetensors(path, b"{not json at all" + b" " * 16)


def _st_offsets_past_end(path: Path, marker: Path) -> None:
    _safetensors(path, {"w": {"dtype": "F32", "shape": [1 << 20], "data_offsets": [0, 4 << 20]}}, b"\0" * 16)


def _st_overlapping(path: Path, marker: Path) -> None:
    header = {
        "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]},
    }
    _safetensors(path, header, b"\0" * 24)


def _st_bad_dtype(path: Path, marker: Path) -> None:
    _safetensors(path, {"w": {"dtype": "PYOBJ", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8)


def _st_nested_metadata(path: Path, marker: Path) -> None:
    deep = "[" * 200_000 + "]" * 200_000
    header = {"__metadata__": {"diagnostics": deep}, "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    _safetensors(path, header, b"\0" * 8)


FILE_CASES: dict[str, Callable[[Path, Path], None]] = {
    "torch zip with an os.system object": _pickle_torch_zip,
    "raw pickle with an os.system object": _pickle_raw,
    "legacy torch format with os.system": _pickle_legacy_torch,
    "protocol-0 pickle calling builtins.exec": _pickle_protocol0_exec,
    "INST opcode calling os.popen": _pickle_inst_popen,
    "torch zip whose data.pkl is os.system": _pickle_in_zip_data_pkl,
    "zip member names escaping the folder": _zip_path_traversal,
    "zip bomb (deflated 64 MiB member)": _zip_bomb,
    "zip directory lying about sizes": _zip_lying_sizes,
    "safetensors header length 2^62": _st_huge_header,
    "safetensors header not JSON": _st_not_json,
    "safetensors offsets past the end": _st_offsets_past_end,
    "safetensors overlapping tensors": _st_overlapping,
    "safetensors unknown dtype": _st_bad_dtype,
    "safetensors metadata nested 200k deep": _st_nested_metadata,
}


def _suffix(case: str) -> str:
    return ".safetensors" if case.startswith("safetensors") else ".pt"


@pytest.mark.parametrize("case", sorted(FILE_CASES))
def test_hostile_file_is_refused_by_every_command(case: str, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    ckpt = run_dir / f"evil{_suffix(case)}"
    FILE_CASES[case](ckpt, marker)
    before = ckpt.read_bytes()
    assert_refused(diag("hessian", ckpt, "--model", DIGITS_MLP, "--data", DIGITS_DATA), marker)
    assert_refused(diag("weights", ckpt, "--model", DIGITS_MLP), marker)
    assert_refused(diag("run", run_dir, "--out", tmp_path / "out", "--fail-fast", "--model", DIGITS_MLP), marker)
    assert ckpt.read_bytes() == before
    assert not any(p.name == "pwned" for p in Path("/").glob("pwned"))


def test_zip_bomb_is_refused_before_inflating(tmp_path: Path) -> None:
    """The bomb's member is never inflated: refused on the archive's directory alone."""
    p = tmp_path / "bomb.pt"
    _zip_bomb(p, tmp_path / "unused")
    with pytest.raises(DiagnosticsError, match="compressed"):
        load_checkpoint(p)


# ---------------------------------------------------------------------- hostile factory names
def _evil_module(folder: Path, name: str, marker: Path) -> Path:
    p = folder / f"{name}.py"
    p.write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).touch()\ndef build(**kw):\n    Path({str(marker)!r}).touch()\n"
    )
    return p


def _factory_cases(tmp_path: Path, marker: Path) -> dict[str, tuple[dict, list[str]]]:
    """name -> (save_checkpoint keyword arguments, extra CLI flags)."""
    evil_pkl = tmp_path / "evil.pkl"
    evil_pkl.write_bytes(pickle.dumps(_System(_touch(marker))))
    evil_file = _evil_module(tmp_path, "evil_file", marker)
    _evil_module(Path.cwd(), "evil_in_cwd", marker)
    trust = ["--trust-checkpoint-factories"]
    os_system = {"model_factory": "diagnostics.examples.digits:torch.serialization.os.system"}
    return {
        "dotted path to os.system (issue 10.1)": ({**os_system, "model_kwargs": {"command": _touch(marker)}}, []),
        "dotted path to os.system, trusted": ({**os_system, "model_kwargs": {"command": _touch(marker)}}, trust),
        "torch.load weights_only=False (issue 10.1)": (
            {
                "model_factory": "diagnostics.examples.digits:torch.load",
                "model_kwargs": {"f": str(evil_pkl), "weights_only": False},
            },
            [],
        ),
        "imported module os": ({"model_factory": "diagnostics.examples.digits:os"}, []),
        "examples helper that writes files": (
            {"model_factory": "diagnostics.examples.digits:train_gd", "model_kwargs": {"out": str(marker)}},
            [],
        ),
        "attribute path after the package": ({"model_factory": "diagnostics.examples:digits.build_mlp"}, []),
        "prefix lookalike module": ({"model_factory": "diagnostics.examples.digits_evil:build"}, []),
        "os:system": ({"model_factory": "os:system", "model_kwargs": {"command": _touch(marker)}}, []),
        "os:system, trusted (defined in posix)": (
            {"model_factory": "os:system", "model_kwargs": {"command": _touch(marker)}},
            trust,
        ),
        "builtins:exec": ({"model_factory": "builtins:exec", "model_kwargs": {"source": _touch(marker)}}, []),
        "file.py spec": ({"model_factory": f"{evil_file}:build"}, []),
        "file.py spec, trusted": ({"model_factory": f"{evil_file}:build"}, trust),
        "module in the working directory": ({"model_factory": "evil_in_cwd:build"}, []),
        "relative import": ({"model_factory": ".evil_in_cwd:build"}, trust),
        "data factory with a dotted path": (
            {
                "model_factory": DIGITS_MLP,
                "data_factory": "diagnostics.examples.digits:torch.serialization.os.system",
                "data_kwargs": {"command": _touch(marker)},
            },
            [],
        ),
        "loss naming os.system": (
            {"model_factory": DIGITS_MLP, "data_factory": DIGITS_DATA, "loss": "os:system"},
            [],
        ),
    }


def _case_names() -> list[str]:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        cwd = os.getcwd()
        os.chdir(d)
        try:
            return sorted(_factory_cases(Path(d), Path(d) / "m"))
        finally:
            os.chdir(cwd)


@pytest.mark.parametrize("case", _case_names())
def test_hostile_factory_names_never_run(case: str, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    kwargs, flags = _factory_cases(tmp_path, marker)[case]
    kwargs = {"data_factory": DIGITS_DATA, **kwargs}
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    ckpt = save_checkpoint(run_dir / "step_00010.pt", _model(), step=10, **kwargs)
    data_or_loss = ("data_factory" in kwargs and kwargs["data_factory"] != DIGITS_DATA) or "loss" in kwargs
    assert_refused(diag("hessian", ckpt, *flags), marker)
    if not data_or_loss:  # weights binds the model only (data and loss are never imported there)
        assert_refused(diag("weights", ckpt, *flags), marker)
    assert_refused(diag("run", run_dir, "--out", tmp_path / "out", "--fail-fast", *flags), marker)


def test_safetensors_metadata_cannot_name_factories_either(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    p = save_checkpoint(
        tmp_path / "m.safetensors",
        _model(),
        model_factory="diagnostics.examples.digits:torch.serialization.os.system",
        model_kwargs={"command": _touch(marker)},
        data_factory=DIGITS_DATA,
    )
    assert_refused(diag("hessian", p), marker, "not trusted")
    assert_refused(diag("weights", p), marker, "not trusted")


def test_reexported_name_listed_in_diag_toml_is_refused(tmp_path: Path) -> None:
    """Trusting a name in diag.toml trusts what that module *defines*, not what it imports."""
    marker = tmp_path / "pwned"
    (tmp_path / "reexp_mod.py").write_text("from os import system\n")
    (tmp_path / "diag.toml").write_text('trusted_factories = ["reexp_mod:system"]\n')
    p = save_checkpoint(
        tmp_path / "m.pt",
        _model(),
        model_factory="reexp_mod:system",
        model_kwargs={"command": _touch(marker)},
        data_factory=DIGITS_DATA,
    )
    assert_refused(diag("hessian", p), marker, "defined in 'posix'")


def test_example_factories_are_trusted_by_explicit_list_only() -> None:
    ok = resolve_binding({"model": DIGITS_MLP, "data": DIGITS_DATA})
    assert ok.model == DIGITS_MLP
    for name in (
        "diagnostics.examples.digits:train_gd",
        "diagnostics.examples.digits:torch.load",
        "diagnostics.examples.detector:train_detector",
        "diagnostics.examples.digits:os",
    ):
        with pytest.raises(DiagnosticsError, match="not trusted"):
            resolve_binding({"model": name, "data": DIGITS_DATA})


def test_flags_keep_file_specs_and_cwd_modules(tmp_path: Path) -> None:
    """What the user types is theirs to run: file.py specs and modules in the working directory."""
    (tmp_path / "mymodels.py").write_text("def build(width=3):\n    return width * 2\n")
    assert import_callable("mymodels:build")(width=4) == 8
    other = tmp_path / "sub"
    other.mkdir()
    (other / "things.py").write_text("def make():\n    return 'made'\n")
    assert import_callable(f"{other / 'things.py'}:make")() == "made"


# --------------------------------------------------------------------------- the working directory
def test_working_directory_never_shadows_an_installed_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In process: a stdlib module not imported yet is found in the standard library, not in the cwd."""
    marker = tmp_path / "pwned"
    name = "tabnanny"
    monkeypatch.delitem(sys.modules, name, raising=False)
    (tmp_path / f"{name}.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).touch()\ndef check(*a):\n    return 'shadow'\n"
    )
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])  # as `python -m` or a REPL would have it
    fn = import_callable(f"{name}:check")
    assert fn.__code__.co_filename != str(tmp_path / f"{name}.py")
    assert not marker.exists()


def test_sklearn_py_in_the_working_directory_is_not_imported(tmp_path: Path) -> None:
    """Issue 10.2 in a fresh interpreter whose path starts with the working directory (``python -c``, as
    ``python -m diag_cli.main`` and ``torchrun`` have it): the digits data factory imports scikit-learn
    lazily, inside the call, and gets the installed package, not ``./sklearn.py``."""
    marker = tmp_path / "pwned"
    (tmp_path / "sklearn.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).touch()\n")
    code = (
        "from diagnostics.binding import call_factory\n"
        f"x, y = call_factory({DIGITS_DATA!r}, {{'n': 5}}, 'data factory')\n"
        "print(tuple(x.shape))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert not marker.exists(), proc.stderr
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "(5, 64)"
