"""Loading what the stages work on, each checked so that a mistake is one line naming the flag: a base model (in a
dtype, or with its Linear layers in 4 bits), its tokenizer with a pad token, and a trained adapter on it.

peft loads an adapter onto any base whose shapes agree: on a deeper base of the same width the layers the adapter
has no weights for keep their random initialisation, and a NaN adapter loads as well as a finite one. Both are
errors here, and so is an adapter file that does not load.

A 4-bit base (QLoRA-style, ``tucka train --quantize 4bit``): bitsandbytes quantises and transformers'
``BitsAndBytesConfig`` loads the base with it: every Linear layer except the output head becomes a
``bitsandbytes.nn.Linear4bit`` holding NF4 weights with double quantisation, computing in the run's precision.
Adapters wrap those layers (peft's LoRA and DoRA have their own 4-bit layers; TuckA's update is applied to the
layer's input, so it wraps a ``Linear4bit`` exactly as it wraps a ``Linear``) and train in full precision. The run
saves the settings beside the adapter (``layout.QUANTIZATION_RECORD``), so that export can say that it merges into
the full-precision base (the usual QLoRA practice), not into the 4-bit one.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import peft
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

import tucka_llm  # registers TuckA with peft
from tucka_llm.errors import TuckaError
from tucka_llm.layout import ADAPTER_CONFIG, ADAPTER_WEIGHTS, CHECKPOINTS, QUANTIZATION_RECORD, TOKENIZER_CONFIG

logger = logging.getLogger("tucka_llm")

ANY_SOURCE = "Give a local model directory or a hub id this machine can download."


class LoadError(TuckaError):
    """A base model, tokenizer or adapter that cannot be loaded or used as asked; the message names the flag."""


def load_base_model(
    source: str,
    flag: str,
    dtype: torch.dtype | str = "auto",
    quantization: BitsAndBytesConfig | None = None,
    device: torch.device | None = None,
    advice: str = ANY_SOURCE,
) -> PreTrainedModel:
    """The causal LM at ``source`` in ``dtype`` ("auto": as stored, no up-cast of the whole model), loaded straight
    onto ``device`` (default the CPU); with ``quantization`` its Linear layers are quantised by bitsandbytes as they
    load, on ``device`` (bitsandbytes quantises a weight where it is placed). ``flag`` and ``advice`` make the message
    of a model that does not load (missing, not a model, a truncated or corrupt weights file)."""
    placement: dict[str, Any] = {}
    if quantization is not None or device is not None:
        placement["device_map"] = {"": device or torch.device("cpu")}
    if quantization is not None:
        placement["quantization_config"] = quantization
    try:
        return AutoModelForCausalLM.from_pretrained(source, dtype=dtype, low_cpu_mem_usage=True, **placement)
    except (OSError, ValueError, SafetensorError) as error:
        raise LoadError(f"{flag} {source}: could not load it ({' '.join(str(error).split())}). {advice}") from error


def tokenizer_source(adapter: str | Path | None, model: str) -> str:
    """Where an adapter's tokenizer is: saved beside the adapter (training saves it there), else the base model's."""
    if adapter is not None and (Path(adapter) / TOKENIZER_CONFIG).is_file():
        return str(adapter)
    return model


def load_tokenizer(source: str | Path, flag: str) -> PreTrainedTokenizerBase:
    """The tokenizer at ``source`` with a pad token: EOS where it has none (Llama-2), as padded positions are masked
    out of attention and loss. Callers set ``padding_side`` (generation pads left, training right)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source))
    except (OSError, ValueError) as error:
        raise LoadError(f"{flag} {source}: could not load a tokenizer from it ({error}).") from error
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# ---------------------------------------------------------------------------------------------- a trained adapter
def load_checked_adapter(model: PreTrainedModel, adapter: Path, base_flag: str) -> peft.PeftModel:
    """``PeftModel.from_pretrained(model, adapter)`` (not trainable), after checking that the saved weights are
    finite and that they cover exactly the adapter layers the base gets; ``base_flag`` names where the base came
    from in messages (``--base`` for export, ``--model`` for evaluation)."""
    base = f"{base_flag} {model.name_or_path}"
    saved = _saved_weights(adapter)
    non_finite = [name for name, tensor in saved.items() if not bool(torch.isfinite(tensor).all())]
    if non_finite:
        raise LoadError(
            f"--adapter {adapter}: {len(non_finite)} of its tensors hold NaN or inf values ({', '.join(non_finite[:3])}"
            f"{', ...' if len(non_finite) > 3 else ''}): the run that saved it diverged. Train it again."
        )
    try:
        loaded = peft.PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as error:
        text = " ".join(str(error).split())
        if "size mismatch" in text or "shape" in text or "not found" in text.lower():
            raise LoadError(
                f"--adapter {adapter} does not fit {base}: {_mismatch(text)} Pass the base model the adapter was "
                "trained on."
            ) from error
        raise LoadError(f"--adapter {adapter}: could not load it onto {base} ({_shortened(text)}).") from error
    # A method may load an older layout of its weights (TuckA's router keys); compare in the current one.
    tuner = peft.mapping.PEFT_TYPE_TO_TUNER_MAPPING[loaded.peft_config[loaded.active_adapter].peft_type]
    upgrade = getattr(tuner, "upgrade_state_dict", None)
    saved = upgrade(saved) if upgrade is not None else saved
    expected = set(peft.get_peft_model_state_dict(loaded))
    missing, unexpected = expected - set(saved), set(saved) - expected
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"the base has adapted layers it holds no weights for ({_layers(missing)})")
        if unexpected:
            parts.append(f"it holds weights for layers the base does not have ({_layers(unexpected)})")
        raise LoadError(
            f"--adapter {adapter} does not fit {base}: {'; '.join(parts)}. Pass the base model the adapter was "
            "trained on."
        )
    return loaded


@dataclass(frozen=True)
class Trained:
    """A trained adapter on its base, ready to export or serve: the PeftModel, the tokenizer saved with the adapter
    (else the base's), and the run's record of a base quantised in training (None when it was not)."""

    model: peft.PeftModel
    tokenizer: PreTrainedTokenizerBase
    quantization: dict[str, Any] | None


def load_trained(adapter: Path, base: str, base_flag: str) -> Trained:
    """The adapter in ``adapter`` on ``base`` loaded as stored (no up-cast), checked (``load_checked_adapter``).
    A base quantised in training is loaded in full precision (the usual QLoRA practice), and the log says so."""
    model = load_base_model(base, base_flag, advice="Give the base model the adapter was trained on.")
    quantization = read_quantization_record(adapter)
    if quantization is not None:
        logger.info(
            "the adapter was trained on its base quantised to %s; it is exported against %s loaded in full precision "
            "(%s), the usual QLoRA practice",
            describe_quantization(quantization),
            base,
            str(model.dtype).removeprefix("torch."),
        )
    peft_model = load_checked_adapter(model, adapter, base_flag)
    return Trained(peft_model, load_tokenizer(tokenizer_source(adapter, base), "--adapter"), quantization)


def saved_adapter_config(adapter: Path) -> peft.PeftConfig:
    """The peft config saved in ``adapter`` (TuckA's too), after checking that ``adapter`` is a finished adapter
    directory; a LoadError saying what is missing or broken."""
    if not adapter.is_dir():
        raise LoadError(f"--adapter {adapter}: no such directory (give a training run: tucka train --output).")
    if not (adapter / ADAPTER_CONFIG).is_file():
        hint = ""
        if (adapter / CHECKPOINTS).is_dir():
            hint = " The run has not finished: resume it, or use a checkpoint (--adapter OUT/checkpoints/checkpoint-N)."
        raise LoadError(f"--adapter {adapter}: no {ADAPTER_CONFIG} in it.{hint}")
    if not any((adapter / name).is_file() for name in (ADAPTER_WEIGHTS, "adapter_model.bin")):
        raise LoadError(f"--adapter {adapter}: {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS} beside it.")
    try:
        return peft.PeftConfig.from_pretrained(str(adapter))
    except (ValueError, TypeError, KeyError, OSError, json.JSONDecodeError) as error:
        raise LoadError(f"--adapter {adapter}: {ADAPTER_CONFIG} is unreadable ({error}).") from error


def adapter_method(config: peft.PeftConfig) -> str:
    """ "tucka", "lora" or "dora"; another peft method is a LoadError."""
    if isinstance(config, tucka_llm.TuckAConfig):
        return "tucka"
    if isinstance(config, peft.LoraConfig):
        return "dora" if config.use_dora else "lora"
    raise LoadError(
        f"The adapter is a {config.peft_type} adapter; tucka-llm exports and evaluates TuckA, LoRA and DoRA adapters."
    )


def _saved_weights(adapter: Path) -> dict[str, torch.Tensor]:
    path = adapter / ADAPTER_WEIGHTS
    if not path.is_file():
        raise LoadError(f"--adapter {adapter}: no {ADAPTER_WEIGHTS} in it (give a training run: tucka train --output).")
    try:
        return load_file(path)
    except (SafetensorError, OSError) as error:
        raise LoadError(
            f"--adapter {adapter}: could not load it ({path} is not a readable safetensors file: {error})."
        ) from error


def _layers(keys: set[str]) -> str:
    """The decoder layers (``layers.N``) a set of weight names belongs to, e.g. "layers 2, 3"."""
    numbers = sorted({int(m.group(1)) for key in keys if (m := re.search(r"\.layers\.(\d+)\.", key))})
    if numbers:
        return "layers " + ", ".join(map(str, numbers))
    return ", ".join(sorted(keys)[:3])


_SIZE_MISMATCH = re.compile(
    r"size mismatch for (\S+): copying a param with shape torch\.Size\((\[[^\]]*\])\) from checkpoint, the shape "
    r"in current model is torch\.Size\((\[[^\]]*\])\)"
)


def _mismatch(text: str) -> str:
    """torch's size-mismatch report said briefly, essential part first: the first tensor whose shape differs, both
    shapes, and how many more differ; any other report shortened at a word (``_shortened``)."""
    found = _SIZE_MISMATCH.findall(text)
    if not found:
        return _shortened(text)
    name, saved, needed = found[0]
    more = f" ({len(found) - 1} more tensors differ)" if len(found) > 1 else ""
    return f"its {name} has shape {saved}, the base needs {needed}{more}."


def _shortened(text: str, limit: int = 300) -> str:
    """``text`` whole when short, else its first ``limit`` characters cut at a space, with an ellipsis."""
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0] + " ..."


# ------------------------------------------------------------------------------------------------- a 4-bit base
QUANTIZATIONS = ("4bit",)


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
