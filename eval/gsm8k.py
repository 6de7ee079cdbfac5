"""``tucka eval gsm8k`` from a checkout: GSM8K test accuracy of a merged checkpoint or of a base with an adapter.

python eval/gsm8k.py --model merged/
python eval/gsm8k.py --model BASE --adapter runs/train --backend vllm    # TuckA routed: each prompt its route's LoRA
"""

import sys

from tucka_llm.cli import run

if __name__ == "__main__":  # vLLM starts its engine with spawn: the guard keeps the child from re-running this
    run("eval", ["gsm8k", *sys.argv[1:]], "eval/gsm8k.py")
