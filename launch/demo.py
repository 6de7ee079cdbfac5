"""``tucka demo`` from a checkout, the README's first command: TuckA end to end on SmolLM2-135M-Instruct, on this
CPU, offline, about 15 minutes on 2 cores (``--help``; ``--method lora|dora`` runs a baseline)."""

import sys

from tucka_llm.cli import run

if __name__ == "__main__":  # vLLM starts its engine with spawn: the guard keeps the child from re-running this
    run("demo", sys.argv[1:], "launch/demo.py")
