"""How close a merge -> unmerge round trip brings the base weights back, TuckA next to peft's LoRA, side by side.

TRL's online trainers merge the adapter to sync weights into vLLM and unmerge it afterwards, many times in a run; each
round trip rounds the base weight to its dtype twice. For one Llama-2-7B-shaped layer (4096 x 4096, weights drawn
N(0, 0.02) as Llama's are initialised), each method's adapter with an update of the same relative size as a trained
TuckA adapter's (alpha 512, route (0, [0.5, 0.5])), merged and unmerged through peft's own ``merge_adapter`` /
``unmerge_adapter``, in bf16 and fp32. Prints the relative Frobenius error ||W_back - W|| / ||W||, the largest
element error in units of bf16's spacing at the weights' RMS, and the ratio TuckA / LoRA; several seeds.

    python bench/merge_roundtrip.py [--seeds 3] [--width 4096]
"""

from __future__ import annotations

import argparse
import statistics

import peft
import torch
from torch import nn

import tucka_llm

ROUTE = tucka_llm.Route(0, [0.5, 0.5])


class OneLayer(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.q_proj = nn.Linear(width, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.q_proj(x)


def base(width: int, seed: int, dtype: torch.dtype) -> OneLayer:
    torch.manual_seed(seed)
    layer = OneLayer(width)
    nn.init.normal_(layer.q_proj.weight, std=0.02)
    return layer.to(dtype)


def tucka(width: int, seed: int, dtype: torch.dtype) -> peft.PeftModel:
    config = tucka_llm.TuckAConfig(target_modules=["q_proj"], init_weights=False)  # r16 k4 t2 p2, groups differ
    return peft.get_peft_model(base(width, seed, dtype), config)


def lora(width: int, seed: int, dtype: torch.dtype, relative_update: float) -> peft.PeftModel:
    """LoRA r32 alpha 32 with random A and B scaled so that ||B A|| / ||W|| is ``relative_update``."""
    model = peft.get_peft_model(
        base(width, seed, dtype), peft.LoraConfig(r=32, lora_alpha=32, target_modules=["q_proj"])
    )
    layer = model.base_model.model.q_proj
    with torch.no_grad():
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        nn.init.normal_(b)
        delta = (b.float() @ a.float()).norm()
        b.mul_(relative_update * layer.base_layer.weight.float().norm() / delta)
    return model


def round_trip(model: peft.PeftModel) -> tuple[float, float, float]:
    """(||W_back - W|| / ||W||, max |W_back - W| in bf16 spacings at the weights' RMS, ||W_merged - W|| / ||W||)."""
    weight = model.base_model.model.q_proj.get_base_layer().weight
    original = weight.detach().float().clone()
    with torch.no_grad():
        model.merge_adapter()
        update = (weight.float() - original).norm() / original.norm()
        model.unmerge_adapter()
    error = weight.detach().float() - original
    spacing = torch.finfo(torch.bfloat16).eps * original.pow(2).mean().sqrt()
    return float(error.norm() / original.norm()), float(error.abs().max() / spacing), float(update)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--width", type=int, default=4096)
    args = parser.parse_args()
    print("| dtype | method | update rel. norm | round-trip error rel. norm | worst element (bf16 steps at RMS W) |")
    print("|---|---|---:|---:|---:|")
    for dtype in (torch.bfloat16, torch.float32):
        rows = {"tucka": [], "lora": []}
        for seed in range(args.seeds):
            model = tucka(args.width, seed, dtype)
            with tucka_llm.routing(model, ROUTE):  # the fixed route that merges fold
                rows["tucka"].append(round_trip(model))
            rows["lora"].append(round_trip(lora(args.width, seed, dtype, rows["tucka"][-1][2])))
        for method, results in rows.items():
            errors, worst, updates = zip(*results, strict=True)
            spread = statistics.stdev(errors) if len(errors) > 1 else 0.0
            print(
                f"| {str(dtype).removeprefix('torch.')} | {method} | {statistics.mean(updates):.4f} | "
                f"{statistics.mean(errors):.2e} (sd {spread:.1e}) | {max(worst):.2f} |"
            )
        ratio = statistics.mean(r[0] for r in rows["tucka"]) / statistics.mean(r[0] for r in rows["lora"])
        print(f"| {str(dtype).removeprefix('torch.')} | TuckA / LoRA | | {ratio:.2f} | |")


if __name__ == "__main__":
    main()
