"""What quantising a TuckA route's gates costs (routed serving's ``--gate-levels``), against exact gates.

    python bench/gate_levels.py --adapters runs/quality_small/tucka-centred-seed42/train,runs/quality_small/\
tucka-centred-seed43/train
    python bench/gate_levels.py --adapters RUN --levels 1,3,5 --held-out 16 --prompts 8      # a quick look

For each trained TuckA adapter (on SmolLM2-135M-Instruct unless ``--base``), unmerged, each sequence on its own route
(sequence routing), with exact gates and with gates quantised to each of ``--levels`` values (``Router.quantise``,
what ``eval --backend vllm`` serves; the same inside the model through ``tucka_llm.routing(..., gate_levels=L)``):

- held-out loss: mean cross-entropy per response token on the first ``--held-out`` GSM8K test problems' reference
  solutions in MetaMathQA form (``tucka_llm.eval.loss``, as in bench/quality_small.py);
- greedy agreement: the first ``--prompts`` GSM8K test prompts (MetaMath's), ``--max-new-tokens`` greedy tokens by
  the hf backend, no stop strings: the share of completions identical to the exact-gate ones, and the mean share of
  the exact-gate completion's characters before the first difference;
- served routes: distinct (group, gates) routes, i.e. LoRA adapters, over all 1,319 GSM8K test prompts (the prompt
  router), and the largest change of a gate.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from quality_small import spread  # a bench/ sibling: this script runs as python bench/gate_levels.py
from transformers import AutoTokenizer

from tucka_llm.eval.backends import HFBackend, Sampling
from tucka_llm.eval.loss import held_out_batches, held_out_loss, shipped_test_records
from tucka_llm.eval.problems import load_problems
from tucka_llm.eval.run import EvalOptions
from tucka_llm.recipes.smollm2 import smollm2_checkpoint
from tucka_llm.serving import PromptRouter
from tucka_llm.tucka.model import routing


def agreement(completions: list[str], exact: list[str]) -> tuple[float, float]:
    """(share of identical completions, mean share of the exact-gate completion's characters before the first
    difference)."""
    identical, prefix = 0, []
    for text, reference in zip(completions, exact, strict=True):
        identical += text == reference
        same = len(os.path.commonprefix([text, reference]))  # noqa: RUF071 (a character prefix is what is wanted)
        prefix.append(same / max(len(reference), 1))
    return identical / len(exact), statistics.mean(prefix)


def measure(base: str, adapter: str, levels: list[int | None], args: argparse.Namespace) -> dict[int | None, dict]:
    """Every row's numbers for one adapter; ``None`` in ``levels`` is exact gates."""
    backend = HFBackend(base, adapter=adapter, dtype="float32", batch_size=args.batch_size)
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    batches = held_out_batches(shipped_test_records("gsm8k", args.held_out), tokenizer)
    options = EvalOptions(task="gsm8k", model=base, data="gsm8k")
    questions = [options.prompt(p.question) for p in load_problems("gsm8k", "gsm8k")]
    token_ids = [tokenizer(q)["input_ids"] for q in questions]
    exact_routes = PromptRouter.from_model(backend.model).routes(token_ids)
    greedy = Sampling(args.max_new_tokens, ())
    results: dict[int | None, dict] = {}
    for level in levels:
        started = time.perf_counter()
        with routing(backend.model, "sequence", level):
            loss = held_out_loss(backend.model, batches)[0]
        backend.gate_levels = level
        texts = [g.text for g in backend.generate(questions[: args.prompts], greedy)]
        routes = PromptRouter.from_model(backend.model, level).routes(token_ids)
        change = max(max(abs(a - b) for a, b in zip(r.gates, e.gates, strict=True))
                     for r, e in zip(routes, exact_routes, strict=True))  # fmt: skip
        results[level] = {"loss": loss, "texts": texts, "routes": len(set(routes)), "gate_change": change}
        print(f"{adapter} levels {level or 'exact'}: loss {loss:.5f}, {len(set(routes))} routes "
              f"({time.perf_counter() - started:.0f} s)", flush=True)  # fmt: skip
    for level in levels:
        results[level]["identical"], results[level]["prefix"] = agreement(
            results[level]["texts"], results[None]["texts"]
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapters", required=True, help="trained TuckA adapters (launch/train.py outputs), commas")
    parser.add_argument("--base", default=None, help="their base model (default: SmolLM2-135M-Instruct, offline)")
    parser.add_argument("--levels", default="1,2,3,5,9", help="gate levels to compare with exact gates")
    parser.add_argument("--held-out", type=int, default=48)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    base = args.base or str(smollm2_checkpoint())
    levels: list[int | None] = [None, *(int(x) for x in args.levels.split(","))]
    runs = [measure(base, adapter, levels, args) for adapter in args.adapters.split(",")]

    print(f"\n{len(runs)} adapter(s) on {Path(base).name}; held-out loss on {args.held_out} GSM8K test solutions; "
          f"greedy agreement on {args.prompts} GSM8K test prompts x {args.max_new_tokens} tokens; routes over 1,319 "
          f"GSM8K test prompts; {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")  # fmt: skip
    print("cells: mean ± half the range over the adapters\n")
    print("| gate levels | served routes | largest gate change | held-out loss | vs exact | identical greedy "
          "completions | characters before the first difference |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|")
    for level in levels:
        rows = [run[level] for run in runs]
        delta = [row["loss"] - run[None]["loss"] for row, run in zip(rows, runs, strict=True)]
        cells = [
            "exact" if level is None else str(level),
            spread([r["routes"] for r in rows], 1),
            spread([r["gate_change"] for r in rows], 3),
            spread([r["loss"] for r in rows], 4),
            "–" if level is None else f"{spread(delta, 4)}",
            spread([r["identical"] for r in rows], 2),
            spread([r["prefix"] for r in rows], 2),
        ]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
