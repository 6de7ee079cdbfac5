"""Fine-tune with TuckA, LoRA or DoRA (``--help`` lists every flag and its default, the paper's reference run).

deepspeed launch/train.py --ds ds_configs/zero2.json            # the reference run, all GPUs of this node
python launch/train.py --model DIR --data gsm8k-train ...       # one process
"""

from __future__ import annotations

import sys

from tucka_llm.atomic import one_line_when_disk_full
from tucka_llm.data import DataError
from tucka_llm.locking import OutputInUse
from tucka_llm.training import parse_options, train
from tucka_llm.training.adapters import ModelError
from tucka_llm.training.run import RunError
from tucka_llm.training.trainer import NonFiniteError


def main() -> None:
    options = parse_options()
    full = "its complete checkpoints are kept: free space there and run the same command with --resume."
    try:
        with one_line_when_disk_full(f"--output {options.output}", full):
            train(options)
    except (DataError, ModelError, RunError, NonFiniteError, OutputInUse) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
