"""Adapter overhead: forward+backward time per step and peak memory of the frozen base, LoRA and TuckA.

    python bench/adapter_overhead.py [--layers 8 --hidden 1024 --batch 2 --seq 256 --reps 7]

Every method wraps its own copy of the same random-weight Llama (same seed) and trains the same batch. Times are
measured side by side, round-robin over the methods, and the median of ``--reps`` steps is reported. Peak memory is
measured per method in a fresh subprocess (CPU: the peak resident set size of the step above the resident size
before it; CUDA: torch.cuda.max_memory_allocated), because a CPU process cannot reset its peak. The frozen base
runs backward to its input embeddings, which is what every adapter's backward traverses too.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import peft
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import tucka_llm

METHODS = ["base", "lora", "tucka-k1", "tucka-k4", "tucka-k16"]


def model_config(args: argparse.Namespace) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=int(args.hidden * 2.6875),  # Llama-2-7B's 11008 / 4096
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64,
        vocab_size=32000,
        max_position_embeddings=max(args.seq, 512),
    )


def build(method: str, args: argparse.Namespace) -> torch.nn.Module:
    torch.manual_seed(0)
    model = LlamaForCausalLM(model_config(args)).to(args.device)
    targets = ["q_proj", "v_proj"]
    if method == "base":
        model.requires_grad_(False)
        model.enable_input_require_grads()
        return model.train()
    if method == "lora":
        config = peft.LoraConfig(r=args.r, lora_alpha=args.r, lora_dropout=0.0, target_modules=targets)
    else:
        k = int(method.removeprefix("tucka-k"))
        config = tucka_llm.TuckAConfig(r=args.r, k=k, t=2, p=2, target_modules=targets)
    model = peft.get_peft_model(model, config)
    if method.startswith("tucka"):
        tucka_llm.data_aware_init(model, [make_batch(args)])  # its router trains calibrated, as in a real run
    return model.train()


def make_batch(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 32000, (args.batch, args.seq), generator=generator).to(args.device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def step(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> None:
    model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def trainable_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def measure_times(args: argparse.Namespace) -> tuple[dict[str, float], dict[str, int]]:
    batch = make_batch(args)
    models = {m: build(m, args) for m in METHODS}
    for model in models.values():  # warm-up: allocator, kernels, lazy init
        step(model, batch)
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    for _ in range(args.reps):
        for method, model in models.items():
            synchronize(args.device)
            start = time.perf_counter()
            step(model, batch)
            synchronize(args.device)
            times[method].append(time.perf_counter() - start)
    params = {m: trainable_parameters(models[m]) for m in METHODS}
    return {m: statistics.median(t) for m, t in times.items()}, params


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def measure_memory_here(method: str, args: argparse.Namespace) -> float:
    """Peak bytes of one training step above what the model already holds."""
    batch = make_batch(args)
    model = build(method, args)
    step(model, batch)  # first step allocates gradients and caches; measure the second
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(model, batch)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    before = rss_bytes()
    step(model, batch)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before


def measure_memory(method: str, args: argparse.Namespace) -> float:
    command = [sys.executable, __file__, "--memory-of", method, *sys.argv[1:]]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_bytes"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8, help="decoder layers (default 8)")
    parser.add_argument("--hidden", type=int, default=1024, help="hidden size (default 1024)")
    parser.add_argument("--batch", type=int, default=2, help="sequences per step (default 2)")
    parser.add_argument("--seq", type=int, default=256, help="tokens per sequence (default 256)")
    parser.add_argument("--r", type=int, default=16, help="rank of LoRA and TuckA (default 16)")
    parser.add_argument("--reps", type=int, default=7, help="timed steps per method (default 7)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--memory-of", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.memory_of:
        print(json.dumps({"peak_bytes": measure_memory_here(args.memory_of, args)}))
        return

    memory = {m: measure_memory(m, args) for m in METHODS}
    times, params = measure_times(args)
    cfg = model_config(args)
    print(
        f"Llama: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, batch {args.batch} x {args.seq} tokens, "
        f"r={args.r}, q_proj+v_proj, {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"median of {args.reps} steps\n"
    )
    print("| method | trainable params | step time (s) | time / LoRA | step peak memory (MiB) | memory / LoRA |")
    print("|---|---:|---:|---:|---:|---:|")
    for m in METHODS:
        print(
            f"| {m} | {params[m]:,} | {times[m]:.3f} | {times[m] / times['lora']:.3f} | "
            f"{memory[m] / 2**20:.1f} | {memory[m] / memory['lora']:.3f} |"
        )


if __name__ == "__main__":
    main()
