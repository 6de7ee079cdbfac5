"""Command line of ``eval/gsm8k.py`` and ``eval/hendrycks_math.py``: one parser, the task's defaults."""

from __future__ import annotations

import argparse
import sys

from tucka_llm.atomic import one_line_when_disk_full
from tucka_llm.data import PROMPT_TEMPLATE, DataError
from tucka_llm.eval.backends import BACKENDS, EvalError, vllm_available
from tucka_llm.eval.problems import SHIPPED
from tucka_llm.eval.run import MAX_NEW_TOKENS, METAMATH_STOP, SCORINGS, EvalOptions, evaluate
from tucka_llm.locking import OutputInUse
from tucka_llm.serving.routed_lora import DEFAULT_GATE_LEVELS


def build_parser(task: str) -> argparse.ArgumentParser:
    name = {"gsm8k": "GSM8K", "math": "MATH"}[task]
    parser = argparse.ArgumentParser(
        prog=f"eval/{'gsm8k' if task == 'gsm8k' else 'hendrycks_math'}.py",
        description=f"{name} accuracy of a merged checkpoint, or of a base model with an adapter: with vLLM a LoRA "
        "adapter as it is and a TuckA adapter routed (each prompt by its route's LoRA adapter), with hf unmerged.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="merged checkpoint directory (launch/export.py) or hub id")
    parser.add_argument(
        "--adapter", default=None, help="an adapter on --model (launch/train.py's output; vLLM: LoRA or TuckA)"
    )
    parser.add_argument(
        "--gate-levels",
        type=int,
        default=None,
        help=f"TuckA: gates of each served route rounded to this many values (default: {DEFAULT_GATE_LEVELS} on "
        "vllm, exact gates on hf)",
    )
    shipped = [key for key in SHIPPED if key.startswith(task)]
    if task == "math":
        parser.add_argument(
            "--subset", choices=["full", "math500"], default="full", help="shipped set: MATH test (5,000) or MATH-500"
        )
    parser.add_argument(
        "--data",
        default=None,
        help=f"problems: a local .json/.jsonl or a hub id (default: shipped {', '.join(shipped)})",
    )
    parser.add_argument("--data-split", default="test", help="split of a hub --data")
    parser.add_argument("--data-config", default=None, help="config of a hub --data (e.g. main for openai/gsm8k)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N problems only")
    parser.add_argument(
        "--output", default=None, help="output directory (default: beside the model, <name>-eval-<data>)"
    )
    parser.add_argument(
        "--backend", choices=BACKENDS, default="vllm" if vllm_available() else "hf", help="generation engine"
    )
    parser.add_argument(
        "--dtype", default="auto", help="model dtype: auto (the checkpoint's), bfloat16, float16, float32"
    )
    parser.add_argument("--prompt-template", default=PROMPT_TEMPLATE, help="prompt with a {query} field (MetaMath's)")
    parser.add_argument(
        "--step-by-step",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="append MetaMath's \" Let's think step by step.\" to the prompt",
    )
    parser.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS[task])
    parser.add_argument("--stop", nargs="*", default=list(METAMATH_STOP), help="stop strings (MetaMath's)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--compat", choices=SCORINGS, default="project", help="headline scoring; the summary reports both"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="hf backend: prompts per generate call")
    parser.add_argument("--chunk-size", type=int, default=256, help="problems generated between saves of results")
    parser.add_argument("--tensor-parallel-size", type=int, default=1, help="vllm: GPUs per model")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="vllm on GPU")
    parser.add_argument("--max-model-len", type=int, default=None, help="vllm: context length (default: the model's)")
    parser.add_argument("--kv-cache-gb", type=float, default=None, help="vllm: KV cache size (CPU default 1 GiB)")
    return parser


def main(task: str, argv: list[str] | None = None) -> None:
    parser = build_parser(task)
    args = parser.parse_args(argv)
    for flag in ("limit", "max_new_tokens", "batch_size", "chunk_size", "tensor_parallel_size"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1, got {value}.")
    data = args.data or (task if task == "gsm8k" else {"full": "math", "math500": "math500"}[args.subset])
    options = EvalOptions(
        task=task,
        model=args.model,
        data=data,
        adapter=args.adapter,
        output=args.output,
        limit=args.limit,
        data_split=args.data_split,
        data_config=args.data_config,
        backend=args.backend,
        prompt_template=args.prompt_template,
        step_by_step=args.step_by_step,
        max_new_tokens=args.max_new_tokens,
        stop=tuple(args.stop),
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        compat=args.compat,
        dtype=args.dtype,
        batch_size=args.batch_size,
        chunk_size=args.chunk_size,
        tensor_parallel_size=args.tensor_parallel_size,
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_model_len=args.max_model_len,
        kv_cache_gb=args.kv_cache_gb,
        gate_levels=args.gate_levels,
    )
    full = "the problems already answered are kept: free space there and run the same command again to resume."
    try:
        with one_line_when_disk_full("the evaluation's output", full):
            summary = evaluate(options)
    except (EvalError, DataError, OutputInUse) as error:
        sys.exit(f"error: {error}")
    print(
        f"{task}: accuracy {summary['accuracy']:.4f} ({summary['scoring']} scoring; project "
        f"{summary['accuracy_project']:.4f}, MetaMath {summary['accuracy_metamath']:.4f}) on {summary['n']} problems; "
        f"results in {options.output_dir()}"
    )
    read = ", ".join(f"{rule} {count}" for rule, count in summary["extraction_rules"].items() if count)
    print(f"answers read by: {read}")
