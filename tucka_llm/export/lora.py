"""``launch/export.py --format lora``: a TuckA adapter as peft LoRA adapters, one per served route, with the router
that gives each prompt its route (``tucka_llm.serving``), for engines that serve LoRA adapters per request (vLLM).

A merged checkpoint holds one route; this keeps every input on its own. What cannot be converted is refused: LoRA
(already one: serve it as it is), DoRA (vLLM cannot serve it: merge it), the redraw router (its routes are random
draws, no function of the prompt) and a router placed where its input is not norm(embedding) (a prompt's route would
need the model run up to it).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import peft
import torch
from safetensors.torch import save_file
from transformers import PreTrainedTokenizerBase

import tucka_llm
from tucka_llm.atomic import atomic_directory, atomic_write_json, atomic_write_text
from tucka_llm.export.merge import (
    check_calibration_samples,
    export_method,
    export_target,
    features_recomputer,
    load_adapter,
    load_base,
    load_tokenizer,
    quantized_training,
    read_adapter_config,
    resolve_base,
)
from tucka_llm.export.route import ExportError, calibration_sample, no_calibration_error
from tucka_llm.quantization import describe_quantization
from tucka_llm.serving.prompt_router import PromptRouter, PromptRouterError
from tucka_llm.serving.routed_lora import (
    DEFAULT_GATE_LEVELS,
    FACTORS,
    FORMAT,
    MANIFEST,
    ROUTER_DIR,
    RoutedLoRA,
    RoutedLoRAError,
    check_gate_levels,
    lora_factors,
    route_name,
)
from tucka_llm.tucka.dai import calibration_features, routing_layers
from tucka_llm.tucka.layer import TuckALayer
from tucka_llm.tucka.routing import Route

logger = logging.getLogger("tucka_llm")

NOT_CONVERTED = {
    "lora": "{adapter} holds a LoRA adapter, which LoRA engines serve as it is: give it to vLLM directly "
    "(eval/gsm8k.py --adapter {adapter} --backend vllm, or a LoRARequest); --format lora converts TuckA adapters.",
    "dora": "{adapter} holds a DoRA adapter, which vLLM cannot serve: export it merged (--format merged, the "
    "default) and serve the merged checkpoint.",
}
PROBES = (  # prompts on which the rebuilt router is checked against the model's own routing features
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "A robe takes 2 bolts of blue fiber and half that much white fiber. How many bolts in total does it take?",
    "Let $f(x) = 3x + 2$. What is $f(f(1))$?",
)
PROBE_TOLERANCE = 1e-4  # relative; the same operations give ~1e-7 in float32


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
    calibration_samples: int = 256,
    calibration_routes: bool = True,
    force: bool = False,
) -> LoraExportResult:
    """Convert the TuckA adapter in ``adapter`` into a routed-LoRA directory ``out`` (written atomically).

    ``gate_levels``: the served routes' gate quantisation. With ``calibration_routes`` the adapters of the routes
    the calibration sequences take are written (the features training recorded, else ``calibration_data``);
    without, none (evaluation makes them as prompts need them). Raises ExportError naming the flag to change.
    """
    adapter, out = Path(adapter), Path(out)
    try:
        check_gate_levels(gate_levels)
    except RoutedLoRAError as error:
        raise ExportError(str(error)) from None
    check_calibration_samples(calibration_samples)
    config = read_adapter_config(adapter)
    method = export_method(config)
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
        base_model = load_base(base)
        quantization = quantized_training(adapter, base, base_model)
        model = load_adapter(base_model, adapter)
        tokenizer = load_tokenizer(adapter, base)
        try:
            router = PromptRouter.from_model(model, gate_levels)
        except PromptRouterError as error:
            raise ExportError(f"--format lora: {error} Export it merged instead (--format merged).") from None
        routes: dict[Route, int] = {}
        if calibration_routes:
            features = sequence_features(model, adapter, tokenizer, calibration_data, calibration_samples)
            routes = dict(Counter(router.routes_of_features(features)).most_common())
        manifest = make_manifest(model, adapter, base, config, router, routes, quantization)

        def write(tmp: Path) -> None:
            (name,) = routing_layers(model)
            router.save(tmp / ROUTER_DIR, model.get_base_model().config)
            save_file(lora_factors(model), str(tmp / FACTORS))
            atomic_write_json(tmp / MANIFEST, manifest)
            routed = RoutedLoRA(tmp)
            check_prompt_router(routed, model, tokenizer, name)
            for route in routes:
                routed.adapter(route)
            atomic_write_text(tmp / "README.md", model_card(manifest, out))

        atomic_directory(out, write, replace=force)
    logger.info("routed LoRA export of %s written to %s (%d route adapters)", adapter, out, len(routes))
    return LoraExportResult(out, routes)


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


def check_prompt_router(
    routed: RoutedLoRA, model: peft.PeftModel, tokenizer: PreTrainedTokenizerBase, name: str
) -> None:
    """Refuse the export unless the router rebuilt from the written files gives the model's own routing features on
    a few prompts: the placement rules of ``input_module_names`` are necessary, this is sufficient."""
    ids = [tokenizer(text)["input_ids"] for text in PROBES]
    width = max(map(len, ids))
    batch = {
        "input_ids": torch.tensor([row + [0] * (width - len(row)) for row in ids]),
        "attention_mask": torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in ids]),
    }
    expected = calibration_features(model, [batch])[name]
    got = routed.prompt_router().features(ids)
    error = float(((got.float() - expected).norm(dim=-1) / expected.norm(dim=-1)).max())
    if not error <= PROBE_TOLERANCE:
        raise ExportError(
            f"--format lora: the router rebuilt outside the model gives other routing features than the model "
            f"(relative difference {error:.2g} > {PROBE_TOLERANCE:g}): this architecture feeds its routing layer "
            "differently. Export it merged instead (--format merged)."
        )


def make_manifest(
    model: peft.PeftModel,
    adapter: Path,
    base: str,
    config: peft.PeftConfig,
    router: PromptRouter,
    routes: dict[Route, int],
    quantization: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What the directory holds, how it was made, and what serving it needs (``manifest.json``)."""
    ((_, layer),) = routing_layers(model).items()
    (adapter_name,) = layer.tucka_router
    low, high = router.router.gate_range()
    return {
        "format": FORMAT,
        "base": base,
        "adapter": str(adapter.resolve()),
        "adapter_sha256": adapter_digest(adapter),
        "adapter_config": json.loads((adapter / "adapter_config.json").read_text()),  # as saved: lists, not sets
        "gate_levels": router.gate_levels,
        "gate_range": [low, high],
        "lora": {"r": config.r, "lora_alpha": config.r, "dtype": "float32", "modules": adapted_modules(model)},
        "router": {
            "directory": ROUTER_DIR,
            "module": layer.tucka_state[adapter_name].router_module,
            "inputs": router.input_names,
            **router.router.settings(),
        },
        "routes": [
            {"name": route_name(r), "group": r.group, "gates": list(r.gates), "calibration_sequences": n}
            for r, n in routes.items()
        ],
        "trained_on_quantized_base": quantization,
        "tucka_llm_version": tucka_llm.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def adapted_modules(model: peft.PeftModel) -> list[str]:
    """The names, in the base model, of the layers the adapter adapts (each route adapter has their LoRA weights)."""
    return [name for name, module in model.get_base_model().named_modules() if isinstance(module, TuckALayer)]


def adapter_digest(adapter: Path) -> str:
    """sha256 of the adapter's weights: a conversion is reused only for the same weights."""
    digest = hashlib.sha256()
    with (adapter / "adapter_model.safetensors").open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_card(manifest: dict[str, Any], out: Path) -> str:
    """README.md of the directory: what it is and how to serve it."""
    config, lora = manifest["adapter_config"], manifest["lora"]
    modules = " ".join(f"{r['name']}={out}/routes/{r['name']}" for r in manifest["routes"][:2])
    lines = [
        f"# {out.name}",
        "",
        f"The TuckA adapter {manifest['adapter']} (r={config['r']}, k={config['k']}, t={config['t']}, "
        f"p={config['p']}, router {config['router']}) as peft LoRA adapters of rank {lora['r']} on {manifest['base']}, "
        f"one per served route: a group with its gates quantised to {manifest['gate_levels']} levels. Made by "
        f"tucka-llm {manifest['tucka_llm_version']} on {manifest['created']}.",
        "",
        f"- `routes/NAME/`: {len(manifest['routes'])} adapters, the routes of the calibration sequences "
        "(`manifest.json` lists them); more are made on demand by `tucka_llm.serving.RoutedLoRA(dir).adapter(route)`.",
        "- `router/`: the prompt router (the base's embedding and first input norm, the centroids): "
        "`RoutedLoRA(dir).prompt_router().routes(token_ids)` gives each prompt its route without running the model.",
        "- `factors.safetensors`: U^T, W U and the mixing matrices, from which any route's adapter is made.",
        "",
        *quantization_note(manifest),
        "Serve with vLLM (`enable_lora=True`, `max_lora_rank` >= the rank), one `LoRARequest` per prompt for its",
        f"route's adapter, or `vllm serve {manifest['base']} --enable-lora --lora-modules {modules} ...` with the",
        "route's name as the request's model. See the tucka-llm README, \"Routed serving\".",
        "",
    ]
    return "\n".join(lines)


def quantization_note(manifest: dict[str, Any]) -> list[str]:
    """The model card's lines on a base quantised in training (none if it was not)."""
    quantization = manifest.get("trained_on_quantized_base")
    if quantization is None:
        return []
    return [
        f"Trained on the base quantised to {describe_quantization(quantization)}; W U is taken from the base in full "
        "precision, so serve the adapters on the full-precision base (the usual QLoRA practice).",
        "",
    ]
