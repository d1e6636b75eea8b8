"""Whole training runs: discover the checkpoints of a run and sweep analyzers over them, cached.

A *run* is a folder of checkpoints (``.pt .pth .ckpt .safetensors``, searched recursively; hidden
folders and the output folder are skipped). A transformers model folder (``config.json`` + weights, e.g.
the ``checkpoint-N/`` folders a ``transformers.Trainer`` writes) is one checkpoint, its step the
``global_step`` of its ``trainer_state.json``; the files inside it are not checkpoints of their own. Each checkpoint's step comes from its metadata
(``step``/``global_step``/... or what :func:`diagnostics.save_checkpoint` wrote) or else a recognised
pattern of its name (``step_00200.pt``, ``epoch=3-step=120.ckpt``, ``checkpoint-500/``; see
:func:`diagnostics.checkpoint.step_from_name`), else it is null: ``quad2.pt`` has no step.

A *sweep* runs the chosen analyzers (looked up in :mod:`diagnostics.analyzers.registry`, never a
hard-coded list) on every checkpoint and gathers one tidy table of all records. With a cache folder,
each ``(checkpoint content, analyzer, config, binding/seed/samples/dtype)`` result is stored as a
results JSON (plus its table artifacts as Parquet) written atomically right after it is computed, so a
rerun computes only what is new and an interrupted sweep loses nothing it finished. The cache key is
the SHA-256 of the canonical JSON of::

    {cache_version, package version, checkpoint sha256, analyzer, config, binding inputs,
     seed, samples, batch_size, dtype, params}

The device is not part of the key (results agree across devices to floating-point accuracy).

Nothing read back from disk is trusted blindly:

* every cache file (result JSON, its Parquet tables, the per-checkpoint step/lr summary) has a checksum
  sidecar ``<file>.sha256`` written after it; a file that no longer matches (a value or a step edited
  by hand) is recomputed, with a warning naming it;
* a checkpoint is read once into memory and hashed from those bytes
  (:func:`diagnostics.checkpoint.read_checkpoint_file`); when it is analysed, the bytes analysed must
  hash to the value recorded when the run was scanned. A file that changes while being read, or
  between the scan and its analysis (a trainer still writing it), is skipped with a note and picked up
  by the next run, never recorded under the wrong hash or step.

Output folder layout (:func:`write_sweep`; only the CLI and the examples call the writers)::

    <out>/diag-run.json       manifest: settings, checkpoints, what was computed/cached/failed/skipped;
                              written with status "in progress" before the first result (so a killed
                              first sweep resumes with the same command), "complete" at the end
    <out>/records.parquet     every record of every checkpoint (metadata in the file)
    <out>/records.csv         the same table (+ records.csv.meta.json)
    <out>/cache/...           the per-result cache
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path, PurePath
from typing import Any

from diagnostics.checkpoint import (
    CheckpointChanged,
    FileBytes,
    is_model_folder,
    load_checkpoint,
    read_checkpoint_file,
    step_from_name,
)
from diagnostics.errors import DiagnosticsError
from diagnostics.lazy import lazy_import
from diagnostics.options import BindingOptions
from diagnostics.outputs import plan_outputs
from diagnostics.progress import ProgressFn
from diagnostics.results import (
    COLUMNS,
    Result,
    atomic_write_bytes,
    package_versions,
    records_to_frame,
    result_from_json_bytes,
    result_json_bytes,
    strict_json,
    write_result,
)
from diagnostics.settings import with_fields
from diagnostics.spec import Analyzer, did_you_mean, resolve_config

# on first use: 'diag run' checks its arguments (the run folder, --set, the analyzers) before they are loaded
pd = lazy_import("pandas")
distributed = lazy_import("diagnostics.distributed")

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".safetensors")
MANIFEST_NAME = "diag-run.json"
MANIFEST_FORMAT = "diagnostics-run/1"
CACHE_DIR = "cache"
CACHE_VERSION = 2  # 2: cache files carry checksum sidecars
CHECKSUM_SUFFIX = ".sha256"
# files a sweep (write_sweep) and a report (write_report) put in the output folder
FOLDER_FILES = (
    MANIFEST_NAME,
    "records.parquet",
    "records.csv",
    "records.csv.meta.json",
    "hessian_density.csv",
    "index.html",
    "report.md",
)
DEFAULT_ANALYZERS = ("hessian",)
SWEEP_WITH = (None, "first", "previous")
# Top-level keys of diag.toml that bind checkpoints to code (part of the cache key).
_BINDING_CONFIG_KEYS = ("model", "data", "loss", "model_kwargs", "data_kwargs", "inputs", "targets")


# ------------------------------------------------------------------------------------ discovery
@dataclass(frozen=True)
class RunCheckpoint:
    """One checkpoint of a run.

    Attributes:
        path: the file.
        name: its path relative to the run folder (POSIX separators); the ``checkpoint`` column.
        sha256: hash of the file content (the cache key).
        step: training step from the metadata, else from the file name, else None.
        step_source: ``"metadata"``, ``"file name"`` or ``"unknown"``.
    """

    path: Path
    name: str
    sha256: str
    step: int | None
    step_source: str


def _natural_key(text: str) -> list[Any]:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", text)]


def _sort_key(rc: RunCheckpoint) -> tuple:
    return (rc.step is None, rc.step if rc.step is not None else 0, _natural_key(rc.name))


def _inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` lies in ``folder`` once links are followed (a symlink loop lies nowhere)."""
    try:
        path.resolve().relative_to(folder.resolve())
    except (ValueError, RuntimeError, OSError):  # RuntimeError: a symlink loop (Python < 3.13)
        return False
    return True


def check_pattern(pattern: str | None) -> None:
    """Refuse a ``--pattern`` that is not a glob of files inside the run folder, relative to it.

    ``Path.glob`` raises on an absolute pattern (``/dev/null``), on ``**`` inside a name (``**.pt``) and on
    ``.``; a ``..`` component would reach files outside the run folder (which discovery then skips, so nothing
    matched). Each is one line naming the pattern and the fix. None (every checkpoint) is fine.

    Raises:
        DiagnosticsError: naming the pattern, why and an example of a valid one.
    """
    if pattern is None:
        return
    pure = PurePath(pattern)
    if pure.is_absolute() or pure.drive or pure.root or pattern.startswith(("/", "\\")):
        why = "is an absolute path"
    elif ".." in pure.parts:
        why = "leaves the run folder ('..')"
    elif not pure.parts:
        why = "names the run folder itself, not files in it"
    elif any("**" in part and part != "**" for part in pure.parts):
        why = "uses '**' inside a name ('**' matches whole folders only, as in '**/*.pt')"
    else:
        return
    raise DiagnosticsError(
        f"--pattern '{pattern}' {why}; pass a glob of checkpoint files relative to the run folder, "
        "e.g. 'step_*.pt' or '**/*.ckpt'"
    )


def checkpoint_files(run_dir: str | Path, pattern: str | None = None, exclude: Sequence[Path] = ()) -> list[Path]:
    """Checkpoint files under ``run_dir`` (recursive; hidden folders and ``exclude`` skipped).

    A transformers model folder (``config.json`` + weights) counts as one checkpoint; nothing inside it is
    a checkpoint of its own.

    Args:
        run_dir: the run folder.
        pattern: a glob relative to ``run_dir`` (e.g. ``"step_*.pt"``, ``"**/*.ckpt"``); default: every
            file with a suffix in :data:`CHECKPOINT_SUFFIXES`, and every model folder.
        exclude: folders not searched (e.g. the output folder).

    Returns:
        The files and model folders, in natural order of their run-relative paths.

    Raises:
        DiagnosticsError: ``run_dir`` is missing or a file, or holds no checkpoint; ``pattern`` is not a glob
            inside the run folder (:func:`check_pattern`).
    """
    run = Path(run_dir)
    check_pattern(pattern)
    if not run.exists():
        raise DiagnosticsError(f"no such run folder: '{run}'; pass the folder that holds the run's checkpoints")
    if not run.is_dir():
        raise DiagnosticsError(f"'{run}' is a file; pass the folder that holds the run's checkpoints")

    def hidden(p: Path) -> bool:
        return any(part.startswith(".") for part in p.relative_to(run).parts)

    # transformers model folders (save_pretrained, a Trainer's checkpoint-N/) are checkpoints; nothing inside
    # one is a checkpoint of its own (optimizer.pt, rng_state.pth, ... belong to the folder)
    folders = [
        c.parent
        for c in ([run / "config.json"] if (run / "config.json").is_file() else []) + list(run.rglob("config.json"))
        if is_model_folder(c.parent) and not hidden(c.parent) and not any(_inside(c.parent, ex) for ex in exclude)
    ]
    folders = sorted(set(folders))
    candidates = run.glob(pattern) if pattern else run.rglob("*")
    files = []
    for p in candidates:
        if hidden(p) or any(_inside(p, ex) for ex in exclude):
            continue
        if p in folders:
            files.append(p)  # a model folder matched by the pattern
            continue
        dangling = p.is_symlink() and not p.exists()  # a broken link or a loop: fails alone, with the reason
        if not (p.is_file() or dangling) or any(_inside(p, f) for f in folders):
            continue
        if pattern is None and p.suffix.lower() not in CHECKPOINT_SUFFIXES:
            continue
        files.append(p)
    if pattern is None:
        files += folders
    if not files:
        what = f"matching '{pattern}'" if pattern else f"({', '.join(CHECKPOINT_SUFFIXES)} or model folders)"
        fix = (
            "check the glob (it is matched inside the run folder)" if pattern else "pass --pattern GLOB for other names"
        )
        raise DiagnosticsError(f"no checkpoint files {what} in '{run}'; {fix}")
    return sorted(set(files), key=lambda p: _natural_key(p.relative_to(run).as_posix()))


# ------------------------------------------------------------------------------ checked cache files
def _checksum_path(path: Path) -> Path:
    return path.with_name(path.name + CHECKSUM_SUFFIX)


def write_checked(path: Path, data: bytes) -> None:
    """Write ``data`` atomically, then its SHA-256 in the sidecar ``<path>.sha256`` (written last)."""
    atomic_write_bytes(path, data)
    atomic_write_bytes(_checksum_path(path), (hashlib.sha256(data).hexdigest() + "\n").encode())


def read_checked(path: Path, warn: Callable[[str], None] | None = None) -> bytes | None:
    """The bytes of a cache file when they match their checksum sidecar, else None.

    A missing file or sidecar (a write that was interrupted) is a silent miss; a file that does not
    match its checksum (edited by hand, or damaged) is a miss reported through ``warn``.
    """
    try:
        data = path.read_bytes()
        recorded = _checksum_path(path).read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        if warn is not None:
            warn(f"cannot read cache file '{path}' ({exc.strerror or exc}); recomputing it")
        return None
    if hashlib.sha256(data).hexdigest() != recorded:
        if warn is not None:
            warn(f"cache file '{path}' does not match its checksum (edited by hand?); recomputing it")
        return None
    return data


# ------------------------------------------------------------------------------------ discovery
def _info_path(cache_dir: Path, sha: str) -> Path:
    return cache_dir / "checkpoints" / f"{sha}.json"


def _metadata_step(content: FileBytes, cache_dir: Path | None, warn: Callable[[str], None] | None = None) -> int | None:
    """The step stored in a checkpoint's metadata (not guessed from its name), from the bytes read.

    Remembered by content hash in ``cache_dir`` (checksummed), so reruns do not parse the file again.
    """
    sha = content.sha256
    if cache_dir is not None:
        raw = read_checked(_info_path(cache_dir, sha), warn)
        if raw is not None:
            try:
                info = json.loads(raw)
                if info.get("sha256") == sha and (info.get("step") is None or isinstance(info["step"], int)):
                    return info.get("step")
            except (ValueError, AttributeError):
                pass  # unreadable: parse the checkpoint again and rewrite it
    try:
        ck = load_checkpoint(content.path, content=content)
    except Exception:  # one bad file never aborts discovery
        # unreadable or malformed: analysing it reports why, as a failure of this checkpoint (the sweep goes
        # on, see SweepFailure); meanwhile the file name gives the step
        return None
    step = None if ck.metadata.get("step_source") == "file name" else ck.step
    if cache_dir is not None:
        info = {"sha256": sha, "step": step, "lr": ck.lr, "keys": len(ck.state_dict)}
        write_checked(_info_path(cache_dir, sha), strict_json(info, indent=2).encode())
    return step


def discover_checkpoints(
    run_dir: str | Path,
    *,
    pattern: str | None = None,
    exclude: Sequence[Path] = (),
    cache_dir: str | Path | None = None,
    warn: Callable[[str], None] | None = None,
    on_skip: Callable[[str, str], None] | None = None,
) -> list[RunCheckpoint]:
    """The checkpoints of a run with their content hash and step, ordered by step then name.

    Each file is read once into memory; its hash and its step come from those bytes. The step is read
    from the checkpoint's metadata (with ``cache_dir`` the answer is remembered by content hash, so
    reruns do not parse it again), else from its file name (:func:`diagnostics.checkpoint.step_from_name`).

    Args:
        run_dir: the run folder.
        pattern: a glob selecting the checkpoint files (:func:`checkpoint_files`).
        exclude: folders not searched.
        cache_dir: where each checkpoint's metadata step is remembered by content hash (None: nowhere).
        warn: ``warn(line)`` for cache files that fail their checksum.
        on_skip: ``on_skip(name, reason)`` for a file that changed while it was read; it is left out
            (without ``on_skip`` the :class:`~diagnostics.checkpoint.CheckpointChanged` error is raised).

    Returns:
        One :class:`RunCheckpoint` per checkpoint (an unreadable one has ``sha256 == ""``; analysing it
        reports why), ordered by step (unknown steps last), then name.

    Raises:
        DiagnosticsError: a missing/empty run folder.
        CheckpointChanged: a file changed while it was read, without ``on_skip``.
    """
    run = Path(run_dir)
    cache = None if cache_dir is None else Path(cache_dir)
    out = []
    for path in checkpoint_files(run, pattern, exclude):
        name = path.relative_to(run).as_posix()
        try:
            content = read_checkpoint_file(path)
        except CheckpointChanged as exc:
            if on_skip is None:
                raise
            on_skip(name, str(exc))
            continue
        except DiagnosticsError:
            content = None  # unreadable: analysing it reports why, as a failure of this checkpoint
        step = None if content is None else _metadata_step(content, cache, warn)
        source = "metadata"
        if step is None:
            step = step_from_name(name)  # relative to the run: 'checkpoint-500/model.safetensors' too
            source = "unknown" if step is None else "file name"
        sha = "" if content is None else content.sha256
        out.append(RunCheckpoint(path=path, name=name, sha256=sha, step=step, step_source=source))
    return sorted(out, key=_sort_key)


def paired_checkpoints(
    run_a: str | Path, run_b: str | Path, pattern: str | None = None
) -> tuple[list[tuple[RunCheckpoint, RunCheckpoint]], list[str]]:
    """The checkpoints of two runs that share a step (e.g. two seeds of one recipe), ordered by step.

    Args:
        run_a: the first run folder (its checkpoints' names label the pairs).
        run_b: the second run folder.
        pattern: a glob selecting the checkpoint files in both.

    Returns:
        (pairs ``(checkpoint of A, checkpoint of B)``, notes naming the steps only one run has).

    Raises:
        DiagnosticsError: a folder without checkpoints, or no step in common.
    """
    a = discover_checkpoints(run_a, pattern=pattern)
    b = discover_checkpoints(run_b, pattern=pattern)
    by_step: dict[int, RunCheckpoint] = {}
    for rc in b:
        if rc.step is not None:
            by_step.setdefault(rc.step, rc)
    pairs: list[tuple[RunCheckpoint, RunCheckpoint]] = []
    for rc in a:
        if rc.step in by_step and all(p[0].step != rc.step for p in pairs):
            pairs.append((rc, by_step[rc.step]))
    steps_a = [rc.step for rc in a if rc.step is not None]
    steps_b = list(by_step)
    if not pairs:
        raise DiagnosticsError(
            f"runs '{run_a}' (steps {_steps_text(steps_a)}) and '{run_b}' (steps {_steps_text(steps_b)}) share no "
            "step; checkpoints are paired by their step"
        )
    notes = []
    for name, own, other in (("first", steps_a, steps_b), ("second", steps_b, steps_a)):
        alone = sorted(set(own) - set(other))
        if alone:
            notes.append(f"steps only in the {name} run are left out: {_steps_text(alone)}")
    unknown = [rc.name for rc in [*a, *b] if rc.step is None]
    if unknown:
        notes.append(f"checkpoints without a step are left out: {', '.join(unknown[:5])}")
    return pairs, notes


def _steps_text(steps: Sequence[int]) -> str:
    steps = sorted(steps)
    if not steps:
        return "none known"
    return ", ".join(map(str, steps[:6])) + (f", ... ({len(steps)} in all)" if len(steps) > 6 else "")


# ------------------------------------------------------------------------------------- settings
@dataclass
class SweepSettings:
    """What to run on each checkpoint and how to bind it (flags, or ``diag.toml``, already merged).

    Attributes:
        analyzers: registry names, in order.
        options: per analyzer, the options passed to ``Analyzer.make_config``.
        model, data, loss: binding flags (None: from ``config`` or the checkpoint's metadata).
        config: the parsed ``diag.toml`` (binding keys, trusted factories).
        trust_checkpoint: import factories named in checkpoints (``--trust-checkpoint-factories``).
        seed, samples, batch_size, dtype, device, params, replicates: as for the single-checkpoint commands.
        pattern: glob selecting the checkpoint files.
    """

    analyzers: list[str] = field(default_factory=lambda: list(DEFAULT_ANALYZERS))
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    model: str | None = None
    data: str | None = None
    loss: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    trust_checkpoint: bool = False
    seed: int = 0
    samples: int | None = None
    batch_size: int | None = None
    dtype: str | None = None
    device: str | None = None
    params: str | None = None
    pattern: str | None = None
    replicates: int = 1
    inputs: str | None = None
    targets: str | None = None

    def binding(self) -> BindingOptions:
        """The binding and data options of every checkpoint's context."""
        return BindingOptions(
            model=self.model,
            data=self.data,
            loss=self.loss,
            seed=self.seed,
            samples=self.samples,
            batch_size=self.batch_size,
            dtype=self.dtype or "float32",
            device=self.device,
            params=self.params,
            replicates=self.replicates,
            inputs=self.inputs,
            targets=self.targets,
        )

    @classmethod
    def from_description(cls, described: Mapping[str, Any] | None) -> SweepSettings:
        """The settings :meth:`describe` wrote into a manifest (the config reduced to its path)."""
        d = dict(described or {})
        names = {f.name for f in fields(cls)} - {"config"}
        out = cls(**{k: v for k, v in d.items() if k in names and v is not None})
        out.config = {"_path": d["config_file"]} if d.get("config_file") else {}
        return out

    def describe(self) -> dict[str, Any]:
        """JSON-ready settings for the manifest and the report (without the raw config)."""
        out = {k: v for k, v in asdict(self).items() if k != "config"}
        out["config_file"] = self.config.get("_path")
        return out


def parse_analyzer_list(text: str | Sequence[str] | None) -> list[str]:
    """``"hessian,rankme"`` or ``["hessian", "rankme"]`` -> unique names, in order."""
    if text is None:
        return []
    items = text.split(",") if isinstance(text, str) else [s for t in text for s in str(t).split(",")]
    names: list[str] = []
    for item in (s.strip() for s in items):
        if item and item not in names:
            names.append(item)
    return names


def parse_overrides(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``["hessian.top_k=3", "hessian.trace=true"]`` -> ``{"hessian": {"top_k": 3, "trace": True}}``.

    Values are read as TOML values (numbers, ``true``/``false``, ``"strings"``, ``[lists]``); anything
    that is not valid TOML is taken as a bare string.
    """
    try:
        import tomllib
    except ModuleNotFoundError:  # pragma: no cover - Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]

    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        analyzer, dot, option = key.strip().partition(".")
        if not sep or not dot or not analyzer or not option:
            raise DiagnosticsError(f"--set '{item}' is not of the form ANALYZER.OPTION=VALUE (e.g. hessian.top_k=3)")
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()
        out.setdefault(analyzer, {})[option] = value
    return out


_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "omitted"}


@dataclass(frozen=True)
class BindingFlags:
    """The binding and data flags of a sweep as given on the command line (None: not given).

    ``model``, ``data`` and ``loss`` are kept as given (None: the binding layer reads ``diag.toml`` or the
    checkpoint's metadata); every other flag that is None takes the top-level ``diag.toml`` key of the same
    name in :func:`resolve_settings` (``seed`` then defaults to 0, ``replicates`` to 1).

    Attributes:
        model: model factory spec.
        data: data callable spec.
        loss: loss name or spec.
        seed: seed of every random draw.
        samples: analyse a seeded random subset of this many samples.
        batch_size: re-batch the data.
        dtype: precision of the analysis.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N``.
        params: regex selecting the parameters analysed.
        replicates: disjoint seeded subsets to repeat the analysis on.
        inputs: the batch's model inputs (dict keys or tuple positions).
        targets: the batch's targets (a dict key or tuple position).
    """

    model: str | None = None
    data: str | None = None
    loss: str | None = None
    seed: int | None = None
    samples: int | None = None
    batch_size: int | None = None
    dtype: str | None = None
    device: str | None = None
    params: str | None = None
    replicates: int | None = None
    inputs: str | None = None
    targets: str | None = None


def resolve_settings(
    config: Mapping[str, Any] | None = None,
    *,
    analyzers: str | Sequence[str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    trust_checkpoint: bool = False,
    pattern: str | None = None,
    flags: BindingFlags | None = None,
    **flag_values: Any,
) -> SweepSettings:
    """Flags + ``diag.toml`` -> :class:`SweepSettings` (a flag wins over the file).

    ``diag.toml`` may list ``analyzers = ["hessian", ...]`` at top level; each analyzer's options come
    from its table (``[hessian] top_k = 3``), updated by ``overrides``.

    Args:
        config: the parsed ``diag.toml`` (top-level keys, tables by analyzer name, ``_path``), or None.
        analyzers: ``"hessian,rankme"`` or a list (default: the file's ``analyzers``, else hessian).
        overrides: ``{analyzer: {option: value}}`` from ``--set`` (:func:`parse_overrides`).
        trust_checkpoint: import factories named in checkpoints.
        pattern: glob selecting the checkpoint files.
        flags: the binding and data flags (:class:`BindingFlags`); default none given.
        **flag_values: fields of :class:`BindingFlags` by name (``samples=50``, ``model=...``); they
            replace those of ``flags``.

    Returns:
        The merged :class:`SweepSettings` (``config`` kept in it).

    Raises:
        DiagnosticsError: an analyzer's table that is not a table, an unknown or ill-typed option (naming
            the file or ``--set``), ``--set`` for an analyzer that is not run, a device this machine lacks,
            or a ``pattern`` that is not a glob inside the run folder (:func:`check_pattern`).
        TypeError: a keyword that is neither an argument nor a field of :class:`BindingFlags`.
    """
    f = with_fields(BindingFlags, flags, flag_values, "resolve_settings")
    check_pattern(pattern)
    cfg = dict(config or {})

    def pick(flag: Any, key: str, default: Any = None) -> Any:
        return flag if flag is not None else cfg.get(key, default)

    from diagnostics.analyzers.registry import all_analyzers

    registered = all_analyzers()
    names = parse_analyzer_list(analyzers) or parse_analyzer_list(cfg.get("analyzers")) or list(DEFAULT_ANALYZERS)
    options: dict[str, dict[str, Any]] = {}
    for name in names:
        table = cfg.get(name) or {}
        if not isinstance(table, Mapping):
            raise DiagnosticsError(f"'{name}' in {cfg.get('_path', 'diag.toml')} must be a table of options")
        given = dict((overrides or {}).get(name) or {})
        if isinstance(registered.get(name), Analyzer):  # each source checked on its own, so errors name it
            cls = registered[name].config
            resolve_config(cls, table=table, table_name=name, source=f"[{name}] in {cfg.get('_path', 'diag.toml')}")
            resolve_config(cls, table=given, table_name=name, source="--set")
        options[name] = {**dict(table), **given}
    device = pick(f.device, "device")
    if device is not None:  # once for the sweep, not once per checkpoint (each would fail the same way)
        from diagnostics.context import resolve_device

        resolve_device(str(device))
    stray = sorted(set(overrides or {}) - set(names))
    if stray:
        raise DiagnosticsError(
            f"--set names analyzer(s) {stray} that are not being run; run them with --analyzers {','.join(names + stray)}"
        )
    return SweepSettings(
        analyzers=names,
        options=options,
        model=f.model,
        data=f.data,
        loss=f.loss,
        config=cfg,
        trust_checkpoint=trust_checkpoint,
        seed=int(pick(f.seed, "seed", 0)),
        samples=pick(f.samples, "samples"),
        batch_size=pick(f.batch_size, "batch_size"),
        dtype=pick(f.dtype, "dtype"),
        device=device,
        params=pick(f.params, "params"),
        pattern=pattern,
        replicates=int(pick(f.replicates, "replicates", 1)),
        inputs=pick(f.inputs, "inputs"),
        targets=pick(f.targets, "targets"),
    )


# ------------------------------------------------------------------------------------ cache keys
def canonical_json(obj: Any) -> str:
    """Deterministic JSON (sorted keys, no spaces) of dataclasses, mappings, lists and scalars."""

    def default(o: Any) -> Any:
        if is_dataclass(o) and not isinstance(o, type):
            return asdict(o)
        if isinstance(o, Path):
            return str(o)
        if hasattr(o, "tolist"):
            return o.tolist()
        return repr(o)

    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=default)


def cache_inputs(checkpoint_sha256: str, analyzer: str, config: Any, settings: SweepSettings) -> dict[str, Any]:
    """Everything that determines one cached result."""
    from diagnostics import __version__

    out = {
        "cache_version": CACHE_VERSION,
        "package_version": __version__,
        "checkpoint_sha256": checkpoint_sha256,
        "analyzer": analyzer,
        "config": json.loads(canonical_json(config)),
        "binding": {
            "flags": {"model": settings.model, "data": settings.data, "loss": settings.loss}
            | ({"inputs": settings.inputs, "targets": settings.targets} if settings.inputs or settings.targets else {}),
            "config": {k: settings.config.get(k) for k in _BINDING_CONFIG_KEYS},
        },
        "seed": settings.seed,
        "samples": settings.samples,
        "batch_size": settings.batch_size,
        "dtype": settings.dtype or "float32",
        "params": settings.params,
        "replicates": settings.replicates,
    }
    return out


def cache_key(inputs: Mapping[str, Any]) -> str:
    """The SHA-256 (hex) of the canonical JSON of :func:`cache_inputs`: one cached result's key."""
    return hashlib.sha256(canonical_json(dict(inputs)).encode()).hexdigest()


def _entry_path(cache_dir: Path, analyzer: str, sha: str, key: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", analyzer)
    return cache_dir / safe / f"{sha[:16]}-{key[:24]}.json"


def _artifact_path(entry: Path, name: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
    return entry.with_name(f"{entry.stem}.{safe}.parquet")


def _table_bytes(df: pd.DataFrame) -> bytes:
    """A DataFrame as Parquet bytes (keeps dtypes, empty strings and nulls apart, unlike CSV)."""
    import io

    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    return buf.getvalue()


def store_cached(cache_dir: Path, inputs: Mapping[str, Any], result: Result) -> Path:
    """Write one result (and its DataFrame artifacts) to the cache, each file with its checksum; JSON last."""
    key = cache_key(inputs)
    entry = _entry_path(cache_dir, str(inputs["analyzer"]), str(inputs["checkpoint_sha256"]), key)
    tables = {k: v for k, v in result.artifacts.items() if isinstance(v, pd.DataFrame)}
    for name, df in tables.items():
        write_checked(_artifact_path(entry, name), _table_bytes(df))
    meta = {**result.metadata, "cache": {"key": key, "inputs": dict(inputs), "artifacts": sorted(tables)}}
    write_checked(entry, result_json_bytes(Result(result.records, meta)))
    return entry


def load_cached(cache_dir: Path, inputs: Mapping[str, Any], warn: Callable[[str], None] | None = None) -> Result | None:
    """The cached result for ``inputs``, or None when absent, unreadable, written for other inputs or
    not matching its checksum (then ``warn`` says so: it is recomputed)."""
    import io

    key = cache_key(inputs)
    entry = _entry_path(cache_dir, str(inputs["analyzer"]), str(inputs["checkpoint_sha256"]), key)
    if not entry.is_file():
        return None
    raw = read_checked(entry, warn)
    if raw is None:
        return None
    try:
        result = result_from_json_bytes(raw, entry)
        info = result.metadata.get("cache") or {}
        if info.get("key") != key:
            return None
        for name in info.get("artifacts") or []:
            table = read_checked(_artifact_path(entry, name), warn)
            if table is None:
                return None
            result.artifacts[name] = pd.read_parquet(io.BytesIO(table))
    except (DiagnosticsError, OSError, ValueError):
        return None
    return result


# ------------------------------------------------------------------------------------------ sweep
@dataclass(frozen=True)
class SweepFailure:
    """A result that could not be computed (bad checkpoint, diverged weights, ...).

    Attributes:
        checkpoint: the checkpoint's run-relative name.
        analyzer: the analyzer's registry name.
        message: the error on one line (``unexpected <Type>: ...`` when it was not a ``DiagnosticsError``).
    """

    checkpoint: str
    analyzer: str
    message: str


@dataclass(frozen=True)
class SweepSkip:
    """A checkpoint left for the next run: it changed while (or since) it was read."""

    checkpoint: str
    reason: str


@dataclass
class SweepResult:
    """All records of a sweep plus what happened.

    Attributes:
        frame: the tidy table (:data:`diagnostics.results.COLUMNS`), ordered by step.
        checkpoints: the run's checkpoints, ordered by step.
        results: ``{(checkpoint name, analyzer): Result}`` (table artifacts included).
        computed / cached: which ``(checkpoint, analyzer)`` pairs were computed now / read from the cache.
        failures: results that could not be computed (bad checkpoint, diverged weights, ...).
        settings: what was run.
        seconds: wall time of the sweep.
        skipped: checkpoints that changed while being read (still being written): analysed next run.
        warnings: what the user should know (cache files that failed their checksum and were recomputed).
    """

    frame: pd.DataFrame
    checkpoints: list[RunCheckpoint]
    results: dict[tuple[str, str], Result]
    computed: list[tuple[str, str]]
    cached: list[tuple[str, str]]
    failures: list[SweepFailure]
    settings: SweepSettings
    run_dir: Path
    seconds: float = 0.0
    skipped: list[SweepSkip] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def artifact_frame(self, analyzer: str, name: str) -> pd.DataFrame | None:
        """One table artifact (e.g. hessian's ``density``) of every checkpoint, with ``checkpoint`` and
        ``step`` columns in front; None when no result has it."""
        parts = []
        for rc in self.checkpoints:
            res = self.results.get((rc.name, analyzer))
            df = None if res is None else res.artifacts.get(name)
            if isinstance(df, pd.DataFrame) and len(df):
                part = df.copy()
                part.insert(0, "step", rc.step)
                part.insert(0, "checkpoint", rc.name)
                parts.append(part)
        if not parts:
            return None
        out = pd.concat(parts, ignore_index=True)
        out["step"] = out["step"].astype("Int64")
        return out

    def metadata(self) -> dict[str, Any]:
        """Run metadata for the manifest, the table files and the report."""
        per: dict[str, dict[str, Any]] = {}
        notes: list[str] = []
        for (ck, analyzer), res in self.results.items():
            m = res.metadata
            per.setdefault(ck, {})[analyzer] = {
                k: m.get(k)
                for k in ("seed", "samples", "samples_available", "n_params", "dtype", "device", "hvp_count", "seconds")
                if k in m
            }
            for note in m.get("notes") or []:
                line = f"{ck} [{analyzer}]: {note}"
                if line not in notes:
                    notes.append(line)
        computed = set(self.computed)
        failed = {(f.checkpoint, f.analyzer) for f in self.failures}
        skipped = {s.checkpoint for s in self.skipped}
        notes += [f"{s.checkpoint}: skipped, {s.reason}" for s in self.skipped]
        notes += [w for w in self.warnings if w not in notes]

        def status(name: str, analyzer: str) -> str:
            if (name, analyzer) in failed:
                return "failed"
            if (name, analyzer) in computed:
                return "computed"
            if name in skipped:
                return "skipped"
            return "cached" if (name, analyzer) in self.results else "none"

        return {
            "format": MANIFEST_FORMAT,
            "status": "complete",
            "run": str(self.run_dir),
            "run_name": self.run_dir.resolve().name,
            "settings": self.settings.describe(),
            "analyzer_configs": {
                a: json.loads(canonical_json(_config_of(self.results, a))) for a in self.settings.analyzers
            },
            "checkpoints": [
                {
                    "checkpoint": rc.name,
                    "step": rc.step,
                    "step_source": rc.step_source,
                    "sha256": rc.sha256,
                    "status": {a: status(rc.name, a) for a in self.settings.analyzers},
                }
                for rc in self.checkpoints
            ],
            "counts": {
                "checkpoints": len(self.checkpoints),
                "computed": len(self.computed),
                "cached": len(self.cached),
                "failed": len(self.failures),
                "skipped": len(self.skipped),
                "records": len(self.frame),
            },
            "failures": [asdict(f) for f in self.failures],
            "skipped": [asdict(s) for s in self.skipped],
            "results": per,
            "notes": notes,
            "seconds": self.seconds,
            "versions": package_versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }


def _config_of(results: Mapping[tuple[str, str], Result], analyzer: str) -> Any:
    for (_, a), res in results.items():
        if a == analyzer and "config" in res.metadata:
            return res.metadata["config"]
    return None


def _relabel(result: Result, rc: RunCheckpoint) -> Result:
    """The records of ``result`` attributed to ``rc`` (run-relative name, resolved step)."""
    records = [replace(r, checkpoint=rc.name, step=rc.step) for r in result.records]
    return Result(records, result.metadata, result.artifacts)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if isinstance(exc, DiagnosticsError) else f"unexpected {type(exc).__name__}: {text}"


@dataclass
class _Tally:
    """What a sweep did so far (one per process under torch.distributed, gathered at the end)."""

    results: dict[tuple[str, str], Result] = field(default_factory=dict)
    computed: list[tuple[str, str]] = field(default_factory=list)
    cached: list[tuple[str, str]] = field(default_factory=list)
    failures: list[SweepFailure] = field(default_factory=list)
    skipped: list[SweepSkip] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def warn(self, line: str) -> None:
        if line not in self.warnings:
            self.warnings.append(line)

    def merge(self, other: _Tally) -> None:
        self.results.update(other.results)
        self.computed += other.computed
        self.cached += other.cached
        self.failures += other.failures
        self.skipped += [x for x in other.skipped if x not in self.skipped]
        self.warnings += [x for x in other.warnings if x not in self.warnings]


def check_settings(settings: SweepSettings, specs: Mapping[str, Any] | None = None) -> None:
    """Refuse, before anything is written, settings a sweep would refuse: no or unknown analyzers, options for
    analyzers that are not run, ill-typed options (:func:`_choose`)."""
    _choose(settings, specs)


def _choose(settings: SweepSettings, specs: Mapping[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The analyzers of the sweep and their configs (unknown names and options are errors)."""
    from diagnostics.analyzers.registry import all_analyzers

    if not settings.analyzers:
        raise DiagnosticsError("no analyzers to run; pass --analyzers hessian,...")
    available = dict(specs) if specs is not None else all_analyzers()
    unknown = [a for a in settings.analyzers if a not in available]
    if unknown:
        raise DiagnosticsError(
            f"unknown analyzer{'s' if len(unknown) > 1 else ''} {', '.join(repr(a) for a in unknown)}"
            f"{did_you_mean(unknown[0], list(available))}; available: {', '.join(sorted(available)) or '(none)'}"
        )
    stray = sorted(set(settings.options) - set(settings.analyzers))
    if stray:
        raise DiagnosticsError(f"options given for analyzers that are not run: {stray}")
    chosen = {a: available[a] for a in settings.analyzers}
    odd = {a: w for a, spec in chosen.items() if (w := getattr(spec, "sweep_with", None)) not in SWEEP_WITH}
    if odd:
        raise DiagnosticsError(
            f"analyzer(s) {sorted(odd)} declare sweep_with {sorted(odd.values())}; known: first, previous"
        )
    return chosen, {a: spec.make_config(settings.options.get(a)) for a, spec in chosen.items()}


def _open(rc: RunCheckpoint, settings: SweepSettings, need_targets: bool, need_data: bool = True) -> Any:
    """The context of one checkpoint, analysed from the very bytes the run was scanned with."""
    from diagnostics.runner import open_context

    content = read_checkpoint_file(rc.path)
    if content.sha256 != rc.sha256:
        raise CheckpointChanged(
            f"'{rc.name}' changed since the run was scanned (still being written?); it is analysed by the next run"
        )
    return open_context(
        rc.path,
        settings.binding(),
        settings.config,
        trust=settings.trust_checkpoint,
        need_targets=need_targets,
        need_data=need_data,
        content=content,
    )


def _scoped(progress: ProgressFn | None, analyzer: str) -> ProgressFn | None:
    if progress is None:
        return None
    return lambda task, done, total: progress(f"{analyzer}: {task}", done, total)


@dataclass
class _Job:
    """A sweep's fixed inputs: settings, analyzers and configs, cache folder, the run's checkpoints."""

    settings: SweepSettings
    chosen: dict[str, Any]
    configs: dict[str, Any]
    cache: Path | None
    keep_going: bool
    checkpoints: list[RunCheckpoint] = field(default_factory=list)
    opened: dict[str, Any] = field(default_factory=dict)  # the last contexts, reused as references
    warm: dict[str, dict[str, Any]] = field(default_factory=dict)  # warm_start analyzers' scratch, in memory

    def reference(self, analyzer: str, i: int) -> RunCheckpoint | None:
        """The checkpoint that ``sweep_with`` pairs with checkpoint ``i`` (None: none)."""
        kind = getattr(self.chosen[analyzer], "sweep_with", None)
        if kind == "first":
            return self.checkpoints[0]
        if kind == "previous" and i > 0:
            return self.checkpoints[i - 1]
        return None

    def wants_reference(self, analyzer: str) -> bool:
        return getattr(self.chosen[analyzer], "sweep_with", None) is not None

    def config(self, analyzer: str, i: int) -> Any:
        """The config, with the reference checkpoint's path in the declared option when the user left it unset."""
        cfg, option = self.configs[analyzer], getattr(self.chosen[analyzer], "reference_option", None)
        ref = self.reference(analyzer, i)
        if option and ref is not None and getattr(cfg, option) is None:
            cfg = replace(cfg, **{option: ref.path})
        return cfg

    def inputs(self, i: int, analyzer: str) -> dict[str, Any]:
        """The cache key's inputs of one result (the reference's content hash included)."""
        rc, ref = self.checkpoints[i], self.reference(analyzer, i)
        out = cache_inputs(rc.sha256, analyzer, self.config(analyzer, i), self.settings)
        if ref is not None:
            out["reference_sha256"] = ref.sha256
        return out

    def context(self, rc: RunCheckpoint, need_targets: bool, need_data: bool = True) -> Any:
        """The context of a checkpoint, reusing the one opened last (a reference is usually the previous one)."""
        key = f"{rc.sha256}|{need_targets}|{need_data}"
        if key not in self.opened:
            while len(self.opened) >= 2:
                self.opened.pop(next(iter(self.opened)))
            self.opened[key] = _open(rc, self.settings, need_targets, need_data)
        return self.opened[key]


def _analyze(i: int, missing: list[str], job: _Job, tally: _Tally, progress: ProgressFn | None) -> list[str]:
    """Compute the ``missing`` analyzers of checkpoint ``i`` (the cache filled as each finishes) -> those done."""
    from diagnostics.runner import run_analyzer

    rc = job.checkpoints[i]
    try:
        specs = [job.chosen[a] for a in missing]
        ctx = job.context(rc, any(a.needs_targets for a in specs), any(getattr(a, "needs_data", True) for a in specs))
    except CheckpointChanged as exc:
        tally.skipped.append(SweepSkip(rc.name, str(exc)))
        return []
    except Exception as exc:
        if not job.keep_going:
            _stop(rc, None, exc)
        tally.failures += [SweepFailure(rc.name, a, _one_line(exc)) for a in missing]
        return []
    done = []
    for a in missing:
        spec, ref = job.chosen[a], job.reference(a, i)
        try:
            others = (
                [job.context(ref, spec.needs_targets)] if ref and not getattr(spec, "reference_option", None) else []
            )
            res = run_analyzer(
                spec,
                job.config(a, i),
                ctx,
                _scoped(progress, a),
                others=others,
                replicates=job.settings.replicates,
                replicate_samples=job.settings.samples,
                warm=job.warm.setdefault(a, {}) if getattr(spec, "warm_start", False) else None,
            )
        except Exception as exc:
            if not job.keep_going:
                _stop(rc, a, exc)
            tally.failures.append(SweepFailure(rc.name, a, _one_line(exc)))
            continue
        if a in job.warm:
            job.warm[a]["source"] = f"step {rc.step}" if rc.step is not None else rc.name
        if job.cache is not None:
            store_cached(job.cache, job.inputs(i, a), res)
        tally.results[(rc.name, a)] = _relabel(res, rc)
        tally.computed.append((rc.name, a))
        done.append(a)
    return done


def _one_checkpoint(
    i: int, job: _Job, tally: _Tally, progress: ProgressFn | None, log: Callable[[str], None] | None
) -> None:
    """Cached results of checkpoint ``i``, then the missing ones computed; one log line."""
    rc, label = job.checkpoints[i], f"[{i + 1}/{len(job.checkpoints)}]"
    missing = []
    for a in job.chosen:
        if job.wants_reference(a) and job.reference(a, i) is None:
            continue  # paired with the previous checkpoint: the first one has none
        hit = load_cached(job.cache, job.inputs(i, a), tally.warn) if job.cache is not None and rc.sha256 else None
        if hit is None:
            missing.append(a)
        else:
            tally.results[(rc.name, a)] = _relabel(hit, rc)
            tally.cached.append((rc.name, a))
    if not missing:
        if log is not None:
            log(f"{label} {rc.name} (step {rc.step}): cached")
        return
    t0 = time.perf_counter()
    done = _analyze(i, missing, job, tally, progress)
    if log is None:
        return
    failed = [f.analyzer for f in tally.failures if f.checkpoint == rc.name]
    parts = [f"computed {','.join(done)} in {time.perf_counter() - t0:.1f} s"] if done else []
    if len(job.chosen) - len(done) - len(failed):
        parts.append("rest cached")
    if failed:
        parts.append(f"FAILED {','.join(failed)}")
    if any(s.checkpoint == rc.name for s in tally.skipped):
        parts.append("skipped (changed while reading; analysed next run)")
    log(f"{label} {rc.name} (step {rc.step}): {'; '.join(parts)}")


def _stop(rc: RunCheckpoint, analyzer: str | None, exc: Exception) -> None:
    """``--fail-fast``: stop the sweep at its first failure, saying where, that the results finished before it
    are cached, and how to go on. A user's own exception (not a :class:`DiagnosticsError`) is passed on as it is
    (``--debug`` shows its traceback)."""
    if not isinstance(exc, DiagnosticsError):
        raise exc
    where = rc.name + (f" [{analyzer}]" if analyzer else "")
    raise DiagnosticsError(
        f"the sweep stopped at {where} (--fail-fast): {exc}; the results finished before it are cached, so a "
        "rerun without --fail-fast goes on from there"
    ) from exc


def _sweep_checkpoints(
    job: _Job, tally: _Tally, progress: ProgressFn | None, log: Callable[[str], None] | None
) -> _Tally:
    """Every checkpoint of ``job`` (:func:`_one_checkpoint`), progress ``"checkpoints"`` after each.

    Under torch.distributed each rank takes every world-th checkpoint and analyses it alone (no data
    sharding inside), then the shares are gathered so that every rank returns the whole sweep.

    Args:
        job: the sweep's fixed inputs, with its checkpoints discovered.
        tally: what was done so far (discovery's skips and warnings); filled in place.
        progress: ``progress(task, done, total)`` or None.
        log: ``log(line)`` per checkpoint or None.

    Returns:
        ``tally``, or under torch.distributed a new one holding every rank's share.
    """
    total = len(job.checkpoints)
    if progress is not None:
        progress("checkpoints", 0, total)
    group = distributed.world()
    mine = {i for i, _ in distributed.shard_items(range(total))} if group.active else set(range(total))
    with distributed.local_only() if group.active else contextlib.nullcontext():
        for i in range(total):
            if i in mine:
                _one_checkpoint(i, job, tally, progress, log)
            if progress is not None:
                progress("checkpoints", i + 1, total)
    if group.active:
        whole = _Tally(skipped=list(tally.skipped), warnings=list(tally.warnings))
        for share in distributed.gather_items([(group.rank, tally)], n_items=group.size):
            whole.merge(share)
        tally = whole
    return tally


def sweep(
    run_dir: str | Path,
    settings: SweepSettings | None = None,
    *,
    cache_dir: str | Path | None = None,
    exclude: Sequence[Path] = (),
    progress: ProgressFn | None = None,
    specs: Mapping[str, Any] | None = None,
    keep_going: bool = True,
    log: Callable[[str], None] | None = None,
) -> SweepResult:
    """Run ``settings.analyzers`` on every checkpoint of ``run_dir``; reuse and fill the cache.

    Every result goes through :func:`diagnostics.runner.run_analyzer`, the path ``diag NAME`` uses.

    Args:
        run_dir: the run folder (:func:`discover_checkpoints`).
        settings: what to run and how to bind each checkpoint (default :class:`SweepSettings`: hessian).
        cache_dir: where results are cached (None: no cache).
        exclude: folders not searched for checkpoints (e.g. the output folder).
        progress: ``progress(task, done, total)``; the sweep reports task ``"checkpoints"`` after each
            checkpoint, analyzers report their own tasks (prefixed with the analyzer's name).
        specs: ``{name: Analyzer}`` to use instead of the registry (custom analyzers).
        keep_going: on a checkpoint that cannot be analysed (e.g. NaN weights), record a
            :class:`SweepFailure` and go on; otherwise raise.
        log: ``log(line)`` for one line per checkpoint (the CLI prints it when no bar is drawn).

    A checkpoint is analysed from the bytes it is hashed from; one that changed while it was read or
    since the run was scanned is skipped (:attr:`SweepResult.skipped`) and analysed by the next run.
    Cache files that fail their checksum are recomputed (:attr:`SweepResult.warnings`).

    Returns:
        The :class:`SweepResult`.

    Raises:
        DiagnosticsError: unknown analyzer or option, no checkpoints, or (with ``keep_going``) every
            result failed.
        KeyboardInterrupt: passed on; everything finished before it is in the cache.
    """
    t0 = time.perf_counter()
    settings = settings or SweepSettings()
    chosen, configs = _choose(settings, specs)
    job = _Job(settings, chosen, configs, None if cache_dir is None else Path(cache_dir), keep_going)
    tally = _Tally()
    checkpoints = job.checkpoints = discover_checkpoints(
        Path(run_dir),
        pattern=settings.pattern,
        exclude=exclude,
        cache_dir=job.cache,
        warn=tally.warn,
        on_skip=lambda name, why: tally.skipped.append(SweepSkip(name, why)),
    )
    tally = _sweep_checkpoints(job, tally, progress, log)
    if not tally.results and tally.failures:
        first = tally.failures[0]
        raise DiagnosticsError(
            f"every checkpoint failed; first: {first.checkpoint} [{first.analyzer}]: {first.message}"
        )
    records = [r for rc in checkpoints for a in chosen for r in tally.results.get((rc.name, a), Result([])).records]
    return SweepResult(
        frame=records_to_frame(records),
        checkpoints=checkpoints,
        results=tally.results,
        computed=tally.computed,
        cached=tally.cached,
        failures=tally.failures,
        settings=settings,
        run_dir=Path(run_dir),
        seconds=time.perf_counter() - t0,
        skipped=tally.skipped,
        warnings=tally.warnings,
    )


def sweep_pairs(
    analyzer: Any,
    config: Any,
    runs: Sequence[Path],
    binding: BindingOptions,
    project: Mapping[str, Any],
    *,
    trust: bool = False,
    progress: ProgressFn | None = None,
) -> Result:
    """Two runs (e.g. two seeds of one recipe): a two-checkpoint analyzer on every pair with the same step.

    Records carry the first run's checkpoint (relative to its folder) and the step; table artifacts are
    concatenated with a ``step`` column; the metadata lists the pairs (and each pair's own metadata).

    Returns:
        One :class:`~diagnostics.results.Result` over all pairs.

    Raises:
        DiagnosticsError: the runs share no step.
    """
    from diagnostics.runner import open_context, run_analyzer

    pairs, notes = paired_checkpoints(runs[0], runs[1])
    records, parts, tables = [], [], {}
    for i, (a, b) in enumerate(pairs):
        ctx_a, ctx_b = (
            open_context(c.path, binding, project, trust=trust, need_targets=analyzer.needs_targets) for c in (a, b)
        )
        res = run_analyzer(
            analyzer,
            config,
            ctx_a,
            progress,
            others=[ctx_b],
            replicates=binding.replicates,
            replicate_samples=binding.samples,
        )
        records += [replace(r, checkpoint=a.name, step=a.step) for r in res.records]
        meta = {k: v for k, v in res.metadata.items() if k not in ("versions", "binding", "config")}
        parts.append({"step": a.step, "a": a.name, "b": b.name, **meta})
        for name, df in res.artifacts.items():
            if isinstance(df, pd.DataFrame):
                tables.setdefault(name, []).append(df.assign(step=a.step))
        if progress is not None:
            progress("pairs", i + 1, len(pairs))
    first = dict(res.metadata)
    metadata = {
        **{k: first[k] for k in ("analyzer", "config", "versions", "binding", "seed", "dtype", "device") if k in first},
        "runs": [str(r) for r in runs],
        "pairs": parts,
        "seconds": sum(float(p.get("seconds") or 0.0) for p in parts),
        "hvp_count": sum(int(p.get("hvp_count") or 0) for p in parts),
        "notes": list(dict.fromkeys([*notes, *(n for p in parts for n in p.get("notes") or [])])),
    }
    return Result(records, metadata, {name: pd.concat(dfs, ignore_index=True) for name, dfs in tables.items()})


# ------------------------------------------------------------------------------- output folders
def is_ours(out: Path) -> bool:
    """Whether ``out`` holds a manifest written by :func:`write_sweep`."""
    manifest = Path(out) / MANIFEST_NAME
    if not manifest.is_file():
        return False
    try:
        return json.loads(manifest.read_text()).get("format") == MANIFEST_FORMAT
    except (json.JSONDecodeError, OSError, AttributeError):
        return False


def prepare_out_dir(out: str | Path, force: bool = False, protected: Sequence[Path] = ()) -> Path:
    """Check that ``out`` may receive a sweep/report (:func:`diagnostics.outputs.plan_outputs`), then create it.

    ``out`` must be absent, empty, or one of ours (or ``force``), never an input (``protected``: the run
    folder, diag.toml); the files a sweep and a report write there must be absent or regular files.
    One of ours that holds another run's sweep and report (its manifest names a run folder that is not
    among the ``protected`` folders) is not replaced without ``force`` either.
    Nothing is deleted: ``force`` only allows writing our files into a folder we did not create.
    An ``out`` that contains a protected folder (``--out .`` for the run ``./run``) is refused, even with
    ``force``: a sweep skips its output folder when it looks for checkpoints, so it would find none there.

    Raises:
        DiagnosticsError: one line naming the folder and the fix.
    """
    out = Path(out)
    check_out_dir(out, force, protected)
    return create_out_dir(out)


def create_out_dir(out: Path) -> Path:
    """Create ``out`` (and its parents) once :func:`check_out_dir` has passed."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DiagnosticsError(f"cannot create --out '{out}': {exc.strerror or exc}; choose another folder") from exc
    return out


def check_out_dir(out: Path, force: bool = False, protected: Sequence[Path] = ()) -> None:
    """The checks of :func:`prepare_out_dir`, without creating ``out`` (a command that may still refuse its
    arguments leaves no empty folder behind; :func:`create_out_dir` then makes it)."""
    _refuse_run_inside(out, protected)
    if not force:
        _refuse_other_run(out, protected)
    plan_outputs(
        inputs=protected,
        force=force,
        folder=("--out", out),
        folder_owner=(MANIFEST_NAME, MANIFEST_FORMAT),
        folder_files=FOLDER_FILES,
        folder_dirs=(CACHE_DIR, "figures"),
    )


def _refuse_run_inside(out: Path, protected: Sequence[Path]) -> None:
    """Refuse ``out`` when a protected folder (the run) lies inside it: the sweep excludes ``out`` from the
    search for checkpoints, so it would find none (``out`` equal to the run is refused by plan_outputs)."""
    for run in (Path(p) for p in protected):
        if run.is_dir() and out.resolve() != run.resolve() and _inside(run, out):
            raise DiagnosticsError(
                f"--out '{out}' contains the run folder '{run}', and a sweep never looks for checkpoints in its "
                "output folder; choose an --out outside the run folder"
            )


def _manifest_run(out: Path) -> Path | None:
    """The run folder named by the manifest of ``out`` (None: no readable manifest of ours, or no run)."""
    if not is_ours(out):
        return None
    try:
        manifest = read_manifest(out)
    except DiagnosticsError:  # unreadable: nothing to compare (writing there is judged by plan_outputs)
        return None
    run = (manifest or {}).get("run")
    return Path(run) if isinstance(run, str) and run else None


def refuse_output_as_run(run: Path) -> None:
    """Refuse a run folder that is a folder diag wrote (a sweep's or report's ``--out``, with its manifest):
    it holds results, not checkpoints. The message names the run its manifest records.

    Raises:
        DiagnosticsError: naming the folder, the run it was made from (when recorded) and the fix.
    """
    if not is_ours(run):
        return
    source = _manifest_run(run)
    made = f" from the run '{source}'" if source is not None else ""
    example = f"'{source}'" if source is not None else "the run folder"
    raise DiagnosticsError(
        f"'{run}' is an output folder diag wrote{made}, not a run of checkpoints; pass {example} as the run and "
        f"'{run}' as --out"
    )


def _refuse_other_run(out: Path, protected: Sequence[Path]) -> None:
    """Refuse ``out`` when it holds the sweep of a run folder other than the one(s) among ``protected``."""
    runs = [Path(p).resolve() for p in protected if Path(p).is_dir()]
    previous = _manifest_run(out)
    if not runs or previous is None or not previous.is_dir() or previous.resolve() in runs:
        return  # no run to compare, none recorded, or the recorded one is gone (moved, or relative elsewhere)
    raise DiagnosticsError(
        f"--out '{out}' holds the results and report of another run ('{previous}'); choose another --out, "
        "or pass --force to write this run's there (the other run's files are replaced)"
    )


def read_manifest(out: str | Path) -> dict[str, Any] | None:
    """The manifest of an output folder, or None when there is none."""
    path = Path(out) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, OSError) as exc:
        raise DiagnosticsError(f"'{path}' is not readable JSON ({exc}); delete it or choose another --out") from exc
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise DiagnosticsError(f"'{path}' is not a diag run manifest; choose another --out")
    return data


def start_manifest(
    out: str | Path, run_dir: str | Path, settings: SweepSettings, invocation: Mapping[str, Any] | None = None
) -> Path:
    """Write the manifest with status ``"in progress"`` before the first result is computed.

    The output folder is then recognised as diag's (:func:`is_ours`) however the sweep ends (Ctrl-C,
    ``kill -9``, a crash), so the same command resumes from the cache; :func:`write_sweep` replaces it
    with the complete manifest at the end. Call :func:`prepare_out_dir` first.
    """
    run = Path(run_dir)
    meta: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "status": "in progress",
        "run": str(run),
        "run_name": run.resolve().name,
        "settings": settings.describe(),
        "versions": package_versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if invocation is not None:
        meta["invocation"] = dict(invocation)
    path = Path(out) / MANIFEST_NAME
    atomic_write_bytes(path, strict_json(meta, indent=2).encode())
    return path


@contextlib.contextmanager
def last_manifest_kept(out: str | Path) -> Iterator[None]:
    """Put back the manifest ``out`` held before a sweep (``diag-run.json``) if the sweep raises.

    :func:`start_manifest` replaces a finished sweep's manifest before the first result; a rerun that then
    fails as a whole (every checkpoint failed, ``--fail-fast``, Ctrl-C) would leave that ``"in progress"``
    manifest beside the last sweep's tables, and ``diag report`` would rerun the failing command. With the
    last manifest back, the folder stays the last finished sweep's; the new results already computed are in
    the cache for the rerun. A folder with no manifest before (a first sweep) keeps ``"in progress"``, so
    that the same command resumes it.
    """
    path = Path(out) / MANIFEST_NAME
    try:
        previous = path.read_bytes() if path.is_file() else None
    except OSError:
        previous = None
    try:
        yield
    except BaseException:
        if previous is not None:
            with contextlib.suppress(OSError):  # the sweep's own error is the one to show
                atomic_write_bytes(path, previous)
        raise


def write_sweep(out: str | Path, result: SweepResult, invocation: Mapping[str, Any] | None = None) -> dict[str, Path]:
    """Write ``records.parquet``, ``records.csv`` (+ meta) and the manifest ``diag-run.json`` into ``out``.

    Hessian density artifacts, when any result has them, go to ``hessian_density.csv``. Every file is
    written atomically; the manifest (status ``"complete"``) last.

    Args:
        out: the output folder (call :func:`prepare_out_dir` first).
        result: what :func:`sweep` returned.
        invocation: the flags as given (stored so that ``diag report`` can rerun the same sweep).

    Returns:
        ``{"parquet", "csv", "manifest"[, "density"]: path written}``.
    """
    out = Path(out)
    meta = result.metadata()
    if invocation is not None:
        meta["invocation"] = dict(invocation)
    res = Result(_frame_records(result.frame), meta)
    paths = {
        "parquet": write_result(res, out / "records.parquet"),
        "csv": write_result(res, out / "records.csv"),
    }
    density = result.artifact_frame("hessian", "density")
    if density is not None:
        paths["density"] = out / "hessian_density.csv"
        atomic_write_bytes(paths["density"], density.to_csv(index=False).encode())
    paths["manifest"] = out / MANIFEST_NAME
    atomic_write_bytes(paths["manifest"], strict_json(meta, indent=2).encode())
    return paths


def _frame_records(frame: pd.DataFrame) -> list:
    from diagnostics.results import frame_to_records

    return frame_to_records(frame[COLUMNS]) if len(frame) else []


def write_report(out: str | Path, report: Any) -> dict[str, Path]:
    """Write a :class:`diagnostics.report.Report` (``index.html``, ``report.md``, ``figures/*.png``) into ``out``.

    Call :func:`prepare_out_dir` first; files are written atomically (temporary name + rename).
    """
    out = Path(out)
    written = {}
    for rel, data in report.files().items():
        path = out / rel
        atomic_write_bytes(path, data)
        written[rel] = path
    return written
