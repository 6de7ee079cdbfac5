"""Command line of ``tucka eval gsm8k`` and ``tucka eval math``: one parser, whose defaults are ``EvalOptions``'."""

from __future__ import annotations

import argparse
from dataclasses import fields

from tucka_llm.eval.backends import BACKENDS, vllm_available
from tucka_llm.eval.problems import SHIPPED
from tucka_llm.eval.run import SCORINGS, EvalOptions, evaluate
from tucka_llm.io.atomic import one_line_when_disk_full
from tucka_llm.serving.routed_lora import DEFAULT_GATE_LEVELS

MATH_SUBSETS = {"full": "math", "math500": "math500"}  # --subset: the shipped data it names


def build_parser(task: str, prog: str | None = None) -> argparse.ArgumentParser:
    """The flags of ``tucka eval TASK``; each default is the ``EvalOptions`` field's (the task's where it has one)."""
    d = EvalOptions(task=task, model="", data=task)
    name = {"gsm8k": "GSM8K", "math": "MATH"}[task]
    parser = argparse.ArgumentParser(
        prog=prog or f"tucka eval {task}",
        description=f"{name} accuracy of a merged checkpoint, or of a base model with an adapter: with vLLM a LoRA "
        "adapter as it is and a TuckA adapter routed (each prompt by its route's LoRA adapter), with hf unmerged.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="merged checkpoint directory (tucka export) or hub id")
    parser.add_argument(
        "--adapter", default=d.adapter, help="an adapter on --model (tucka train's output; vLLM: LoRA or TuckA)"
    )
    parser.add_argument(
        "--gate-levels",
        type=int,
        default=d.gate_levels,
        help=f"TuckA: gates of each served route rounded to this many values (default: {DEFAULT_GATE_LEVELS} on "
        "vllm, exact gates on hf)",
    )
    if task == "math":
        parser.add_argument(
            "--subset", choices=list(MATH_SUBSETS), default="full", help="shipped set: MATH test (5,000) or MATH-500"
        )
    shipped = [key for key in SHIPPED if key.startswith(task)]
    parser.add_argument(
        "--data",
        default=None,
        help=f"problems: a local .json/.jsonl or a hub id (default: shipped {', '.join(shipped)})",
    )
    parser.add_argument("--data-split", default=d.data_split, help="split of a hub --data")
    parser.add_argument(
        "--data-config", default=d.data_config, help="config of a hub --data (e.g. main for openai/gsm8k)"
    )
    parser.add_argument("--limit", type=int, default=d.limit, help="evaluate the first N problems only")
    parser.add_argument(
        "--output", default=d.output, help="output directory (default: beside the model, <name>-eval-<data>)"
    )
    parser.add_argument(
        "--backend", choices=BACKENDS, default="vllm" if vllm_available() else "hf", help="generation engine"
    )
    parser.add_argument(
        "--dtype", default=d.dtype, help="model dtype: auto (the checkpoint's), bfloat16, float16, float32"
    )
    parser.add_argument("--prompt-template", default=d.prompt_template, help="prompt with a {query} field (MetaMath's)")
    parser.add_argument(
        "--step-by-step",
        action=argparse.BooleanOptionalAction,
        default=d.step_by_step,
        help="append MetaMath's \" Let's think step by step.\" to the prompt",
    )
    parser.add_argument("--max-new-tokens", type=int, default=d.sampling.max_new_tokens)
    parser.add_argument("--stop", nargs="*", default=list(d.stop), help="stop strings (MetaMath's)")
    parser.add_argument("--temperature", type=float, default=d.temperature, help="0 is greedy")
    parser.add_argument("--top-p", type=float, default=d.top_p)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument(
        "--compat", choices=SCORINGS, default=d.compat, help="headline scoring; the summary reports both"
    )
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="hf backend: prompts per generate call")
    parser.add_argument(
        "--chunk-size", type=int, default=d.chunk_size, help="problems generated between saves of results"
    )
    parser.add_argument("--tensor-parallel-size", type=int, default=d.tensor_parallel_size, help="vllm: GPUs per model")
    parser.add_argument("--gpu-memory-utilization", type=float, default=d.gpu_memory_utilization, help="vllm on GPU")
    parser.add_argument(
        "--max-model-len", type=int, default=d.max_model_len, help="vllm: context length (default: the model's)"
    )
    parser.add_argument(
        "--kv-cache-gb", type=float, default=d.kv_cache_gb, help="vllm: KV cache size (CPU default 1 GiB)"
    )
    return parser


def main(task: str, argv: list[str] | None = None, prog: str | None = None) -> None:
    """Parse the flags, evaluate (or resume), and print the accuracy with how the answers were read."""
    parser = build_parser(task, prog)
    args = parser.parse_args(argv)
    for flag in ("limit", "max_new_tokens", "batch_size", "chunk_size", "tensor_parallel_size"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1, got {value}.")
    args.data = args.data or (task if task == "gsm8k" else MATH_SUBSETS[args.subset])
    args.stop = tuple(args.stop)
    options = EvalOptions(task=task, **{f.name: getattr(args, f.name) for f in fields(EvalOptions) if f.name != "task"})
    full = "the problems already answered are kept: free space there and run the same command again to resume."
    with one_line_when_disk_full("the evaluation's output", full):
        summary = evaluate(options)
    print(
        f"{task}: accuracy {summary['accuracy']:.4f} ({summary['scoring']} scoring; project "
        f"{summary['accuracy_project']:.4f}, MetaMath {summary['accuracy_metamath']:.4f}) on {summary['n']} problems; "
        f"results in {options.output_dir()}"
    )
    read = ", ".join(f"{rule} {count}" for rule, count in summary["extraction_rules"].items() if count)
    print(f"answers read by: {read}")
