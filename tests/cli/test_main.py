"""The ``diag`` console script (``diag_cli.main.main``): it ends the process with ``os._exit`` after the command,
so these run it in a fresh interpreter and check what must survive the shortcut: the exit status, everything
written to stdout and stderr (also through a pipe), files closed, and the exit handlers run."""

from __future__ import annotations

import os
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


# a fresh interpreter: tune (or not), then malloc and free an 8 MiB block, and report where glibc put it
ALLOCATOR_PROBE = """
import ctypes, os, sys
from diag_cli.main import tune_allocator
tuned = tune_allocator() if sys.argv[1] == "tune" else None
libc = ctypes.CDLL(None)
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
before = libc.mallinfo2().hblks
block = libc.malloc(8 << 20)
mapped = libc.mallinfo2().hblks - before  # 1 when the block got its own mapping
libc.free(block)
print(tuned, mapped)
"""


def _glibc_with_mallinfo2() -> bool:
    import ctypes
    import os

    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc") and hasattr(ctypes.CDLL(None), "mallinfo2")
    except (ValueError, OSError):
        return False


@pytest.mark.skipif(not _glibc_with_mallinfo2(), reason="glibc 2.33+ only")
def test_the_console_script_fixes_the_malloc_thresholds() -> None:
    def probe(mode: str, **env: str) -> list[str]:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
        proc = subprocess.run(
            [sys.executable, "-c", ALLOCATOR_PROBE, mode],
            capture_output=True,
            text=True,
            timeout=120,
            env={**clean, **env},
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout.split()

    # glibc's default: a first 8 MiB block is above its starting 128 KiB threshold and gets its own mapping
    assert probe("plain") == ["None", "1"]
    # fixed at 32 MiB: the block comes from the heap, and freeing it does not give the pages back
    assert probe("tune") == ["True", "0"]
    # the user's own allocator settings win
    assert probe("tune", MALLOC_ARENA_MAX="2") == ["False", "1"]
    assert probe("tune", GLIBC_TUNABLES="glibc.malloc.trim_threshold=131072") == ["False", "1"]


def test_main_tunes_the_allocator_before_the_command(monkeypatch: pytest.MonkeyPatch) -> None:
    from diag_cli import main as cli_main

    calls: list[str] = []
    monkeypatch.setattr(cli_main, "tune_allocator", lambda: calls.append("tuned") or True)
    monkeypatch.setattr(cli_main, "app", lambda: calls.append("app"))
    monkeypatch.setattr(cli_main.os, "_exit", lambda code: calls.append(f"exit {code}"))
    monkeypatch.setattr(cli_main.atexit, "_run_exitfuncs", lambda: None)
    # main() joins threads and stops thread pools as the interpreter's exit would: not in the test's process
    monkeypatch.setattr(cli_main.threading, "_shutdown", lambda: None)
    cli_main.main()
    assert calls[:2] == ["tuned", "app"]  # (under a tracer such as coverage main returns without os._exit)
