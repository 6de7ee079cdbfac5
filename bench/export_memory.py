"""Peak memory and wall time of ``launch/export.py`` for TuckA and LoRA adapters on one base, side by side.

    python bench/export_memory.py                        # Llama-2-7B shape, fp16 base (13.5 GB), CPU merge
    python bench/export_memory.py --shape small          # a 45M Llama, a minute

The question it answers: does a 7B base merge on a machine with ~32 GB of RAM and no GPU? The base checkpoint is
written here with random weights in the dtype Llama-2-7b-hf ships in (float16), in 2 GB safetensors shards with an
index, and with the shipped Llama-2 tokenizer; each adapter has the reference run's shapes (TuckA r16 k4 t2 p2,
LoRA r32, on q_proj and v_proj) and random values, plus TuckA's router record. Each export runs as its own process
(bf16 output, the default); its peak resident set (``ru_maxrss``: anonymous memory plus the pages of the memory-mapped
checkpoint it has touched) is read when it exits. The ratio column divides by LoRA's, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import peft
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

import tucka_llm
from tucka_llm.data import llama2_tokenizer
from tucka_llm.models import llama2_7b_config, small_llama_config
from tucka_llm.tucka.calibration import ROUTER_CALIBRATION, save_router_calibration

REPO = Path(__file__).resolve().parents[1]
SHARD_BYTES = 2 * 1024**3
# Reports the peak resident set of its child (the export) in KiB on its last line.
MAXRSS_WRAPPER = (
    "import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)"
)


def model_config(shape: str) -> LlamaConfig:
    if shape == "llama2-7b":
        return llama2_7b_config()
    return small_llama_config()


def write_base(config: LlamaConfig, directory: Path) -> int:
    """A random float16 checkpoint of ``config`` in shards with an index, written shard by shard (never whole)."""
    with torch.device("meta"):
        shapes = {name: p.shape for name, p in LlamaForCausalLM(config).state_dict().items()}
    directory.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    size = 0

    def flush() -> None:
        name = f"shard-{len(set(weight_map.values())) + 1:05d}.safetensors"
        save_file(shard, str(directory / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        shard.clear()

    for name, shape in shapes.items():
        tensor = torch.ones(shape, dtype=torch.float16)  # norms stay 1
        if len(shape) == 2:
            tensor.normal_(0.0, 0.02, generator=generator)
        if shard and sum(t.nbytes for t in shard.values()) + tensor.nbytes > SHARD_BYTES:
            flush()
        shard[name] = tensor
        size += tensor.nbytes
    flush()
    index = {"metadata": {"total_size": size}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.dtype = "float16"
    config.save_pretrained(directory)
    llama2_tokenizer().save_pretrained(directory)
    return size


def write_adapter(config: LlamaConfig, base: Path, method: str, directory: Path) -> None:
    """An adapter directory of the reference shapes with random values, as launch/train.py leaves one."""
    if method == "tucka":
        adapter_config = tucka_llm.TuckAConfig(r=16, k=4, t=2, p=2, alpha=512, target_modules=["q_proj", "v_proj"])
    else:
        adapter_config = peft.LoraConfig(r=32, lora_alpha=32, target_modules=["q_proj", "v_proj"])
    adapter_config.task_type = "CAUSAL_LM"
    with torch.device("meta"):
        model = peft.get_peft_model(LlamaForCausalLM(config), adapter_config)
    shapes = {name: p.shape for name, p in peft.get_peft_model_state_dict(model).items()}
    generator = torch.Generator().manual_seed(1)
    tensors = {name: torch.randn(shape, generator=generator) * 0.02 for name, shape in shapes.items()}
    directory.mkdir(parents=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    adapter_config.base_model_name_or_path = str(base)
    adapter_config.save_pretrained(directory)
    llama2_tokenizer().save_pretrained(directory)
    if method == "tucka":
        e = torch.randn(config.hidden_size, generator=generator)
        save_router_calibration(directory / ROUTER_CALIBRATION, {"default": e}, {}, {"data": "random"})


def export(adapter: Path, out: Path, device: str) -> tuple[float, float]:
    """Run launch/export.py in its own process; its peak resident set (GB) and wall time (s)."""
    command = [sys.executable, str(REPO / "launch" / "export.py"), "--adapter", str(adapter), "--out", str(out)]
    command += ["--device", device, "--force"]
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", MAXRSS_WRAPPER, *command], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"export of {adapter} failed:\n{result.stderr[-3000:]}")
    return int(result.stdout.strip().splitlines()[-1]) * 1024 / 1e9, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=("llama2-7b", "small"), default="llama2-7b")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/tucka-export-bench"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--keep", action="store_true", help="keep the base and merged checkpoints")
    args = parser.parse_args()

    config = model_config(args.shape)
    work = args.workdir / args.shape
    shutil.rmtree(work, ignore_errors=True)
    start = time.perf_counter()
    size = write_base(config, work / "base")
    print(f"base: {size / 1e9:.1f} GB float16 in {time.perf_counter() - start:.0f} s", flush=True)
    results = {}
    for method in ("tucka", "lora"):
        write_adapter(config, work / "base", method, work / method)
        results[method] = export(work / method, work / f"merged-{method}", args.device)
        print(f"{method}: peak {results[method][0]:.2f} GB, {results[method][1]:.0f} s", flush=True)
        shutil.rmtree(work / f"merged-{method}", ignore_errors=True)
    if not args.keep:
        shutil.rmtree(work)

    gib = psutil_total_gib()
    print(f"\nexport of a {args.shape} base ({size / 1e9:.1f} GB float16) to bfloat16, merge on {args.device}")
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, {gib} RAM\n")
    print("| method | peak RSS (GB) | peak / base checkpoint | peak vs LoRA | wall (s) | wall vs LoRA |")
    print("|---|---:|---:|---:|---:|---:|")
    lora_peak, lora_wall = results["lora"]
    for method, (peak, wall) in results.items():
        print(
            f"| {method} | {peak:.2f} | {peak / (size / 1e9):.2f} | {peak / lora_peak:.3f} | {wall:.0f} | "
            f"{wall / lora_wall:.2f} |"
        )


def psutil_total_gib() -> str:
    with open("/proc/meminfo") as f:
        kib = int(f.readline().split()[1])
    return f"{kib / 1024**2:.0f} GiB"


if __name__ == "__main__":
    main()
