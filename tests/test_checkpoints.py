"""Checkpoints count only when complete: a marker never recreates a checkpoint that is gone."""

from __future__ import annotations

import pytest

from tucka_llm.training import checkpoints


def test_a_marker_is_not_written_into_a_checkpoint_that_is_gone(tmp_path):
    with pytest.raises(FileNotFoundError, match="the checkpoint to mark complete is gone"):
        checkpoints.mark_complete(tmp_path / "checkpoint-4", 4)
    assert not (tmp_path / "checkpoint-4").exists() and checkpoints.latest_complete(tmp_path) is None
