"""GSM8K test accuracy of a merged checkpoint, or of a base model with an adapter (``--help``).

python eval/gsm8k.py --model merged/
python eval/gsm8k.py --model BASE --adapter runs/train --backend vllm    # TuckA routed: each prompt its route's LoRA
python eval/gsm8k.py --model BASE --adapter runs/train --backend hf
"""

from tucka_llm.eval.cli import main

if __name__ == "__main__":  # vLLM starts its engine with spawn: the guard keeps the child from re-running this
    main("gsm8k")
