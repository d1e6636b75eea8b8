"""Every path a command will write, decided and checked before anything is computed.

:func:`plan_outputs` is the one place that turns a command's output options into file paths: the
records file ``--out FILE`` (and its ``FILE.meta.json`` sidecar for ``.csv``), single files
(``--junit``, ``--per-image``, ``--grid-out``, a baseline), prefixes that expand to several files
(``--density-out P`` -> ``P.csv``, ``P.png``; ``--plot P`` -> ``P.spectrum.png``, ...), resumable caches
(``--grid-out G`` -> ``G.partial.json``) and output folders of sweeps and reports. It refuses, with one
line naming the option and the fix:

* an output that is one of the command's inputs (checkpoints, ``diag.toml``, ``file.py`` factories, a
  baseline, result tables), compared by resolved path *and* by ``os.path.samefile`` (hard links);
* an existing file without ``--force``;
* anything that is not a regular file, even with ``--force``: folders, FIFOs, sockets, device nodes
  (``/dev/null``), dangling symbolic links and links to any of those;
* two outputs that resolve to the same file (``--out d.csv --density-out d``);
* an output whose folder cannot be created or written to (a file in the way, a read-only folder);
  missing folders are created when writing;
* a resumable cache that exists but was not written by diag (it is neither read, overwritten nor deleted).

Files are then written by :func:`atomic_write_bytes`: a unique temporary file (``tempfile.mkstemp``) in
the target folder, permissions set to ``0o666 & ~umask`` (``mkstemp`` creates ``0o600``), then an
atomic rename; it again refuses to replace anything but a regular file, and only ever removes its own
temporary file.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from diagnostics.errors import DiagnosticsError

RECORD_SUFFIXES = (".json", ".csv", ".parquet", ".md")
PARTIAL_SUFFIX = ".partial.json"


@dataclass(frozen=True)
class PlannedFile:
    """One file a command will write.

    Attributes:
        flag: the option that asked for it (``--out``, ``--density-out``, ...).
        path: where it goes.
        ending: what was appended to a prefix (``".csv"``), ``".meta.json"`` for a sidecar, else ``""``.
        temporary: a resumable cache the command removes when it finishes (never a user's file).
    """

    flag: str
    path: Path
    ending: str = ""
    temporary: bool = False


@dataclass(frozen=True)
class OutputPlan:
    """The checked outputs of one command (see :func:`plan_outputs`)."""

    files: tuple[PlannedFile, ...] = ()
    folder: Path | None = None

    def path(self, flag: str, ending: str = "") -> Path | None:
        """The planned path of ``flag`` (with ``ending`` for prefixes), or None when not asked for."""
        for f in self.files:
            if f.flag == flag and f.ending == ending:
                return f.path
        return None

    def paths(self, flag: str) -> dict[str, Path]:
        """``{ending: path}`` of every file planned for ``flag``."""
        return {f.ending: f.path for f in self.files if f.flag == flag}

    def temporary(self, flag: str) -> bool:
        """Whether any file planned for ``flag`` is a temporary resume cache (removed when the command ends)."""
        return any(f.temporary for f in self.files if f.flag == flag)


# ------------------------------------------------------------------------------------ file kinds
def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def non_regular(path: Path) -> str | None:
    """None when ``path`` is absent or a regular file (a link to one counts); else what it is."""
    if not os.path.lexists(path):
        return None
    try:
        st = os.stat(path)  # follows links
    except FileNotFoundError:
        return "a dangling symbolic link"
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    if stat.S_ISREG(st.st_mode):
        return None
    what = _kind(st.st_mode)
    return f"a symbolic link to {what}" if os.path.islink(path) else what


def unwritable(path: Path) -> str | None:
    """None when ``path`` (a file or folder to be written) can be created; else why not, as a phrase.

    Its nearest existing ancestor must be a folder in which diag may create entries; missing folders in
    between are created when writing. Writability is probed with a temporary folder made and removed at
    once (permission bits alone miss read-only file systems, ``/proc`` and root squashing).
    """
    ancestor = next((p for p in Path(path).parents if os.path.lexists(p)), None)
    if ancestor is None:
        return None
    if not ancestor.is_dir():
        return f"'{ancestor}' is not a folder"
    try:
        probe = tempfile.mkdtemp(prefix=".diag-probe-", dir=ancestor)
    except OSError as exc:
        return f"cannot create files in '{ancestor}' ({exc.strerror or exc})"
    os.rmdir(probe)
    return None


def _same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _is_diag_file(path: Path, format_tag: str) -> bool:
    try:
        with open(path, "rb") as fh:
            head = json.loads(fh.read())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(head, dict) and head.get("format") == format_tag


def _records_files(out: Path | None) -> list[PlannedFile]:
    """``--out`` (a records suffix) and, for ``.csv``, its ``.meta.json`` sidecar."""
    if out is None:
        return []
    out = Path(out)
    if out.suffix.lower() not in RECORD_SUFFIXES:
        raise DiagnosticsError(f"--out '{out}': unknown suffix; use {', '.join(RECORD_SUFFIXES)}")
    planned = [PlannedFile("--out", out)]
    if out.suffix.lower() == ".csv":
        planned.append(PlannedFile("--out", out.with_name(out.name + ".meta.json"), ".meta.json"))
    return planned


def _single_files(files: Mapping[str, tuple[Path | None, Sequence[str]]]) -> list[PlannedFile]:
    """``{flag: (path, allowed suffixes)}`` -> planned files (a wrong suffix is an error)."""
    planned = []
    for flag, (path, suffixes) in files.items():
        if path is None:
            continue
        path = Path(path)
        if suffixes and path.suffix.lower() not in tuple(s.lower() for s in suffixes):
            raise DiagnosticsError(f"{flag} '{path}': use a {' or '.join(suffixes)} file")
        planned.append(PlannedFile(flag, path))
    return planned


def _prefixed_files(prefixes: Mapping[str, tuple[Path | None, Sequence[str]]]) -> list[PlannedFile]:
    """``{flag: (PREFIX, endings)}`` -> ``PREFIX + ending`` for each ending."""
    planned: list[PlannedFile] = []
    for flag, (prefix, endings) in prefixes.items():
        if prefix is None:
            continue
        prefix = Path(prefix)
        if prefix.name in ("", ".", ".."):
            raise DiagnosticsError(f"{flag} '{prefix}' must name files (a prefix such as 'results/density')")
        planned += [PlannedFile(flag, prefix.with_name(prefix.name + e), e) for e in endings]
    return planned


def _check_folder_contents(
    flag: str, out_folder: Path, ins: Sequence[Path], folder_files: Sequence[str], folder_dirs: Sequence[str]
) -> None:
    """Files a command writes inside its folder must not be inputs or non-regular files; its sub-folders
    must be folders."""
    for rel in folder_files:
        inner = out_folder / rel
        for q in ins:
            if q.exists() and inner.exists() and _same_file(inner, q):
                raise DiagnosticsError(f"{flag} '{out_folder}' would overwrite the input '{q}'; choose another folder")
        what = non_regular(inner)
        if what is not None:
            raise DiagnosticsError(
                f"'{inner}' is {what}; diag writes only regular files there: move it or choose another {flag}"
            )
    for rel in folder_dirs:
        sub = out_folder / rel
        if os.path.lexists(sub) and not sub.is_dir():
            raise DiagnosticsError(f"'{sub}' is not a folder; diag writes its {rel}/ there: move it")


# --------------------------------------------------------------------------------------- planner
def plan_outputs(
    *,
    inputs: Iterable[str | Path | None] = (),
    force: bool = False,
    out: Path | None = None,
    files: Mapping[str, tuple[Path | None, Sequence[str]]] | None = None,
    prefixes: Mapping[str, tuple[Path | None, Sequence[str]]] | None = None,
    resumable: Mapping[str, tuple[Path | None, Path | None, str]] | None = None,
    folder: tuple[str, Path | None] | None = None,
    folder_owner: tuple[str, str] | None = None,
    folder_files: Sequence[str] = (),
    folder_dirs: Sequence[str] = (),
) -> OutputPlan:
    """Decide and check every path a command will write, before anything is computed.

    Args:
        inputs: files and folders the command reads; no output may be one of them.
        force: allow replacing existing regular files (never anything else, never an input).
        out: the records file ``--out`` (``.json .csv .parquet .md``); ``.csv`` adds ``FILE.meta.json``.
        files: ``{flag: (path, allowed suffixes)}`` single files (``()``: any suffix).
        prefixes: ``{flag: (PREFIX, endings)}``: writes ``PREFIX + ending`` for each ending.
        resumable: ``{flag: (explicit path, base, format tag)}``: a cache read back by a rerun; its path is
            the explicit one, else ``base + ".partial.json"`` (then temporary: removed when the command is
            done). An existing cache must carry ``format_tag``: anything else is never touched.
        folder: ``(flag, folder)`` of a sweep or report: absent, empty, ours or ``force``.
        folder_owner: ``(file name, format tag)`` marking a folder diag wrote (its manifest).
        folder_files: paths relative to ``folder`` that the command writes (absent or regular files).
        folder_dirs: sub-folders of ``folder`` the command writes into (absent or folders).

    Returns:
        The :class:`OutputPlan`.

    Raises:
        DiagnosticsError: one line naming the option, the path and the fix.
    """
    ins = [Path(p) for p in inputs if p is not None and str(p) != ""]
    planned = _records_files(out) + _single_files(files or {}) + _prefixed_files(prefixes or {})
    caches: dict[Path, str] = {}
    for flag, (explicit, base, tag) in (resumable or {}).items():
        if explicit is None and base is None:
            continue
        path = Path(explicit) if explicit is not None else Path(base).with_name(Path(base).name + PARTIAL_SUFFIX)
        planned.append(PlannedFile(flag, path, temporary=explicit is None))
        caches[path] = tag
    for f in planned:
        _check_file(f, ins, force, caches.get(f.path))
    _check_collisions(planned)
    out_folder = None
    if folder is not None and folder[1] is not None:
        flag, out_folder = folder[0], Path(folder[1])
        _check_folder(flag, out_folder, ins, force, folder_owner)
        _check_folder_contents(flag, out_folder, ins, folder_files, folder_dirs)
    return OutputPlan(tuple(planned), out_folder)


def _check_file(f: PlannedFile, inputs: Sequence[Path], force: bool, cache_tag: str | None) -> None:
    path, flag = f.path, f.flag
    label = f"{flag} '{path}'" if not f.ending else f"'{path}' (from {flag})"
    for q in inputs:
        if q.exists() and (path.resolve() == q.resolve() or (path.exists() and _same_file(path, q))):
            raise DiagnosticsError(f"{label} is an input of this command ('{q}'); choose another path")
    why = unwritable(path)
    if why is not None:
        raise DiagnosticsError(f"{label}: {why}; choose a path in a folder you can write to")
    what = non_regular(path)
    if what is not None:
        raise DiagnosticsError(
            f"{label} is {what}; diag writes only regular files (even with --force): choose another path"
        )
    if not path.exists():
        return
    if cache_tag is not None:
        if not _is_diag_file(path, cache_tag):
            raise DiagnosticsError(
                f"'{path}' exists and is not a cache diag wrote, so diag neither reads, overwrites nor deletes it: "
                f"move it, or pass {flag} with another path"
            )
        return  # ours: the command resumes from it
    if not force:
        raise DiagnosticsError(f"'{path}' exists; pass --force to overwrite it or choose another {flag}")


def _check_collisions(planned: Sequence[PlannedFile]) -> None:
    seen: dict[Path, PlannedFile] = {}
    for f in planned:
        key = f.path.resolve()
        other = seen.get(key)
        if other is None:
            for p, g in seen.items():
                if f.path.exists() and p.exists() and _same_file(f.path, p):
                    other = g
                    break
        if other is not None:
            raise DiagnosticsError(
                f"{other.flag} and {f.flag} would both write '{f.path}'; choose different names"
                if other.flag != f.flag
                else f"{f.flag} would write '{f.path}' twice; choose another name"
            )
        seen[key] = f


def _check_folder(flag: str, folder: Path, inputs: Sequence[Path], force: bool, owner: tuple[str, str] | None) -> None:
    for q in inputs:
        if q.exists() and folder.exists() and _same_file(folder, q):
            raise DiagnosticsError(f"{flag} '{folder}' is the input folder itself; choose another folder")
        if q.exists() and q.is_file() and folder.resolve() == q.resolve():
            raise DiagnosticsError(f"{flag} '{folder}' is an input file; choose another folder")
    if not os.path.lexists(folder):
        why = unwritable(folder)
        if why is not None:
            raise DiagnosticsError(f"{flag} '{folder}': {why}; choose a folder you can write to")
        return
    if not folder.is_dir():
        what = non_regular(folder) or "a file"
        raise DiagnosticsError(f"{flag} '{folder}' is {what}; pass a folder")
    why = unwritable(folder / "probe")
    if why is not None:
        raise DiagnosticsError(f"{flag} '{folder}': {why}; choose a folder you can write to")
    if owner is not None and any(folder.iterdir()) and not _is_diag_file(folder / owner[0], owner[1]) and not force:
        raise DiagnosticsError(
            f"'{folder}' is not empty and was not written by diag (no {owner[0]}); "
            f"choose another {flag} or pass --force to write into it anyway"
        )


# ---------------------------------------------------------------------------------------- writing
def current_umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path``: unique temporary file in the same folder, mode ``0o666 & ~umask``, rename.

    Raises:
        DiagnosticsError: ``path`` exists and is not a regular file (or a link to one): a folder, FIFO,
            socket or device node is never replaced, whatever the caller checked before; or its folder
            cannot be created or written to.
    """
    path = Path(path)
    what = non_regular(path)
    if what is not None:
        raise DiagnosticsError(f"'{path}' is {what}; diag writes only regular files: choose another path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise DiagnosticsError(
            f"cannot write '{path}': {exc.strerror or exc}; choose a path in a folder you can write to"
        ) from exc
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
