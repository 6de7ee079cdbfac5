"""Batch-level routing (method note, sections 2-3): routes, the per-adapter routing state, the forward hook.

One router (``tucka_llm.tucka.router``, held by the adapter's routing layer) decides, once per forward, the expert
group and the gates that every TuckA layer of the adapter then uses. The decision lives in a ``RoutingState`` shared
by the layers of one adapter. It is computed at prefill and held for the decode steps of ``generate``. This module
knows nothing of layers or models: the model-level helpers (``routing``, ``expert_load``, ``routing_states``) live in
``tucka_llm.tucka.model``.
"""

from __future__ import annotations

import hashlib
import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from tucka_llm.errors import TuckaError

if TYPE_CHECKING:
    from tucka_llm.tucka.router import TuckARouter


@dataclass(frozen=True)
class Route:
    """A fixed route: expert group ``group`` (0-based) with one gate per expert of that group."""

    group: int
    gates: tuple[float, ...]

    def __init__(self, group: int, gates: Sequence[float]) -> None:
        object.__setattr__(self, "group", int(group))
        object.__setattr__(self, "gates", tuple(float(g) for g in gates))

    def check(self, k: int, t: int) -> None:
        """Raise a ValueError unless this route fits an adapter with k groups of t experts."""
        if not 0 <= self.group < k:
            raise ValueError(f"Route group {self.group} is out of range: the adapter has k={k} groups (0..{k - 1}).")
        if len(self.gates) != t:
            raise ValueError(f"Route has {len(self.gates)} gates, but each group has t={t} experts: give {t} gates.")
        if not all(math.isfinite(g) for g in self.gates):
            raise ValueError(f"Route gates must be finite numbers, got {list(self.gates)}.")


@dataclass(frozen=True)
class RouteMixture:
    """A fixed weighted sum of routes: the update is sum_i weight_i * update(route_i).

    Under a fixed route the update is linear in the (group, gates) selection, so the mean update over many inputs'
    routes is exactly such a mixture (export's ``expected`` fold). It is not any single route.
    """

    parts: tuple[tuple[float, Route], ...]

    def __init__(self, parts: Sequence[tuple[float, Route]]) -> None:
        object.__setattr__(self, "parts", tuple((float(w), r) for w, r in parts))

    def check(self, k: int, t: int) -> None:
        if not self.parts:
            raise ValueError("A RouteMixture needs at least one (weight, Route) part.")
        for weight, route in self.parts:
            route.check(k, t)
            if not (math.isfinite(weight) and weight >= 0):
                raise ValueError(f"RouteMixture weights must be finite and >= 0, got {weight}.")


RoutingMode = str | Route | RouteMixture | None
_MODES = ("batch", "sequence")


@dataclass
class ActiveRoute:
    """A route as tensors: ``group`` (n,) and ``gates`` (n, t); n is 1 (one route for all) or the batch size.

    With ``weights`` (n,) the n routes are not alternatives but the parts of one ``RouteMixture``: the update is
    their weighted sum.
    """

    group: torch.Tensor
    gates: torch.Tensor
    weights: torch.Tensor | None = None


@dataclass
class ExpertLoad:
    """Routing statistics of one adapter since the previous read.

    ``fraction[i]`` is the share of routes (micro-batches in batch mode, sequences in sequence mode) that chose
    group i; ``mean_gates[i]`` the mean gates of group i when it was chosen; ``entropy`` the entropy (nats) of
    ``fraction``: 0 when one group takes everything, log(k) when the load is uniform.
    """

    routes: int
    counts: list[int]
    fraction: list[float]
    mean_gates: list[list[float]]
    entropy: float

    @classmethod
    def from_sums(cls, counts: torch.Tensor, gate_sums: torch.Tensor) -> ExpertLoad:
        """From route counts per group (k,) and the sums of the chosen gates per group (k, t)."""
        counts, gate_sums = counts.double().cpu(), gate_sums.double().cpu()
        total = float(counts.sum())
        fraction = [float(c) / total if total else 0.0 for c in counts]
        mean_gates = [
            [float(g) / float(c) if c else 0.0 for g in row] for row, c in zip(gate_sums, counts, strict=True)
        ]
        entropy = sum(-f * math.log(f) for f in fraction if f > 0)
        return cls(int(total), [int(c) for c in counts], fraction, mean_gates, entropy)


class RoutingState:
    """What the layers of one TuckA adapter share: the router, the routing mode, the current route, load statistics.

    ``begin_forward`` is called by a forward pre-hook on the wrapped model with the model's own arguments, so the
    attention mask reaches the router without the user doing anything. ``draw_step`` and ``draws`` key the redraw
    router's random draws: training sets ``draw_step`` to the optimizer step at each step's start (``draws`` back
    to 0), and every model forward that is not a decode step counts one draw.
    """

    def __init__(self, router: TuckARouter, router_module: str) -> None:
        self.router = router
        self.router_module = router_module
        self.mode: RoutingMode = None  # None: "batch" while training, "sequence" in eval mode
        self.attention_mask: torch.Tensor | None = None
        self.route: ActiveRoute | None = None
        self.held = False  # True during decode steps: the route of the prefill is reused
        self.gate_levels: int | None = None  # set: computed routes are quantised (TuckARouter.quantise) as served
        self.calibration: list[torch.Tensor] | None = None  # set by data_aware_init while it collects features
        self.calibration_stops = True  # the routing layer ends the forward once it has the features
        # A random router's sequence mode draws each sequence's route keyed by its real tokens (``sequence_keys``),
        # so a prompt's route depends on neither its batch nor how many came before it.
        self.input_ids: torch.Tensor | None = None
        self.draw_step, self.draws = 0, 0
        self._load_counts: torch.Tensor | None = None  # (k,) on the router's device
        self._load_gates: torch.Tensor | None = None  # (k, t)

    @property
    def k(self) -> int:
        return self.router.k

    @property
    def t(self) -> int:
        return self.router.t

    def begin_forward(
        self, attention_mask: torch.Tensor | None, decoding: bool, input_ids: torch.Tensor | None = None
    ) -> None:
        """A new model forward: keep the held route during decode steps, else forget it and take the new mask (and,
        for a router that draws its routes, the token ids its sequence mode keys each sequence's draw by)."""
        self.held = decoding and self.route is not None
        if self.held:
            return
        self.route = None
        self.draws += 1
        self.attention_mask = attention_mask if isinstance(attention_mask, torch.Tensor) else None
        drawn = self.router.draws_routes and isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2
        self.input_ids = input_ids if drawn else None

    def start_step(self, step: int) -> None:
        """Training reached optimizer step ``step``: the redraw router's draws restart from (step, 0)."""
        self.draw_step, self.draws = step, 0

    def effective_mode(self, training: bool) -> str | Route | RouteMixture:
        if self.mode is None:
            return "batch" if training else "sequence"
        return self.mode

    def record(self, route: ActiveRoute) -> None:
        """Accumulate load statistics on the device (no host synchronisation)."""
        with torch.no_grad():
            if self._load_counts is None or self._load_counts.device != route.group.device:
                self._load_counts = torch.zeros(self.k, device=route.group.device, dtype=torch.float32)
                self._load_gates = torch.zeros(self.k, self.t, device=route.group.device, dtype=torch.float32)
            counts = torch.ones_like(route.group, dtype=torch.float32) if route.weights is None else route.weights
            self._load_counts.index_add_(0, route.group, counts.float())
            self._load_gates.index_add_(0, route.group, route.gates.detach().float() * counts.float().view(-1, 1))

    def load_sums(self, reset: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw statistics since the last read, on the CPU: route counts per group (k,) and gate sums (k, t).

        Sums, so that data-parallel ranks can add theirs up before ``ExpertLoad.from_sums``.
        """
        if self._load_counts is None:
            counts, gate_sums = torch.zeros(self.k), torch.zeros(self.k, self.t)
        else:
            counts, gate_sums = self._load_counts.cpu(), self._load_gates.cpu()
        if reset:
            self._load_counts = self._load_gates = None
        return counts, gate_sums

    def read_load(self, reset: bool = True) -> ExpertLoad:
        """Statistics since the last read (one host synchronisation)."""
        return ExpertLoad.from_sums(*self.load_sums(reset))


def sequence_keys(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[str]:
    """A digest (16 hex digits) of each sequence's real tokens: the same prompt gets the same key in any batch,
    however padded."""
    rows = input_ids.detach().cpu()
    mask = None if attention_mask is None else attention_mask.detach().cpu()[:, -rows.shape[1] :].bool()
    keys = []
    for index, row in enumerate(rows):
        tokens = row if mask is None else row[mask[index]]
        keys.append(hashlib.sha256(tokens.numpy().astype("<i8").tobytes()).hexdigest()[:16])
    return keys


def routing_features(x: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of the router layer's input over the real tokens of each sequence: (B, S, d) -> (B, d).

    Padding never moves the route: masked positions are left out of the mean, whatever side they are on.
    """
    if x.dim() == 2:
        x = x.unsqueeze(0)
    if attention_mask is None:
        return x.mean(dim=1)
    if attention_mask.dim() != 2 or attention_mask.shape[0] != x.shape[0] or attention_mask.shape[1] < x.shape[1]:
        raise ValueError(
            f"TuckA routing needs a 2-D attention mask (batch, sequence) matching the input {tuple(x.shape[:2])}, "
            f"got {tuple(attention_mask.shape)}. Pass the usual padding mask, or none."
        )
    mask = attention_mask[:, -x.shape[1] :].to(x.dtype).unsqueeze(-1)
    return (x * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1)


MAX_GATE_LEVELS = 64  # each gate to 1/63 of its range; more levels only add routes a LoRA engine must hold


def check_gate_levels(levels: int, flag: str = "gate_levels") -> None:
    """Refuse a number of gate levels (``TuckARouter.quantise``, routed serving) that is not an integer in
    1..MAX_GATE_LEVELS; ``flag`` names the setting in the message (``--gate-levels`` on a command line)."""
    if isinstance(levels, bool) or not isinstance(levels, int) or not 1 <= levels <= MAX_GATE_LEVELS:
        raise TuckaError(
            f"{flag} {levels!r}: give an integer from 1 (gates fixed at the middle of their range) to "
            f"{MAX_GATE_LEVELS}."
        )


def fixed_route(route: Route | RouteMixture, device: torch.device, dtype: torch.dtype) -> ActiveRoute:
    """A fixed route (or mixture of routes) as tensors."""
    parts = route.parts if isinstance(route, RouteMixture) else ((1.0, route),)
    return ActiveRoute(
        group=torch.tensor([r.group for _, r in parts], device=device),
        gates=torch.tensor([r.gates for _, r in parts], device=device, dtype=dtype),
        weights=torch.tensor([w for w, _ in parts], device=device, dtype=dtype)
        if isinstance(route, RouteMixture)
        else None,
    )


def validate_mode(mode: RoutingMode, k: int, t: int) -> None:
    if isinstance(mode, Route | RouteMixture):
        mode.check(k, t)
    elif mode is not None and mode not in _MODES:
        raise ValueError(
            f"Unknown routing mode {mode!r}: use 'batch', 'sequence', a tucka_llm.Route or a tucka_llm.RouteMixture."
        )


def _cache_length(past_key_values: Any) -> int:
    if past_key_values is None:
        return 0
    if hasattr(past_key_values, "get_seq_length"):
        return int(past_key_values.get_seq_length())
    try:  # legacy tuple-of-tuples cache
        return int(past_key_values[0][0].shape[-2])
    except (IndexError, TypeError, AttributeError):
        return 0


class BeginForward:
    """A forward pre-hook on the wrapped model that calls ``begin_forward`` on every adapter's routing state.

    It reads ``attention_mask`` and ``past_key_values`` from the model's own arguments (positional or keyword), so
    plain forwards, ``generate`` and DeepSpeed engines all route on real tokens only. An object rather than a closure:
    ``copy.deepcopy`` of the model copies it with the states it serves, so a copy never routes through the original.
    """

    def __init__(self, model: nn.Module, states: dict[str, RoutingState]) -> None:
        self.signature = inspect.signature(model.forward)
        self.states = states

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        try:
            bound = self.signature.bind_partial(*args, **kwargs).arguments
        except TypeError:
            bound = kwargs
        mask = bound.get("attention_mask")
        decoding = _cache_length(bound.get("past_key_values")) > 0
        for state in self.states.values():
            state.begin_forward(mask, decoding, bound.get("input_ids"))


def install_forward_hook(model: nn.Module, states: dict[str, RoutingState]) -> torch.utils.hooks.RemovableHandle:
    """Run ``BeginForward`` before each forward of ``model`` for the adapters in ``states`` (a live dict)."""
    return model.register_forward_pre_hook(BeginForward(model, states), with_kwargs=True)
