"""``python -m tucka_llm COMMAND``: the package's own commands (training, export and evaluation have launch/ and eval/).

Each command is a subparser whose ``main`` receives the parsed arguments, so a new command is one more entry here.
"""

from __future__ import annotations

import argparse

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
    return parser


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and run the chosen command."""
    args = build_parser().parse_args(argv)
    args.main(args)


if __name__ == "__main__":
    main()
