"""The output planner: inputs, existing files, non-regular files, collisions, caches, folders, umask."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from diagnostics.errors import DiagnosticsError
from diagnostics.outputs import PARTIAL_SUFFIX, atomic_write_bytes, non_regular, plan_outputs

TAG = "diagnostics-test-cache/1"
OWNER = ("diag-run.json", "diagnostics-run/1")


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    p = tmp_path / "model.pt"
    p.write_bytes(b"weights")
    return p


def test_plans_every_path_of_a_command(tmp_path: Path, ckpt: Path) -> None:
    plan = plan_outputs(
        inputs=[ckpt],
        out=tmp_path / "r.csv",
        prefixes={"--density-out": (tmp_path / "dens", (".csv", ".png"))},
        files={"--junit": (tmp_path / "j.xml", (".xml",))},
        resumable={"--cache": (None, tmp_path / "grid.csv", TAG)},
    )
    assert plan.path("--out") == tmp_path / "r.csv"
    assert plan.path("--out", ".meta.json") == tmp_path / "r.csv.meta.json"
    assert plan.paths("--density-out") == {".csv": tmp_path / "dens.csv", ".png": tmp_path / "dens.png"}
    assert plan.path("--cache") == tmp_path / f"grid.csv{PARTIAL_SUFFIX}" and plan.temporary("--cache")
    assert plan.path("--plot") is None
    explicit = plan_outputs(resumable={"--cache": (tmp_path / "c.json", tmp_path / "grid.csv", TAG)})
    assert explicit.path("--cache") == tmp_path / "c.json" and not explicit.temporary("--cache")


def test_inputs_are_refused_by_path_by_link_and_by_hard_link(tmp_path: Path, ckpt: Path) -> None:
    (tmp_path / "link.json").symlink_to(ckpt)
    os.link(ckpt, tmp_path / "hard.json")
    for out in (ckpt, tmp_path / "link.json", tmp_path / "hard.json", tmp_path / "sub" / ".." / "model.pt"):
        for force in (False, True):
            with pytest.raises(DiagnosticsError, match="is an input of this command"):
                plan_outputs(inputs=[ckpt], files={"--out": (out, ())}, force=force)
    # a prefix that expands onto an input (checkpoint saved as w.png, --density-out w)
    png = tmp_path / "w.png"
    png.write_bytes(b"weights")
    with pytest.raises(DiagnosticsError, match=r"'.*w.png' \(from --density-out\) is an input"):
        plan_outputs(inputs=[png], prefixes={"--density-out": (tmp_path / "w", (".csv", ".png"))}, force=True)
    assert png.read_bytes() == b"weights"


def test_existing_files_need_force_sidecars_included(tmp_path: Path) -> None:
    (tmp_path / "r.csv.meta.json").write_text("{}")
    with pytest.raises(DiagnosticsError, match=r"r.csv.meta.json' exists; pass --force"):
        plan_outputs(out=tmp_path / "r.csv")
    plan_outputs(out=tmp_path / "r.csv", force=True)
    with pytest.raises(DiagnosticsError, match="unknown suffix"):
        plan_outputs(out=tmp_path / "r.txt")


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


@pytest.mark.parametrize("kind", ["folder", "fifo", "link to fifo", "link to folder", "dangling link", "link to dev"])
def test_non_regular_files_are_refused_even_with_force(tmp_path: Path, kind: str) -> None:
    target = tmp_path / "target"
    if kind == "folder":
        target.mkdir()
        out = target
    elif kind == "fifo":
        out = _fifo(target)
    else:
        out = tmp_path / "out.json"
        if kind == "link to fifo":
            _fifo(target)
        elif kind == "link to folder":
            target.mkdir()
        elif kind == "link to dev":
            target = Path("/dev/null")
        out.symlink_to(target)
    for force in (False, True):
        with pytest.raises(DiagnosticsError, match="diag writes only regular files"):
            plan_outputs(files={"--out": (out, ())}, force=force)
    with pytest.raises(DiagnosticsError, match="diag writes only regular files"):
        atomic_write_bytes(out, b"data")
    assert non_regular(out) is not None  # untouched


@pytest.mark.skipif(os.geteuid() != 0, reason="creating a device node needs root")
def test_device_node_is_never_replaced(tmp_path: Path) -> None:
    dev = tmp_path / "null"
    os.mknod(dev, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    with pytest.raises(DiagnosticsError, match="is a device"):
        plan_outputs(files={"--out": (dev, ())}, force=True)
    with pytest.raises(DiagnosticsError, match="is a device"):
        atomic_write_bytes(dev, b"data")
    assert stat.S_ISCHR(os.lstat(dev).st_mode)


def test_two_outputs_on_one_path(tmp_path: Path) -> None:
    with pytest.raises(DiagnosticsError, match="--out and --density-out would both write '.*d.csv'"):
        plan_outputs(out=tmp_path / "d.csv", prefixes={"--density-out": (tmp_path / "d", (".csv", ".png"))})
    with pytest.raises(DiagnosticsError, match="--out and --junit would both write"):
        plan_outputs(out=tmp_path / "r.json", files={"--junit": (tmp_path / "x" / ".." / "r.json", ())})
    (tmp_path / "a.json").write_text("{}")
    os.link(tmp_path / "a.json", tmp_path / "b.json")
    with pytest.raises(DiagnosticsError, match="would both write"):
        plan_outputs(out=tmp_path / "a.json", files={"--junit": (tmp_path / "b.json", ())}, force=True)


def test_a_users_partial_file_is_never_touched(tmp_path: Path) -> None:
    mine = tmp_path / f"grid.csv{PARTIAL_SUFFIX}"
    mine.write_text("my notes, not a cache")
    for force in (False, True):
        with pytest.raises(DiagnosticsError, match="not a cache diag wrote"):
            plan_outputs(resumable={"--cache": (None, tmp_path / "grid.csv", TAG)}, force=force)
    assert mine.read_text() == "my notes, not a cache"
    mine.write_text(json.dumps({"format": TAG, "points": {}}))  # ours: resumed from, no --force needed
    plan = plan_outputs(resumable={"--cache": (None, tmp_path / "grid.csv", TAG)})
    assert plan.path("--cache") == mine


def test_output_folders(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(DiagnosticsError, match="input folder itself"):
        plan_outputs(inputs=[run], folder=("--out", run), folder_owner=OWNER, force=True)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "thesis.tex").write_text("precious")
    with pytest.raises(DiagnosticsError, match="not empty and was not written by diag"):
        plan_outputs(folder=("--out", theirs), folder_owner=OWNER)
    plan_outputs(folder=("--out", theirs), folder_owner=OWNER, force=True)
    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / OWNER[0]).write_text(json.dumps({"format": OWNER[1]}))
    assert plan_outputs(folder=("--out", ours), folder_owner=OWNER).folder == ours
    _fifo(ours / "records.csv")
    with pytest.raises(DiagnosticsError, match="records.csv' is a FIFO"):
        plan_outputs(folder=("--out", ours), folder_owner=OWNER, folder_files=["records.csv"], force=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(DiagnosticsError, match="pass a folder"):
        plan_outputs(folder=("--out", tmp_path / "file"), folder_owner=OWNER, force=True)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_respect_the_umask(tmp_path: Path, umask: int, mode: int) -> None:
    old = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "f.json", b"{}")
        atomic_write_bytes(tmp_path / "f.json", b"{}")  # replacing keeps the rule
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "f.json").st_mode) == mode
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]  # no temporary file left behind


def test_a_failed_write_removes_only_its_own_temporary_file(tmp_path: Path) -> None:
    (tmp_path / ".f.json.keep.tmp").write_text("a user's file that looks like a temporary one")

    with pytest.raises(TypeError):
        atomic_write_bytes(tmp_path / "f.json", object())  # type: ignore[arg-type]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".f.json.keep.tmp"]


# ------------------------------------------------------------------ folders that cannot take the output
def _blocked(tmp_path: Path) -> Path:
    """A path whose parent cannot exist: a regular file sits where a folder would have to be."""
    (tmp_path / "notes.txt").write_text("a user's file")
    return tmp_path / "notes.txt" / "sub" / "r.json"


def test_output_under_a_file_is_refused_when_planning(tmp_path: Path) -> None:
    target = _blocked(tmp_path)
    with pytest.raises(DiagnosticsError, match=r"--out .*'.*notes.txt' is not a folder; choose a path") as info:
        plan_outputs(out=target)
    assert "\n" not in str(info.value)
    with pytest.raises(DiagnosticsError, match=r"--density-out\).*notes.txt' is not a folder"):
        plan_outputs(prefixes={"--density-out": (target.with_suffix(""), (".csv",))})
    with pytest.raises(DiagnosticsError, match=r"--out '.*' is not a folder"):
        plan_outputs(folder=("--out", target.parent), folder_owner=OWNER)
    assert (tmp_path / "notes.txt").read_text() == "a user's file"


def test_missing_folders_of_a_writable_parent_are_fine(tmp_path: Path) -> None:
    plan = plan_outputs(out=tmp_path / "new" / "deeper" / "r.json")
    assert plan.path("--out") == tmp_path / "new" / "deeper" / "r.json"
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing created (the probe is removed)


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_output_in_a_folder_that_refuses_files_is_refused_when_planning() -> None:
    with pytest.raises(DiagnosticsError, match=r"--out '/proc/diag-test/r.json': cannot create files in '/proc'"):
        plan_outputs(out=Path("/proc/diag-test/r.json"))
    with pytest.raises(DiagnosticsError, match=r"--out '/proc/diag-test': cannot create files in '/proc'"):
        plan_outputs(folder=("--out", Path("/proc/diag-test")), folder_owner=OWNER)


@pytest.mark.skipif(os.geteuid() == 0 if hasattr(os, "geteuid") else True, reason="root writes anywhere")
def test_read_only_folder_is_refused_when_planning(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(DiagnosticsError, match=r"cannot create files in"):
            plan_outputs(out=ro / "r.json")
        with pytest.raises(DiagnosticsError, match=r"cannot create files in"):
            plan_outputs(folder=("--out", ro), folder_owner=OWNER)
    finally:
        ro.chmod(0o755)


def test_atomic_write_into_an_impossible_folder_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(DiagnosticsError, match=r"cannot write '.*r.json': .*choose a path"):
        atomic_write_bytes(_blocked(tmp_path), b"{}")
