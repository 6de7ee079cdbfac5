"""The HF Trainer with what our runs add: metrics.jsonl, throughput, memory and the adapter's routing metrics in the
logs, checkpoints that count only when complete, and a stop step."""

from __future__ import annotations

import json
import logging
import math
import resource
import time
from pathlib import Path
from typing import Any

import peft
import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from tucka_llm.errors import TuckaError
from tucka_llm.io.atomic import atomic_write_json, sync_files
from tucka_llm.training import checkpoints
from tucka_llm.tucka.model import routing_metrics

logger = logging.getLogger("tucka_llm")


def host_peak_rss_gb() -> float:
    """This process's peak resident memory in host RAM, GiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def memory_gb() -> dict[str, float]:
    """This rank's memory, GiB: ``peak_memory_gb`` is the peak allocated by PyTorch on the GPU (on a CPU run, the
    process's peak host RAM). On a GPU also the allocator's peak reserved memory (allocated plus its cache) and the
    device's used memory now (``mem_get_info``: reserved plus the CUDA context, NCCL's buffers and any other
    process), which is what must fit the card."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return {"peak_memory_gb": host_peak_rss_gb()}
    free, total = torch.cuda.mem_get_info()
    return {
        "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30,
        "peak_reserved_gb": torch.cuda.max_memory_reserved() / 2**30,
        "device_used_gb": (total - free) / 2**30,
        "host_peak_rss_gb": host_peak_rss_gb(),
    }


def lean_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state dict for peft's ``save_pretrained``: the frozen parameters (the base) left where they are,
    uncopied, since peft keeps only the adapter's tensors; every other tensor copied to the CPU as DeepSpeed's
    ``clone_tensors_for_torch_save`` copies it (a ZeRO-1/2 parameter is a view of a flat buffer that must not reach
    the file whole)."""
    from deepspeed.checkpoint.utils import clone_tensors_for_torch_save  # deepspeed's import is slow: when saving

    named = model.named_parameters(remove_duplicate=False)  # a tied head is in the state dict under its own name
    frozen = {name for name, parameter in named if not parameter.requires_grad}
    return {name: t if name in frozen else clone_tensors_for_torch_save(t) for name, t in model.state_dict().items()}


class RunTrainer(Trainer):
    """``transformers.Trainer`` for one run of ``tucka train``.

    ``log`` adds tokens/s (non-padding tokens, all ranks), peak memory per rank and the adapter's routing metrics
    (``routing_metrics``: for TuckA the expert-group load and routing entropy, summed over ranks), then appends the
    record to ``metrics.jsonl`` on rank 0.
    ``_save_checkpoint`` marks a checkpoint complete only after every rank has written its part, which includes the
    loss summed since the previous log (``LOSS_WINDOW``): a resumed run's first log then averages the same steps an
    uninterrupted run's does (HF's Trainer restarts that sum at zero).
    """

    def __init__(self, *args: Any, metrics_path: Path, save_total_limit: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.metrics_path = metrics_path
        self.keep_checkpoints = save_total_limit
        self._clock: tuple[float, int] | None = None  # (time, tokens seen) at the previous training log
        self._resumed_from: Path | None = None
        self.add_callback(_RestoreLossWindow(self))

    def train(self, resume_from_checkpoint: str | None = None, *args: Any, **kwargs: Any) -> Any:
        self._resumed_from = None if resume_from_checkpoint is None else Path(resume_from_checkpoint)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _loss_window_path(self, checkpoint: Path) -> Path:
        return checkpoint / LOSS_WINDOW.format(rank=self.args.process_index)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training-step log (not the end-of-run summary)
            logs.update(self._throughput())
            logs.update(self._peak_memory())
            logs.update(routing_metrics(self.model, self._sum_over_ranks))
        super().log(logs, start_time)
        if "loss" in logs and self.is_world_process_zero():
            record = {"step": self.state.global_step, "time": time.time(), **logs}
            with self.metrics_path.open("a", encoding="utf-8") as f:
                f.write(metrics_line(record))

    def _maybe_log_save_evaluate(self, tr_loss: torch.Tensor, grad_norm: Any, *args: Any, **kwargs: Any) -> None:
        """Stop at the first optimizer step whose loss, gradient norm or updated adapter is not finite, before it
        is logged or checkpointed: the run's complete checkpoints are then all from finite steps."""
        check_step_finite(self, tr_loss, grad_norm)
        super()._maybe_log_save_evaluate(tr_loss, grad_norm, *args, **kwargs)

    def _throughput(self) -> dict[str, float]:
        now, tokens = time.perf_counter(), int(self.state.num_input_tokens_seen)
        previous, self._clock = self._clock, (now, tokens)
        if previous is None or now <= previous[0]:
            return {}
        return {"tokens_per_s": (tokens - previous[1]) / (now - previous[0])}

    def _peak_memory(self) -> dict[str, float]:
        """``memory_gb`` of every rank: each key's largest value, and each rank's as ``KEY/rankN``."""
        mine = memory_gb()
        local = torch.tensor(list(mine.values()), device=self.args.device, dtype=torch.float64)
        per_rank = self.accelerator.gather(local.unsqueeze(0)).cpu().tolist()  # (ranks, keys)
        logs = {}
        for column, key in enumerate(mine):
            values = [row[column] for row in per_rank]
            logs |= {key: max(values)} | {f"{key}/rank{i}": v for i, v in enumerate(values)}
        return logs

    def _sum_over_ranks(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(tensor.to(self.args.device), reduction="sum")

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the adapter (every checkpoint and the final save come here) without copying the base.

        Under DeepSpeed ZeRO-0/1/2, HF's ``save_model`` takes accelerate's ``get_state_dict``, which copies every
        tensor of the model into host RAM, base included, on every rank, only for peft to keep the adapter's
        tensors of it: 13.5 GB per rank for Llama-2-7B, 108 GB per 8-GPU node at each checkpoint (docs/benchmarks.md:
        measured on the CPU). ZeRO-3 keeps HF's path: it gathers only the trained tensors already."""
        zero3 = self.is_deepspeed_enabled and self.deepspeed.config.get("zero_optimization", {}).get("stage") == 3
        if not self.is_deepspeed_enabled or zero3 or not isinstance(self.model, peft.PeftModel):
            super().save_model(output_dir, _internal_call)
        elif self.args.should_save:
            self._save(output_dir or self.args.output_dir, state_dict=lean_state_dict(self.model))

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        super()._save_checkpoint(model, trial)
        folder = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
        window = {"loss_sum": float(self._tr_loss), "last_logged_step": self._globalstep_last_logged}
        atomic_write_json(self._loss_window_path(folder), window)  # every rank: its own loss, before the marker
        self.accelerator.wait_for_everyone()  # every rank's shards are on disk
        if self.is_world_process_zero():
            folder = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
            sync_files(folder)  # the shards are on disk before the marker says they are complete
            checkpoints.mark_complete(folder, self.state.global_step)
            checkpoints.rotate(Path(self.args.output_dir), self.keep_checkpoints)


LOSS_WINDOW = "loss_since_last_log_rank{rank}.json"  # in each checkpoint, one per rank (RunTrainer)


class _RestoreLossWindow(TrainerCallback):
    """On a resumed run, put back the loss summed since the last log before the checkpoint, and that log's step,
    where HF's Trainer has just set them to zero and the checkpoint's step (private attributes of transformers
    5.x's Trainer, ``_tr_loss`` and ``_globalstep_last_logged``: a checkpoint without the file resumes as HF does)."""

    def __init__(self, trainer: RunTrainer) -> None:
        self.trainer = trainer

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        trainer = self.trainer
        if trainer._resumed_from is None:
            return
        path = trainer._loss_window_path(trainer._resumed_from)
        if not path.is_file():
            return
        window = json.loads(path.read_text(encoding="utf-8"))
        trainer._tr_loss.add_(window["loss_sum"])
        trainer._globalstep_last_logged = int(window["last_logged_step"])


class NonFiniteError(TuckaError):
    """Training produced a NaN or infinite value; the message names the step and what was not finite."""


def check_step_finite(trainer: Trainer, tr_loss: torch.Tensor, grad_norm: Any) -> None:
    """Raise NonFiniteError naming the step if the loss (on any rank), the gradient norm or an adapter weight is
    not finite. Every rank reaches the same verdict (the loss flag is summed over ranks, the gradient norm and the
    adapter are the same on every rank), so every rank stops and none waits at a collective."""
    step = trainer.state.global_step
    local = torch.tensor([0.0 if bool(torch.isfinite(tr_loss).all()) else 1.0], device=trainer.args.device)
    problems = []
    if trainer.accelerator.reduce(local, reduction="sum").item() > 0:
        problems.append("the training loss")
    if grad_norm is not None and not math.isfinite(float(grad_norm)):
        problems.append(f"the gradient norm ({float(grad_norm)})")
    weights = non_finite_parameters(trainer.model)
    if weights:
        problems.append(f"the adapter weights after the update ({', '.join(weights[:3])})")
    if problems:
        raise NonFiniteError(
            f"step {step}: not finite (NaN or inf): {'; '.join(problems)}. The run stopped before logging or saving "
            "this step; its complete checkpoints are from earlier steps. Lower --lr or --alpha, or check the data, "
            "and start the run again."
        )


def non_finite_parameters(model: nn.Module) -> list[str]:
    """Names of the trainable parameters that hold a NaN or an infinity."""
    return [name for name, p in model.named_parameters() if p.requires_grad and not bool(torch.isfinite(p).all())]


def metrics_line(record: dict[str, Any]) -> str:
    """One metrics.jsonl line: strict JSON, with a NaN or infinity written as null (bare NaN is not JSON)."""
    clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
    return json.dumps(clean, allow_nan=False) + "\n"


class StopAtStep(TrainerCallback):
    """End this invocation after ``step`` with a checkpoint; the schedule stays the full run's (``--stop-at-step``)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        if state.global_step >= self.step:
            control.should_save = True
            control.should_training_stop = True


class LogFinalStep(TrainerCallback):
    """Log the last step too, whatever --logging-steps, so that metrics.jsonl always ends with the final loss."""

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        if state.global_step >= state.max_steps:
            control.should_log = True


class RecordDeepSpeedConfig(TrainerCallback):
    """Rank 0: once the engine exists, replace the config's "auto" values in run_config.json by what was used."""

    def __init__(self, run_config: Path) -> None:
        self.run_config = run_config

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        if args.hf_deepspeed_config is None or not state.is_world_process_zero:
            return
        record = json.loads(self.run_config.read_text(encoding="utf-8"))
        record["deepspeed_config"] = args.hf_deepspeed_config.config
        atomic_write_json(self.run_config, record)
