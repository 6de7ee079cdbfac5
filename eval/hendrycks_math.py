"""MATH test accuracy (all 5,000 problems, or ``--subset math500``) of a merged checkpoint (``--help``).

python eval/hendrycks_math.py --model merged/
Named after the dataset: a script called math.py would shadow the standard math module.
"""

from tucka_llm.eval.cli import main

if __name__ == "__main__":  # vLLM starts its engine with spawn: the guard keeps the child from re-running this
    main("math")
