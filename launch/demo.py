"""The README's first command: TuckA end to end on a real pretrained model, on a CPU, offline (``--help``).

SmolLM2-135M-Instruct is trained under DeepSpeed on 2 CPU ranks on GSM8K-as-MetaMathQA, merged, evaluated on GSM8K
with vLLM before and after training, and reported; about 15 minutes on 2 cores. ``--method lora|dora`` runs the same
demo for a baseline.
"""

from tucka_llm.demo import main

if __name__ == "__main__":
    main()
