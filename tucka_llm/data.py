"""Training data: MetaMathQA records, the MetaMath prompt template, tokenisation with the prompt masked out of the loss.

Sources: a short name for data shipped with the package (``gsm8k-train``: the 7,473 GSM8K training problems in
MetaMathQA form), a local ``.json``/``.jsonl`` file, or a hub dataset id (``meta-math/MetaMathQA``). Loading and
tokenisation go through ``datasets`` so that both are cached on disk and done once per machine.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import datasets
from transformers import PreTrainedTokenizerBase

from tucka_llm.errors import TuckaError
from tucka_llm.loading import load_tokenizer

# MetaMath / Alpaca prompt of the reference run (method note, section 6).
PROMPT_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{query}\n\n### Response:"
)
REQUIRED_FIELDS = ("query", "response")
SHIPPED_DATASETS = {"gsm8k-train": "GSM8K train (7,473 problems, MIT) in MetaMathQA form, shipped with the package"}
OVERLONG_POLICIES = ("truncate", "drop")

_CALCULATOR_MARK = re.compile(r"<<[^>]*>>")


class DataError(TuckaError):
    """Training data that cannot be used as given; the message says where and what to change."""


def asset_path(*parts: str) -> Path:
    """A file or directory shipped inside the package (tucka_llm/assets)."""
    return Path(str(resources.files("tucka_llm").joinpath("assets", *parts)))


def llama2_tokenizer() -> PreTrainedTokenizerBase:
    """The real Llama-2 tokenizer shipped with the package (EOS doubles as the pad token, as usual for Llama-2)."""
    return load_tokenizer(asset_path("llama2_tokenizer"), "the shipped Llama-2 tokenizer")


def gsm8k_to_metamathqa(record: dict[str, str]) -> dict[str, str]:
    """A GSM8K record as a MetaMathQA one: calculator marks stripped, the final "#### N" as "The answer is: N"."""
    steps, _, answer = record["answer"].rpartition("####")
    response = _CALCULATOR_MARK.sub("", steps).strip() + f"\nThe answer is: {answer.strip()}"
    return {"query": record["question"], "response": response, "type": "GSM_train"}


def gsm8k_train_metamathqa() -> list[dict[str, str]]:
    """The 7,473 GSM8K training problems shipped with the package, in MetaMathQA form, in file order."""
    with asset_path("gsm8k", "train.jsonl").open(encoding="utf-8") as f:
        return [gsm8k_to_metamathqa(json.loads(line)) for line in f]


def _json_error_location(path: Path) -> str | None:
    """``file:line: reason`` of the first malformed record of a .json/.jsonl file, None if every record parses."""
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line.rstrip("\r\n"))
                except json.JSONDecodeError as error:
                    return f"{path}:{number}: not valid JSON ({error.msg} at column {error.colno})"
                if not isinstance(record, dict):
                    return f"{path}:{number}: a record must be a JSON object, got {type(record).__name__}"
        return None
    try:
        records = json.loads(path.read_text(encoding="utf-8", errors="replace"))
    except json.JSONDecodeError as error:
        return f"{path}:{error.lineno}: not valid JSON ({error.msg} at column {error.colno})"
    if not isinstance(records, list):
        return f"{path}:1: a .json data file must hold a list of records, got {type(records).__name__}"
    return None


def check_utf8_records(path: Path) -> None:
    """Refuse a data file that has no records or is not UTF-8 (naming the line): the JSON reader accepts other
    bytes and the records then fail to decode only when they are used."""
    empty = True
    with path.open("rb") as f:
        for number, line in enumerate(f, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DataError(
                    f"{path}:{number}: not UTF-8 text (byte 0x{line[error.start]:02x} at column {error.start + 1}); "
                    "save the file as UTF-8."
                ) from None
            empty = empty and not line.strip()
    if empty:
        raise DataError(f"--data {path}: the file has no records.")


def load_json_records(path: Path) -> datasets.Dataset:
    """The records of a local .json (a list) or .jsonl (one per line) file; a malformed one is named by file:line."""
    if path.suffix not in (".json", ".jsonl"):
        raise DataError(f"{path}: use a .json (list of records) or .jsonl (one record per line) file for --data.")
    check_utf8_records(path)
    try:
        return datasets.load_dataset("json", data_files=str(path), split="train")
    except Exception as error:  # datasets/pyarrow say neither file nor line: find them ourselves
        location = _json_error_location(path)
        if location is None:
            raise DataError(f"{path}: could not be read as JSON records ({error}).") from error
        raise DataError(f"{location}. Fix or remove that record.") from error


def _check_fields(data: datasets.Dataset, source: str) -> None:
    for field in REQUIRED_FIELDS:
        if field not in data.column_names:
            raise DataError(
                f"{source}: records have no {field!r} field (fields: {', '.join(data.column_names)}). "
                f"MetaMathQA records need {' and '.join(map(repr, REQUIRED_FIELDS))}."
            )
        for index, value in enumerate(data[field]):
            if not isinstance(value, str) or not value.strip():
                raise DataError(
                    f"{source}: record {index + 1} (0-based index {index}) has no {field!r} text: "
                    f"{dict(data[index])!r:.300}. Fix or remove it."
                )


def load_metamathqa(source: str, num_examples: int | None = None) -> datasets.Dataset:
    """The first ``num_examples`` MetaMathQA records (``query``, ``response``) of ``source``, in file order.

    ``source`` is a shipped short name (``SHIPPED_DATASETS``), a local .json/.jsonl file or a hub dataset id.
    Raises ``DataError`` naming the file and line of a malformed record, or the record without query/response.
    """
    if num_examples is not None and num_examples < 1:
        raise DataError(f"--num-examples must be at least 1, got {num_examples}.")
    path = Path(source).expanduser()
    if source == "gsm8k-train":
        data = load_json_records(asset_path("gsm8k", "train.jsonl"))
        data = data.select(range(min(num_examples or len(data), len(data))))
        data = data.map(gsm8k_to_metamathqa, remove_columns=data.column_names, desc="GSM8K to MetaMathQA form")
    elif path.exists():
        data = load_json_records(path)
    elif path.suffix in (".json", ".jsonl") or source.startswith((".", "/", "~")):
        raise DataError(f"--data {source}: no such file.")
    else:
        try:
            data = datasets.load_dataset(source, split="train")
        except Exception as error:
            raise DataError(
                f"--data {source}: not a local file, not a shipped dataset ({', '.join(SHIPPED_DATASETS)}), and the "
                f"hub dataset could not be loaded ({type(error).__name__}: {error}). Offline, pass a local "
                ".json/.jsonl file or --data gsm8k-train."
            ) from error
    if num_examples is not None and len(data) > num_examples:
        data = data.select(range(num_examples))
    if len(data) == 0:
        raise DataError(f"--data {source}: the dataset has no records.")
    _check_fields(data, source)
    return data


@dataclass(frozen=True)
class TokenizedData:
    """Tokenised examples (``input_ids``, ``labels``) and what happened to the ones over the length limit."""

    dataset: datasets.Dataset
    total: int
    truncated: int
    dropped: int

    def summary(self, max_len: int) -> str:
        return (
            f"{len(self.dataset)} of {self.total} examples used; {self.truncated} truncated and {self.dropped} "
            f"dropped at --max-len {max_len}"
        )


def tokenize_metamathqa(
    data: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, max_len: int, overlong: str = "truncate"
) -> TokenizedData:
    """MetaMath's supervised format: ``PROMPT_TEMPLATE`` + response + EOS, prompt tokens labelled -100.

    As in MetaMath's ``train_math.py``, prompt and response are joined without a separator and the prompt's own
    token count is masked. Examples longer than ``max_len`` are truncated (MetaMath) or dropped (``overlong``);
    a truncated example whose response is cut away entirely is dropped, since it has nothing to learn from.
    """
    if overlong not in OVERLONG_POLICIES:
        raise DataError(f"--overlong must be one of {', '.join(OVERLONG_POLICIES)}, got {overlong!r}.")
    if tokenizer.eos_token_id is None:
        raise DataError("The tokenizer has no EOS token; pass a --tokenizer that defines one.")
    eos = tokenizer.eos_token_id

    def encode(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        prompts = [PROMPT_TEMPLATE.format(query=q) for q in batch["query"]]
        full = tokenizer([p + r for p, r in zip(prompts, batch["response"], strict=True)]).input_ids
        prompt_lens = [len(ids) for ids in tokenizer(prompts).input_ids]
        out: dict[str, list[Any]] = {"input_ids": [], "labels": [], "overlong": [], "target_tokens": []}
        for ids, n_prompt in zip(full, prompt_lens, strict=True):
            ids = [*ids, eos]
            labels = [-100] * n_prompt + ids[n_prompt:]
            out["overlong"].append(len(ids) > max_len)
            ids, labels = ids[:max_len], labels[:max_len]
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            out["target_tokens"].append(sum(label != -100 for label in labels))
        return out

    encoded = data.map(encode, batched=True, remove_columns=data.column_names, desc="Tokenising")
    overlong_flags = encoded["overlong"]
    if overlong == "drop":
        keep = [i for i, flag in enumerate(overlong_flags) if not flag]
    else:
        keep = [i for i, n in enumerate(encoded["target_tokens"]) if n > 0]
    truncated = 0 if overlong == "drop" else sum(overlong_flags) - (len(encoded) - len(keep))
    used = encoded.select(keep).remove_columns(["overlong", "target_tokens"])
    if len(used) == 0:
        raise DataError(
            f"Every one of the {len(encoded)} examples is longer than --max-len {max_len} (with --overlong "
            f"{overlong}, nothing is left to train on). Raise --max-len"
            + (" or use --overlong truncate." if overlong == "drop" else ".")
        )
    return TokenizedData(used, total=len(encoded), truncated=truncated, dropped=len(encoded) - len(keep))
