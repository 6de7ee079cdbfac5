"""launch/train.py for real: DeepSpeed on 2 CPU ranks (gloo), a tiny Llama, the real tokenizer, the shipped data."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import peft
import pytest
import torch
from conftest import PROMPTS
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import tucka_llm
from tucka_llm.data import llama2_tokenizer, load_metamathqa, tokenize_metamathqa
from tucka_llm.export import export_lora, export_merged
from tucka_llm.io.locking import exclusive_directory
from tucka_llm.models import tiny_llama_config
from tucka_llm.recipes.stages import free_port
from tucka_llm.training import parse_options
from tucka_llm.training.adapters import add_adapter, load_base_model
from tucka_llm.tucka.calibration import calibration_batches, tensor_digest
from tucka_llm.tucka.dai import data_aware_init

ROOT = Path(__file__).resolve().parents[1]
DEEPSPEED = Path(sys.executable).parent / "deepspeed"
TUCKA = ["--r", "4", "--k", "3", "--alpha", "8", "--perturb-scale", "0.5"]
LORA = ["--lora-r", "4", "--lora-alpha", "8"]


def train_script(model: Path, output: Path, *flags: str, ds: str = "zero2", method: str = "tucka") -> list[str]:
    """``launch/train.py`` and its flags: the tiny model, the shipped data, small adapters, then ``flags``."""
    return [
        "launch/train.py", "--ds", f"ds_configs/{ds}.json", "--model", str(model), "--data", "gsm8k-train",
        "--output", str(output), "--method", method, *TUCKA, *LORA, "--save-steps", "1000", *flags,
    ]  # fmt: skip


def launch(model: Path, output: Path, *flags: str, ds: str = "zero2", method: str = "tucka") -> str:
    """Run the launcher on 2 ranks through DeepSpeed's own launcher; return its output (stdout and stderr)."""
    port = free_port()
    command = [str(DEEPSPEED), "--num_gpus", "2", "--master_port", str(port)]
    command += train_script(model, output, *flags, ds=ds, method=method)
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    # DeepSpeed's CPU all-reduce buffers in /dev/shm are released when the ranks exit (see run.py).
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    return log


def rank_digests(log: str, what: str) -> dict[int, str]:
    return {int(rank): digest for rank, digest in re.findall(rf"rank (\d): {what} (\w+)", log)}


def metrics(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


SMALL_REPEATED_SET = ["--num-examples", "8", "--max-len", "128", "--micro-batch", "2", "--global-batch", "4"]


@pytest.mark.parametrize("method", ["tucka", "lora", "dora"])
def test_each_method_trains_on_two_ranks_with_falling_loss_and_identical_adapters(tiny_model, tmp_path, method):
    output = tmp_path / "run"
    fast = ["--precision", "fp32", "--lr", "1e-2", "--warmup-ratio", "0", "--max-steps", "30", "--logging-steps", "1"]
    log = launch(tiny_model, output, *SMALL_REPEATED_SET, *fast, method=method)

    losses = [m["loss"] for m in metrics(output)]
    assert len(losses) == 30 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < losses[0] - 0.05, losses
    digests = rank_digests(log, "trained adapter digest")
    assert set(digests) == {0, 1} and digests[0] == digests[1]

    saved = load_file(output / "adapter_model.safetensors")
    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), output)
    assert peft.get_peft_model_state_dict(model).keys() == saved.keys()
    assert all(torch.equal(peft.get_peft_model_state_dict(model)[k], v) for k, v in saved.items())
    assert json.loads((output / "adapter_config.json").read_text())["peft_type"] == {
        "tucka": "TUCKA", "lora": "LORA", "dora": "LORA"
    }[method]  # fmt: skip

    # The finished run exports as it is: the base and tokenizer it recorded and, for TuckA, its training centroid.
    result = export_merged(output, tmp_path / "merged", dtype="float32")
    inputs = llama2_tokenizer()(PROMPTS, return_tensors="pt", padding=True)
    route = contextlib.nullcontext() if result.route is None else tucka_llm.routing(model, result.route.route)
    with route, torch.no_grad():
        expected = model.eval()(**inputs).logits
        actual = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")(**inputs).logits
    assert (actual - expected).norm() / expected.norm() <= 1e-5


# A 4-bit base and 8-bit AdamW together. The adapters are above bitsandbytes' 4,096-element threshold (TuckA r16,
# LoRA/DoRA r32), so that the ZeRO-2 partition each rank's optimizer steps gets 8-bit states (it keeps 32-bit states
# for smaller tensors). fp32 compute: bf16 matmuls are ~10x slower on this CPU (tests/test_gpu_suite.py trains on a
# 4-bit base computing in bf16).
QUANTIZED = ["--quantize", "4bit", "--optim", "adamw_8bit", "--r", "16", "--lora-r", "32", "--lr", "3e-2",
             "--warmup-ratio", "0", "--max-steps", "8", "--save-steps", "4", "--logging-steps", "1",
             "--precision", "fp32"]  # fmt: skip


@pytest.fixture(scope="module")
def runs_on_a_4bit_base(tiny_model, tmp_path_factory) -> Callable[[str], tuple[Path, str]]:
    """``run(method)``: (output, log) of the method trained on 2 ranks with QUANTIZED, launched on first use only."""
    runs: dict[str, tuple[Path, str]] = {}

    def run(method: str) -> tuple[Path, str]:
        if method not in runs:
            output = tmp_path_factory.mktemp(f"4bit-{method}") / "run"
            runs[method] = output, launch(tiny_model, output, *SMALL_REPEATED_SET, *QUANTIZED, method=method)
        return runs[method]

    return run


def optimizer_states(checkpoint: Path, rank: int) -> list[dict[str, torch.Tensor]]:
    """The bitsandbytes states of one rank's ZeRO partition in a checkpoint (DeepSpeed's pickled shard)."""
    (shard,) = checkpoint.glob(f"global_step*/*zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
    state = torch.load(shard, weights_only=False)["optimizer_state_dict"]["base_optimizer_state"]["state"]
    return [s["__bnb_optimizer_quant_state__"] for s in state.values()]


@pytest.mark.parametrize("method", ["tucka", "lora", "dora"])
def test_each_method_trains_on_a_4bit_base_with_8bit_adamw_and_exports_into_the_full_precision_base(
    runs_on_a_4bit_base, tiny_model, tmp_path, method, caplog
):
    output, log = runs_on_a_4bit_base(method)
    assert "base: 14 Linear layers in 4-bit NF4 with double quantisation, computing in float32" in log
    losses = [m["loss"] for m in metrics(output)]
    assert len(losses) == 8 and all(torch.isfinite(torch.tensor(losses)))
    # Steps 1-4 and 5-8 each cover the 7 examples twice (2 steps per epoch): the same data, 0.03-0.07 lower at the end.
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.01, losses
    digests = rank_digests(log, "trained adapter digest")
    assert set(digests) == {0, 1} and digests[0] == digests[1]
    for rank in (0, 1):  # bitsandbytes' 8-bit AdamW stepped each rank's partition: its moments are stored in 8 bits
        states = optimizer_states(output / "checkpoints" / "checkpoint-8", rank)
        assert states and all(s["state1"].dtype == s["state2"].dtype == torch.uint8 for s in states)

    record = {"flag": "--quantize 4bit", "library": "bitsandbytes", "bnb_4bit_quant_type": "nf4",
              "bnb_4bit_use_double_quant": True, "bnb_4bit_compute_dtype": "float32"}  # fmt: skip
    assert json.loads((output / "base_quantization.json").read_text()) == record
    assert json.loads((output / "run_config.json").read_text())["base_quantization"] == record

    # Export merges into the base as stored (float32), not the 4-bit one, and says so; the merged model is the
    # adapter on that full-precision base.
    logger = logging.getLogger("tucka_llm")
    logger.addHandler(caplog.handler)  # the training tests may have stopped this logger's propagation
    try:
        with caplog.at_level(logging.INFO, logger="tucka_llm"):
            result = export_merged(output, tmp_path / "merged", dtype="float32")
    finally:
        logger.removeHandler(caplog.handler)
    assert "trained on its base quantised to 4-bit NF4" in caplog.text
    assert f"exported against {tiny_model} loaded in full precision (float32)" in caplog.text
    assert "Trained on the base quantised to 4-bit NF4" in (tmp_path / "merged" / "README.md").read_text()
    assert json.loads((tmp_path / "merged" / "tucka_export.json").read_text())["trained_on_quantized_base"] == record
    if method == "tucka":  # routed LoRA export takes W U from the full-precision base too, and says so
        export_lora(output, tmp_path / "routed")
        assert json.loads((tmp_path / "routed" / "manifest.json").read_text())["trained_on_quantized_base"] == record
        assert "Trained on the base quantised to 4-bit NF4" in (tmp_path / "routed" / "README.md").read_text()
    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), output).eval()
    assert not any("Linear4bit" in type(m).__name__ for m in model.modules())
    inputs = llama2_tokenizer()(PROMPTS, return_tensors="pt", padding=True)
    route = contextlib.nullcontext() if result.route is None else tucka_llm.routing(model, result.route.route)
    with route, torch.no_grad():
        expected = model(**inputs).logits
        actual = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")(**inputs).logits
    assert (actual - expected).norm() / expected.norm() <= 1e-5


def wait_for_nodes(nodes: list[subprocess.Popen], timeout: float) -> list[int]:
    """Each node's exit status. When one fails (or time is up) the others are ended, process group and all: their
    ranks would otherwise wait for the failed one until the rendezvous times out."""
    deadline = time.monotonic() + timeout
    while any(node.poll() is None for node in nodes):
        if any(node.returncode not in (None, 0) for node in nodes) or time.monotonic() > deadline:
            for node in nodes:
                if node.poll() is None:
                    os.killpg(node.pid, signal.SIGTERM)
            break
        time.sleep(1)
    return [node.wait() for node in nodes]


def test_two_deepspeed_nodes_on_one_host_resume_a_checkpoint_to_the_uninterrupted_runs_adapter(
    runs_on_a_4bit_base, tiny_model, tmp_path
):
    """Two DeepSpeed nodes of one rank each on loopback addresses, started as each node of a cluster without ssh is
    (``--no_ssh --node_rank N``, one hostfile). They resume the 2-rank TuckA run above from its step-4 checkpoint,
    as a run moved onto a cluster would be, and end with the uninterrupted run's adapter, the same on both nodes."""
    straight, _ = runs_on_a_4bit_base("tucka")
    output = tmp_path / "run"
    output.mkdir()
    for name in ("run_config.json", "metrics.jsonl", "tucka_router_calibration.safetensors"):
        shutil.copy(straight / name, output / name)  # what the run had written when its step-4 checkpoint was done
    shutil.copytree(straight / "checkpoints" / "checkpoint-4", output / "checkpoints" / "checkpoint-4")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("127.0.0.1 slots=1\n127.0.0.2 slots=1\n")
    port = free_port()
    script = train_script(tiny_model, output, *SMALL_REPEATED_SET, *QUANTIZED, "--resume")
    nodes, logs = [], [tmp_path / f"node{n}.log" for n in (0, 1)]
    for node, log in enumerate(logs):
        command = [str(DEEPSPEED), "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node),
                   "--master_addr", "127.0.0.1", "--master_port", str(port), *script]  # fmt: skip
        with log.open("w") as sink:
            nodes.append(subprocess.Popen(command, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT,
                                          start_new_session=True))  # fmt: skip
    codes = wait_for_nodes(nodes, timeout=600)
    text = [log.read_text() for log in logs]
    assert codes == [0, 0], text[0][-3000:] + text[1][-3000:]
    for node in (0, 1):
        assert f"nnodes=2, num_local_procs=1, node_rank={node}" in text[node]
    assert "resuming from" in text[0] and "checkpoint-4" in text[0]
    assert rank_digests(text[0], "trained adapter digest")[0] == rank_digests(text[1], "trained adapter digest")[1]
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))

    expected = load_file(straight / "adapter_model.safetensors")
    resumed = load_file(output / "adapter_model.safetensors")
    assert resumed.keys() == expected.keys() and all(torch.equal(resumed[k], expected[k]) for k in expected)
    assert [(m["step"], m["loss"]) for m in metrics(output)] == [(m["step"], m["loss"]) for m in metrics(straight)]


def test_bf16_tucka_run_trains_from_the_dai_centroids_on_both_ranks_and_writes_a_complete_run(tiny_model, tmp_path):
    output = tmp_path / "run"
    flags = [*SMALL_REPEATED_SET, "--max-steps", "4", "--logging-steps", "2", "--dai-samples", "6"]
    log = launch(tiny_model, output, *flags, "--precision", "bf16")

    calibration = load_file(output / "tucka_router_calibration.safetensors")
    dai = calibration["default.dai_init"]
    masters = rank_digests(log, r"adapter 'default' trains from the DAI centroids: fp32 master digest")
    assert masters == {0: tensor_digest(dai), 1: tensor_digest(dai)}  # exact fp32 DAI values, not bf16-rounded

    # The DAI values are what DAI gives on the same sample and seed, computed here independently of the run.
    options = parse_options(["--model", str(tiny_model), "--data", "gsm8k-train", *TUCKA, *flags])
    model = add_adapter(load_base_model(options), options)
    data = tokenize_metamathqa(load_metamathqa("gsm8k-train", 8), llama2_tokenizer(), 128)
    batches = calibration_batches(data.dataset, 6, options.seed, llama2_tokenizer())
    centroid = data_aware_init(model, batches, seed=options.seed)
    assert torch.allclose(calibration["default.centroid"], centroid["default"], rtol=1e-5, atol=1e-6)
    assert bf16_differs_from(dai)

    # e_bar (the centred router's frozen centre): the fp32 calibration centroid on both ranks and in the saved
    # adapter, exactly, though the run computes in bf16.
    e_bar = calibration["default.centroid"]
    assert rank_digests(log, r"adapter 'default' e_bar digest") == {0: tensor_digest(e_bar), 1: tensor_digest(e_bar)}
    (saved,) = [v for k, v in load_file(output / "adapter_model.safetensors").items() if "tucka_router.center" in k]
    assert saved.dtype == torch.float32 and torch.equal(saved, e_bar) and bf16_differs_from(e_bar)
    assert calibration["default.features"].shape == (6, 64)

    names = {p.name for p in output.iterdir()}
    expected = {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json"}
    expected |= {
        "run_config.json",
        "metrics.jsonl",
        "tensorboard",
        "checkpoints",
        "tucka_router_calibration.safetensors",
    }
    assert expected <= names and ".final.tmp" not in names
    assert any((output / "tensorboard").iterdir())
    record = metrics(output)[-1]
    for key in ("loss", "learning_rate", "grad_norm", "tokens_per_s", "peak_memory_gb/rank1", "routing_entropy"):
        assert key in record, key
    assert sum(record[f"expert_load/group{i}"] for i in range(3)) == pytest.approx(1.0)
    config = json.loads((output / "run_config.json").read_text())
    assert (config["world_size"], config["gradient_accumulation_steps"], config["global_batch"]) == (2, 1, 4)
    resolved = {key: config["adapter_config"][key] for key in ("alpha", "router", "normalize_gates")}
    assert resolved == {"alpha": 8.0, "router": "centred", "normalize_gates": True}  # --alpha auto, resolved
    ds = config["deepspeed_config"]
    assert ds["zero_optimization"]["stage"] == 2 and ds["bf16"]["enabled"] is True
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (
        4,
        2,
        1,
    )
    assert "auto" not in json.dumps(ds)  # every "auto" of ds_configs/zero2.json was filled from the flags
    # ZeRO-2 allocates two gradient buffers of reduce_bucket_size elements, however few parameters train: sized from
    # the model (hidden size squared), not 5e8 (2 x 0.93 GiB in bf16)
    assert ds["zero_optimization"]["reduce_bucket_size"] == tiny_llama_config().hidden_size ** 2


def bf16_differs_from(values: torch.Tensor) -> bool:
    """The fp32 DAI values are not all representable in bf16 (so the master check above is not vacuous)."""
    return not torch.equal(values.to(torch.bfloat16).float(), values)


@pytest.mark.parametrize("router", ["centred", "redraw"])
def test_stop_and_resume_gives_the_weights_of_an_uninterrupted_run(tiny_model, tmp_path, router):
    """Also for the redraw router, whose random draws are keyed by step: the resumed run draws the same routes."""
    # 12 examples, 4 per step: the 8 steps cross two epoch boundaries; accumulation 2 on 2 ranks.
    flags = ["--num-examples", "12", "--max-len", "128", "--global-batch", "4", "--max-steps", "8", "--save-steps", "4"]
    flags += ["--precision", "fp32", "--lr", "1e-2", "--logging-steps", "1", "--router", router]
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    launch(tiny_model, straight, *flags)
    first = launch(tiny_model, interrupted, *flags, "--stop-at-step", "5")
    assert "stopped at step 5 of 8" in first
    assert not (interrupted / "adapter_model.safetensors").exists()  # a stopped run does not look finished
    # A run killed while writing checkpoint-6 leaves it without its completion marker: resume must skip it.
    half_written = interrupted / "checkpoints" / "checkpoint-6"
    shutil.copytree(interrupted / "checkpoints" / "checkpoint-5", half_written)
    (half_written / "tucka_checkpoint_complete.json").unlink()
    second = launch(tiny_model, interrupted, *flags, "--resume")
    assert "resuming from" in second and "checkpoint-5" in second and not half_written.exists()

    a = load_file(straight / "adapter_model.safetensors")
    b = load_file(interrupted / "adapter_model.safetensors")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-6, atol=1e-7)
    assert [(m["step"], m["loss"]) for m in metrics(interrupted)] == [(m["step"], m["loss"]) for m in metrics(straight)]
    loads = [[m[f"expert_load/group{i}"] for i in range(3)] for m in metrics(straight)]
    assert [[m[f"expert_load/group{i}"] for i in range(3)] for m in metrics(interrupted)] == loads
    assert len({tuple(load) for load in loads}) > 1, "every step took the same group: the routes were not exercised"
    assert any("tucka_router.center" in k for k in a) == (router == "centred")


@pytest.mark.parametrize(
    ("ds", "flags"),
    [("zero2_offload", ["--precision", "bf16"]), ("zero3", ["--precision", "fp32", "--gradient-checkpointing"])],
)
def test_offload_and_zero3_configs_train_a_few_steps(tiny_model, tmp_path, ds, flags):
    output = tmp_path / "run"
    log = launch(tiny_model, output, *SMALL_REPEATED_SET, "--max-steps", "3", *flags, ds=ds)
    digests = rank_digests(log, "trained adapter digest")
    assert set(digests) == {0, 1} and digests[0] == digests[1]
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics(output))
    assert (output / "adapter_model.safetensors").is_file()
    record = json.loads((output / "run_config.json").read_text())
    # ZeRO-3: no rank ever holds the whole base (HF's loader partitions it as it loads); else the CPU, whole
    assert record["base_placement"] == ("partitioned over the ranks (ZeRO-3)" if ds == "zero3" else "cpu")
    assert len(record["host_peak_rss_gb_at_load"]) == 2 and all(v > 0 for v in record["host_peak_rss_gb_at_load"])


def test_one_process_without_deepspeed_trains_and_saves_a_loadable_adapter(tiny_model, tmp_path):
    output = tmp_path / "run"
    command = [sys.executable, "launch/train.py", "--model", str(tiny_model), "--data", "gsm8k-train", "--output",
               str(output), *TUCKA, *SMALL_REPEATED_SET, "--max-steps", "3", "--precision", "fp32"]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert json.loads((output / "run_config.json").read_text())["deepspeed_config"] is None
    assert [m["step"] for m in metrics(output)] == [1, 3]  # logging_first_step, then every --logging-steps 10
    peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), output)


def test_a_two_rank_run_on_a_directory_in_use_is_refused_naming_the_holder(tiny_model, tmp_path):
    """Rank 0 holds --output's lock; a second launch (say a --resume while the first run's ranks outlive their
    killed launcher) is refused by its rank 0 in one line, before any rank reports anything else."""
    output = tmp_path / "run"
    command = [str(DEEPSPEED), "--num_gpus", "2", "--master_port", str(free_port()), "launch/train.py", "--ds",
               "ds_configs/zero2.json", "--model", str(tiny_model), "--output", str(output), "--resume"]  # fmt: skip
    with exclusive_directory(output, "--output"):  # this test process stands for the live run's rank 0
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("error: ")]
    assert result.returncode != 0
    assert errors == [f"error: --output {output} is in use by another process (pid {os.getpid()}); wait for it to "
                      "end (or end it), then run again."]  # fmt: skip
