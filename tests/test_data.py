"""Training data: the shipped data and tokenizer, loading MetaMathQA records, tokenisation, bad input."""

from __future__ import annotations

import json

import pytest

from tucka_llm.data import (
    PROMPT_TEMPLATE,
    DataError,
    gsm8k_train_metamathqa,
    llama2_tokenizer,
    load_metamathqa,
    tokenize_metamathqa,
)


def test_shipped_gsm8k_train_converts_to_metamathqa_form():
    records = gsm8k_train_metamathqa()
    assert len(records) == 7473
    first = records[0]
    assert first["query"].startswith("Natalia sold clips to 48 of her friends in April")
    assert first["response"] == (
        "Natalia sold 48/2 = 24 clips in May.\n"
        "Natalia sold 48+24 = 72 clips altogether in April and May.\n"
        "The answer is: 72"
    )
    assert not any("<<" in r["response"] or "####" in r["response"] for r in records)
    assert all(r["response"].rsplit("\n", 1)[-1].startswith("The answer is: ") for r in records)


def test_shipped_llama2_tokenizer_is_the_real_one():
    tokenizer = llama2_tokenizer()
    assert len(tokenizer) == 32000
    assert tokenizer("Hello world").input_ids == [1, 15043, 3186]
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == 2
    assert PROMPT_TEMPLATE.format(query="Q").endswith("### Instruction:\nQ\n\n### Response:")


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


RECORDS = [
    {"query": f"What is {i} + {i}?", "response": f"{i} + {i} = {2 * i}.\nThe answer is: {2 * i}"} for i in range(6)
]


def test_local_jsonl_gives_the_first_n_records_in_file_order(tmp_path):
    data = load_metamathqa(str(_write_jsonl(tmp_path / "d.jsonl", RECORDS)), num_examples=4)
    assert data["query"] == [r["query"] for r in RECORDS[:4]]


def test_local_json_list_file_is_read_like_jsonl(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(RECORDS), encoding="utf-8")
    assert load_metamathqa(str(path))["response"] == [r["response"] for r in RECORDS]


def test_shipped_gsm8k_train_is_selectable_by_short_name():
    data = load_metamathqa("gsm8k-train", num_examples=3)
    assert data["response"] == [r["response"] for r in gsm8k_train_metamathqa()[:3]]


def test_malformed_json_line_is_reported_with_file_and_line(tmp_path):
    path = _write_jsonl(tmp_path / "bad.jsonl", RECORDS[:3])
    lines = path.read_text().splitlines()
    lines[1] = lines[1][:-5]  # cut the closing of record 2
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"{path}:2: not valid JSON"):
        load_metamathqa(str(path))


def test_record_without_response_is_named(tmp_path):
    records = [RECORDS[0], {"query": "Where is the answer?"}, RECORDS[2]]
    with pytest.raises(DataError, match=r"record 2 \(0-based index 1\) has no 'response'"):
        load_metamathqa(str(_write_jsonl(tmp_path / "d.jsonl", records)))


def test_records_without_query_field_say_which_fields_they_have(tmp_path):
    records = [{"question": r["query"], "response": r["response"]} for r in RECORDS]
    with pytest.raises(DataError, match=r"no 'query' field \(fields: question, response\)"):
        load_metamathqa(str(_write_jsonl(tmp_path / "d.jsonl", records)))


def test_empty_data_file_says_so(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="has no records"):
        load_metamathqa(str(tmp_path / "empty.jsonl"))


def test_prompt_tokens_are_masked_and_the_target_ends_with_eos(tokenizer, tmp_path):
    data = load_metamathqa(str(_write_jsonl(tmp_path / "d.jsonl", RECORDS[:2])))
    out = tokenize_metamathqa(data, tokenizer, max_len=512)
    assert (out.total, out.truncated, out.dropped) == (2, 0, 0)
    for example, record in zip(out.dataset, RECORDS, strict=False):
        prompt_len = len(tokenizer(PROMPT_TEMPLATE.format(query=record["query"])).input_ids)
        ids, labels = example["input_ids"], example["labels"]
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
        assert labels[:prompt_len] == [-100] * prompt_len
        assert labels[prompt_len:] == ids[prompt_len:]
        target = tokenizer.decode(ids[prompt_len:-1])
        assert target.strip() == record["response"]


def test_overlong_examples_are_truncated_or_dropped_and_counted(tokenizer):
    data = load_metamathqa("gsm8k-train", num_examples=20)
    truncated = tokenize_metamathqa(data, tokenizer, max_len=160, overlong="truncate")
    dropped = tokenize_metamathqa(data, tokenizer, max_len=160, overlong="drop")
    assert truncated.truncated > 0 and dropped.dropped > 0
    assert len(dropped.dataset) == 20 - dropped.dropped
    assert max(len(ids) for ids in truncated.dataset["input_ids"]) == 160
    # truncation keeps only examples with at least one target token left
    assert all(any(label != -100 for label in labels) for labels in truncated.dataset["labels"])
    assert len(truncated.dataset) == truncated.total - truncated.dropped


def test_every_example_too_long_says_so(tokenizer):
    data = load_metamathqa("gsm8k-train", num_examples=5)
    with pytest.raises(DataError, match=r"Every one of the 5 examples is longer than --max-len 40"):
        tokenize_metamathqa(data, tokenizer, max_len=40, overlong="drop")
    with pytest.raises(DataError, match=r"Every one of the 5 examples is longer than --max-len 40"):
        tokenize_metamathqa(data, tokenizer, max_len=40, overlong="truncate")  # the prompts alone are longer
