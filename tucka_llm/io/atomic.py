"""Atomic file writes: a reader (or a resumed run) sees the old file or the new one, never half of one."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary path beside ``path``, flush it to disk, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the mode open() would
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def disk_full(error: BaseException) -> bool:
    """Whether ``error`` reports a full disk or quota: an OSError (ENOSPC, EDQUOT), or safetensors' error, which
    carries the OS error in its message ("No space left on device (os error 28)")."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(error)
    return "No space left on device" in text or "Disk quota exceeded" in text or "StorageFull" in text


@contextmanager
def one_line_when_disk_full(where: str, then: str) -> Iterator[None]:
    """Turn a full disk anywhere in the block into the command's one-line exit: no space left on the device of
    ``where``, then what to do (``then``); any other error passes through."""
    try:
        yield
    except Exception as error:
        if not disk_full(error):
            raise
        sys.exit(f"error: no space left on the device of {where} ({error.__class__.__name__}); {then}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def sync_files(directory: str | os.PathLike) -> None:
    """Flush every file under ``directory`` to disk and give it the mode ``open()`` would (some writers, such as
    safetensors, create 0600 files): before a rename or a marker makes them count."""
    for file in Path(directory).rglob("*"):
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
            os.chmod(file, 0o666 & ~_umask())


def atomic_directory(path: str | os.PathLike, write: Callable[[Path], None], replace: bool = False) -> None:
    """Call ``write(tmp)`` on a new directory beside ``path``, flush its files, then rename it to ``path``.

    A reader sees no directory, or the old one, or the complete new one. ``path`` may already exist only when it is
    empty or ``replace`` is true; the old directory is removed only after the new one is in place. If ``write``
    fails, the temporary directory is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        write(tmp)
        sync_files(tmp)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700; give the directory the mode mkdir would
        if path.exists() and not (path.is_dir() and not any(path.iterdir())):
            if not replace:
                raise FileExistsError(f"{path} exists and is not empty")
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)  # rename(2) replaces an empty directory
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_directories(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary directories that an ``atomic_directory(path, ...)`` killed midway left beside ``path``
    (a full-size ``.tmp`` copy, or the ``.old`` one being replaced); return them. Only call it while holding
    ``path``'s lock (``tucka_llm.io.locking``): then no live writer owns them."""
    path = Path(path)
    ours = re.compile(rf"^\.{re.escape(path.name)}\.[a-z0-9_]{{8}}\.(tmp|old)$")  # mkdtemp's names, above
    stale = [p for p in path.parent.iterdir() if ours.match(p.name) and p.is_dir()] if path.parent.is_dir() else []
    for directory in stale:
        shutil.rmtree(directory)
    return stale
