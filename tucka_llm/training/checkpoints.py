"""Checkpoints that are either complete or ignored.

The HF Trainer writes ``checkpoint-N`` in place (DeepSpeed shards from every rank, RNG states, trainer state). A
run killed while writing would leave a directory that looks like the newest checkpoint. So a checkpoint counts
only once every rank has finished writing it and rank 0 has then written its marker file atomically; resuming
takes the newest marked one and deletes unmarked leftovers.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from tucka_llm.io.atomic import atomic_write_json

COMPLETE_MARKER = "tucka_checkpoint_complete.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def _numbered(directory: Path) -> list[tuple[int, Path]]:
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    return sorted(found)


def is_complete(checkpoint: Path) -> bool:
    """Whether ``checkpoint`` has a readable completion marker (a truncated one does not count)."""
    return completed_step(checkpoint) is not None


def mark_complete(checkpoint: Path, step: int) -> None:
    """Rank 0, after every rank has written its part of ``checkpoint``. A checkpoint that is gone (rotated away by
    another writer) is not recreated as an empty "complete" one: that is an error."""
    if not checkpoint.is_dir():
        raise FileNotFoundError(f"{checkpoint}: the checkpoint to mark complete is gone; was another run writing here?")
    atomic_write_json(checkpoint / COMPLETE_MARKER, {"step": step})


def completed_step(checkpoint: Path) -> int | None:
    """The optimizer step a complete checkpoint was taken at (from its marker); None without a readable marker."""
    try:
        return int(json.loads((checkpoint / COMPLETE_MARKER).read_text(encoding="utf-8"))["step"])
    except (OSError, ValueError, KeyError, TypeError):  # missing, truncated or not ours (JSONDecodeError, UTF-8)
        return None


def latest_complete(directory: Path) -> Path | None:
    """The newest complete ``checkpoint-N`` in ``directory``, or None."""
    complete = [path for _, path in _numbered(directory) if is_complete(path)]
    return complete[-1] if complete else None


def remove_incomplete(directory: Path) -> list[Path]:
    """Delete checkpoint directories without the completion marker (a run killed mid-save); return them."""
    removed = [path for _, path in _numbered(directory) if not is_complete(path)]
    for path in removed:
        shutil.rmtree(path)
    return removed


def rotate(directory: Path, keep: int) -> None:
    """Keep the ``keep`` newest complete checkpoints; never delete the newest complete one."""
    complete = [path for _, path in _numbered(directory) if is_complete(path)]
    for path in complete[: max(len(complete) - max(keep, 1), 0)]:
        shutil.rmtree(path, ignore_errors=True)
