"""Routing balance: the expert-group load that each router gives real held-out sequences, at initialisation over
seeds and after training, on SmolLM2-135M-Instruct.

    python bench/routing_balance.py                                   # 3 routers x 8 seeds at init; trained runs
    python bench/routing_balance.py --seeds 5 --trained 'runs/quality_small/tucka-*/train'

Calibration (DAI) is the launcher's: ``--dai-samples`` 256 random training sequences (seed = the run's seed) in
MetaMathQA form, max length 384 (the demo's), drawn from the data the pool stands for: GSM8K train for the GSM8K
pool; for the mix, half GSM8K train and half MATH test problems from position 1000 on of the fixed shuffled order
that held-out measurements use (``eval.loss.shipped_test_records``; MATH's train split is not shipped), as a
MetaMathQA-like training set would be. A third column routes the mix with the GSM8K calibration: a model
calibrated on one distribution and used on another. Routing features depend on the base model alone (the routing
layer is layer 0's q_proj), so every router and seed routes the same features, exactly as the adapter does
(``Router.route_features`` on the routing layer's state, after ``data_aware_init``). Held-out pools, disjoint from
every calibration sample: GSM8K test (the first 256 problems), and a GSM8K + MATH mix (the next 128 GSM8K test
problems and the MATH test problems at positions 0-127 of that order, which mixes MATH's subjects), in MetaMathQA
form, shuffled.

Per router, seed and pool: the load per sequence (sequence routing, as evaluation routes) and per micro-batch of 8
(batch routing, as training routes: the mean feature of 8 consecutive sequences), as group shares and entropy
(nats; ln k = uniform). After training: the trained adapters given by ``--trained`` (run directories or globs),
routed the same way with their trained centroids. The issue's target for the default router: mean entropy >=
0.9 ln k at both points, no seed below 0.75 ln k.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import statistics
from pathlib import Path

import datasets
import peft
import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

import tucka_llm
from tucka_llm.data import load_metamathqa, tokenize_metamathqa
from tucka_llm.eval.loss import shipped_test_records
from tucka_llm.loading import load_tokenizer
from tucka_llm.recipes.smollm2 import DEFAULT_CACHE, smollm2_checkpoint
from tucka_llm.tucka.calibration import calibration_batches
from tucka_llm.tucka.dai import calibration_features, routers
from tucka_llm.tucka.router import ROUTERS
from tucka_llm.tucka.routing import ActiveRoute, ExpertLoad

MAX_LEN = 384
MICRO_BATCH = 8
FIRST_SEED = 42


def shuffled(records: list[dict], seed: int) -> list[dict]:
    return [records[i] for i in torch.randperm(len(records), generator=torch.Generator().manual_seed(seed)).tolist()]


def held_out_pools() -> dict[str, list[dict[str, str]]]:
    mixed = shipped_test_records("gsm8k", 128, start=256) + shipped_test_records("math", 128)
    return {"GSM8K": shipped_test_records("gsm8k", 256), "GSM8K+MATH": shuffled(mixed, 0)}


# (column, held-out pool, calibration data)
COLUMNS = [("GSM8K", "GSM8K", "gsm8k"), ("mix", "GSM8K+MATH", "mix"), ("mix, GSM8K-calibrated", "GSM8K+MATH", "gsm8k")]


def features_of(model: torch.nn.Module, records: list[dict], tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    data = tokenize_metamathqa(datasets.Dataset.from_list(records), tokenizer, MAX_LEN).dataset
    batches = calibration_batches(data, len(data), 0, tokenizer)  # every record, in a fixed order
    (features,) = calibration_features(model, batches).values()
    return features


def loads(model: torch.nn.Module, features: torch.Tensor) -> tuple[ExpertLoad, ExpertLoad]:
    """The adapter's routes for ``features``: one per sequence, and one per micro-batch of 8 (their mean feature)."""
    (router,) = routers(model).values()
    batched = features[: len(features) // MICRO_BATCH * MICRO_BATCH].view(-1, MICRO_BATCH, features.shape[-1])
    result = []
    for rows in (features.unsqueeze(1), batched):
        # one forward per route: the redraw router draws anew for each (draw keys (0, i)), the others ignore it
        routes = [router.route_features(f.mean(0, keepdim=True), (0, i)) for i, f in enumerate(rows)]
        route = ActiveRoute(torch.cat([r.group for r in routes]), torch.cat([r.gates for r in routes]))
        counts = torch.bincount(route.group, minlength=router.k).float()
        gates = torch.zeros(router.k, router.t).index_add_(0, route.group, route.gates.float())
        result.append(ExpertLoad.from_sums(counts, gates))
    return result[0], result[1]


def summary(entropies: list[float], k: int) -> str:
    """mean [min] of the entropies, as a fraction of ln k."""
    return f"{statistics.mean(entropies) / math.log(k):.2f} [{min(entropies) / math.log(k):.2f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=8, help="DAI seeds per router at initialisation (42, 43, ...)")
    parser.add_argument("--dai-samples", type=int, default=256)
    parser.add_argument("--trained", nargs="*", default=["runs/quality_small/tucka-*/train"], help="trained runs")
    parser.add_argument("--out", type=Path, default=Path("runs/routing_balance.json"), help="all loads, as JSON")
    parser.add_argument("--model-cache", type=Path, default=DEFAULT_CACHE)
    args = parser.parse_args()
    base_dir = smollm2_checkpoint(args.model_cache)
    tokenizer = load_tokenizer(base_dir, "--model")
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    gsm8k_train = load_metamathqa("gsm8k-train")
    gsm8k_tokens = tokenize_metamathqa(gsm8k_train, tokenizer, MAX_LEN).dataset
    math_rest = shipped_test_records("math", start=1000)

    def calibration(data: str, seed: int) -> list[dict[str, torch.Tensor]]:
        if data == "gsm8k":
            return list(calibration_batches(gsm8k_tokens, args.dai_samples, seed, tokenizer))
        half = args.dai_samples // 2
        picked = torch.randperm(len(gsm8k_train), generator=torch.Generator().manual_seed(seed))[:half].tolist()
        rows = [gsm8k_train[i] for i in picked] + shuffled(math_rest, seed)[:half]
        mixed = tokenize_metamathqa(datasets.Dataset.from_list(shuffled(rows, seed)), tokenizer, MAX_LEN).dataset
        return list(calibration_batches(mixed, len(mixed), seed, tokenizer))

    records: list[dict] = []
    features: dict[str, torch.Tensor] = {}
    for router in ROUTERS:
        config = tucka_llm.TuckAConfig(target_modules=["q_proj", "v_proj"], router=router, task_type="CAUSAL_LM")
        model = peft.get_peft_model(base, config)
        if not features:
            features = {pool: features_of(model, rows, tokenizer) for pool, rows in held_out_pools().items()}
        (router_module,) = routers(model).values()
        for seed in range(FIRST_SEED, FIRST_SEED + args.seeds):
            router_module.seed = seed  # the redraw router's draws, as training sets them
            for data in ("gsm8k", "mix"):
                tucka_llm.data_aware_init(model, calibration(data, seed), seed)
                for column, pool, _ in [c for c in COLUMNS if c[2] == data]:
                    per_sequence, per_batch = loads(model, features[pool])
                    records.append({"router": router, "point": "init", "seed": seed, "column": column,
                                    "sequence": per_sequence.__dict__, "batch": per_batch.__dict__})  # fmt: skip
        base = model.unload()  # the same base for the next router

    runs = sorted({Path(p) for pattern in args.trained for p in glob.glob(pattern)})
    for run in runs:
        options = json.loads((run / "run_config.json").read_text())["options"]
        model = peft.PeftModel.from_pretrained(base, run).eval()
        for column, pool, _ in [c for c in COLUMNS if c[2] == "gsm8k"]:  # the runs trained on GSM8K
            per_sequence, per_batch = loads(model, features[pool])
            records.append({"router": options["router"], "point": f"trained {options['max_steps']} steps",
                            "seed": options["seed"], "column": column, "run": str(run),
                            "sequence": per_sequence.__dict__, "batch": per_batch.__dict__})  # fmt: skip
        base = model.unload()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(records, indent=1))

    k = tucka_llm.TuckAConfig().k
    print(f"\nRouting entropy / ln {k}: mean [worst seed]; per sequence (seq) and per micro-batch of {MICRO_BATCH}\n")
    heads = [f"{column} {mode}" for column, _, _ in COLUMNS for mode in ("seq", "batch")]
    print("| router | point | seeds | " + " | ".join(heads) + " | largest share |")
    print("|---|---|---:|" + "---:|" * (len(heads) + 1))
    keys = sorted({(r["router"], r["point"]) for r in records}, key=lambda x: (list(ROUTERS).index(x[0]), x[1]))
    for router, point in keys:
        rows = [r for r in records if (r["router"], r["point"]) == (router, point)]
        cells = [
            summary([r[mode]["entropy"] for r in rows if r["column"] == column], k) if any(
                r["column"] == column for r in rows) else "–"
            for column, _, _ in COLUMNS
            for mode in ("sequence", "batch")
        ]  # fmt: skip
        largest = max(max(r["sequence"]["fraction"]) for r in rows)
        seeds = len({r["seed"] for r in rows})
        print(f"| {router} | {point} | {seeds} | " + " | ".join(cells) + f" | {largest:.2f} |")
    print(f"\nall loads: {args.out}")


if __name__ == "__main__":
    main()
