"""Generated tokens/s of vLLM against transformers ``generate`` on the same checkpoint and prompts, side by side.

    python bench/eval_throughput.py                            # CPU: a random 45M Llama, 64 GSM8K prompts
    python bench/eval_throughput.py --model merged/ --prompts 256 --max-new-tokens 512     # a real checkpoint (GPU)

Both backends are the ones ``eval/gsm8k.py`` uses (``tucka_llm.eval.backends``), each in its own process, with
the MetaMath prompt of the first ``--prompts`` GSM8K test problems, greedy, ``--max-new-tokens``, no stop strings
(so that both do the same work: a random-weight model rarely ends early). Only ``generate`` is timed; model loading
and engine start are reported apart. transformers runs in batches of ``--hf-batch-size`` with left padding; vLLM gets
all prompts at once, as the eval scripts give it a whole chunk. Tokens/s counts the tokens each backend generated.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def build_small_model(directory: Path) -> None:
    """A seeded random Llama (4 layers, hidden 512, 45M parameters) with the shipped Llama-2 tokenizer."""
    from transformers import AutoModelForCausalLM

    from tucka_llm.data import llama2_tokenizer
    from tucka_llm.models import small_llama_config

    config = small_llama_config()
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    llama2_tokenizer().save_pretrained(directory)


def worker(backend_name: str, args: argparse.Namespace) -> dict:
    """Load one backend, generate once to warm up, then time ``generate`` on all prompts."""
    from tucka_llm.eval.backends import HFBackend, Sampling, VLLMBackend
    from tucka_llm.eval.problems import load_problems
    from tucka_llm.eval.run import EvalOptions

    options = EvalOptions(task="gsm8k", model=args.model, data="gsm8k")
    prompts = [options.prompt(p.question) for p in load_problems("gsm8k", "gsm8k", args.prompts)]
    sampling = Sampling(args.max_new_tokens, ())
    start = time.perf_counter()
    if backend_name == "vllm":
        backend = VLLMBackend(args.model, dtype=args.dtype, max_model_len=args.max_model_len)
    else:
        backend = HFBackend(args.model, dtype=args.dtype, batch_size=args.hf_batch_size)
    load_seconds = time.perf_counter() - start
    backend.generate(prompts[:2], Sampling(8, ()))  # warm-up: first-call allocations and kernel selection
    start = time.perf_counter()
    generations = backend.generate(prompts, sampling)
    seconds = time.perf_counter() - start
    tokens = sum(g.tokens for g in generations)
    return {"tokens": tokens, "seconds": seconds, "load_seconds": load_seconds, "prompts": len(prompts)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint directory (default: a random 45M Llama)")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--hf-batch-size", type=int, default=16)
    parser.add_argument("--dtype", default="float32" if not torch.cuda.is_available() else "bfloat16")
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--worker", choices=["vllm", "hf"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT=" + json.dumps(worker(args.worker, args)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None:
            args.model = str(Path(tmp) / "small")
            build_small_model(Path(args.model))
        results = {}
        for name in ("hf", "vllm"):
            flags = {"--model": args.model, "--prompts": args.prompts, "--max-new-tokens": args.max_new_tokens}
            flags |= {"--hf-batch-size": args.hf_batch_size, "--dtype": args.dtype}
            flags["--max-model-len"] = args.max_model_len
            command = [sys.executable, __file__, "--worker", name, *(str(x) for kv in flags.items() for x in kv)]
            done = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
            if done.returncode != 0:
                sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
            results[name] = json.loads(done.stdout.rsplit("RESULT=", 1)[1].splitlines()[0])

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    threads = os.environ.get("OMP_NUM_THREADS", "default")
    print(f"\n{args.prompts} GSM8K prompts, {args.max_new_tokens} new tokens, greedy, {args.dtype}, on {device},")
    print(f"transformers in batches of {args.hf_batch_size}, vLLM all at once")
    print(f"({platform.machine()}), torch {torch.__version__}, OMP_NUM_THREADS {threads}")
    print()
    print("| backend | generated tokens | generate (s) | tokens/s | tokens/s vs transformers | load (s) |")
    print("|---|---:|---:|---:|---:|---:|")
    base = results["hf"]["tokens"] / results["hf"]["seconds"]
    for name, label in (("hf", "transformers generate"), ("vllm", "vLLM")):
        r = results[name]
        rate = r["tokens"] / r["seconds"]
        cells = [label, r["tokens"], f"{r['seconds']:.1f}", f"{rate:.0f}", f"{rate / base:.2f}"]
        print("| " + " | ".join(map(str, cells)) + f" | {r['load_seconds']:.1f} |")


if __name__ == "__main__":
    main()
