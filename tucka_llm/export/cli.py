"""Command line of ``tucka export``: a merged checkpoint (``export.merge``) or routed LoRA adapters
(``export.lora``)."""

from __future__ import annotations

import argparse
import logging

from tucka_llm.export import export_lora
from tucka_llm.export.merge import DEFAULT_DTYPE, DEFAULT_MAX_SHARD_SIZE, DTYPES, export_merged
from tucka_llm.export.route import DEFAULT_ROUTE, ROUTE_SYNTAX, ExportError
from tucka_llm.io.atomic import one_line_when_disk_full
from tucka_llm.serving.routed_lora import DEFAULT_GATE_LEVELS
from tucka_llm.tucka.calibration import DEFAULT_SAMPLES

FORMATS = ("merged", "lora")
MERGED_ONLY = ("route", "dtype", "device", "max_shard_size")  # flags without a meaning for --format lora
MERGED_DEFAULTS = {"dtype": DEFAULT_DTYPE, "max_shard_size": DEFAULT_MAX_SHARD_SIZE}


def build_parser(prog: str = "tucka export") -> argparse.ArgumentParser:
    """The flags of ``tucka export``; the defaults are those of ``export_merged`` and ``export_lora``."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Merge a trained TuckA, LoRA or DoRA adapter into its base model: a plain Hugging Face "
        "checkpoint for transformers and vLLM. --format lora instead converts a TuckA adapter into peft LoRA "
        "adapters, one per served route, with the router that picks a prompt's route (routed serving).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--adapter", required=True, help="the adapter: a training run (tucka train --output)")
    parser.add_argument("--out", required=True, help="output directory (written atomically)")
    parser.add_argument("--base", default=None, help="base model (default: the one recorded in the adapter)")
    parser.add_argument(
        "--format",
        default="merged",
        choices=FORMATS,
        help="merged: one checkpoint with one route folded in; lora: TuckA as per-route LoRA adapters + router",
    )
    parser.add_argument(
        "--route",
        default=None,
        help=f"merged TuckA only, what is folded into the weights: {ROUTE_SYNTAX} (default: {DEFAULT_ROUTE})",
    )
    parser.add_argument(
        "--gate-levels",
        type=int,
        default=None,
        help=f"lora only: values each gate of a served route is rounded to (default: {DEFAULT_GATE_LEVELS})",
    )
    parser.add_argument(
        "--dtype",
        default=None,
        choices=list(DTYPES),
        help=f"merged only: dtype of the merged weights ({DEFAULT_DTYPE})",
    )
    parser.add_argument(
        "--calibration-data",
        default=None,
        help="MetaMathQA-style data to recompute the calibration routing features from, when the adapter directory has "
        "no tucka_router_calibration.safetensors (a .json/.jsonl file, gsm8k-train, or a hub id)",
    )
    parser.add_argument(
        "--calibration-samples", type=int, default=DEFAULT_SAMPLES, help="sequences sampled for the calibration"
    )
    parser.add_argument("--device", default=None, help="merged only: where layers are merged (default: cuda if any)")
    parser.add_argument(
        "--max-shard-size", default=None, help=f"merged only: largest safetensors shard ({DEFAULT_MAX_SHARD_SIZE})"
    )
    parser.add_argument("--force", action="store_true", help="replace a non-empty --out")
    return parser


def main(argv: list[str] | None = None, prog: str = "tucka export") -> None:
    """Parse the flags and write the export; a full disk is one line (nothing partial is kept)."""
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("tucka_llm").setLevel(logging.INFO)
    full = "nothing partial was kept: free space there and run the same command again."
    with one_line_when_disk_full(f"--out {args.out}", full):
        if args.format == "lora":
            export_routed(args)
        else:
            export_checkpoint(args)


def export_checkpoint(args: argparse.Namespace) -> None:
    if args.gate_levels is not None:
        raise ExportError("--gate-levels applies to --format lora (routed serving); a merged checkpoint has no routes.")
    flags = {name: getattr(args, name) or MERGED_DEFAULTS.get(name) for name in MERGED_ONLY}
    result = export_merged(
        args.adapter,
        args.out,
        base=args.base,
        calibration_data=args.calibration_data,
        calibration_samples=args.calibration_samples,
        force=args.force,
        **flags,
    )
    print(f"merged {result.method} checkpoint: {result.path}")


def export_routed(args: argparse.Namespace) -> None:
    given = [f"--{name.replace('_', '-')}" for name in MERGED_ONLY if getattr(args, name) is not None]
    if given:
        raise ExportError(
            f"{', '.join(given)} applies to --format merged only: --format lora keeps every route (float32 factors)."
        )
    result = export_lora(
        args.adapter,
        args.out,
        base=args.base,
        gate_levels=DEFAULT_GATE_LEVELS if args.gate_levels is None else args.gate_levels,
        calibration_data=args.calibration_data,
        calibration_samples=args.calibration_samples,
        force=args.force,
    )
    print(f"routed LoRA export: {result.path} ({len(result.routes)} route adapters; serving: {result.path}/README.md)")
