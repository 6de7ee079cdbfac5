"""An evaluation's child processes (vLLM's engine) end when the evaluation is killed."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

psutil = pytest.importorskip("psutil")  # installed with vLLM, whose engine processes the reaper ends

EVALUATION = """
import subprocess, time
from tucka_llm.eval.reaper import end_descendants_at_exit
end_descendants_at_exit()
engine = subprocess.Popen(["sleep", "120"])  # stands for vLLM's engine core process
time.sleep(1)  # the watchdog has seen it
print(engine.pid, flush=True)
time.sleep(120)
"""


def test_the_processes_a_killed_evaluation_started_end_with_it():
    evaluation = subprocess.Popen([sys.executable, "-c", EVALUATION], stdout=subprocess.PIPE, text=True)
    engine = psutil.Process(int(evaluation.stdout.readline()))
    evaluation.send_signal(signal.SIGKILL)
    evaluation.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and engine.is_running() and engine.status() != psutil.STATUS_ZOMBIE:
        time.sleep(0.2)
    assert not engine.is_running() or engine.status() == psutil.STATUS_ZOMBIE
