"""TuckA inside trainers that are not our launcher: a plain transformers.Trainer and TRL's SFTTrainer (one process
and DeepSpeed ZeRO-2 on 2 CPU ranks), calibrated by TuckACalibration; their adapters export, serve routed and
evaluate with our commands."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
from conftest import PROMPTS
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainingArguments

import tucka_llm
from tucka_llm.data import llama2_tokenizer, load_metamathqa, tokenize_metamathqa
from tucka_llm.eval.problems import load_problems
from tucka_llm.eval.run import EvalOptions, evaluate
from tucka_llm.export import export_lora, export_merged
from tucka_llm.recipes.stages import free_port
from tucka_llm.serving import RoutedLoRA
from tucka_llm.tucka.calibration import ROUTER_CALIBRATION, calibration_batches, tensor_digest
from tucka_llm.tucka.dai import routers
from tucka_llm.tucka.model import last_routes, routing_states

ROOT = Path(__file__).resolve().parents[1]
DEEPSPEED = Path(sys.executable).parent / "deepspeed"
SMALL = dict(r=4, k=3, t=2, p=2, alpha=8.0, perturb_scale=0.5, target_modules=["q_proj", "v_proj"])


def trainer(tiny_model: Path, output: Path, callbacks: list, lr: float = 0.0) -> Trainer:
    """A plain transformers.Trainer over a TuckA model built with peft's API, as a user writes it."""
    tokenizer = llama2_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    data = tokenize_metamathqa(load_metamathqa("gsm8k-train", 16), tokenizer, 128).dataset
    torch.manual_seed(0)
    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model), tucka_llm.TuckAConfig(**SMALL))
    args = TrainingArguments(
        output_dir=str(output), max_steps=2, per_device_train_batch_size=4, learning_rate=lr, use_cpu=True,
        report_to=[], save_strategy="no", remove_unused_columns=False, logging_steps=1,
    )  # fmt: skip
    return Trainer(
        model=model, args=args, train_dataset=data, data_collator=DataCollatorForSeq2Seq(tokenizer), callbacks=callbacks
    )


def test_a_plain_trainer_calibrates_before_the_first_step_and_records_what_export_reads(tiny_model, tmp_path):
    run = trainer(tiny_model, tmp_path / "run", [tucka_llm.TuckACalibration(samples=8, seed=3)])  # lr 0: E stays
    run.train()
    router = routers(run.model)["default"]

    # Independently: DAI on the same sample of the same data, on an identical model.
    again = trainer(tiny_model, tmp_path / "again", [])
    batches = calibration_batches(again.train_dataset, 8, 3, llama2_tokenizer())
    e = tucka_llm.data_aware_init(again.model, batches, seed=3)["default"]
    assert torch.equal(router.center, e) and int(router.calibrated) == 1
    torch.testing.assert_close(router.centroids, routers(again.model)["default"].centroids)

    record = load_file(tmp_path / "run" / ROUTER_CALIBRATION)  # where export looks for it (the output_dir)
    assert record["default.features"].shape == (8, 64) and torch.equal(record["default.centroid"], e)


def test_a_trainer_without_the_calibration_callback_is_refused_in_one_line(tiny_model, tmp_path):
    with pytest.raises(tucka_llm.UncalibratedRouterError, match=r"add tucka_llm\.TuckACalibration"):
        trainer(tiny_model, tmp_path / "run", [], lr=1e-3).train()


def routing_entropy(model: torch.nn.Module, tokenizer, k: int) -> float:
    """Entropy (nats) of the groups that 32 held-out GSM8K test questions take, one route per sequence."""
    questions = [p.question for p in load_problems("gsm8k", "gsm8k", 32)]
    groups = []
    with tucka_llm.routing(model, "sequence"), torch.no_grad():
        for question in questions:
            model(**tokenizer(question, return_tensors="pt"))
            groups.append(int(routing_states(model)["default"].route.group[0]))
    shares = [groups.count(i) / len(groups) for i in range(k)]
    return -sum(s * math.log(s) for s in shares if s > 0)


@pytest.mark.parametrize("ranks", [1, 2], ids=["one-process", "zero2-two-ranks"])
def test_trl_sft_trains_tucka_and_its_adapter_exports_serves_routed_and_evaluates(tiny_model, tmp_path, ranks):
    output = tmp_path / "trl"
    flags = ["--model", str(tiny_model), "--output", str(output), "--num-examples", "8", "--max-steps", "20"]
    flags += ["--lr", "1e-2", "--batch-size", "2", "--max-length", "128"]
    port = free_port()
    if ranks == 1:
        command = [sys.executable, "examples/trl_sft.py", *flags]
    else:
        command = [str(DEEPSPEED), "--num_gpus", "2", "--master_port", str(port), "examples/trl_sft.py"]
        command += [*flags, "--deepspeed", "ds_configs/zero2.json"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    for leaked in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):  # DeepSpeed's CPU all-reduce
        leaked.unlink()  # never unlinks its buffers (our launcher does: training/run.py); TRL's run does not
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]

    losses = [float(x) for x in re.findall(r"'loss': '([0-9.]+)'", log)]  # TRL's log lines, rank 0
    assert len(losses) == 20, log[-3000:]
    assert sum(losses[-5:]) / 5 < losses[0] - 0.05, losses
    # Every rank trained from the exact DAI values (DeepSpeed's fp32 master set from them).
    dai = load_file(output / ROUTER_CALIBRATION)["default.dai_init"]
    masters = dict(
        re.findall(r"rank (\d): adapter 'default' trains from the DAI centroids: fp32 master digest (\w+)", log)
    )
    assert masters == {str(rank): tensor_digest(dai) for rank in range(ranks)}

    tokenizer = llama2_tokenizer()
    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), output).eval()
    assert routing_entropy(model, tokenizer, 4) >= 0.6 * math.log(4)  # the calibrated router spreads the groups

    # Merged export (the route its calibration record chooses), exactly the unmerged adapter under that route.
    merged = export_merged(output, tmp_path / "merged", dtype="float32")
    inputs = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with tucka_llm.routing(model, merged.route.route), torch.no_grad():
        expected = model(**inputs).logits
        actual = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")(**inputs).logits
    assert (actual - expected).norm() / expected.norm() <= 1e-5

    # Routed serving: the prompt router routes a prompt as the adapter does.
    routed = RoutedLoRA(export_lora(output, tmp_path / "routed").path)
    ids = tokenizer(PROMPTS[0])["input_ids"]
    with tucka_llm.routing(model, "sequence", gate_levels=routed.gate_levels), torch.no_grad():
        model(input_ids=torch.tensor([ids]))
        taken = last_routes(model)[0]
    assert routed.prompt_router().routes([ids])[0] == taken

    summary = evaluate(
        EvalOptions(task="gsm8k", model=str(tiny_model), adapter=str(output), data="gsm8k", limit=2, backend="hf",
                    max_new_tokens=6, output=str(tmp_path / "eval"))
    )  # fmt: skip
    assert summary["n"] == 2 and summary["adapter"] == str(output.resolve())
