"""TuckA with TRL's SFTTrainer: the recipe a TRL user writes, runnable as is (README, "TuckA in your own trainer").

    python examples/trl_sft.py --model DIR --output runs/trl                       # one process
    deepspeed --num_gpus 8 examples/trl_sft.py --model DIR --output runs/trl --deepspeed ds_configs/zero2.json

TRL builds the TuckA model from ``peft_config`` and tokenises prompt/completion pairs; ``TuckACalibration`` calibrates
the router before the first step (on every rank alike, DeepSpeed's fp32 master included) and leaves its record beside
the adapter, so ``launch/export.py --adapter OUTPUT`` and the evaluation commands take the result as they take
``launch/train.py``'s.
"""

from __future__ import annotations

import argparse
import logging

import datasets
import torch
import trl

import tucka_llm
from tucka_llm.data import PROMPT_TEMPLATE, load_metamathqa


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="base model directory or hub id")
    parser.add_argument("--output", required=True, help="where the adapter, tokenizer and calibration go")
    parser.add_argument("--data", default="gsm8k-train", help="MetaMathQA records: a hub id, a .json/.jsonl file")
    parser.add_argument("--num-examples", type=int, default=None, help="the first N records")
    parser.add_argument("--max-steps", type=int, default=-1, help="-1: --epochs over the data")
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=1, help="per device")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--deepspeed", default=None, help="a DeepSpeed config (ds_configs/zero2.json)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)  # deepspeed's
    args = parser.parse_args()
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("tucka_llm").setLevel(logging.INFO)  # the calibration's per-rank digests

    records = load_metamathqa(args.data, args.num_examples)
    pairs = datasets.Dataset.from_list(
        [{"prompt": PROMPT_TEMPLATE.format(query=r["query"]), "completion": " " + r["response"]} for r in records]
    )
    config = trl.SFTConfig(
        output_dir=args.output,
        max_steps=args.max_steps,
        num_train_epochs=args.epochs,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=0.03,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        max_length=args.max_length,
        bf16=args.bf16,
        deepspeed=args.deepspeed,
        use_cpu=not torch.cuda.is_available(),  # CPU ranks (gloo) when there is no GPU
        seed=args.seed,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
    )
    trainer = trl.SFTTrainer(
        model=args.model,
        args=config,
        train_dataset=pairs,
        peft_config=tucka_llm.TuckAConfig(r=16, k=4, t=2, p=2, target_modules=["q_proj", "v_proj"]),
        callbacks=[tucka_llm.TuckACalibration(samples=256, seed=args.seed, meta={"data": args.data})],
    )
    trainer.train()
    trainer.save_model(args.output)  # adapter, adapter_config.json and the tokenizer


if __name__ == "__main__":
    main()
