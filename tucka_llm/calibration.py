"""The router calibration that training hands to export: a seeded sample of training sequences and its centroid.

Training runs data-aware initialisation on the sample and records the centroid ``e`` of its routing features (and
the DAI matrix) in ``tucka_router_calibration.safetensors`` beside the adapter; export folds the route of ``e``
(method note, section 4) or recomputes ``e`` the same way from data when the file is missing.
"""

from __future__ import annotations

from collections.abc import Iterator
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
    path: Path, centroids: dict[str, torch.Tensor], dai: dict[str, torch.Tensor], meta: dict[str, str]
) -> None:
    """Per adapter: the training-data centroid ``e`` (``{name}.centroid``) and the DAI matrix (``{name}.dai_init``).

    ``meta`` says how ``e`` was obtained (data, samples, seed); it is stored as the file's metadata.
    """
    tensors = {f"{name}.centroid": e.float().contiguous() for name, e in centroids.items()}
    tensors |= {f"{name}.dai_init": e.float().contiguous() for name, e in dai.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def load_router_centroid(path: Path, adapter_name: str) -> tuple[torch.Tensor, dict[str, str]]:
    """The recorded centroid of one adapter and the metadata saying how it was obtained.

    Raises ValueError with what is wrong if the file is unreadable or holds no centroid for ``adapter_name``.
    """
    try:
        with safe_open(str(path), framework="pt") as f:
            key = f"{adapter_name}.centroid"
            if key not in f.keys():  # noqa: SIM118 (safe_open has no __contains__)
                raise ValueError(f"{path} holds no centroid for adapter '{adapter_name}' (keys: {sorted(f.keys())}).")
            return f.get_tensor(key).float(), dict(f.metadata() or {})
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path} is not a readable safetensors file ({error}).") from error
