"""Quickstart: TuckA end to end on real data with no model hub, in about a minute on a laptop CPU.

    python launch/quickstart.py [--out runs/quickstart] [--steps 60]

A small Llama-2-architecture model with random weights (the pretrained SmolLM2 demo comes with the training
launcher), the real Llama-2 tokenizer and the real GSM8K training problems in MetaMathQA form, all shipped with the
package. It calibrates the router (DAI), trains the TuckA adapter in batch routing mode, prints the loss and the
expert-group load, saves the adapter in peft format, reloads it with peft.PeftModel.from_pretrained and checks that
the logits are identical, then answers a problem with the route of its prompt held while decoding.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import peft
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import tucka_llm
from tucka_llm.data import PROMPT_TEMPLATE, gsm8k_train_metamathqa, llama2_tokenizer


def small_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=32000,
        max_position_embeddings=512,
    )
    return LlamaForCausalLM(config)


def tokenize(records: list[dict], tokenizer, max_len: int) -> dict[str, torch.Tensor]:
    """Prompt + response + EOS, right-padded; prompt tokens and padding are masked out of the loss."""
    prompts = [PROMPT_TEMPLATE.format(query=r["query"]) for r in records]
    full = [p + " " + r["response"] + tokenizer.eos_token for p, r in zip(prompts, records, strict=True)]
    tokenizer.padding_side = "right"
    batch = tokenizer(full, return_tensors="pt", padding=True, truncation=True, max_length=max_len)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    for row, prompt_ids in enumerate(tokenizer(prompts).input_ids):
        labels[row, : len(prompt_ids)] = -100
    return {**batch, "labels": labels}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/quickstart"), help="output directory")
    parser.add_argument("--steps", type=int, default=60, help="training steps (default 60)")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step (default 8)")
    parser.add_argument("--max-len", type=int, default=256, help="tokens per sequence (default 256)")
    args = parser.parse_args()

    tokenizer = llama2_tokenizer()
    records = gsm8k_train_metamathqa()
    print(f"data: {len(records)} GSM8K training problems in MetaMathQA form (shipped with the package)")
    config = tucka_llm.TuckAConfig(r=8, k=4, t=2, p=2, alpha=16.0, perturb_scale=1.0)
    model = peft.get_peft_model(small_llama(), config)
    model.print_trainable_parameters()

    calibration = tokenize(records[-64:], tokenizer, args.max_len)
    tucka_llm.data_aware_init(model, [calibration], seed=0)
    print("router centroids calibrated on 64 held-back problems (DAI)")

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    model.train()
    for step in range(1, args.steps + 1):
        start = (step - 1) * args.batch % (len(records) - 64)
        batch = tokenize(records[start : start + args.batch], tokenizer, args.max_len)
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step == 1 or step % 10 == 0:
            load = tucka_llm.expert_load(model)["default"]
            groups = " ".join(f"{f:.2f}" for f in load.fraction)
            print(f"step {step:3d}  loss {loss.item():.3f}  group load [{groups}]  entropy {load.entropy:.2f}")

    model.eval()
    model.save_pretrained(args.out / "adapter")
    tokenizer.save_pretrained(args.out / "adapter")
    reloaded = peft.PeftModel.from_pretrained(small_llama(), args.out / "adapter").eval()
    probe = tokenize(records[-8:], tokenizer, args.max_len)
    with torch.no_grad():
        same = torch.equal(model(**probe).logits, reloaded(**probe).logits)
    print(f"adapter saved to {args.out / 'adapter'}; reloaded with PeftModel.from_pretrained: identical logits: {same}")

    question = records[-1]["query"]
    prompt = tokenizer(PROMPT_TEMPLATE.format(query=question), return_tensors="pt")
    with tucka_llm.routing(reloaded, "sequence"), torch.no_grad():
        answer = reloaded.generate(**prompt, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    text = tokenizer.decode(answer[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    print(f"greedy answer (route held from the prompt; random-weight base, so expect noise): {text!r}")
    if not same:
        raise SystemExit("reloaded adapter does not reproduce the trained one")


if __name__ == "__main__":
    main()
