"""Seeded random streams: the one formula that turns ``(seed, stream)`` into a generator.

Every random draw of the package comes from an explicit CPU ``torch.Generator`` (so a seed gives the same
numbers on every device). Independent uses of one seed take different *streams*: stream 0 draws the data
subset, stream 1 the Lanczos start, and so on (each caller names its own).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

_PRIME = 1_000_003
_MOD = 2**63 - 1


def stream_seed(seed: int, stream: int = 0) -> int:
    """The integer seed of stream ``stream`` of ``seed``: ``(seed * 1_000_003 + stream) mod (2^63 - 1)``."""
    return (int(seed) * _PRIME + int(stream)) % _MOD


def stream_generator(seed: int, stream: int = 0) -> torch.Generator:
    """A fresh CPU generator for stream ``stream`` of ``seed``.

    Args:
        seed: the user's ``--seed``.
        stream: which independent stream of that seed.

    Returns:
        A ``torch.Generator`` seeded with :func:`stream_seed`.
    """
    import torch

    return torch.Generator().manual_seed(stream_seed(seed, stream))
