"""The runner: disjoint replicate subsets and the errors that name what the user passed."""

from __future__ import annotations

from pathlib import Path

import pytest

import tinymodels as tm
from diagnostics.binding import Binding
from diagnostics.checkpoint import load_checkpoint, save_checkpoint
from diagnostics.context import build_context
from diagnostics.errors import DiagnosticsError
from diagnostics.runner import disjoint_subsets


@pytest.fixture()
def ctx(tmp_path: Path):
    """The tiny model over all 23 samples of tiny_data."""
    path = save_checkpoint(tmp_path / "t.pt", tm.build_tiny(), step=3, lr=0.1)
    return build_context(load_checkpoint(path), Binding(model="tinymodels:build_tiny", data="tinymodels:tiny_data"))


def test_subsets_are_disjoint_and_default_to_n_over_k(ctx) -> None:
    subsets = disjoint_subsets(ctx, 23, None)  # the most replicates 23 samples allow: one sample each
    assert [s.n_samples for s in subsets] == [1] * 23
    assert [s.n_samples for s in disjoint_subsets(ctx, 4, None)] == [5] * 4
    assert [s.n_samples for s in disjoint_subsets(ctx, 3, 7)] == [7] * 3


def test_too_many_replicates_without_samples_names_what_the_user_passed(ctx) -> None:
    """Fuzzer C2: without --samples the error said '--samples 0 needs 0 samples' (0 = N // K)."""
    k = 99999999999999999999
    with pytest.raises(DiagnosticsError) as err:
        disjoint_subsets(ctx, k, None)
    msg = str(err.value)
    assert msg == (
        f"--replicates {k} splits the data into {k} disjoint subsets of 23 // {k} samples each (no --samples given), "
        f"which needs at least {k} samples but the data has 23; lower --replicates to at most 23"
    )
    assert "--samples 0" not in msg and "needs 0 samples" not in msg
    with pytest.raises(DiagnosticsError, match=r"^--replicates 24 splits the data into 24 disjoint subsets"):
        disjoint_subsets(ctx, 24, None)


def test_too_many_replicates_with_samples_names_both(ctx) -> None:
    with pytest.raises(
        DiagnosticsError, match=r"^--replicates 3 with --samples 8 needs 24 samples but the data has 23; "
    ):
        disjoint_subsets(ctx, 3, 8)
