"""Issue 10, failure 4: no command overwrites or deletes a user's file, whatever the flags.

Every output path is planned before anything is computed (:func:`diagnostics.outputs.plan_outputs`):
inputs, existing files without --force, non-regular files even with --force, two outputs on one path,
caches diag did not write; files respect the umask.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import tinymodels as tm
from diag_cli.main import app
from diagnostics.checkpoint import save_checkpoint

runner = CliRunner()
TINY = ["--model", "tinymodels:build_tiny", "--data", "tinymodels:tiny_data"]


def diag(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def assert_refused(result, fragment: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("diag: error: ") and fragment in lines[0], result.stderr
    assert result.stdout == ""


def tiny_ckpt(path: Path) -> Path:
    return save_checkpoint(path, tm.build_tiny(), step=7, lr=0.1)


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    return tiny_ckpt(tmp_path / "tiny.pt")


def test_existing_sidecar_is_not_overwritten_without_force(ckpt: Path, tmp_path: Path) -> None:
    sidecar = tmp_path / "res.csv.meta.json"
    sidecar.write_text('{"mine": true}')
    assert_refused(diag("hessian", ckpt, *TINY, "--out", tmp_path / "res.csv"), "res.csv.meta.json' exists")
    assert sidecar.read_text() == '{"mine": true}' and not (tmp_path / "res.csv").exists()
    assert diag("hessian", ckpt, *TINY, "--out", tmp_path / "res.csv", "--force", "-q").exit_code == 0
    assert json.loads(sidecar.read_text())["hvp_count"] > 0


def test_density_out_never_overwrites_the_checkpoint(tmp_path: Path) -> None:
    ck = tiny_ckpt(tmp_path / "w.png")  # any name is a valid checkpoint name
    before = ck.read_bytes()
    r = diag("hessian", ck, *TINY, "--density-out", tmp_path / "w", "--density-steps", "10", "--force")
    assert_refused(r, "is an input of this command")
    assert ck.read_bytes() == before and not (tmp_path / "w.csv").exists()


@pytest.mark.parametrize("command", ["weights", "rankme"])
def test_plot_never_overwrites_the_checkpoint(tmp_path: Path, command: str) -> None:
    ck = tiny_ckpt(tmp_path / "p.spectrum.png")
    before = ck.read_bytes()
    flags = ["--model", "tinymodels:build_tiny"] + (["--data", "tinymodels:tiny_data"] if command == "rankme" else [])
    assert_refused(diag(command, ck, *flags, "--plot", tmp_path / "p", "--force"), "is an input of this command")
    assert ck.read_bytes() == before


def test_landscape_plot_and_grid_never_overwrite_inputs(tmp_path: Path) -> None:
    ck = tiny_ckpt(tmp_path / "g.png")
    before = ck.read_bytes()
    args = ["landscape", ck, *TINY, "--dims", "1", "--steps", "3", "--force"]
    assert_refused(diag(*args, "--plot", tmp_path / "g"), "is an input of this command")
    assert ck.read_bytes() == before
    csv = tiny_ckpt(tmp_path / "g.csv")
    before = csv.read_bytes()
    r = diag("landscape", csv, *TINY, "--dims", "1", "--steps", "3", "--force", "--grid-out", csv)
    assert_refused(r, "is an input")
    assert csv.read_bytes() == before


@pytest.mark.parametrize("force", [False, True])
def test_grid_out_never_touches_a_users_partial_file(ckpt: Path, tmp_path: Path, force: bool) -> None:
    mine = tmp_path / "grid.csv.partial.json"
    mine.write_text("notes I keep next to my grids")
    args = ["landscape", ckpt, *TINY, "--dims", "1", "--steps", "3", "--grid-out", tmp_path / "grid.csv"]
    assert_refused(diag(*args, *(["--force"] if force else [])), "not a cache diag wrote")
    assert mine.read_text() == "notes I keep next to my grids" and not (tmp_path / "grid.csv").exists()
    # without the user's file, the command's own partial cache is removed when the grid is done
    mine.unlink()
    assert diag(*args, "-q").exit_code == 0
    assert (tmp_path / "grid.csv").is_file() and not mine.exists()


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def _link_to_dev_null(path: Path) -> Path:
    path.symlink_to("/dev/null")
    return path


@pytest.mark.parametrize("make", [_fifo, _link_to_dev_null], ids=["fifo", "link to /dev/null"])
def test_baseline_out_never_replaces_a_special_file(ckpt: Path, tmp_path: Path, make) -> None:
    target = make(tmp_path / "baseline.json")
    r = diag("baseline", ckpt, *TINY, "--replicates", "2", "--out", target, "--force")
    assert_refused(r, "diag writes only regular files")
    assert not stat.S_ISREG(os.lstat(target).st_mode)  # still the FIFO / the link


@pytest.mark.skipif(os.geteuid() != 0, reason="creating a device node needs root")
def test_baseline_out_never_replaces_a_device_node(ckpt: Path, tmp_path: Path) -> None:
    dev = tmp_path / "null"
    os.mknod(dev, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    assert_refused(diag("baseline", ckpt, *TINY, "--replicates", "2", "--out", dev, "--force"), "is a device")
    assert stat.S_ISCHR(os.lstat(dev).st_mode)


def test_two_outputs_on_one_path_are_refused(ckpt: Path, tmp_path: Path) -> None:
    r = diag("hessian", ckpt, *TINY, "--out", tmp_path / "d.csv", "--density-out", tmp_path / "d")
    assert_refused(r, "--out and --density-out would both write")
    assert not (tmp_path / "d.csv").exists()


def test_check_outputs_are_planned_against_the_baseline(ckpt: Path, tmp_path: Path) -> None:
    base = tmp_path / "b.json"
    assert diag("baseline", ckpt, *TINY, "--replicates", "2", "--out", base, "-q").exit_code == 0
    before = base.read_bytes()
    r = diag("check", ckpt, *TINY, "--baseline", base, "--out", base, "--force")
    assert_refused(r, "is an input of this command")
    r = diag("check", ckpt, *TINY, "--baseline", base, "--out", tmp_path / "r.xml", "--junit", tmp_path / "r.xml")
    assert_refused(r, "would both write")
    assert base.read_bytes() == before


def test_config_and_factory_files_are_inputs(ckpt: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "settings.json"  # a TOML file under any name
    cfg.write_text('model = "tinymodels:build_tiny"\n')
    r = diag("weights", ckpt, "--config", cfg, "--out", cfg, "--force")
    assert_refused(r, "is an input of this command")
    assert cfg.read_text() == 'model = "tinymodels:build_tiny"\n'
    found = tmp_path / "diag.toml"  # found in the working directory: an input too
    found.write_text('model = "tinymodels:build_tiny"\n')
    os.link(found, tmp_path / "alias.md")
    assert_refused(diag("weights", ckpt, "--out", tmp_path / "alias.md", "--force"), "is an input of this command")


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_outputs_respect_the_umask(ckpt: Path, tmp_path: Path, umask: int, mode: int) -> None:
    old = os.umask(umask)
    try:
        r = diag("hessian", ckpt, *TINY, "--out", tmp_path / "r.csv", "-q")
    finally:
        os.umask(old)
    assert r.exit_code == 0, r.output
    for name in ("r.csv", "r.csv.meta.json"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == mode


def test_run_folder_with_a_fifo_where_a_table_goes(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    tiny_ckpt(run / "step_1.pt")
    out = tmp_path / "out"
    out.mkdir()
    _fifo(out / "records.csv")
    r = diag("run", run, *TINY, "--out", out, "--force")
    assert_refused(r, "records.csv' is a FIFO")
    assert stat.S_ISFIFO(os.lstat(out / "records.csv").st_mode)


def test_run_and_report_never_write_into_their_input(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    torch.save(tm.build_tiny().state_dict(), run / "step_1.pt")
    assert_refused(diag("run", run, *TINY, "--out", run, "--force"), "input folder itself")
    assert_refused(diag("report", run, *TINY, "--out", run, "--force"), "input folder itself")


def test_a_prefix_that_ends_in_the_written_extension_is_not_doubled(ckpt: Path, tmp_path: Path) -> None:
    r = diag("landscape", ckpt, *TINY, "--steps", "5", "--dims", "2", "--plot", tmp_path / "land.png", "-q")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "land.png").exists() and (tmp_path / "land_surface.png").exists()
    assert not (tmp_path / "land.png.png").exists()
    r = diag("hessian", ckpt, *TINY, "--density-out", tmp_path / "dens.csv", "--density-steps", "10", "-q")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "dens.csv").read_text().startswith("group,eigenvalue,density")
    assert (tmp_path / "dens.png").exists()
    r = diag("hessian", ckpt, *TINY, "--density-out", tmp_path / "run.v2", "--density-steps", "10", "-q")
    assert r.exit_code == 0 and (tmp_path / "run.v2.csv").exists()  # another extension stays part of the prefix


@pytest.mark.parametrize("flag", ["--plot", "--grid-out"])
@pytest.mark.parametrize("value", ["", ".", ".."])
def test_an_output_path_that_names_no_file_is_refused(ckpt: Path, flag: str, value: str) -> None:
    assert_refused(diag("landscape", ckpt, *TINY, "--steps", "5", flag, value), f"{flag} '")
    r = diag("landscape", ckpt, *TINY, "--steps", "5", flag, value)
    assert "names no file" in r.stderr and f"e.g. {flag} " in r.stderr
