"""``python -m tucka_llm COMMAND``: the package's own commands (training, export and evaluation have launch/ and eval/).

Each command is a subparser whose ``main`` receives the parsed arguments, so a new command is one more entry here.
"""

from __future__ import annotations

import argparse
import sys

from tucka_llm import report


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one subparser per command."""
    parser = argparse.ArgumentParser(prog="python -m tucka_llm", description="tucka-llm's commands.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    report_parser = commands.add_parser(
        "report",
        help="compare training runs and evaluations: a Markdown table and PNG plots",
        description="Write report.md (one row per training run: method, trainable parameters, tokens/s, peak "
        "memory, GSM8K and MATH accuracy, wall time) and PNG plots (training loss; for TuckA runs, expert-group "
        "load and routing entropy) into --out, and print the table.",
    )
    report.add_arguments(report_parser)
    report_parser.set_defaults(main=report.main)
    loss_parser = commands.add_parser(
        "loss",
        help="held-out loss of a model on the reference solutions of test problems",
        description="Write OUTPUT/held_out_loss.json: the mean cross-entropy per response token that --model (with "
        "--adapter) gives the reference solutions of the first --limit shipped test problems, in MetaMathQA form "
        "and tokenised as training does. `report` shows it beside the accuracy of the same evaluation directory.",
    )
    loss_parser.add_argument("--model", required=True, help="model directory (a merged checkpoint, or the base)")
    loss_parser.add_argument("--adapter", default=None, help="an unmerged adapter on --model")
    loss_parser.add_argument("--task", choices=["gsm8k", "math"], default="gsm8k", help="shipped test set")
    loss_parser.add_argument("--limit", type=int, default=40, help="the first N test problems")
    loss_parser.add_argument("--output", required=True, help="directory for held_out_loss.json (an evaluation's)")
    loss_parser.set_defaults(main=_held_out_loss)
    return parser


def _held_out_loss(args: argparse.Namespace) -> None:
    from tucka_llm.adapter_loading import AdapterLoadError  # torch and transformers: loaded for this command only
    from tucka_llm.data import DataError
    from tucka_llm.eval.loss import write_held_out_loss

    try:
        write_held_out_loss(args)
    except (AdapterLoadError, DataError) as error:
        sys.exit(f"error: {error}")


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and run the chosen command."""
    args = build_parser().parse_args(argv)
    args.main(args)


if __name__ == "__main__":
    main()
