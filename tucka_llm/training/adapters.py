"""The base model and its adapter for a training run: TuckA (ours) or peft's own LoRA and DoRA."""

from __future__ import annotations

import logging
import os

import peft
import torch
from torch import nn
from transformers import PreTrainedModel

import tucka_llm
from tucka_llm import loading
from tucka_llm.errors import TuckaError
from tucka_llm.loading import quantization_config
from tucka_llm.training.options import TrainOptions
from tucka_llm.tucka.model import linear_layer_names

logger = logging.getLogger("tucka_llm")


class ModelError(TuckaError):
    """A base model that cannot be adapted as asked (``--target-modules``); the message lists what it has."""


def load_base_model(options: TrainOptions, partitioned: bool = False) -> PreTrainedModel:
    """The base model in the run's precision, loaded where this rank computes: straight onto its GPU when there is
    one (``rank_device``: no full copy of the base in host RAM per rank), else on the CPU.

    ``partitioned`` (ZeRO-3): HF's loader partitions the weights over the ranks as they load (DeepSpeed's
    ``zero.Init``, enabled by the run's TrainingArguments made before this call), so no rank holds the whole base.
    With ``--quantize 4bit`` the Linear layers are quantised by bitsandbytes as they load, on this rank's device:
    bitsandbytes quantises a weight where it is placed.
    """
    dtype = precision_dtype(options)
    quantization = quantization_config(dtype) if options.quantize is not None else None
    device = None if partitioned else rank_device()
    return loading.load_base_model(options.model, "--model", dtype, quantization, device)


def precision_dtype(options: TrainOptions) -> torch.dtype:
    """The dtype of ``--precision``: the base's weights, or with ``--quantize`` the 4-bit layers' compute dtype."""
    return torch.bfloat16 if options.precision == "bf16" else torch.float32


def base_placement(model: nn.Module) -> str:
    """Where the base's weights are once loaded: partitioned over the ranks (ZeRO-3's ``zero.Init``), else the
    device that holds them whole, for the run's record."""
    weight = next(p for p in model.parameters() if not p.requires_grad)
    return "partitioned over the ranks (ZeRO-3)" if hasattr(weight, "ds_id") else str(weight.device)


def rank_device() -> torch.device | None:
    """This rank's GPU (DeepSpeed's launcher sets LOCAL_RANK); None on a machine without CUDA (the CPU)."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return None


def check_target_modules(model: nn.Module, targets: list[str]) -> None:
    """Every --target-modules name must name Linear layers of ``model``; else list the ones it has."""
    linear = linear_layer_names(model)
    missing = [name for name in targets if name not in linear]
    if missing:
        raise ModelError(
            f"--target-modules: {', '.join(missing)} not found among the Linear layers of {type(model).__name__}. "
            f"Its Linear layers are: {', '.join(linear)}."
        )


def adapter_config(options: TrainOptions) -> peft.PeftConfig:
    """The peft config of the run's method."""
    if options.method == "tucka":
        return tucka_llm.TuckAConfig(
            r=options.r,
            k=options.k,
            t=options.t,
            p=options.p,
            alpha=options.alpha,
            router=options.router,
            normalize_gates=options.normalize_gates,
            seed=options.seed,
            perturb_scale=options.perturb_scale,
            target_modules=options.target_module_list,
            task_type="CAUSAL_LM",
        )
    return peft.LoraConfig(
        r=options.lora_r,
        lora_alpha=options.lora_alpha,
        lora_dropout=options.lora_dropout,
        target_modules=options.target_module_list,
        use_dora=options.method == "dora",
        task_type="CAUSAL_LM",
    )


def add_adapter(model: PreTrainedModel, options: TrainOptions) -> peft.PeftModel:
    check_target_modules(model, options.target_module_list)
    torch.manual_seed(options.seed)  # the same adapter init on every rank
    return peft.get_peft_model(model, adapter_config(options))
