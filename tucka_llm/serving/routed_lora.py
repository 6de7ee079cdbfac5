"""A TuckA adapter converted for LoRA serving: one peft LoRA adapter per served route, and the router that picks it.

Under a fixed route (group i, gates g) a TuckA layer is exactly a rank-r LoRA layer (method note, section 4):
A = U^T and B = W U (sum_j g_j M_ij)^T, alpha and the normalisations folded into M (``TuckALayer.lora_basis``).
A served route is a group with gates quantised to ``gate_levels`` values (``Router.quantise``), so finitely many
adapters cover every prompt; an adapter is made the first time its route is asked for, from the factors alone (no
base model, no TuckA code), and kept.

Why not peft's ``convert_to_lora`` / ``save_as_lora`` (peft 0.21): a tuner plugs into them with
``get_delta_weight``, the dense d_out x d_in update, which peft then factorises by SVD. For TuckA that forms the
d x d matrix the method never needs, costs O(d^3) per layer and route (minutes per route for a 7B model on a CPU),
and returns factors exact only to the SVD's rounding, while the exact rank-r factors are known in closed form
(peft special-cases such closed forms for its own MiSS only). So the adapters are written here the way
``save_as_lora`` writes them: a ``LoraConfig`` (r = lora_alpha, scaling 1, the TuckA adapter's target modules) and
``adapter_model.safetensors`` with peft's key names, which ``PeftModel.from_pretrained`` and vLLM load.

Directory (``tucka export --format lora``)::

    manifest.json          what it was made from, the served-route settings, the routes written at export
    router/                the prompt router (``PromptRouter``): config.json, router.json, router.safetensors
    factors.safetensors    per adapted module: lora_A = U^T, wu = W U, mixing = M (k, t, r, r), float32
    routes/NAME/           one peft LoRA adapter per served route (adapter_config.json, adapter_model.safetensors,
                           tucka_route.json)
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Any

import peft
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedTokenizerBase

import tucka_llm
from tucka_llm.errors import TuckaError
from tucka_llm.io.atomic import atomic_directory, atomic_write_json, atomic_write_text
from tucka_llm.layout import ADAPTER_CONFIG, ADAPTER_WEIGHTS, MODEL_CARD, ROUTE_RECORD
from tucka_llm.loading import describe_quantization, load_trained
from tucka_llm.serving.prompt_router import PromptRouter, PromptRouterError
from tucka_llm.tucka.dai import calibration_features, routing_layers
from tucka_llm.tucka.layer import TuckALayer
from tucka_llm.tucka.routing import Route, check_gate_levels

FORMAT = "tucka-routed-lora"
MANIFEST = "manifest.json"
FACTORS = "factors.safetensors"
ROUTER_DIR = "router"
ROUTES_DIR = "routes"
LORA_WEIGHTS = ADAPTER_WEIGHTS
PEFT_PREFIX = "base_model.model."  # how peft names a LoRA weight of module M: base_model.model.M.lora_A.weight
DEFAULT_GATE_LEVELS = 5  # docs/benchmarks.md, "Routed serving: gate levels"
LORA_CONFIG_KEYS = ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern")


class RoutedLoRAError(TuckaError):
    """A routed-LoRA directory that cannot be used; the message says which and what to do."""


def lora_factors(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{f"{module}.lora_A" | .wu | .mixing: tensor}`` for every TuckA layer of the (single) adapter of a PeftModel,
    module names as in the base model (``TuckALayer.lora_basis``)."""
    factors: dict[str, torch.Tensor] = {}
    for name, module in model.get_base_model().named_modules():
        if isinstance(module, TuckALayer):
            (adapter,) = module.tucka_core.keys()
            a, wu, mixing = module.lora_basis(adapter)
            factors |= {f"{name}.lora_A": a.cpu(), f"{name}.wu": wu.cpu(), f"{name}.mixing": mixing.cpu()}
    return {key: value.contiguous() for key, value in factors.items()}


def route_name(route: Route) -> str:
    """A route's adapter name, e.g. ``g1-0.411133-0.588867`` (group, then the gates to 6 decimals)."""
    return f"g{route.group}-" + "-".join(f"{g:.6f}" for g in route.gates)


def route_adapter_weights(factors: dict[str, torch.Tensor], route: Route) -> dict[str, torch.Tensor]:
    """The route's LoRA weights under peft's names: A = U^T, B = WU (sum_j g_j M[i, j])^T, float32."""
    gates = torch.tensor(route.gates, dtype=torch.float32)
    weights = {}
    for key in factors:
        if not key.endswith(".lora_A"):
            continue
        module = key.removesuffix(".lora_A")
        mixing = torch.einsum("j,jrs->rs", gates, factors[f"{module}.mixing"][route.group])
        weights[f"{PEFT_PREFIX}{module}.lora_A.weight"] = factors[key]
        weights[f"{PEFT_PREFIX}{module}.lora_B.weight"] = (factors[f"{module}.wu"] @ mixing.t()).contiguous()
    return weights


class RoutedLoRA:
    """A routed-LoRA directory: the manifest, the prompt router, and the route adapters (made when first asked)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        path = self.directory / MANIFEST
        try:
            self.manifest: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise RoutedLoRAError(
                f"{self.directory}: no readable {MANIFEST} ({error}); make one with tucka export --format lora."
            ) from None
        if self.manifest.get("format") != FORMAT:
            raise RoutedLoRAError(f"{path}: not a {FORMAT} manifest; make one with tucka export --format lora.")
        self._factors: dict[str, torch.Tensor] | None = None

    @property
    def gate_levels(self) -> int:
        return int(self.manifest["gate_levels"])

    @property
    def rank(self) -> int:
        return int(self.manifest["lora"]["r"])

    @property
    def k(self) -> int:
        return int(self.manifest["router"]["k"])

    @property
    def t(self) -> int:
        return int(self.manifest["router"]["t"])

    def prompt_router(self, dtype: torch.dtype | None = None) -> PromptRouter:
        """The router that gives each prompt its served route; its input modules in ``dtype`` (default: the base's,
        as saved): use the dtype the model is served in."""
        return PromptRouter.load(self.directory / ROUTER_DIR, dtype, self.gate_levels)

    def lora_modules(self) -> list[str]:
        """``NAME=PATH`` of every route adapter made so far: the arguments of ``vllm serve ... --lora-modules``."""
        routes = sorted((self.directory / ROUTES_DIR).glob(f"*/{LORA_WEIGHTS}"))
        return [f"{path.parent.name}={path.parent.resolve()}" for path in routes]

    def adapter(self, route: Route) -> Path:
        """The directory of ``route``'s LoRA adapter, written (atomically) if it is not there yet."""
        route.check(self.k, self.t)
        path = self.directory / ROUTES_DIR / route_name(route)
        if not (path / LORA_WEIGHTS).is_file():
            if self._factors is None:
                self._factors = load_file(str(self.directory / FACTORS))
            weights = route_adapter_weights(self._factors, route)
            with contextlib.suppress(FileExistsError):  # another process wrote the same route first: the same files
                atomic_directory(path, lambda tmp: self._write_adapter(tmp, route, weights))
        return path

    def _write_adapter(self, directory: Path, route: Route, weights: dict[str, torch.Tensor]) -> None:
        """What peft's ``save_as_lora`` writes: the LoraConfig and the weights; and the route it serves."""
        saved = self.manifest["adapter_config"]
        config = peft.LoraConfig(
            r=self.rank,
            lora_alpha=self.rank,  # scaling 1: alpha and the normalisations are folded into B
            base_model_name_or_path=self.manifest["base"],
            task_type=saved.get("task_type") or "CAUSAL_LM",
            **{key: saved.get(key) for key in LORA_CONFIG_KEYS},
        )
        config.save_pretrained(str(directory))
        save_file(weights, str(directory / LORA_WEIGHTS))
        record = {"group": route.group, "gates": list(route.gates), "gate_levels": self.gate_levels}
        (directory / ROUTE_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def write_routed_lora(
    model: peft.PeftModel,
    out: Path,
    *,
    adapter: Path,
    base: str,
    tokenizer: PreTrainedTokenizerBase,
    gate_levels: int,
    features: torch.Tensor | None = None,
    quantization: dict[str, Any] | None = None,
    replace: bool = False,
) -> RoutedLoRA:
    """Write ``model``'s TuckA adapter (loaded from ``adapter`` on ``base``) as a routed-LoRA directory ``out``
    (atomically), with the adapters of the routes that ``features`` (routing features of calibration sequences,
    (n, d)) take; none without. Refused, with what to do instead, where a prompt's route cannot be computed outside
    the model (``PromptRouter.from_model``, ``check_prompt_router``)."""
    check_gate_levels(gate_levels, "--gate-levels")
    try:
        router = PromptRouter.from_model(model, gate_levels)
    except PromptRouterError as error:
        raise RoutedLoRAError(f"{error} Export it merged instead (--format merged).") from None
    routes = {} if features is None else dict(Counter(router.routes_of_features(features)).most_common())
    manifest = make_manifest(model, adapter, base, router, routes, quantization)

    def write(tmp: Path) -> None:
        (name,) = routing_layers(model)
        router.save(tmp / ROUTER_DIR, model.get_base_model().config)
        save_file(lora_factors(model), str(tmp / FACTORS))
        atomic_write_json(tmp / MANIFEST, manifest)
        routed = RoutedLoRA(tmp)
        check_prompt_router(routed, model, tokenizer, name)
        for route in routes:
            routed.adapter(route)
        atomic_write_text(tmp / MODEL_CARD, model_card(manifest, out))

    atomic_directory(out, write, replace=replace)
    return RoutedLoRA(out)


def converted(adapter: Path, out: Path, base: str, gate_levels: int) -> RoutedLoRA:
    """The TuckA adapter in ``adapter`` on ``base`` as a routed-LoRA directory ``out``, made without calibration
    routes (each route's adapter is made when a prompt first needs it) unless ``out`` already holds the conversion
    of the same adapter weights, base and gate levels (a resumed evaluation reuses it)."""
    manifest = out / MANIFEST
    made = json.loads(manifest.read_text(encoding="utf-8")) if manifest.is_file() else {}
    wanted = {"gate_levels": gate_levels, "base": base, "adapter_sha256": adapter_digest(adapter)}
    if all(made.get(key) == value for key, value in wanted.items()):
        return RoutedLoRA(out)
    trained = load_trained(adapter, base, "--model")
    return write_routed_lora(
        trained.model, out, adapter=adapter, base=base, tokenizer=trained.tokenizer, gate_levels=gate_levels,
        quantization=trained.quantization, replace=True,
    )  # fmt: skip


PROBES = (  # prompts on which the rebuilt router is checked against the model's own routing features
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "A robe takes 2 bolts of blue fiber and half that much white fiber. How many bolts in total does it take?",
    "Let $f(x) = 3x + 2$. What is $f(f(1))$?",
)
PROBE_TOLERANCE = 1e-4  # relative; the same operations give ~1e-7 in float32


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
        raise RoutedLoRAError(
            f"the router rebuilt outside the model gives other routing features than the model "
            f"(relative difference {error:.2g} > {PROBE_TOLERANCE:g}): this architecture feeds its routing layer "
            "differently. Export it merged instead (--format merged)."
        )


def make_manifest(
    model: peft.PeftModel,
    adapter: Path,
    base: str,
    router: PromptRouter,
    routes: dict[Route, int],
    quantization: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What the directory holds, how it was made, and what serving it needs (``manifest.json``)."""
    ((_, layer),) = routing_layers(model).items()
    (adapter_name,) = layer.tucka_router
    config = model.peft_config[adapter_name]
    low, high = router.router.gate_range()
    return {
        "format": FORMAT,
        "base": base,
        "adapter": str(adapter.resolve()),
        "adapter_sha256": adapter_digest(adapter),
        "adapter_config": json.loads((adapter / ADAPTER_CONFIG).read_text()),  # as saved: lists, not sets
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
    with (adapter / ADAPTER_WEIGHTS).open("rb") as f:
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
