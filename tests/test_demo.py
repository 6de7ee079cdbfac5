"""launch/demo.py end to end at smoke size: the real SmolLM2 model, DeepSpeed on 2 CPU ranks, export, vLLM, report;
and the stage runner that skips finished stages and fails loudly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tucka_llm.eval.backends import vllm_available
from tucka_llm.recipes.stages import Stage, StageFailed, run_stages, train_stage

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not vllm_available(), reason="the eval-cpu extra installs vLLM's CPU build")
def test_demo_trains_exports_evaluates_and_reports_then_skips_what_is_done(tmp_path):
    output = tmp_path / "demo"
    command = [sys.executable, str(REPO / "launch" / "demo.py"), "--smoke", "--output", str(output)]
    command += ["--model-cache", str(tmp_path / "smollm2")]
    first = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    assert "[3/7] train: " in first.stdout and "deepspeed --num_gpus 2" in first.stdout
    assert "GSM8K, first 2 test problems: base" in first.stdout and "held-out loss on their reference" in first.stdout

    assert json.loads((tmp_path / "smollm2" / "config.json").read_text())["model_type"] == "llama"
    assert (output / "train" / "adapter_model.safetensors").is_file()
    route = json.loads((output / "merged" / "tucka_route.json").read_text())
    assert route["router"] == "centred" and route["chosen_by"].startswith("the mean update")
    for evaluation in ("eval-base", "eval"):
        summary = json.loads((output / evaluation / "summary.json").read_text())
        assert summary["n"] == 2 and summary["backend"] == "vllm"
        assert json.loads((output / evaluation / "held_out_loss.json").read_text())["problems"] == 2
    report = (output / "report" / "report.md").read_text()
    assert "TuckA r16 k4" in report and "(n=2)" in report and "(gsm8k, n=2)" in report
    assert [p.stat().st_size > 1000 for p in (output / "report").glob("*_expert_load.png")] == [True]
    assert (output / "report" / "loss.png").stat().st_size > 1000

    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("done already") == 7


def test_a_failing_stage_stops_the_pipeline_naming_it_and_its_log(tmp_path):
    made = tmp_path / "first.txt"
    stages = [
        Stage("first", [sys.executable, "-c", f"open({str(made)!r}, 'w').write('x')"], made),
        Stage("broken", [sys.executable, "-c", "print('looking'); raise SystemExit('no data here')"], tmp_path / "b"),
        Stage("never", [sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "c"),
    ]
    failure = r"stage 'broken' failed \(exit code 1\).*broken\.log:\nlooking\nno data here"
    with pytest.raises(StageFailed, match=failure):
        run_stages(stages, tmp_path / "logs")
    assert made.read_text() == "x" and not (tmp_path / "logs" / "never.log").exists()


def test_table3_recipe_runs_its_stages_at_tiny_scale_and_compares_with_the_paper(tiny_model, tmp_path):
    output = tmp_path / "table3"
    command = [sys.executable, str(REPO / "launch" / "reproduce_table3.py"), "--scale", "tiny"]
    command += ["--model", str(tiny_model), "--gpus", "2", "--configs", "tucka-r16k4", "--output", str(output)]
    first = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    assert "[1/5] tucka-r16k4-train: " in first.stdout and "--num_gpus 2" in first.stdout
    for task in ("gsm8k", "math"):
        summary = json.loads((output / "tucka-r16k4" / task / "summary.json").read_text())
        assert summary["n"] == 2 and summary["task"] == task
    table = (output / "table3.md").read_text()
    assert "| tucka-r16k4 | 7.26 | " in table and " | 50.34 | " in table
    assert (output / "report" / "report.md").is_file()

    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("done already") == 5


def test_table3_recipe_refuses_unknown_configurations():
    command = [sys.executable, str(REPO / "launch" / "reproduce_table3.py"), "--configs", "tucka-r64"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--configs: unknown tucka-r64; choose from tucka-r16k4" in result.stderr


def test_an_interrupted_training_stage_continues_from_its_checkpoint(tiny_model, tmp_path):
    run = tmp_path / "train"
    flags = ["--model", tiny_model, "--data", "gsm8k-train", "--num-examples", "4", "--max-len", "128", "--r", "4",
             "--k", "3", "--alpha", "8", "--precision", "fp32", "--micro-batch", "2", "--global-batch", "4",
             "--max-steps", "2", "--logging-steps", "1", "--save-steps", "1"]  # fmt: skip
    stage = train_stage("train", 2, run, *flags)
    # A job time limit ends the stage after step 1, with checkpoint-1 complete and no adapter.
    interrupted = subprocess.run([*stage.command_now(), "--stop-at-step", "1"], capture_output=True, text=True)
    assert interrupted.returncode == 0 and not stage.output.exists(), interrupted.stderr[-3000:]
    run_stages([stage], tmp_path / "logs")
    log = (tmp_path / "logs" / "train.log").read_text()
    assert "resuming from" in log and "checkpoint-1" in log
    assert stage.output.is_file()
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
