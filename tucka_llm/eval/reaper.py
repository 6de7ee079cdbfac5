"""End the processes an evaluation started when the evaluation ends, however it ends.

vLLM runs its engine in child processes and ends them at a normal exit only: an evaluation killed (a job time
limit, ``kill -9``) left them running, holding the GPU's memory or the CPU's cores. A watchdog process, started
before the engine, keeps a list of this process's descendants and, once this process is gone, kills those still
running. It sits in a session of its own, so the Ctrl-C that stops the evaluation does not stop it first.
"""

from __future__ import annotations

import os
import subprocess
import sys

# Needs psutil (a dependency of vLLM). psutil's kill() refuses a pid that was reused by another process.
_WATCHDOG = """
import sys, time, psutil
parent, watchdog = psutil.Process(int(sys.argv[1])), psutil.Process()
seen = {}
def alive():
    try:
        return parent.is_running() and parent.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
while alive():
    try:
        seen.update((p.pid, p) for p in parent.children(recursive=True) if p.pid != watchdog.pid)
    except psutil.Error:
        pass
    seen = {pid: p for pid, p in seen.items() if p.is_running()}
    time.sleep(0.5)
for process in seen.values():
    try:
        process.kill()
    except psutil.Error:
        pass
"""


def end_descendants_at_exit() -> subprocess.Popen:
    """Start the watchdog for this process (see the module's docstring) and return it."""
    return subprocess.Popen(
        [sys.executable, "-c", _WATCHDOG, str(os.getpid())],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
