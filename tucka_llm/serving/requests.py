"""Which LoRA adapter serves each prompt: one LoRA adapter for all, or each prompt its TuckA route's adapter.

What a LoRA engine needs per request (vLLM's ``LoRARequest``: a name, an integer id unique per adapter, a path),
without importing the engine: ``tucka_llm.eval.backends`` turns these into vLLM's requests.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import peft
from safetensors import safe_open

from tucka_llm.serving.prompt_router import PromptRouter
from tucka_llm.serving.routed_lora import FACTORS, LORA_WEIGHTS, RoutedLoRA, route_name
from tucka_llm.tucka.routing import Route

# GPU memory the route adapters' slots may take at most (vLLM's max_loras slots, each holding one adapter). Every
# route of the reference settings fits far below it: k x levels = 20 slots of ~17 MB at Llama-2-7B (r 16, q_proj and
# v_proj, bf16), 0.33 GiB; settings with more routes than fit share the slots, and vLLM swaps adapters in and out.
SLOT_BUDGET_BYTES = 2**30


def possible_routes(routed: RoutedLoRA) -> int:
    """How many served routes there are: per group, one per combination of quantised gates; with normalised gates
    the t gates sum to 1 before they are rounded, so t - 1 of them choose the route (k x levels at t = 2)."""
    free = routed.t - 1 if routed.manifest["router"].get("normalize_gates", True) else routed.t
    return routed.k * routed.gate_levels**free


def slot_bytes(routed: RoutedLoRA, dtype_bytes: int = 2) -> int:
    """GPU memory of one adapter slot in vLLM: per adapted module a rank-r A (r x in) and B (out x r) in the served
    dtype (2 bytes: bf16/fp16), read from the routed directory's factor shapes. vLLM rounds r up to a rank it
    supports (16 and 32 are) and allocates the k slice of its packed qkv layer too: up to 1.5x this for q and v."""
    rank = routed.rank
    with safe_open(str(routed.directory / FACTORS), framework="pt") as f:
        shapes = {key: f.get_slice(key).get_shape() for key in f.keys()}  # noqa: SIM118
    a_keys = [key for key in shapes if key.endswith(".lora_A")]
    widths = sum(shapes[key][1] + shapes[key.removesuffix(".lora_A") + ".wu"][0] for key in a_keys)
    return rank * widths * dtype_bytes


def module_suffixes(modules: Iterable[str]) -> list[str]:
    """The distinct last name components of adapted modules (q_proj, v_proj): vLLM's ``lora_target_modules``, so
    that the engine runs LoRA on those layers only (it maps them onto its packed qkv_proj itself) instead of on
    every layer it could adapt."""
    return sorted({module.rsplit(".", 1)[-1] for module in modules})


@dataclass(frozen=True)
class AdapterRequest:
    """The adapter that serves one prompt, and the TuckA route it stands for (None for a plain LoRA adapter)."""

    name: str
    int_id: int
    path: Path
    route: Route | None = None


class LoRARequests:
    """A plain peft LoRA adapter, the same for every prompt."""

    def __init__(self, adapter: str | Path) -> None:
        self.path = Path(adapter)
        config = peft.LoraConfig.from_pretrained(str(self.path))
        self.max_rank = max([config.r, *config.rank_pattern.values()])
        self.max_loras = 1
        with safe_open(str(self.path / LORA_WEIGHTS), framework="pt") as f:
            names = [key.split(".lora_A")[0] for key in f.keys() if ".lora_A" in key]  # noqa: SIM118
        self.target_modules = module_suffixes(names)

    def requests(self, token_ids: Sequence[Sequence[int]]) -> list[AdapterRequest]:
        return [AdapterRequest(self.path.name, 1, self.path)] * len(token_ids)


class RoutedRequests:
    """A TuckA adapter served routed: each prompt gets its served route (``PromptRouter``) and that route's LoRA
    adapter (``RoutedLoRA.adapter``, made the first time the route occurs). Ids follow first occurrence, so a route
    keeps its id for the life of the engine."""

    def __init__(self, routed: RoutedLoRA, router: PromptRouter) -> None:
        self.routed, self.router = routed, router
        self.max_rank = routed.rank
        self.slot_bytes = slot_bytes(routed)
        self.max_loras = max(1, min(possible_routes(routed), SLOT_BUDGET_BYTES // self.slot_bytes))
        self.target_modules = module_suffixes(routed.manifest["lora"]["modules"])
        self.ids: dict[str, int] = {}

    def requests(self, token_ids: Sequence[Sequence[int]]) -> list[AdapterRequest]:
        served = []
        for route in self.router.routes(token_ids):
            name = route_name(route)
            self.ids.setdefault(name, len(self.ids) + 1)
            served.append(AdapterRequest(name, self.ids[name], self.routed.adapter(route), route))
        return served
