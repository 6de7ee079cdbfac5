"""Command line of ``launch/export.py``."""

from __future__ import annotations

import argparse
import logging
import sys

from tucka_llm.export.merge import DTYPES, export_merged
from tucka_llm.export.route import DEFAULT_ROUTE, ROUTE_SYNTAX, ExportError
from tucka_llm.locking import OutputInUse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="launch/export.py",
        description="Merge a trained TuckA, LoRA or DoRA adapter into its base model: a plain Hugging Face "
        "checkpoint for transformers and vLLM.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--adapter", required=True, help="the adapter: launch/train.py's output directory")
    parser.add_argument("--out", required=True, help="directory for the merged checkpoint (written atomically)")
    parser.add_argument("--base", default=None, help="base model (default: the one recorded in the adapter)")
    parser.add_argument(
        "--route",
        default=None,
        help=f"TuckA only, what is folded into the weights: {ROUTE_SYNTAX} (default: {DEFAULT_ROUTE}; see README)",
    )
    parser.add_argument("--dtype", default="bfloat16", choices=list(DTYPES), help="dtype of the merged weights")
    parser.add_argument(
        "--calibration-data",
        default=None,
        help="MetaMathQA-style data to recompute the calibration routing features from, when the adapter directory has "
        "no tucka_router_calibration.safetensors (a .json/.jsonl file, gsm8k-train, or a hub id)",
    )
    parser.add_argument("--calibration-samples", type=int, default=256, help="sequences sampled for the calibration")
    parser.add_argument("--device", default=None, help="where layers are merged (default: cuda if available, else cpu)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (an index is written)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty --out")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("tucka_llm").setLevel(logging.INFO)
    try:
        result = export_merged(
            args.adapter,
            args.out,
            base=args.base,
            route=args.route,
            dtype=args.dtype,
            calibration_data=args.calibration_data,
            calibration_samples=args.calibration_samples,
            device=args.device,
            max_shard_size=args.max_shard_size,
            force=args.force,
        )
    except (ExportError, OutputInUse) as error:
        sys.exit(f"error: {error}")
    print(f"merged {result.method} checkpoint: {result.path}")
