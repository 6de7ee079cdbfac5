"""Run a pipeline of commands as stages: each one skipped when its output exists, logged, and loud when it fails.

The demo and the reproduction recipe are such pipelines. Each stage is the same command a user would type (printed
before it runs), so a pipeline is also its own documentation; its output goes to a log file and, when it fails, the
log's tail is shown with the stage's name.
"""

from __future__ import annotations

import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class StageFailed(RuntimeError):
    """A stage's command exited with an error; the message names the stage and its log."""


@dataclass(frozen=True)
class Stage:
    """``command`` makes ``output``; a stage whose ``output`` exists is done and is skipped.

    A stage whose command can continue where an interruption left it names the file that shows it began
    (``started``) and the flags that continue it (``continue_flags``): when ``started`` exists and ``output`` does
    not, the command runs with them (a training run with ``--resume``; without it the run directory is refused).
    """

    name: str
    command: Sequence[object]
    output: Path
    started: Path | None = None
    continue_flags: Sequence[object] = ()

    def command_now(self) -> list[str]:
        """The command to run now: with ``continue_flags`` when an earlier run of it was interrupted."""
        interrupted = self.started is not None and self.started.exists()
        return list(map(str, [*self.command, *(self.continue_flags if interrupted else ())]))


def run_stages(stages: Sequence[Stage], logs: Path) -> None:
    """Run the stages in order, each logged to ``logs/<name>.log``; raise StageFailed at the first failure."""
    logs.mkdir(parents=True, exist_ok=True)
    for number, stage in enumerate(stages, start=1):
        prefix = f"[{number}/{len(stages)}] {stage.name}"
        if stage.output.exists():
            print(f"{prefix}: done already ({stage.output}), skipped", flush=True)
            continue
        log = logs / f"{stage.name}.log"
        command = stage.command_now()
        print(f"{prefix}: {shlex.join(command)}", flush=True)
        started = time.perf_counter()
        with log.open("w", encoding="utf-8") as sink:
            result = subprocess.run(command, stdout=sink, stderr=subprocess.STDOUT)
        if result.returncode != 0 or not stage.output.exists():
            tail = "".join(log.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)[-15:])
            raise StageFailed(
                f"stage '{stage.name}' failed (exit code {result.returncode}); the end of its log {log}:\n{tail}"
            )
        print(f"{prefix}: {time.perf_counter() - started:.0f} s", flush=True)


def free_port() -> int:
    """A free TCP port for a DeepSpeed rendezvous, so that stages never collide with another job's port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_command(gpus: int, ds: Path, *flags: object) -> list[object]:
    """``deepspeed --num_gpus N --master_port <free> launch/train.py --ds DS FLAGS``: the launcher as a user runs it."""
    deepspeed = Path(sys.executable).parent / "deepspeed"
    return [
        deepspeed,
        "--num_gpus",
        gpus,
        "--master_port",
        free_port(),
        REPO / "launch" / "train.py",
        "--ds",
        ds,
        *flags,
    ]


# The project's commands as stages. Each knows the file its command writes last, which is what marks it done.
ZERO2 = REPO / "ds_configs" / "zero2.json"


def train_stage(name: str, gpus: int, run: Path, *flags: object) -> Stage:
    """launch/train.py under DeepSpeed through ds_configs/zero2.json; done when the final adapter is saved, and
    continued with ``--resume`` once the run has recorded its run_config.json (from its newest complete checkpoint,
    or from the start when it has none)."""
    command = train_command(gpus, ZERO2, *flags, "--output", run)
    return Stage(name, command, run / "adapter_model.safetensors", run / "run_config.json", ("--resume",))


def export_stage(name: str, run: Path, merged: Path, *flags: object) -> Stage:
    """launch/export.py: the run's adapter merged into a plain checkpoint; done when its config is written."""
    command = [sys.executable, REPO / "launch" / "export.py", "--adapter", run, "--out", merged, *flags]
    return Stage(name, command, merged / "config.json")


def eval_stage(name: str, script: str, model: Path, output: Path, *flags: object) -> Stage:
    """``eval/<script>`` on a model; done when its summary is written (the last file an evaluation writes)."""
    command = [sys.executable, REPO / "eval" / script, "--model", model, *flags, "--output", output]
    return Stage(name, command, output / "summary.json")


HELD_OUT_LOSS = "held_out_loss.json"  # tucka_llm.eval.loss (not imported: it loads torch)


def loss_stage(name: str, model: Path, output: Path, problems: int, *flags: object) -> Stage:
    """``python -m tucka_llm loss``: the held-out loss of a model on the first ``problems`` GSM8K test problems'
    reference solutions, written beside an evaluation's results (the report shows both)."""
    command = [sys.executable, "-m", "tucka_llm", "loss", "--model", model, "--limit", problems, *flags]
    return Stage(name, [*command, "--output", output], output / HELD_OUT_LOSS)


def report_stage(directories: Sequence[Path], out: Path) -> Stage:
    """``python -m tucka_llm report`` over runs and evaluations; done when report.md is written."""
    command = [sys.executable, "-m", "tucka_llm", "report", *directories, "--out", out]
    return Stage("report", command, out / "report.md")
