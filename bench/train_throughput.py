"""Training throughput and peak memory per rank of TuckA, LoRA and DoRA through the real launcher, side by side.

    python bench/train_throughput.py [--shape small --ranks 2 --max-steps 20 --repeats 1]
    python bench/train_throughput.py --shape llama2-7b --ranks 1     # GPU: Llama-2-7B shape, BF16, ZeRO-2

The base model is built here with seeded random weights (no download) and saved with the shipped Llama-2
tokenizer: ``small`` is a 4-layer, hidden-512 Llama; ``llama2-7b`` has Llama-2-7B's shape in BF16 (13.5 GB on disk,
GPU machines only). Every method then trains it with ``deepspeed launch/train.py`` under the same flags (GSM8K
train data, micro-batch 1, global batch = micro-batch x ranks, the reference adapter hyperparameters), the methods
interleaved over ``--repeats`` rounds. Tokens/s is the median over rounds of the non-padding tokens of all ranks
from step ``--warmup-steps`` to the last step, over the wall time between those steps' records in metrics.jsonl.

Peak memory is what the launcher logs at the last step, per rank: on GPU ``torch.cuda.max_memory_allocated``
(neither the CUDA context nor the allocator's cached blocks are counted, so "fits 24 GB" compares that peak with
24 GiB and leaves them out); on CPU the peak RSS of each process, which includes the Python/torch runtime, so it is
no estimate of GPU memory. ``--max-len`` only caps the sequences: GSM8K examples average about 200 tokens, so the
peak is that of the longest sequence drawn, and the mean tokens per sequence is printed under the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from tucka_llm.data import llama2_tokenizer
from tucka_llm.models import llama2_7b_config, small_llama_config
from tucka_llm.stages import train_command

REPO = Path(__file__).resolve().parents[1]
METHODS = ("tucka", "lora", "dora")
SHAPES = ("small", "llama2-7b")
FITS_GB = 24


@dataclass(frozen=True)
class RunResult:
    """What one training run measured."""

    tokens_per_s: float
    peak_gb_per_rank: list[float]
    tokens_per_sequence: float


def model_config(shape: str) -> tuple[LlamaConfig, torch.dtype]:
    """The architecture of ``--shape`` and the dtype its weights are saved in."""
    if shape == "llama2-7b":
        return llama2_7b_config(), torch.bfloat16
    config = small_llama_config()
    return config, torch.float32


def build_model(shape: str, directory: Path) -> int:
    """Save a seeded random-weight model of ``shape`` and the shipped tokenizer in ``directory``; return its size."""
    config, dtype = model_config(shape)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # random init of 7B is much faster on GPU
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(directory)
    llama2_tokenizer().save_pretrained(directory)
    parameters = sum(p.numel() for p in model.parameters())
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return parameters


def launcher_command(method: str, model: Path, output: Path, args: argparse.Namespace) -> list[str]:
    """``deepspeed launch/train.py`` for one method; the adapter hyperparameters are the launcher's defaults."""
    command = train_command(
        args.ranks, args.ds, "--model", model, "--data", "gsm8k-train", "--method", method,
        "--max-len", args.max_len, "--micro-batch", args.micro_batch, "--global-batch", args.global_batch,
        "--max-steps", args.max_steps, "--logging-steps", "1", "--save-steps", args.max_steps + 1,
        "--precision", args.precision, "--lr", "1e-4", "--warmup-ratio", "0", "--output", output,
    )  # fmt: skip
    if args.gradient_checkpointing:
        command.append("--gradient-checkpointing")
    return [str(part) for part in command]


def run_method(method: str, model: Path, output: Path, args: argparse.Namespace) -> RunResult:
    """Train ``method`` once into ``output`` and read its metrics; on failure print the log's tail and exit."""
    command = launcher_command(method, model, output, args)
    done = subprocess.run(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    (output.parent / f"{output.name}.log").write_text(done.stdout, encoding="utf-8")
    if done.returncode != 0:
        print("\n".join(done.stdout.splitlines()[-40:]), file=sys.stderr)
        sys.exit(f"error: {method} failed (exit status {done.returncode}): {' '.join(command)}")
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    start = next(r for r in records if r["step"] == args.warmup_steps)
    last = records[-1]
    tokens = last["num_input_tokens_seen"] - start["num_input_tokens_seen"]
    return RunResult(
        tokens_per_s=tokens / (last["time"] - start["time"]),
        peak_gb_per_rank=[last[f"peak_memory_gb/rank{i}"] for i in range(args.ranks)],
        tokens_per_sequence=last["num_input_tokens_seen"] / (last["step"] * args.global_batch),
    )


def machine() -> str:
    """The GPU(s), or the CPU model and core count."""
    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    names = [
        line.split(":", 1)[1].strip()
        for line in Path("/proc/cpuinfo").read_text().splitlines()
        if line.startswith("model name")
    ]
    return f"CPU {names[0] if names else platform.processor()}, {os.cpu_count()} cores"


def parse_args() -> argparse.Namespace:
    """The command line, checked; --global-batch filled in and --ds made absolute."""
    on_gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=SHAPES, default="small", help="base model architecture (default small)")
    parser.add_argument(
        "--methods", default=",".join(METHODS), help=f"comma-separated methods (default {','.join(METHODS)})"
    )
    parser.add_argument("--ranks", type=int, default=2, help="DeepSpeed processes (GPUs on a GPU machine; default 2)")
    parser.add_argument(
        "--ds",
        type=Path,
        default=REPO / "ds_configs" / "zero2.json",
        help="DeepSpeed config (default ds_configs/zero2.json of this repository)",
    )
    parser.add_argument("--max-len", type=int, default=512, help="tokens per example at most (default 512)")
    parser.add_argument("--micro-batch", type=int, default=1, help="sequences per rank per step (default 1)")
    parser.add_argument(
        "--global-batch", type=int, help="sequences per optimizer step (default micro-batch x ranks: no accumulation)"
    )
    parser.add_argument("--max-steps", type=int, default=20, help="optimizer steps per run (default 20)")
    parser.add_argument(
        "--warmup-steps", type=int, default=3, help="steps left out of tokens/s: it counts from this step (default 3)"
    )
    parser.add_argument("--repeats", type=int, default=1, help="rounds over the methods; median tokens/s (default 1)")
    parser.add_argument(
        "--precision",
        choices=("bf16", "fp32"),
        default="bf16" if on_gpu else "fp32",
        help="launcher --precision (default bf16 on GPU, fp32 on CPU, where bf16 matmuls are ~10x slower)",
    )
    parser.add_argument(
        "--gradient-checkpointing", action="store_true", help="pass --gradient-checkpointing to the launcher"
    )
    parser.add_argument(
        "--workdir", type=Path, help="empty or new directory to keep the model, runs and logs in (default: a temp dir)"
    )
    args = parser.parse_args()
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not args.methods or any(m not in METHODS for m in args.methods):
        parser.error(f"--methods: choose from {', '.join(METHODS)}")
    if on_gpu and args.ranks > torch.cuda.device_count():
        parser.error(f"--ranks {args.ranks}: this machine has {torch.cuda.device_count()} GPU(s)")
    if not 1 <= args.warmup_steps < args.max_steps:
        parser.error("--warmup-steps must be at least 1 and below --max-steps")
    if args.workdir is not None and args.workdir.exists() and any(args.workdir.iterdir()):
        parser.error(f"--workdir {args.workdir} is not empty")
    args.global_batch = args.global_batch or args.micro_batch * args.ranks
    args.ds = args.ds.resolve()
    return args


def benchmark(args: argparse.Namespace, base: Path) -> None:
    """Build the model in ``base``, run every method --repeats times there, print the table."""
    model = base / "model"
    print(f"building the {args.shape} model in {model}", file=sys.stderr)
    parameters = build_model(args.shape, model)
    results: dict[str, list[RunResult]] = {m: [] for m in args.methods}
    for round_ in range(args.repeats):
        for method in args.methods:
            print(f"round {round_ + 1}/{args.repeats}: {method}", file=sys.stderr)
            results[method].append(run_method(method, model, base / f"{method}-{round_ + 1}", args))

    tokens_per_s = {m: statistics.median(r.tokens_per_s for r in runs) for m, runs in results.items()}
    peak = {
        m: [statistics.median(per_rank) for per_rank in zip(*(r.peak_gb_per_rank for r in runs), strict=True)]
        for m, runs in results.items()
    }
    print(
        f"{machine()}; model {args.shape} ({parameters / 1e6:,.0f}M params, random weights); {args.ranks} ranks, "
        f"{args.ds.name}, {args.precision}, max-len {args.max_len}, micro-batch {args.micro_batch}, global batch "
        f"{args.global_batch}, {args.max_steps} steps (tokens/s from step {args.warmup_steps}), "
        f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}, median of {args.repeats} round(s)\n"
    )
    print(
        "| method | tokens/s | tokens/s vs LoRA | peak memory per rank (GB, max over ranks) | memory vs LoRA | "
        f"fits {FITS_GB} GB |"
    )
    print("|---|---:|---:|---|---:|---|")
    for m in args.methods:
        ratio_speed = f"{tokens_per_s[m] / tokens_per_s['lora']:.3f}" if "lora" in tokens_per_s else "n/a"
        ratio_memory = f"{max(peak[m]) / max(peak['lora']):.3f}" if "lora" in peak else "n/a"
        per_rank = " / ".join(f"{gb:.2f}" for gb in peak[m])
        fits = ("yes" if max(peak[m]) < FITS_GB else "no") if torch.cuda.is_available() else "n/a (CPU RSS)"
        print(
            f"| {m} | {tokens_per_s[m]:,.0f} | {ratio_speed} | {max(peak[m]):.2f} ({per_rank}) | {ratio_memory} | "
            f"{fits} |"
        )
    mean_tokens = statistics.mean(r.tokens_per_sequence for runs in results.values() for r in runs)
    print(f"\nmean tokens per sequence (non-padding): {mean_tokens:.0f} (--max-len {args.max_len} caps them)")


def main() -> None:
    args = parse_args()
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        benchmark(args, args.workdir.resolve())
        return
    with tempfile.TemporaryDirectory(prefix="train_throughput_") as tmp:
        benchmark(args, Path(tmp))


if __name__ == "__main__":
    main()
