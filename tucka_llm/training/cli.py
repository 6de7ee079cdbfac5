"""``tucka train``: fine-tune with TuckA, LoRA or DoRA (``--help`` lists every flag and its default, the paper's
reference run). Under DeepSpeed's launcher each rank runs this command."""

from __future__ import annotations

from tucka_llm.io.atomic import one_line_when_disk_full
from tucka_llm.training.options import parse_options
from tucka_llm.training.run import train


def main(argv: list[str] | None = None, prog: str = "tucka train") -> None:
    """Parse the flags and run (or resume) the training; a full disk is one line that says how to continue."""
    options = parse_options(argv, prog)
    full = "its complete checkpoints are kept: free space there and run the same command with --resume."
    with one_line_when_disk_full(f"--output {options.output}", full):
        train(options)
