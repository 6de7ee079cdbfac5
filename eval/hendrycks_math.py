"""``tucka eval math`` from a checkout: MATH test accuracy (all 5,000 problems, or ``--subset math500``).

python eval/hendrycks_math.py --model merged/
Named after the dataset: a script called math.py would shadow the standard math module.
"""

import sys

from tucka_llm.cli import run

if __name__ == "__main__":  # vLLM starts its engine with spawn: the guard keeps the child from re-running this
    run("eval", ["math", *sys.argv[1:]], "eval/hendrycks_math.py")
