"""The router calibration that training hands to export: a seeded sample of training sequences, its routing
features and their centroid.

Training runs data-aware initialisation on the sample and records, in ``tucka_router_calibration.safetensors``
beside the adapter, the routing feature of every sampled sequence, their centroid ``e`` and the DAI matrix. The
features depend on the base model alone (the routing layer is the first adapted one), so export routes them through
the TRAINED router to choose what to fold (method note, section 4), or recomputes them the same way from data when
the file is missing.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from transformers import PreTrainedTokenizerBase

from tucka_llm.atomic import atomic_write

ROUTER_CALIBRATION = "tucka_router_calibration.safetensors"
BATCH_SIZE = 16


def calibration_batches(
    data: datasets.Dataset, samples: int, seed: int, tokenizer: PreTrainedTokenizerBase
) -> Iterator[dict[str, torch.Tensor]]:
    """A seeded random sample of ``samples`` tokenized sequences, padded in batches of 16: the same on every rank."""
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:samples].tolist()
    for start in range(0, len(order), BATCH_SIZE):
        rows = [{"input_ids": data[i]["input_ids"]} for i in order[start : start + BATCH_SIZE]]
        batch = tokenizer.pad(rows, return_tensors="pt")
        yield {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def save_router_calibration(
    path: Path, features: dict[str, torch.Tensor], dai: dict[str, torch.Tensor], meta: dict[str, str]
) -> None:
    """Per adapter: the calibration sample's routing features (``{name}.features``, (n, d)), their centroid ``e``
    (``{name}.centroid``) and the DAI matrix (``{name}.dai_init``, absent for the redraw router, which has none).

    ``meta`` says how the sample was drawn (data, samples, seed); it is stored as the file's metadata.
    """
    tensors = {f"{name}.features": h.float().contiguous() for name, h in features.items()}
    tensors |= {f"{name}.centroid": h.float().mean(dim=0).contiguous() for name, h in features.items()}
    tensors |= {f"{name}.dai_init": e.float().contiguous() for name, e in dai.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


@dataclass
class RouterCalibration:
    """One adapter's recorded calibration: the centroid, the per-sequence features (None in records written
    before tucka-llm 0.2, which kept the centroid alone) and how the sample was drawn."""

    centroid: torch.Tensor
    features: torch.Tensor | None
    meta: dict[str, str]


def load_router_calibration(path: Path, adapter_name: str) -> RouterCalibration:
    """The recorded calibration of one adapter.

    Raises ValueError with what is wrong if the file is unreadable or holds no centroid for ``adapter_name``.
    """
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            if f"{adapter_name}.centroid" not in keys:
                raise ValueError(f"{path} holds no centroid for adapter '{adapter_name}' (keys: {sorted(keys)}).")
            features = f.get_tensor(f"{adapter_name}.features").float() if f"{adapter_name}.features" in keys else None
            return RouterCalibration(
                f.get_tensor(f"{adapter_name}.centroid").float(), features, dict(f.metadata() or {})
            )
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path} is not a readable safetensors file ({error}).") from error
