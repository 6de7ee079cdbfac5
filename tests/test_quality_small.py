"""bench/quality_small.py compares methods on held-out data: what it trains on must never be what it measures, and
its matched rank and mutual information must mean what its tables say."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import peft
import torch
from transformers import AutoModelForCausalLM

from tucka_llm.data import asset_path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("quality_small", ROOT / "bench" / "quality_small.py")
quality_small = importlib.util.module_from_spec(spec)
sys.modules["quality_small"] = quality_small  # its dataclasses look their module up there
spec.loader.exec_module(quality_small)


def test_math_training_problems_are_never_held_out_nor_math500():
    held_out, training = quality_small.math_pools()
    math500 = {json.loads(line)["problem"] for line in asset_path("math", "math500_test.jsonl").open()}
    trained = {r["query"] for r in training}
    assert not trained & {r["query"] for r in held_out}
    assert not trained & math500
    assert len(held_out) + len(training) + len(math500 - {r["query"] for r in held_out}) == 5000
    # the test file is sorted by subject: the held-out problems must still mix them
    subjects = {
        json.loads(line)["problem"]: json.loads(line)["type"] for line in asset_path("math", "test.jsonl").open()
    }
    assert len({subjects[r["query"]] for r in held_out[:48]}) >= 5


def test_the_training_mix_alternates_sources_and_ends_in_metamathqa_answers():
    records = quality_small.training_records(["gsm8k", "math"], 10)
    assert [r["type"] for r in records] == ["GSM_train", "MATH"] * 5
    assert all("\nThe answer is: " in r["response"] for r in records)


def test_mutual_information_is_zero_when_groups_ignore_the_source_and_ln2_when_they_split_it():
    assert quality_small.mutual_information({"gsm8k": [3, 3], "math": [3, 3]}) == 0.0
    assert math.isclose(quality_small.mutual_information({"gsm8k": [6, 0], "math": [0, 6]}), math.log(2))
    mean, high = quality_small.chance_mutual_information({"gsm8k": [24, 24], "math": [24, 24]}, draws=200)
    assert 0 < mean < high < 0.1  # shuffled sources: a small positive bias, far below a split


def test_matched_lora_rank_comes_closest_to_tuckas_trainable_parameters(tiny_model):
    (variant,) = quality_small.variants(["lora-matched"], tiny_model)
    rank = variant.flags[variant.flags.index("--lora-r") + 1]
    tucka = quality_small.tucka_parameters(tiny_model)

    def lora(r: int) -> int:
        model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
        config = peft.LoraConfig(r=r, target_modules=["q_proj", "v_proj"])
        return sum(p.numel() for p in peft.get_peft_model(model, config).parameters() if p.requires_grad)

    assert abs(lora(rank) - tucka) <= min(abs(lora(r) - tucka) for r in (rank - 1, rank + 1) if r > 0)
