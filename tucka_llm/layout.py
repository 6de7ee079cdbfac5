"""The layout of the directories the stages leave behind: what each file is called, what marks the directory
finished, and how it is read back. Every stage writes with these names; the report, the recipes and the other
stages read with these readers, so a name changes in one place.

- a training run (``tucka train --output``): ``RUN_CONFIG`` first, ``METRICS`` as it goes, checkpoints in
  ``CHECKPOINTS``; finished when ``RUN_FINISHED`` are in place (moved in last, in that order);
- a merged export (``tucka export --out``): a plain Hugging Face checkpoint plus ``EXPORT_RECORD`` (and
  ``ROUTE_RECORD`` for TuckA), written as a whole by renaming a finished temporary directory;
- an evaluation (``tucka eval --output``): ``EVAL_SETTINGS``, ``RESPONSES`` as it goes, ``SUMMARY`` last;
  ``HELD_OUT_LOSS`` beside it when ``tucka loss`` measured the same model.

The routed-LoRA directory (``tucka export --format lora``) is the serving format's own layout
(``tucka_llm.serving.routed_lora``); the router calibration file is the method's (``tucka_llm.tucka.calibration``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tucka_llm.errors import TuckaError

# A training run
RUN_CONFIG = "run_config.json"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
TENSORBOARD = "tensorboard"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
RUN_FINISHED = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)  # moved into the run last, in this order: their presence = finished
QUANTIZATION_RECORD = "base_quantization.json"  # beside the adapter when its base was trained in 4 bits
TOKENIZER_CONFIG = "tokenizer_config.json"  # saved beside the adapter (and in every merged export)

# A merged export
MODEL_CONFIG = "config.json"
EXPORT_RECORD = "tucka_export.json"
ROUTE_RECORD = "tucka_route.json"
MODEL_CARD = "README.md"

# An evaluation
EVAL_SETTINGS = "eval_settings.json"
RESPONSES = "responses.jsonl"
SUMMARY = "summary.json"  # written last: its presence = finished
HELD_OUT_LOSS = "held_out_loss.json"
ROUTED_LORA = "routed_lora"  # a TuckA adapter evaluated with vLLM: the adapter converted for routed serving

# A report
REPORT = "report.md"


class UnreadableRecord(TuckaError):
    """A JSON record of a run, export or evaluation that is missing, cut short or not an object."""


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object written by a stage; an UnreadableRecord naming the file when it is not one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UnreadableRecord(f"cannot read {path}: {error}") from None
    if not isinstance(data, dict):
        raise UnreadableRecord(f"{path} is not a JSON object")
    return data


def read_metrics(run: Path) -> list[dict[str, Any]]:
    """The records of the ``METRICS`` of the run directory ``run``; none if it is missing. A line that is not a JSON
    object (a run killed while writing it) is skipped."""
    path = run / METRICS
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def run_finished(run: Path) -> bool:
    """Whether a training run saved its final adapter."""
    return all((run / name).is_file() for name in RUN_FINISHED)


def exported_from(model: Path) -> Path | None:
    """The adapter (a training run) a merged checkpoint was exported from, as its ``EXPORT_RECORD`` names it; None
    for a model no export of ours wrote, or whose record is unreadable."""
    try:
        adapter = read_json(model / EXPORT_RECORD).get("adapter")
    except UnreadableRecord:
        return None
    return Path(adapter).resolve() if isinstance(adapter, str) and adapter else None
