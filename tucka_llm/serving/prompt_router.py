"""A TuckA adapter's router outside the model: a prompt's route from its token ids, without running the model.

In sequence mode the adapter routes a sequence on the mean, over its real tokens, of its routing layer's input. When
the routing layer is an attention projection of the first decoder layer (q_proj by default), that input is the first
layer's input norm applied to the token embeddings: two cheap modules, no attention. ``PromptRouter`` holds those two
modules (the base model's own classes, built from its config, with the base's weights) and the adapter's router
(``TuckARouter``, with its centroids E and e_bar), and computes routes with the same functions the adapter's routing
layer calls (``TuckARouter.features``, ``.route_features``, ``.quantise``). A serving engine that runs the base
model with LoRA adapters (vLLM) then gets each prompt's route before the prompt is sent.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from tucka_llm.errors import TuckaError
from tucka_llm.tucka.dai import routing_layers
from tucka_llm.tucka.router import TuckARouter, make_router
from tucka_llm.tucka.routing import Route

ROUTER_WEIGHTS = "router.safetensors"
ROUTER_SETTINGS = "router.json"
SERVED_ROUTER_TENSORS = ("centroids", "center")  # what routes a prompt (the calibration flag is not needed)
BASE_CONFIG = "config.json"  # the base model's config: the input modules are built from it
NORM_NAME = "input_layernorm"
ATTENTION_INPUTS = ("q_proj", "k_proj", "v_proj", "qkv_proj")


class PromptRouterError(TuckaError):
    """The adapter's router cannot be computed outside the model; the message says why and what to do instead."""


class PromptRouter:
    """Routes token sequences exactly as the TuckA adapter's sequence mode does (embedding, the routing layer's
    input norm, masked mean, the router's math), optionally quantising the gates as routed serving serves them."""

    def __init__(
        self,
        embedding: nn.Module,
        norm: nn.Module,
        router: TuckARouter,
        input_names: dict[str, str],
        gate_levels: int | None = None,
    ) -> None:
        self.embedding, self.norm = embedding, norm
        self.router = router
        self.input_names = input_names  # {"embedding": name, "norm": name}: where the modules are in the base
        self.gate_levels = gate_levels

    @classmethod
    def from_model(cls, model: nn.Module, gate_levels: int | None = None) -> PromptRouter:
        """The router of the (single) TuckA adapter of a PeftModel, with the base model's own input modules (shared,
        not copied). Raises PromptRouterError when the routing layer's input is not norm(embedding)."""
        layers = routing_layers(model)
        if len(layers) != 1:
            names = ", ".join(layers)
            raise PromptRouterError(f"The model holds {len(layers)} TuckA adapters ({names}); expected one.")
        ((name, layer),) = layers.items()
        state = layer.tucka_state[name]
        if not state.router.trains_centroids:
            raise PromptRouterError(
                f"The adapter's router is '{state.router.kind}': its routes are random draws made anew at every "
                "forward, not a function of the prompt, so no router outside the model can give them."
            )
        base = model.get_base_model()
        embedding_name, norm_name = input_module_names(base, state.router_module)
        names = {"embedding": embedding_name, "norm": norm_name}
        modules = (base.get_submodule(embedding_name), base.get_submodule(norm_name))
        return cls(*modules, layer.router(name), names, gate_levels)

    @torch.no_grad()
    def features(self, token_ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """(n, d): each sequence's routing feature, the mean of norm(embedding) over its tokens, computed as the
        routing layer computes it (``TuckARouter.features`` with an all-ones mask: every token is real)."""
        rows = []
        for ids in token_ids:
            ids = torch.tensor([list(ids)], device=self.embedding.weight.device)
            x = self.norm(self.embedding(ids))
            rows.append(self.router.features(x, torch.ones_like(ids)))
        return torch.cat(rows)

    def routes(self, token_ids: Sequence[Sequence[int]]) -> list[Route]:
        """Each sequence's route: its group and gates (quantised to ``gate_levels`` when set)."""
        return self.routes_of_features(self.features(token_ids))

    @torch.no_grad()
    def routes_of_features(self, features: torch.Tensor) -> list[Route]:
        """The routes of routing features (n, d), e.g. those training recorded for its calibration sample."""
        active = self.router.route_features(features.to(self.embedding.weight.device))
        if self.gate_levels is not None:
            active = self.router.quantise(active, self.gate_levels)
        return [Route(g, gates) for g, gates in zip(active.group.tolist(), active.gates.tolist(), strict=True)]

    # ------------------------------------------------------------------------------------------ files
    def save(self, directory: Path, base_config: PretrainedConfig) -> None:
        """Write ``router.safetensors`` (the input modules' weights in their dtype, E, e_bar), ``router.json`` (the
        router's settings, the input modules' names in the base) and the base's ``config.json`` into ``directory``
        (a directory the caller renames into place as a whole)."""
        tensors = {f"embedding.{k}": v for k, v in self.embedding.state_dict().items()}
        tensors |= {f"norm.{k}": v for k, v in self.norm.state_dict().items()}
        tensors |= {k: v for k, v in self.router.state_dict().items() if k in SERVED_ROUTER_TENSORS}
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(directory / ROUTER_WEIGHTS))
        settings = {"router": self.router.settings(), "inputs": self.input_names}
        (directory / ROUTER_SETTINGS).write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
        base_config.to_json_file(str(directory / BASE_CONFIG))

    @classmethod
    def load(cls, directory: Path, dtype: torch.dtype | None = None, gate_levels: int | None = None) -> PromptRouter:
        """The router saved in ``directory``; its input modules in ``dtype`` (default: as saved, the base's dtype).

        The modules are the base model's own classes, built from its config on the meta device (no weights
        allocated for the rest of the model) and given the saved weights.
        """
        settings = json.loads((directory / ROUTER_SETTINGS).read_text())
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(directory)))
        with safe_open(str(directory / ROUTER_WEIGHTS), framework="pt") as f:
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
        modules = []
        for role in ("embedding", "norm"):
            module = skeleton.get_submodule(settings["inputs"][role]).to_empty(device="cpu")
            prefix = f"{role}."
            weights = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            module.load_state_dict(weights, assign=True)  # assign: the saved dtype, not the skeleton's
            modules.append((module.to(dtype) if dtype is not None else module).eval())
        # router.json from tucka-llm 0.2 holds no width "d": it is the norm's
        router = make_router(**{"d": modules[1].weight.shape[-1], **settings["router"]})
        served = {k: v for k, v in tensors.items() if k in SERVED_ROUTER_TENSORS}
        router.load_state_dict(served, strict=False, assign=True)  # assign: the saved dtype
        return cls(*modules, router.requires_grad_(False).eval(), settings["inputs"], gate_levels)


def input_module_names(base: nn.Module, router_module: str) -> tuple[str, str]:
    """(embedding, norm): the names, in ``base``, of the modules whose composition is the routing layer's input.

    Only an attention projection of the first decoder layer is fed by norm(embedding) (``input_layernorm`` of the
    layer holding it). Other placements need the model run up to them: PromptRouterError. Modules with buffers that
    are not saved (e.g. a scale kept beside the embedding) are refused too, since a rebuilt module would lack them;
    the export checks the rebuilt router against the model on real prompts besides.
    """
    parts = router_module.split(".")
    layer_name = ".".join(parts[:-2]) if len(parts) >= 3 else ""
    norm_name = f"{layer_name}.{NORM_NAME}"
    fed_by_norm = (
        parts[-1] in ATTENTION_INPUTS and parts[-2] == "self_attn" and layer_name.endswith(".0")
        and isinstance(getattr(base.get_submodule(layer_name), NORM_NAME, None), nn.Module)
    )  # fmt: skip
    if not fed_by_norm:
        raise PromptRouterError(
            f"The adapter routes at '{router_module}', whose input is not the first decoder layer's input norm of "
            f"the token embeddings (the router must sit on one of {', '.join(ATTENTION_INPUTS)} of layer 0), so a "
            "prompt's route cannot be computed without running the model."
        )
    embedding = base.get_input_embeddings()
    embedding_name = next(name for name, module in base.named_modules() if module is embedding)
    for name in (embedding_name, norm_name):
        module = base.get_submodule(name)
        unsaved = set(dict(module.named_buffers())) - set(module.state_dict())
        if unsaved:
            raise PromptRouterError(
                f"'{name}' keeps buffers that are not saved ({', '.join(sorted(unsaved))}); the prompt router cannot "
                "rebuild it."
            )
    return embedding_name, norm_name
