"""Model architectures the project builds without the hub (for parameter counts, memory, benchmarks and tests): the
published configs of the 7-8B models users train, written out, and small Llama shapes for CPU runs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, PretrainedConfig, Qwen2Config


def llama2_7b_config() -> LlamaConfig:
    """The architecture of meta-llama/Llama-2-7b-hf (its config.json), so that sizes and memory can be measured on
    random or meta-device weights without downloading anything."""
    return LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )


def llama3_8b_config() -> LlamaConfig:
    """meta-llama/Meta-Llama-3-8B (its config.json): 128,256-token vocabulary, grouped-query attention (8 KV heads)."""
    sizes = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32)
    return LlamaConfig(**sizes, num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                       rope_theta=500000.0, bos_token_id=128000, eos_token_id=128001,
                       tie_word_embeddings=False)  # fmt: skip


def qwen2_5_7b_config() -> Qwen2Config:
    """Qwen/Qwen2.5-7B (its config.json): hidden 3584, 28 layers, 4 KV heads, 152,064-token vocabulary, q/k/v bias."""
    sizes = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28)
    return Qwen2Config(**sizes, num_key_value_heads=4, vocab_size=152064, max_position_embeddings=131072,
                       rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
                       use_sliding_window=False)  # fmt: skip


def mistral_7b_config() -> MistralConfig:
    """mistralai/Mistral-7B-v0.1 (its config.json): Llama-2-7B's width with 8 KV heads and a wider MLP."""
    sizes = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32)
    return MistralConfig(**sizes, num_key_value_heads=8, vocab_size=32000, max_position_embeddings=32768,
                         rope_theta=10000.0, sliding_window=4096, tie_word_embeddings=False)  # fmt: skip


# The published shapes by name (bench/memory_model.py --shape).
SHAPES = {
    "llama2-7b": llama2_7b_config,
    "llama3-8b": llama3_8b_config,
    "qwen2.5-7b": qwen2_5_7b_config,
    "mistral-7b": mistral_7b_config,
}


def small_llama_config() -> LlamaConfig:
    """A 45M-parameter Llama-2-architecture model (4 layers, hidden 512, the Llama-2 vocabulary) for CPU benchmarks:
    big enough that matmuls dominate, small enough for a 2-core machine."""
    return LlamaConfig(
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=32000,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
    )


def medium_llama_config() -> LlamaConfig:
    """A 167M-parameter Llama-2-architecture model (8 layers, hidden 1024) whose decoder Linear layers hold most of
    the weights (61%; 96% in Llama-2-7B), so that what a 4-bit base saves shows in a CPU process's memory."""
    return LlamaConfig(
        hidden_size=1024,
        intermediate_size=2752,  # Llama-2-7B's 11008 / 4096 of the hidden size
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=16,
        head_dim=64,
        vocab_size=32000,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
    )


def tiny_llama_config() -> LlamaConfig:
    """2 layers, hidden 64, GQA, the Llama-2 vocabulary: the tests' model and the GPU suite's dry run. head_dim 32 so
    that vLLM's CPU backend accepts it too."""
    return LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        vocab_size=32000,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
    )


def lora_width(config: PretrainedConfig, targets: Sequence[str] = ("q_proj", "v_proj")) -> int:
    """In plus out features summed over the Linear layers named ``targets``: a rank-r LoRA on them trains r times
    this many parameters, and a vLLM adapter slot holds r times this many values. Counted on the meta device."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(m.in_features + m.out_features for name, m in model.named_modules() if name.endswith(tuple(targets)))
