"""``python -m tucka_llm COMMAND``: the ``tucka`` command (``tucka_llm.cli``)."""

from tucka_llm.cli import main

if __name__ == "__main__":  # vLLM starts its engine with spawn: the guard keeps the child from re-running this
    main()
