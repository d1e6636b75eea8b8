"""Run Python code in a fresh interpreter (importable as ``freshpy``: tests/ is on sys.path).

For what only a new process shows: which modules an import or a computation pulls in.
"""

from __future__ import annotations

import subprocess
import sys


def run_fresh(script: str, *args: str, timeout: float = 120) -> str:
    """``python -c script *args`` in a new interpreter; asserts it exits 0 and returns its stdout."""
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout
