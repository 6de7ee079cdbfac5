"""The peak GPU memory of one training step, predicted on the CPU, without a GPU and without the weights.

    python bench/memory_model.py                                   # Llama-2-7B: every method and variant, the table
    python bench/memory_model.py --shape llama3-8b --variants all
    python bench/memory_model.py --shape llama2-7b --methods tucka,lora,dora --json OUT.json   # reference rows only

How: the model is built on PyTorch's meta device and its tensors are replaced by fake ones (FakeTensorMode: shapes,
dtypes and allocations, no data), in bf16 as DeepSpeed's bf16 engine holds it; the method is added through peft with
the launcher's settings (TuckA r16 k4 t2 p2, LoRA and DoRA r32, on q_proj and v_proj; TuckA's router marked
calibrated, as data-aware initialisation leaves it: its values, not its memory, come from data). One forward and
backward at the run's micro-batch and length (1 x 512) run under PyTorch's tensor-memory tracker
(``torch.distributed._tools.mem_tracker.MemTracker``), with and without gradient checkpointing (non-reentrant, as the
launcher sets it). To its peak this adds what DeepSpeed allocates for the shipped ZeRO-2 config on ``--ranks`` ranks:
two gradient buckets of ``reduce_bucket_size`` elements (``overlap_comm``; "auto" is hidden size squared) and, per
rank, its partition of the fp32 master weights, the two AdamW moments and the fp32 gradients of the trainable
parameters. A 4-bit base (``--quantize 4bit``) is counted from the bf16 one: every decoder Linear weight at NF4's 0.5
bytes plus bitsandbytes' double-quantised scales (one byte per 64 weights, 4 bytes per 256 scales), and one layer's
weight dequantised to bf16 at a time.

Which card fits: the predicted peak is ``max_memory_allocated``; a card must also hold the CUDA context and NCCL's
buffers (``CONTEXT_GIB``) and the allocator's cache (``CACHE_SHARE`` of the peak), within what the card has
(``CARDS``, GiB). The model is checked against real tensors on this CPU (tests/test_memory_model.py): for a small
model the fake step's tracked peak equals the real step's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import peft
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from transformers import AutoModelForCausalLM, PretrainedConfig

import tucka_llm
from tucka_llm.io.atomic import atomic_write_json
from tucka_llm.models import SHAPES, lora_width
from tucka_llm.training.options import TrainOptions
from tucka_llm.tucka.router import TuckARouter

REPO = Path(__file__).resolve().parents[1]
ZERO2 = REPO / "tucka_llm" / "ds_configs" / "zero2.json"
METHODS = ("tucka", "lora", "dora")
GIB = 2**30
CARDS = {"24 GB": 22.35, "16 GB": 14.9, "8 GB": 7.45}  # GiB a card of that size has
CONTEXT_GIB = 1.0  # CUDA context and NCCL's buffers
CACHE_SHARE = 0.10  # the caching allocator's reserve above the allocated peak
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # per weight: 4 bits, an 8-bit scale per 64, an fp32 scale per 256 scales


@dataclass(frozen=True)
class Variant:
    """A setting of the run beside the method: gradient checkpointing, and a base in bf16 or 4-bit NF4."""

    gradient_checkpointing: bool = False
    base: str = "bf16"


REFERENCE = Variant()
VARIANTS = (REFERENCE, Variant(gradient_checkpointing=True), Variant(base="4bit"), Variant(True, "4bit"))


@dataclass
class Prediction:
    """One row: GiB of what the step holds at its peak, and which cards fit it."""

    shape: str
    method: str
    gradient_checkpointing: bool
    base: str
    trainable: int
    weights_gib: float
    activations_gib: float  # activations, temporaries and adapter gradients at the tracked peak
    deepspeed_gib: float
    predicted_peak_gib: float  # predicted torch.cuda.max_memory_allocated of the step
    fits: dict[str, bool]


def adapter_config(method: str) -> peft.PeftConfig:
    """The launcher's adapter for ``method`` at its defaults (the reference run's)."""
    d = TrainOptions()
    targets = d.target_module_list
    if method == "tucka":  # init_weights=False: the router marked calibrated, as data-aware initialisation leaves it
        return tucka_llm.TuckAConfig(r=d.r, k=d.k, t=d.t, p=d.p, target_modules=targets, init_weights=False,
                                     task_type="CAUSAL_LM")  # fmt: skip
    return peft.LoraConfig(r=d.lora_r, lora_alpha=d.lora_alpha, target_modules=targets, use_dora=method == "dora",
                           task_type="CAUSAL_LM")  # fmt: skip


def build(config: PretrainedConfig, method: str, fake: FakeTensorMode | None) -> peft.PeftModel:
    """The model with the method's adapter, every floating tensor in bf16 (DeepSpeed's bf16 engine casts the whole
    model; TuckA's e_bar buffer stays float32). With ``fake``: built on the meta device, then each tensor replaced
    by a fake one of the same shape (moving a module of fake tensors with ``.to`` is not supported)."""
    if fake is None:
        torch.manual_seed(0)
        model = peft.get_peft_model(
            AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16), adapter_config(method)
        )
        return model.to(torch.bfloat16)
    with torch.device("meta"):
        model = peft.get_peft_model(
            AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16), adapter_config(method)
        )
    model.to(torch.bfloat16)
    with fake:
        for module in model.modules():
            for name, tensor in list(module._parameters.items()):
                if tensor is not None:
                    module._parameters[name] = nn.Parameter(torch.empty(tensor.shape, dtype=tensor.dtype),
                                                            requires_grad=tensor.requires_grad)  # fmt: skip
            for name, tensor in list(module._buffers.items()):
                if tensor is not None:
                    module._buffers[name] = torch.empty(tensor.shape, dtype=tensor.dtype)
    return model


class _NoHook:
    def remove(self) -> None:
        pass


@contextlib.contextmanager
def hooks_on_trained_tensors_only() -> Iterator[None]:
    """MemTracker hooks every parameter's gradient, which a frozen one has none of (register_hook refuses it): a
    frozen base's parameters get no hook. Written here because the tracker assumes full fine-tuning."""
    register, post = torch.Tensor.register_hook, torch.Tensor.register_post_accumulate_grad_hook

    def guarded(original):
        return lambda tensor, hook: original(tensor, hook) if tensor.requires_grad else _NoHook()

    torch.Tensor.register_hook, torch.Tensor.register_post_accumulate_grad_hook = guarded(register), guarded(post)
    try:
        yield
    finally:
        torch.Tensor.register_hook, torch.Tensor.register_post_accumulate_grad_hook = register, post


@contextlib.contextmanager
def calibration_taken_as_done(fake: bool) -> Iterator[None]:
    """On fake tensors the router's calibration flag has no value to check (its memory is one byte): skip the check."""
    check = TuckARouter.check_calibrated
    if fake:
        TuckARouter.check_calibrated = lambda self, adapter_name: None
    try:
        yield
    finally:
        TuckARouter.check_calibrated = check


def tracked_step(config: PretrainedConfig, method: str, fake: bool, batch: int = 1, length: int = 512,
                 gradient_checkpointing: bool = False) -> tuple[dict[str, int], int]:  # fmt: skip
    """Bytes by kind (MemTracker's categories and "Total") at the peak of one forward and backward, and the number
    of trainable parameters."""
    mode = FakeTensorMode() if fake else None
    model = build(config, method, mode)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    with mode or contextlib.nullcontext():
        ids = torch.randint(0, config.vocab_size, (batch, length))
        # imported here: gpu_suite and train_throughput import this module for its card rule, on GPU images whose
        # torch may predate the tracker (2.5)
        from torch.distributed._tools.mem_tracker import MemTracker

        tracker = MemTracker()
        tracker.track_external(model)
        with hooks_on_trained_tensors_only(), calibration_taken_as_done(fake), tracker:
            model(input_ids=ids, labels=ids).loss.backward()
        (peak,) = tracker.get_tracker_snapshot("peak").values()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {str(getattr(kind, "value", kind)): int(size) for kind, size in peak.items()}, trainable


def deepspeed_bytes(ds_config: dict, hidden: int, trainable: int, ranks: int) -> int:
    """What DeepSpeed's ZeRO-2 engine holds on a rank beyond the model: the gradient buckets and this rank's share of
    the fp32 master weights, AdamW's two moments and the fp32 gradients (4 + 8 + 4 bytes per trainable parameter)."""
    zero = ds_config.get("zero_optimization", {})
    bucket = zero.get("reduce_bucket_size", 5e8)
    bucket = hidden * hidden if bucket == "auto" else int(bucket)
    buffers = 2 if zero.get("overlap_comm", False) else 1
    return buffers * bucket * 2 + math.ceil(trainable / ranks) * 16


def linear_weights(config: PretrainedConfig) -> tuple[int, int]:
    """(weights in the decoder's Linear layers, the largest one's): what a 4-bit base quantises (not the head)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    sizes = [
        m.weight.numel() for name, m in model.named_modules() if isinstance(m, nn.Linear) and "lm_head" not in name
    ]
    return sum(sizes), max(sizes)


_TRACKED: dict[tuple[str, str, bool], tuple[dict[str, int], int]] = {}


def predict(shape: str, method: str, variant: Variant, ranks: int, ds_config: dict) -> Prediction:
    """One row of the table (see the module docstring)."""
    config = SHAPES[shape]()
    key = (shape, method, variant.gradient_checkpointing)  # a 4-bit base changes the weights, not the step
    if key not in _TRACKED:
        _TRACKED[key] = tracked_step(config, method, True, gradient_checkpointing=variant.gradient_checkpointing)
    tracked, trainable = _TRACKED[key]
    weights = tracked["Parameter"] + tracked["Buffer"]
    activations = tracked["Total"] - weights
    if variant.base == "4bit":
        quantized, largest = linear_weights(config)
        weights += round(quantized * (NF4_BYTES - 2)) + largest * 2  # one layer's weight dequantised at a time
    deepspeed = deepspeed_bytes(ds_config, config.hidden_size, trainable, ranks)
    peak = (weights + activations + deepspeed) / GIB
    fits = {card: needed_gib(peak)[0] <= size for card, size in CARDS.items()}
    return Prediction(shape, method, variant.gradient_checkpointing, variant.base, trainable, weights / GIB,
                      activations / GIB, deepspeed / GIB, peak, fits)  # fmt: skip


def needed_gib(allocated: float, reserved: float | None = None, device_used: float | None = None) -> tuple[float, str]:
    """What a training process needs of a card (GiB) and how that was judged, from the best figure there is: the
    device's used memory, measured; else the allocator's reserved peak plus ``CONTEXT_GIB``; else the allocated peak
    (``max_memory_allocated``, measured or predicted) plus ``CACHE_SHARE`` of it and ``CONTEXT_GIB``. The one rule
    behind every "fits a card" verdict (this model, bench/gpu_suite.py, bench/train_throughput.py)."""
    if device_used is not None:
        return device_used, "device used"
    if reserved is not None:
        return reserved + CONTEXT_GIB, f"reserved + {CONTEXT_GIB:g} GiB context"
    return allocated * (1 + CACHE_SHARE) + CONTEXT_GIB, f"allocated x {1 + CACHE_SHARE:g} + {CONTEXT_GIB:g} GiB"


def card_verdict(allocated: float, gpu_memory: dict[str, list[float]], card: str = "24 GB") -> str:
    """Whether a measured training run fits ``card``: "yes"/"NO" with the figure and how it was judged
    (``needed_gib`` over the worst rank's logged ``peak_reserved_gb`` and ``device_used_gb``), or "n/a (CPU RSS)"
    for a run that logged no GPU memory."""
    if not gpu_memory:
        return "n/a (CPU RSS)"
    worst = {key: max(values) for key, values in gpu_memory.items()}
    needed, how = needed_gib(allocated, worst.get("peak_reserved_gb"), worst.get("device_used_gb"))
    fits = needed <= CARDS[card]
    return f"{'yes' if fits else 'NO'} ({how} {needed:.2f} {'<=' if fits else '>'} {CARDS[card]:g} GiB)"


def serving_slot_gib(shape: str, rank: int) -> float:
    """One routed-serving adapter slot (``tucka_llm.serving.requests.slot_bytes``), GiB: rank ``rank`` on q_proj and
    v_proj, bf16."""
    return rank * lora_width(SHAPES[shape]()) * 2 / GIB


def print_table(rows: list[Prediction]) -> None:
    print("| shape | method | grad ckpt | base | trainable | weights | activations | DeepSpeed | predicted peak | "
          + " | ".join(CARDS) + " |")  # fmt: skip
    print("|---|---|---|---|---:|---:|---:|---:|---:|" + "---|" * len(CARDS))
    for r in rows:
        cells = [r.shape, r.method, "yes" if r.gradient_checkpointing else "no", r.base, f"{r.trainable:,}",
                 f"{r.weights_gib:.2f}", f"{r.activations_gib:.2f}", f"{r.deepspeed_gib:.2f}",
                 f"{r.predicted_peak_gib:.2f}", *("fits" if r.fits[c] else "no" for c in CARDS)]  # fmt: skip
        print("| " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=list(SHAPES), default="llama2-7b")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    parser.add_argument(
        "--variants",
        choices=["reference", "all"],
        default="all",
        help="reference: bf16 base, no gradient checkpointing; all: also checkpointing, a 4-bit base",
    )
    parser.add_argument("--ranks", type=int, default=8, help="data-parallel ranks (ZeRO-2 partitions over them)")
    parser.add_argument("--json", type=Path, help="write the rows here (a JSON object with a 'rows' list)")
    args = parser.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods or any(m not in METHODS for m in methods):
        parser.error(f"--methods {args.methods}: give some of {', '.join(METHODS)}")
    ds_config = json.loads(ZERO2.read_text())
    variants = [REFERENCE] if args.variants == "reference" else list(VARIANTS)
    rows, started = [], time.perf_counter()
    for variant in variants:
        for method in methods:
            rows.append(predict(args.shape, method, variant, args.ranks, ds_config))
            print(f"{args.shape} {method} {variant}: {rows[-1].predicted_peak_gib:.2f} GiB", file=sys.stderr)
    cards = ", ".join(f"{card}: {size} GiB" for card, size in CARDS.items())
    print(f"\n{args.shape}, 1 x 512 tokens, bf16, ZeRO-2 (shipped zero2) on {args.ranks} ranks; a card fits when "
          f"peak x {1 + CACHE_SHARE:g} + {CONTEXT_GIB:g} GiB <= what it has ({cards})\n")  # fmt: skip
    print_table(rows)
    slot = serving_slot_gib(args.shape, TrainOptions().r)
    routes = TrainOptions().k * 5  # k x the default gate levels (t = 2): every served route in its own slot
    print(
        f"\nrouted serving (vLLM): {routes} adapter slots x {slot * 1024:.1f} MiB = {routes * slot:.2f} GiB "
        "(TuckA r16 as LoRA on q_proj and v_proj, bf16)"
    )
    print(f"({time.perf_counter() - started:.0f} s)")
    if args.json is not None:
        record = {"shape": args.shape, "ranks": args.ranks, "ds_config": "zero2", "tokens": 512, "micro_batch": 1,
                  "rows": [asdict(r) for r in rows], "serving_slot_gib": slot, "serving_slots": routes}  # fmt: skip
        atomic_write_json(args.json, record)


if __name__ == "__main__":
    main()
