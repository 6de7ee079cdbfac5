"""One training run (``tucka train``): data, model and adapter, the HF Trainer over DeepSpeed, the run's record.

DeepSpeed is the distributed engine (through ``transformers.Trainer``); ranks come from DeepSpeed's launcher
(``distributed``). The flags become the Trainer's arguments and DeepSpeed config in ``arguments``; the run
directory's rules (start, resume, the final adapter) are ``rundir``'s. An adapter that needs calibrating before its
first step (TuckA's router) is calibrated by the method's own ``TuckACalibration`` callback, as in any user's
Trainer: on every rank alike, with the engine's fp32 master set to the calibrated values.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from transformers import DataCollatorForSeq2Seq, TrainerCallback

import tucka_llm
from tucka_llm.data import load_metamathqa, tokenize_metamathqa
from tucka_llm.io.atomic import atomic_write_json
from tucka_llm.io.locking import exclusive_directory
from tucka_llm.layout import METRICS, QUANTIZATION_RECORD, RUN_CONFIG
from tucka_llm.loading import describe_quantization, load_tokenizer, quantization_record, quantized_linear_layers
from tucka_llm.training.adapters import add_adapter, base_placement, load_base_model, precision_dtype
from tucka_llm.training.arguments import (
    gradient_accumulation,
    keep_adapter_whole,
    load_ds_config,
    training_arguments,
    zero_stage,
)
from tucka_llm.training.distributed import (
    barrier,
    check_ranks_agree,
    main_process_first,
    one_rank_without_launcher,
    per_rank,
    rank_and_world_size,
    setup_logging,
    unlink_cpu_allreduce_buffer,
    warn_of_a_stale_build_lock,
)
from tucka_llm.training.options import RunError, TrainOptions
from tucka_llm.training.rundir import check_output, clear_leftovers, prepare_resume, save_final
from tucka_llm.training.trainer import LogFinalStep, RecordDeepSpeedConfig, RunTrainer, StopAtStep, host_peak_rss_gb
from tucka_llm.tucka.calibration import ROUTER_CALIBRATION, TuckACalibration

logger = logging.getLogger("tucka_llm")


def train(options: TrainOptions) -> Path | None:
    """Run ``options``; return the output directory when the run finished, None when it stopped at --stop-at-step."""
    rank, world_size = rank_and_world_size()
    setup_logging(rank)
    output = Path(options.output)
    grad_accum = gradient_accumulation(options, world_size)
    ds_config = load_ds_config(options, world_size, grad_accum)
    if world_size > 1 and ds_config is None:
        raise RunError("Several ranks need DeepSpeed: pass --ds zero2 (or another config).")
    # Rank 0 holds --output's lock for the whole run (the other ranks write only what rank 0 lets them, after
    # barriers): a second run on the same directory, even one started while these ranks outlive their launcher,
    # is refused with this rank's pid.
    with exclusive_directory(output, f"--output {output}") if rank == 0 else contextlib.nullcontext():
        return _train(options, output, rank, world_size, grad_accum, ds_config)


def _train(
    options: TrainOptions, output: Path, rank: int, world_size: int, grad_accum: int, ds_config: dict | None
) -> Path | None:
    """``train`` once the options are checked and, on rank 0, --output is locked."""
    # Rank 0 checks --output first, so that a refusal (in use, not empty, changed flags) is its one line: the
    # launcher ends the other ranks, which wait at the barrier, before they could report something else.
    resume_from = check_output(output, options, world_size) if rank == 0 else None
    if ds_config is not None:
        import deepspeed

        one_rank_without_launcher()
        warn_of_a_stale_build_lock()
        deepspeed.init_distributed()
    barrier()  # rank 0 accepted the output directory (and every rank mapped its peers' shared memory)
    if rank != 0:
        resume_from = check_output(output, options, world_size)  # rank 0 changes nothing before the next barrier
    barrier()
    unlink_cpu_allreduce_buffer(rank)
    if rank == 0:
        output.mkdir(parents=True, exist_ok=True)
        if options.resume:
            prepare_resume(output, resume_from)
        else:
            clear_leftovers(output)

    tokenizer = load_tokenizer(options.tokenizer or options.model, "--tokenizer")
    with main_process_first(rank):
        tokenized = tokenize_metamathqa(
            load_metamathqa(options.data, options.num_examples), tokenizer, options.max_len, options.overlong
        )
    logger.info("data %s: %s", options.data, tokenized.summary(options.max_len))
    collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)

    zero3 = zero_stage(ds_config) == 3
    # ZeRO-3: TrainingArguments made before the base loads make HF's loader partition it over the ranks (zero.Init);
    # HF finds them through a weak reference, so they are held until the base is loaded.
    loading_args = training_arguments(options, output, grad_accum, ds_config) if zero3 else None
    model = add_adapter(load_base_model(options, partitioned=zero3), options)
    del loading_args
    host_rss = per_rank(host_peak_rss_gb())  # every rank's host RAM peak once the base is loaded
    quantization = None
    if options.quantize is not None:
        quantization = quantization_record(precision_dtype(options))
        logger.info(
            "base: %d Linear layers in %s; the adapter trains in full precision",
            quantized_linear_layers(model),
            describe_quantization(quantization),
        )
    if rank == 0:
        model.print_trainable_parameters()
    # The adapter's calibration (a no-op for methods without one), with the record export reads: on a resumed run
    # it sets again only what checkpoints do not hold, from the same sample and seed.
    calibration = TuckACalibration(
        tokenized.dataset, options.dai_samples, options.seed, output / ROUTER_CALIBRATION, {"data": options.data}
    )
    callbacks: list[TrainerCallback] = [LogFinalStep(), calibration]
    if zero3:
        keep_adapter_whole(ds_config, model)
    if ds_config is not None:
        callbacks.append(RecordDeepSpeedConfig(output / RUN_CONFIG))
    if options.stop_at_step is not None:
        callbacks.append(StopAtStep(options.stop_at_step))

    args = training_arguments(options, output, grad_accum, ds_config)
    if rank == 0 and resume_from is None:
        atomic_write_json(
            output / RUN_CONFIG,
            {
                "options": options.to_dict(),
                "world_size": world_size,
                "gradient_accumulation_steps": grad_accum,
                "global_batch": options.micro_batch * world_size * grad_accum,
                "deepspeed_config": ds_config,
                "adapter_config": _adapter_config(model),
                "base_quantization": quantization,
                "base_placement": base_placement(model),
                "host_peak_rss_gb_at_load": host_rss,
                "data": {
                    "examples": len(tokenized.dataset),
                    "records": tokenized.total,
                    "truncated": tokenized.truncated,
                    "dropped": tokenized.dropped,
                },
                "versions": tucka_llm.package_versions(
                    "torch", "transformers", "peft", "deepspeed", "datasets", "accelerate", "bitsandbytes"
                ),
            },
        )
    trainer = RunTrainer(
        model=model,
        args=args,
        train_dataset=tokenized.dataset,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=callbacks,
        metrics_path=output / METRICS,
        save_total_limit=options.save_total_limit,
    )
    if resume_from is not None:
        logger.info("resuming from %s", resume_from)
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    if trainer.state.global_step < trainer.state.max_steps:
        logger.info(
            "stopped at step %d of %d; continue with --resume", trainer.state.global_step, trainer.state.max_steps
        )
        return None
    check_ranks_agree(trainer, zero3, rank)
    save_final(trainer, output, rank, {QUANTIZATION_RECORD: quantization} if quantization else {})
    logger.info("finished: adapter, tokenizer and metrics in %s", output)
    return output


def _adapter_config(model: torch.nn.Module) -> dict[str, Any]:
    """The adapter's peft config as built, with what the flags leave to the method resolved (TuckA's ``--alpha auto``),
    for the run's record at its start (the final adapter_config.json exists only at the end)."""
    return json.loads(json.dumps(model.peft_config["default"].to_dict(), default=sorted))  # sets -> sorted lists
