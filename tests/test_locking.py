"""One writer per output: training, export and evaluation refuse a directory another live process writes, naming
its pid, and proceed once that process is gone, however it ended."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tucka_llm.eval.run import EvalOptions, evaluate
from tucka_llm.export import export_merged
from tucka_llm.io.locking import LOCK_FILE, OutputInUse, exclusive
from tucka_llm.training import parse_options, train

HOLD = """
import contextlib, sys, time
from pathlib import Path
from tucka_llm.io.locking import exclusive
with contextlib.ExitStack() as stack:
    for lock in sys.argv[1:]:
        stack.enter_context(exclusive(Path(lock), lock))
    print("held", flush=True)
    time.sleep(120)
"""


def hold_locks(*locks: Path) -> subprocess.Popen:
    """Another process holding ``locks`` (as a live run holds its output's)."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, *map(str, locks)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_writer_is_refused_with_the_holders_pid_until_the_holder_dies(tiny_model, adapters, tmp_path):
    run, evaluation, merged = tmp_path / "run", tmp_path / "eval", tmp_path / "merged"
    holder = hold_locks(run / LOCK_FILE, evaluation / LOCK_FILE, tmp_path / f".merged{LOCK_FILE}")
    try:
        train_options = parse_options(["--model", str(tiny_model), "--output", str(run), "--resume"])
        with pytest.raises(OutputInUse, match=rf"^--output {run} is in use by another process \(pid {holder.pid}\)"):
            train(train_options)
        eval_options = EvalOptions(task="gsm8k", model=str(tiny_model), data="gsm8k", output=str(evaluation), limit=1)
        with pytest.raises(OutputInUse, match=rf"--output {evaluation} is in use .*pid {holder.pid}"):
            evaluate(eval_options)
        with pytest.raises(OutputInUse, match=rf"--out {merged} is in use .*pid {holder.pid}"):
            export_merged(adapters["lora"], merged, dtype="float32")
    finally:
        holder.send_signal(signal.SIGKILL)  # a killed holder: the kernel releases its locks
        holder.wait()
    export_merged(adapters["lora"], merged, dtype="float32")
    assert (merged / "config.json").is_file()
    with exclusive(run / LOCK_FILE, "--output"):  # free again, though the dead holder's pid is still in the file
        pass
