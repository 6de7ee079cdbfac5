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

Directory (``launch/export.py --format lora``)::

    manifest.json          what it was made from, the served-route settings, the routes written at export
    router/                the prompt router (``PromptRouter``): config.json, router.json, router.safetensors
    factors.safetensors    per adapted module: lora_A = U^T, wu = W U, mixing = M (k, t, r, r), float32
    routes/NAME/           one peft LoRA adapter per served route (adapter_config.json, adapter_model.safetensors,
                           tucka_route.json)
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import peft
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tucka_llm.atomic import atomic_directory
from tucka_llm.serving.prompt_router import PromptRouter
from tucka_llm.tucka.layer import TuckALayer
from tucka_llm.tucka.routing import Route

FORMAT = "tucka-routed-lora"
MANIFEST = "manifest.json"
FACTORS = "factors.safetensors"
ROUTER_DIR = "router"
ROUTES_DIR = "routes"
ROUTE_RECORD = "tucka_route.json"
LORA_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # how peft names a LoRA weight of module M: base_model.model.M.lora_A.weight
DEFAULT_GATE_LEVELS = 5  # docs/benchmarks.md, "Routed serving: gate levels"
MAX_GATE_LEVELS = 64
LORA_CONFIG_KEYS = ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern")


class RoutedLoRAError(ValueError):
    """A routed-LoRA directory that cannot be used; the message says which and what to do."""


def check_gate_levels(levels: int, flag: str = "--gate-levels") -> None:
    """Refuse a number of gate levels that is not an integer in 1..MAX_GATE_LEVELS."""
    if isinstance(levels, bool) or not isinstance(levels, int) or not 1 <= levels <= MAX_GATE_LEVELS:
        raise RoutedLoRAError(
            f"{flag} {levels}: give an integer from 1 (gates fixed at the middle of their range) to "
            f"{MAX_GATE_LEVELS}; {DEFAULT_GATE_LEVELS} is the measured default."
        )


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
                f"{self.directory}: no readable {MANIFEST} ({error}); make one with launch/export.py --format lora."
            ) from None
        if self.manifest.get("format") != FORMAT:
            raise RoutedLoRAError(f"{path}: not a {FORMAT} manifest; make one with launch/export.py --format lora.")
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
