"""GSM8K test accuracy of a merged checkpoint with vLLM, or of an unmerged adapter (``--help``).

python eval/gsm8k.py --model merged/
python eval/gsm8k.py --model BASE --adapter runs/train --backend hf
"""

from tucka_llm.eval.cli import main

if __name__ == "__main__":  # vLLM starts its engine with spawn: the guard keeps the child from re-running this
    main("gsm8k")
