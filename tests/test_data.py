"""The shipped offline data and tokenizer."""

from __future__ import annotations

from tucka_llm.data import PROMPT_TEMPLATE, gsm8k_train_metamathqa, llama2_tokenizer


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
