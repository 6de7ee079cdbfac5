"""``tucka table3`` from a checkout: the paper's Table 3 in one command (``--help``).

python launch/reproduce_table3.py --gpus 8                                   # Llama-2-7B, the reference settings
python launch/reproduce_table3.py --scale tiny --model DIR --gpus 2 --configs tucka-r16k4     # orchestration on CPU
"""

import sys

from tucka_llm.cli import run

if __name__ == "__main__":  # vLLM starts its engine with spawn: the guard keeps the child from re-running this
    run("table3", sys.argv[1:], "launch/reproduce_table3.py")
