"""eval/gsm8k.py and eval/hendrycks_math.py for real: vLLM's CPU build on a tiny merged checkpoint, the hf backend
with an unmerged TuckA adapter, resuming, and every refusal."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TUCKA_CONFIG, save_adapter

import tucka_llm
from tucka_llm.__main__ import main as tucka_main
from tucka_llm.data import DataError
from tucka_llm.eval import backends
from tucka_llm.eval.backends import EvalError, Generation, HFBackend
from tucka_llm.eval.problems import Problem, load_problems
from tucka_llm.eval.records import extraction_rules, read_records, score, summarise
from tucka_llm.eval.run import METAMATH_STOP, EvalOptions, evaluate
from tucka_llm.loading import LoadError
from tucka_llm.models import llama2_7b_config

REPO = Path(__file__).resolve().parents[1]
RESPONSE_FIELDS = {"id", "prompt", "completion", "extracted", "rule", "gold", "correct", "correct_metamath", "tokens"}


def run_script(script: str, *args: object) -> subprocess.CompletedProcess:
    env = os.environ | {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}  # the engine in-process: starts in seconds
    command = [sys.executable, str(REPO / "eval" / script), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)


def read_responses(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "responses.jsonl").read_text().splitlines()]


def check_consistent(output: Path, n: int) -> dict:
    """Both files complete and telling the same story."""
    records = read_responses(output)
    summary = json.loads((output / "summary.json").read_text())
    assert len(records) == len({r["id"] for r in records}) == summary["n"] == n
    assert all(r.keys() >= RESPONSE_FIELDS for r in records)
    assert summary["correct"] == sum(r["correct"] for r in records)
    assert summary["correct_metamath"] == sum(r["correct_metamath"] for r in records)
    assert summary["accuracy"] == summary["correct"] / n
    assert summary["generated_tokens"] == sum(r["tokens"] for r in records) > 0
    assert summary["extraction_failures"] == sum(r["extracted"] is None for r in records)
    assert summary["extraction_rules"] == extraction_rules(records) and sum(summary["extraction_rules"].values()) == n
    assert summary["tokens_per_s"] > 0 and summary["versions"]["tucka_llm"] == tucka_llm.__version__
    return summary


def test_records_name_the_rule_that_read_each_answer_and_the_summary_counts_them():
    options = EvalOptions(task="gsm8k", model="unused", data="gsm8k", backend="hf")
    completions = ["4 + 5 = 9.\nThe answer is: 9", "Thus \\boxed{9}.", "She has 9 apples.", "#### 9", "I do not know."]
    records = [score(options, Problem("0", "How many?", "9"), Generation(text, 5, "stop"), 0.1) for text in completions]
    assert [r["rule"] for r in records] == ["marker", "boxed", "fallback", "hashes", None]
    assert [r["correct"] for r in records] == [True, True, True, True, False]
    rules = summarise(options, records, 1.0)["extraction_rules"]
    assert list(rules) == [
        "marker",
        "boxed",
        "final-answer",
        "answer-heading",
        "hashes",
        "answer-is",
        "fallback",
        "none",
    ]
    assert rules == {**dict.fromkeys(rules, 0), "marker": 1, "boxed": 1, "hashes": 1, "fallback": 1, "none": 1}
    del records[0]["rule"]  # a record written before rules were recorded, in a resumed run
    assert summarise(options, records, 1.0)["extraction_rules"]["unrecorded"] == 1


@pytest.mark.skipif(not backends.vllm_available(), reason="the eval-cpu extra installs vLLM's CPU build")
def test_vllm_gsm8k_end_to_end_then_resume_without_regenerating(merged_tiny, tmp_path):
    output = tmp_path / "gsm8k"
    flags = ["--model", merged_tiny, "--output", output, "--max-new-tokens", "12", "--dtype", "float32"]
    first = run_script("gsm8k.py", *flags, "--limit", "3")
    assert first.returncode == 0, first.stderr[-3000:]
    summary = check_consistent(output, 3)
    assert summary["backend"] == "vllm" and summary["sampling"]["max_new_tokens"] == 12
    assert summary["sampling"]["stop"] == list(METAMATH_STOP) and summary["step_by_step"] is True
    records = read_responses(output)
    assert [r["id"] for r in records] == ["0", "1", "2"]
    assert records[0]["prompt"].endswith("### Response: Let's think step by step.")
    assert records[0]["gold"] == "18" and all(r["tokens"] <= 12 for r in records)
    assert f"accuracy {summary['accuracy']:.4f}" in first.stdout

    before = (output / "responses.jsonl").read_bytes()
    again = run_script("gsm8k.py", *flags, "--limit", "3")
    assert again.returncode == 0, again.stderr[-3000:]
    assert (output / "responses.jsonl").read_bytes() == before
    assert "Loading weights" not in again.stderr  # nothing left to generate: no engine started

    more = run_script("gsm8k.py", *flags, "--limit", "5")
    assert more.returncode == 0, more.stderr[-3000:]
    assert (output / "responses.jsonl").read_bytes().startswith(before)
    check_consistent(output, 5)


@pytest.mark.skipif(not backends.vllm_available(), reason="the eval-cpu extra installs vLLM's CPU build")
def test_vllm_math500_end_to_end_reports_subjects_and_levels(merged_tiny, tmp_path):
    output = tmp_path / "math"
    result = run_script(
        "hendrycks_math.py", "--model", merged_tiny, "--subset", "math500", "--limit", "3",
        "--max-new-tokens", "12", "--output", output, "--compat", "metamath",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    summary = check_consistent(output, 3)
    records = read_responses(output)
    assert summary["scoring"] == "metamath" and summary["accuracy"] == summary["accuracy_metamath"]
    assert [r["id"] for r in records] == [p.id for p in load_problems("math", "math500", 3)]
    assert all(r["subject"] and r["level"] in range(1, 6) for r in records)
    assert sum(group["n"] for group in summary["by_subject"].values()) == 3
    assert sum(group["n"] for group in summary["by_level"].values()) == 3
    assert summary["sampling"]["max_new_tokens"] == 12 and summary["data"] == "math500"


def test_hf_backend_with_an_unmerged_tucka_adapter_answers_the_same_at_batch_size_1_and_4(
    adapters, tiny_model, tmp_path
):
    completions = {}
    for batch_size in (1, 4):
        options = EvalOptions(
            task="gsm8k", model=str(tiny_model), adapter=str(adapters["tucka"]), data="gsm8k", limit=6,
            backend="hf", batch_size=batch_size, max_new_tokens=10, output=str(tmp_path / f"bs{batch_size}"),
        )  # fmt: skip
        summary = evaluate(options)
        assert summary["adapter"] == str(adapters["tucka"].resolve()) and summary["n"] == 6
        completions[batch_size] = [r["completion"] for r in read_responses(tmp_path / f"bs{batch_size}")]
    assert completions[1] == completions[4]

    # The prompts route to different groups, so batch routing would have mixed them: the test can tell.
    backend = HFBackend(str(tiny_model), adapter=str(adapters["tucka"]), batch_size=4)
    prompts = [options.prompt(p.question) for p in load_problems("gsm8k", "gsm8k", 6)]
    tucka_llm.expert_load(backend.model)  # reset
    backend.generate(prompts, options.sampling)
    load = tucka_llm.expert_load(backend.model)["default"]
    assert sum(count > 0 for count in load.counts) >= 2, load


def test_an_interrupted_last_record_is_generated_again(merged_tiny, tmp_path):
    options = EvalOptions(
        task="gsm8k", model=str(merged_tiny), data="gsm8k", limit=2, backend="hf", max_new_tokens=4,
        output=str(tmp_path / "out"),
    )  # fmt: skip
    evaluate(options)
    path = tmp_path / "out" / "responses.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(lines[0] + lines[1][:25])  # killed while writing the second record
    assert evaluate(options)["n"] == 2

    def without_timing(text: str) -> list[dict]:
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in text.splitlines()]

    assert path.read_text().startswith(lines[0])
    assert without_timing(path.read_text()) == without_timing("".join(lines))


def test_resuming_with_other_settings_is_refused(merged_tiny, tmp_path):
    options = EvalOptions(
        task="gsm8k", model=str(merged_tiny), data="gsm8k", limit=1, backend="hf", max_new_tokens=4,
        output=str(tmp_path / "out"),
    )  # fmt: skip
    evaluate(options)
    options.max_new_tokens, options.step_by_step = 8, False
    with pytest.raises(EvalError, match=r"other settings \(sampling, step_by_step differ\)"):
        evaluate(options)


def test_default_output_lies_beside_the_model(merged_tiny):
    options = EvalOptions(task="math", model=str(merged_tiny), data="math500")
    assert options.output_dir() == merged_tiny.parent / f"{merged_tiny.name}-eval-math500"


def test_models_without_weights_or_tokenizer_are_refused(merged_tiny, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(merged_tiny, model)
    for weights in model.glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(EvalError, match=r"no weights \(\*\.safetensors\) in it"):
        evaluate(EvalOptions(task="gsm8k", model=str(model), data="gsm8k", backend="hf"))
    shutil.rmtree(model)
    shutil.copytree(merged_tiny, model)
    (model / "tokenizer_config.json").unlink()
    with pytest.raises(EvalError, match="no tokenizer in it"):
        evaluate(EvalOptions(task="gsm8k", model=str(model), data="gsm8k", backend="hf"))
    with pytest.raises(EvalError, match="no such directory"):
        evaluate(EvalOptions(task="gsm8k", model=str(tmp_path / "nowhere"), data="gsm8k", backend="hf"))


def test_data_without_the_expected_fields_is_refused_naming_them(tmp_path):
    data = tmp_path / "problems.jsonl"
    data.write_text('{"prompt": "What is 2 + 2?", "target": "4"}\n')
    with pytest.raises(DataError, match="no question field: expected one of question, query, problem, instruction, "
                       "found prompt, target"):  # fmt: skip
        load_problems("gsm8k", str(data))
    data.write_text('{"question": "What is 2 + 2?", "answer": "four"}\n')
    with pytest.raises(DataError, match=r"record 1: the 'answer' field does not end in '#### <number>'"):
        load_problems("gsm8k", str(data))
    data.write_text('{"problem": "What is 2 + 2?", "solution": "It is four."}\n')
    with pytest.raises(DataError, match=r"record 1: no gold answer .*\\boxed"):
        load_problems("math", str(data))
    data.write_text('{"question": "What is 2 + 2?", "answer": "#### 4"}\n{"question": \n')
    with pytest.raises(DataError, match=r"problems.jsonl:2: not valid JSON"):
        load_problems("gsm8k", str(data))


def test_vllm_missing_when_asked_says_what_to_install(merged_tiny, monkeypatch):
    monkeypatch.setattr(backends, "vllm_available", lambda: False)
    with pytest.raises(EvalError, match=r"vLLM is not installed.*eval-cpu.*--backend hf"):
        evaluate(EvalOptions(task="gsm8k", model=str(merged_tiny), data="gsm8k", limit=1, backend="vllm"))


def test_command_line_errors_are_one_line(merged_tiny, tmp_path):
    result = run_script("gsm8k.py", "--model", tmp_path / "nowhere", "--backend", "hf")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"error: --model {tmp_path / 'nowhere'}: no such directory."
    result = run_script("gsm8k.py", "--model", merged_tiny, "--backend", "tgi")
    assert result.returncode == 2 and "invalid choice: 'tgi'" in result.stderr
    result = run_script("gsm8k.py", "--model", merged_tiny, "--adapter", tmp_path, "--backend", "vllm")
    assert result.stderr.strip().splitlines()[-1] == f"error: --adapter {tmp_path}: no adapter_config.json in it."


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        ("temperature", -1.0, r"--temperature must be a finite number >= 0"),
        ("temperature", float("nan"), r"--temperature must be a finite number >= 0"),
        ("top_p", 0.0, r"--top-p must be in \(0, 1\]"),
        ("dtype", "float8", r"--dtype float8: unknown; choose one of auto, bfloat16"),
        ("prompt_template", "Q: {query} {oops}", r"--prompt-template: not a template with only a \{query\} field"),
        ("prompt_template", "Q: {}", r"--prompt-template: not a template"),
        ("prompt_template", "Q:", r"--prompt-template must contain \{query\}"),
    ],
)
def test_bad_settings_are_refused_before_anything_is_written(merged_tiny, tmp_path, setting, value, message):
    options = EvalOptions(task="gsm8k", model=str(merged_tiny), data="gsm8k", backend="hf", output=str(tmp_path / "o"))
    setattr(options, setting, value)
    with pytest.raises(EvalError, match=message):
        evaluate(options)
    assert not (tmp_path / "o").exists()


def test_an_output_without_results_takes_the_corrected_settings(merged_tiny, tmp_path):
    options = EvalOptions(
        task="gsm8k", model=str(merged_tiny), data="gsm8k", limit=1, backend="hf", max_new_tokens=4,
        output=str(tmp_path / "out"),
    )  # fmt: skip
    (tmp_path / "out").mkdir()  # what a run with a bad --dtype left before the model failed to load
    (tmp_path / "out" / "eval_settings.json").write_text(json.dumps(options.settings() | {"dtype": "float8"}))
    assert evaluate(options)["n"] == 1
    assert json.loads((tmp_path / "out" / "eval_settings.json").read_text())["dtype"] == "auto"


def test_a_record_cut_anywhere_is_dropped_and_the_next_one_starts_on_its_own_line(tmp_path):
    path = tmp_path / "responses.jsonl"
    first = json.dumps({"id": "1", "completion": "x = 2 → 4"}, ensure_ascii=False) + "\n"
    second = (json.dumps({"id": "2", "completion": "→ é"}, ensure_ascii=False) + "\n").encode()
    cut_in_a_character = second.index("→".encode()) + 1
    for cut in (cut_in_a_character, len(second) - 1):  # inside a 3-byte character; just before its newline
        path.write_bytes(first.encode() + second[:cut])
        assert list(read_records(path)) == ["1"]
        assert path.read_bytes() == first.encode()  # the next record is appended on a line of its own
    path.write_bytes(first.encode() + b'{"id": "\xe2\x86"}\n' + second)
    with pytest.raises(EvalError, match=rf"^{path}:2: not a JSON record; delete the line"):
        read_records(path)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--limit", "0"], "--limit 0: give a number of problems from 1 to 1319"),
        (["--limit", "-2"], "--limit -2: give a number of problems from 1 to 1319"),
        (["--limit", "5001", "--task", "math"], "--limit 5001: give a number of problems from 1 to 5000"),
    ],
)
def test_the_loss_command_refuses_a_limit_outside_the_test_set_before_loading_anything(tmp_path, flags, message):
    with pytest.raises(SystemExit) as stop:
        tucka_main(["loss", "--model", str(tmp_path / "no-model"), "--output", str(tmp_path / "out"), *flags])
    assert str(stop.value).startswith(f"error: {message}") and "\n" not in str(stop.value)
    assert not (tmp_path / "out").exists()


def test_the_loss_command_refuses_an_output_that_is_a_file(tmp_path):
    (tmp_path / "out").write_text("x")
    with pytest.raises(SystemExit, match=r"--output .* is a file: give a directory"):
        tucka_main(["loss", "--model", str(tmp_path / "no-model"), "--output", str(tmp_path / "out"), "--limit", "2"])


def test_a_merged_model_with_the_adapter_it_holds_is_refused_naming_both(merged_tiny, adapters, tmp_path):
    options = EvalOptions(
        task="gsm8k", model=str(merged_tiny), adapter=str(adapters["tucka"]), data="gsm8k", limit=1, backend="hf",
        output=str(tmp_path / "out"),
    )  # fmt: skip
    with pytest.raises(EvalError, match=r"already holds --adapter .* merged \(tucka_export\.json names it\)"):
        evaluate(options)
    assert not (tmp_path / "out").exists()


def test_gate_levels_for_a_redraw_adapter_are_refused_as_export_refuses_them(tiny_model, tokenizer, tmp_path):
    config = tucka_llm.TuckAConfig(**TUCKA_CONFIG, router="redraw", task_type="CAUSAL_LM")
    adapter = save_adapter(tmp_path / "redraw", tiny_model, config, tokenizer)
    options = EvalOptions(
        task="gsm8k", model=str(tiny_model), adapter=str(adapter), data="gsm8k", limit=1, backend="hf",
        gate_levels=5, output=str(tmp_path / "out"),
    )  # fmt: skip
    with pytest.raises(EvalError, match=r"router is 'redraw', whose routes are random draws.*drop --gate-levels"):
        evaluate(options)


def test_an_evaluation_refused_when_its_model_loads_leaves_nothing_behind(adapters, tiny_model, tmp_path):
    corrupt = tmp_path / "corrupt"
    shutil.copytree(adapters["lora"], corrupt)
    (corrupt / "adapter_model.safetensors").write_bytes(b"not safetensors")
    options = EvalOptions(
        task="gsm8k", model=str(tiny_model), adapter=str(corrupt), data="gsm8k", limit=1, backend="hf",
        output=str(tmp_path / "out"),
    )  # fmt: skip
    with pytest.raises(LoadError, match="not a readable safetensors file"):
        evaluate(options)
    assert not (tmp_path / "out").exists()  # neither eval_settings.json nor an empty directory


def test_a_redraw_adapters_resumed_evaluation_answers_as_an_uninterrupted_one(tiny_model, tokenizer, tmp_path):
    """The redraw router's routes are random draws; in sequence mode each prompt's draw is keyed by its tokens, so
    neither an interruption (here: the first 3 problems, then all 6) nor the batch changes an answer."""
    config = tucka_llm.TuckAConfig(**TUCKA_CONFIG, router="redraw", task_type="CAUSAL_LM")
    adapter = save_adapter(tmp_path / "redraw", tiny_model, config, tokenizer)

    def completions(output: str, limit: int, batch_size: int) -> list[str]:
        options = EvalOptions(
            task="gsm8k", model=str(tiny_model), adapter=str(adapter), data="gsm8k", limit=limit, backend="hf",
            batch_size=batch_size, max_new_tokens=8, output=str(tmp_path / output),
        )  # fmt: skip
        evaluate(options)
        return [r["completion"] for r in read_responses(tmp_path / output)]

    straight = completions("straight", 6, 4)
    completions("resumed", 3, 4)
    assert completions("resumed", 6, 4) == straight
    assert completions("one-by-one", 6, 1) == straight
    routes = {json.dumps(r["route"]) for r in map(json.loads, (tmp_path / "straight" / "responses.jsonl").open())}
    assert len(routes) > 1  # the prompts took different routes: the test can tell


def test_vllm_on_a_cpu_gets_the_context_its_kv_cache_holds(tmp_path):
    """Llama-2-7B's 4,096-token context needs 2 GiB of keys and values; vLLM's CPU engine refuses to start with the
    1 GiB evaluation gives it unless the context is cut to what fits (bench/rehearsal_7b.py found it)."""
    config = llama2_7b_config()
    config.dtype = torch.float16
    config.save_pretrained(tmp_path)
    per_token = 2 * 32 * 32 * 128 * 2  # keys and values, 32 layers x 32 heads x 128, fp16
    assert backends.context_in_cache(str(tmp_path), 2**30, "auto") == int(0.9 * 2**30 / per_token) // 16 * 16 == 1840
    assert backends.context_in_cache(str(tmp_path), 2**30, "float32") == 912
    assert backends.context_in_cache(str(tmp_path), 8 * 2**30, "auto") == 4096  # never above the model's own
