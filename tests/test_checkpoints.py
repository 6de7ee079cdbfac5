"""Checkpoints count only when complete (a marker never recreates a checkpoint that is gone), and a run resumed from
one logs what the uninterrupted run logs."""

from __future__ import annotations

import json

import pytest

from tucka_llm.training import checkpoints, parse_options, train


def test_a_marker_is_not_written_into_a_checkpoint_that_is_gone(tmp_path):
    with pytest.raises(FileNotFoundError, match="the checkpoint to mark complete is gone"):
        checkpoints.mark_complete(tmp_path / "checkpoint-4", 4)
    assert not (tmp_path / "checkpoint-4").exists() and checkpoints.latest_complete(tmp_path) is None


def test_a_resumed_runs_first_log_averages_the_steps_an_uninterrupted_run_averages(tiny_model, tmp_path):
    """Logged every 2 steps, checkpointed at step 3: the log at step 4 averages steps 3 and 4 in both runs (HF's
    Trainer alone would average step 4 only after the resume)."""
    flags = ["--model", str(tiny_model), "--data", "gsm8k-train", "--num-examples", "8", "--max-len", "256",
             "--r", "4", "--k", "3", "--alpha", "8", "--precision", "fp32", "--global-batch", "2", "--max-steps",
             "6", "--logging-steps", "2", "--save-steps", "3", "--lr", "1e-2"]  # fmt: skip
    train(parse_options([*flags, "--output", str(tmp_path / "straight")]))
    train(parse_options([*flags, "--output", str(tmp_path / "resumed"), "--stop-at-step", "3"]))
    train(parse_options([*flags, "--output", str(tmp_path / "resumed"), "--resume"]))

    def losses(run: str) -> dict[int, float]:
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return {record["step"]: record["loss"] for record in map(json.loads, lines)}

    straight, resumed = losses("straight"), losses("resumed")
    assert sorted(resumed) == sorted(straight) == [1, 2, 4, 6]  # logging_first_step, then every 2
    assert resumed == pytest.approx(straight, rel=1e-6, abs=0)
