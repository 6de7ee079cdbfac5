"""TuckAModel, the peft tuner that injects TuckA layers and wires their shared router, and the model-level routing
controls: ``routing`` (the mode of every adapter for a block), ``expert_load`` and ``routing_states``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from peft.tuners.tuners_utils import BaseTuner
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn

from tucka_llm.tucka.config import TuckAConfig, width_scaled_alpha
from tucka_llm.tucka.layer import TuckALayer
from tucka_llm.tucka.routing import (
    ExpertLoad,
    Route,
    RouteMixture,
    Router,
    RoutingMode,
    RoutingState,
    install_forward_hook,
    validate_gate_levels,
    validate_mode,
)


def linear_layer_names(model: nn.Module) -> list[str]:
    """Distinct last name components of the Linear layers of ``model`` (what target_modules can name)."""
    names = {key.rsplit(".", 1)[-1] for key, module in model.named_modules() if isinstance(module, nn.Linear)}
    return sorted(names)


class TuckAModel(BaseTuner):
    """Creates a TuckA model from a transformers model; use it through ``peft.get_peft_model(model, TuckAConfig())``.

    The first adapted layer (or ``TuckAConfig.router_module``) holds the centroids and routes for every layer of
    the adapter. A forward pre-hook on the wrapped model hands the model's attention mask and cache state to the
    routing state, so padding never moves the route and ``generate`` holds the prefill route while decoding.
    """

    prefix: str = "tucka_"
    tuner_layer_cls = TuckALayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    uses_shared_state: bool = True

    def _pre_injection_hook(self, model: nn.Module, config: TuckAConfig, adapter_name: str) -> None:
        """Check the targets before anything is replaced, place the router, create the adapter's routing state."""
        config = self._prepare_adapter_config(config, self.get_model_config(model))
        matched = [key for key, _ in model.named_modules() if key and self._check_target_module_exists(config, key)]
        if not matched:
            targets = config.target_modules
            targets = sorted(targets) if isinstance(targets, set) else targets
            raise ValueError(
                f"TuckAConfig.target_modules={targets!r} "
                f"matches no module of this model. Its Linear layers are: {', '.join(linear_layer_names(model))}."
            )
        for key in matched:
            module = model.get_submodule(key)
            base = module.get_base_layer() if isinstance(module, TuckALayer) else module
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
        if config.alpha == "auto":  # resolved once and saved, so a reloaded adapter never depends on the rule
            config.alpha = width_scaled_alpha(model.get_submodule(config.router_module).in_features)
        if not hasattr(self, "_tucka_states"):
            self._tucka_states: dict[str, RoutingState] = {}
            self._tucka_hook = install_forward_hook(model, self._tucka_states)
        router = Router(config.router, config.k, config.t, config.perturb_scale, config.normalize_gates, config.seed)
        self._tucka_states[adapter_name] = RoutingState(router, config.router_module)

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

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._tucka_states.pop(adapter_name, None)

    def _unload_and_optionally_merge(self, *args: Any, **kwargs: Any) -> nn.Module:
        model = super()._unload_and_optionally_merge(*args, **kwargs)
        self._tucka_hook.remove()  # the plain model no longer has adapters to route
        return model


def routing_states(model: nn.Module) -> dict[str, RoutingState]:
    """The routing state of every TuckA adapter in ``model`` (a PeftModel, a DeepSpeed engine, any module)."""
    states: dict[str, RoutingState] = {}
    for module in model.modules():
        if isinstance(module, TuckALayer):
            states.update(module.tucka_state)
    if not states:
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
        validate_gate_levels(gate_levels)  # here, not at the first forward
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
