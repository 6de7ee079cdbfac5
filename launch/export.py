"""Merge a trained adapter into its base: a plain checkpoint that transformers and vLLM load (``--help``).

python launch/export.py --adapter runs/train --out merged/       # TuckA: the mean update over the calibration routes
python launch/export.py --adapter runs/lora --out merged-lora/ --dtype float16
python launch/export.py --adapter runs/train --out routed/ --format lora   # TuckA as per-route LoRA adapters (vLLM)
"""

from tucka_llm.export.cli import main

if __name__ == "__main__":
    main()
