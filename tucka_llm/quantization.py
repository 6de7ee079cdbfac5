"""A 4-bit base for training (QLoRA-style, ``launch/train.py --quantize 4bit``) and the record it leaves.

bitsandbytes does the quantisation and transformers' ``BitsAndBytesConfig`` loads the base with it: every Linear
layer except the output head becomes a ``bitsandbytes.nn.Linear4bit`` holding NF4 weights with double quantisation,
computing in the run's precision. Adapters wrap those layers (peft's LoRA and DoRA have their own 4-bit layers;
TuckA's update is applied to the layer's input, so it wraps a ``Linear4bit`` exactly as it wraps a ``Linear``) and
train in full precision. The run saves the settings beside the adapter (``QUANTIZATION_RECORD``), so that export
can say that it merges into the full-precision base (the usual QLoRA practice), not into the 4-bit one.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import BitsAndBytesConfig

QUANTIZATIONS = ("4bit",)
QUANTIZATION_RECORD = "base_quantization.json"


def bitsandbytes_missing(flag: str) -> str | None:
    """The message for ``flag`` (e.g. ``--quantize 4bit``) when bitsandbytes is not installed, else None."""
    if importlib.util.find_spec("bitsandbytes") is not None:
        return None
    return f"{flag} needs bitsandbytes: pip install '.[train]' (or pip install bitsandbytes)."


def quantization_config(compute_dtype: torch.dtype) -> BitsAndBytesConfig:
    """``--quantize 4bit``: NF4 with double quantisation (QLoRA's settings), computing in ``compute_dtype``."""
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def quantization_record(compute_dtype: torch.dtype) -> dict[str, Any]:
    """What a run records of its base's quantisation: the flag and bitsandbytes' settings, as JSON."""
    settings = quantization_config(compute_dtype).to_dict()
    keep = ("bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "bnb_4bit_compute_dtype")
    return {"flag": "--quantize 4bit", "library": "bitsandbytes", **{key: settings[key] for key in keep}}


def describe_quantization(record: dict[str, Any]) -> str:
    """One phrase for logs and model cards, e.g. "4-bit NF4 with double quantisation, computing in bfloat16"."""
    double = " with double quantisation" if record["bnb_4bit_use_double_quant"] else ""
    return (
        f"4-bit {record['bnb_4bit_quant_type'].upper()}{double}, computing in {record['bnb_4bit_compute_dtype']} "
        f"({record['library']}, {record['flag']})"
    )


def read_quantization_record(adapter: Path) -> dict[str, Any] | None:
    """The record a run saved beside ``adapter`` when its base was quantised; None when it was not."""
    path = adapter / QUANTIZATION_RECORD
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def quantized_linear_layers(model: nn.Module) -> int:
    """How many of ``model``'s layers are bitsandbytes 4-bit Linear layers."""
    from bitsandbytes.nn import Linear4bit  # installed where a base was quantised

    return sum(isinstance(module, Linear4bit) for module in model.modules())
