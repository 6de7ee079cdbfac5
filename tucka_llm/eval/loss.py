"""Held-out loss: the mean cross-entropy per response token that a model gives the reference solutions of test
problems (in MetaMathQA form, prompts masked, tokenised exactly as training tokenises).

Accuracy on a few dozen problems moves in steps of several percent and cannot tell small models apart; the loss on
the same problems' reference solutions shows what training moved (docs/benchmarks.md). ``tucka loss``
writes it as ``held_out_loss.json`` into an evaluation directory, where the report reads it.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

import datasets
import torch
from transformers import DataCollatorForSeq2Seq, PreTrainedTokenizerBase

from tucka_llm.data import DataError, asset_path, gsm8k_to_metamathqa, tokenize_metamathqa
from tucka_llm.eval import metamath
from tucka_llm.io.atomic import atomic_write_json
from tucka_llm.layout import HELD_OUT_LOSS
from tucka_llm.loading import load_base_model, load_checked_adapter, load_tokenizer, tokenizer_source

MAX_LEN = 384  # the demo's training length
BATCH_SIZE = 8


def math_to_metamathqa(record: dict[str, str]) -> dict[str, str]:
    """A MATH record in MetaMathQA form (as its MATH_AnsAug records): the worked solution, then "The answer is: X"
    with X the solution's last \\boxed{} answer."""
    answer = metamath.remove_boxed(metamath.last_boxed(record["solution"]))
    response = record["solution"] if answer is None else f"{record['solution']}\nThe answer is: {answer}"
    return {"query": record["problem"], "response": response, "type": "MATH"}


MATH_ORDER_SEED = 0  # the fixed order of the MATH test set that held-out measurements take problems from


def shipped_test_records(task: str, count: int | None = None, start: int = 0) -> list[dict[str, str]]:
    """Problems ``start .. start + count`` (to the end without ``count``) of the shipped test set, in MetaMathQA
    form: GSM8K's in file order, MATH's in a fixed shuffled order (seed ``MATH_ORDER_SEED``). MATH's file is sorted
    by subject (Algebra is its first 1,187 problems), so its first N would measure Algebra alone; any range of the
    shuffled order mixes the seven subjects."""
    convert, name = {"gsm8k": (gsm8k_to_metamathqa, "gsm8k"), "math": (math_to_metamathqa, "math")}[task]
    with asset_path(name, "test.jsonl").open(encoding="utf-8") as f:
        lines = f.read().splitlines()
    order = list(range(len(lines)))
    if task == "math":
        random.Random(MATH_ORDER_SEED).shuffle(order)
    return [convert(json.loads(lines[i])) for i in order[start : None if count is None else start + count]]


def held_out_batches(
    records: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase, max_len: int = MAX_LEN
) -> list[dict[str, torch.Tensor]]:
    """``records`` tokenised as training does (prompt masked with -100), right-padded, in batches of 8."""
    tokenizer.padding_side = "right"  # positions count from the first token, as in training
    data = tokenize_metamathqa(datasets.Dataset.from_list(records), tokenizer, max_len).dataset
    collate = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)
    return [
        collate([data[i] for i in range(start, min(start + BATCH_SIZE, len(data)))])
        for start in range(0, len(data), BATCH_SIZE)
    ]


@torch.no_grad()
def held_out_loss(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> tuple[float, int]:
    """(mean cross-entropy per response token, response tokens) of ``model`` over ``batches``. A TuckA adapter in
    eval mode routes each sequence on its own (sequence routing)."""
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    for batch in batches:
        logits = model(
            input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
        ).logits.float()
        labels = batch["labels"][:, 1:].to(device)
        total += float(
            torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum"
            )
        )
        tokens += int((labels != -100).sum())
    return total / tokens, tokens


def load_model(model: str, adapter: str | None = None, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A model (or a base with an unmerged adapter, checked as evaluation checks it: ``load_checked_adapter``) in
    eval mode; a model or adapter that does not load is a LoadError naming it."""
    loaded = load_base_model(model, "--model", dtype)
    if adapter is not None:
        loaded = load_checked_adapter(loaded, Path(adapter), "--model")
    return loaded.eval()


def check_loss_arguments(args: argparse.Namespace) -> None:
    """Refuse, before any model loads, a --limit outside 1..(the shipped test set's size) and an --output that is a
    file, each in one line naming the flag (a DataError)."""
    available = len(asset_path(args.task, "test.jsonl").read_text(encoding="utf-8").splitlines())
    if isinstance(args.limit, bool) or not isinstance(args.limit, int) or not 1 <= args.limit <= available:
        raise DataError(
            f"--limit {args.limit}: give a number of problems from 1 to {available} (the {args.task} test set)."
        )
    if Path(args.output).exists() and not Path(args.output).is_dir():
        raise DataError(f"--output {args.output} is a file: give a directory (an evaluation's output directory).")


def main(argv: list[str] | None = None, prog: str = "tucka loss") -> None:
    """``tucka loss``: parse the flags, measure, write OUTPUT/held_out_loss.json."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=f"Write OUTPUT/{HELD_OUT_LOSS}: the mean cross-entropy per response token that --model (with "
        "--adapter) gives the reference solutions of --limit shipped test problems (GSM8K's first; MATH's first in a "
        "fixed order that mixes its subjects), in MetaMathQA form "
        "and tokenised as training does. `tucka report` shows it beside the accuracy of the same evaluation directory.",
    )
    parser.add_argument("--model", required=True, help="model directory (a merged checkpoint, or the base)")
    parser.add_argument("--adapter", default=None, help="an unmerged adapter on --model")
    parser.add_argument("--task", choices=["gsm8k", "math"], default="gsm8k", help="shipped test set")
    parser.add_argument("--limit", type=int, default=40, help="N test problems (MATH's in its mixed order)")
    parser.add_argument("--output", required=True, help=f"directory for {HELD_OUT_LOSS} (an evaluation's)")
    write_held_out_loss(parser.parse_args(argv))


def write_held_out_loss(args: argparse.Namespace) -> dict[str, Any]:
    """The held-out loss of --model (with --adapter) written to OUTPUT/held_out_loss.json (``main``'s flags)."""
    check_loss_arguments(args)
    tokenizer = load_tokenizer(tokenizer_source(args.adapter, args.model), "--model")
    batches = held_out_batches(shipped_test_records(args.task, args.limit), tokenizer)
    loss, tokens = held_out_loss(load_model(args.model, args.adapter), batches)
    order = f" in the order of random.Random({MATH_ORDER_SEED}).shuffle" if args.task == "math" else ""
    record = {
        "task": args.task,
        "problems": args.limit,  # --limit, checked to be at most the test set's size: each one was measured
        "data": f"the first {args.limit} {args.task} test problems{order}, reference solutions in MetaMathQA form",
        "model": str(Path(args.model).resolve()) if Path(args.model).exists() else args.model,
        "adapter": str(Path(args.adapter).resolve()) if args.adapter else None,
        "loss": loss,
        "response_tokens": tokens,
    }
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    atomic_write_json(output / HELD_OUT_LOSS, record)
    print(f"held-out loss {loss:.4f} over {tokens} response tokens: {output / HELD_OUT_LOSS}")
    return record
