"""Batch-level routing (method note, sections 2-3): routes, the three routers' math, the per-adapter routing state.

One router (on the first adapted layer) decides, once per forward, the expert group and the gates that every TuckA
layer of the adapter then uses. The decision lives in a ``RoutingState`` shared by the layers of one adapter. It is
computed at prefill and held for the decode steps of ``generate``. This module knows nothing of layers or models:
the model-level helpers (``routing``, ``expert_load``, ``routing_states``) live in ``tucka_llm.tucka.model``.

Routers (``TuckAConfig.router``):

- ``centred`` (default): logits E (h - e_bar), e_bar the calibration centroid (a frozen float32 buffer), E = e_bar +
  eps for every row. The route depends only on the direction of h - e_bar, so the large component that every
  input shares (and that makes the paper's router collapse onto one group, method note section 3) drops out.
- ``dai``: the paper's design, DAI once: E = [e, e + eps_1, ...], logits E h.
- ``redraw``: the authors' published code: E redrawn around the current route feature at every forward and never
  trained; the draws come from a generator seeded by (seed, step, forward), so a resumed run draws the same.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ROUTERS = ("centred", "dai", "redraw")


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

    def __init__(self, router: Router, router_module: str) -> None:
        self.router = router
        self.router_module = router_module
        self.mode: RoutingMode = None  # None: "batch" while training, "sequence" in eval mode
        self.attention_mask: torch.Tensor | None = None
        self.route: ActiveRoute | None = None
        self.held = False  # True during decode steps: the route of the prefill is reused
        self.gate_levels: int | None = None  # set: computed routes are quantised (Router.quantise) as served
        self.calibration: list[torch.Tensor] | None = None  # set by data_aware_init while it collects features
        self.draw_step, self.draws = 0, 0
        self._load_counts: torch.Tensor | None = None  # (k,) on the router's device
        self._load_gates: torch.Tensor | None = None  # (k, t)

    @property
    def k(self) -> int:
        return self.router.k

    @property
    def t(self) -> int:
        return self.router.t

    def begin_forward(self, attention_mask: torch.Tensor | None, decoding: bool) -> None:
        """A new model forward: keep the held route during decode steps, else forget it and take the new mask."""
        self.held = decoding and self.route is not None
        if self.held:
            return
        self.route = None
        self.draws += 1
        self.attention_mask = attention_mask if isinstance(attention_mask, torch.Tensor) else None

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


def _seed_of(*numbers: int) -> int:
    """A 63-bit generator seed that depends on every number (a stable hash, unlike Python's salted ``hash``)."""
    digest = hashlib.sha256(",".join(map(str, numbers)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclass(frozen=True)
class Router:
    """The router of one adapter: which design (``kind``, one of ROUTERS) and its settings (method note, 2-3).

    Every design scores the k*t experts as s = sigmoid(normalise_within_group(logits)) (the authors' per-group
    normalisation, without which s saturates at 1 for d = 4096), takes the group of the best expert, and gates its
    experts by their scores, normalised to sum 1 (paper Eq. 8) unless ``normalize_gates`` is False (the authors'
    code, whose update is then scaled by the sum of the scores, ~1.2-1.34 at t = 2).
    """

    kind: str
    k: int
    t: int
    perturb_scale: float
    normalize_gates: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ROUTERS:
            raise ValueError(f"Unknown TuckA router {self.kind!r}: use one of {', '.join(ROUTERS)}.")

    @property
    def has_centroids(self) -> bool:
        """Whether the router has trained centroids E (the redraw router draws them anew at every forward)."""
        return self.kind != "redraw"

    def features(
        self, x: torch.Tensor, attention_mask: torch.Tensor | None, centroids_dtype: torch.dtype
    ) -> torch.Tensor:
        """The routing feature h of each sequence. ``dai`` averages in E's dtype, as it always has (old adapters
        route exactly as before); the others average and centre in float32, so a bf16 run's h - e_bar is exact."""
        return routing_features(x.to(centroids_dtype) if self.kind == "dai" else x.float(), attention_mask)

    def logits(
        self,
        features: torch.Tensor,
        centroids: torch.Tensor | None,
        center: torch.Tensor | None,
        draw: tuple[int, int] = (0, 0),
    ) -> torch.Tensor:
        """(n, d) features -> (n, k*t) expert logits; ``draw`` keys the redraw router's draw."""
        if self.kind == "centred":
            return F.linear(features.float() - center.float(), centroids.float())
        if self.kind == "dai":
            return F.linear(features, centroids)
        # redraw: E = [h, h + eps_1, ...] around each route's own feature, so E h = |h|^2 + [0, eps_1 h, ...]
        noise = self.redraw_noise(features.shape[-1], draw).to(features.device)
        h = features.float()
        return (h * h).sum(dim=-1, keepdim=True) + F.linear(h, noise)

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """(n, k*t) logits -> (n, k, t) expert scores in (0, 1)."""
        return torch.sigmoid(F.normalize(logits.view(-1, self.k, self.t), dim=-1))

    def route(self, scores: torch.Tensor) -> ActiveRoute:
        """Paper Eqs. 7-8: the winning expert's group is active, gated by its experts' scores. No host sync."""
        group = scores.flatten(1).argmax(dim=-1) // self.t
        chosen = scores.gather(1, group.view(-1, 1, 1).expand(-1, 1, self.t)).squeeze(1)
        gates = chosen / chosen.sum(dim=-1, keepdim=True) if self.normalize_gates else chosen
        return ActiveRoute(group=group, gates=gates)

    def route_features(
        self,
        features: torch.Tensor,
        centroids: torch.Tensor | None,
        center: torch.Tensor | None,
        draw: tuple[int, int] = (0, 0),
    ) -> ActiveRoute:
        """features (n, d) -> one route per row."""
        return self.route(self.scores(self.logits(features, centroids, center, draw)))

    def gate_range(self) -> tuple[float, float]:
        """The smallest and largest value one gate can take under this router (see ``gate_range``)."""
        return gate_range(self.t, self.normalize_gates)

    def quantise(self, route: ActiveRoute, levels: int) -> ActiveRoute:
        """The served route: each gate rounded to the nearest of ``levels`` equally spaced values spanning
        ``gate_range()`` (one level: its middle), then divided by their sum again when the router normalises gates.

        With finitely many gate values a finite set of fixed routes (one LoRA adapter each) covers every input
        (routed serving, ``tucka_llm.serving``). Done in float64 so that every caller that starts from the same
        gates ends on the same grid values.
        """
        validate_gate_levels(levels)
        low, high = self.gate_range()
        gates = route.gates.double()
        if levels == 1 or high == low:
            quantised = torch.full_like(gates, (low + high) / 2)
        else:
            step = (high - low) / (levels - 1)
            quantised = low + torch.round((gates - low) / step).clamp(0, levels - 1) * step
        if self.normalize_gates:
            quantised = quantised / quantised.sum(dim=-1, keepdim=True)
        return ActiveRoute(route.group, quantised.to(route.gates.dtype), route.weights)

    def initial_centroids(self, e: torch.Tensor, seed: int) -> torch.Tensor | None:
        """DAI (paper Eq. 10) from the calibration centroid ``e``: E = [e, e + eps_1, ...] for ``dai``, E = e + eps
        for every row for ``centred`` (an unperturbed row would score exactly 0 for every input), eps ~ U(-a, a);
        None for ``redraw``, which keeps no E."""
        if not self.has_centroids:
            return None
        noise = self._perturbations(self.k * self.t - (1 if self.kind == "dai" else 0), e.numel(), seed)
        e = e.float().cpu()
        return torch.cat([e.unsqueeze(0), e + noise]) if self.kind == "dai" else e + noise

    def redraw_noise(self, d: int, draw: tuple[int, int]) -> torch.Tensor:
        """The redraw router's perturbations for one forward: (k*t, d), first row 0, the rest U(-a, a), seeded by
        (seed, step, forward) so that the same step of a resumed run draws the same."""
        noise = self._perturbations(self.k * self.t - 1, d, _seed_of(self.seed, *draw))
        return torch.cat([torch.zeros(1, d), noise])

    def _perturbations(self, rows: int, d: int, seed: int) -> torch.Tensor:
        """eps ~ U(-a, a), (rows, d), from a CPU generator seeded with ``seed`` (the same on every rank and device)."""
        generator = torch.Generator().manual_seed(seed)
        return (torch.rand(rows, d, generator=generator) * 2 - 1) * self.perturb_scale


def validate_gate_levels(levels: int) -> None:
    """Refuse a number of gate levels (``Router.quantise``) that is not an integer >= 1."""
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 1:
        raise ValueError(f"gate levels must be an integer >= 1, got {levels!r}.")


@functools.cache
def gate_range(t: int, normalize_gates: bool) -> tuple[float, float]:
    """The interval one gate lives in. A group's t scores are sigmoid(l) of a unit vector l (the per-group
    normalisation), so each score lies in [sigmoid(-1), sigmoid(1)]. Normalised gates s_j / sum_m s_m reach their
    extremes when the other t - 1 logits are equal (the sigmoid is convex below 0 and concave above), which leaves a
    one-dimensional search over l_j, done here on a fine grid (exact to ~1e-9): [0.3223, 0.6777] at t = 2.
    """
    if not normalize_gates:
        return float(torch.sigmoid(torch.tensor(-1.0, dtype=torch.float64))), float(
            torch.sigmoid(torch.tensor(1.0, dtype=torch.float64))
        )
    if t == 1:
        return 1.0, 1.0
    a = torch.linspace(-1, 1, 200_001, dtype=torch.float64)
    others = torch.sqrt((1 - a * a) / (t - 1))
    values = [torch.sigmoid(a) / (torch.sigmoid(a) + (t - 1) * torch.sigmoid(sign * others)) for sign in (-1, 1)]
    gates = torch.cat(values)
    return float(gates.min()), float(gates.max())


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
