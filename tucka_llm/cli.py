"""``tucka COMMAND``: every stage of the project as one command (``python -m tucka_llm COMMAND`` is the same).

Each command is a ``main(argv, prog)`` in the module that owns its stage, imported only when it runs (the heavy
libraries load for the command that needs them). A command ends on a user's mistake with the one line of its
``TuckaError``; anything else is a bug and keeps its traceback. ``launch/`` and ``eval/`` hold scripts of a few
lines that call these commands, for the commands the README documents from a checkout.

DeepSpeed's launcher runs this file on every rank (``deepspeed $(which tucka) train ...``, or ``deepspeed --module
tucka_llm train ...``) with ``--local_rank=N`` before the command's own arguments; the rank is read from the
environment the launcher sets, so that flag is dropped here.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass

from tucka_llm.errors import TuckaError


@dataclass(frozen=True)
class Command:
    """A command: what it does (for ``tucka --help``) and the ``module:function`` that runs it."""

    summary: str
    target: str
    tasks: tuple[str, ...] = ()  # commands with a task (``tucka eval gsm8k``): the task is the first argument


COMMANDS = {
    "train": Command(
        "fine-tune with TuckA, LoRA or DoRA (the paper's reference run by default)", "tucka_llm.training.cli:main"
    ),
    "export": Command(
        "merge a trained adapter into its base, or convert TuckA to routed LoRA adapters", "tucka_llm.export.cli:main"
    ),
    "eval": Command("GSM8K or MATH accuracy of a model: tucka eval {gsm8k,math} ...", "tucka_llm.eval.cli:main",
                    ("gsm8k", "math")),
    "loss": Command("held-out loss of a model on the reference solutions of test problems", "tucka_llm.eval.loss:main"),
    "report": Command("compare training runs and evaluations: a Markdown table and PNG plots", "tucka_llm.report:main"),
    "demo": Command("TuckA end to end on SmolLM2-135M on this CPU, offline (~15 min)", "tucka_llm.recipes.demo:main"),
    "table3": Command(
        "the paper's Table 3: train, merge and evaluate TuckA, LoRA and DoRA", "tucka_llm.recipes.table3:main"
    ),
}  # fmt: skip
LOCAL_RANK_FLAGS = ("--local_rank", "--local-rank")


def run(name: str, argv: list[str], prog: str | None = None) -> None:
    """Run command ``name`` with its arguments (a task command's first argument is its task); ``prog`` names the
    command in its usage (default ``tucka NAME [TASK]``). A TuckaError ends it with ``error: <message>``."""
    command = COMMANDS[name]
    arguments: list[object] = [argv, prog or f"tucka {name}"]
    if command.tasks:
        if not argv or argv[0] not in command.tasks:
            given = f"'{argv[0]}'" if argv else "none"
            print(f"usage: tucka {name} {{{','.join(command.tasks)}}} ...", file=sys.stderr)
            print(f"tucka {name}: error: give the task first, got {given}", file=sys.stderr)
            sys.exit(2)
        arguments = [argv[0], argv[1:], prog or f"tucka {name} {argv[0]}"]
    module, function = command.target.split(":")
    main = getattr(importlib.import_module(module), function)
    try:
        main(*arguments)
    except TuckaError as error:
        if error.exit_status == 1:
            sys.exit(f"error: {error}")  # Python prints it to stderr and exits with 1
        print(f"error: {error}", file=sys.stderr)
        sys.exit(error.exit_status)


def without_local_rank(argv: list[str]) -> list[str]:
    """``argv`` without the ``--local_rank=N`` (or ``--local_rank N``) DeepSpeed's launcher puts before it."""
    argv = list(argv)
    while argv and argv[0].split("=", 1)[0] in LOCAL_RANK_FLAGS:
        argv = argv[1:] if "=" in argv[0] else argv[2:]
    return argv


def build_parser() -> argparse.ArgumentParser:
    """``tucka --help``: the commands and what each does; each command parses its own arguments."""
    parser = argparse.ArgumentParser(
        prog="tucka",
        description="tucka-llm: fine-tune LLMs with TuckA, LoRA or DoRA (peft, DeepSpeed), export merged weights, "
        "evaluate on GSM8K and MATH (vLLM). `tucka COMMAND --help` lists a command's flags.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        sub = commands.add_parser(name, help=command.summary, add_help=False)
        sub.add_argument("arguments", nargs=argparse.REMAINDER)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``tucka`` console script and of ``python -m tucka_llm``."""
    argv = without_local_rank(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv[:1])
    run(args.command, argv[1:])


if __name__ == "__main__":
    main()
