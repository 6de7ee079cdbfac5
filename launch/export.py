"""``tucka export`` from a checkout: merge a trained adapter into its base, a plain checkpoint (``--help``).

python launch/export.py --adapter runs/train --out merged/       # TuckA: the mean update over the calibration routes
python launch/export.py --adapter runs/train --out routed/ --format lora   # TuckA as per-route LoRA adapters (vLLM)
"""

import sys

from tucka_llm.cli import run

if __name__ == "__main__":
    run("export", sys.argv[1:], "launch/export.py")
