"""Partial work of a resumable analyzer kept in a file (``diag NAME --cache FILE``), so an interrupted
command continues where it stopped.

:class:`ResumeStore` is the object the generic command passes as ``resume=`` to an analyzer declared
``resumable=True``: the analyzer calls :meth:`ResumeStore.load` with its own key (a fingerprint of
everything that fixes its values, e.g. :func:`diagnostics.analyzers.landscape.landscape_key`) and
:meth:`ResumeStore.save` whenever it finished a piece. The file is replaced atomically on every save, so
it always holds a complete JSON document. A file written for another key (other checkpoint, data or
options) is refused unless ``--force``, which starts over.

:func:`resume_store` decides the file: ``--cache PATH`` (kept when done), or, without it, ``FILE.partial.json``
next to the first single-file output (e.g. ``--grid-out FILE.csv``), removed when the command succeeded.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from diagnostics.errors import DiagnosticsError
from diagnostics.spec import Analyzer

FORMAT = "diagnostics-partial-work/1"


class ResumeStore:
    """Partial work of one analyzer in one JSON file: ``{"format", "analyzer", "key", "data"}``.

    Args:
        path: the file.
        analyzer: the analyzer's name (a file of another analyzer is refused like another key).
        force: start over (ignore and then replace) a file that is unreadable or holds another key.
    """

    def __init__(self, path: Path, analyzer: str, force: bool = False) -> None:
        self.path = Path(path)
        self.analyzer = analyzer
        self.force = force
        self.saves = 0

    def load(self, key: str) -> Any:
        """The data saved under ``key``; None when the file does not exist (or ``force`` discards it).

        Raises:
            DiagnosticsError: the file is not a readable store, or was written for another key or analyzer
                (without ``force``).
        """
        if not self.path.exists():
            return None
        try:
            payload = json.loads(self.path.read_text())
            if not isinstance(payload, dict) or payload.get("format") != FORMAT:
                raise ValueError("not a partial-work file")
            saved = (payload["analyzer"], payload["key"])
            data = payload["data"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            if self.force:
                return None
            raise DiagnosticsError(
                f"cache '{self.path}' is not a readable cache of partial work ({type(exc).__name__}); delete it, "
                "choose another --cache or pass --force to start over"
            ) from None
        if saved != (self.analyzer, key):
            if self.force:
                return None
            raise DiagnosticsError(
                f"cache '{self.path}' holds partial work of a different computation (checkpoint, data or options "
                "differ); delete it, choose another --cache or pass --force to start over"
            )
        return data

    def save(self, key: str, data: Any) -> None:
        """Replace the file with ``data`` (JSON-ready) under ``key``, atomically."""
        from diagnostics.results import atomic_write_bytes

        payload = {"format": FORMAT, "analyzer": self.analyzer, "key": key, "data": data}
        atomic_write_bytes(self.path, json.dumps(payload).encode())
        self.saves += 1


@contextmanager
def resume_store(analyzer: Analyzer, path: Path | None, implicit: bool, force: bool) -> Iterator[ResumeStore | None]:
    """The store of a resumable analyzer's command (None for other analyzers, or with nowhere to keep it).

    ``path`` was planned and checked with the command's other outputs (``--cache PATH``, kept when done, or
    ``FILE.partial.json`` next to the first single-file output, ``implicit`` and removed on success). On Ctrl-C
    the command exits 130 with one line saying where the finished work is and that rerunning continues it.
    """
    if not analyzer.resumable:
        yield None
        return
    import typer

    from diag_cli.errors import err

    store = None if path is None else ResumeStore(path, analyzer.name, force=force)
    try:
        yield store
    except KeyboardInterrupt:
        if store is not None and store.path.exists():
            err(f"interrupted; the work finished so far is in '{store.path}': rerun the same command to continue")
        else:
            err("interrupted (pass --cache PATH to keep finished work and continue it later)")
        raise typer.Exit(130) from None
    if implicit and store is not None:
        store.path.unlink(missing_ok=True)
