"""Read and write checkpoints.

Formats read (always without executing code: ``torch.load(..., weights_only=True)``):

* a plain ``state_dict`` (``{name: Tensor}``);
* a dict with the weights under ``model``, ``state_dict``, ``model_state_dict`` or ``module``
  (a PyTorch Lightning ``.ckpt`` is such a dict: ``state_dict`` plus ``global_step``, ``optimizer_states``);
* a ``.safetensors`` file (metadata written by :func:`save_checkpoint` is kept in its header);
* a checkpoint written by :func:`save_checkpoint` (weights, step, lr, optimizer hyper-parameters and
  state, and the names of the model/data/loss factories, so ``diag hessian ckpt.pt`` needs no flags);
* a transformers *model folder* written by ``save_pretrained`` (``config.json`` + ``model.safetensors``,
  or shards listed in ``model.safetensors.index.json``, or ``pytorch_model.bin``), including the
  ``checkpoint-N/`` folders a ``transformers.Trainer`` writes: the step is ``global_step`` of
  ``trainer_state.json``, the learning rate the last one of its ``log_history``, the optimizer state
  ``optimizer.pt`` (read with ``weights_only=True``). ``training_args.bin``, ``rng_state.pth``,
  ``scheduler.pt`` and any Python file in the folder are never opened (pickles and code); the model is
  built from ``config.json`` by :mod:`diagnostics.hf` (no ``trust_remote_code``, ever).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import pickle
import re
import stat
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from diagnostics.errors import DiagnosticsError, one_line
from diagnostics.lazy import lazy_import

torch = lazy_import("torch")  # on first use: a sweep checks its arguments before torch is loaded

FORMAT_TAG = "diagnostics-checkpoint/1"
WEIGHT_KEYS = ("model", "state_dict", "model_state_dict", "module")
# metadata keys holding the training step (an epoch is not a step)
STEP_KEYS = ("step", "global_step", "iteration", "iter")
# a step token in a name: 'step_2000', 'step=120', 'global_step1200', 'iter_250', 'checkpoint-500'; it must
# start the name or follow a separator, and its digits must end the token
_STEP_IN_NAME = re.compile(
    r"(?:(?<=[_\-.=\s])|^)(?:(?:global_step|step|iteration|iter)[_=\-]?(\d+)|checkpoint-(\d+))(?![0-9A-Za-z])",
    re.IGNORECASE,
)


STEP_MAX = 2**63 - 1  # steps are stored as int64 (record tables, Parquet)


def no_such_checkpoint(path: str | Path) -> DiagnosticsError:
    """The error for a checkpoint path that does not exist (raised by the reader, and by the command line
    before anything is imported)."""
    return DiagnosticsError(f"no such checkpoint: '{path}'")


def shown_value(value: Any) -> str:
    """A stored metadata value as a note shows it: scalars as written (long strings and integers shortened),
    anything else by its type (never the repr of a structure, which can be enormous or deeply nested)."""
    if value is None or isinstance(value, (bool, float)):
        return repr(value)
    if isinstance(value, int):
        return repr(value) if value.bit_length() <= 64 else f"an integer of {value.bit_length()} bits"
    if isinstance(value, str):
        return repr(value[:30] + ("..." if len(value) > 30 else ""))
    return f"a {type(value).__name__}"


def unusable_step_note(checkpoint: Checkpoint) -> str | None:
    """Why a checkpoint's stored step was not used (None when it was, or none was stored)."""
    if "step_unusable" not in checkpoint.metadata:
        return None
    then = (
        f"step {checkpoint.step} is taken from the file name"
        if checkpoint.metadata.get("step_source") == "file name"
        else "the step is unknown (tables show it empty, plots and reports place it after the known steps)"
    )
    return (
        f"the stored step {checkpoint.metadata['step_unusable']} is not a whole number in 0..2**63-1, so {then}; "
        "save the step as an integer"
    )


def whole_step(value: Any) -> int | None:
    """``value`` as a training step: a whole number in ``0..2**63-1`` (an int, or a float with no fraction);
    None for anything else (NaN, 1.5, negative, beyond int64, a bool or a string: the step is then unknown,
    and a file name that states one gives it)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        return None
    step = int(value)
    return step if 0 <= step <= STEP_MAX else None


@dataclass
class Checkpoint:
    """Weights plus what is known about how they were trained.

    Attributes:
        path: where it was read from.
        state_dict: parameter and buffer tensors, on the CPU, keys as saved.
        metadata: ``step``, ``lr``, ``optimizer`` (``{"name", "hyperparameters"}``), ``factories``
            (``{"model", "data", "loss", "model_kwargs", "data_kwargs"}``) and anything else saved.
        optimizer_state: the optimizer's ``state_dict()`` when it was saved (Adam moments etc.).
        sha256: hash of the file content (used for caching).
    """

    path: Path
    state_dict: dict[str, torch.Tensor]
    metadata: dict[str, Any] = field(default_factory=dict)
    optimizer_state: dict[str, Any] | None = None
    sha256: str = ""
    model_config: dict[str, Any] | None = None

    @property
    def is_folder(self) -> bool:
        """A transformers model folder: the model is built from :attr:`model_config` (``config.json``)."""
        return self.model_config is not None

    @property
    def name(self) -> str:
        """The file or folder name (last component of :attr:`path`)."""
        return self.path.name

    @property
    def step(self) -> int | None:
        """The training step from the metadata (saved, or guessed from the file name); None when unknown."""
        return whole_step(self.metadata.get("step"))

    @property
    def lr(self) -> float | None:
        """The learning rate from the metadata; None when it was not saved."""
        lr = self.metadata.get("lr")
        return None if lr is None else float(lr)

    @property
    def factories(self) -> dict[str, Any]:
        """Factory names saved with the checkpoint; a model folder's model is its ``config.json``."""
        found = self.metadata.get("factories")
        out = dict(found) if isinstance(found, Mapping) else {}
        if self.is_folder:
            from diagnostics.binding import FOLDER_MODEL

            out["model"] = FOLDER_MODEL
        return out


class CheckpointChanged(DiagnosticsError):
    """The file changed while it was being read (a trainer still writing it): read it again later."""


@dataclass(frozen=True)
class FileBytes:
    """The whole content of a checkpoint file, read once, and the SHA-256 of exactly these bytes.

    Everything downstream (the hash that keys caches and manifests, the step, the tensors) comes from
    ``data``, so what is analysed is always what was hashed.
    """

    path: Path
    data: bytes
    sha256: str
    files: Mapping[str, bytes] | None = None  # a model folder: {file name: bytes} of the files read


# ------------------------------------------------------------------------------ model folders
CONFIG_FILE = "config.json"
SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_WEIGHTS = "pytorch_model.bin"
TRAINER_STATE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
# never opened: pickles that could run code (training_args.bin, rng_state.pth, scheduler.pt) and code files
NEVER_READ = ("training_args.bin", "rng_state.pth", "scheduler.pt")
_SHARD_NAME = re.compile(r"[A-Za-z0-9_.\-]+\.safetensors")


def is_model_folder(path: str | Path) -> bool:
    """A folder holding ``config.json`` and weights (``model.safetensors``, its shard index, or
    ``pytorch_model.bin``): what ``save_pretrained`` and ``transformers.Trainer`` write."""
    p = Path(path)
    return (
        p.is_dir()
        and (p / CONFIG_FILE).is_file()
        and any((p / w).is_file() for w in (SAFE_WEIGHTS, SAFE_INDEX, BIN_WEIGHTS))
    )


def _folder_weight_files(folder: Path, index: bytes | None) -> list[str]:
    """The weight files of a model folder: the shards named by the index, or the single file."""
    if index is None:
        return [SAFE_WEIGHTS] if (folder / SAFE_WEIGHTS).is_file() else [BIN_WEIGHTS]
    try:
        parsed = json.loads(index)
        weight_map = parsed["weight_map"]
        shards = sorted({str(v) for v in weight_map.values()})
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DiagnosticsError(
            f"'{folder / SAFE_INDEX}' is not a readable shard index (no 'weight_map' of tensor -> file)"
        ) from exc
    bad = [s for s in shards if not _SHARD_NAME.fullmatch(s) or s.startswith(".")]
    if bad or not shards:
        raise DiagnosticsError(
            f"'{folder / SAFE_INDEX}' names shard file {bad[0] if bad else None!r:.80}; shards must be "
            "'.safetensors' files inside the folder"
        )
    return shards


def read_model_folder(path: str | Path) -> FileBytes:
    """Read the files of a model folder once into memory (see :func:`read_checkpoint_file`).

    Read: ``config.json``, the weights (single file or every shard of the index), and when present
    ``trainer_state.json`` and ``optimizer.pt``. Nothing else is opened (:data:`NEVER_READ`, Python
    files). The hash covers each file's name and bytes, so any change to what is analysed changes it.

    Raises:
        DiagnosticsError: a missing or unreadable file.
        CheckpointChanged: a file changed while it was being read.
    """
    folder = Path(path)
    files: dict[str, bytes] = {}
    index = None
    if (folder / SAFE_INDEX).is_file() and not (folder / SAFE_WEIGHTS).is_file():
        index = read_checkpoint_file(folder / SAFE_INDEX, sniff=False).data
        files[SAFE_INDEX] = index
    names = [CONFIG_FILE, *_folder_weight_files(folder, index)]
    names += [n for n in (TRAINER_STATE, OPTIMIZER_FILE) if (folder / n).is_file()]
    for name in names:
        files[name] = read_checkpoint_file(folder / name, sniff=name not in (CONFIG_FILE, TRAINER_STATE)).data
    h = hashlib.sha256(b"diagnostics-model-folder/1\n")
    for name in sorted(files):
        h.update(f"{name}\0{len(files[name])}\0".encode())
        h.update(hashlib.sha256(files[name]).digest())
    return FileBytes(path=folder, data=b"", sha256=h.hexdigest(), files=files)


def read_checkpoint_file(path: str | Path, *, sniff: bool = True) -> FileBytes:
    """Read a regular file once into memory, refusing one that changes while it is read.

    With ``sniff``, a file whose first bytes already say it is no checkpoint (:func:`head_kind`: text, an
    image, an HDF5 or NumPy file, an archive, ...) is refused before the rest is read or hashed (a
    multi-gigabyte log named ``step_5.pt`` costs one 4 KiB read). Model folders read their JSON files
    without it.

    The file's size and modification time (``fstat`` of the open file) are compared before and after the
    read, and the number of bytes read with the size: a trainer writing the file in place, or appending to
    it, is caught. A file replaced by an atomic rename during the read is fine (the open file still holds
    the old, complete version).

    Raises:
        DiagnosticsError: missing, not a regular file (FIFO, device, folder), or empty.
        CheckpointChanged: the file changed during the read.
    """
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise no_such_checkpoint(path) from None
    except OSError as exc:
        raise DiagnosticsError(f"cannot read '{path}': {exc.strerror or exc}") from exc
    if stat.S_ISDIR(st.st_mode):
        if is_model_folder(path):
            return read_model_folder(path)
        raise DiagnosticsError(
            f"'{path}' is a directory, not a checkpoint file (a transformers model folder needs {CONFIG_FILE} and "
            f"{SAFE_WEIGHTS}, {SAFE_INDEX} or {BIN_WEIGHTS}); pass a checkpoint file or a model folder"
        )
    if not stat.S_ISREG(st.st_mode):
        raise DiagnosticsError(f"'{path}' is not a regular file (a FIFO, socket or device); pass a checkpoint file")
    try:
        with open(path, "rb") as fh:
            before = os.fstat(fh.fileno())
            kind = head_kind(fh.read(HEAD_BYTES)) if sniff else None
            if kind is not None:
                raise _other_kind(path, kind)
            fh.seek(0)
            data = fh.read()
            after = os.fstat(fh.fileno())
    except OSError as exc:
        raise DiagnosticsError(f"cannot read '{path}': {exc.strerror or exc}") from exc
    if (
        len(data) != before.st_size
        or (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns)
        or before.st_ino != st.st_ino
    ):
        raise CheckpointChanged(
            f"'{path}' changed while it was being read (still being written?); it is read again next time"
        )
    if not data:
        raise DiagnosticsError(f"'{path}' is empty (0 bytes)")
    return FileBytes(path=path, data=data, sha256=hashlib.sha256(data).hexdigest())


def step_from_name(name: str) -> int | None:
    """The training step a file name states, or None: only recognised patterns count.

    Recognised (case-insensitive): ``step``, ``global_step``, ``iteration`` or ``iter``, an optional
    ``_``, ``-`` or ``=``, then digits (``step_2000``, ``step=120``, ``global_step1200``, ``iter_250``), and
    ``checkpoint-N`` (Hugging Face Trainer folders). The token must start the name or follow a separator
    (``_ - . =`` or a space) and its digits must end it; of several (Lightning's ``epoch=3-step=120``),
    the last wins. Any other number is not a step: ``quad2.pt``, ``resnet50.pt``, ``ckpt_00050.pt`` (it
    counts checkpoints) and ``epoch=3.ckpt`` (an epoch) give None. ``name`` may be a relative path: the
    file name (without suffix) is tried first, then its folders from the innermost
    (``checkpoint-500/model.safetensors`` -> 500).

    Examples: ``step_02000.pt`` -> 2000, ``epoch=3-step=120.ckpt`` -> 120, ``checkpoint-500`` -> 500.
    """
    parts = PurePosixPath(str(name).replace("\\", "/")).parts
    if not parts:
        return None
    last = parts[-1]
    for part in (last.rsplit(".", 1)[0] if "." in last else last, *reversed(parts[:-1])):
        found = [n for a, b in _STEP_IN_NAME.findall(part) if (n := int(a or b)) <= STEP_MAX]
        if found:
            return found[-1]
    return None


def _check_zip(data: bytes, path: Path) -> None:
    """Refuse zip archives that ``torch.save`` never writes: compressed, escaping or lying members.

    ``torch.save`` stores its members uncompressed under one folder; a deflated member (a zip bomb that
    would inflate in memory), a member name that is absolute or climbs out with ``..``, or a directory that
    declares more bytes than the file holds is refused from the central directory alone, before any
    member is read.
    """
    try:
        infos = zipfile.ZipFile(io.BytesIO(data)).infolist()
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, NotImplementedError) as exc:
        raise DiagnosticsError(
            f"'{path}' is not a readable PyTorch checkpoint (truncated or corrupt zip archive: {exc})"
        ) from exc
    total = 0
    for info in infos:
        name = info.filename
        parts = PurePosixPath(name).parts
        if name.startswith(("/", "\\")) or "\\" in name or ".." in parts or (parts and ":" in parts[0]):
            raise DiagnosticsError(
                f"refusing to load '{path}': its zip archive has a member named {name[:80]!r} that points outside "
                "the archive; torch.save never writes such names"
            )
        if info.compress_type != zipfile.ZIP_STORED:
            raise DiagnosticsError(
                f"refusing to load '{path}': its zip member {name[:80]!r} is compressed (a zip bomb?); "
                "torch.save stores members uncompressed: save it again with torch.save"
            )
        total += info.file_size
        if info.file_size > len(data) or total > len(data):
            raise DiagnosticsError(
                f"refusing to load '{path}': its zip directory declares {total} bytes in a {len(data)}-byte file "
                "(corrupt or crafted archive)"
            )


def _torch_load(data: bytes, path: Path) -> Any:
    import warnings

    if data[:4] == b"PK\x03\x04":
        _check_zip(data, path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # protocol notes from the weights-only unpickler
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        m = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([^\s]+)", text, re.IGNORECASE)
        if m:
            raise DiagnosticsError(
                f"refusing to load '{path}': it asks to import '{m.group(1)}' (pickled objects other than "
                "tensors); checkpoints are read with weights_only=True so they cannot run code. "
                "Save a plain state_dict or use diagnostics.save_checkpoint"
            ) from exc
        kind = file_kind(data)
        if kind is not None:
            raise _other_kind(path, kind) from exc
        raise DiagnosticsError(
            f"'{path}' is not a readable PyTorch checkpoint (truncated, corrupt, or not a checkpoint at all)"
        ) from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, KeyError, IndexError) as exc:
        kind = file_kind(data)
        if kind is not None:
            raise _other_kind(path, kind) from exc
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise DiagnosticsError(
            f"'{path}' is not a readable PyTorch checkpoint (truncated or corrupt file?): {type(exc).__name__}: {first}"
        ) from exc


def _other_kind(path: Path, kind: str) -> DiagnosticsError:
    """The error for a file that is ``kind`` (:func:`head_kind`, :func:`file_kind`), not a checkpoint."""
    return DiagnosticsError(f"'{path}' is {kind}, not a PyTorch checkpoint; pass the checkpoint file")


_MAGIC = (
    (b"\x89HDF\r\n\x1a\n", "an HDF5 file (Keras .h5?)"),
    (b"\x93NUMPY", "a NumPy .npy array"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"%PDF", "a PDF document"),
    (b"\x7fELF", "an executable"),
    (b"ustar", "a tar archive"),
)


HEAD_BYTES = 4096


def head_kind(head: bytes) -> str | None:
    """What a file is, when its first bytes (``head``, up to :data:`HEAD_BYTES`) settle that it is no
    checkpoint: one of :data:`_MAGIC`'s formats, or printable text. None when they do not (a pickle, a zip
    archive, a safetensors header, binary data): only the whole file can tell those apart."""
    for magic, kind in _MAGIC:
        if head.startswith(magic) or (magic == b"ustar" and head[257:262] == magic):
            return kind
    if not head or head[:1] == b"\x80":  # a pickle (protocol 2+)
        return None
    try:
        text = head[:HEAD_BYTES].decode("utf-8")
    except UnicodeDecodeError as exc:
        if len(head) < HEAD_BYTES or exc.start < HEAD_BYTES - 3:  # not a character cut at the head's end
            return None
        text = head[: exc.start].decode("utf-8")
    return "a text file" if text and all(c.isprintable() or c.isspace() for c in text[:1024]) else None


def file_kind(data: bytes) -> str | None:
    """What a file that ``torch.load`` cannot read looks like, from its first bytes (None: it looks like a
    damaged checkpoint, a pickle or a zip archive of torch.save's layout, so "truncated or corrupt" is the
    likelier story)."""
    if not data:
        return "empty"
    kind = head_kind(data[:HEAD_BYTES])
    if kind is not None:
        return kind
    if data.startswith(b"PK\x03\x04") or data.startswith(b"PK\x05\x06"):
        try:
            names = zipfile.ZipFile(io.BytesIO(data)).namelist()
        except (zipfile.BadZipFile, ValueError, OSError, EOFError, NotImplementedError):
            return None
        if any(n.endswith("/data.pkl") or n == "data.pkl" for n in names):
            return None  # torch.save's layout: damaged inside
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        return f"a zip archive without torch.save's data.pkl (it holds {shown or 'nothing'})"
    if len(data) >= 8 and data[8:9] == b"{" and int.from_bytes(data[:8], "little") <= len(data) - 8:
        return "a safetensors file under another suffix (rename it to .safetensors)"
    return None


SAFETENSORS_MAX_HEADER = 100 << 20  # the limit of the safetensors format itself


def _safetensors_header(data: bytes, path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file, checked before any tensor is read."""
    if len(data) < 8:
        raise DiagnosticsError(f"'{path}' is not a readable safetensors file (shorter than its 8-byte header size)")
    n = int.from_bytes(data[:8], "little")
    if n > min(len(data) - 8, SAFETENSORS_MAX_HEADER):
        raise DiagnosticsError(
            f"'{path}' is not a readable safetensors file (its header claims {n} bytes, the file has {len(data)})"
        )
    try:
        header = json.loads(data[8 : 8 + n])
    except (ValueError, RecursionError) as exc:
        raise DiagnosticsError(f"'{path}' is not a readable safetensors file (its header is not JSON)") from exc
    if not isinstance(header, dict):
        raise DiagnosticsError(f"'{path}' is not a readable safetensors file (its header is not a JSON object)")
    return header


def _load_safetensors(data: bytes, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    header = _safetensors_header(data, path)
    try:
        from safetensors.torch import load as load_safetensors

        tensors = dict(load_safetensors(data))
    except Exception as exc:
        first = one_line(exc)
        raise DiagnosticsError(f"'{path}' is not a readable safetensors file: {type(exc).__name__}: {first}") from exc
    raw = header.get("__metadata__") or {}
    meta: dict[str, Any] = {}
    if not isinstance(raw, dict):
        raw = {}
    if isinstance(raw.get("diagnostics"), str):
        try:
            parsed = json.loads(raw["diagnostics"])
        except (ValueError, RecursionError) as exc:
            raise DiagnosticsError(
                f"'{path}': its safetensors metadata 'diagnostics' is not valid JSON; save it again"
            ) from exc
        meta = parsed if isinstance(parsed, dict) else {}
    for k, v in raw.items():
        if k != "diagnostics" and isinstance(k, str):
            meta.setdefault(k, v)
    return tensors, meta


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def _optimizer_meta(opt_state: Mapping[str, Any] | None) -> dict[str, Any]:
    """Hyper-parameters of the first param group of an optimizer state_dict."""
    if not isinstance(opt_state, Mapping):
        return {}
    groups = opt_state.get("param_groups") or []
    if not groups or not isinstance(groups[0], Mapping):
        return {}
    hp = {}
    for k, v in groups[0].items():
        if k == "params":
            continue
        if isinstance(v, (int, float, bool, str)) or v is None:
            hp[k] = v
        elif isinstance(v, (tuple, list)) and all(isinstance(x, (int, float)) for x in v):
            hp[k] = list(v)
        elif isinstance(v, torch.Tensor) and v.numel() == 1:
            hp[k] = v.item()
    return hp


def _guess_optimizer_name(hp: Mapping[str, Any]) -> str | None:
    if "betas" in hp:
        return "AdamW" if hp.get("weight_decay", 0) and hp.get("decoupled_weight_decay", False) else "Adam"
    if "momentum" in hp:
        return "SGD"
    return None


def _is_mapping(value: Any) -> bool:
    return isinstance(value, Mapping)


def _first_present(obj: Mapping[str, Any], keys: tuple[str, ...], accept: Callable[[Any], bool]) -> Any:
    """The value under the first of ``keys`` that ``accept`` takes, or None."""
    return next((obj[k] for k in keys if k in obj and accept(obj[k])), None)


def _container_weights(obj: Mapping[str, Any], path: Path) -> dict[str, Any]:
    """The tensor dict under the first of :data:`WEIGHT_KEYS`; an error naming the dicts found otherwise."""
    weights = _first_present(obj, WEIGHT_KEYS, _is_tensor_dict)
    if weights is None:
        nested = [k for k, v in obj.items() if _is_tensor_dict(v)]
        hint = f" (tensor dicts found under {nested})" if nested else ""
        raise DiagnosticsError(
            f"'{path}' holds a dict but no weights under any of {list(WEIGHT_KEYS)}{hint}; "
            "save model.state_dict() directly or under one of those keys"
        )
    return dict(weights)


def _type_name(value: Any) -> str:
    """``"an int"``, ``"a list"``, ``"null"``: what a malformed field holds, for an error message."""
    if value is None:
        return "null"
    name = type(value).__name__
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


def _tagged_container(obj: Mapping[str, Any], path: Path) -> tuple[dict, dict, dict | None]:
    """The parts of a :func:`save_checkpoint` file, each checked: ``model`` a non-empty ``{str: Tensor}``
    dict, ``metadata`` a dict (or absent), ``optimizer`` a dict (or absent).

    Raises:
        DiagnosticsError: one line naming the file and the malformed field.
    """
    fix = "save it again with diagnostics.save_checkpoint"
    where = f"'{path}' is a diagnostics checkpoint ({FORMAT_TAG}) but"
    if "model" not in obj:
        raise DiagnosticsError(f"{where} has no 'model' entry (its weights); {fix}")
    weights = obj["model"]
    if not isinstance(weights, Mapping):
        raise DiagnosticsError(f"{where} its 'model' entry is {_type_name(weights)}, not a dict of tensors; {fix}")
    if not weights:
        raise DiagnosticsError(f"{where} its 'model' entry holds no tensors; {fix}")
    for key, value in weights.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise DiagnosticsError(
                f"{where} its 'model' entry holds {_type_name(value)} under {str(key)[:80]!r} "
                f"(weights must be tensors under string names); {fix}"
            )
    for name in ("metadata", "optimizer"):
        value = obj.get(name)
        if value is not None and not isinstance(value, Mapping):
            raise DiagnosticsError(f"{where} its '{name}' entry is {_type_name(value)}, not a dict; {fix}")
    meta = {str(k): v for k, v in (obj.get("metadata") or {}).items()}
    optimizer = obj.get("optimizer")
    return dict(weights), meta, None if optimizer is None else dict(optimizer)


def _parse_container(obj: Mapping[str, Any], path: Path) -> tuple[dict, dict, dict | None]:
    """Split a dict checkpoint into (state_dict, metadata, optimizer_state)."""
    meta: dict[str, Any] = {}
    if obj.get("format") == FORMAT_TAG:
        return _tagged_container(obj, path)
    weights = _container_weights(obj, path)
    raw = _first_present(obj, STEP_KEYS, lambda v: isinstance(v, (int, float)) and not isinstance(v, bool))
    step = whole_step(raw)
    if step is not None:
        meta["step"] = step
    elif raw is not None:
        meta["step_unusable"] = shown_value(raw)
    optimizer_state = _first_present(obj, ("optimizer", "optimizer_state_dict", "optimizer_state"), _is_mapping)
    if optimizer_state is None and isinstance(obj.get("optimizer_states"), (list, tuple)) and obj["optimizer_states"]:
        optimizer_state = obj["optimizer_states"][0]  # Lightning
    hp = _optimizer_meta(optimizer_state)
    if hp:
        meta["optimizer"] = {"name": _guess_optimizer_name(hp), "hyperparameters": hp}
        if "lr" in hp:
            meta["lr"] = float(hp["lr"])
    if isinstance(obj.get("lr"), (int, float)):
        meta["lr"] = float(obj["lr"])
    for k, v in obj.items():
        if k in WEIGHT_KEYS or k in meta or k in ("optimizer", "optimizer_states", "optimizer_state_dict"):
            continue
        if isinstance(v, (int, float, str, bool)) or v is None:
            meta.setdefault(k, v)
    return weights, meta, optimizer_state if isinstance(optimizer_state, Mapping) else None


def load_checkpoint(path: str | Path, *, content: FileBytes | None = None) -> Checkpoint:
    """Read a checkpoint of any supported format; never executes code from it.

    The file is read once into memory (:func:`read_checkpoint_file`); its hash, metadata and tensors all
    come from those bytes.

    Args:
        path: a ``.safetensors`` file, a model folder, or any other file (a torch file, read with
            ``torch.load(weights_only=True)``).
        content: the bytes already read (e.g. by a sweep that hashed them first); ``path`` then only
            names the checkpoint.

    Returns:
        The tensors (CPU), metadata (``step`` and ``lr`` dropped when of the wrong type; ``step`` guessed
        from the file name when absent), the optimizer state if saved, and the content hash.

    Raises:
        DiagnosticsError: missing, unreadable, code-carrying or weightless files.
        CheckpointChanged: the file changed while it was being read.
    """
    path = Path(path)
    if content is None:
        content = read_checkpoint_file(path)
    if content.files is not None:
        return _load_model_folder(path, content)
    data = content.data
    optimizer_state = None
    if path.suffix.lower() == ".safetensors":
        state_dict, meta = _load_safetensors(data, path)
        if not state_dict:
            raise DiagnosticsError(f"'{path}' holds no tensors")
    else:
        obj = _torch_load(data, path)
        if _is_tensor_dict(obj):
            state_dict, meta = dict(obj), {}
        elif isinstance(obj, Mapping):
            state_dict, meta, optimizer_state = _parse_container(obj, path)
        else:
            raise DiagnosticsError(
                f"'{path}' holds a {type(obj).__name__}, not a state_dict; save model.state_dict() instead"
            )
    if "step" in meta and whole_step(meta["step"]) is None:  # metadata is data: drop values of the wrong type
        meta["step_unusable"] = shown_value(meta.pop("step"))
    if "lr" in meta and (not isinstance(meta["lr"], (int, float)) or isinstance(meta["lr"], bool)):
        meta.pop("lr")
    check_dense(state_dict, f"'{path}'")
    _step_from_name(meta, f"{path.parent.name}/{path.name}")
    return Checkpoint(path, state_dict, meta, optimizer_state, content.sha256)


def _json_file(files: Mapping[str, bytes], name: str, path: Path) -> Any:
    try:
        return json.loads(files[name])
    except RecursionError as exc:
        raise DiagnosticsError(
            f"'{path / name}' nests its JSON too deeply to read (no file transformers writes does); save the folder "
            "again"
        ) from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise DiagnosticsError(f"'{path / name}' is not valid JSON ({one_line(exc)}); save the folder again") from exc


def trainer_state_metadata(state: Any) -> dict[str, Any]:
    """Step and learning rate from a ``transformers.Trainer``'s ``trainer_state.json``.

    The step is ``global_step``; the learning rate is the ``learning_rate`` of the last ``log_history``
    entry whose ``step`` is at most ``global_step`` (the Trainer logs the rate of the latest update).

    Returns:
        ``{"step", "lr", "lr_source"}`` (keys present only when found).
    """
    meta: dict[str, Any] = {}
    if not isinstance(state, Mapping):
        return meta
    raw = state.get("global_step")
    step = whole_step(raw)
    if step is not None:
        meta["step"] = step
    elif raw is not None:
        meta["step_unusable"] = shown_value(raw)
    best = None
    for entry in state.get("log_history") or []:
        if not isinstance(entry, Mapping):
            continue
        lr, at = entry.get("learning_rate"), entry.get("step")
        if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not isinstance(at, int):
            continue
        if ("step" in meta and at > meta["step"]) or (best is not None and at < best[0]):
            continue
        best = (at, float(lr))
    if best is not None:
        meta["lr"] = best[1]
        meta["lr_source"] = f"trainer_state.json log_history (step {best[0]})"
    return meta


def _folder_state_dict(path: Path, files: Mapping[str, bytes]) -> dict[str, torch.Tensor]:
    """The weights of a model folder: sharded safetensors (every indexed tensor present), one safetensors
    file, or ``pytorch_model.bin`` (read with ``weights_only``)."""
    if SAFE_INDEX in files:
        index = _json_file(files, SAFE_INDEX, path)
        state_dict: dict[str, torch.Tensor] = {}
        for shard in _folder_weight_files(path, files[SAFE_INDEX]):
            tensors, _ = _load_safetensors(files[shard], path / shard)
            state_dict.update(tensors)
        missing = sorted(set(index["weight_map"]) - set(state_dict))
        if missing:
            raise DiagnosticsError(
                f"'{path}': the shard index lists {len(missing)} tensor(s) that no shard holds, e.g. {missing[:3]}; "
                "the folder is incomplete"
            )
    elif SAFE_WEIGHTS in files:
        state_dict, _ = _load_safetensors(files[SAFE_WEIGHTS], path / SAFE_WEIGHTS)
    else:
        obj = _torch_load(files[BIN_WEIGHTS], path / BIN_WEIGHTS)
        if not _is_tensor_dict(obj):
            raise DiagnosticsError(f"'{path / BIN_WEIGHTS}' holds a {type(obj).__name__}, not a state_dict")
        state_dict = dict(obj)
    if not state_dict:
        raise DiagnosticsError(f"'{path}' holds no tensors")
    return state_dict


def _folder_optimizer(path: Path, files: Mapping[str, bytes], meta: dict[str, Any]) -> dict[str, Any] | None:
    """A Trainer folder's ``optimizer.pt`` (weights-only) and its hyper-parameters into ``meta``; an
    unreadable file is a note in ``meta``, not an error."""
    try:
        loaded = _torch_load(files[OPTIMIZER_FILE], path / OPTIMIZER_FILE)
    except DiagnosticsError as exc:
        meta["optimizer_note"] = f"optimizer.pt not used: {exc}"
        return None
    if not (isinstance(loaded, Mapping) and isinstance(loaded.get("param_groups"), list)):
        return None
    hp = _optimizer_meta(loaded)
    if hp:
        meta["optimizer"] = {"name": _guess_optimizer_name(hp), "hyperparameters": hp}
        if "lr" not in meta and isinstance(hp.get("lr"), (int, float)):
            meta["lr"] = float(hp["lr"])
            meta["lr_source"] = "optimizer.pt param_groups"
    return dict(loaded)


def _step_from_name(meta: dict[str, Any], name: str) -> None:
    """Without a stored step, the step a recognised file-name pattern gives (:func:`step_from_name`)."""
    if meta.get("step") is None:
        guessed = step_from_name(name)
        if guessed is not None:
            meta["step"] = guessed
            meta["step_source"] = "file name"


def _load_model_folder(path: Path, content: FileBytes) -> Checkpoint:
    """A model folder (:func:`read_model_folder`) -> :class:`Checkpoint` with ``model_config`` set."""
    files = dict(content.files or {})
    config = _json_file(files, CONFIG_FILE, path)
    if not isinstance(config, dict):
        raise DiagnosticsError(f"'{path / CONFIG_FILE}' is not a JSON object of model settings")
    state_dict = _folder_state_dict(path, files)
    check_dense(state_dict, f"'{path}'")
    meta: dict[str, Any] = {}
    if TRAINER_STATE in files:
        meta.update(trainer_state_metadata(_json_file(files, TRAINER_STATE, path)))
    optimizer_state = _folder_optimizer(path, files, meta) if OPTIMIZER_FILE in files else None
    _step_from_name(meta, path.name)
    meta["format"] = "transformers model folder"
    return Checkpoint(path, state_dict, meta, optimizer_state, content.sha256, model_config=config)


def unsupported_tensor(t: torch.Tensor) -> str | None:
    """What makes ``t`` unusable as a weight (None when it is a plain dense tensor with data).

    Sparse (COO, CSR, ...), nested and meta tensors (shape only, no values) are refused rather than
    converted: densifying a sparse tensor can need far more memory than the file suggests.
    """
    if t.is_meta:
        return "a meta tensor (shape only, no values): save the real weights (e.g. after loading them)"
    if t.is_nested:
        return "a nested tensor: save dense tensors"
    if t.layout != torch.strided:
        layout = str(t.layout).replace("torch.", "")
        return f"a {layout} tensor; only dense tensors are analysed: save it with .to_dense()"
    return None


def check_dense(state_dict: Mapping[str, torch.Tensor], where: str) -> None:
    """Raise, naming the first tensor, when any is sparse, nested or meta (:func:`unsupported_tensor`)."""
    for key, t in state_dict.items():
        why = unsupported_tensor(t)
        if why is not None:
            raise DiagnosticsError(f"{where}: tensor '{key}' is {why}")


def _checkable(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a float32 copy of a float8 tensor (most float8 formats have no ``isfinite``/``isnan`` kernels)."""
    return t.float() if t.is_floating_point() and t.element_size() == 1 else t


def check_finite(state_dict: Mapping[str, torch.Tensor], where: str) -> None:
    """Raise if any tensor is sparse, nested or meta (:func:`check_dense`), or a floating one has NaN or
    inf entries (float8 formats included)."""
    check_dense(state_dict, where)
    for key, t in state_dict.items():
        if t.is_floating_point() or t.is_complex():
            t = _checkable(t)
            bad = ~torch.isfinite(t)
            if bad.any():
                n_nan = int(torch.isnan(t).sum())
                n_inf = int(bad.sum()) - n_nan
                raise DiagnosticsError(
                    f"{where}: tensor '{key}' has {n_nan} NaN and {n_inf} inf entries; "
                    "the weights diverged, pick an earlier checkpoint"
                )


def _saved_metadata(
    step: int | None, optimizer: torch.optim.Optimizer | None, lr: float | None, extra: Mapping[str, Any] | None
) -> dict[str, Any]:
    """The step, the optimizer's name and hyper-parameters, and the learning rate (``lr`` wins)."""
    meta: dict[str, Any] = {}
    if step is not None:
        meta["step"] = int(step)
    if optimizer is not None:
        hp = _optimizer_meta(optimizer.state_dict())
        meta["optimizer"] = {"name": type(optimizer).__name__, "hyperparameters": hp}
        if "lr" in hp:
            meta["lr"] = float(hp["lr"])
    if lr is not None:
        meta["lr"] = float(lr)
    return meta


def save_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    *,
    step: int | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    lr: float | None = None,
    model_factory: str | None = None,
    data_factory: str | None = None,
    loss: str | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    data_kwargs: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    save_optimizer_state: bool = True,
) -> Path:
    """Write a self-describing checkpoint that ``diag`` can analyse without flags.

    The file holds only tensors and plain Python values, so it loads with ``weights_only=True``.
    Factory names (``"pkg.module:callable"``) are recorded but, when read back, imported only if they
    belong to ``diagnostics.examples``, are listed in ``diag.toml``, or the user passes
    ``--trust-checkpoint-factories``.

    Args:
        path: destination; ``.safetensors`` writes a safetensors file (no optimizer state).
        model: the model whose ``state_dict()`` is saved.
        step: training step.
        optimizer: its class name, hyper-parameters (lr, momentum, betas, ...) and, with
            ``save_optimizer_state``, its state (e.g. Adam's second moments) are saved.
        lr: the learning rate, when there is no optimizer or it should be overridden.
        model_factory: ``"pkg.module:callable"`` that rebuilds the model.
        data_factory: ``"pkg.module:callable"`` that rebuilds the data.
        loss: a built-in loss name or ``"pkg.module:fn"``.
        model_kwargs: JSON-serialisable keyword arguments for the model factory.
        data_kwargs: JSON-serialisable keyword arguments for the data factory.
        extra: further JSON-serialisable metadata (merged last, so it may override the keys above).
        save_optimizer_state: also save ``optimizer.state_dict()`` (torch format only).

    Returns:
        ``path`` as a :class:`~pathlib.Path`; its parent folders are created.

    Raises:
        TypeError: when the metadata (``extra``, the kwargs) is not JSON-serialisable; nothing is written then.
    """
    path = Path(path)
    meta = _saved_metadata(step, optimizer, lr, extra)
    factories = {
        "model": model_factory,
        "data": data_factory,
        "loss": loss,
        "model_kwargs": dict(model_kwargs or {}),
        "data_kwargs": dict(data_kwargs or {}),
    }
    meta["factories"] = {k: v for k, v in factories.items() if v}
    if extra:
        meta.update(dict(extra))
    json.dumps(meta)  # fail early on values that cannot travel
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import save_file

        save_file(
            {k: v.contiguous() for k, v in state.items()},
            str(path),
            metadata={"diagnostics": json.dumps(meta)},
        )
        return path
    payload: dict[str, Any] = {"format": FORMAT_TAG, "model": state, "metadata": meta}
    if optimizer is not None and save_optimizer_state:
        payload["optimizer"] = optimizer.state_dict()
    torch.save(payload, path)
    return path
