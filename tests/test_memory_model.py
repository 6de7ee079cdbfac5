"""bench/memory_model.py predicts a GPU's peak from fake tensors; on this CPU its tracked step must be the real
one's."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from tucka_llm.models import small_llama_config

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("memory_model", ROOT / "bench" / "memory_model.py")
memory_model = importlib.util.module_from_spec(spec)
sys.modules["memory_model"] = memory_model  # its dataclasses look their module up there
spec.loader.exec_module(memory_model)


@pytest.mark.parametrize(("method", "checkpointing"), [("tucka", False), ("lora", False), ("dora", False),
                                                       ("tucka", True)])  # fmt: skip
def test_the_fake_step_tracks_the_memory_of_the_real_step(method, checkpointing):
    """A 45M-parameter Llama in bf16 with the launcher's adapter, one forward and backward of 1 x 128 tokens: the
    peak that fake tensors predict is the peak the same tracker measures on real tensors, part by part."""
    config = small_llama_config()
    fake, trainable = memory_model.tracked_step(config, method, True, length=128, gradient_checkpointing=checkpointing)
    real, real_trainable = memory_model.tracked_step(config, method, False, length=128,
                                                     gradient_checkpointing=checkpointing)  # fmt: skip
    assert trainable == real_trainable > 0
    assert fake["Parameter"] == real["Parameter"]
    assert fake["Total"] == pytest.approx(real["Total"], rel=0.03)
    assert fake["Activation"] + fake["Temp"] == pytest.approx(real["Activation"] + real["Temp"], rel=0.05)


def test_deepspeed_adds_its_gradient_buckets_sized_from_the_model_and_its_share_of_the_optimizer():
    zero2 = json.loads((ROOT / "tucka_llm" / "ds_configs" / "zero2.json").read_text())
    # two bf16 buckets of hidden^2 elements ("auto"), and 16 bytes per trainable parameter over 8 ranks
    assert memory_model.deepspeed_bytes(zero2, 4096, 4_358_400, 8) == 2 * 4096**2 * 2 + 4_358_400 // 8 * 16
    fixed = {"zero_optimization": {"reduce_bucket_size": 5e8, "overlap_comm": True}}
    assert memory_model.deepspeed_bytes(fixed, 4096, 0, 8) / 2**30 == pytest.approx(1.86, abs=0.01)
