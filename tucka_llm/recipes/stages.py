"""Run a pipeline of commands as stages: each one skipped when its output exists, logged, and loud when it fails.

The demo and the reproduction recipe are such pipelines. Each stage is the same command a user would type (printed
before it runs), so a pipeline is also its own documentation; its output goes to a log file and, when it fails, the
log's tail is shown with the stage's name.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tucka_llm.errors import TuckaError
from tucka_llm.layout import ADAPTER_WEIGHTS, HELD_OUT_LOSS, MODEL_CONFIG, REPORT, RUN_CONFIG, SUMMARY
from tucka_llm.training.distributed import free_port


class StageFailed(TuckaError):
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


def tucka(*arguments: object) -> list[object]:
    """``python -m tucka_llm ARGUMENTS``: a command of this package, run by the Python running the recipe."""
    return [sys.executable, "-m", "tucka_llm", *arguments]


def train_command(gpus: int, ds: str, *flags: object) -> list[object]:
    """``deepspeed --num_gpus N --master_port <free> --module tucka_llm train --ds DS FLAGS``: training on N ranks
    as a user starts it (``deepspeed $(which tucka) train ...``), with a free port so that runs never collide."""
    script = Path(sys.executable).parent / "deepspeed"  # DeepSpeed's own command, where pip put it
    launcher = [script] if script.is_file() else [sys.executable, "-m", "deepspeed.launcher.runner"]
    return [*launcher, "--num_gpus", gpus, "--master_port", free_port(), "--module", "tucka_llm", "train", "--ds", ds,
            *flags]  # fmt: skip


# The project's commands as stages. Each knows the file its command writes last, which is what marks it done.
def train_stage(name: str, gpus: int, run: Path, *flags: object) -> Stage:
    """``tucka train`` under DeepSpeed with the shipped zero2 config; done when the final adapter is saved, and
    continued with ``--resume`` once the run has recorded its run_config.json (from its newest complete checkpoint,
    or from the start when it has none)."""
    command = train_command(gpus, "zero2", *flags, "--output", run)
    return Stage(name, command, run / ADAPTER_WEIGHTS, run / RUN_CONFIG, ("--resume",))


def export_stage(name: str, run: Path, merged: Path, *flags: object) -> Stage:
    """``tucka export``: the run's adapter merged into a plain checkpoint; done when its config is written."""
    return Stage(name, tucka("export", "--adapter", run, "--out", merged, *flags), merged / MODEL_CONFIG)


def eval_stage(name: str, task: str, model: Path, output: Path, *flags: object) -> Stage:
    """``tucka eval TASK`` on a model; done when its summary is written (the last file an evaluation writes)."""
    return Stage(name, tucka("eval", task, "--model", model, *flags, "--output", output), output / SUMMARY)


def loss_stage(name: str, model: Path, output: Path, problems: int, *flags: object) -> Stage:
    """``tucka loss``: the held-out loss of a model on the first ``problems`` GSM8K test problems' reference
    solutions, written beside an evaluation's results (the report shows both)."""
    command = tucka("loss", "--model", model, "--limit", problems, *flags, "--output", output)
    return Stage(name, command, output / HELD_OUT_LOSS)


def report_stage(directories: Sequence[Path], out: Path) -> Stage:
    """``tucka report`` over runs and evaluations; done when report.md is written."""
    return Stage("report", tucka("report", *directories, "--out", out), out / REPORT)
