"""launch/train.py refuses bad input with a message that says what to change, and leaves nothing that looks finished."""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from unittest.mock import patch

import pytest

from tucka_llm.data import DataError
from tucka_llm.eval.problems import load_problems
from tucka_llm.io.locking import OutputInUse
from tucka_llm.models import llama2_7b_config
from tucka_llm.training import build_parser, parse_options, train
from tucka_llm.training.adapters import ModelError
from tucka_llm.training.arguments import gradient_accumulation
from tucka_llm.training.options import RunError
from tucka_llm.training.trainer import NonFiniteError, RunTrainer, metrics_line
from tucka_llm.tucka.config import width_scaled_alpha

ROOT = Path(__file__).resolve().parents[1]


def run(tiny_model: Path, output: Path, *flags: str) -> None:
    base = ["--model", str(tiny_model), "--output", str(output), "--r", "4", "--k", "3", "--alpha", "8"]
    train(parse_options([*base, "--max-steps", "2", "--global-batch", "1", "--precision", "fp32", *flags]))


def assert_not_finished(output: Path) -> None:
    assert not (output / "adapter_model.safetensors").exists()
    assert not (output / "adapter_config.json").exists()


def test_malformed_json_line_stops_with_file_and_line(tiny_model, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text('{"query": "1+1?", "response": "2. The answer is: 2"}\n{"query": "2+2?", "response": \n')
    with pytest.raises(DataError, match=rf"{data}:2: not valid JSON"):
        run(tiny_model, tmp_path / "out", "--data", str(data))
    assert_not_finished(tmp_path / "out")


def test_record_without_query_or_response_is_named(tiny_model, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text('{"query": "1+1?", "response": "The answer is: 2"}\n{"query": "2+2?", "answer": "4"}\n')
    with pytest.raises(DataError, match=r"record 2 \(0-based index 1\) has no 'response'"):
        run(tiny_model, tmp_path / "out", "--data", str(data))


def test_empty_dataset_says_so(tiny_model, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="has no records"):
        run(tiny_model, tmp_path / "out", "--data", str(tmp_path / "empty.jsonl"))


def test_every_example_too_long_says_so(tiny_model, tmp_path):
    with pytest.raises(DataError, match=r"Every one of the 4 examples is longer than --max-len 32.*Raise --max-len"):
        run(tiny_model, tmp_path / "out", "--data", "gsm8k-train", "--num-examples", "4", "--max-len", "32")
    assert_not_finished(tmp_path / "out")


def test_missing_target_modules_list_the_linear_layers_the_model_has(tiny_model, tmp_path):
    for method in ("tucka", "lora"):
        with pytest.raises(
            ModelError, match=r"c_attn not found .* Its Linear layers are: down_proj, gate_proj, k_proj"
        ):
            run(tiny_model, tmp_path / method, "--data", "gsm8k-train", "--num-examples", "4", "--method", method,
                "--target-modules", "q_proj,c_attn")  # fmt: skip


def test_non_empty_output_without_resume_is_refused(tiny_model, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("someone's files")
    with pytest.raises(RunError, match="is not empty: pass --resume"):
        run(tiny_model, tmp_path / "out", "--data", "gsm8k-train")


def test_resume_with_different_flags_lists_them(tiny_model, tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    options = parse_options(["--model", str(tiny_model), "--lr", "0.01"]).to_dict()
    (output / "run_config.json").write_text(json.dumps({"options": options}))
    with pytest.raises(RunError, match=r"--lr was 0.01, now 0.02.*Use the original flags"):
        train(parse_options(["--model", str(tiny_model), "--output", str(output), "--lr", "0.02", "--resume"]))


def test_resume_of_a_finished_run_or_of_nothing_is_refused(tiny_model, tmp_path):
    with pytest.raises(RunError, match=r"no run_config\.json, so no run to resume"):
        train(parse_options(["--model", str(tiny_model), "--output", str(tmp_path / "new"), "--resume"]))
    finished = tmp_path / "finished"
    finished.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (finished / name).write_text("")
    with pytest.raises(RunError, match="holds a finished run"):
        train(parse_options(["--model", str(tiny_model), "--output", str(finished), "--resume"]))


def test_batch_sizes_that_do_not_divide_name_the_flags():
    with pytest.raises(RunError, match=r"--global-batch 32 is not a multiple of --micro-batch 3 x 2 ranks"):
        gradient_accumulation(parse_options(["--micro-batch", "3"]), world_size=2)
    with pytest.raises(RunError, match=r"--grad-accum 3 x --micro-batch 1 x 2 ranks = 6, not --global-batch 8"):
        gradient_accumulation(parse_options(["--grad-accum", "3", "--global-batch", "8"]), world_size=2)
    with pytest.raises(RunError, match=r"--grad-accum 3 x --micro-batch 1 x 8 ranks = 24, not --global-batch 32"):
        gradient_accumulation(parse_options(["--grad-accum", "3", "--global-batch", "32"]), world_size=8)
    assert gradient_accumulation(parse_options([]), world_size=8) == 4  # the reference run: 32 = 1 x 8 x 4
    assert gradient_accumulation(parse_options(["--grad-accum", "3"]), world_size=8) == 3


def test_bad_flag_values_are_refused_by_name(capsys):
    for argv, message in [
        (["--r", "0"], "argument --r: must be > 0"),
        (["--method", "ia3"], "argument --method: invalid choice"),
        (["--warmup-ratio", "1.5"], "--warmup-ratio must be in [0, 1)"),
        (["--ds", "ds_configs/nope.json"], "--ds ds_configs/nope.json: no such file"),
    ]:
        with pytest.raises(SystemExit):
            parse_options(argv)
        assert message in capsys.readouterr().err


def test_defaults_are_the_papers_reference_run():
    options = parse_options([])
    assert (options.model, options.data, options.num_examples) == (
        "meta-llama/Llama-2-7b-hf",
        "meta-math/MetaMathQA",
        100_000,
    )
    assert (options.method, options.r, options.k, options.t, options.p) == ("tucka", 16, 4, 2, 2)
    assert (options.alpha, options.perturb_scale, options.target_module_list) == ("auto", 20, ["q_proj", "v_proj"])
    assert width_scaled_alpha(llama2_7b_config().hidden_size) == 512.0  # "auto" is the paper's 512 on Llama-2-7B
    assert (options.router, options.normalize_gates) == ("centred", True)
    assert (options.epochs, options.max_len, options.precision) == (2, 512, "bf16")
    assert gradient_accumulation(options, world_size=8) * options.micro_batch * 8 == 32
    assert (options.micro_batch, options.lr, options.lr_scheduler, options.warmup_ratio) == (1, 1e-3, "cosine", 0.03)
    assert (options.weight_decay, options.lora_r, options.lora_alpha, options.lora_dropout) == (0, 32, 32, 0)


@pytest.mark.parametrize("value", ["0", "-3", "nan", "inf", "big"])
def test_alpha_must_be_auto_or_a_finite_positive_number(value, capsys):
    with pytest.raises(SystemExit):
        parse_options(["--alpha", value])
    assert "--alpha" in capsys.readouterr().err


def test_help_explains_every_flag_with_its_default():
    wide = {**os.environ, "COLUMNS": "400"}  # no line breaks inside defaults
    result = subprocess.run(
        [sys.executable, "launch/train.py", "--help"], cwd=ROOT, capture_output=True, text=True, env=wide
    )
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for action in build_parser()._actions:
        if action.help == "==SUPPRESS==" or not action.option_strings:
            continue
        assert action.option_strings[0] in text
        assert action.help, action.option_strings
    assert "(default: 512)" in text and "(default: meta-llama/Llama-2-7b-hf)" in text


def test_command_line_errors_are_one_line_without_a_traceback(tiny_model, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text('{"query": "1+1?"\n')
    command = [sys.executable, "launch/train.py", "--model", str(tiny_model), "--data", str(data), "--output",
               str(tmp_path / "out")]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert (
        result.stderr.strip().splitlines()[-1]
        == f"error: {data}:1: not valid JSON (Expecting ',' delimiter at column 17). Fix or remove that record."
    )
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("flags", [["--optim", "adamw_8bit"], ["--quantize", "4bit"]])
def test_8bit_adamw_or_a_4bit_base_without_bitsandbytes_says_how_to_install_it(
    tiny_model, tmp_path, monkeypatch, flags
):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
    )
    with pytest.raises(RunError, match=rf"^{' '.join(flags)} needs bitsandbytes: pip install '\.\[train\]'"):
        run(tiny_model, tmp_path / "out", "--data", "gsm8k-train", *flags)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--lr", "inf"), ("--lr", "nan"), ("--weight-decay", "nan"), ("--perturb-scale", "nan"),
     ("--max-grad-norm", "nan"), ("--max-grad-norm", "inf"), ("--lora-alpha", "inf"), ("--epochs", "inf")],
)  # fmt: skip
def test_non_finite_flag_values_are_refused_by_name(flag, value, capsys):
    with pytest.raises(SystemExit):
        parse_options([flag, value])
    assert f"argument {flag}: must be a finite number" in capsys.readouterr().err


def test_a_non_finite_loss_stops_the_run_at_its_step_and_keeps_the_checkpoints_before_it(tiny_model, tmp_path):
    real = RunTrainer.compute_loss

    def nan_from_step_3(self, *args, **kwargs):  # what a diverging run does: a NaN loss, NaN gradients
        loss = real(self, *args, **kwargs)
        return loss * float("nan") if self.state.global_step >= 2 else loss

    output = tmp_path / "out"
    stops = pytest.raises(
        NonFiniteError,
        match=r"^step 3: not finite \(NaN or inf\): the training loss; the gradient norm \(nan\); the ad",
    )
    with patch.object(RunTrainer, "compute_loss", nan_from_step_3), stops:
        run(tiny_model, output, "--data", "gsm8k-train", "--num-examples", "4", "--max-len", "128",
            "--max-steps", "4", "--save-steps", "2", "--logging-steps", "1")  # fmt: skip
    assert_not_finished(output)
    assert [p.name for p in (output / "checkpoints").iterdir()] == ["checkpoint-2"]
    lines = (output / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line, parse_constant=float_not_allowed)["step"] for line in lines] == [1, 2]


def float_not_allowed(name: str) -> None:
    raise AssertionError(f"bare {name} in metrics.jsonl: not JSON")


def test_metrics_lines_write_non_finite_values_as_null():
    line = metrics_line({"step": 3, "loss": float("nan"), "grad_norm": float("inf"), "learning_rate": 1e-3})
    assert json.loads(line, parse_constant=float_not_allowed) == {
        "step": 3, "loss": None, "grad_norm": None, "learning_rate": 1e-3
    }  # fmt: skip


def test_a_run_that_failed_before_its_first_checkpoint_leaves_a_directory_a_new_run_can_use(tiny_model, tmp_path):
    real = RunTrainer.compute_loss
    output = tmp_path / "out"
    flags = ["--data", "gsm8k-train", "--num-examples", "4", "--max-len", "128", "--logging-steps", "1"]
    with (
        patch.object(RunTrainer, "compute_loss", lambda *a, **k: real(*a, **k) * float("nan")),
        pytest.raises(NonFiniteError, match=r"^step 1: "),
    ):
        run(tiny_model, output, *flags)
    assert (output / "run_config.json").is_file() and (output / "tucka_router_calibration.safetensors").is_file()
    run(tiny_model, output, *flags)  # the corrected command: no "not empty", no --resume needed
    assert (output / "adapter_model.safetensors").is_file()
    assert [json.loads(line)["step"] for line in (output / "metrics.jsonl").read_text().splitlines()] == [1, 2]


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ([], r"must hold a JSON object \(\{\.\.\.\}\), not list"),
        ({"zero_optimization": 2}, r"zero_optimization must be an object, got 2"),
        ({"zero_optimization": {"stage": "two"}}, r"zero_optimization is not valid for DeepSpeed: stage: .*\"two\""),
        (
            {"zero_optimization": {"stage": 2, "bucket": 1}},
            r"zero_optimization is not valid for DeepSpeed: bucket: Extra inputs",
        ),
    ],
)
def test_a_bad_deepspeed_config_is_refused_in_one_line_before_anything_is_written(
    tiny_model, tmp_path, config, message
):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps(config))
    with pytest.raises(RunError, match=rf"^--ds {ds}: {message}") as refused:
        run(tiny_model, tmp_path / "out", "--data", "gsm8k-train", "--ds", str(ds))
    assert "\n" not in str(refused.value) and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("config", "flags", "message"),
    [
        ({"train_micro_batch_size_per_gpu": "x"}, [], r'train_micro_batch_size_per_gpu must be "auto" or a positive'),
        (
            {"train_micro_batch_size_per_gpu": 7},
            ["--micro-batch", "2", "--global-batch", "2"],
            r"train_micro_batch_size_per_gpu is 7, but --micro-batch gives 2: set it",
        ),
        ({"gradient_accumulation_steps": 3}, ["--global-batch", "4"], r"gradient_accumulation_steps is 3, but --grad"),
        ({"bf16": {"enabled": True}, "fp16": {"enabled": True}}, [], r"fp16 is enabled, but this launcher trains in"),
        ({"bf16": {"enabled": True}}, ["--precision", "fp32"], r"bf16 is enabled, but --precision is fp32"),
        ({"gradient_clipping": "high"}, [], r'gradient_clipping must be "auto" or a number'),
    ],
)
def test_a_deepspeed_config_that_contradicts_the_flags_is_refused_before_the_model_loads(
    tiny_model, tmp_path, config, flags, message
):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}, **config}))
    with pytest.raises(RunError, match=rf"^--ds {ds}: {message}") as refused:
        run(tiny_model, tmp_path / "out", "--data", "gsm8k-train", "--ds", str(ds), *flags)
    assert "\n" not in str(refused.value) and not (tmp_path / "out").exists()


def test_train_py_with_ds_but_without_the_deepspeed_launcher_runs_as_one_rank(tiny_model, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    command = [sys.executable, "launch/train.py", "--ds", "ds_configs/zero2.json", "--model", str(tiny_model),
               "--data", "gsm8k-train", "--num-examples", "8", "--max-len", "64", "--max-steps", "2", "--micro-batch",
               "2", "--global-batch", "4", "--precision", "fp32", "--r", "4", "--k", "3", "--alpha", "8",
               "--output", str(tmp_path / "out")]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert "running as one rank" in result.stderr and (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_an_unknown_lr_scheduler_is_refused_before_anything_is_written(capsys):
    with pytest.raises(SystemExit):
        parse_options(["--lr-scheduler", "bogus"])
    assert "--lr-scheduler bogus: unknown; choose one of linear, cosine," in capsys.readouterr().err


def test_data_that_is_not_utf8_is_refused_naming_the_line_by_training_and_evaluation(tiny_model, tmp_path):
    data = tmp_path / "latin1.jsonl"
    data.write_bytes(b'{"query": "1+1?", "response": "The answer is: 2"}\n{"query": "caf\xe9?", "response": "3"}\n')
    message = rf"^{data}:2: not UTF-8 text \(byte 0xe9 at column 15\); save the file as UTF-8\.$"
    with pytest.raises(DataError, match=message):
        run(tiny_model, tmp_path / "out", "--data", str(data))
    with pytest.raises(DataError, match=message):
        load_problems("gsm8k", str(data))


def test_resume_refuses_an_unreadable_run_config_or_another_world_size_in_one_line(tiny_model, tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    options = parse_options(["--model", str(tiny_model), "--output", str(output), "--resume"])
    (output / "run_config.json").write_text('{"options": {"model": "x", ')  # cut short
    with pytest.raises(
        RunError, match=r"^--resume: .*run_config\.json is unreadable \(JSONDecodeError: .*another --output"
    ):
        train(options)
    (output / "run_config.json").write_text(json.dumps({"options": options.to_dict(), "world_size": 2}))
    with pytest.raises(RunError, match=r"^--resume: the run in .* was started on 2 ranks, now 1; resume it on 2"):
        train(options)


def test_a_moved_run_resumes_from_its_newest_checkpoint_whose_marker_is_whole(
    tiny_model, tmp_path, monkeypatch, capsys
):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"query": f"{i}+1?", "response": f"The answer is: {i + 1}"}) + "\n"
                            for i in range(4)))  # fmt: skip
    flags = ["--data", "data.jsonl", "--max-steps", "3", "--save-steps", "1", "--logging-steps", "1"]
    monkeypatch.chdir(tmp_path)
    run(tiny_model, tmp_path / "first", *flags, "--stop-at-step", "2")
    (tmp_path / "first").rename(tmp_path / "moved")
    marker = tmp_path / "moved" / "checkpoints" / "checkpoint-2" / "tucka_checkpoint_complete.json"
    marker.write_text(marker.read_text()[:5])  # cut short by a power loss: checkpoint-2 is not complete
    monkeypatch.chdir(tmp_path / "moved")  # --data typed another way, from another directory
    capsys.readouterr()
    run(tiny_model, tmp_path / "moved", *flags, "--data", "../data.jsonl", "--resume")
    assert (tmp_path / "moved" / "adapter_model.safetensors").is_file()
    log = capsys.readouterr().err
    assert f"removed incomplete checkpoint {marker.parent}" in log and "resuming from" in log
    assert "checkpoints/checkpoint-1\n" in log
    steps = [json.loads(line)["step"] for line in (tmp_path / "moved" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_the_final_adapter_and_checkpoint_files_get_the_mode_of_the_runs_other_files(tiny_model, tmp_path):
    output = tmp_path / "out"
    run(tiny_model, output, "--data", "gsm8k-train", "--num-examples", "2", "--max-len", "128", "--save-steps", "1")
    mode = (output / "run_config.json").stat().st_mode & 0o777
    files = [output / "adapter_model.safetensors", *(output / "checkpoints").rglob("*.safetensors")]
    assert len(files) > 1 and {oct(f.stat().st_mode & 0o777) for f in files} == {oct(mode)}


def test_an_output_that_is_a_file_is_refused_in_one_line(tiny_model, tmp_path):
    (tmp_path / "out").write_text("a file")
    with pytest.raises(OutputInUse, match=rf"^--output {tmp_path / 'out'}: is a file, not a directory; give a dir"):
        run(tiny_model, tmp_path / "out", "--data", "gsm8k-train")


def test_a_full_disk_during_training_is_one_line_and_the_run_resumes(tiny_model, tmp_path, monkeypatch):
    """The disk fills while the second checkpoint is written: one line saying to free space and --resume; the
    first, complete checkpoint is what --resume continues from."""
    import runpy

    original = RunTrainer._save_checkpoint

    def fills_at_step_2(self, model, trial):
        if self.state.global_step == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        original(self, model, trial)

    monkeypatch.setattr(RunTrainer, "_save_checkpoint", fills_at_step_2)
    output = tmp_path / "out"
    flags = ["--model", str(tiny_model), "--output", str(output), "--r", "4", "--k", "3", "--alpha", "8",
             "--max-steps", "3", "--global-batch", "1", "--precision", "fp32", "--save-steps", "1",
             "--data", "gsm8k-train", "--num-examples", "4", "--max-len", "256"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", ["launch/train.py", *flags])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(ROOT / "launch" / "train.py"), run_name="__main__")
    assert str(stop.value).startswith(f"error: no space left on the device of --output {output}")
    assert "--resume" in str(stop.value) and "\n" not in str(stop.value)
    monkeypatch.setattr(RunTrainer, "_save_checkpoint", original)
    train(parse_options([*flags, "--resume"]))
    assert (output / "adapter_model.safetensors").is_file()


def test_a_run_refused_after_taking_its_output_leaves_no_empty_directory(tiny_model, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"query": "1+1?"}\n')
    with pytest.raises(DataError):
        run(tiny_model, tmp_path / "out", "--data", str(data))
    assert not (tmp_path / "out").exists()


def test_a_deepspeed_build_lock_left_by_a_killed_run_is_named_before_the_run_waits_on_it(tmp_path, monkeypatch, caplog):
    """A run killed while torch built DeepSpeed's CPU op leaves its lock; every later run waited on it in silence."""
    from tucka_llm.training.distributed import STALE_BUILD_LOCK_S, logger, warn_of_a_stale_build_lock

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    logger.addHandler(caplog.handler)  # the training tests may have stopped this logger's propagation
    try:
        warn_of_a_stale_build_lock()  # no lock: nothing to say
        lock = tmp_path / "deepspeed_shm_comm" / "lock"
        lock.touch()
        warn_of_a_stale_build_lock()  # a build going on now: nothing either
        assert caplog.text == ""
        os.utime(lock, (lock.stat().st_atime, lock.stat().st_mtime - STALE_BUILD_LOCK_S - 60))
        warn_of_a_stale_build_lock()
    finally:
        logger.removeHandler(caplog.handler)
    assert f"{lock} is 6 minutes old" in caplog.text and "remove the file" in caplog.text
