"""Small-scale quality: TuckA, LoRA and DoRA on SmolLM2-135M-Instruct with equal steps and data, side by side.

    python bench/quality_small.py                          # 60 steps x 8 sequences each, 100 held-out, 40 problems
    python bench/quality_small.py --steps 2 --held-out 4 --problems 2 --max-new-tokens 8      # the pipeline only

Each adapter is trained, merged and evaluated by the demo's own stages (``tucka_llm.demo.adapter_stages``: the
launcher under DeepSpeed ZeRO-2 on 2 CPU ranks, fp32, micro-batch 4, global batch 8, the first ``steps x 8`` GSM8K
training problems in MetaMathQA form, merged in fp32, GSM8K on the first ``--problems`` test problems with vLLM).
The adapters use the reference settings (TuckA r16 k4 t2 p2, LoRA/DoRA r32 alpha 32, lr 1e-3 cosine). TuckA runs
twice: with the reference alpha 512 and with alpha scaled to the model's width (see ``width_scaled_alpha``).

For the base model and each merged model the held-out loss is measured in this process: the mean cross-entropy per
response token (prompts masked, as in training) on the first ``--held-out`` GSM8K *test* problems in MetaMathQA form.
The paper's claim to hold against: TuckA at about a quarter of LoRA's parameters matching or beating it. Stages whose
outputs exist are skipped, so an interrupted run continues.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
from pathlib import Path

import datasets
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    PreTrainedTokenizerBase,
)

from tucka_llm.data import asset_path, gsm8k_to_metamathqa, tokenize_metamathqa
from tucka_llm.demo import DemoSize, adapter_stages, evaluate_stage
from tucka_llm.report import read_metrics, series, trainable_parameters
from tucka_llm.smollm2 import DEFAULT_CACHE, smollm2_checkpoint
from tucka_llm.stages import Stage, StageFailed, report_stage, run_stages

REFERENCE_ALPHA, REFERENCE_WIDTH = 512.0, 4096  # TuckA's alpha for Llama-2-7B (hidden size 4096)
MAX_LEN = 384  # as the demo trains


def width_scaled_alpha(model: Path) -> float:
    """The reference alpha carried to this model's hidden size d: 512 * sqrt(d / 4096).

    TuckA divides U, C and G by their Frobenius norms, so for an input x the update alpha * x U M U^T has a size
    relative to x of about alpha / (r * sqrt(d)): the same alpha is a larger relative change on a narrower model
    (2.7x larger at SmolLM2's d = 576 than at 4096). Scaling alpha by sqrt(d / 4096) keeps the reference's ratio.
    """
    width = AutoConfig.from_pretrained(model).hidden_size
    return float(round(REFERENCE_ALPHA * math.sqrt(width / REFERENCE_WIDTH)))


def held_out_batches(tokenizer: PreTrainedTokenizerBase, count: int) -> list[dict[str, torch.Tensor]]:
    """The first ``count`` GSM8K test problems in MetaMathQA form, tokenised as training does, in batches of 8."""
    tokenizer.padding_side = "right"  # positions count from the first token, as in training
    with asset_path("gsm8k", "test.jsonl").open(encoding="utf-8") as f:
        records = [gsm8k_to_metamathqa(json.loads(line)) for _, line in zip(range(count), f, strict=False)]
    data = tokenize_metamathqa(datasets.Dataset.from_list(records), tokenizer, MAX_LEN).dataset
    collate = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)
    return [collate([data[i] for i in range(start, min(start + 8, len(data)))]) for start in range(0, len(data), 8)]


@torch.no_grad()
def held_out_loss(model_dir: Path, batches: list[dict[str, torch.Tensor]]) -> float:
    """Mean cross-entropy per response token (prompts masked, as in training) of a model over ``batches``."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    total, tokens = 0.0, 0
    for batch in batches:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        total += float(
            torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum"
            )
        )
        tokens += int((labels != -100).sum())
    return total / tokens


def variants(base: Path, alphas: list[float] | None) -> dict[str, tuple[str, list[object]]]:
    """Directory name -> (method, extra training flags): TuckA once per alpha, then LoRA and DoRA."""
    alphas = alphas or [REFERENCE_ALPHA, width_scaled_alpha(base)]
    runs: dict[str, tuple[str, list[object]]] = {f"tucka-alpha{a:g}": ("tucka", ["--alpha", a]) for a in alphas}
    return runs | {"lora": ("lora", []), "dora": ("dora", [])}


def prefixed(prefix: str, stages: list[Stage]) -> list[Stage]:
    """The stages with ``prefix-`` in front of their names, so that each variant's logs have their own files."""
    return [dataclasses.replace(stage, name=f"{prefix}-{stage.name}") for stage in stages]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps of 8 sequences per adapter")
    parser.add_argument("--held-out", type=int, default=100, help="GSM8K test problems for the held-out loss")
    parser.add_argument("--problems", type=int, default=40, help="GSM8K test problems generated and scored")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument(
        "--tucka-alphas",
        type=lambda text: [float(a) for a in text.split(",")],
        default=None,
        help="comma-separated TuckA alphas, one run each (default: 512 and 512 * sqrt(hidden size / 4096))",
    )
    parser.add_argument("--work", type=Path, default=Path("runs/quality_small"))
    parser.add_argument("--model-cache", type=Path, default=DEFAULT_CACHE, help="where SmolLM2 is converted to")
    args = parser.parse_args()
    base = smollm2_checkpoint(args.model_cache)
    work = args.work.resolve()
    size = DemoSize(steps=args.steps, problems=args.problems, max_new_tokens=args.max_new_tokens)
    runs = variants(base, args.tucka_alphas)

    stages = [evaluate_stage("base-evaluate", base, work / "base" / "eval", size)]
    for name, (method, flags) in runs.items():
        stages += prefixed(name, adapter_stages(method, base, work / name, size, flags))
    directories = [*(work / name / "train" for name in runs), *(work / name / "eval" for name in ["base", *runs])]
    stages.append(report_stage(directories, work / "report"))
    try:
        run_stages(stages, work / "logs")
    except StageFailed as error:
        sys.exit(f"error: {error}")

    # Every merged model carries the base's tokenizer (export copies it), so the held-out data is tokenised once.
    batches = held_out_batches(AutoTokenizer.from_pretrained(base), args.held_out)
    losses = {
        name: held_out_loss(base if name == "base" else work / name / "merged", batches) for name in ["base", *runs]
    }
    params = {name: trainable_parameters(work / name / "train") for name in runs}
    print(f"\nSmolLM2-135M-Instruct, {args.steps} steps x 8 sequences of GSM8K train each; held-out loss on the")
    print(f"first {args.held_out} GSM8K test problems; accuracy on the first {args.problems} (vLLM, greedy)\n")
    print("| model | trainable params | vs LoRA | train loss step 1 | last 10 | held-out loss | vs LoRA | GSM8K |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, loss in losses.items():
        summary = json.loads((work / name / "eval" / "summary.json").read_text())
        held_out = f"{loss:.4f} | {loss / losses['lora']:.3f}"
        accuracy = f"{100 * summary['accuracy']:.1f}% ({summary['correct']}/{summary['n']})"
        if name == "base":
            print(f"| base | – | – | – | – | {held_out} | {accuracy} |")
            continue
        train_losses = series(read_metrics(work / name / "train" / "metrics.jsonl"), "loss")[1]
        print(
            f"| {name} | {params[name]:,} | {params[name] / params['lora']:.3f} | {train_losses[0]:.3f} | "
            f"{statistics.mean(train_losses[-10:]):.3f} | {held_out} | {accuracy} |"
        )
    print(f"\nreport with the loss curves: {work / 'report' / 'report.md'}")


if __name__ == "__main__":  # vLLM stages run as subprocesses, but keep the guard for spawn-based children
    main()
