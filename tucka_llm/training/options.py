"""Command line of ``tucka train``: every flag, its default (the paper's reference run) and its checks."""

from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any

from transformers import SchedulerType

from tucka_llm.data import OVERLONG_POLICIES, SHIPPED_DATASETS
from tucka_llm.errors import TuckaError
from tucka_llm.loading import QUANTIZATIONS
from tucka_llm.tucka.calibration import DEFAULT_SAMPLES
from tucka_llm.tucka.router import ROUTERS

METHODS = ("tucka", "lora", "dora")
OPTIMIZERS = {"adamw_torch": "adamw_torch", "adamw_8bit": "adamw_bnb_8bit"}  # ours -> TrainingArguments.optim
PRECISIONS = ("bf16", "fp32")
SCHEDULERS = tuple(s.value for s in SchedulerType)  # transformers' names, checked before anything is written
# The DeepSpeed configs shipped in the package (tucka_llm/ds_configs; the repository's ds_configs/ links to them):
# zero2 is the reference run's, zero2_offload keeps the optimizer on the CPU, zero3 partitions the base too.
DS_CONFIGS = ("zero2", "zero2_offload", "zero3")
REFERENCE_GLOBAL_BATCH = 32  # sequences per optimizer step in the paper's run (section 6 of the method notes)


class RunError(TuckaError):
    """A run that cannot start as asked (output directory, batch sizes, configs); the message names the flag."""


@dataclass
class TrainOptions:
    """One training run; the defaults are the paper's reference run (method note, section 6)."""

    ds: str | None = None
    model: str = "meta-llama/Llama-2-7b-hf"
    tokenizer: str | None = None
    data: str = "meta-math/MetaMathQA"
    num_examples: int | None = 100_000
    method: str = "tucka"
    r: int = 16
    k: int = 4
    t: int = 2
    p: int = 2
    alpha: float | str = "auto"  # 512 * sqrt(hidden / 4096): 512 on Llama-2-7B
    router: str = "centred"
    normalize_gates: bool = True
    perturb_scale: float = 20.0
    dai_samples: int = DEFAULT_SAMPLES
    lora_r: int = 32
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    target_modules: str = "q_proj,v_proj"
    epochs: float = 2.0
    max_steps: int | None = None
    stop_at_step: int | None = None
    micro_batch: int = 1
    global_batch: int | None = None  # None: REFERENCE_GLOBAL_BATCH, or what --grad-accum implies
    grad_accum: int | None = None
    lr: float = 1e-3
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_len: int = 512
    overlong: str = "truncate"
    precision: str = "bf16"
    quantize: str | None = None
    optim: str = "adamw_torch"
    gradient_checkpointing: bool = False
    seed: int = 42
    output: str = "runs/train"
    resume: bool = False
    save_steps: int = 500
    save_total_limit: int = 2
    logging_steps: int = 10

    @property
    def target_module_list(self) -> list[str]:
        return [name.strip() for name in self.target_modules.split(",") if name.strip()]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _positive(kind: type) -> Any:
    """A flag's parser for a number > 0; a float must also be finite (nan or inf would train silently to NaN)."""

    def parse(text: str) -> Any:
        value = kind(text)
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _non_negative(text: str) -> float:
    """A flag's parser for a finite float >= 0 (weight decay, clipping norm, DAI perturbation)."""
    value = float(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


_non_negative.__name__ = "float"


def _alpha(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        return _positive(float)(text)
    except (argparse.ArgumentTypeError, ValueError):
        raise argparse.ArgumentTypeError(f"must be 'auto' or a finite number > 0, got {text}") from None


_alpha.__name__ = "alpha"


def build_parser(prog: str = "tucka train") -> argparse.ArgumentParser:
    """The flags of ``tucka train``; each default is the ``TrainOptions`` field's."""
    d = TrainOptions()
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Fine-tune a causal LM with TuckA, LoRA or DoRA on MetaMathQA-style data. With no flags other than "
            "--ds, the paper's reference run: Llama-2-7B, the first 100,000 MetaMathQA examples, TuckA r16 k4 t2 "
            "p2, 2 epochs, BF16, global batch 32. Start it with `deepspeed $(which tucka) train --ds zero2` "
            "(multi-node: DeepSpeed's --hostfile), or `tucka train` for one process."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    run = parser.add_argument_group("run")
    run.add_argument(
        "--ds",
        default=d.ds,
        metavar="CONFIG",
        help=f"DeepSpeed config: a shipped one by name ({', '.join(DS_CONFIGS)}) or a JSON file; its 'auto' values "
        "are filled from these flags. Without it, one process and no DeepSpeed.",
    )
    run.add_argument("--model", default=d.model, help="base model: hub id or local directory")
    run.add_argument("--tokenizer", default=d.tokenizer, help="tokenizer: hub id or directory (default: --model)")
    run.add_argument(
        "--output",
        default=d.output,
        metavar="DIR",
        help="run directory: final adapter, tokenizer, run_config.json, metrics.jsonl, tensorboard/, checkpoints/",
    )
    run.add_argument(
        "--resume", action="store_true", help="continue the run in --output from its newest complete checkpoint"
    )
    # DeepSpeed's launcher passes --local_rank; the rank is read from the environment it also sets.
    run.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    run.add_argument("--seed", type=int, default=d.seed, help="seed of the adapter init, data order and DAI sample")
    data = parser.add_argument_group("data")
    data.add_argument(
        "--data",
        default=d.data,
        help="MetaMathQA records (query, response): hub id, local .json/.jsonl, or a shipped name: "
        + "; ".join(f"{k} ({v})" for k, v in SHIPPED_DATASETS.items()),
    )
    data.add_argument(
        "--num-examples",
        type=_positive(int),
        default=d.num_examples,
        help="use the first N records in file order (omit with --all-examples)",
    )
    data.add_argument(
        "--all-examples",
        dest="num_examples",
        action="store_const",
        const=None,
        default=argparse.SUPPRESS,
        help="use every record",
    )
    data.add_argument("--max-len", type=_positive(int), default=d.max_len, help="tokens per example")
    data.add_argument(
        "--overlong",
        choices=OVERLONG_POLICIES,
        default=d.overlong,
        help="what to do with examples over --max-len (MetaMath truncates)",
    )
    method = parser.add_argument_group("adapter")
    method.add_argument("--method", choices=METHODS, default=d.method, help="adapter method")
    method.add_argument("--target-modules", default=d.target_modules, help="comma-separated module names to adapt")
    method.add_argument("--r", type=_positive(int), default=d.r, help="TuckA: rank of the subspace U and cores G")
    method.add_argument("--k", type=_positive(int), default=d.k, help="TuckA: expert groups")
    method.add_argument("--t", type=_positive(int), default=d.t, help="TuckA: experts per group")
    method.add_argument("--p", type=_positive(int), default=d.p, help="TuckA: expert-factor rank")
    method.add_argument(
        "--alpha",
        type=_alpha,
        default=d.alpha,
        help="TuckA: scale of the update; auto = 512 * sqrt(hidden size / 4096) (512 on Llama-2-7B, 192 on "
        "SmolLM2-135M: the paper's 512 damages a narrower model at step 0); the value used is recorded",
    )
    method.add_argument(
        "--router",
        choices=list(ROUTERS),
        default=d.router,
        help="TuckA: centred (logits E (h - e_bar): balanced groups), dai (the paper's design, logits E h: collapses "
        "onto one group on real data), redraw (the authors' published code: E redrawn at every forward, untrained)",
    )
    method.add_argument(
        "--no-normalize-gates",
        dest="normalize_gates",
        action="store_false",
        help="TuckA: gates not divided by their sum, as in the authors' code (paper Eq. 8 divides them; without "
        "this flag normalize_gates=%(default)s)",
    )
    method.add_argument(
        "--perturb-scale", type=_non_negative, default=d.perturb_scale, help="TuckA: DAI perturbation a, eps ~ U(-a, a)"
    )
    method.add_argument(
        "--dai-samples",
        type=_positive(int),
        default=d.dai_samples,
        help="TuckA: training sequences (random, --seed) whose routing centroid initialises E",
    )
    method.add_argument("--lora-r", type=_positive(int), default=d.lora_r, help="LoRA/DoRA rank")
    method.add_argument("--lora-alpha", type=_positive(float), default=d.lora_alpha, help="LoRA/DoRA alpha")
    method.add_argument("--lora-dropout", type=float, default=d.lora_dropout, help="LoRA/DoRA dropout")
    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=_positive(float), default=d.epochs, help="passes over the data")
    opt.add_argument(
        "--max-steps", type=_positive(int), default=d.max_steps, help="optimizer steps in all (overrides --epochs)"
    )
    opt.add_argument(
        "--stop-at-step",
        type=_positive(int),
        default=d.stop_at_step,
        help="end this invocation after step N with a checkpoint, keeping the full run's schedule "
        "(for job time limits); continue with --resume",
    )
    opt.add_argument("--micro-batch", type=_positive(int), default=d.micro_batch, help="sequences per rank per step")
    opt.add_argument(
        "--global-batch",
        type=_positive(int),
        default=d.global_batch,
        help=f"sequences per optimizer step over all ranks (None: {REFERENCE_GLOBAL_BATCH}, the reference run's, "
        "unless --grad-accum is given)",
    )
    opt.add_argument(
        "--grad-accum",
        type=_positive(int),
        default=d.grad_accum,
        help="micro-batches per optimizer step (default: global batch / (micro batch x ranks))",
    )
    opt.add_argument("--lr", type=_positive(float), default=d.lr, help="peak learning rate")
    opt.add_argument("--lr-scheduler", default=d.lr_scheduler, help="transformers scheduler name")
    opt.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio, help="share of steps of linear warmup")
    opt.add_argument("--weight-decay", type=_non_negative, default=d.weight_decay, help="AdamW weight decay")
    opt.add_argument("--max-grad-norm", type=_non_negative, default=d.max_grad_norm, help="gradient clipping (0: none)")
    opt.add_argument(
        "--optim",
        choices=OPTIMIZERS,
        default=d.optim,
        help="optimizer: adamw_8bit is bitsandbytes' AdamW with its two moments in 8 bits (a quarter of their "
        "memory; tensors under 4,096 elements keep 32-bit moments)",
    )
    opt.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=d.precision,
        help="bf16: base weights and compute in bfloat16, fp32 master weights; fp32: all float32",
    )
    opt.add_argument(
        "--quantize",
        choices=QUANTIZATIONS,
        default=d.quantize,
        help="load the base model's Linear layers in 4-bit NF4 with double quantisation (bitsandbytes, as QLoRA), "
        "computing in --precision; the adapter trains in full precision, and tucka export merges it into the "
        "full-precision base. Without it the base is loaded in --precision",
    )
    opt.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute activations in backward (non-reentrant) to save memory",
    )
    log = parser.add_argument_group("checkpoints and logging")
    log.add_argument("--save-steps", type=_positive(int), default=d.save_steps, help="checkpoint every N steps")
    log.add_argument(
        "--save-total-limit",
        type=_positive(int),
        default=d.save_total_limit,
        help="complete checkpoints kept (oldest deleted)",
    )
    log.add_argument(
        "--logging-steps",
        type=_positive(int),
        default=d.logging_steps,
        help="metrics.jsonl / TensorBoard every N steps",
    )
    return parser


def ds_config_path(value: str) -> str:
    """``--ds``: a shipped config's name (``DS_CONFIGS``) as the path of the file installed with the package."""
    if value in DS_CONFIGS:
        return str(resources.files("tucka_llm").joinpath("ds_configs", f"{value}.json"))
    return value


def parse_options(argv: list[str] | None = None, prog: str = "tucka train") -> TrainOptions:
    """Parse and check the command line; a bad combination exits with a message naming the flag."""
    parser = build_parser(prog)
    namespace = parser.parse_args(argv)
    if namespace.ds is not None:
        namespace.ds = ds_config_path(namespace.ds)
    options = TrainOptions(**{f.name: getattr(namespace, f.name) for f in fields(TrainOptions)})
    # Local paths are recorded absolute: export finds the model from anywhere, and --resume compares the files
    # themselves, however they were typed or wherever the command is run from.
    for name in ("model", "tokenizer", "data", "ds"):
        value = getattr(options, name)
        if value is not None and Path(value).exists():
            setattr(options, name, str(Path(value).resolve()))
    if not options.target_module_list:
        parser.error("--target-modules is empty: give module names such as q_proj,v_proj.")
    if not 0 <= options.warmup_ratio < 1:
        parser.error(f"--warmup-ratio must be in [0, 1), got {options.warmup_ratio}.")
    if not 0 <= options.lora_dropout < 1:
        parser.error(f"--lora-dropout must be in [0, 1), got {options.lora_dropout}.")
    if options.lr_scheduler not in SCHEDULERS:
        parser.error(f"--lr-scheduler {options.lr_scheduler}: unknown; choose one of {', '.join(SCHEDULERS)}.")
    if options.ds is not None and not Path(options.ds).is_file():
        parser.error(f"--ds {options.ds}: no such file; give a JSON file or a shipped config: {', '.join(DS_CONFIGS)}.")
    return options
