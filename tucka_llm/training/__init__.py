"""Training glue: the command line, the adapters, the HF Trainer over DeepSpeed, checkpoints, the run itself."""

from tucka_llm.training.options import TrainOptions, build_parser, parse_options
from tucka_llm.training.run import train

__all__ = ["TrainOptions", "build_parser", "parse_options", "train"]
