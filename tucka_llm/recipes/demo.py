"""The whole mission on a CPU, offline: SmolLM2-135M-Instruct, TuckA (or LoRA/DoRA) trained under DeepSpeed on 2 CPU
ranks on GSM8K-as-MetaMathQA, merged, evaluated on GSM8K with vLLM before and after, and reported.

Every stage is the project's own command line (printed as it runs); a stage whose output exists is skipped, so an
interrupted demo continues where it stopped. The sizes are set for about 15 minutes on a 2-core machine.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tucka_llm.layout import HELD_OUT_LOSS, REPORT, SUMMARY, read_json
from tucka_llm.recipes.smollm2 import DEFAULT_CACHE, smollm2_checkpoint
from tucka_llm.recipes.stages import (
    Stage,
    eval_stage,
    export_stage,
    loss_stage,
    report_stage,
    run_stages,
    train_stage,
)


@dataclass(frozen=True)
class DemoSize:
    """How much the demo does: training steps and the GSM8K test problems evaluated (the first N)."""

    steps: int
    problems: int
    max_new_tokens: int


FULL = DemoSize(steps=30, problems=40, max_new_tokens=256)  # about 15 minutes on 2 cores
SMOKE = DemoSize(steps=2, problems=2, max_new_tokens=8)  # the pipeline end to end in a few minutes (tests)


def evaluate_stage(name: str, model: Path, output: Path, size: DemoSize) -> Stage:
    """GSM8K on the first ``size.problems`` test problems with vLLM, greedy, fp32: the same for every model compared."""
    flags = ["--limit", size.problems, "--max-new-tokens", size.max_new_tokens, "--dtype", "float32"]
    return eval_stage(name, "gsm8k", model, output, *flags)


def evaluate_stages(name: str, model: Path, output: Path, size: DemoSize) -> list[Stage]:
    """``evaluate_stage`` and the held-out loss of the same model on the same problems' reference solutions."""
    return [evaluate_stage(name, model, output, size), loss_stage(f"{name}-loss", model, output, size.problems)]


def train(
    method: str, base: Path, output: Path, size: DemoSize, train_flags: Sequence[object] = (), data: object = None
) -> Stage:
    """Train ``method`` into ``output`` on 2 CPU ranks: ZeRO-2, fp32, ``size.steps`` steps of 8 sequences, the first
    ``size.steps * 8`` records of ``data`` (default: the shipped GSM8K training problems). ``train_flags`` are passed
    on to ``tucka train`` after the demo's own (e.g. ``--router``, ``--lr``, ``--max-len``: the last one given wins)."""
    flags = [
        "--model", base, "--data", data or "gsm8k-train", "--num-examples", size.steps * 8, "--method", method,
        "--precision", "fp32", "--max-steps", size.steps, "--micro-batch", "4", "--global-batch", "8",
        "--max-len", "384", "--logging-steps", "1", "--save-steps", "1000", *train_flags,
    ]  # fmt: skip
    return train_stage("train", 2, output, *flags)


def training_stages(
    method: str, base: Path, output: Path, size: DemoSize, train_flags: Sequence[object] = ()
) -> list[Stage]:
    """``train`` into ``output/train``, then the adapter merged in fp32 (TuckA under export's default route)."""
    return [
        train(method, base, output / "train", size, train_flags),
        export_stage("export", output / "train", output / "merged", "--dtype", "float32"),
    ]


def adapter_stages(
    method: str, base: Path, output: Path, size: DemoSize, train_flags: Sequence[object] = ()
) -> list[Stage]:
    """``training_stages``, then the merged model evaluated on GSM8K like the base."""
    return [
        *training_stages(method, base, output, size, train_flags),
        *evaluate_stages("evaluate-merged", output / "merged", output / "eval", size),
    ]


def demo_stages(method: str, base: Path, output: Path, size: DemoSize) -> list[Stage]:
    """The demo's commands: base evaluation, training, export, evaluation of the merged model, report."""
    return [
        *evaluate_stages("evaluate-base", base, output / "eval-base", size),
        *adapter_stages(method, base, output, size),
        report_stage([output / "train", output / "eval-base", output / "eval"], output / "report"),
    ]


def main(argv: list[str] | None = None, prog: str = "tucka demo") -> None:
    """Run the demo's stages (skipping those done) and print what training changed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog=prog)
    parser.add_argument("--method", choices=["tucka", "lora", "dora"], default="tucka")
    parser.add_argument("--output", type=Path, default=None, help="default: runs/demo-<method>")
    parser.add_argument("--model-cache", type=Path, default=DEFAULT_CACHE, help="where SmolLM2 is converted to")
    parser.add_argument("--smoke", action="store_true", help="a few steps and problems: checks the pipeline only")
    args = parser.parse_args(argv)
    output = args.output or Path("runs") / f"demo-{args.method}"
    size = SMOKE if args.smoke else FULL
    print(f"SmolLM2-135M-Instruct: {smollm2_checkpoint(args.model_cache)}", flush=True)
    run_stages(demo_stages(args.method, args.model_cache, output.resolve(), size), output / "logs")
    before, after = (read_json(output / d / SUMMARY) for d in ("eval-base", "eval"))
    loss_before, loss_after = (read_json(output / d / HELD_OUT_LOSS) for d in ("eval-base", "eval"))
    print(
        f"\nGSM8K, first {size.problems} test problems: base {100 * before['accuracy']:.1f}% "
        f"({before['extraction_failures']} without an answer) -> {args.method} {100 * after['accuracy']:.1f}% "
        f"({after['extraction_failures']} without an answer); held-out loss on their reference solutions "
        f"{loss_before['loss']:.4f} -> {loss_after['loss']:.4f}"
    )
    print(f"training run:  {output / 'train'}\nmerged model:  {output / 'merged'}")
    print(f"evaluations:   {output / 'eval-base'}, {output / 'eval'}\nreport:        {output / 'report' / REPORT}")
