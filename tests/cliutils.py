"""Helpers for CLI tests (importable as ``cliutils``: tests/ is on sys.path)."""

from __future__ import annotations


def one_line_error(result, *fragments: str) -> str:
    """The single ``diag: error`` line of a CliRunner result that exited 2 without a traceback; each of
    ``fragments`` must occur in it."""
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.strip().splitlines() if ln.startswith("diag: error")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]
