"""Checkpoints count only when complete (a marker never recreates a checkpoint that is gone), and a run resumed from
one logs what the uninterrupted run logs."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

import tucka_llm
from tucka_llm.models import tiny_llama_config
from tucka_llm.training import checkpoints, parse_options, train
from tucka_llm.training.trainer import lean_state_dict


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


def test_saving_an_adapter_copies_its_trained_tensors_and_none_of_the_base(tmp_path):
    """RunTrainer saves from ``lean_state_dict`` (HF's save copies the whole model per rank under ZeRO-2): the same
    adapter file as peft's own save, from a copy of the trained tensors only, a tied head included."""
    config = tiny_llama_config()
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = peft.get_peft_model(LlamaForCausalLM(config), tucka_llm.TuckAConfig(r=4, k=3, target_modules=["q_proj"]))
    parameters = dict(model.named_parameters(remove_duplicate=False))
    lean = lean_state_dict(model)
    copied = [name for name, tensor in lean.items() if tensor.data_ptr() != model.state_dict()[name].data_ptr()]
    assert {n for n in copied if n in parameters} == {n for n, p in parameters.items() if p.requires_grad}
    assert "base_model.model.lm_head.weight" in parameters and "base_model.model.lm_head.weight" not in copied
    model.save_pretrained(tmp_path / "peft")
    model.save_pretrained(tmp_path / "lean", state_dict=lean)
    expected, saved = (load_file(tmp_path / name / "adapter_model.safetensors") for name in ("peft", "lean"))
    assert expected.keys() == saved.keys() and all(torch.equal(expected[k], saved[k]) for k in expected)
