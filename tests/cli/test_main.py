"""The ``diag`` console script (``diag_cli.main.main``): it ends the process with ``os._exit`` after the command,
so these run it in a fresh interpreter and check what must survive the shortcut: the exit status, everything
written to stdout and stderr (also through a pipe), files closed, and the exit handlers run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from diag_cli.main import _exit_code


def run_main(*args: str, prelude: str = "", cwd: Path | None = None) -> subprocess.CompletedProcess:
    code = f"import sys\n{prelude}\nsys.argv = ['diag', *{list(args)!r}]\nfrom diag_cli.main import main\nmain()\n"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=cwd)


def test_version_reaches_stdout_and_status_is_zero() -> None:
    proc = run_main("--version")
    assert proc.returncode == 0
    assert proc.stdout.startswith("diag ")


def test_bad_input_keeps_status_two_and_its_message() -> None:
    proc = run_main("hessian", "no-such-checkpoint.pt")
    assert proc.returncode == 2
    assert "no-such-checkpoint.pt" in proc.stderr


def test_exit_handlers_run_before_the_process_ends(tmp_path: Path) -> None:
    marker = tmp_path / "marker.txt"
    prelude = f"import atexit\natexit.register(lambda: open({str(marker)!r}, 'w').write('ran'))"
    proc = run_main("--version", prelude=prelude)
    assert proc.returncode == 0
    assert marker.read_text() == "ran"


def test_threads_that_are_not_daemons_finish(tmp_path: Path) -> None:
    marker = tmp_path / "thread.txt"
    prelude = (
        "import threading, time\n"
        f"threading.Thread(target=lambda: (time.sleep(0.5), open({str(marker)!r}, 'w').write('done'))).start()\n"
        "from concurrent.futures import ThreadPoolExecutor\n"
        f"ThreadPoolExecutor(1).submit(lambda: (time.sleep(0.5), open({str(marker)!r} + '.pool', 'w').write('done')))"
    )
    proc = run_main("--version", prelude=prelude)
    assert proc.returncode == 0, proc.stderr
    assert marker.read_text() == "done"
    assert Path(str(marker) + ".pool").read_text() == "done"


def test_temporary_folders_are_removed(tmp_path: Path) -> None:
    # a TemporaryDirectory left open is removed by its weakref finalizer, an exit handler
    prelude = (
        "import tempfile, pathlib\n"
        f"t = tempfile.TemporaryDirectory(dir={str(tmp_path)!r})\n"
        "pathlib.Path(t.name, 'x').write_text('x')"
    )
    proc = run_main("--version", prelude=prelude)
    assert proc.returncode == 0
    assert list(tmp_path.iterdir()) == []


def test_records_are_complete_through_a_pipe(tmp_path: Path) -> None:
    # buffered stdout is flushed before os._exit: the whole JSON document arrives
    import json

    import tinymodels as tm
    from diagnostics.checkpoint import save_checkpoint

    ckpt = save_checkpoint(tmp_path / "tiny.pt", tm.build_tiny(), step=7)
    proc = run_main(
        "hessian", str(ckpt), "--model", "tinymodels:build_tiny", "--data", "tinymodels:tiny_data",
        "--top-k", "3", "--trace", "-q", "-f", "json", cwd=Path(tm.__file__).parent,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert sum(r["metric"] == "eigenvalue" for r in rows) == 3
    assert any(r["metric"] == "trace" for r in rows)


@pytest.mark.parametrize(("code", "status"), [(None, 0), (0, 0), (2, 2), (256 + 3, 3), ("message", 1)])
def test_exit_code_matches_sys_exit(code: object, status: int, capsys: pytest.CaptureFixture) -> None:
    assert _exit_code(code) == status
    if isinstance(code, str):
        assert capsys.readouterr().err.strip() == code


def test_a_profiler_still_gets_to_write_its_results(tmp_path: Path) -> None:
    out = tmp_path / "diag.prof"
    code = "import sys\nsys.argv = ['diag', '--version']\nfrom diag_cli.main import main\nmain()\n"
    script = tmp_path / "run_diag.py"
    script.write_text(code)
    proc = subprocess.run(
        [sys.executable, "-m", "cProfile", "-o", str(out), str(script)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("diag ")
    assert out.stat().st_size > 0
