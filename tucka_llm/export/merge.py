"""Fold a trained adapter (TuckA, LoRA or DoRA) into its base model and write a plain Hugging Face checkpoint.

The base is loaded once in the dtype it is stored in (a 7B fp16 checkpoint: 13.5 GB of CPU RAM). Each adapted
layer is then merged on its own: its weight is taken to fp32 on ``device``, merged there (TuckA by our merge
under the chosen route, LoRA and DoRA by peft's own), and cast once to the export dtype. So at most one layer is
ever held in fp32, and a GPU, when there is one, only ever holds one layer.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import peft
import torch
from huggingface_hub.serialization._base import parse_size_to_int
from peft.tuners.tuners_utils import BaseTunerLayer
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

import tucka_llm
from tucka_llm.data import DataError, load_metamathqa, tokenize_metamathqa
from tucka_llm.export.route import DEFAULT_ROUTE, ChosenRoute, ExportError, RouteSpec, choose_route
from tucka_llm.io.atomic import atomic_directory, atomic_write_json, atomic_write_text, remove_stale_directories
from tucka_llm.io.locking import LOCK_FILE, exclusive
from tucka_llm.layout import ADAPTER_CONFIG, EXPORT_RECORD, MODEL_CARD, ROUTE_RECORD
from tucka_llm.loading import (
    adapter_method,
    describe_quantization,
    load_trained,
    saved_adapter_config,
)
from tucka_llm.tucka.calibration import DEFAULT_SAMPLES, calibration_batches
from tucka_llm.tucka.dai import calibration_features
from tucka_llm.tucka.model import routing

logger = logging.getLogger("tucka_llm")

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
CALIBRATION_MAX_LEN = 512  # the training default (--max-len)
CALIBRATION_SEED = 42  # the training default (--seed)
DEFAULT_DTYPE = "bfloat16"
DEFAULT_MAX_SHARD_SIZE = "5GB"


@dataclass
class ExportResult:
    """What ``export_merged`` wrote: the checkpoint directory, the method, and for TuckA the route it folded."""

    path: Path
    method: str
    dtype: str
    route: ChosenRoute | None


def export_merged(
    adapter: str | Path,
    out: str | Path,
    *,
    base: str | None = None,
    route: str | None = None,
    dtype: str = DEFAULT_DTYPE,
    calibration_data: str | None = None,
    calibration_samples: int = DEFAULT_SAMPLES,
    device: str | None = None,
    max_shard_size: str = DEFAULT_MAX_SHARD_SIZE,
    force: bool = False,
) -> ExportResult:
    """Merge the adapter in ``adapter`` into its base and write the checkpoint to ``out`` (atomically).

    ``base`` defaults to the base recorded in the adapter; ``route`` (TuckA only) is ``RouteSpec`` syntax, default
    DEFAULT_ROUTE; ``dtype`` one of DTYPES (the merge itself is always fp32); ``device`` where layers are merged
    (default: cuda when available). Raises ExportError with the flag to change for every input it cannot use.
    """
    adapter, out = Path(adapter), Path(out)
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype}: not supported; choose one of {', '.join(DTYPES)}.")
    check_flags(device, max_shard_size, calibration_samples)
    config = saved_adapter_config(adapter)
    base = resolve_base(config, base, adapter)
    with export_target(adapter, out, base, force):
        return _export(adapter, out, config, base, route, dtype, calibration_data, calibration_samples, device,
                       max_shard_size, force)  # fmt: skip


def resolve_base(config: peft.PeftConfig, base: str | None, adapter: Path) -> str:
    """``--base``, else the base model recorded in the adapter's config."""
    base = base or config.base_model_name_or_path
    if not base:
        raise ExportError(f"--adapter {adapter}: its adapter_config.json records no base model; pass --base.")
    return base


@contextlib.contextmanager
def export_target(adapter: Path, out: Path, base: str, force: bool) -> Iterator[None]:
    """Hold ``out``'s lock for the block, after removing what a stopped export left beside it and refusing an ``out``
    that exists without ``force`` or would replace an input. The lock sits beside ``out``, since an export replaces
    ``out`` as a whole: one export to an --out at a time."""
    with exclusive(out.parent / f".{out.name}{LOCK_FILE}", f"--out {out}"):
        for stale in remove_stale_directories(out):
            logger.info("removed %s, left by an export to %s that was stopped", stale, out)
        check_output(out, force, inputs=[adapter, Path(base)])
        yield


def _export(
    adapter: Path,
    out: Path,
    config: peft.PeftConfig,
    base: str,
    route: str | None,
    dtype: str,
    calibration_data: str | None,
    calibration_samples: int,
    device: str | None,
    max_shard_size: str,
    force: bool,
) -> ExportResult:
    """``export_merged`` once its flags are read and ``out`` is locked."""
    method = adapter_method(config)
    spec = RouteSpec.parse(route or DEFAULT_ROUTE)
    if method != "tucka" and route is not None:
        raise ExportError(f"--route applies to TuckA adapters only; {adapter} holds a {method} adapter.")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")

    trained = load_trained(adapter, base, "--base")
    model, tokenizer, quantization = trained.model, trained.tokenizer, trained.quantization
    chosen = None
    if method == "tucka":
        chosen = choose_route(
            model, spec, adapter, features_recomputer(model, tokenizer, calibration_data, calibration_samples)
        )
        logger.info("folding %s", chosen.describe())
    merged = merge_layer_by_layer(model, chosen, DTYPES[dtype], torch.device(device))

    record = {
        "base": base,
        "adapter": str(adapter.resolve()),
        "method": method,
        "adapter_config": json.loads((adapter / ADAPTER_CONFIG).read_text()),  # as saved: lists, not sets
        "dtype": dtype,
        "route": None if chosen is None else chosen.to_json(),
        "trained_on_quantized_base": quantization,
        "tucka_llm_version": tucka_llm.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }

    def write(tmp: Path) -> None:
        merged.save_pretrained(tmp, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(tmp)
        if chosen is not None:
            atomic_write_json(tmp / ROUTE_RECORD, chosen.to_json())
        atomic_write_json(tmp / EXPORT_RECORD, record)
        atomic_write_text(tmp / MODEL_CARD, model_card(record, out.name, chosen))

    atomic_directory(out, write, replace=force)
    logger.info("merged %s checkpoint (%s) written to %s", method, dtype, out)
    return ExportResult(out, method, dtype, chosen)


def check_flags(device: str | None, max_shard_size: str, calibration_samples: int) -> None:
    """Refuse, before any work, a --device this machine lacks, a --max-shard-size that is no size, and a
    --calibration-samples below 1 (each failed late, with a traceback, after the merge)."""
    if device is not None:
        try:
            where = torch.device(device)
        except (RuntimeError, ValueError) as error:
            raise ExportError(f"--device {device}: not a device name ({error}); use cpu or cuda[:N].") from None
        if where.type == "cuda" and (where.index or 0) >= torch.cuda.device_count():
            raise ExportError(
                f"--device {device}: not present ({torch.cuda.device_count()} CUDA devices here); use cpu or one "
                "that is."
            )
        if where.type not in ("cpu", "cuda"):
            raise ExportError(f"--device {device}: export merges on cpu or cuda[:N].")
    try:
        shard_bytes = parse_size_to_int(max_shard_size)
    except ValueError as error:
        raise ExportError(f"--max-shard-size {max_shard_size}: not a size ({error}); write it like 5GB.") from None
    if shard_bytes <= 0:
        raise ExportError(f"--max-shard-size {max_shard_size}: must be more than 0 bytes.")
    check_calibration_samples(calibration_samples)


def check_calibration_samples(samples: int) -> None:
    if samples < 1:
        raise ExportError(f"--calibration-samples must be at least 1, got {samples}.")


def check_output(out: Path, force: bool, inputs: list[Path]) -> None:
    """Refuse, before any work, an output that exists without --force or that would replace an input."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out}: is a file; give a directory.")
    resolved = out.resolve()
    for path in inputs:
        if path.exists() and (resolved == path.resolve() or resolved in path.resolve().parents):
            raise ExportError(f"--out {out}: replacing it would delete the input {path}; choose another directory.")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ExportError(f"--out {out}: exists and is not empty; pass --force to replace it, or choose another.")


def features_recomputer(
    model: peft.PeftModel, tokenizer: PreTrainedTokenizerBase, source: str | None, samples: int
) -> Callable[[], tuple[torch.Tensor, dict[str, Any]]] | None:
    """The calibration sample's routing features recomputed from ``source`` the way training computes them
    (``--calibration-data``)."""
    if source is None:
        return None

    def recompute() -> tuple[torch.Tensor, dict[str, Any]]:
        try:
            data = load_metamathqa(source)
            order = torch.randperm(len(data), generator=torch.Generator().manual_seed(CALIBRATION_SEED))[:samples]
            sample = tokenize_metamathqa(data.select(order.tolist()), tokenizer, CALIBRATION_MAX_LEN).dataset
        except DataError as error:
            raise ExportError(f"--calibration-data: {error}") from error
        batches = calibration_batches(sample, samples, CALIBRATION_SEED, tokenizer)
        (features,) = calibration_features(model, batches).values()
        return features, {
            "source": "recomputed at export",
            "data": source,
            "samples": len(sample),
            "seed": CALIBRATION_SEED,
        }

    return recompute


@torch.no_grad()
def merge_layer_by_layer(
    model: peft.PeftModel, chosen: ChosenRoute | None, dtype: torch.dtype, device: torch.device
) -> PreTrainedModel:
    """Merge every adapted layer in fp32 on ``device`` and cast it to ``dtype``; return the plain base model."""
    layers = [(name, module) for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]
    with routing(model, chosen.route) if chosen is not None else contextlib.nullcontext():
        for name, layer in tqdm(layers, desc="merging", unit="layer"):
            weight = layer.get_base_layer().weight
            home = weight.device
            layer.to(device)
            weight = layer.get_base_layer().weight
            weight.data = weight.data.float()
            layer.merge()
            weight.data = weight.data.to(dtype)
            if not bool(torch.isfinite(weight.data).all()):
                raise ExportError(
                    f"--dtype {str(dtype).removeprefix('torch.')}: the merged weight of {name} is not finite (NaN, or "
                    "out of the dtype's range); the base may hold non-finite values, or choose --dtype bfloat16 or "
                    "float32."
                )
            layer.to(home)
    plain = model.unload()
    return plain.to(dtype)


def served_inputs(chosen: ChosenRoute) -> str:
    """What share of inputs the folded selection serves as the adapter would (the model card's warning)."""
    calibration = chosen.calibration
    if calibration is None:
        return "Share of inputs this route serves exactly: unknown (no calibration routes were available)."
    shares = ", ".join(f"group {i} {100 * s:.1f}%" for i, s in enumerate(calibration.share))
    loads = f"the trained router sends the {calibration.sequences} calibration routes to {shares}"
    if chosen.served_share is None:
        return (
            f"Exact for no single input: every input gets the mean update, while the unmerged adapter gives each "
            f"its own group ({loads}). For every input on its own route, serve the adapter unmerged."
        )
    return (
        f"Exact for the {100 * chosen.served_share:.1f}% of inputs that the router sends to this group ({loads}); "
        "the others get this group's update instead of their own. For every input on its own route, serve the "
        "adapter unmerged."
    )


def model_card(record: dict[str, Any], name: str, chosen: ChosenRoute | None = None) -> str:
    """README.md of the merged checkpoint: what it was made from and how to load it."""
    config = record["adapter_config"]
    if record["method"] == "tucka":
        shape = f"r={config['r']}, k={config['k']}, t={config['t']}, p={config['p']}, alpha={config['alpha']}"
    else:
        shape = f"r={config['r']}, lora_alpha={config['lora_alpha']}"
    targets = config.get("target_modules")
    targets = ", ".join(sorted(targets)) if isinstance(targets, list | set) else targets
    lines = [
        f"# {name}",
        "",
        f"{record['base']} with a {record['method'].upper()} adapter merged into its weights by tucka-llm "
        f"{record['tucka_llm_version']} on {record['created']}. A plain checkpoint: no adapter code is needed.",
        "",
        f"- Base model: {record['base']}",
        f"- Adapter: {record['adapter']} ({record['method']}, {shape}; target modules: {targets})",
        f"- Dtype: {record['dtype']} (merged in float32, cast once)",
    ]
    if record.get("trained_on_quantized_base"):
        lines.append(
            f"- Trained on the base quantised to {describe_quantization(record['trained_on_quantized_base'])}; "
            "merged into the base in full precision"
        )
    if chosen is not None:
        lines.append(f"- TuckA route folded in: {chosen.describe()} ({ROUTE_RECORD})")
        lines.append(f"- {served_inputs(chosen)}")
    lines += [
        "",
        "Load it with `transformers.AutoModelForCausalLM.from_pretrained(path)` or serve it with `vllm.LLM(path)`.",
        f"`{EXPORT_RECORD}` records the full adapter configuration. The base model's licence applies.",
        "",
    ]
    return "\n".join(lines)
