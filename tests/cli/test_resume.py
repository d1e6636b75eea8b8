"""The store of partial work behind ``--cache``: round trip, refusal of another key, --force, atomic writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer

from diag_cli.resume import FORMAT, ResumeStore, resume_store
from diagnostics.analyzers.landscape import ANALYZER as LANDSCAPE
from diagnostics.errors import DiagnosticsError


def test_saved_data_loads_back_under_its_key_only(tmp_path: Path) -> None:
    path = tmp_path / "work.json"
    store = ResumeStore(path, "landscape")
    assert store.load("k1") is None  # nothing yet
    store.save("k1", {"points": {"0": [1.5, None]}})
    assert json.loads(path.read_text())["format"] == FORMAT
    assert ResumeStore(path, "landscape").load("k1") == {"points": {"0": [1.5, None]}}
    with pytest.raises(DiagnosticsError, match="different computation") as info:
        ResumeStore(path, "landscape").load("k2")
    assert "--force" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(DiagnosticsError, match="different computation"):
        ResumeStore(path, "rankme").load("k1")  # another analyzer's file
    assert ResumeStore(path, "landscape", force=True).load("k2") is None  # --force starts over
    assert ResumeStore(path, "landscape").load("k1") is not None  # ... without touching the file until a save
    assert [p.name for p in tmp_path.iterdir()] == ["work.json"]  # no temporary files left


@pytest.mark.parametrize("content", ["not json", json.dumps({"format": "other"}), json.dumps([1, 2])])
def test_a_file_that_is_not_a_store_is_refused_unless_forced(tmp_path: Path, content: str) -> None:
    path = tmp_path / "mine.json"
    path.write_text(content)
    with pytest.raises(DiagnosticsError, match="not a readable cache"):
        ResumeStore(path, "landscape").load("k")
    assert path.read_text() == content  # the user's file is untouched
    assert ResumeStore(path, "landscape", force=True).load("k") is None


def test_the_scope_removes_an_implicit_file_and_explains_an_interrupt(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    grid = tmp_path / "grid.csv"
    with resume_store(LANDSCAPE, grid.with_name("grid.csv.partial.json"), True, force=False) as store:
        store.save("k", {"points": {}})
        assert store.path.exists()
    assert not store.path.exists()  # done: the implicit file goes
    explicit = tmp_path / "keep.json"
    with pytest.raises(typer.Exit) as info, resume_store(LANDSCAPE, explicit, False, force=False) as store:
        store.save("k", {"points": {"0": [1.0, None]}})
        raise KeyboardInterrupt
    assert info.value.exit_code == 130 and explicit.exists()
    assert "rerun the same command to continue" in capsys.readouterr().err
