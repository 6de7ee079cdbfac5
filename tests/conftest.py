"""Shared fixtures: one tiny Llama architecture, the real Llama-2 tokenizer, adapters as training leaves them."""

from __future__ import annotations

from pathlib import Path

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

import tucka_llm
from tucka_llm.data import llama2_tokenizer, load_metamathqa, tokenize_metamathqa
from tucka_llm.export import export_merged
from tucka_llm.models import tiny_llama_config
from tucka_llm.tucka.calibration import ROUTER_CALIBRATION, calibrate_and_record, calibration_batches

PROMPTS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "Weng earns $12 an hour for babysitting.",
    "Betty is saving money for a new wallet which costs $100. Betty has only half of the money she needs.",
    "James writes a 3-page letter to 2 different friends twice a week. How many pages does he write a year?",
]


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config()).to(dtype).eval()


def tucka_llama(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> peft.PeftModel:
    """A tiny Llama with a TuckA adapter whose update is large enough to matter (alpha 8 at r 4)."""
    settings = dict(r=4, k=3, t=2, p=2, alpha=8.0, perturb_scale=0.5, target_modules=["q_proj", "v_proj"])
    settings.update(overrides)
    model = peft.get_peft_model(tiny_llama(seed, dtype), tucka_llm.TuckAConfig(**settings))
    return model.eval()


@pytest.fixture(scope="session")
def tokenizer():
    """The real Llama-2 tokenizer shipped with the package."""
    return llama2_tokenizer()


@pytest.fixture
def batch(tokenizer):
    """The prompts, right-padded."""
    tokenizer.padding_side = "right"
    return tokenizer(PROMPTS, return_tensors="pt", padding=True)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """The tiny Llama (seed 0) saved with the real Llama-2 tokenizer, as a user's local model directory."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(seed=0).save_pretrained(path)
    llama2_tokenizer().save_pretrained(path)
    return path


TUCKA_CONFIG = dict(r=4, k=3, t=2, p=2, alpha=8.0, perturb_scale=0.5, target_modules=["q_proj", "v_proj"])


def save_adapter(path: Path, base_dir: Path, config: peft.PeftConfig, tokenizer, calibrate: bool = False) -> Path:
    """An adapter directory as launch/train.py leaves it: adapter, tokenizer and, for TuckA, the router record."""
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    torch.manual_seed(1)
    model = peft.get_peft_model(base, config)
    with torch.no_grad():  # as after training: TuckA's groups start as copies of one core; make them differ
        for name, param in model.named_parameters():
            if "tucka_core" in name:
                param.add_(torch.randn_like(param) * param.std())
    if calibrate:
        data = tokenize_metamathqa(load_metamathqa("gsm8k-train", 64), tokenizer, 128).dataset
        meta = {"data": "gsm8k-train", "samples": "32", "seed": "42"}
        calibrate_and_record(model, calibration_batches(data, 32, 42, tokenizer), 42, path / ROUTER_CALIBRATION, meta)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def adapters(tiny_model, tokenizer, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    tucka = tucka_llm.TuckAConfig(**TUCKA_CONFIG, task_type="CAUSAL_LM")
    paths = {"tucka": save_adapter(root / "tucka", tiny_model, tucka, tokenizer, calibrate=True)}
    for method in ("lora", "dora"):
        # init_lora_weights=False: B is random too, so the merge has something to get wrong.
        lora = peft.LoraConfig(
            r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], use_dora=method == "dora", init_lora_weights=False
        )
        paths[method] = save_adapter(root / method, tiny_model, lora, tokenizer)
    return paths


@pytest.fixture(scope="session")
def merged_tiny(adapters, tmp_path_factory) -> Path:
    """The TuckA adapter of ``adapters`` merged in fp32: a plain checkpoint with the tokenizer, for vLLM."""
    out = tmp_path_factory.mktemp("merged-tiny") / "tucka"
    export_merged(adapters["tucka"], out, dtype="float32")
    return out
