"""Generated tokens/s of vLLM against transformers ``generate`` on the same checkpoint and prompts, side by side.

    python bench/eval_throughput.py                            # CPU: a random 45M Llama, 64 GSM8K prompts
    python bench/eval_throughput.py --model merged/ --prompts 256 --max-new-tokens 512     # a real checkpoint (GPU)
    python bench/eval_throughput.py --adapter runs/train       # a TuckA adapter: routed LoRA vs merged vs unmerged

Every backend is the one ``eval/gsm8k.py`` uses (``tucka_llm.eval.backends``), each in its own process, with
the MetaMath prompt of the first ``--prompts`` GSM8K test problems, greedy, ``--max-new-tokens``, no stop strings
(so that all do the same work: a random-weight model rarely ends early). Only ``generate`` is timed; model loading,
engine start and (routed) the conversion are reported apart. transformers runs in batches of ``--hf-batch-size`` with
left padding; vLLM gets all prompts at once, as the eval scripts give it a whole chunk. Tokens/s counts the tokens
each backend generated.

With ``--adapter`` (a TuckA adapter; ``--model`` defaults to its base, SmolLM2-135M-Instruct offline when that is
where it was trained): vLLM serving it routed (each prompt its route's LoRA adapter, ``--gate-levels``; the number
of distinct adapters is reported), vLLM serving it merged (``launch/export.py``'s default fold, in ``--dtype``), and
transformers with the adapter unmerged (each sequence on its own route, the same gate levels). It also counts
the prompts on which routed vLLM and unmerged transformers took the same route and gave the same completion.
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
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from tucka_llm.eval.backends import HFBackend, VLLMBackend

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


LABELS = {
    "hf": "transformers generate",
    "vllm": "vLLM",
    "vllm-routed": "vLLM, TuckA routed (LoRA per route)",
    "vllm-merged": "vLLM, TuckA merged",
    "hf-adapter": "transformers, TuckA unmerged",
}


def make_backend(backend_name: str, args: argparse.Namespace) -> HFBackend | VLLMBackend:
    """The backend a worker times (see the module docstring)."""
    from tucka_llm.eval.backends import HFBackend, VLLMBackend
    from tucka_llm.eval.run import EvalOptions, routed_requests

    vllm_settings = dict(dtype=args.dtype, max_model_len=args.max_model_len)
    if backend_name == "vllm":
        return VLLMBackend(args.model, **vllm_settings)
    if backend_name == "vllm-merged":
        return VLLMBackend(args.merged, **vllm_settings)
    if backend_name == "vllm-routed":
        options = EvalOptions(task="gsm8k", model=args.model, data="gsm8k", adapter=args.adapter, dtype=args.dtype,
                              gate_levels=args.gate_levels)  # fmt: skip
        adapters = routed_requests(options, Path(args.work))
        return VLLMBackend(args.model, adapters=adapters, **vllm_settings)
    adapter = args.adapter if backend_name == "hf-adapter" else None
    return HFBackend(args.model, adapter=adapter, dtype=args.dtype, batch_size=args.hf_batch_size,
                     gate_levels=args.gate_levels if adapter else None)  # fmt: skip


def worker(backend_name: str, args: argparse.Namespace) -> dict:
    """Load one backend, generate once to warm up, then time ``generate`` on all prompts."""
    from tucka_llm.eval.backends import Sampling
    from tucka_llm.eval.problems import load_problems
    from tucka_llm.eval.run import EvalOptions
    from tucka_llm.serving import route_name

    options = EvalOptions(task="gsm8k", model=args.model, data="gsm8k")
    prompts = [options.prompt(p.question) for p in load_problems("gsm8k", "gsm8k", args.prompts)]
    sampling = Sampling(args.max_new_tokens, ())
    start = time.perf_counter()
    backend = make_backend(backend_name, args)
    load_seconds = time.perf_counter() - start
    backend.generate(prompts[:2], Sampling(8, ()))  # warm-up: first-call allocations and kernel selection
    start = time.perf_counter()
    generations = backend.generate(prompts, sampling)
    seconds = time.perf_counter() - start
    tokens = sum(g.tokens for g in generations)
    adapters = len({g.route for g in generations}) if generations[0].route is not None else None
    return {"tokens": tokens, "seconds": seconds, "load_seconds": load_seconds, "prompts": len(prompts),
            "adapters": adapters, "texts": [g.text for g in generations],
            "routes": [None if g.route is None else route_name(g.route) for g in generations]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint directory (default: a random 45M Llama)")
    parser.add_argument("--adapter", default=None, help="a TuckA adapter: routed vs merged vs unmerged on its base")
    parser.add_argument("--gate-levels", type=int, default=None, help="with --adapter: served gate levels (default 5)")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--hf-batch-size", type=int, default=16)
    parser.add_argument("--dtype", default="float32" if not torch.cuda.is_available() else "bfloat16")
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--worker", choices=list(LABELS), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--merged", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT=" + json.dumps(worker(args.worker, args)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        args.work = tmp
        if args.adapter is not None:
            prepare_adapter_run(args, Path(tmp))
            names = ["vllm-routed", "vllm-merged", "hf-adapter"]
        else:
            if args.model is None:
                args.model = str(Path(tmp) / "small")
                build_small_model(Path(args.model))
            names = ["hf", "vllm"]
        results = {}
        for name in names:
            flags = {"--model": args.model, "--prompts": args.prompts, "--max-new-tokens": args.max_new_tokens}
            flags |= {"--hf-batch-size": args.hf_batch_size, "--dtype": args.dtype, "--work": tmp}
            flags["--max-model-len"] = args.max_model_len
            flags |= {k: v for k, v in (("--adapter", args.adapter), ("--merged", args.merged),
                                         ("--gate-levels", args.gate_levels)) if v is not None}  # fmt: skip
            command = [sys.executable, __file__, "--worker", name, *(str(x) for kv in flags.items() for x in kv)]
            done = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
            if done.returncode != 0:
                sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
            results[name] = json.loads(done.stdout.rsplit("RESULT=", 1)[1].splitlines()[0])

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    threads = os.environ.get("OMP_NUM_THREADS", "default")
    print(f"\n{args.prompts} GSM8K prompts, {args.max_new_tokens} new tokens, greedy, {args.dtype}, on {device},")
    print(f"transformers in batches of {args.hf_batch_size}, vLLM all at once")
    print(f"({platform.machine()}), torch {torch.__version__}, OMP_NUM_THREADS {threads}, model {args.model}")
    print()
    reference = names[1] if args.adapter is not None else names[0]
    print(f"| backend | generated tokens | generate (s) | tokens/s | tokens/s vs {LABELS[reference]} | "
          "distinct adapters | load (s) |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|")
    base = results[reference]["tokens"] / results[reference]["seconds"]
    for name in names:
        r = results[name]
        rate = r["tokens"] / r["seconds"]
        adapters = "–" if r["adapters"] is None else r["adapters"]
        cells = [LABELS[name], r["tokens"], f"{r['seconds']:.1f}", f"{rate:.0f}", f"{rate / base:.2f}", adapters]
        print("| " + " | ".join(map(str, cells)) + f" | {r['load_seconds']:.1f} |")
    if args.adapter is not None:  # the same served routes: routed vLLM should reproduce the unmerged adapter
        routed, unmerged = results["vllm-routed"], results["hf-adapter"]
        same_routes = sum(a == b for a, b in zip(routed["routes"], unmerged["routes"], strict=True))
        same_texts = sum(a == b for a, b in zip(routed["texts"], unmerged["texts"], strict=True))
        print(
            f"\nvLLM routed against transformers unmerged: the same route for {same_routes}/{args.prompts} prompts, "
            f"identical greedy completions for {same_texts}/{args.prompts}"
        )


def prepare_adapter_run(args: argparse.Namespace, work: Path) -> None:
    """``--adapter``: its base as ``--model`` (SmolLM2 offline when it is the recorded base) and its merged
    checkpoint (the default fold, in ``--dtype``) for the merged worker."""
    import peft

    from tucka_llm.export import export_merged
    from tucka_llm.recipes.smollm2 import DEFAULT_CACHE, smollm2_checkpoint
    from tucka_llm.serving import DEFAULT_GATE_LEVELS

    recorded = peft.PeftConfig.from_pretrained(args.adapter).base_model_name_or_path
    if args.model is None:
        args.model = str(smollm2_checkpoint()) if Path(recorded) == DEFAULT_CACHE else recorded
    if args.gate_levels is None:  # the same served routes for routed vLLM and unmerged transformers
        args.gate_levels = DEFAULT_GATE_LEVELS
    args.merged = str(work / "merged")
    export_merged(args.adapter, args.merged, base=args.model, dtype=args.dtype)


if __name__ == "__main__":
    main()
