"""The run directory (``--output``): whether a run may start in it or resume it, what a new run clears and a resumed
one drops, and how the final adapter arrives (last, by rename: ``layout.RUN_FINISHED`` means finished)."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from transformers import Trainer

from tucka_llm.io.atomic import atomic_write_json, atomic_write_text, sync_files
from tucka_llm.io.locking import LOCK_FILE
from tucka_llm.layout import CHECKPOINTS, METRICS, RUN_CONFIG, RUN_FINISHED, TENSORBOARD, run_finished
from tucka_llm.training import checkpoints
from tucka_llm.training.distributed import barrier
from tucka_llm.training.options import RunError, TrainOptions
from tucka_llm.tucka.calibration import ROUTER_CALIBRATION

logger = logging.getLogger("tucka_llm")

FINAL_STAGING = ".final.tmp"
# What a run writes before its first complete checkpoint (with the lock and the final adapter's staging folder):
# a directory holding only these has no finished work, and a new run may start over it.
LEFTOVERS = {LOCK_FILE, RUN_CONFIG, METRICS, ROUTER_CALIBRATION, TENSORBOARD, CHECKPOINTS, FINAL_STAGING}
# Flags that may change between an interrupted run and its --resume without changing what is computed.
# --output too: the directory being resumed is the run, wherever it was moved.
RESUMABLE_CHANGES = {"output", "resume", "stop_at_step", "save_steps", "save_total_limit", "logging_steps"}


def check_output(output: Path, options: TrainOptions, world_size: int) -> Path | None:
    """Refuse to mix runs in one directory; with --resume return the newest complete checkpoint (or None).

    A new run may start over a directory that holds no finished work: only what a run that failed before its
    first complete checkpoint leaves (``LEFTOVERS``), which rank 0 then clears. Anything else needs --resume or
    another --output.
    """
    finished = run_finished(output)
    if not options.resume:
        if output.exists() and (
            any(p.name not in LEFTOVERS for p in output.iterdir())
            or checkpoints.latest_complete(output / CHECKPOINTS) is not None
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
    return checkpoints.latest_complete(output / CHECKPOINTS)


def prepare_resume(output: Path, resume_from: Path | None) -> None:
    """Rank 0: drop checkpoints a killed run left half-written, and metrics logged after the resumed step."""
    for path in checkpoints.remove_incomplete(output / CHECKPOINTS):
        logger.info("removed incomplete checkpoint %s (the run was stopped while writing it)", path)
    metrics = output / METRICS
    if metrics.is_file():
        step = checkpoints.completed_step(resume_from) if resume_from else 0
        kept = [line for line in metrics.read_text(encoding="utf-8").splitlines() if _step_of(line) <= step]
        atomic_write_text(metrics, "".join(line + "\n" for line in kept))


def clear_leftovers(output: Path) -> None:
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


def save_final(trainer: Trainer, output: Path, rank: int, records: dict[str, dict[str, Any]]) -> None:
    """Save the adapter, tokenizer and ``records`` (JSON files that travel with the adapter) beside the run files;
    adapter_model.safetensors arrives last, by rename."""
    staging = output / FINAL_STAGING
    trainer.save_model(str(staging))  # every rank: DeepSpeed gathers ZeRO-3 shards here
    barrier()
    if rank == 0:
        (staging / "training_args.bin").unlink(missing_ok=True)
        for name, record in records.items():
            atomic_write_json(staging / name, record)
        sync_files(staging)  # on disk, and mode 0644 like the run's other files (safetensors creates 0600)
        names = sorted(p.name for p in staging.iterdir() if p.name not in RUN_FINISHED)
        for name in [*names, *RUN_FINISHED]:
            os.replace(staging / name, output / name)
        shutil.rmtree(staging)
    barrier()
