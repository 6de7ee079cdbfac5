"""TuckALayer: the TuckA adapter of one Linear layer (method note, section 1).

Per adapter, trainable: cores G (k, p, r, r), expert factor C (t, p), subspace factor U (d, r); the routing layer
also holds the adapter's router (``tucka_router``: its centroids E and, for the centred router, e_bar). With route
(group i, gates g) the layer computes

    M = alpha * sum_j g_j sum_q C^[j, q] G^_i[q]        (r x r; ^ = divided by its Frobenius norm)
    y = base_layer(x + (x U^) M U^T)

i.e. the weight W (I + U^ M U^T)^T (alpha is inside M): two thin (d x r) matmuls per token, like LoRA; no d x d
matrix is ever formed.
Several active adapters add their updates, each under its own route: y = base_layer(x + sum_a (x U_a) M_a U_a^T).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from tucka_llm.tucka.config import TuckAConfig
from tucka_llm.tucka.router import TuckARouter
from tucka_llm.tucka.routing import (
    ActiveRoute,
    Route,
    RouteMixture,
    RoutingState,
    fixed_route,
    routing_features,
    sequence_keys,
)


class FeaturesCollected(Exception):
    """Raised by the routing layer during calibration: the rest of the forward is not needed."""


class TuckALayer(nn.Module, BaseTunerLayer):
    """A Linear layer with TuckA adapters; one adapter's layers share a ``RoutingState``, its routing layer holds
    its router."""

    adapter_layer_names = ("tucka_core", "tucka_expert", "tucka_subspace", "tucka_router")
    other_param_names = ("tucka_alpha", "tucka_state", "tucka_merged_route")

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: TuckAConfig,
        state: RoutingState,
        is_router: bool,
    ) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"TuckA adapts torch.nn.Linear layers only, got {type(base_layer).__name__}.")
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.tucka_core = nn.ParameterDict()  # G
        self.tucka_expert = nn.ParameterDict()  # C
        self.tucka_subspace = nn.ParameterDict()  # U
        self.tucka_router = nn.ModuleDict()  # the routers of the adapters this layer routes for
        self.tucka_alpha: dict[str, float] = {}
        self.tucka_state: dict[str, RoutingState] = {}
        self.tucka_merged_route: dict[str, Route | RouteMixture] = {}  # the route each merged adapter was folded with
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, state, is_router)

    def update_layer(
        self, adapter_name: str, config: TuckAConfig, state: RoutingState, is_router: bool, inference_mode: bool = False
    ) -> None:
        """Create (and initialise) the factors of one adapter on this layer; the routing layer also takes the
        adapter's router (``state.router``) as its own submodule."""
        d, r, k, t, p = self.in_features, config.r, config.k, config.t, config.p
        if r > d:
            raise ValueError(f"TuckAConfig: r={r} is larger than the input size {d} of the adapted layer: lower r.")
        if config.alpha == "auto":
            raise ValueError("TuckAConfig.alpha='auto' must be resolved before layers are made (TuckAModel does it).")
        self.tucka_core[adapter_name] = nn.Parameter(torch.empty(k, p, r, r))
        self.tucka_expert[adapter_name] = nn.Parameter(torch.empty(t, p))
        self.tucka_subspace[adapter_name] = nn.Parameter(torch.empty(d, r))
        if is_router:
            self.tucka_router[adapter_name] = state.router
        self.tucka_alpha[adapter_name] = float(config.alpha)
        self.tucka_state[adapter_name] = state
        self.reset_tucka_parameters(adapter_name, config.init_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    @torch.no_grad()
    def reset_tucka_parameters(self, adapter_name: str, init_weights: bool = True) -> None:
        """``init_weights=True``: the authors' initialisation, one Kaiming-uniform r x r matrix copied into every
        (i, q) core slice (so every group starts equal), U and C Kaiming-uniform with mode fan_out; the update is not
        zero at step 0. The router keeps placeholder centroids until ``data_aware_init`` calibrates it.

        ``init_weights=False`` (peft's meaning: random, for tests): every core slice drawn on its own, so the groups
        differ from the start, and the router random and marked calibrated."""
        core = self.tucka_core[adapter_name]
        if init_weights:
            one = torch.empty(core.shape[-2:])
            nn.init.kaiming_uniform_(one, a=math.sqrt(5))
            core.copy_(one.expand_as(core))
        else:
            for slice_ in core.view(-1, *core.shape[-2:]):
                nn.init.kaiming_uniform_(slice_, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.tucka_subspace[adapter_name], mode="fan_out", a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.tucka_expert[adapter_name], mode="fan_out", a=math.sqrt(5))
        if adapter_name in self.tucka_router:
            self.tucka_router[adapter_name].reset_parameters(random=not init_weights)

    # ----------------------------------------------------------------------------------------------- routing
    def router(self, adapter_name: str) -> TuckARouter:
        """The router of an adapter this layer routes for."""
        return self.tucka_router[adapter_name]

    def _route(self, adapter_name: str, x: torch.Tensor) -> ActiveRoute:
        state = self.tucka_state[adapter_name]
        if adapter_name in self.tucka_router:
            return self._decide_route(adapter_name, x, state)
        if state.route is None:
            raise RuntimeError(
                f"TuckA adapter '{adapter_name}': this layer ran before its routing layer '{state.router_module}' in "
                "this forward. Set TuckAConfig(router_module=...) to a layer that runs before every adapted layer."
            )
        return state.route

    def _decide_route(self, adapter_name: str, x: torch.Tensor, state: RoutingState) -> ActiveRoute:
        """The routing layer decides once per forward; the decision is held during decode steps.

        A second call in the same forward (the recomputation of gradient checkpointing) repeats the same operations,
        as checkpointing requires, but neither replaces the stored route nor counts it again.
        """
        if state.held:
            return state.route
        router = self.tucka_router[adapter_name]
        if state.calibration is not None:
            state.calibration.append(routing_features(x.detach().float(), state.attention_mask))
            if state.calibration_stops:
                raise FeaturesCollected
        mode = state.effective_mode(self.training)
        if self.training and torch.is_grad_enabled():
            router.check_calibrated(adapter_name)
        if isinstance(mode, Route | RouteMixture):
            route = fixed_route(mode, x.device, self.tucka_subspace[adapter_name].dtype)
        else:
            features = router.features(x, state.attention_mask)
            draw: tuple | list[tuple] = (state.draw_step, state.draws)
            if mode == "batch":
                features = features.mean(dim=0, keepdim=True)
            elif state.input_ids is not None and state.input_ids.shape[0] == features.shape[0]:
                keys = sequence_keys(state.input_ids, state.attention_mask)  # a random router: drawn per prompt
                draw = [("sequence", key) for key in keys]
            route = router.route_features(features, draw)
            if state.gate_levels is not None:
                route = router.quantise(route, state.gate_levels)
        if state.route is None:
            state.route = route
            state.record(route)
        return route

    # ----------------------------------------------------------------------------------------------- update
    def mixing_matrix(self, adapter_name: str, route: ActiveRoute, dtype: torch.dtype | None = None) -> torch.Tensor:
        """alpha * sum_j g_j (C^ x1 G^_i)[j]: (n, r, r), one per route, in ``dtype`` (default: the adapter's).

        A mixture of routes (``route.weights``) gives their weighted sum, (1, r, r): M is linear in the gates.
        """
        cores = self.tucka_core[adapter_name].index_select(0, route.group).to(dtype)  # (n, p, r, r)
        cores = cores / cores.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        expert = self.tucka_expert[adapter_name].to(dtype)
        coefficients = route.gates.to(expert.dtype) @ (expert / expert.norm())  # (n, p)
        if route.weights is not None:
            coefficients = coefficients * route.weights.to(coefficients.dtype).view(-1, 1)
            return self.tucka_alpha[adapter_name] * torch.einsum("np,nprs->rs", coefficients, cores).unsqueeze(0)
        return self.tucka_alpha[adapter_name] * torch.einsum("np,nprs->nrs", coefficients, cores)

    def lora_basis(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(A, WU, M) in fp32 such that under route (group i, gates g) this layer is exactly the LoRA layer
        y = x W^T + (x A^T) B^T with A = U^T and B = WU (sum_j g_j M[i, j])^T (method note, section 4).

        A = U^T (r, d_in) and WU = W U^ (d_out, r) are route-free; M (k, t, r, r) holds each expert's mixing matrix
        (``mixing_matrix`` of a one-hot gate, alpha and the normalisations folded in): M is linear in the gates, so
        any route's B is a weighted sum and a route's LoRA adapter needs neither the base weights nor this layer.
        """
        k, t = self.tucka_state[adapter_name].k, self.tucka_state[adapter_name].t
        weight = self.full_precision_weight("convert against")
        with torch.no_grad():
            u = self.normalised_subspace(adapter_name, torch.float32)
            experts = ActiveRoute(
                group=torch.arange(k, device=u.device).repeat_interleave(t),
                gates=torch.eye(t, device=u.device).repeat(k, 1),
            )
            r = u.shape[1]
            mixing = self.mixing_matrix(adapter_name, experts, torch.float32).view(k, t, r, r)
            return u.t().contiguous(), weight.float() @ u.to(weight.device), mixing

    def full_precision_weight(self, action: str) -> torch.Tensor:
        """The base layer's weight, which merging and LoRA conversion multiply by; a weight stored quantised (a
        bitsandbytes 4-bit layer packs it into uint8) is a ValueError saying to ``action`` the full-precision base."""
        weight = self.get_base_layer().weight
        if not weight.dtype.is_floating_point:
            raise ValueError(
                f"TuckA: the base weight of this {type(self.get_base_layer()).__name__} is stored quantised "
                f"({weight.dtype}); {action} the base loaded in full precision (tucka export does)."
            )
        return weight

    def normalised_subspace(self, adapter_name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """U / ||U||_F in ``dtype`` (default: the adapter's)."""
        subspace = self.tucka_subspace[adapter_name].to(dtype)
        return subspace / subspace.norm()

    def _add_update(self, adapter_name: str, x: torch.Tensor, acc: torch.Tensor, route: ActiveRoute) -> torch.Tensor:
        """acc + (x U^) M U^T in the adapter's dtype, the last matmul fused with the sum (addmm)."""
        u = self.normalised_subspace(adapter_name)
        m = self.mixing_matrix(adapter_name, route)
        xu = x @ u
        if m.shape[0] == 1:
            xum = xu @ m[0]
        elif x.dim() == 3 and x.shape[0] == m.shape[0]:
            xum = torch.matmul(xu, m)  # one route per sequence, batched
        else:
            raise ValueError(
                f"TuckA: {m.shape[0]} per-sequence routes do not fit an input of shape {tuple(x.shape)}; "
                "use routing mode 'batch' for inputs without a batch dimension."
            )
        out = torch.addmm(acc.reshape(-1, acc.shape[-1]), xum.reshape(-1, xum.shape[-1]), u.t())
        return out.view(acc.shape)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:  # as peft's layers: a merged layer is its base layer
            return self.base_layer(x, *args, **kwargs)
        adapted: torch.Tensor | None = None
        for name in self.active_adapters:
            if name not in self.tucka_core:
                continue
            route = self._route(name, x)
            xa = x.to(self.tucka_subspace[name].dtype)
            adapted = self._add_update(name, xa, xa if adapted is None else adapted, route)
        if adapted is None:
            return self.base_layer(x, *args, **kwargs)
        # One rounding of (x + update) to the base dtype: the update is summed at adapter precision.
        return self.base_layer(adapted.to(x.dtype), *args, **kwargs)

    # ----------------------------------------------------------------------------------------------- merging
    def merge_factors(self, adapter_name: str, route: Route | RouteMixture) -> tuple[torch.Tensor, torch.Tensor]:
        """(U^, M) in fp32 for a fixed route (alpha folded into M): the update is W U^ M^T U^T (section 4)."""
        active = fixed_route(route, self.tucka_subspace[adapter_name].device, torch.float32)
        with torch.no_grad():
            u = self.normalised_subspace(adapter_name, torch.float32)
            return u, self.mixing_matrix(adapter_name, active, torch.float32)[0]

    def _stacked_factors(self, names: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """V = [U_1 ... U_n] (d, n r) and B = blockdiag(M_1^T ... M_n^T) (n r, n r) of the merged adapters
        ``names`` under the routes they were merged with: together they changed W into W (I + V B V^T)."""
        factors = [self.merge_factors(name, self.tucka_merged_route[name]) for name in names]
        v = torch.cat([u for u, _ in factors], dim=1).to(device)
        b = torch.block_diag(*[m.t() for _, m in factors]).to(device)
        return v, b

    def _base_of_merged(self, merged: torch.Tensor, names: list[str]) -> torch.Tensor:
        """W from W' = W (I + V B V^T), fp32 (method note, section 4), without a d x d inverse (Woodbury):
        (I + V B V^T)^-1 = I - V (I + B V^T V)^-1 B V^T, an (n r) x (n r) system."""
        if not names:
            return merged
        v, b = self._stacked_factors(names, merged.device)
        system = torch.eye(b.shape[0], device=merged.device, dtype=torch.float64) + (b @ v.t() @ v).double()
        correction = torch.linalg.solve(system, (b @ v.t()).double()).float()  # (n r, d)
        base = merged - (merged @ v) @ correction
        if not torch.isfinite(base).all():
            raise ValueError(
                f"TuckA: the merged update of adapters {names} is not invertible (I + B V^T V is singular); reload "
                "the base model and adapter instead of unmerging."
            )
        return base

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Fold the adapters into the base weight under the fixed route set with ``tucka_llm.routing``.

        W' = W (I + sum_a U_a M_a^T U_a^T) = W + sum_a ((W U_a) M_a^T) U_a^T: exactly what the unmerged forward
        computes with these adapters active, in fp32 and cast once to the base dtype. Adapters merged earlier are
        taken out of W first (``_base_of_merged``), so merges in several calls add up as in one call. Thin products
        only (d_out x r), never a d x d matrix, so a 7B model merges in seconds on a CPU.
        """
        names = [n for n in check_adapters_to_merge(self, adapter_names) if n in self.tucka_core]
        if not names:
            return
        routes = {}
        for name in names:
            route = self.tucka_state[name].mode
            if not isinstance(route, Route | RouteMixture):
                raise ValueError(
                    f"TuckA adapter '{name}' routes per input and cannot be merged as is: choose the route to "
                    "fold, e.g. `with tucka_llm.routing(model, tucka_llm.Route(group, gates)): "
                    "model.merge_and_unload()`."
                )
            routes[name] = route
        weight = self.full_precision_weight("merge into")
        with torch.no_grad():
            current = weight.float()
            base = self._base_of_merged(current, self.merged_adapters)
            merged = current.clone()
            for name, route in routes.items():
                u, m = (f.to(weight.device) for f in self.merge_factors(name, route))
                merged += ((base @ u) @ m.t()) @ u.t()
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(
                    f"NaNs detected in the merged weights. The adapter {', '.join(names)} seems to be broken; nothing "
                    "was changed."
                )
            weight.data = merged.to(weight.dtype)
        self.tucka_merged_route.update(routes)
        self.merged_adapters.extend(names)

    def unmerge(self) -> None:
        """Take every merged adapter out of the base weight: W = W' (I + V B V^T)^-1 through an (n r) x (n r) solve
        in fp32 (``_base_of_merged``), cast once. Exact up to the base dtype's rounding (docs/benchmarks.md)."""
        if not self.merged:
            return
        weight = self.full_precision_weight("unmerge from")
        with torch.no_grad():
            weight.data = self._base_of_merged(weight.float(), self.merged_adapters).to(weight.dtype)
        for name in self.merged_adapters:
            self.tucka_merged_route.pop(name, None)
        self.merged_adapters.clear()

    def __repr__(self) -> str:
        return "tucka." + super().__repr__()
