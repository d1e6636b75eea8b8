"""User-facing errors.

Everything a user can get wrong (a missing file, a bad factory, wrong keys, NaN weights, empty data)
raises :class:`DiagnosticsError` with a one-line message that says what is wrong and how to fix it.
The CLI turns it into ``error: <message>`` on stderr and exit code 2; library users can catch it.
"""

from __future__ import annotations


class DiagnosticsError(Exception):
    """Bad input or usage; the message is one line, meant for the user."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


def one_line(exc: BaseException, limit: int = 200) -> str:
    """An exception's message on one line (whitespace collapsed), at most ``limit`` characters."""
    return " ".join(str(exc).split())[:limit]


class GateFailed(Exception):
    """A check or gate failed (CLI exit code 1)."""
