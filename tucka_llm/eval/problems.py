"""Evaluation problems: the GSM8K and MATH test sets shipped with the package, or a local file or hub dataset.

Accepted record layouts (the field names are found, not configured):
- GSM8K: OpenAI's ``question`` / ``answer`` (worked answer ending in "#### N"), or MetaMath's ``query`` /
  ``response`` (GSM8K_test.jsonl); the gold answer is N.
- MATH: ``problem`` / ``solution`` (Hendrycks), with ``answer`` when given (MATH-500) else the solution's last
  ``\\boxed{}``; or MetaMath's ``instruction`` / ``output``. ``type`` or ``subject`` and ``level`` when present.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import datasets

from tucka_llm.data import DataError, asset_path, load_json_records
from tucka_llm.eval import metamath

SHIPPED = {
    "gsm8k": ("gsm8k", "test.jsonl", "GSM8K test, 1,319 problems"),
    "math": ("math", "test.jsonl", "MATH test, 5,000 problems"),
    "math500": ("math", "math500_test.jsonl", "MATH-500, 500 problems"),
}
QUESTION_FIELDS = ("question", "query", "problem", "instruction")
SOLUTION_FIELDS = {"gsm8k": ("answer", "response"), "math": ("answer", "solution", "output")}
ID_FIELDS = ("unique_id", "idx", "id")


@dataclass(frozen=True)
class Problem:
    """One problem: a stable ``id`` (resuming matches on it), the question, the gold answer, MATH's metadata."""

    id: str
    question: str
    gold: str
    subject: str | None = None
    level: int | None = None


def load_problems(
    task: str, data: str, limit: int | None = None, split: str = "test", config: str | None = None
) -> list[Problem]:
    """The first ``limit`` problems of ``data``: a shipped set (``SHIPPED``), a local .json/.jsonl, or a hub id.

    Raises DataError naming the file and line of a malformed record, or the fields a record lacks.
    """
    if limit is not None and limit < 1:
        raise DataError(f"--limit must be at least 1, got {limit}.")
    records = _records(data, split, config)
    if limit is not None:
        records = records.select(range(min(limit, len(records))))
    if len(records) == 0:
        raise DataError(f"--data {data}: no problems in it.")
    question_field = _field(records, QUESTION_FIELDS, data, "question")
    solution_field = _field(records, SOLUTION_FIELDS[task], data, "answer or solution")
    problems = [_problem(task, data, i, record, question_field, solution_field) for i, record in enumerate(records)]
    if len({p.id for p in problems}) < len(problems):  # ids must tell problems apart for resuming: use positions
        problems = [replace(p, id=str(i)) for i, p in enumerate(problems)]
    return problems


def _records(data: str, split: str, config: str | None) -> datasets.Dataset:
    if data in SHIPPED:
        directory, name, _ = SHIPPED[data]
        return load_json_records(asset_path(directory, name))
    path = Path(data).expanduser()
    if path.exists():
        return load_json_records(path)
    if path.suffix in (".json", ".jsonl") or data.startswith((".", "/", "~")):
        raise DataError(f"--data {data}: no such file.")
    try:
        return datasets.load_dataset(data, config, split=split)
    except Exception as error:
        raise DataError(
            f"--data {data}: not a local file, not a shipped set ({', '.join(SHIPPED)}), and the hub dataset could "
            f"not be loaded ({type(error).__name__}: {error}). Offline, use a shipped set or a local .jsonl."
        ) from error


def _field(records: datasets.Dataset, candidates: tuple[str, ...], data: str, what: str) -> str:
    for name in candidates:
        if name in records.column_names:
            return name
    raise DataError(
        f"--data {data}: records have no {what} field: expected one of {', '.join(candidates)}, "
        f"found {', '.join(records.column_names)}."
    )


def _problem(task: str, data: str, index: int, record: dict[str, Any], question: str, solution: str) -> Problem:
    where = f"--data {data}: record {index + 1}"
    text = record[solution]
    if not isinstance(record[question], str) or not record[question].strip():
        raise DataError(f"{where} has no {question!r} text. Fix or remove it.")
    if not isinstance(text, str):
        text = "" if text is None else str(text)
    if task == "gsm8k":
        gold = text.rpartition("####")[2].strip() if "####" in text else text.strip()
        if not re.fullmatch(r"[-+]?[\d,]*\.?\d+", gold):
            raise DataError(f"{where}: the {solution!r} field does not end in '#### <number>': {text[-80:]!r}.")
    elif solution == "answer":
        gold = text.strip()
    else:
        gold = metamath.remove_boxed(metamath.last_boxed(text)) or ""
    if not gold:
        raise DataError(f"{where}: no gold answer in its {solution!r} field (MATH needs a final \\boxed{{}}).")
    identifier = next((str(record[f]) for f in ID_FIELDS if record.get(f) is not None), str(index))
    return Problem(identifier, record[question], gold, _subject(record), _level(record.get("level")))


def _subject(record: dict[str, Any]) -> str | None:
    value = record.get("subject") or record.get("type")
    return str(value) if value else None


def _level(value: Any) -> int | None:
    """MATH's "Level 3" or MATH-500's 3 -> 3; "Level ?" or nothing -> None."""
    if isinstance(value, int):
        return value
    match = re.search(r"\d+", str(value)) if value is not None else None
    return int(match.group()) if match else None
