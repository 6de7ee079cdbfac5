"""Small-scale quality on SmolLM2-135M-Instruct: each method at its own best learning rate, at equal parameters, on
diverse data (GSM8K and MATH), over seeds; and whether TuckA's expert groups specialise by data source.

    python bench/quality_small.py                                     # the grid: 3 methods x 3 lrs x 2 seeds (+3rd)
    python bench/quality_small.py --table-only                        # the tables of the runs that have finished
    python bench/quality_small.py --variants lora,tucka-centred,tucka-dai --lrs 1e-3 --data-mix gsm8k --max-len 384 \\
        --steps 30 --work runs/quality_gsm8k                          # the earlier one-rate GSM8K-only comparison
    python bench/quality_small.py --seeds 1 --lrs 1e-3 --steps 2 --held-out 8 --work /tmp/q   # the pipeline only

Variants: ``lora`` (LoRA r32, alpha 32: the paper's baseline), ``lora-matched`` (LoRA at the rank whose trainable
parameters come closest to TuckA r16 k4 t2 p2's on this model, alpha = rank so that alpha / r = 1 as for r32) and
``tucka-ROUTER`` (TuckA r16 k4 t2 p2, alpha auto, the router named). Each run is trained by the launcher
(``tucka_llm.recipes.demo.train``: DeepSpeed ZeRO-2 on 2 CPU ranks, fp32, micro-batch 4, global batch 8, cosine,
``--seed`` = the run's seed) on the same ``steps x 8`` records, written once to WORK/train-data.jsonl:

- ``gsm8k``: GSM8K training problems, from the first, in MetaMathQA form;
- ``math``: MATH problems in MetaMathQA form (solution, then "The answer is: X"). MATH's training split is not shipped,
  so these are MATH *test* problems: those at positions 1,000 and later of the fixed shuffled order that held-out
  measurements use (``eval.loss.shipped_test_records``: the file is sorted by subject, the order mixes them), never
  one of MATH-500 (the MATH evaluation set). The held-out MATH problems come from positions 0-999, so no held-out
  problem is trained on.

With ``--data-mix gsm8k,math`` the two alternate (half each). Held out: the first ``--held-out`` GSM8K test problems
and the first ``--held-out`` MATH problems of the held-out positions, as the mean cross-entropy per response token
(prompts masked, as in training), per source and over both (token-weighted). Measured on the unmerged adapter, each
sequence on its own route; for TuckA also under export's ``expected`` fold (the merged checkpoint, to 1e-5: see
tests/test_export.py) and under each single group (``--route group:I``, the group's mean calibration gates), with
the group each held-out sequence takes per source and the mutual information between source and group.

Runs go seed by seed (every cell at the first seed, then at the second), then a third seed for the two best learning
rates of any variant whose two best cells' seed ranges overlap. Results are cached per run (``measure.json``), so an
interrupted bench continues and ``--table-only`` prints the tables of whatever has finished.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import statistics
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import peft
import torch
from safetensors import safe_open
from scipy import stats
from transformers import AutoConfig, AutoModelForCausalLM

import tucka_llm
from tucka_llm.data import asset_path, gsm8k_train_metamathqa
from tucka_llm.eval.loss import held_out_batches, held_out_loss, load_model, shipped_test_records
from tucka_llm.export.route import RouteSpec, choose_route
from tucka_llm.io.atomic import atomic_write_json, atomic_write_text
from tucka_llm.layout import ADAPTER_WEIGHTS, read_metrics
from tucka_llm.loading import load_tokenizer
from tucka_llm.models import lora_width
from tucka_llm.recipes.demo import DemoSize, train
from tucka_llm.recipes.smollm2 import DEFAULT_CACHE, smollm2_checkpoint
from tucka_llm.recipes.stages import StageFailed, run_stages
from tucka_llm.report import series, trainable_parameters
from tucka_llm.tucka.calibration import ROUTER_CALIBRATION, load_router_calibration
from tucka_llm.tucka.router import ROUTERS

SOURCES = ("gsm8k", "math")
FIRST_SEED = 42  # the launcher's default --seed; seed i of the bench is 42 + i
MATH_HELD_OUT_POSITIONS = 1000  # MATH problems at these positions of the permutation are never trained on
LORA_R, LORA_ALPHA = 32, 32.0  # the paper's LoRA baseline


@dataclass(frozen=True)
class Variant:
    """One adapter setting of the grid: its name, method and ``tucka train`` flags."""

    name: str
    method: str
    flags: tuple[object, ...]


def tucka_parameters(base: Path) -> int:
    """Trainable parameters of TuckA with the launcher's defaults (r16 k4 t2 p2, q_proj and v_proj) on ``base``,
    counted on a model built on the meta device (no weights read)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base))
        tucka = peft.get_peft_model(model, tucka_llm.TuckAConfig(target_modules=["q_proj", "v_proj"], seed=0))
    return sum(p.numel() for p in tucka.parameters() if p.requires_grad)


def variants(names: Iterable[str], base: Path) -> list[Variant]:
    """The ``--variants`` named, with their flags; ``lora-matched`` gets the rank closest to TuckA's parameters."""
    out = []
    for name in names:
        if name == "lora":
            out.append(Variant(name, "lora", ("--lora-r", LORA_R, "--lora-alpha", LORA_ALPHA)))
        elif name == "lora-matched":
            rank = max(1, round(tucka_parameters(base) / lora_width(AutoConfig.from_pretrained(base))))
            out.append(Variant(name, "lora", ("--lora-r", rank, "--lora-alpha", float(rank))))
        elif name.removeprefix("tucka-") in ROUTERS and name.startswith("tucka-"):
            out.append(Variant(name, "tucka", ("--router", name.removeprefix("tucka-"))))
        else:
            raise ValueError(f"unknown {name!r}; give lora, lora-matched or tucka-ROUTER ({', '.join(ROUTERS)})")
    return out


def math_pools() -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """MATH test problems in MetaMathQA form, split (see the module docstring): (held-out, training)."""
    math500_lines = asset_path("math", "math500_test.jsonl").read_text(encoding="utf-8").splitlines()
    math500 = {json.loads(line)["problem"] for line in math500_lines}
    records = shipped_test_records("math")
    held_out = records[:MATH_HELD_OUT_POSITIONS]
    return held_out, [r for r in records[MATH_HELD_OUT_POSITIONS:] if r["query"] not in math500]


def training_records(mix: list[str], count: int) -> list[dict[str, str]]:
    """``count`` training records, the sources of ``mix`` alternating (each from its first record)."""
    pools = {"gsm8k": gsm8k_train_metamathqa(), "math": math_pools()[1]}
    streams = [iter(pools[source]) for source in mix]
    return [next(streams[i % len(streams)]) for i in range(count)]


def held_out_records(count: int) -> dict[str, list[dict[str, str]]]:
    """The held-out problems of each source (see the module docstring), in MetaMathQA form."""
    return {"gsm8k": shipped_test_records("gsm8k", count), "math": math_pools()[0][:count]}


Batches = dict[str, list[dict[str, torch.Tensor]]]


def per_source(measured: dict[str, tuple[float, int]]) -> dict[str, float]:
    """Held-out loss per source and ``all`` (token-weighted) from each source's (loss, response tokens)."""
    out = {source: loss for source, (loss, _) in measured.items()}
    out["all"] = sum(loss * n for loss, n in measured.values()) / sum(n for _, n in measured.values())
    return out


def losses(model: torch.nn.Module, batches: Batches) -> dict[str, float]:
    """Held-out loss per source and ``all`` (token-weighted over the sources)."""
    return per_source({source: held_out_loss(model, b) for source, b in batches.items()})


def mutual_information(counts: dict[str, list[int]]) -> float:
    """I(source; group) in nats from the route counts per source and group."""
    total = sum(sum(c) for c in counts.values())
    groups = [sum(col) for col in zip(*counts.values(), strict=True)]
    mi = 0.0
    for row in counts.values():
        for g, n in enumerate(row):
            if n:
                mi += n / total * math.log(n * total / (sum(row) * groups[g]))
    return mi


def chance_mutual_information(counts: dict[str, list[int]], draws: int = 1000) -> tuple[float, float]:
    """Mean and 95th percentile of I(source; group) when the same sequences' sources are shuffled (seed 0): what a
    router blind to the source shows with this many sequences, since the plug-in estimate is biased upwards."""
    groups = [g for row in counts.values() for g, n in enumerate(row) for _ in range(n)]
    sources = [s for s, row in counts.items() for _ in range(sum(row))]
    rng = random.Random(0)
    values = []
    for _ in range(draws):
        rng.shuffle(sources)
        shuffled = {s: [0] * len(next(iter(counts.values()))) for s in counts}
        for s, g in zip(sources, groups, strict=True):
            shuffled[s][g] += 1
        values.append(mutual_information(shuffled))
    values.sort()
    return statistics.mean(values), values[int(0.95 * draws)]


def router_movement(train_dir: Path) -> float | None:
    """||E - E0|| / ||E0||: how far training moved the router's centroids E from where DAI set them (None for a
    router without DAI centroids). Routes change only when E moves against its own scale."""
    initial = load_router_calibration(train_dir / ROUTER_CALIBRATION, "default").dai_init
    if initial is None:
        return None
    with safe_open(str(train_dir / ADAPTER_WEIGHTS), framework="pt") as weights:
        (key,) = [k for k in weights.keys() if k.endswith("tucka_router.centroids")]  # noqa: SIM118
        trained = weights.get_tensor(key).float()
    return float((trained - initial).norm() / initial.norm())


def measure(base: Path, train_dir: Path, batches: Batches) -> dict[str, object]:
    """Everything the tables need from one finished run (see the module docstring)."""
    train_losses = series(read_metrics(train_dir), "loss")[1]
    model = load_model(str(base), str(train_dir))
    result: dict[str, object] = {"train_loss_last10": statistics.mean(train_losses[-10:])}
    if not isinstance(model.peft_config["default"], tucka_llm.TuckAConfig):
        result["unmerged"] = losses(model, batches)
        return result
    tucka_llm.expert_load(model)  # reset the route counters
    measured, counts = {}, {}
    for source, source_batches in batches.items():
        measured[source] = held_out_loss(model, source_batches)
        counts[source] = tucka_llm.expert_load(model)["default"].counts  # one route per held-out sequence
    result |= {"unmerged": per_source(measured), "route_counts": counts}
    result["mutual_information"] = mutual_information(counts)
    routes = {"expected": RouteSpec.parse("expected")}
    k = len(next(iter(counts.values())))
    routes |= {f"group{g}": RouteSpec.parse(f"group:{g}") for g in range(k)}
    result["routes"] = {}
    for name, spec in routes.items():
        chosen = choose_route(model, spec, train_dir, None)
        if name != "expected" and not chosen.served_share:
            continue  # no calibration sequence took this group: it has no mean gates to fold
        with tucka_llm.routing(model, chosen.route):
            result["routes"][name] = losses(model, batches) | {"calibration_share": chosen.served_share}
    return result


def mean_sd(values: list[float], digits: int = 4) -> str:
    """mean ± sample standard deviation (the mean alone for one value)."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def run_name(variant: str, lr: float, seed: int) -> str:
    return f"{variant}-lr{lr:g}-seed{seed}"


def finished(work: Path, variant: str, lr: float) -> list[dict]:
    """The measurements of the finished runs of one cell, by seed."""
    runs = sorted(work.glob(f"{variant}-lr{lr:g}-seed*/measure.json"))  # run_name's directories
    return [json.loads(p.read_text()) | {"seed": int(p.parent.name.rsplit("seed", 1)[1])} for p in runs]


def cell_losses(work: Path, variant: str, lr: float, key: str = "all") -> list[float]:
    return [r["unmerged"][key] for r in finished(work, variant, lr)]


def ranked_cells(work: Path, variant: str, lrs: list[float]) -> list[float]:
    """The learning rates with finished runs, best (lowest mean held-out loss over both sources) first."""
    measured = [lr for lr in lrs if cell_losses(work, variant, lr)]
    return sorted(measured, key=lambda lr: statistics.mean(cell_losses(work, variant, lr)))


def close_call(work: Path, variant: str, lrs: list[float]) -> list[float]:
    """The two best learning rates of ``variant`` when their seed ranges overlap (a third seed is due), else []."""
    ranked = ranked_cells(work, variant, lrs)
    if len(ranked) < 2:
        return []
    (a, b) = (cell_losses(work, variant, lr) for lr in ranked[:2])
    return ranked[:2] if min(b) <= max(a) else []


def welch(first: list[float], second: list[float]) -> str:
    """Welch's t of first - second, its degrees of freedom and two-sided p ("–" without 2 runs on each side)."""
    if min(len(first), len(second)) < 2:
        return "– | – | –"
    test = stats.ttest_ind(first, second, equal_var=False)
    return f"{test.statistic:+.2f} | {test.df:.1f} | {test.pvalue:.2f}"


def tables(work: Path, names: list[str], lrs: list[float], mix: list[str], base_losses: dict[str, float]) -> str:
    """The bench's tables (markdown) from the runs finished in ``work``."""
    sources = [*mix, "all"] if len(mix) > 1 else mix
    lines = [
        "Held-out loss (mean cross-entropy per response token), mean ± standard deviation over seeds, unmerged "
        "adapter (TuckA: each sequence on its own route); * = the variant's best learning rate\n",
        "| variant | params | lr | n | " + " | ".join(sources) + " | last-10 training loss |",
        "|---|---:|---:|---:|" + "---:|" * (len(sources) + 1),
        "| base | – | – | – | " + " | ".join(f"{base_losses[s]:.4f}" for s in sources) + " | – |",
    ]
    best: dict[str, float] = {}
    key = "all" if len(mix) > 1 else mix[0]
    for name in names:
        ranked = ranked_cells(work, name, lrs)
        if ranked:
            best[name] = ranked[0]
        for lr in lrs:
            runs = finished(work, name, lr)
            if not runs:
                continue
            params = trainable_parameters(work / run_name(name, lr, runs[0]["seed"]) / "train")
            cells = [mean_sd([r["unmerged"][s] for r in runs]) for s in sources]
            star = "*" if best.get(name) == lr else ""
            lines.append(
                f"| {name} | {params:,} | {lr:g}{star} | {len(runs)} | " + " | ".join(cells) + " | "
                f"{mean_sd([r['train_loss_last10'] for r in runs], 3)} |"
            )
    if best:
        reference = next(iter(best))
        lines += [
            f"\nEach variant at its own best learning rate, against {reference} at its best ({key} held-out loss; "
            "difference of the means; Welch's t, its degrees of freedom and two-sided p)\n",
            "| variant | best lr | n | loss | minus " + reference + " | Welch t | df | p |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        ref = cell_losses(work, reference, best[reference], key)
        for name, lr in best.items():
            mine = cell_losses(work, name, lr, key)
            diff = statistics.mean(mine) - statistics.mean(ref)
            test = welch(mine, ref) if name != reference else "– | – | –"
            lines.append(f"| {name} | {lr:g} | {len(mine)} | {mean_sd(mine)} | {diff:+.4f} | {test} |")
        pairs = [(a, b) for a in best for b in best if a.startswith("tucka") and b.startswith("lora")]
        if pairs:
            lines += ["\nTuckA against each LoRA at their best rates\n", "| pair | difference | Welch t | df | p |",
                      "|---|---:|---:|---:|---:|"]  # fmt: skip
            for a, b in pairs:
                first, second = cell_losses(work, a, best[a], key), cell_losses(work, b, best[b], key)
                diff = statistics.mean(first) - statistics.mean(second)
                lines.append(f"| {a} - {b} | {diff:+.4f} | {welch(first, second)} |")
    lines += specialisation(work, names, lrs, mix)
    return "\n".join(lines)


def specialisation(work: Path, names: list[str], lrs: list[float], mix: list[str]) -> list[str]:
    """Per TuckA run: group shares per source, I(source; group), and the loss per source under each route."""
    runs = [(n, lr, r) for n in names if n.startswith("tucka") for lr in lrs for r in finished(work, n, lr)]
    if not runs:
        return []
    ceiling = math.log(len(mix))
    lines = [
        f"\nTuckA: the group each held-out sequence takes, per source (shares), and the mutual information between "
        f"source and group (nats; at most H(source) = ln {len(mix)} = {ceiling:.3f} with equal sources; chance: its "
        "mean and 95th percentile with the sources shuffled); E moved: ||E - E_DAI|| / ||E_DAI||, the router's "
        "centroids after training against where DAI set them\n",
        "| run | " + " | ".join(f"{s} shares" for s in mix) + " | I(source; group) | chance (mean, 95%) | E moved |",
        "|---|" + "---|" * len(mix) + "---:|---:|---:|",
    ]
    for name, lr, r in runs:
        shares = []
        for s in mix:
            counts = r["route_counts"][s]
            shares.append(" / ".join(f"{c / sum(counts):.2f}" for c in counts))
        chance = chance_mutual_information(r["route_counts"])
        moved = router_movement(work / run_name(name, lr, r["seed"]) / "train")
        lines.append(
            f"| {name} lr {lr:g} seed {r['seed']} | " + " | ".join(shares) + f" | {r['mutual_information']:.3f} | "
            f"{chance[0]:.3f}, {chance[1]:.3f} | " + ("–" if moved is None else f"{moved:.1e}") + " |"
        )
    lines += [
        "\nTuckA: held-out loss per source under its own routes (unmerged), under the `expected` fold (the merged "
        "model) and under each single group (its mean calibration gates; in brackets its share of the calibration "
        "routes); a group no calibration sequence took is left out\n",
        "| run | source | own routes | expected | single groups |",
        "|---|---|---:|---:|---|",
    ]
    for name, lr, r in runs:
        for s in mix:
            groups = [
                f"g{key.removeprefix('group')} {v[s]:.4f} ({v['calibration_share']:.2f})"
                for key, v in r["routes"].items()
                if key.startswith("group")
            ]
            lines.append(
                f"| {name} lr {lr:g} seed {r['seed']} | {s} | {r['unmerged'][s]:.4f} | "
                f"{r['routes']['expected'][s]:.4f} | " + ", ".join(groups) + " |"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default="lora,lora-matched,tucka-centred",
                        help="lora, lora-matched and tucka-ROUTER runs")  # fmt: skip
    parser.add_argument("--lrs", default="3e-4,1e-3,3e-3", help="peak learning rates, comma-separated")
    parser.add_argument("--data-mix", default="gsm8k,math", help="training and held-out sources: gsm8k, math or both")
    parser.add_argument("--seeds", type=int, default=2, help="runs per cell (seeds 42, 43, ...)")
    parser.add_argument("--no-third-seed", action="store_true", help="no third seed for close best cells")
    parser.add_argument("--steps", type=int, default=24, help="optimizer steps of 8 sequences per run")
    parser.add_argument("--max-len", type=int, default=256, help="tokens per training and held-out sequence")
    parser.add_argument("--held-out", type=int, default=48, help="held-out problems per source")
    parser.add_argument("--work", type=Path, default=Path("runs/quality_small"))
    parser.add_argument("--model-cache", type=Path, default=DEFAULT_CACHE, help="where SmolLM2 is converted to")
    parser.add_argument("--table-only", action="store_true", help="print the tables of the runs that have finished")
    args = parser.parse_args()
    mix = args.data_mix.split(",")
    if not mix or any(s not in SOURCES for s in mix) or len(set(mix)) != len(mix):
        parser.error(f"--data-mix {args.data_mix}: give sources from {', '.join(SOURCES)}, each once")
    if not 1 <= args.held_out <= MATH_HELD_OUT_POSITIONS:
        parser.error(f"--held-out {args.held_out}: give 1 to {MATH_HELD_OUT_POSITIONS} (the held-out MATH positions)")
    try:
        lrs = [float(lr) for lr in args.lrs.split(",")]
    except ValueError:
        parser.error(f"--lrs {args.lrs}: give numbers separated by commas, e.g. 3e-4,1e-3,3e-3")
    base = smollm2_checkpoint(args.model_cache)
    try:
        grid = variants(args.variants.split(","), base)
    except ValueError as error:
        parser.error(f"--variants: {error}")
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    size = DemoSize(steps=args.steps, problems=0, max_new_tokens=0)
    data = work / "train-data.jsonl"
    if not data.is_file():
        records = training_records(mix, args.steps * 8)
        atomic_write_text(data, "".join(json.dumps(r) + "\n" for r in records))
    tokenizer = load_tokenizer(base, "--model")
    held = held_out_records(args.held_out)
    batches = {s: held_out_batches(held[s], tokenizer, args.max_len) for s in mix}
    base_record = work / "base-measure.json"
    if not base_record.is_file():
        atomic_write_json(base_record, losses(load_model(str(base)), batches))
    base_losses = json.loads(base_record.read_text())
    names = [v.name for v in grid]

    def run(variant: Variant, lr: float, seed: int) -> None:
        out = work / run_name(variant.name, lr, seed)
        if (out / "measure.json").is_file():
            return
        flags = [*variant.flags, "--lr", lr, "--seed", seed, "--max-len", args.max_len]
        stage = train(variant.method, base, out / "train", size, flags, data=data)
        stage = dataclasses.replace(stage, name=out.name)
        try:
            run_stages([stage], work / "logs")
        except StageFailed as error:
            sys.exit(f"error: {error}")
        atomic_write_json(out / "measure.json", measure(base, out / "train", batches))
        print(tables(work, names, lrs, mix, base_losses), flush=True)

    if not args.table_only:
        for seed in range(FIRST_SEED, FIRST_SEED + args.seeds):  # seed by seed: a stopped bench has every cell
            for variant in grid:
                for lr in lrs:
                    run(variant, lr, seed)
        if not args.no_third_seed:
            for variant in grid:
                for lr in close_call(work, variant.name, lrs):
                    for seed in range(FIRST_SEED, FIRST_SEED + max(3, args.seeds)):
                        run(variant, lr, seed)
    print(tables(work, names, lrs, mix, base_losses))


if __name__ == "__main__":
    main()
