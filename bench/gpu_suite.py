"""The GPU benchmark suite, in sections that each write their rows as soon as they end: made for GPU slots of a few
minutes, where a command that runs out of time must still leave what it measured.

    python bench/gpu_suite.py --out results/ --workdir /tmp/suite                 # every section, Llama-2-7B shape
    python bench/gpu_suite.py --out results/ --workdir /tmp/suite --sections train
    python bench/gpu_suite.py --out results/ --workdir /tmp/suite --sections merge,generate   # a second command
    python bench/gpu_suite.py --dry-run --out dry/                                # CPU, tiny shapes, about a minute

``--out DIR`` gets ``suite.json`` (every row so far, with each section's wall time), rewritten atomically after
each section. ``--workdir`` keeps the random model (built once, on the GPU, saved once) and the training runs, so a
later command with the same ``--workdir`` goes on from them: ``merge`` and ``generate`` use the TuckA run that
``train`` left there. Sections: train, overhead, merge, generate (the default is all four, in that order).

Time budget on one H100 (estimated, not yet measured on a GPU; the dry run records each section's time on the CPU):
building and saving the 7B model once about 30 s (random init on the GPU, 13.5 GB written); each training run
about 50-60 s, most of it process start, DeepSpeed init and reading 13.5 GB, the 20 steps themselves a few seconds
(4 P T = 1.4e13 FLOPs a step at 1 x 512 tokens: 0.05-0.1 s at 150-300 TFLOP/s), four runs about 4 min; the overhead
section about 10 s; the merge about 60 s (13.5 GB read and written, 64 layers merged on the GPU); generate about 40 s
(64 prompts x 256 tokens, batches of 16, about 25 ms a step for a 7B model). About 6 minutes in all: run ``train``
alone first where a command may take at most 10 minutes.

It needs torch with CUDA, transformers, peft, deepspeed, datasets and this project, and no network: the model has
Llama-2-7B's shape with seeded random weights in bf16, built here; the data is written here. bitsandbytes is needed
for the 4-bit row only (without it that row says so); vLLM is not used. In order:

1. Training through the real launcher (``deepspeed launch/train.py``, one GPU, ds_configs/zero2.json, bf16), micro-batch
   1 x 512 tokens (every sequence is cut to 512), the reference adapter settings (TuckA r16 k4 t2 p2 alpha 512, LoRA
   and DoRA r32 alpha 32, on q_proj and v_proj), for TuckA, LoRA, DoRA and TuckA on the base quantised to 4-bit NF4
   (``--quantize 4bit``): peak ``torch.cuda.max_memory_allocated`` (GiB), tokens/s after the warm-up steps, both as
   ratios to LoRA, and whether the run fits a 24 GB card (the paper's reference run), judged from the device's used
   memory (``mem_get_info``: the allocator's reserved memory with its cache, the CUDA context and NCCL's buffers),
   or where that is missing from the reserved peak plus the context, against the 22.35 GiB a 24 GB card has (one
   rule for every such verdict: ``bench/memory_model.py``'s ``needed_gib`` and ``CARDS``).
2. The adapter-overhead benchmark (bench/adapter_overhead.py's step, four layers of Llama-2-7B's width, 1 x 512
   tokens) with its memory measured exactly: the CUDA peak of one step above what the model holds.
3. A merge on the GPU: ``launch/export.py``'s ``export_merged`` of the trained TuckA run into a bf16 checkpoint
   with ``--device cuda`` (one layer at a time on the GPU): wall time and CUDA peak.
4. HF ``generate`` throughput on the merged checkpoint (bf16, greedy, batches with left padding, GSM8K prompts):
   generated tokens/s and CUDA peak.

On the CPU (``--dry-run``) the same steps run with a 2-layer, hidden-64 model, 64-token sequences and two steps, and
without the DoRA run (it takes LoRA's code path); peak memory is then the processes' RSS (training) or not measured
(no CUDA), and the 22 GiB check does not apply.

Carrying the dependencies to an offline GPU machine. Its image holds torch, transformers, peft, accelerate, pandas,
pyarrow, xxhash, tensorboard, sentencepiece, msgpack and einops (and what they pull in: numpy, psutil, tqdm, pyyaml,
fsspec, huggingface-hub); not deepspeed, datasets or this project. Build the rest where pip works, at most 64 MiB in
all, into ``.whl/`` beside the repository (ignored by git):

    pip wheel --no-deps -w .whl .                                                         # this project, ~11 MB
    DS_BUILD_OPS=0 pip wheel --no-deps -w .whl deepspeed==0.19.8                          # 2.2 MB, pure Python
    pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux2014_x86_64 --platform manylinux_2_24_x86_64 -d .whl \\
        datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 hjson==3.1.0 py-cpuinfo==9.0.0 pydantic==2.14.3 \\
        pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5 bitsandbytes==0.50.2   # 47 MB

Name ``--python-version`` after the GPU machine's Python, add ``peft==0.21.2`` (0.5 MB) if its peft is not
0.21-0.22, and leave bitsandbytes out (43 MB of it) to stay near 17 MB; with it about 60 MB. There: ``python3 -m
pip install --no-index --no-deps .whl/*.whl`` (into the environment, so that its ``deepspeed`` command lies beside
``python3``), then ``python3 bench/gpu_suite.py --out results/ --workdir /tmp/suite`` from the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import adapter_overhead  # bench/ siblings: this script runs as python bench/gpu_suite.py
import eval_throughput
import torch
import train_throughput
from memory_model import card_verdict
from transformers import LlamaConfig

import tucka_llm
from tucka_llm.export import export_merged
from tucka_llm.io.atomic import atomic_write_json
from tucka_llm.loading import bitsandbytes_missing
from tucka_llm.models import llama2_7b_config, tiny_llama_config

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("train", "overhead", "merge", "generate")
TRAINING = (("tucka", "full"), ("lora", "full"), ("dora", "full"), ("tucka", "4bit"))
ADAPTERS = {"tucka": "TuckA r16 k4 t2 p2", "lora": "LoRA r32", "dora": "DoRA r32"}


@dataclass(frozen=True)
class Scale:
    """The sizes of one suite: the GPU one, or the CPU dry run."""

    model: LlamaConfig
    training: tuple[tuple[str, str], ...]  # (method, base) of each training run
    sequence: int  # tokens per training sequence (every one is cut to this length)
    steps: int
    warmup_steps: int
    overhead: dict[str, int]  # bench/adapter_overhead.py's shape flags
    prompts: int
    new_tokens: int
    generate_batch: int
    dtype: str  # of the merged checkpoint and of generate


GPU = Scale(
    model=llama2_7b_config(),
    training=TRAINING,
    sequence=512,
    steps=20,
    warmup_steps=5,
    overhead={"layers": 4, "hidden": 4096, "batch": 1, "seq": 512, "r": 16, "reps": 10},
    prompts=64,
    new_tokens=256,
    generate_batch=16,
    dtype="bfloat16",
)
DRY_RUN = Scale(
    model=tiny_llama_config(),
    training=tuple(run for run in TRAINING if run[0] != "dora"),  # DoRA's run takes LoRA's code path: time saved
    sequence=64,
    steps=2,
    warmup_steps=1,
    overhead={"layers": 2, "hidden": 128, "batch": 1, "seq": 32, "r": 8, "reps": 1},
    prompts=2,
    new_tokens=4,
    generate_batch=2,
    dtype="float32",
)


@dataclass
class Row:
    """One line of the table (and of the JSON): what was measured, as measured."""

    section: str
    configuration: str
    tokens_per_s: float | None = None
    seconds: float | None = None  # per training step, per adapter step, per merge, per generate call
    peak_gib: float | None = None
    vs_lora: str = ""
    check: str = ""
    details: dict[str, Any] = field(default_factory=dict)


def write_data(path: Path, records: int, tokens: int) -> None:
    """MetaMathQA-style records whose responses run past ``tokens`` tokens, so that every sequence is cut to it."""
    words = " ".join(str(n) for n in range(tokens))  # each number is at least one token
    with path.open("w", encoding="utf-8") as f:
        for i in range(records):
            f.write(json.dumps({"query": f"Count from 0, record {i}.", "response": words}) + "\n")


def cuda_peak_gib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def reset_cuda_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def training(scale: Scale, workdir: Path, model: Path) -> tuple[list[Row], dict[str, Path]]:
    """Section 1: each method through the launcher; the rows and the run directories."""
    data = workdir / "data.jsonl"
    write_data(data, records=max(64, scale.steps), tokens=scale.sequence)
    args = argparse.Namespace(
        ranks=1, ds=REPO / "ds_configs" / "zero2.json", data=str(data), max_len=scale.sequence, micro_batch=1,
        global_batch=1, max_steps=scale.steps, warmup_steps=scale.warmup_steps, precision="bf16",
        gradient_checkpointing=False,
    )  # fmt: skip
    results, runs = {}, {}
    for method, base in scale.training:
        if base == "4bit" and bitsandbytes_missing("--quantize 4bit"):
            continue
        runs[method, base] = workdir / f"{method}-{base}"
        if (runs[method, base] / "adapter_model.safetensors").is_file():  # an earlier command's run in --workdir
            results[method, base] = train_throughput.read_result(runs[method, base], args)
            continue
        print(f"training: {method} on the {base} base", file=sys.stderr, flush=True)
        results[method, base] = train_throughput.run_method(method, base, model, runs[method, base], args)
    lora = results["lora", "full"]
    rows = []
    for method, base in scale.training:
        label = f"{ADAPTERS[method]}, {'bf16 base' if base == 'full' else '4-bit NF4 base, bf16 compute'}"
        if (method, base) not in results:
            rows.append(Row("training", label, check="skipped: bitsandbytes is not installed"))
            continue
        result = results[method, base]
        peak, lora_peak = max(result.peak_gb_per_rank), max(lora.peak_gb_per_rank)
        check = f"fits 24 GB: {card_verdict(peak, result.gpu_memory_per_rank)}"
        rows.append(
            Row(
                "training",
                label,
                tokens_per_s=result.tokens_per_s,
                seconds=scale.sequence / result.tokens_per_s,
                peak_gib=peak,
                vs_lora=f"{result.tokens_per_s / lora.tokens_per_s:.3f}x speed, {peak / lora_peak:.3f}x memory",
                check=check,
                details={
                    "tokens_per_sequence": result.tokens_per_sequence,
                    "peak_gib_per_rank": result.peak_gb_per_rank,
                    **result.gpu_memory_per_rank,
                },
            )
        )
    return rows, {method: path for (method, base), path in runs.items() if base == "full"}


def overhead(scale: Scale, device: str) -> list[Row]:
    """Section 2: bench/adapter_overhead.py's step time and, on a GPU, its exact CUDA memory per method."""
    args = argparse.Namespace(**scale.overhead, device=device)
    memory = (
        {m: adapter_overhead.measure_memory_here(m, args) for m in adapter_overhead.METHODS} if device == "cuda" else {}
    )
    times, params = adapter_overhead.measure_times(args)
    rows = []
    for method in adapter_overhead.METHODS:
        ratio = f"{times[method] / times['lora']:.3f}x time"
        if memory:
            ratio += f", {memory[method] / memory['lora']:.3f}x memory"
        rows.append(
            Row(
                "adapter overhead",
                f"{method} ({params[method]:,} trainable)",
                seconds=times[method],
                peak_gib=memory[method] / 2**30 if memory else None,
                vs_lora=ratio,
                check="CUDA peak of one step above the model" if memory else "no CUDA: memory not measured",
            )
        )
    return rows


def merge(scale: Scale, run: Path, workdir: Path, device: str) -> Row:
    """Section 3: the trained TuckA run merged on ``device`` into a checkpoint of ``scale.dtype``."""
    out = workdir / "merged-tucka"
    reset_cuda_peak()
    start = time.perf_counter()
    result = export_merged(run, out, dtype=scale.dtype, device=device, force=True)
    seconds = time.perf_counter() - start
    label = f"TuckA run -> {scale.dtype} checkpoint, layers merged on {device}"
    return Row("merge", label, seconds=seconds, peak_gib=cuda_peak_gib(), check=result.route.describe())


def generate(scale: Scale, model: Path) -> Row:
    """Section 4: HF generate on the merged checkpoint, timed after a warm-up call (bench/eval_throughput.py)."""
    args = argparse.Namespace(model=str(model), prompts=scale.prompts, max_new_tokens=scale.new_tokens,
                              hf_batch_size=scale.generate_batch, dtype=scale.dtype, max_model_len=1024)  # fmt: skip
    reset_cuda_peak()
    result = eval_throughput.worker("hf", args)
    label = f"HF generate, {scale.prompts} prompts x {scale.new_tokens} new tokens, batch {scale.generate_batch}"
    return Row("generate", label, tokens_per_s=result["tokens"] / result["seconds"], seconds=result["seconds"],
               peak_gib=cuda_peak_gib(), details=result)  # fmt: skip


def print_table(rows: list[Row]) -> None:
    print("| section | configuration | tokens/s | time (s) | peak memory (GiB) | vs LoRA | check |")
    print("|---|---|---:|---:|---:|---|---|")
    for row in rows:
        cells = [
            row.section,
            row.configuration,
            "" if row.tokens_per_s is None else f"{row.tokens_per_s:,.0f}",
            "" if row.seconds is None else f"{row.seconds:.3g}",
            "" if row.peak_gib is None else f"{row.peak_gib:.2f}",
            row.vs_lora,
            row.check,
        ]
        print("| " + " | ".join(cells) + " |")


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)"
    return f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def suite(scale: Scale, workdir: Path, dry_run: bool, sections: list[str], out: Path) -> dict[str, Any]:
    """The chosen sections in order, each one's rows added to the record and written to ``out`` as it ends."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    record: dict[str, Any] = {
        "dry_run": dry_run,
        "machine": machine(),
        "training": {
            "ds_config": "zero2", "precision": "bf16", "micro_batch": 1, "tokens_per_sequence": scale.sequence,
            "steps": scale.steps, "warmup_steps": scale.warmup_steps,
        },
        "versions": tucka_llm.package_versions(
            "torch", "transformers", "peft", "deepspeed", "datasets", "bitsandbytes"
        ),
        "section_seconds": {},
        "rows": [],
    }  # fmt: skip
    model = workdir / "model"
    started = time.perf_counter()
    if (model / "config.json").is_file():
        parameters = sum(v for v in json.loads((model / "parameters.json").read_text()).values())
    else:
        print(f"building the model in {model}", file=sys.stderr, flush=True)
        parameters = train_throughput.build_model(scale.model, torch.bfloat16, model)
        atomic_write_json(model / "parameters.json", {"parameters": parameters})
    record["section_seconds"]["build model"] = time.perf_counter() - started
    record["model"] = {"parameters": parameters, "hidden_size": scale.model.hidden_size,
                       "layers": scale.model.num_hidden_layers, "weights": "random (seed 0), bfloat16"}  # fmt: skip
    merged = workdir / "merged-tucka"
    for section in sections:
        started = time.perf_counter()
        if section == "train":
            rows, _ = training(scale, workdir, model)
        elif section == "overhead":
            rows = overhead(scale, device)
        elif section == "merge":
            rows = [merge(scale, tucka_run(workdir), workdir, device)]
        else:
            rows = [generate(scale, merged if (merged / "config.json").is_file() else model)]
        record["section_seconds"][section] = time.perf_counter() - started
        record["rows"] += [asdict(row) for row in rows]
        atomic_write_json(out / "suite.json", record)  # what is done stays, whatever happens to the next section
        print(
            f"{section}: {record['section_seconds'][section]:.0f} s, written to {out / 'suite.json'}", file=sys.stderr
        )
    return record


def tucka_run(workdir: Path) -> Path:
    """The TuckA training run the merge section merges: trained by ``train`` in this or an earlier command."""
    run = workdir / "tucka-full"
    if not (run / "adapter_model.safetensors").is_file():
        sys.exit(
            f"error: --sections merge needs the TuckA run of the train section in --workdir ({run}): run train first"
        )
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--out", type=Path, required=True, help="directory for suite.json, rewritten after each section"
    )
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU: check that every step runs")
    parser.add_argument("--workdir", type=Path, help="directory for the model and runs, kept for later commands")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}")
    args = parser.parse_args()
    sections = [name.strip() for name in args.sections.split(",") if name.strip()]
    if not sections or any(name not in SECTIONS for name in sections):
        parser.error(f"--sections {args.sections}: give some of {', '.join(SECTIONS)}")
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device: this suite is for a GPU machine (--dry-run runs it small on the CPU)")
    scale = DRY_RUN if args.dry_run else GPU
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gpu_suite_") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        record = suite(scale, workdir.resolve(), args.dry_run, sections, args.out)
    print(f"\n{record['machine']}; {json.dumps(record['training'])}; {json.dumps(record['versions'])}\n")
    print_table([Row(**row) for row in record["rows"]])
    print(f"\nsection times (s): {json.dumps({k: round(v, 1) for k, v in record['section_seconds'].items()})}")
    print(f"written to {args.out / 'suite.json'}")


if __name__ == "__main__":
    main()
