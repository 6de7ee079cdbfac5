"""Load a trained adapter onto a base model for export and evaluation, refusing what would silently be wrong.

peft loads an adapter onto any base whose shapes agree: on a deeper base of the same width the layers the adapter
has no weights for keep their random initialisation, and a NaN adapter loads as well as a finite one. Both are
errors here, and so is an adapter file that does not load, each in one line that names the flag to change.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import peft
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import PreTrainedModel

import tucka_llm  # registers TuckA with peft

ADAPTER_WEIGHTS = "adapter_model.safetensors"


class AdapterLoadError(ValueError):
    """The adapter cannot be used on this base; the message names the flags (``--adapter`` and the base's)."""


def load_checked_adapter(model: PreTrainedModel, adapter: Path, base_flag: str) -> peft.PeftModel:
    """``PeftModel.from_pretrained(model, adapter)`` (not trainable), after checking that the saved weights are
    finite and that they cover exactly the adapter layers the base gets; ``base_flag`` names where the base came
    from in messages (``--base`` for export, ``--model`` for evaluation)."""
    base = f"{base_flag} {model.name_or_path}"
    saved = _saved_weights(adapter)
    non_finite = [name for name, tensor in saved.items() if not bool(torch.isfinite(tensor).all())]
    if non_finite:
        raise AdapterLoadError(
            f"--adapter {adapter}: {len(non_finite)} of its tensors hold NaN or inf values ({', '.join(non_finite[:3])}"
            f"{', ...' if len(non_finite) > 3 else ''}): the run that saved it diverged. Train it again."
        )
    try:
        loaded = peft.PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as error:
        text = " ".join(str(error).split())
        if "size mismatch" in text or "shape" in text or "not found" in text.lower():
            raise AdapterLoadError(
                f"--adapter {adapter} does not fit {base}: {_mismatch(text)} Pass the base model the adapter was "
                "trained on."
            ) from error
        raise AdapterLoadError(f"--adapter {adapter}: could not load it onto {base} ({_shortened(text)}).") from error
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
        raise AdapterLoadError(
            f"--adapter {adapter} does not fit {base}: {'; '.join(parts)}. Pass the base model the adapter was "
            "trained on."
        )
    return loaded


def saved_adapter_config(adapter: Path) -> peft.PeftConfig:
    """The peft config saved in ``adapter`` (TuckA's too), or an AdapterLoadError saying why it cannot be read."""
    try:
        return peft.PeftConfig.from_pretrained(str(adapter))
    except (ValueError, TypeError, KeyError, OSError, json.JSONDecodeError) as error:
        raise AdapterLoadError(f"--adapter {adapter}: adapter_config.json is unreadable ({error}).") from error


def adapter_method(config: peft.PeftConfig) -> str:
    """ "tucka", "lora" or "dora"; another peft method is an AdapterLoadError."""
    if isinstance(config, tucka_llm.TuckAConfig):
        return "tucka"
    if isinstance(config, peft.LoraConfig):
        return "dora" if config.use_dora else "lora"
    raise AdapterLoadError(f"The adapter is a {config.peft_type} adapter.")


def _saved_weights(adapter: Path) -> dict[str, torch.Tensor]:
    path = adapter / ADAPTER_WEIGHTS
    if not path.is_file():
        raise AdapterLoadError(f"--adapter {adapter}: no {ADAPTER_WEIGHTS} in it (give launch/train.py's output).")
    try:
        return load_file(path)
    except (SafetensorError, OSError) as error:
        raise AdapterLoadError(
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
