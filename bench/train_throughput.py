"""Training throughput and peak memory per rank of TuckA, LoRA and DoRA through the real launcher, side by side, on
a base in full precision and on the same base quantised to 4 bits (``--quantize 4bit``).

    python bench/train_throughput.py [--shape small --ranks 2 --max-steps 20 --repeats 1 --bases full,4bit]
    python bench/train_throughput.py --shape medium --max-steps 8     # CPU: Linear layers hold most weights
    python bench/train_throughput.py --shape llama2-7b --ranks 1     # GPU: Llama-2-7B shape, BF16, ZeRO-2

The base model is built here with seeded random weights (no download) and saved with the shipped Llama-2
tokenizer: ``small`` is a 4-layer, hidden-512 Llama, ``medium`` an 8-layer, hidden-1024 one whose decoder Linear
layers hold 61% of the weights; ``llama2-7b`` has Llama-2-7B's shape in BF16 (13.5 GB on disk, GPU machines only).
Every method then trains it with ``deepspeed launch/train.py`` under the same flags (GSM8K train data, micro-batch 1,
global batch = micro-batch x ranks, the reference adapter hyperparameters), once per base of ``--bases``: ``full``
(the base in ``--precision``) and ``4bit`` (its Linear layers in NF4 with double quantisation, computing in
``--precision``), the runs interleaved over ``--repeats`` rounds. Tokens/s is the median over rounds of the
non-padding tokens of all ranks from step ``--warmup-steps`` to the last step, over the wall time between those
steps' records in metrics.jsonl.

Peak memory is what the launcher logs at the last step, per rank: on GPU ``torch.cuda.max_memory_allocated``
(neither the CUDA context nor the allocator's cached blocks are counted; "fits 24 GB" adds them from the reserved
peak and the device's used memory that the launcher logs beside it, by bench/memory_model.py's ``needed_gib``); on
CPU the peak RSS of each process, which includes the Python/torch runtime, so it is
no estimate of GPU memory. ``--max-len`` only caps the sequences: GSM8K examples average about 200 tokens, so the
peak is that of the longest sequence drawn, and the mean tokens per sequence is printed under the table.

Below the table: the base's weights as the launcher loads them, counted tensor by tensor in bf16 (the reference
run's precision) for each base, as bytes per parameter, and the Llama-2-7B base weights that follow from those costs
and Llama-2-7B's parameter counts (an estimate: weights only, without the adapter's training state and the
activations, which bench/gpu_suite.py measures with them on a GPU).
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
from memory_model import card_verdict  # a bench/ sibling: this script runs as python bench/train_throughput.py
from transformers import AutoModelForCausalLM, LlamaConfig

from tucka_llm.data import llama2_tokenizer
from tucka_llm.layout import QUANTIZATION_RECORD
from tucka_llm.loading import bitsandbytes_missing
from tucka_llm.models import llama2_7b_config, medium_llama_config, small_llama_config
from tucka_llm.recipes.stages import train_command
from tucka_llm.training import parse_options
from tucka_llm.training.adapters import load_base_model

REPO = Path(__file__).resolve().parents[1]
METHODS = ("tucka", "lora", "dora")
SHAPES = ("small", "medium", "llama2-7b")
BASES = ("full", "4bit")  # the base in --precision; the base with --quantize 4bit
GPU_MEMORY = ("peak_reserved_gb", "device_used_gb")  # what the launcher logs on a GPU beside the allocated peak


@dataclass(frozen=True)
class RunResult:
    """What one training run measured."""

    tokens_per_s: float
    peak_gb_per_rank: list[float]
    tokens_per_sequence: float
    gpu_memory_per_rank: dict[str, list[float]]  # on a GPU: GPU_MEMORY's values of each rank


@dataclass(frozen=True)
class WeightBytes:
    """A loaded base's weights, counted from its tensors: its 4-bit Linear layers (NF4 weights with their
    quantisation state) and every other parameter and buffer."""

    quantized_parameters: int
    quantized_bytes: int
    other_parameters: int
    other_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.quantized_bytes + self.other_bytes


def model_config(shape: str) -> tuple[LlamaConfig, torch.dtype]:
    """The architecture of ``--shape`` and the dtype its weights are saved in."""
    if shape == "llama2-7b":
        return llama2_7b_config(), torch.bfloat16
    config = medium_llama_config() if shape == "medium" else small_llama_config()
    return config, torch.float32


def build_model(config: LlamaConfig, dtype: torch.dtype, directory: Path) -> int:
    """Save a seeded random-weight model of ``config`` in ``dtype`` and the shipped tokenizer in ``directory``;
    return its number of parameters."""
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


def launcher_command(method: str, base: str, model: Path, output: Path, args: argparse.Namespace) -> list[str]:
    """``deepspeed launch/train.py`` for one method on one base; the adapter hyperparameters are the launcher's
    defaults."""
    command = train_command(
        args.ranks, args.ds, "--model", model, "--data", args.data, "--method", method,
        "--max-len", args.max_len, "--micro-batch", args.micro_batch, "--global-batch", args.global_batch,
        "--max-steps", args.max_steps, "--logging-steps", "1", "--save-steps", args.max_steps + 1,
        "--precision", args.precision, "--lr", "1e-4", "--warmup-ratio", "0", "--output", output,
    )  # fmt: skip
    if base == "4bit":
        command += ["--quantize", "4bit"]
    if args.gradient_checkpointing:
        command.append("--gradient-checkpointing")
    return [str(part) for part in command]


def run_method(method: str, base: str, model: Path, output: Path, args: argparse.Namespace) -> RunResult:
    """Train ``method`` on ``base`` once into ``output`` and read its metrics; on failure print the log's tail and
    exit."""
    command = launcher_command(method, base, model, output, args)
    done = subprocess.run(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    (output.parent / f"{output.name}.log").write_text(done.stdout, encoding="utf-8")
    if done.returncode != 0:
        print("\n".join(done.stdout.splitlines()[-40:]), file=sys.stderr)
        sys.exit(f"error: {method} on the {base} base failed (exit status {done.returncode}): {' '.join(command)}")
    if base == "4bit" and not (output / QUANTIZATION_RECORD).is_file():
        sys.exit(f"error: the {method} run on the 4-bit base recorded no {QUANTIZATION_RECORD}: was it quantised?")
    return read_result(output, args)


def read_result(output: Path, args: argparse.Namespace) -> RunResult:
    """What a finished run measured, from its metrics.jsonl (the steps after ``args.warmup_steps``)."""
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    start = next(r for r in records if r["step"] == args.warmup_steps)
    last = records[-1]
    tokens = last["num_input_tokens_seen"] - start["num_input_tokens_seen"]
    gpu = {key: [last[f"{key}/rank{i}"] for i in range(args.ranks)] for key in GPU_MEMORY if f"{key}/rank0" in last}
    return RunResult(
        tokens_per_s=tokens / (last["time"] - start["time"]),
        peak_gb_per_rank=[last[f"peak_memory_gb/rank{i}"] for i in range(args.ranks)],
        tokens_per_sequence=last["num_input_tokens_seen"] / (last["step"] * args.global_batch),
        gpu_memory_per_rank=gpu,
    )


def base_weight_bytes(model: Path, base: str) -> WeightBytes:
    """The base as the launcher loads it in bf16 (``--quantize 4bit`` for ``base`` 4bit), its tensors counted: a 4-bit
    layer's packed NF4 weight plus its quantisation state as bitsandbytes serialises it (absmax, double-quantised,
    and the code books)."""
    flags = ["--model", str(model), "--precision", "bf16", *(["--quantize", "4bit"] if base == "4bit" else [])]
    loaded = load_base_model(parse_options(flags))
    quantized_parameters = quantized_bytes = 0
    counted: set[int] = set()
    for module in loaded.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is None:
            continue
        quantized_parameters += module.in_features * module.out_features
        quantized_bytes += module.weight.nbytes
        quantized_bytes += sum(t.nbytes for t in state.as_dict(packed=True).values() if torch.is_tensor(t))
        counted.add(id(module.weight))
    others = [t for t in [*loaded.parameters(), *loaded.buffers()] if id(t) not in counted]
    weights = WeightBytes(quantized_parameters, quantized_bytes, sum(t.numel() for t in others),
                          sum(t.nbytes for t in others))  # fmt: skip
    del loaded
    return weights


def llama2_7b_weights_gb(measured: WeightBytes) -> float:
    """Llama-2-7B's base weights (GB) at the bytes per parameter ``measured`` on another shape: its decoder Linear
    layers at the 4-bit layers' cost (or the others' when nothing was quantised), the rest at the others' cost."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(llama2_7b_config())
    total = sum(p.numel() for p in model.parameters())
    linear = sum(
        m.weight.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"
    )
    other = measured.other_bytes / measured.other_parameters
    quantized = measured.quantized_bytes / measured.quantized_parameters if measured.quantized_parameters else other
    return (linear * quantized + (total - linear) * other) / 1e9


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
    parser.add_argument(
        "--bases",
        default=",".join(BASES),
        help="comma-separated bases: full (in --precision) and 4bit (--quantize 4bit) (default full,4bit)",
    )
    parser.add_argument("--data", default="gsm8k-train", help="launcher --data (default gsm8k-train, shipped)")
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
    args.bases = [b.strip() for b in args.bases.split(",") if b.strip()]
    if not args.bases or any(b not in BASES for b in args.bases):
        parser.error(f"--bases: choose from {', '.join(BASES)}")
    if "4bit" in args.bases and (missing := bitsandbytes_missing("--bases 4bit")):
        parser.error(missing)
    if on_gpu and args.ranks > torch.cuda.device_count():
        parser.error(f"--ranks {args.ranks}: this machine has {torch.cuda.device_count()} GPU(s)")
    if not 1 <= args.warmup_steps < args.max_steps:
        parser.error("--warmup-steps must be at least 1 and below --max-steps")
    if args.workdir is not None and args.workdir.exists() and any(args.workdir.iterdir()):
        parser.error(f"--workdir {args.workdir} is not empty")
    args.global_batch = args.global_batch or args.micro_batch * args.ranks
    args.ds = args.ds.resolve()
    return args


def benchmark(args: argparse.Namespace, workdir: Path) -> None:
    """Build the model in ``workdir``, run every method on every base --repeats times there, print the tables."""
    model = workdir / "model"
    print(f"building the {args.shape} model in {model}", file=sys.stderr)
    parameters = build_model(*model_config(args.shape), model)
    runs = [(method, base) for base in args.bases for method in args.methods]
    results: dict[tuple[str, str], list[RunResult]] = {run: [] for run in runs}
    for round_ in range(args.repeats):
        for method, base in runs:
            print(f"round {round_ + 1}/{args.repeats}: {method} on the {base} base", file=sys.stderr)
            output = workdir / f"{method}-{base}-{round_ + 1}"
            results[method, base].append(run_method(method, base, model, output, args))

    tokens_per_s = {run: statistics.median(r.tokens_per_s for r in rs) for run, rs in results.items()}
    peak = {
        run: [statistics.median(per_rank) for per_rank in zip(*(r.peak_gb_per_rank for r in rs), strict=True)]
        for run, rs in results.items()
    }
    print(
        f"{machine()}; model {args.shape} ({parameters / 1e6:,.0f}M params, random weights); {args.ranks} ranks, "
        f"{args.ds.name}, {args.precision}, max-len {args.max_len}, micro-batch {args.micro_batch}, global batch "
        f"{args.global_batch}, {args.max_steps} steps (tokens/s from step {args.warmup_steps}), "
        f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}, median of {args.repeats} round(s)\n"
    )
    print(
        "| method | base | tokens/s | tokens/s vs LoRA | peak memory per rank (GB, max over ranks) | memory vs LoRA | "
        "memory vs full base | fits 24 GB |"
    )
    print("|---|---|---:|---:|---|---:|---:|---|")
    for method, base in runs:
        lora, full = ("lora", base), (method, "full")
        speed = f"{tokens_per_s[method, base] / tokens_per_s[lora]:.3f}" if lora in results else "n/a"
        memory = f"{max(peak[method, base]) / max(peak[lora]):.3f}" if lora in results else "n/a"
        saving = f"{max(peak[method, base]) / max(peak[full]):.3f}" if full in results else "n/a"
        per_rank = " / ".join(f"{gb:.2f}" for gb in peak[method, base])
        label = f"{args.precision}" if base == "full" else f"4-bit NF4, compute {args.precision}"
        fits = card_verdict(max(peak[method, base]), results[method, base][-1].gpu_memory_per_rank)
        print(
            f"| {method} | {label} | {tokens_per_s[method, base]:,.0f} | {speed} | {max(peak[method, base]):.2f} "
            f"({per_rank}) | {memory} | {saving} | {fits} |"
        )
    mean_tokens = statistics.mean(r.tokens_per_sequence for rs in results.values() for r in rs)
    print(f"\nmean tokens per sequence (non-padding): {mean_tokens:.0f} (--max-len {args.max_len} caps them)")
    print_weights(model, args.bases)


def print_weights(model: Path, bases: list[str]) -> None:
    """The base weights as loaded in bf16 for each base, per parameter, and the Llama-2-7B estimate from them."""
    print("\n| base (bf16) | weights as loaded (MB) | 4-bit Linear layers: bytes / parameter | other weights: bytes / "
          "parameter | Llama-2-7B base weights, estimated (GB) |")  # fmt: skip
    print("|---|---:|---:|---:|---:|")
    for base in bases:
        weights = base_weight_bytes(model, base)
        quantized = (
            f"{weights.quantized_bytes / weights.quantized_parameters:.4f} ({weights.quantized_parameters / 1e6:.1f}M)"
            if weights.quantized_parameters
            else "-"
        )
        other = f"{weights.other_bytes / weights.other_parameters:.4f} ({weights.other_parameters / 1e6:.1f}M)"
        estimate = llama2_7b_weights_gb(weights)
        print(f"| {base} | {weights.total_bytes / 1e6:,.1f} | {quantized} | {other} | {estimate:.2f} |")


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
