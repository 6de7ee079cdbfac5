"""Merge a trained adapter into its base: a plain checkpoint that transformers and vLLM load (``--help``).

python launch/export.py --adapter runs/train --out merged/              # TuckA: the training-data centroid's route
python launch/export.py --adapter runs/lora --out merged-lora/ --dtype float16
"""

from tucka_llm.export.cli import main

if __name__ == "__main__":
    main()
