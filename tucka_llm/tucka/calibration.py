"""Router calibration (data-aware initialisation) inside any ``transformers.Trainer``, and the record of it that
training hands to export.

``TuckACalibration`` is a ``TrainerCallback``: added to a plain ``Trainer``, TRL's ``SFTTrainer`` or our launcher, it
calibrates every TuckA router of the model on a seeded sample of training sequences before the first optimizer step,
identically on every rank, sets a DeepSpeed engine's fp32 master copy of the centroids to the exact DAI values, and
records, in ``tucka_router_calibration.safetensors``, the routing feature of every sampled sequence, their centroid
``e`` and the DAI matrix. The features depend on the base model alone (the routing layer is the first adapted one),
so export routes them through the TRAINED router to choose what to fold (method note, section 4), or recomputes them
the same way from data when the file is missing.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import PreTrainedTokenizerBase, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from tucka_llm.io.atomic import atomic_write
from tucka_llm.tucka.dai import calibration_features, initialise_router, routers
from tucka_llm.tucka.model import routing_states

logger = logging.getLogger("tucka_llm")

ROUTER_CALIBRATION = "tucka_router_calibration.safetensors"
BATCH_SIZE = 16
DEFAULT_SAMPLES = 256  # the calibration sample's size (sequences), as in the authors' scripts


def calibration_batches(
    data: Sequence[Mapping[str, Any]], samples: int, seed: int, tokenizer: PreTrainedTokenizerBase | None = None
) -> Iterator[dict[str, torch.Tensor]]:
    """A seeded random sample of ``samples`` tokenized sequences (rows with ``input_ids``), right-padded in batches
    of 16 with an attention mask: the same on every rank. The pad id (the tokenizer's, else 0) never counts: the
    routing features average over real tokens only."""
    pad_id = getattr(tokenizer, "pad_token_id", None)
    pad_id = 0 if pad_id is None else int(pad_id)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:samples].tolist()
    for start in range(0, len(order), BATCH_SIZE):
        rows = [list(data[i]["input_ids"]) for i in order[start : start + BATCH_SIZE]]
        width = max(len(row) for row in rows)
        ids = torch.tensor([row + [pad_id] * (width - len(row)) for row in rows])
        mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
        yield {"input_ids": ids, "attention_mask": mask}


def tensor_digest(*tensors: torch.Tensor) -> str:
    """sha256 (first 16 hex digits) of the tensors' float32 bytes: equal digests, equal values."""
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


class TuckACalibration(TrainerCallback):
    """Data-aware initialisation of every TuckA router, in any ``transformers.Trainer`` (TRL's too): the one callback
    a TuckA model needs there.

    At ``on_train_begin`` (the model is on its device, a DeepSpeed engine exists, the optimizer has not stepped) it
    routes ``samples`` sequences of ``data``, drawn with ``seed``, to each adapter's routing layer and calibrates its
    router from their mean feature (``TuckARouter.calibrate``); under DeepSpeed it also sets the engine's fp32 master
    copy of E to the DAI values (else the master keeps their bf16 rounding), and every rank logs the digests. Every
    rank computes the same values from the same sample. On a resumed run (the Trainer restored a checkpoint, global
    step > 0) the trained centroids are kept; only the frozen calibration state (e_bar) is set again. At the start of
    each optimizer step it keys the redraw router's random draws by (seed, step, forward), so that a resumed run
    draws exactly what the uninterrupted run drew (the other routers draw nothing).

    Args:
        data: tokenized training rows (``input_ids``); None: the Trainer's training dataset.
        samples: how many sequences calibrate (``DEFAULT_SAMPLES``).
        seed: draws the sample and the centroid perturbations.
        record: where to write the calibration record (features, centroid, DAI matrix) that export reads; None: the
            Trainer's ``output_dir``. Written by the main process on a fresh start, atomically.
        meta: how the data was chosen (e.g. ``{"data": "gsm8k-train"}``), stored in the record.
    """

    def __init__(
        self,
        data: Sequence[Mapping[str, Any]] | None = None,
        samples: int = DEFAULT_SAMPLES,
        seed: int = 0,
        record: str | os.PathLike | None = None,
        meta: Mapping[str, str] | None = None,
    ) -> None:
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ValueError(f"TuckACalibration: samples must be an integer >= 1, got {samples!r}.")
        self.data, self.samples, self.seed = data, samples, seed
        self.record = None if record is None else Path(record)
        self.meta = dict(meta or {})

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        model = kw["model"]
        by_name = routers(model)
        if not by_name:
            return
        data = self.data if self.data is not None else _training_rows(kw.get("train_dataloader"))
        batches = list(calibration_batches(data, self.samples, self.seed, kw.get("processing_class")))
        features = calibration_features(model, batches, stop_early=not _zero3(args))
        resumed = state.global_step > 0
        dai = {}
        for name, h in features.items():
            router, e = by_name[name], h.float().mean(dim=0)
            with _writable(args, router):
                # resumed: the checkpoint holds the trained E; e_bar and the flag are not in DeepSpeed's checkpoint
                initial = router.calibrate(e, self.seed, keep_centroids=resumed)
            if initial is not None:
                dai[name] = initial
                _set_master(args, router.centroids, initial, name)
        for name, router in by_name.items():
            if getattr(router, "center", None) is not None:
                logger.info(
                    "rank %d: adapter %r e_bar digest %s",
                    args.process_index,
                    name,
                    tensor_digest(router.center),
                    extra={"all_ranks": True},
                )
        if not resumed and state.is_world_process_zero:
            path = self.record or Path(args.output_dir) / ROUTER_CALIBRATION
            path.parent.mkdir(parents=True, exist_ok=True)
            meta = {"samples": str(min(self.samples, len(data))), "seed": str(self.seed), **self.meta}
            save_router_calibration(path, features, dai, meta)

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        for routing_state in routing_states(kw["model"], missing_ok=True).values():
            routing_state.start_step(state.global_step)


def _training_rows(dataloader: Any) -> Sequence[Mapping[str, Any]]:
    """The Trainer's tokenized training rows; a dataset without them, or without random access (an iterable
    dataset), is a ValueError saying to pass ``data``."""
    dataset = getattr(dataloader, "dataset", None)
    try:
        usable = dataset is not None and len(dataset) > 0 and "input_ids" in dataset[0]
    except (TypeError, NotImplementedError, KeyError, IndexError):  # iterable datasets have no len() or [i]
        usable = False
    if not usable:
        raise ValueError(
            "TuckACalibration: the Trainer's training dataset holds no tokenized rows (input_ids) that can be "
            "sampled; pass TuckACalibration(data=...) with tokenized training rows (a list or datasets.Dataset)."
        )
    return dataset


def _zero3(args: TrainingArguments) -> bool:
    """Under ZeRO-3 the calibration runs whole forwards: a forward stopped midway would leave gathered parameters."""
    config = getattr(args, "hf_deepspeed_config", None)
    return config is not None and config.is_zero3()


def _writable(args: TrainingArguments, router: nn.Module) -> contextlib.AbstractContextManager:
    """Under ZeRO-3 the router's parameters are partitioned: gather them to be written (rank 0's values are kept;
    every rank computed the same)."""
    if not _zero3(args):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(router.parameters()), modifier_rank=0)


def _set_master(args: TrainingArguments, param: nn.Parameter, value: torch.Tensor, name: str) -> None:
    """Make the fp32 copy the optimizer updates hold exactly ``value`` (DeepSpeed's master, else the parameter
    itself, already set), check it and log its digest on every rank."""
    master = None
    if args.deepspeed:
        from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

        safe_set_full_fp32_param(param, value.to(param.device, torch.float32))
        master = safe_get_full_fp32_param(param)
    master = (param.detach() if master is None else master).float().cpu()
    error = (master - value.float()).abs().max().item()
    logger.info(
        "rank %d: adapter %r trains from the DAI centroids: fp32 master digest %s, max |master - DAI| = %.3g",
        args.process_index,
        name,
        tensor_digest(master),
        error,
        extra={"all_ranks": True},
    )
    if error > 0 and args.deepspeed:
        raise RuntimeError(f"rank {args.process_index}: the engine's master copy of E differs from DAI by {error}.")


def calibrate_and_record(
    model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], seed: int, record: Path, meta: Mapping[str, str]
) -> None:
    """Calibrate every TuckA router of ``model`` on ``batches`` and write the record export reads (features, centroid
    and DAI matrix), as ``TuckACalibration`` does before a run's first step: for an adapter saved without a Trainer
    (the tests' fixtures, ``bench/rehearsal_7b.py --untrained``)."""
    features = calibration_features(model, batches)
    _, dai = initialise_router(model, features, seed)
    save_router_calibration(record, features, dai, dict(meta))


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
    before tucka-llm 0.2, which kept the centroid alone), how the sample was drawn, and the router's centroids E as
    DAI set them before training (None for the redraw router, which has none)."""

    centroid: torch.Tensor
    features: torch.Tensor | None
    meta: dict[str, str]
    dai_init: torch.Tensor | None = None


def load_router_calibration(path: Path, adapter_name: str) -> RouterCalibration:
    """The recorded calibration of one adapter.

    Raises ValueError with what is wrong if the file is unreadable or holds no centroid for ``adapter_name``.
    """
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            if f"{adapter_name}.centroid" not in keys:
                raise ValueError(f"{path} holds no centroid for adapter '{adapter_name}' (keys: {sorted(keys)}).")
            features, dai_init = (
                f.get_tensor(f"{adapter_name}.{key}").float() if f"{adapter_name}.{key}" in keys else None
                for key in ("features", "dai_init")
            )
            centroid = f.get_tensor(f"{adapter_name}.centroid").float()
            return RouterCalibration(centroid, features, dict(f.metadata() or {}), dai_init)
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path} is not a readable safetensors file ({error}).") from error
