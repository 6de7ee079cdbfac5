"""Training data: the MetaMath prompt template and the shipped offline data (GSM8K train in MetaMathQA form)."""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

# MetaMath / Alpaca prompt of the reference run (method note, section 6).
PROMPT_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{query}\n\n### Response:"
)

_CALCULATOR_MARK = re.compile(r"<<[^>]*>>")


def asset_path(*parts: str) -> Path:
    """A file or directory shipped inside the package (tucka_llm/assets)."""
    return Path(str(resources.files("tucka_llm").joinpath("assets", *parts)))


def llama2_tokenizer() -> PreTrainedTokenizerBase:
    """The real Llama-2 tokenizer shipped with the package (EOS doubles as the pad token, as usual for Llama-2)."""
    tokenizer = AutoTokenizer.from_pretrained(asset_path("llama2_tokenizer"))
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def gsm8k_to_metamathqa(record: dict[str, str]) -> dict[str, str]:
    """A GSM8K record as a MetaMathQA one: calculator marks stripped, the final "#### N" as "The answer is: N"."""
    steps, _, answer = record["answer"].rpartition("####")
    response = _CALCULATOR_MARK.sub("", steps).strip() + f"\nThe answer is: {answer.strip()}"
    return {"query": record["question"], "response": response, "type": "GSM_train"}


def gsm8k_train_metamathqa() -> list[dict[str, str]]:
    """The 7,473 GSM8K training problems shipped with the package, in MetaMathQA form, in file order."""
    with asset_path("gsm8k", "train.jsonl").open(encoding="utf-8") as f:
        return [gsm8k_to_metamathqa(json.loads(line)) for line in f]
