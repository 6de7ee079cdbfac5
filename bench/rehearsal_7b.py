"""The reference pipeline at Llama-2-7B's shapes on this CPU, once: what breaks at full size breaks here, before a
GPU sees it (4096 wide, 32 layers, a 32,000-token vocabulary, a 262 MB prompt router).

    python bench/rehearsal_7b.py --work /tmp/rehearsal     # about 10 minutes on 2 cores, ~17 GiB RAM, ~45 GB disk

Stages, each the project's own command, timed with its peak resident memory (GNU time; a stage's peak is that of
its largest process):
1. a random Llama-2-7B-shaped checkpoint stored as the real one is (fp16 safetensors shards, the Llama-2 tokenizer);
2. ``deepspeed --num_gpus 1 launch/train.py --ds ds_configs/zero2.json``, the reference TuckA settings, bf16, 1 x 512
   tokens (records longer than 512 tokens, cut), stopped after step 1 with its checkpoint (``--stop-at-step 1``,
   as a job time limit stops it), then ``--resume``d to step 2; DAI on 32 sequences (the reference's 256 would take
   half an hour of the CPU's time in layer 0 alone, and change nothing at these shapes);
3. ``launch/export.py`` merged (bf16) and ``--format lora`` (the routed directory with its prompt router);
4. ``eval/gsm8k.py`` with vLLM's CPU build on the merged checkpoint, and routed on the base with the adapter:
   2 GSM8K problems, 8 new tokens each.

The stages skip what is done (``recipes.stages``), so an interrupted rehearsal continues; the table is printed and
written to ``WORK/rehearsal.json`` as the stages finish.

The training stages need about 17 GiB of anonymous memory (the bf16 base, 12.6 GiB, and one step's activations;
docs/benchmarks.md); a 24 GiB machine holds them. On a smaller one ``--untrained`` replaces stage 2 with the same
adapter calibrated as training calibrates it and saved as a finished run leaves it, so that export and serving
still run at full shape.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tucka_llm.data import llama2_tokenizer, load_metamathqa, tokenize_metamathqa
from tucka_llm.io.atomic import atomic_directory, atomic_write_json
from tucka_llm.models import llama2_7b_config
from tucka_llm.recipes.stages import Stage, free_port
from tucka_llm.training.adapters import add_adapter, load_base_model
from tucka_llm.training.options import parse_options
from tucka_llm.tucka.calibration import ROUTER_CALIBRATION, calibrate_and_record, calibration_batches

REPO = Path(__file__).resolve().parents[1]
PEAK = re.compile(r"Maximum resident set size \(kbytes\): (\d+)")


def build_checkpoint(directory: Path, config: LlamaConfig | None = None) -> None:
    """Random weights (normal, std 0.02, seed 0; norms 1) in Llama-2-7B's shape, saved in fp16 shards as meta-llama
    ships it. Made in fp16 from the meta device: 13.5 GB of RAM, never an fp32 copy."""
    torch.manual_seed(0)
    with torch.device("meta"):
        model = LlamaForCausalLM(config or llama2_7b_config()).to(torch.float16)
    model.to_empty(device="cpu")  # RoPE's inv_freq is not saved: left as it is
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.fill_(1.0) if name.endswith("norm.weight") else parameter.normal_(0.0, 0.02)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, max_shard_size="10GB")
        llama2_tokenizer().save_pretrained(tmp)

    atomic_directory(directory, write)


def make_adapter(base: Path, run: Path, data: Path) -> None:
    """``--untrained``: the reference TuckA adapter on ``base`` calibrated as training calibrates it (DAI on 32
    sequences, the record export reads) and saved as a finished run leaves it, without a training step: for a
    machine whose RAM cannot hold the 7B step (see the module docstring), so that export and serving still run at
    full shape."""
    options = parse_options(["--model", str(base), "--data", str(data), "--output", str(run), "--precision", "bf16"])
    model = add_adapter(load_base_model(options), options)
    tokenizer = llama2_tokenizer()
    sequences = tokenize_metamathqa(load_metamathqa(str(data)), tokenizer, options.max_len, "truncate").dataset
    run.mkdir(parents=True, exist_ok=True)
    meta = {"data": str(data), "samples": "32", "seed": str(options.seed)}
    batches = calibration_batches(sequences, 32, options.seed, tokenizer)
    calibrate_and_record(model, batches, options.seed, run / ROUTER_CALIBRATION, meta)
    model.save_pretrained(run)
    tokenizer.save_pretrained(run)


def write_data(path: Path, records: int = 64, tokens: int = 600) -> None:
    """MetaMathQA-style records whose responses run past 512 tokens, so that every sequence is 512 long when cut."""
    words = " ".join(str(n) for n in range(tokens))  # each number is at least one token
    lines = (json.dumps({"query": f"Count from 0, record {i}.", "response": words}) for i in range(records))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def stages(work: Path, untrained: bool = False) -> list[Stage]:
    base, run, merged, routed = work / "llama2-7b-random", work / "train", work / "merged", work / "routed"
    python, deepspeed = sys.executable, Path(sys.executable).parent / "deepspeed"
    train = [deepspeed, "--num_gpus", 1, "--master_port", free_port(), "launch/train.py", "--ds",
             "ds_configs/zero2.json", "--model", base, "--data", work / "data.jsonl", "--max-steps", 2,
             "--save-steps", 1, "--micro-batch", 1, "--global-batch", 1, "--dai-samples", 32, "--logging-steps", 1,
             "--overlong", "truncate", "--output", run]  # fmt: skip
    evaluate = ["--limit", 2, "--max-new-tokens", 8, "--backend", "vllm", "--kv-cache-gb", 1]
    training = [
        Stage("train-to-step-1", [*train, "--stop-at-step", 1], run / "checkpoints" / "checkpoint-1"),
        Stage("resume-to-step-2", [*train, "--resume"], run / "adapter_model.safetensors"),
    ]
    if untrained:
        training = [Stage("adapter-untrained", [python, __file__, "--make-adapter", base, run, work / "data.jsonl"],
                          run / "adapter_model.safetensors")]  # fmt: skip
    return [
        Stage("build", [python, __file__, "--build", base], base / "config.json"),
        *training,
        Stage("export-merged", [python, "launch/export.py", "--adapter", run, "--out", merged], merged / "config.json"),
        Stage(
            "export-lora",
            [python, "launch/export.py", "--adapter", run, "--out", routed, "--format", "lora"],
            routed / "manifest.json",
        ),
        Stage(
            "vllm-merged",
            [python, "eval/gsm8k.py", "--model", merged, *evaluate, "--output", work / "eval-merged"],
            work / "eval-merged" / "summary.json",
        ),
        Stage(
            "vllm-routed",
            [python, "eval/gsm8k.py", "--model", base, "--adapter", run, *evaluate, "--output", work / "eval-routed"],
            work / "eval-routed" / "summary.json",
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/rehearsal"))
    parser.add_argument("--untrained", action="store_true", help="a calibrated adapter saved without training")
    parser.add_argument("--build", type=Path, help=argparse.SUPPRESS)  # stage 1 itself
    parser.add_argument("--make-adapter", nargs=3, type=Path, help=argparse.SUPPRESS)  # --untrained's stage itself
    args = parser.parse_args()
    if args.build is not None:
        build_checkpoint(args.build)
        return
    if args.make_adapter is not None:
        make_adapter(*args.make_adapter)
        return
    work = args.work.resolve()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    if not (work / "data.jsonl").is_file():
        write_data(work / "data.jsonl")
    record_path = work / "rehearsal.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    for stage in stages(work, args.untrained):
        if stage.output.exists():
            print(f"{stage.name}: done already", flush=True)
            continue
        log = work / "logs" / f"{stage.name}.log"
        command = ["/usr/bin/time", "-v", *stage.command_now()]
        print(f"{stage.name}: {' '.join(map(str, command[2:]))}", flush=True)
        started = time.perf_counter()
        with log.open("w") as sink:
            done = subprocess.run(list(map(str, command)), cwd=REPO, stdout=sink, stderr=subprocess.STDOUT)
        seconds = time.perf_counter() - started
        peaks = PEAK.findall(log.read_text(errors="replace"))
        record[stage.name] = {"seconds": round(seconds, 1), "peak_rss_gib": int(peaks[-1]) / 2**20 if peaks else None,
                              "exit": done.returncode}  # fmt: skip
        atomic_write_json(record_path, record)
        print(
            f"{stage.name}: exit {done.returncode}, {seconds:.0f} s, peak RSS {record[stage.name]['peak_rss_gib']} GiB"
        )
        if done.returncode != 0 or not stage.output.exists():
            sys.exit(f"error: stage {stage.name} failed; its log: {log}")
    print("\n| stage | wall time (s) | peak RSS (GiB) |\n|---|---:|---:|")
    for name, row in record.items():
        print(f"| {name} | {row['seconds']:.0f} | {row['peak_rss_gib']:.1f} |")


if __name__ == "__main__":
    main()
