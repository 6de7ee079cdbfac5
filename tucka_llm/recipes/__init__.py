"""Recipes: pipelines of the project's own commands (the demo, the paper's Table 3) and the stage runner under them.

A recipe runs every stage as a subprocess of this package's command (``python -m tucka_llm ...``), never through
repository paths, so it works from an installed wheel as well as from a checkout.
"""
