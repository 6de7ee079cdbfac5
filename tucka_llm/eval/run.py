"""One evaluation: problems -> prompts -> completions -> scores (``records``), appended as they finish.

Re-running the same command resumes: problems already in ``responses.jsonl`` are skipped. ``summary.json`` is
rewritten (atomically) from all records at the end of every run.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import peft
import torch
from tqdm.auto import tqdm

from tucka_llm.data import PROMPT_TEMPLATE
from tucka_llm.errors import TuckaError
from tucka_llm.eval.backends import EvalError, HFBackend, Sampling, VLLMBackend
from tucka_llm.eval.problems import Problem, load_problems
from tucka_llm.eval.records import read_records, score, summarise
from tucka_llm.io.atomic import atomic_write_json
from tucka_llm.io.locking import exclusive_directory
from tucka_llm.layout import (
    EVAL_SETTINGS,
    EXPORT_RECORD,
    MODEL_CONFIG,
    RESPONSES,
    ROUTED_LORA,
    SUMMARY,
    TOKENIZER_CONFIG,
    exported_from,
)
from tucka_llm.loading import LoadError, adapter_method, saved_adapter_config, tokenizer_source
from tucka_llm.serving.requests import LoRARequests, RoutedRequests
from tucka_llm.serving.routed_lora import DEFAULT_GATE_LEVELS, converted
from tucka_llm.tucka.router import ROUTERS
from tucka_llm.tucka.routing import check_gate_levels

# MetaMath's evaluation conventions (method note, section 6).
STEP_BY_STEP = " Let's think step by step."
METAMATH_STOP = (
    "Question:", "Question", "USER:", "USER", "ASSISTANT:", "ASSISTANT",
    "Instruction:", "Instruction", "Response:", "Response",
)  # fmt: skip
MAX_NEW_TOKENS = {"gsm8k": 512, "math": 2048}
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
        return method_name(saved_adapter_config(Path(self.adapter)))

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
            atomic_write_json(output / EVAL_SETTINGS, options.settings())
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


def method_name(config: peft.PeftConfig) -> str:
    """tucka, lora, dora, or another peft method's name (``check_model`` says what evaluates it)."""
    try:
        return adapter_method(config)
    except LoadError:
        return str(config.peft_type).lower()


def check_model(options: EvalOptions) -> None:
    """A local model directory must hold weights and a tokenizer; an adapter its config and weights."""
    model = Path(options.model)
    if model.exists():
        if not model.is_dir() or not (model / MODEL_CONFIG).is_file():
            raise EvalError(f"--model {model}: not a model directory (no config.json). Give a merged checkpoint.")
        if not any(model.glob("*.safetensors")) and not any(model.glob("*.bin")):
            raise EvalError(f"--model {model}: no weights (*.safetensors) in it. Export one: tucka export.")
        if not (Path(tokenizer_source(options.adapter, options.model)) / TOKENIZER_CONFIG).is_file():
            raise EvalError(f"--model {model}: no tokenizer in it (tokenizer_config.json). Save one beside it.")
    elif model.is_absolute() or options.model.startswith("."):
        raise EvalError(f"--model {model}: no such directory.")
    if options.adapter is None:
        if options.gate_levels is not None:
            raise EvalError("--gate-levels applies to a TuckA --adapter (its served routes); none was given.")
        return
    config = saved_adapter_config(Path(options.adapter))  # a finished adapter directory, else what is missing
    merged_from = exported_from(model)
    if merged_from is not None and merged_from == Path(options.adapter).resolve():
        raise EvalError(
            f"--model {model} already holds --adapter {options.adapter} merged ({EXPORT_RECORD} names it): the "
            "update would apply twice. Evaluate the merged model without --adapter, or pass the base with --adapter."
        )
    method = method_name(config)
    if options.gate_levels is not None:
        if method != "tucka":
            raise EvalError(f"--gate-levels applies to TuckA adapters; {options.adapter} holds a {method} adapter.")
        router = config.router
        if ROUTERS[router].draws_routes:
            raise EvalError(
                f"--gate-levels: the adapter's router is '{router}', whose routes are random draws, so it has no "
                "served routes to quantise (tucka export --format lora refuses it too); drop --gate-levels."
            )
        check_gate_levels(options.gate_levels, "--gate-levels")
    if options.backend == "vllm" and method not in ("tucka", "lora", "dora"):
        served = "vLLM serves LoRA and TuckA adapters"
        raise EvalError(f"--adapter {options.adapter}: {served}, not {method} ones; pass --backend hf.")
    if options.backend == "vllm" and method == "dora":
        raise EvalError(
            f"--adapter {options.adapter} is a DoRA adapter, which vLLM cannot serve: export it merged "
            f"(tucka export --adapter {options.adapter} --out merged/) and evaluate --model merged/, or "
            "pass --backend hf."
        )


def check_settings(output: Path, settings: dict[str, Any], has_results: bool) -> None:
    """Refuse to resume an output directory made with different settings (a new one records them once its model
    has loaded: ``_evaluate``).

    A directory without results (a run that failed before its first chunk) takes the new settings: it holds no
    work they could mix with.
    """
    path = output / EVAL_SETTINGS
    settings = json.loads(json.dumps(settings))  # compared as stored: tuples become lists
    if path.is_file() and has_results:
        previous = json.loads(path.read_text(encoding="utf-8"))
        changed = sorted(key for key in settings | previous if settings.get(key) != previous.get(key))
        if changed:
            raise EvalError(
                f"--output {output} holds an evaluation with other settings ({', '.join(changed)} differ): "
                "pass another --output, or delete it to start over."
            )


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
    adapter = Path(options.adapter)
    try:
        routed = converted(adapter, output / ROUTED_LORA, options.model, options.served_gate_levels())
    except TuckaError as error:
        raise EvalError(f"--backend vllm: {error} Or evaluate the adapter unmerged: --backend hf.") from None
    dtype = None if options.dtype == "auto" else getattr(torch, options.dtype)
    return RoutedRequests(routed, routed.prompt_router(dtype))
