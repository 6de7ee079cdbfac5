"""What a run hands the HF Trainer: its ``TrainingArguments`` and DeepSpeed config, made from the flags and checked
against them before anything is loaded or written (batch arithmetic, a DeepSpeed config's values, ZeRO-3's
persistence of the adapter)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from transformers import TrainingArguments

from tucka_llm.layout import CHECKPOINTS, TENSORBOARD
from tucka_llm.loading import bitsandbytes_missing
from tucka_llm.training.options import OPTIMIZERS, REFERENCE_GLOBAL_BATCH, RunError, TrainOptions


def gradient_accumulation(options: TrainOptions, world_size: int) -> int:
    """Micro-batches per optimizer step so that micro batch x ranks x accumulation = global batch."""
    per_step = options.micro_batch * world_size
    if options.grad_accum is not None:
        if options.global_batch is not None and options.grad_accum * per_step != options.global_batch:
            raise RunError(
                f"--grad-accum {options.grad_accum} x --micro-batch {options.micro_batch} x {world_size} ranks = "
                f"{options.grad_accum * per_step}, not --global-batch {options.global_batch}: give only one of them."
            )
        return options.grad_accum
    global_batch = options.global_batch or REFERENCE_GLOBAL_BATCH
    if global_batch % per_step:
        raise RunError(
            f"--global-batch {global_batch} is not a multiple of --micro-batch {options.micro_batch} x "
            f"{world_size} ranks: change one of them, or give --grad-accum."
        )
    return global_batch // per_step


def load_ds_config(options: TrainOptions, world_size: int = 1, grad_accum: int = 1) -> dict[str, Any] | None:
    """The --ds config, checked against DeepSpeed's schema and against the flags (``check_ds_config``,
    ``check_ds_against_flags``) before anything is loaded or written; None without --ds."""
    if options.optim == "adamw_8bit" and (missing := bitsandbytes_missing("--optim adamw_8bit")):
        raise RunError(missing)
    if options.quantize is not None and (missing := bitsandbytes_missing(f"--quantize {options.quantize}")):
        raise RunError(missing)
    if options.ds is None:
        return None
    try:
        config = json.loads(Path(options.ds).read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise RunError(f"--ds {options.ds}:{error.lineno}: not valid JSON ({error.msg}).") from error
    except UnicodeDecodeError as error:
        raise RunError(f"--ds {options.ds}: not UTF-8 text ({error.reason} at byte {error.start}).") from error
    check_ds_config(config, options.ds)
    check_ds_against_flags(config, options, world_size, grad_accum)
    offload = config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none") != "none"
    if offload and options.optim == "adamw_8bit":
        raise RunError(f"--optim adamw_8bit cannot run with the optimizer offloaded to the CPU by --ds {options.ds}.")
    if "optimizer" in config and options.optim != "adamw_torch":
        raise RunError(f"--ds {options.ds} defines its own optimizer; drop --optim {options.optim} or that section.")
    return config


def check_ds_config(config: Any, path: str) -> None:
    """Refuse, before anything is written, a DeepSpeed config that the engine would reject only after the run
    directory was set up: not a JSON object, or a ``zero_optimization`` section DeepSpeed's own schema refuses
    (unknown keys, a stage that is not 0-3, wrong types). "auto" values are left to the Trainer to fill."""
    if not isinstance(config, dict):
        raise RunError(f"--ds {path}: must hold a JSON object ({{...}}), not {type(config).__name__}.")
    zero = config.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise RunError(f"--ds {path}: zero_optimization must be an object, got {json.dumps(zero)}.")
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from pydantic import ValidationError

    try:
        DeepSpeedZeroConfig(**{key: value for key, value in zero.items() if value != "auto"})
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc']))}: {e['msg']} (got {json.dumps(e.get('input'), default=str)})"
            for e in error.errors()
        )
        raise RunError(f"--ds {path}: zero_optimization is not valid for DeepSpeed: {problems}.") from None


def check_ds_against_flags(config: dict[str, Any], options: TrainOptions, world_size: int, grad_accum: int) -> None:
    """The batch sizes, clipping and precision of a DeepSpeed config must be "auto" (the launcher fills them from its
    flags) or agree with the flags: HF's Trainer finds a disagreement only after the model is loaded and calibrated.
    Each refusal names the key, its value and the flag it contradicts."""
    expected = {
        "train_micro_batch_size_per_gpu": (options.micro_batch, "--micro-batch"),
        "gradient_accumulation_steps": (grad_accum, "--grad-accum"),
        "train_batch_size": (options.micro_batch * world_size * grad_accum, "--global-batch"),
    }
    for key, (value, flag) in expected.items():
        given = config.get(key, "auto")
        if given == "auto":
            continue
        if isinstance(given, bool) or not isinstance(given, int) or given < 1:
            raise RunError(f'--ds {options.ds}: {key} must be "auto" or a positive integer, got {json.dumps(given)}.')
        if given != value:
            raise RunError(
                f'--ds {options.ds}: {key} is {given}, but {flag} gives {value}: set it to "auto" (the launcher fills '
                f"it from its flags) or change {flag}."
            )
    clipping = config.get("gradient_clipping", "auto")
    if clipping != "auto" and (isinstance(clipping, bool) or not isinstance(clipping, int | float) or clipping < 0):
        raise RunError(
            f'--ds {options.ds}: gradient_clipping must be "auto" or a number >= 0, got {json.dumps(clipping)}.'
        )
    enabled = {}
    for section in ("bf16", "fp16"):
        part = config.get(section, {})
        value = part.get("enabled", False) if isinstance(part, dict) else part
        if value not in (True, False, "auto"):
            raise RunError(
                f'--ds {options.ds}: {section}.enabled must be true, false or "auto", got {json.dumps(value)}.'
            )
        enabled[section] = value
    if enabled["fp16"] is True:
        raise RunError(f"--ds {options.ds}: fp16 is enabled, but this launcher trains in bf16 or fp32 (--precision): "
                       'set fp16.enabled to false and bf16.enabled to "auto".')  # fmt: skip
    if enabled["bf16"] is True and options.precision != "bf16":
        raise RunError(
            f'--ds {options.ds}: bf16 is enabled, but --precision is {options.precision}: set bf16.enabled to "auto" '
            "(the launcher fills it from --precision) or pass --precision bf16."
        )


def zero_stage(ds_config: dict[str, Any] | None) -> int:
    """The ZeRO stage of a DeepSpeed config (0 without one)."""
    return int((ds_config or {}).get("zero_optimization", {}).get("stage", 0))


def keep_adapter_whole(ds_config: dict[str, Any], model: torch.nn.Module) -> None:
    """Under ZeRO-3, keep every trainable tensor unpartitioned (``stage3_param_persistence_threshold``).

    TuckA reads its factors from ParameterDicts inside ``TuckALayer.forward``, which ZeRO-3's per-module fetch hooks
    never see, and its router's gates carry gradients from every layer back to E, so gathering TuckALayer as a
    ZeRO-3 leaf module fails in backward (a factor's gradient arrives after the layer was re-partitioned). An
    adapter is a few MB, so it stays whole on every rank; the base weights are partitioned as usual.
    """
    zero = ds_config.setdefault("zero_optimization", {})
    largest = max(p.numel() for p in model.parameters() if p.requires_grad)
    threshold = zero.get("stage3_param_persistence_threshold", "auto")
    if threshold == "auto":  # what the HF Trainer would fill in
        threshold = 10 * model.config.hidden_size
    zero["stage3_param_persistence_threshold"] = max(int(threshold), largest)


def training_arguments(
    options: TrainOptions, output: Path, grad_accum: int, ds_config: dict | None
) -> TrainingArguments:
    """The HF TrainingArguments of the run: its flags, with DeepSpeed through ``ds_config`` (checked already)."""
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(output / TENSORBOARD)
    return TrainingArguments(
        output_dir=str(output / CHECKPOINTS),
        per_device_train_batch_size=options.micro_batch,
        gradient_accumulation_steps=grad_accum,
        num_train_epochs=options.epochs,
        max_steps=options.max_steps or -1,
        learning_rate=options.lr,
        lr_scheduler_type=options.lr_scheduler,
        warmup_steps=options.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        weight_decay=options.weight_decay,
        max_grad_norm=options.max_grad_norm,
        optim=OPTIMIZERS[options.optim],
        bf16=options.precision == "bf16",
        gradient_checkpointing=options.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},  # reentrant checkpointing gives E no gradient
        seed=options.seed,
        data_seed=options.seed,
        deepspeed=ds_config,
        use_cpu=not torch.cuda.is_available(),
        logging_steps=options.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=options.save_steps,
        save_total_limit=None,  # RunTrainer rotates, counting complete checkpoints only
        report_to=["tensorboard"],
        include_num_input_tokens_seen="non_padding",
        logging_nan_inf_filter=False,  # a NaN loss stays visible (and stops the run: RunTrainer)
        remove_unused_columns=False,
        disable_tqdm=False,
    )
