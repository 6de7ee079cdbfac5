"""The paper's Table 3 in one command: train, merge and evaluate TuckA r16/r32, LoRA and DoRA (``--help``).

python launch/reproduce_table3.py --gpus 8                                   # Llama-2-7B, the reference settings
python launch/reproduce_table3.py --scale tiny --model DIR --gpus 2 --configs tucka-r16k4     # orchestration on CPU
"""

from tucka_llm.table3 import main

if __name__ == "__main__":  # vLLM starts its engine with spawn: the guard keeps the child from re-running this
    main()
