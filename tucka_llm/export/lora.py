"""``tucka export --format lora``: a TuckA adapter as peft LoRA adapters, one per served route, with the router
that gives each prompt its route (``tucka_llm.serving``), for engines that serve LoRA adapters per request (vLLM).

A merged checkpoint holds one route; this keeps every input on its own. What cannot be converted is refused: LoRA
(already one: serve it as it is), DoRA (vLLM cannot serve it: merge it), the redraw router (its routes are random
draws, no function of the prompt) and a router placed where its input is not norm(embedding) (a prompt's route would
need the model run up to it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import peft
import torch
from transformers import PreTrainedTokenizerBase

from tucka_llm.export.merge import check_calibration_samples, export_target, features_recomputer, resolve_base
from tucka_llm.export.route import ExportError, calibration_sample, no_calibration_error
from tucka_llm.loading import adapter_method, load_trained, saved_adapter_config
from tucka_llm.serving.routed_lora import DEFAULT_GATE_LEVELS, RoutedLoRA, write_routed_lora
from tucka_llm.tucka.calibration import DEFAULT_SAMPLES
from tucka_llm.tucka.dai import routing_layers
from tucka_llm.tucka.routing import Route, check_gate_levels

logger = logging.getLogger("tucka_llm")

NOT_CONVERTED = {
    "lora": "{adapter} holds a LoRA adapter, which LoRA engines serve as it is: give it to vLLM directly "
    "(tucka eval gsm8k --adapter {adapter} --backend vllm, or a LoRARequest); --format lora converts TuckA adapters.",
    "dora": "{adapter} holds a DoRA adapter, which vLLM cannot serve: export it merged (--format merged, the "
    "default) and serve the merged checkpoint.",
}


@dataclass
class LoraExportResult:
    """What ``export_lora`` wrote: the directory and the routes whose adapters it holds (with their counts among
    the calibration sequences)."""

    path: Path
    routes: dict[Route, int]


def export_lora(
    adapter: str | Path,
    out: str | Path,
    *,
    base: str | None = None,
    gate_levels: int = DEFAULT_GATE_LEVELS,
    calibration_data: str | None = None,
    calibration_samples: int = DEFAULT_SAMPLES,
    force: bool = False,
) -> LoraExportResult:
    """Convert the TuckA adapter in ``adapter`` into a routed-LoRA directory ``out`` (``serving.routed_lora``,
    written atomically) with the adapters of the routes the calibration sequences take (the features training
    recorded, else recomputed from ``calibration_data``). ``gate_levels``: the served routes' gate quantisation.
    Raises a TuckaError naming the flag to change."""
    adapter, out = Path(adapter), Path(out)
    check_gate_levels(gate_levels, "--gate-levels")
    check_calibration_samples(calibration_samples)
    config = saved_adapter_config(adapter)
    method = adapter_method(config)
    if method != "tucka":
        raise ExportError(f"--format lora: {NOT_CONVERTED[method].format(adapter=adapter)}")
    if config.router == "redraw":
        raise ExportError(
            f"--format lora: {adapter} uses the redraw router, whose routes are random draws made anew at every "
            "forward, not a function of the prompt: no served route can stand for them. Export it merged "
            "(--format merged; --route expected averages the draws)."
        )
    base = resolve_base(config, base, adapter)
    with export_target(adapter, out, base, force):
        trained = load_trained(adapter, base, "--base")
        features = sequence_features(trained.model, adapter, trained.tokenizer, calibration_data, calibration_samples)
        routed = write_routed_lora(
            trained.model, out, adapter=adapter, base=base, tokenizer=trained.tokenizer, gate_levels=gate_levels,
            features=features, quantization=trained.quantization, replace=force,
        )  # fmt: skip
    routes = written_routes(routed)
    logger.info("routed LoRA export of %s written to %s (%d route adapters)", adapter, out, len(routes))
    return LoraExportResult(out, routes)


def written_routes(routed: RoutedLoRA) -> dict[Route, int]:
    """The routes written at export with their counts among the calibration sequences, as the manifest lists them."""
    return {Route(r["group"], tuple(r["gates"])): r["calibration_sequences"] for r in routed.manifest["routes"]}


def sequence_features(
    model: peft.PeftModel, adapter: Path, tokenizer: PreTrainedTokenizerBase, data: str | None, samples: int
) -> torch.Tensor:
    """The calibration sequences' routing features, (n, d): recorded by training, else recomputed from ``data``."""
    ((name, layer),) = routing_layers(model).items()
    recompute = features_recomputer(model, tokenizer, data, samples)
    found = calibration_sample(adapter, name, layer.in_features, recompute, sequences=True)
    if found is None or found[0].shape[0] == 1:
        error = no_calibration_error("routing features of calibration sequences", "--format lora", adapter)
        raise ExportError(f"{error}.")
    return found[0].float()
