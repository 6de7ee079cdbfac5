"""Batch-level routing (method note, section 2): route type, per-adapter routing state, router math.

One router (the centroids E, on the first adapted layer) decides, once per forward, the expert group and the
gates that every TuckA layer of the adapter then uses. The decision lives in a ``RoutingState`` shared by the
layers of one adapter. It is computed at prefill and held for the decode steps of ``generate``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


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


RoutingMode = str | Route | None
_MODES = ("batch", "sequence")


@dataclass
class ActiveRoute:
    """A route as tensors: ``group`` (n,) and ``gates`` (n, t); n is 1 (one route for all) or the batch size."""

    group: torch.Tensor
    gates: torch.Tensor


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
    """What the layers of one TuckA adapter share: the routing mode, the current route and the load statistics.

    ``begin_forward`` is called by a forward pre-hook on the wrapped model with the model's own arguments, so the
    attention mask reaches the router without the user doing anything.
    """

    def __init__(self, k: int, t: int, router_module: str, perturb_scale: float) -> None:
        self.k, self.t = k, t
        self.router_module = router_module
        self.perturb_scale = perturb_scale
        self.mode: RoutingMode = None  # None: "batch" while training, "sequence" in eval mode
        self.attention_mask: torch.Tensor | None = None
        self.route: ActiveRoute | None = None
        self.held = False  # True during decode steps: the route of the prefill is reused
        self.calibration: list[torch.Tensor] | None = None  # set by data_aware_init while it collects features
        self._load_counts: torch.Tensor | None = None  # (k,) on the router's device
        self._load_gates: torch.Tensor | None = None  # (k, t)

    def begin_forward(self, attention_mask: torch.Tensor | None, decoding: bool) -> None:
        """A new model forward: keep the held route during decode steps, else forget it and take the new mask."""
        self.held = decoding and self.route is not None
        if self.held:
            return
        self.route = None
        self.attention_mask = attention_mask if isinstance(attention_mask, torch.Tensor) else None

    def effective_mode(self, training: bool) -> str | Route:
        if self.mode is None:
            return "batch" if training else "sequence"
        return self.mode

    def record(self, route: ActiveRoute) -> None:
        """Accumulate load statistics on the device (no host synchronisation)."""
        with torch.no_grad():
            if self._load_counts is None or self._load_counts.device != route.group.device:
                self._load_counts = torch.zeros(self.k, device=route.group.device, dtype=torch.float32)
                self._load_gates = torch.zeros(self.k, self.t, device=route.group.device, dtype=torch.float32)
            self._load_counts.index_add_(0, route.group, torch.ones_like(route.group, dtype=torch.float32))
            self._load_gates.index_add_(0, route.group, route.gates.detach().float())

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


def route_scores(centroids: torch.Tensor, features: torch.Tensor, k: int, t: int) -> torch.Tensor:
    """Paper Eq. 6-7 with the authors' per-group normalisation: features (n, d) -> expert scores (n, k, t) in (0, 1).

    s = sigmoid(normalise_within_group(E h)); without the normalisation s saturates at 1 for d = 4096.
    """
    logits = F.linear(features, centroids).view(-1, k, t)
    return torch.sigmoid(F.normalize(logits, dim=-1))


def route_from_features(centroids: torch.Tensor, features: torch.Tensor, k: int, t: int) -> ActiveRoute:
    """Paper Eqs. 6-8: the winning expert's group is active and its gates are its scores normalised to sum 1.

    features (n, d) -> one route per row. All tensors, no host synchronisation.
    """
    scores = route_scores(centroids, features, k, t)
    group = scores.flatten(1).argmax(dim=-1) // t
    chosen = scores.gather(1, group.view(-1, 1, 1).expand(-1, 1, t)).squeeze(1)
    return ActiveRoute(group=group, gates=chosen / chosen.sum(dim=-1, keepdim=True))


def fixed_route(route: Route, device: torch.device, dtype: torch.dtype) -> ActiveRoute:
    return ActiveRoute(
        group=torch.tensor([route.group], device=device),
        gates=torch.tensor([route.gates], device=device, dtype=dtype),
    )


def validate_mode(mode: RoutingMode, k: int, t: int) -> None:
    if isinstance(mode, Route):
        mode.check(k, t)
    elif mode is not None and mode not in _MODES:
        raise ValueError(f"Unknown routing mode {mode!r}: use 'batch', 'sequence' or a tucka_llm.Route.")


def _cache_length(past_key_values: Any) -> int:
    if past_key_values is None:
        return 0
    if hasattr(past_key_values, "get_seq_length"):
        return int(past_key_values.get_seq_length())
    try:  # legacy tuple-of-tuples cache
        return int(past_key_values[0][0].shape[-2])
    except (IndexError, TypeError, AttributeError):
        return 0


def install_forward_hook(model: nn.Module, states: dict[str, RoutingState]) -> torch.utils.hooks.RemovableHandle:
    """Call ``begin_forward`` on every adapter's state before each forward of ``model``.

    The hook reads ``attention_mask`` and ``past_key_values`` from the model's own arguments (positional or
    keyword), so plain forwards, ``generate`` and DeepSpeed engines all route on real tokens only.
    """
    signature = inspect.signature(model.forward)

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        try:
            bound = signature.bind_partial(*args, **kwargs).arguments
        except TypeError:
            bound = kwargs
        mask = bound.get("attention_mask")
        decoding = _cache_length(bound.get("past_key_values")) > 0
        for state in states.values():
            state.begin_forward(mask, decoding)

    return model.register_forward_pre_hook(hook, with_kwargs=True)


def routing_states(model: nn.Module) -> dict[str, RoutingState]:
    """The routing state of every TuckA adapter in ``model`` (a PeftModel, a DeepSpeed engine, any module)."""
    from tucka_llm.tucka.layer import TuckALayer

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
def routing(model: nn.Module, mode: RoutingMode) -> Iterator[None]:
    """Set the routing mode of every TuckA adapter in ``model`` for the duration of the block.

    ``mode``: ``"batch"`` (one route per forward, the paper's training-time routing), ``"sequence"`` (one route
    per sequence, so an answer never depends on its batch neighbours), a ``Route`` (fixed group and gates), or
    None (the default: batch while ``model.training``, sequence otherwise).
    """
    states = list(routing_states(model).values())
    for state in states:
        validate_mode(mode, state.k, state.t)
    previous = [state.mode for state in states]
    try:
        for state in states:
            state.mode, state.route, state.held = mode, None, False
        yield
    finally:
        for state, old in zip(states, previous, strict=True):
            state.mode, state.route, state.held = old, None, False


def expert_load(model: nn.Module, reset: bool = True) -> dict[str, ExpertLoad]:
    """Per adapter: how often each group was chosen, its mean gates and the routing entropy since the last read."""
    return {name: state.read_load(reset) for name, state in routing_states(model).items()}
