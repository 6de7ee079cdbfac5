"""One writer per output directory: an exclusive ``flock`` held for the whole run of training, export or evaluation.

Two processes writing one run directory corrupt it (a ``--resume`` started while the old ranks still ran rewrote
their metrics and lost checkpoints they rotated). The kernel releases a ``flock`` when its holder dies, however it
dies, so a lock never outlives its run; the holder writes its pid into the lock file so that a refused second
writer can say which process to wait for. The holder removes the file when it is done; a process that locked a
file just removed (it opened it before the removal) sees that the path no longer names its file and tries again,
so two processes never both hold the lock of one path. A killed holder leaves the file behind, unlocked.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from tucka_llm.errors import TuckaError

LOCK_FILE = ".tucka.lock"


class OutputInUse(TuckaError):
    """Another live process holds the output's lock (or the output cannot hold one); the message names both."""


@contextmanager
def exclusive(lock: Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on the file ``lock`` (created, with its directory) while the body runs; raise
    OutputInUse naming ``what`` (e.g. "--output runs/x") and the holder's pid if another process holds it."""
    if lock.parent.exists() and not lock.parent.is_dir():
        raise OutputInUse(f"{what}: is a file, not a directory; give a directory.")
    created = not lock.parent.exists()
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", errors="replace").strip() or "unknown"
            os.close(fd)
            raise OutputInUse(
                f"{what} is in use by another process (pid {holder}); wait for it to end (or end it), then run again."
            ) from None
        if _names(lock, fd):
            break
        os.close(fd)  # locked a file its holder removed on release: lock the one the path names now
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        lock.unlink(missing_ok=True)  # while still holding it: see the module's docstring
        os.close(fd)  # releases the lock
        if created:  # a run refused before writing anything leaves no empty directory behind
            with contextlib.suppress(OSError):  # not empty (the work it holds), or removed already
                lock.parent.rmdir()


def _names(path: Path, fd: int) -> bool:
    """Whether ``path`` still names the file open as ``fd``."""
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def exclusive_directory(directory: Path, what: str) -> AbstractContextManager[None]:
    """``exclusive`` on ``directory/.tucka.lock``: for outputs written in place (training runs, evaluations)."""
    return exclusive(directory / LOCK_FILE, what)
