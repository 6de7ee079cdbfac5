"""TuckAModel, the peft tuner that injects TuckA layers and wires their shared router, and the model-level routing
controls: ``routing`` (the mode of every adapter for a block), ``expert_load`` and ``routing_states``."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn

from tucka_llm.tucka.config import TuckAConfig, width_scaled_alpha
from tucka_llm.tucka.layer import TuckALayer
from tucka_llm.tucka.router import make_router
from tucka_llm.tucka.routing import (
    ExpertLoad,
    Route,
    RouteMixture,
    RoutingMode,
    RoutingState,
    check_gate_levels,
    install_forward_hook,
    validate_mode,
)

logger = logging.getLogger("tucka_llm")


def linear_layer_names(model: nn.Module) -> list[str]:
    """Distinct last name components of the Linear layers of ``model`` (what target_modules can name)."""
    names = {key.rsplit(".", 1)[-1] for key, module in model.named_modules() if isinstance(module, nn.Linear)}
    return sorted(names)


class TuckAModel(BaseTuner):
    """Creates a TuckA model from a transformers model; use it through ``peft.get_peft_model(model, TuckAConfig())``.

    Each adapter's first adapted layer (or ``TuckAConfig.router_module``) holds its router and routes for every layer
    of the adapter; several adapters each have their own. A forward pre-hook on the wrapped model hands the model's
    attention mask and cache state to the routing states, so padding never moves a route and ``generate`` holds the
    prefill route while decoding.
    """

    prefix: str = "tucka_"
    tuner_layer_cls = TuckALayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    uses_shared_state: bool = True

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        """peft calls this for every adapter (``get_peft_model``, ``add_adapter``, ``load_adapter``): check the
        targets before anything is replaced, place the adapter's router, create its routing state."""
        self._prepare_routing(model, self.peft_config[adapter_name], adapter_name)
        try:
            super().inject_adapter(model, adapter_name, *args, **kwargs)
        except Exception:
            self._tucka_states.pop(adapter_name, None)
            raise

    def _prepare_routing(self, model: nn.Module, config: TuckAConfig, adapter_name: str) -> None:
        """Refuse targets TuckA cannot adapt (in one line, listing the model's Linear layers), record the routing
        layer and the resolved alpha in ``config`` (both saved), and create the adapter's router and routing state."""
        config = self._prepare_adapter_config(config, self.get_model_config(model))
        matched = [
            key
            for key, _ in model.named_modules()
            if key and self._check_target_module_exists(config, key) and not self._inside_tuner_layer(model, key)
        ]
        if not matched:
            targets = config.target_modules
            targets = sorted(targets) if isinstance(targets, set) else targets
            raise ValueError(
                f"TuckAConfig.target_modules={targets!r} "
                f"matches no module of this model. Its Linear layers are: {', '.join(linear_layer_names(model))}."
            )
        for key in matched:
            module = model.get_submodule(key)
            base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
            if not isinstance(base, nn.Linear):
                raise TypeError(
                    f"TuckA target '{key}' is a {type(base).__name__}, not a torch.nn.Linear: remove it from "
                    f"target_modules. Linear layers of this model: {', '.join(linear_layer_names(model))}."
                )
            if config.r > base.in_features:
                raise ValueError(
                    f"TuckAConfig: r={config.r} is larger than the input size {base.in_features} of '{key}': lower r."
                )
        if config.router_module is None:
            config.router_module = matched[0]
        elif config.router_module not in matched:
            raise ValueError(
                f"TuckAConfig.router_module={config.router_module!r} is not one of the adapted layers "
                f"(the first is {matched[0]!r})."
            )
        width = model.get_submodule(config.router_module)
        width = (width.get_base_layer() if isinstance(width, BaseTunerLayer) else width).in_features
        if config.alpha == "auto":  # resolved once and saved, so a reloaded adapter never depends on the rule
            config.alpha = width_scaled_alpha(width)
        if not hasattr(self, "_tucka_states"):
            self._tucka_states: dict[str, RoutingState] = {}
            self._tucka_hook = install_forward_hook(model, self._tucka_states)
        router = make_router(
            config.router,
            k=config.k,
            t=config.t,
            d=width,
            perturb_scale=config.perturb_scale,
            normalize_gates=config.normalize_gates,
            seed=config.seed,
        )
        self._tucka_states[adapter_name] = RoutingState(router, config.router_module)

    @staticmethod
    def _inside_tuner_layer(model: nn.Module, key: str) -> bool:
        """Whether ``key`` names a module inside a tuner layer (its base layer, a router): never a target."""
        parts = key.split(".")
        return any(isinstance(model.get_submodule(".".join(parts[:i])), BaseTunerLayer) for i in range(1, len(parts)))

    def _create_and_replace(
        self,
        peft_config: TuckAConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        state = self._tucka_states[adapter_name]
        is_router = current_key == peft_config.router_module
        if isinstance(target, TuckALayer):
            target.update_layer(adapter_name, peft_config, state, is_router)
            return
        new_module = TuckALayer(target, adapter_name, peft_config, state, is_router)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """peft's mixed-batch inference (``adapter_names=[...]``, one adapter per sample) is refused: a TuckA adapter
        routes per batch or per sequence at its routing layer, which would see only part of the batch."""
        if kwargs.get("adapter_names") is not None:
            raise ValueError(
                "TuckA does not support mixed adapter batches (`adapter_names`): run one forward per adapter, "
                "selected with model.set_adapter(name)."
            )
        yield

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._tucka_states.pop(adapter_name, None)

    @staticmethod
    def upgrade_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A saved state dict in the current layout (``upgrade_state_dict``): what loading compares against."""
        return upgrade_state_dict(state_dict)

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: TuckAConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """peft's key mapping, after ``upgrade_state_dict`` brings an adapter saved by an earlier version up to date."""
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, upgrade_state_dict(state_dict))

    def _unload_and_optionally_merge(self, *args: Any, **kwargs: Any) -> nn.Module:
        model = super()._unload_and_optionally_merge(*args, **kwargs)
        self._tucka_hook.remove()  # the plain model no longer has adapters to route
        return model


# Keys of adapters saved before the router was a module (tucka-llm <= 0.2): E and e_bar sat on the routing layer.
_LEGACY_ROUTER_KEYS = {"tucka_centroids": "tucka_router.centroids", "tucka_center": "tucka_router.center"}


def upgrade_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A saved TuckA state dict in the current layout (checkpoint keys, without the adapter name).

    tucka-llm <= 0.2 saved E as ``<layer>.tucka_centroids`` and e_bar as ``<layer>.tucka_center``; they are now the
    router's ``<layer>.tucka_router.centroids`` and ``.center``. Such an adapter holds no ``calibrated`` flag: it
    was trained by our launcher, which always ran DAI first, so it is taken as calibrated, and that is logged once.
    """
    upgraded: dict[str, torch.Tensor] = {}
    legacy_layers = set()
    for key, value in state_dict.items():
        layer, _, name = key.rpartition(".")
        if name in _LEGACY_ROUTER_KEYS:
            legacy_layers.add(layer)
            key = f"{layer}.{_LEGACY_ROUTER_KEYS[name]}" if layer else _LEGACY_ROUTER_KEYS[name]
        upgraded[key] = value
    for layer in sorted(legacy_layers):
        key = f"{layer}.tucka_router.calibrated" if layer else "tucka_router.calibrated"
        upgraded.setdefault(key, torch.tensor(1, dtype=torch.uint8))
    if legacy_layers and not _legacy_noted:
        _legacy_noted.append(True)
        logger.warning(
            "TuckA adapter saved by tucka-llm 0.2 or earlier: its router tensors (tucka_centroids, tucka_center) are "
            "loaded as tucka_router.centroids and .center, and its router is taken as calibrated (that version's "
            "launcher always ran data-aware initialisation before training)."
        )
    return upgraded


_legacy_noted: list[bool] = []  # the old-layout note is logged once per process


def routing_states(model: nn.Module, missing_ok: bool = False) -> dict[str, RoutingState]:
    """The routing state of every TuckA adapter in ``model`` (a PeftModel, a DeepSpeed engine, any module); a model
    without one is a ValueError unless ``missing_ok``."""
    states: dict[str, RoutingState] = {}
    for module in model.modules():
        if isinstance(module, TuckALayer):
            states.update(module.tucka_state)
    if not states and not missing_ok:
        raise ValueError(
            "No TuckA adapter found in this model: wrap it with peft.get_peft_model(model, TuckAConfig())."
        )
    return states


@contextmanager
def routing(model: nn.Module, mode: RoutingMode, gate_levels: int | None = None) -> Iterator[None]:
    """Set the routing mode of every TuckA adapter in ``model`` for the duration of the block.

    ``mode``: ``"batch"`` (one route per forward, the paper's training-time routing), ``"sequence"`` (one route
    per sequence, so an answer never depends on its batch neighbours), a ``Route`` (fixed group and gates), a
    ``RouteMixture`` (a fixed weighted sum of routes), or None (the default: batch while ``model.training``,
    sequence otherwise). ``gate_levels``: the routes the router computes are quantised as routed serving serves
    them (``Router.quantise``), so the unmerged model gives what the served LoRA adapters give.
    """
    states = list(routing_states(model).values())
    for state in states:
        validate_mode(mode, state.k, state.t)
    if gate_levels is not None:
        if isinstance(mode, Route | RouteMixture):
            raise ValueError("gate_levels quantise the routes the router computes; a fixed route is used as given.")
        check_gate_levels(gate_levels)  # here, not at the first forward
    previous = [(state.mode, state.gate_levels) for state in states]
    try:
        for state in states:
            state.mode, state.gate_levels, state.route, state.held = mode, gate_levels, None, False
        yield
    finally:
        for state, (old, levels) in zip(states, previous, strict=True):
            state.mode, state.gate_levels, state.route, state.held = old, levels, None, False


def last_routes(model: nn.Module) -> list[Route]:
    """The routes the (single) TuckA adapter of ``model`` took in its last forward (during ``generate``: the
    prefill's, held for every decode step), one per sequence in sequence mode, as plain ``Route`` values."""
    states = routing_states(model)
    if len(states) != 1:
        raise ValueError(f"The model holds {len(states)} TuckA adapters ({', '.join(states)}); expected one.")
    (state,) = states.values()
    if state.route is None:
        raise ValueError("No route yet: run a forward pass of the model first.")
    groups, gates = state.route.group.tolist(), state.route.gates.tolist()
    return [Route(group, row) for group, row in zip(groups, gates, strict=True)]


def expert_load(model: nn.Module, reset: bool = True) -> dict[str, ExpertLoad]:
    """Per adapter: how often each group was chosen, its mean gates and the routing entropy since the last read."""
    return {name: state.read_load(reset) for name, state in routing_states(model).items()}


def routing_metrics(model: nn.Module, reduce: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, float]:
    """Training-log entries of every TuckA adapter since the last call: ``routing_entropy``, ``expert_load/group{i}``
    (shares) and ``expert_routes/group{i}`` (route counts, so that a report can sum any window of logs), prefixed
    ``{adapter}/`` for adapters other than "default"; {} for a model without TuckA. ``reduce`` sums a tensor over
    data-parallel ranks (every rank must call this)."""
    out: dict[str, float] = {}
    for name, state in routing_states(model, missing_ok=True).items():
        counts, gates = state.load_sums(reset=True)
        flat = reduce(torch.cat([counts, gates.flatten()]).double()).cpu()
        load = ExpertLoad.from_sums(flat[: state.k], flat[state.k :].view(state.k, state.t))
        prefix = "" if name == "default" else f"{name}/"
        out[f"{prefix}routing_entropy"] = load.entropy
        out |= {f"{prefix}expert_load/group{i}": f for i, f in enumerate(load.fraction)}
        # route counts: a report sums any window of logs with them (a share per log cannot be summed)
        out |= {f"{prefix}expert_routes/group{i}": c for i, c in enumerate(load.counts)}
    return out
