"""The ranks of a run: which one this process is, what each logs, where they wait for each other, and the checks
that they agree. DeepSpeed's launcher starts the ranks; this module only reads what it set."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import datasets
import peft
import torch
import torch.distributed as dist
import transformers
from transformers import Trainer

from tucka_llm.tucka.calibration import tensor_digest

logger = logging.getLogger("tucka_llm")


def rank_and_world_size() -> tuple[int, int]:
    """(this rank, the number of ranks), as DeepSpeed's launcher set them; (0, 1) without it."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def setup_logging(rank: int) -> None:
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


def free_port() -> int:
    """A free TCP port for a DeepSpeed rendezvous, so that runs never collide with another job's port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_rank_without_launcher() -> None:
    """``tucka train --ds ...`` without DeepSpeed's launcher: set up the environment the launcher would
    give a single rank, so that DeepSpeed starts one process group of one rank (it would otherwise look for MPI)."""
    if "RANK" in os.environ:
        return
    os.environ.update(
        {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
         "MASTER_PORT": str(free_port())}
    )  # fmt: skip
    logger.info("no distributed launcher: running as one rank (start it with `deepspeed` for several)")


STALE_BUILD_LOCK_S = 300  # torch builds DeepSpeed's CPU all-reduce op in about a minute (docs/environment)


def warn_of_a_stale_build_lock() -> None:
    """On the CPU, DeepSpeed builds its shared-memory all-reduce op on first use, under torch's lock file; a process
    killed meanwhile leaves the lock, and every later run then waits on it forever without a word. Say which file
    to remove when it is older than a build takes."""
    if torch.cuda.is_available():
        return
    from torch.utils.cpp_extension import _get_build_directory  # torch's own rule for where the build goes

    lock = Path(_get_build_directory("deepspeed_shm_comm", verbose=False)) / "lock"
    with contextlib.suppress(FileNotFoundError):
        age = time.time() - lock.stat().st_mtime
        if age > STALE_BUILD_LOCK_S:
            logger.warning(
                "%s is %.0f minutes old: DeepSpeed waits for it before starting. If no other run is building "
                "DeepSpeed's CPU op now, a killed run left it: remove the file.",
                lock,
                age / 60,
                extra={"all_ranks": True},
            )


def per_rank(value: object) -> list[object]:
    """``value`` of every rank, in rank order, on every rank (one value without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    gathered: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def barrier() -> None:
    """Wait for every rank (nothing to wait for in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def unlink_cpu_allreduce_buffer(rank: int) -> None:
    """Work around a DeepSpeed leak: on CPU its shared-memory all-reduce creates
    /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank> (69 MB per rank) and never unlinks it
    (deepspeed 0.19.8, ops/csrc/cpu/comm/shm.cpp), so every CPU run left its buffers in RAM until reboot. After the
    barrier that follows initialisation every rank has mapped every peer's buffer; the name is no longer needed, and
    unlinking it now frees the memory when the ranks exit, however they exit."""
    if torch.cuda.is_available() or "LOCAL_SIZE" not in os.environ:
        return
    address, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    Path(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{address}_{port}_{rank}").unlink(missing_ok=True)


def check_ranks_agree(trainer: Trainer, zero3: bool, rank: int) -> None:
    """Data parallelism keeps one adapter on every rank; check that it did (one digest per rank in the log)."""
    params = [p for _, p in sorted(trainer.model.named_parameters()) if p.requires_grad]
    gathered = contextlib.nullcontext()
    if zero3:
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
