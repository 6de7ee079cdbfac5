"""Small-scale quality over seeds: LoRA r32 and TuckA under each router on SmolLM2-135M-Instruct, same data and steps.

    python bench/quality_small.py --seeds 2                      # LoRA, TuckA centred and dai; 30 steps x 8 each
    python bench/quality_small.py --seeds 5 --variants tucka-centred           # more seeds of one variant
    python bench/quality_small.py --seeds 3 --variants lora,tucka-centred,tucka-redraw --steps 60 --held-out 100
    python bench/quality_small.py --seeds 1 --steps 2 --held-out 8 --work /tmp/q            # the pipeline only
    python bench/quality_small.py --seeds 2 --table-only                       # the table from what has finished

Each run is trained and merged by the demo's own stages (``tucka_llm.recipes.demo.training_stages``: the launcher under
DeepSpeed ZeRO-2 on 2 CPU ranks, fp32, micro-batch 4, global batch 8, the first ``steps x 8`` GSM8K training
problems in MetaMathQA form, ``--seed`` = the run's seed; export in fp32 under its default route). Adapters use the
reference settings (TuckA r16 k4 t2 p2 alpha auto = 192 at SmolLM2's width, LoRA r32 alpha 32, lr 1e-3 cosine).

Measured on the first ``--held-out`` GSM8K *test* problems in MetaMathQA form (held out from training and from the
router's calibration sample), as the mean cross-entropy per response token (prompts masked, as in training):

- the unmerged adapter, each sequence on its own route (sequence routing), and the routing load it gives them;
- TuckA: the adapter under each export fold (``expected``, ``majority``, and ``centroid`` where the router allows
  it), chosen by ``tucka_llm.export.route.choose_route`` exactly as export chooses it. Under a fixed selection the
  adapter IS the merged model (tests/test_export.py pins it to 1e-5), so the merged checkpoint that
  ``launch/export.py`` wrote (the default fold) is not evaluated again; LoRA's merge is exact likewise.

Results are cached per run (``measure.json``), so an interrupted bench continues and ``--table-only`` prints the
table of whatever has finished.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
from pathlib import Path

import torch

import tucka_llm
from tucka_llm.eval.loss import held_out_batches, held_out_loss, load_model, shipped_test_records
from tucka_llm.export.route import DEFAULT_ROUTE, ExportError, RouteSpec, choose_route
from tucka_llm.io.atomic import atomic_write_json
from tucka_llm.layout import read_metrics
from tucka_llm.loading import load_tokenizer
from tucka_llm.recipes.demo import DemoSize, training_stages
from tucka_llm.recipes.smollm2 import DEFAULT_CACHE, smollm2_checkpoint
from tucka_llm.recipes.stages import StageFailed, run_stages
from tucka_llm.report import series, trainable_parameters
from tucka_llm.tucka.router import ROUTERS

FOLDS = ("expected", "majority", "centroid")
FIRST_SEED = 42  # the launcher's default --seed; seed i of the bench is 42 + i


def held_out(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    return held_out_loss(model, batches)[0]


def measure(base: Path, run: Path, batches: list[dict[str, torch.Tensor]]) -> dict[str, object]:
    """Everything the table needs from one finished run (see the module docstring)."""
    train_losses = series(read_metrics(run / "train"), "loss")[1]
    result: dict[str, object] = {
        "train_loss_first": train_losses[0],
        "train_loss_last10": statistics.mean(train_losses[-10:]),
    }
    model = load_model(str(base), str(run / "train"))
    result["unmerged"] = held_out(model, batches)  # eval mode: each sequence on its own route
    if not isinstance(model.peft_config["default"], tucka_llm.TuckAConfig):
        result["merged"] = result["unmerged"]  # peft's LoRA merge is exact (tests/test_export.py)
        return result
    routes = tucka_llm.expert_load(model)["default"]  # the held-out sequences' routes, counted by the forwards above
    result |= {"held_out_share": routes.fraction, "held_out_entropy": routes.entropy}
    records = read_metrics(run / "train")
    groups = sorted(int(k.rsplit("group", 1)[1]) for k in records[-1] if k.startswith("expert_load/group"))
    shares = [statistics.mean(r[f"expert_load/group{g}"] for r in records) for g in groups]
    result["train_entropy"] = sum(-s * math.log(s) for s in shares if s > 0)
    folds = {}
    for fold in FOLDS:
        try:
            chosen = choose_route(model, RouteSpec.parse(fold), run / "train", None)
        except ExportError:  # centroid under the centred router: degenerate, refused
            continue
        with tucka_llm.routing(model, chosen.route):
            folds[fold] = {"loss": held_out(model, batches), "served_share": chosen.served_share}
    result["folds"] = folds
    result["merged"] = folds[DEFAULT_ROUTE]["loss"]  # what launch/export.py wrote (run / "merged"), to 1e-5
    return result


def spread(values: list[float], digits: int = 4) -> str:
    """mean ± half the range over seeds (with 2 seeds: the distance of each seed from the mean)."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {(max(values) - min(values)) / 2:.{digits}f}"


def print_tables(work: Path, variants: list[str], seeds: list[int], base_loss: float, held_out: int) -> None:
    results: dict[str, list[dict]] = {}
    for name in variants:
        done = [work / f"{name}-seed{s}" for s in seeds]
        results[name] = [
            json.loads((run / "measure.json").read_text()) | {"params": trainable_parameters(run / "train")}
            for run in done
            if (run / "measure.json").is_file()
        ]
    print(f"\nHeld-out loss: first {held_out} GSM8K test problems; mean ± half-range over seeds (n = runs finished)\n")
    print("| model | n | params | unmerged (sequence routing) | merged (default route) | unmerged vs LoRA | "
          "held-out routing entropy | training routing entropy |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| base | – | – | {base_loss:.4f} | – | – | – | – |")
    lora = [r["unmerged"] for r in results.get("lora", [])]
    for name, runs in results.items():
        if not runs:
            continue
        unmerged = [r["unmerged"] for r in runs]
        ratio = f"{statistics.mean(unmerged) / statistics.mean(lora):.3f}" if lora else "–"
        entropy = [spread([r[k] for r in runs]) if k in runs[0] else "–" for k in ("held_out_entropy", "train_entropy")]
        print(
            f"| {name} | {len(runs)} | {runs[0]['params']:,} | {spread(unmerged)} | "
            f"{spread([r['merged'] for r in runs])} | {ratio} | {entropy[0]} | {entropy[1]} |"
        )
    print("\nPer seed, unmerged held-out loss: " + "; ".join(
        f"{name} " + ", ".join(f"{r['unmerged']:.4f}" for r in runs) for name, runs in results.items() if runs
    ))  # fmt: skip
    print(f"\nTuckA export folds: held-out loss of the merged model minus the unmerged adapter's (default: "
          f"{DEFAULT_ROUTE}); in brackets, the share of calibration routes the fold serves exactly\n")  # fmt: skip
    print("| model | " + " | ".join(FOLDS) + " |")
    print("|---|" + "---:|" * len(FOLDS))
    for name, runs in results.items():
        if not runs or "folds" not in runs[0]:
            continue
        cells = []
        for fold in FOLDS:
            gaps = [r["folds"][fold]["loss"] - r["unmerged"] for r in runs if fold in r["folds"]]
            shares = [r["folds"][fold]["served_share"] for r in runs if fold in r["folds"]]
            served = "" if not shares or shares[0] is None else f" ({statistics.mean(shares):.2f})"
            cells.append(f"{spread(gaps)}{served}" if gaps else "refused")
        print(f"| {name} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=2, help="runs per variant (seeds 42, 43, ...)")
    parser.add_argument(
        "--variants", default="lora,tucka-centred,tucka-dai", help="lora and tucka-ROUTER runs, in this order"
    )
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps of 8 sequences per run")
    parser.add_argument("--held-out", type=int, default=48, help="GSM8K test problems for the held-out loss")
    parser.add_argument("--work", type=Path, default=Path("runs/quality_small"))
    parser.add_argument("--model-cache", type=Path, default=DEFAULT_CACHE, help="where SmolLM2 is converted to")
    parser.add_argument("--table-only", action="store_true", help="print the table of the runs that have finished")
    args = parser.parse_args()
    base = smollm2_checkpoint(args.model_cache)
    work = args.work.resolve()
    size = DemoSize(steps=args.steps, problems=0, max_new_tokens=0)
    variants: dict[str, tuple[str, list[object]]] = {}
    for name in args.variants.split(","):
        if name != "lora" and name.removeprefix("tucka-") not in ROUTERS:
            parser.error(f"--variants: unknown {name!r}; give lora or tucka-ROUTER ({', '.join(ROUTERS)}).")
        variants[name] = ("lora", []) if name == "lora" else ("tucka", ["--router", name.removeprefix("tucka-")])
    seeds = [FIRST_SEED + i for i in range(args.seeds)]
    batches = held_out_batches(shipped_test_records("gsm8k", args.held_out), load_tokenizer(base, "--model"))
    base_record = work / "base-measure.json"
    if not base_record.is_file():
        work.mkdir(parents=True, exist_ok=True)
        atomic_write_json(base_record, {"loss": held_out(load_model(str(base)), batches)})
    base_loss = json.loads(base_record.read_text())["loss"]

    if not args.table_only:
        for seed in seeds:  # seed by seed, so that a stopped bench has every variant at the first seeds
            for name, (method, flags) in variants.items():
                run = work / f"{name}-seed{seed}"
                stages = training_stages(method, base, run, size, [*flags, "--seed", seed])
                stages = [dataclasses.replace(s, name=f"{name}-seed{seed}-{s.name}") for s in stages]
                try:
                    run_stages(stages, work / "logs")
                except StageFailed as error:
                    sys.exit(f"error: {error}")
                if not (run / "measure.json").is_file():
                    atomic_write_json(run / "measure.json", measure(base, run, batches))
                    print(f"measured {run.name}", flush=True)
                print_tables(work, list(variants), seeds, base_loss, args.held_out)
    print_tables(work, list(variants), seeds, base_loss, args.held_out)


if __name__ == "__main__":
    main()
