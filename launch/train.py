"""``tucka train`` from a checkout (``--help`` lists every flag and its default, the paper's reference run).

deepspeed launch/train.py --ds ds_configs/zero2.json            # the reference run, all GPUs of this node
python launch/train.py --model DIR --data gsm8k-train ...       # one process
"""

import sys

from tucka_llm.cli import run, without_local_rank

if __name__ == "__main__":
    run("train", without_local_rank(sys.argv[1:]), "launch/train.py")
