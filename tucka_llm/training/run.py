"""One training run of ``launch/train.py``: data, model and adapter, the HF Trainer over DeepSpeed, output.

DeepSpeed is the distributed engine (through ``transformers.Trainer``); ranks come from DeepSpeed's launcher. An
adapter that needs calibrating before its first step (TuckA's router) is calibrated by the method's own
``TuckACalibration`` callback, as in any user's Trainer: on every rank alike, with the engine's fp32 master set to
the calibrated values.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import datasets
import peft
import torch
import torch.distributed as dist
import transformers
from transformers import (
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    PreTrainedTokenizerBase,
    TrainerCallback,
    TrainingArguments,
)

import tucka_llm
from tucka_llm.atomic import atomic_write_json, atomic_write_text, sync_files
from tucka_llm.data import load_metamathqa, tokenize_metamathqa
from tucka_llm.locking import LOCK_FILE, exclusive_directory
from tucka_llm.quantization import (
    QUANTIZATION_RECORD,
    bitsandbytes_missing,
    describe_quantization,
    quantization_record,
    quantized_linear_layers,
)
from tucka_llm.training import checkpoints
from tucka_llm.training.adapters import add_adapter, load_base_model, precision_dtype
from tucka_llm.training.options import OPTIMIZERS, REFERENCE_GLOBAL_BATCH, TrainOptions
from tucka_llm.training.trainer import LogFinalStep, RecordDeepSpeedConfig, RunTrainer, StopAtStep
from tucka_llm.tucka.calibration import ROUTER_CALIBRATION, TuckACalibration, tensor_digest

logger = logging.getLogger("tucka_llm")

RUN_CONFIG = "run_config.json"
METRICS = "metrics.jsonl"
FINAL_FILES_LAST = ("adapter_config.json", "adapter_model.safetensors")  # their presence means "finished"
# What a run writes before its first complete checkpoint (with the lock and the final adapter's staging folder):
# a directory holding only these has no finished work, and a new run may start over it.
LEFTOVERS = {LOCK_FILE, RUN_CONFIG, METRICS, ROUTER_CALIBRATION, "tensorboard", "checkpoints", ".final.tmp"}
# Flags that may change between an interrupted run and its --resume without changing what is computed.
# --output too: the directory being resumed is the run, wherever it was moved.
RESUMABLE_CHANGES = {"output", "resume", "stop_at_step", "save_steps", "save_total_limit", "logging_steps"}


class RunError(ValueError):
    """A run that cannot start as asked (output directory, batch sizes, configs); the message names the flag."""


def _rank() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _setup_logging(rank: int) -> None:
    """INFO from rank 0; other ranks log only records marked ``extra={"all_ranks": True}`` (per-rank checks)."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(f"[rank {rank}] %(asctime)s %(message)s", "%H:%M:%S"))
    if rank != 0:
        handler.addFilter(lambda record: getattr(record, "all_ranks", False))
        transformers.utils.logging.disable_progress_bar()  # progress bars on rank 0's terminal only
        datasets.disable_progress_bars()
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False


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


def _zero_stage(ds_config: dict[str, Any] | None) -> int:
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


def check_output(output: Path, options: TrainOptions, world_size: int) -> Path | None:
    """Refuse to mix runs in one directory; with --resume return the newest complete checkpoint (or None).

    A new run may start over a directory that holds no finished work: only what a run that failed before its
    first complete checkpoint leaves (``LEFTOVERS``), which rank 0 then clears. Anything else needs --resume or
    another --output.
    """
    finished = all((output / name).is_file() for name in FINAL_FILES_LAST)
    if not options.resume:
        if output.exists() and (
            any(p.name not in LEFTOVERS for p in output.iterdir())
            or checkpoints.latest_complete(output / "checkpoints") is not None
        ):
            raise RunError(
                f"--output {output} is not empty: pass --resume to continue the run in it, or choose another --output."
            )
        return None
    if finished:
        raise RunError(f"--output {output} holds a finished run (adapter_model.safetensors): nothing to resume.")
    config_path = output / RUN_CONFIG
    if not config_path.is_file():
        raise RunError(f"--resume: {output} has no {RUN_CONFIG}, so no run to resume; drop --resume to start one.")
    try:
        recorded = json.loads(config_path.read_text(encoding="utf-8"))
        before, ranks = recorded["options"], recorded.get("world_size", world_size)
    except (ValueError, KeyError, TypeError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise RunError(
            f"--resume: {config_path} is unreadable ({type(error).__name__}: {error}), so the run's flags are "
            "unknown; start a new run in another --output."
        ) from None
    if ranks != world_size:
        raise RunError(
            f"--resume: the run in {output} was started on {ranks} ranks, now {world_size}; resume it on {ranks} "
            "(its DeepSpeed checkpoint holds the optimizer state per rank)."
        )
    changed = {
        key: (before.get(key), value)
        for key, value in options.to_dict().items()
        if key not in RESUMABLE_CHANGES and before.get(key) != value
    }
    if changed:
        listing = "; ".join(f"--{k.replace('_', '-')} was {a!r}, now {b!r}" for k, (a, b) in changed.items())
        raise RunError(f"--resume: these flags differ from the run in {output}: {listing}. Use the original flags.")
    return checkpoints.latest_complete(output / "checkpoints")


@contextmanager
def main_process_first(rank: int) -> Iterator[None]:
    """Rank 0 does the work (e.g. tokenising into the datasets cache) first; the others then read its cache.

    Rank 0 reaches the barrier even when the work fails, so the others fail on the same error instead of hanging.
    """
    distributed = dist.is_available() and dist.is_initialized()
    if distributed and rank != 0:
        dist.barrier()
    try:
        yield
    finally:
        if distributed and rank == 0:
            dist.barrier()


def _one_rank_without_launcher() -> None:
    """``python launch/train.py --ds ...`` without DeepSpeed's launcher: set up the environment the launcher would
    give a single rank, so that DeepSpeed starts one process group of one rank (it would otherwise look for MPI)."""
    if "RANK" in os.environ:
        return
    from tucka_llm.stages import free_port

    os.environ.update(
        {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
         "MASTER_PORT": str(free_port())}
    )  # fmt: skip
    logger.info("no distributed launcher: running as one rank (start it with `deepspeed` for several)")


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _unlink_cpu_allreduce_buffer(rank: int) -> None:
    """Work around a DeepSpeed leak: on CPU its shared-memory all-reduce creates
    /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank> (69 MB per rank) and never unlinks it
    (deepspeed 0.19.8, ops/csrc/cpu/comm/shm.cpp), so every CPU run left its buffers in RAM until reboot. After the
    barrier that follows initialisation every rank has mapped every peer's buffer; the name is no longer needed, and
    unlinking it now frees the memory when the ranks exit, however they exit."""
    if torch.cuda.is_available() or "LOCAL_SIZE" not in os.environ:
        return
    address, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    Path(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{address}_{port}_{rank}").unlink(missing_ok=True)


def load_tokenizer(options: TrainOptions) -> PreTrainedTokenizerBase:
    source = options.tokenizer or options.model
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise RunError(f"--tokenizer {source}: could not load a tokenizer from it ({error}).") from error
    if tokenizer.pad_token is None:  # Llama-2 has none; padded positions are masked out of attention and loss
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def training_arguments(
    options: TrainOptions, output: Path, grad_accum: int, ds_config: dict | None
) -> TrainingArguments:
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(output / "tensorboard")
    return TrainingArguments(
        output_dir=str(output / "checkpoints"),
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


def train(options: TrainOptions) -> Path | None:
    """Run ``options``; return the output directory when the run finished, None when it stopped at --stop-at-step."""
    rank, world_size = _rank()
    _setup_logging(rank)
    output = Path(options.output)
    grad_accum = gradient_accumulation(options, world_size)
    ds_config = load_ds_config(options, world_size, grad_accum)
    if world_size > 1 and ds_config is None:
        raise RunError("Several ranks need DeepSpeed: pass --ds ds_configs/zero2.json (or another config).")
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

        _one_rank_without_launcher()
        deepspeed.init_distributed()
    _barrier()  # rank 0 accepted the output directory (and every rank mapped its peers' shared memory)
    if rank != 0:
        resume_from = check_output(output, options, world_size)  # rank 0 changes nothing before the next barrier
    _barrier()
    _unlink_cpu_allreduce_buffer(rank)
    if rank == 0:
        output.mkdir(parents=True, exist_ok=True)
        if options.resume:
            _prepare_resume(output, resume_from)
        else:
            _clear_leftovers(output)

    tokenizer = load_tokenizer(options)
    with main_process_first(rank):
        tokenized = tokenize_metamathqa(
            load_metamathqa(options.data, options.num_examples), tokenizer, options.max_len, options.overlong
        )
    logger.info("data %s: %s", options.data, tokenized.summary(options.max_len))
    collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)

    model = add_adapter(load_base_model(options), options)
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
    if _zero_stage(ds_config) == 3:
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
                "resolved": _resolved_settings(model),
                "base_quantization": quantization,
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
    _check_ranks_agree(trainer, ds_config, rank)
    _save_final(trainer, output, rank, {QUANTIZATION_RECORD: quantization} if quantization else {})
    logger.info("finished: adapter, tokenizer and metrics in %s", output)
    return output


def _resolved_settings(model: torch.nn.Module) -> dict[str, Any]:
    """Settings the flags leave to the code (``--alpha auto``), as the adapter was built with them."""
    config = model.peft_config["default"]
    if not isinstance(config, tucka_llm.TuckAConfig):
        return {}
    return {"alpha": config.alpha, "router": config.router, "normalize_gates": config.normalize_gates}


def _prepare_resume(output: Path, resume_from: Path | None) -> None:
    """Rank 0: drop checkpoints a killed run left half-written, and metrics logged after the resumed step."""
    for path in checkpoints.remove_incomplete(output / "checkpoints"):
        logger.info("removed incomplete checkpoint %s (the run was stopped while writing it)", path)
    metrics = output / METRICS
    if metrics.is_file():
        step = checkpoints.completed_step(resume_from) if resume_from else 0
        kept = [line for line in metrics.read_text(encoding="utf-8").splitlines() if _step_of(line) <= step]
        atomic_write_text(metrics, "".join(line + "\n" for line in kept))


def _clear_leftovers(output: Path) -> None:
    """Rank 0, new run: remove what a run that failed before its first complete checkpoint left (``LEFTOVERS``)."""
    for name in sorted(LEFTOVERS - {LOCK_FILE}):
        path = output / name
        if not path.exists():
            continue
        shutil.rmtree(path) if path.is_dir() else path.unlink()
        logger.info("removed %s, left by a run that stopped before its first complete checkpoint", path)


def _step_of(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")  # a line cut short by a kill: drop it


def _check_ranks_agree(trainer: RunTrainer, ds_config: dict | None, rank: int) -> None:
    """Data parallelism keeps one adapter on every rank; check that it did (one digest per rank in the log)."""
    params = [p for _, p in sorted(trainer.model.named_parameters()) if p.requires_grad]
    gathered = contextlib.nullcontext()
    if _zero_stage(ds_config) == 3:
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(params)
    with gathered:  # the adapter's saved tensors: trained parameters and buffers (e.g. TuckA's e_bar)
        digest = tensor_digest(*[v for _, v in sorted(peft.get_peft_model_state_dict(trainer.model).items())])
    logger.info("rank %d: trained adapter digest %s", rank, digest, extra={"all_ranks": True})
    if dist.is_available() and dist.is_initialized():
        digests: list[str | None] = [None] * dist.get_world_size()
        dist.all_gather_object(digests, digest)
        if len(set(digests)) != 1:
            raise RuntimeError(f"The ranks hold different adapters after training: {digests}. Please report this.")


def _save_final(trainer: RunTrainer, output: Path, rank: int, records: dict[str, dict[str, Any]]) -> None:
    """Save the adapter, tokenizer and ``records`` (JSON files that travel with the adapter) beside the run files;
    adapter_model.safetensors arrives last, by rename."""
    staging = output / ".final.tmp"
    trainer.save_model(str(staging))  # every rank: DeepSpeed gathers ZeRO-3 shards here
    _barrier()
    if rank == 0:
        (staging / "training_args.bin").unlink(missing_ok=True)
        for name, record in records.items():
            atomic_write_json(staging / name, record)
        sync_files(staging)  # on disk, and mode 0644 like the run's other files (safetensors creates 0600)
        names = sorted(p.name for p in staging.iterdir() if p.name not in FINAL_FILES_LAST)
        for name in [*names, *FINAL_FILES_LAST]:
            os.replace(staging / name, output / name)
        shutil.rmtree(staging)
    _barrier()
