"""The router of one TuckA adapter as a module (method note, sections 2-3): its centroids, its calibration, its rules.

Each adapter owns one router, held by its routing layer (``TuckALayer.tucka_router[adapter]``), so it is saved,
loaded, moved, deleted and trained with the adapter like any other peft adapter weight. The three designs are kinds
of one module that differ in their logits, their initial centroids and what they keep:

- ``CentredRouter`` (``"centred"``, default): logits E (h - e_bar), e_bar the calibration centroid (a frozen float32
  buffer), E = e_bar + eps for every row. The route depends only on the direction of h - e_bar, so the large component
  that every input shares (which makes the paper's router collapse onto one group) drops out.
- ``DaiRouter`` (``"dai"``): the paper's design, DAI once: E = [e, e + eps_1, ...], logits E h.
- ``RedrawRouter`` (``"redraw"``): the authors' published code: E redrawn around the current routing feature at every
  forward and never trained; the draws come from a generator seeded by (seed, step, forward), so a resumed run draws
  the same. It keeps no tensors and needs no calibration.

Every design scores the k*t experts as s = sigmoid(normalise_within_group(logits)) (the authors' per-group
normalisation, without which s saturates at 1 for d = 4096), takes the group of the best expert, and gates its experts
by their scores, normalised to sum 1 (paper Eq. 8) unless ``normalize_gates`` is False (the authors' code).
"""

from __future__ import annotations

import functools
import hashlib
import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from tucka_llm.errors import TuckaError
from tucka_llm.tucka.routing import ActiveRoute, check_gate_levels, routing_features


class UncalibratedRouterError(TuckaError, RuntimeError):
    """A router with centroids is trained before data-aware initialisation; the message says how to calibrate."""


class TuckARouter(nn.Module):
    """Scores the k*t experts of one adapter from a routing feature h (d,) and picks the route (group, gates).

    Subclasses set ``kind`` and override ``logits`` and ``initial_centroids``. Class attributes state each design's
    rules: ``trains_centroids`` (it holds a trained centroid matrix E, so it must be calibrated before training and
    can route outside the model from its tensors), ``draws_routes`` (its routes are random draws), and
    ``degenerate_at_centre`` (the route of the calibration centroid itself is meaningless).
    """

    kind: ClassVar[str]
    trains_centroids: ClassVar[bool] = True
    draws_routes: ClassVar[bool] = False
    degenerate_at_centre: ClassVar[bool] = False

    def __init__(
        self, k: int, t: int, d: int, perturb_scale: float, normalize_gates: bool = True, seed: int = 0
    ) -> None:
        super().__init__()
        self.k, self.t, self.d = int(k), int(t), int(d)
        self.perturb_scale, self.normalize_gates, self.seed = float(perturb_scale), bool(normalize_gates), int(seed)
        if self.trains_centroids:
            # Zeros until the adapter's routing layer initialises them (``reset_parameters``, after its own factors:
            # the order of random draws that adapters of earlier versions were made with).
            self.centroids = nn.Parameter(torch.zeros(self.k * self.t, self.d))
            # Saved with the adapter: 1 once data_aware_init ran (training an uncalibrated router is refused). uint8:
            # no cast of the model changes it, and every collective backend (gloo, NCCL) broadcasts it.
            self.register_buffer("calibrated", torch.tensor(0, dtype=torch.uint8))

    def settings(self) -> dict[str, Any]:
        """What rebuilds this router with ``make_router(**settings)`` (its tensors are in its state dict)."""
        return {
            "kind": self.kind,
            "k": self.k,
            "t": self.t,
            "d": self.d,
            "perturb_scale": self.perturb_scale,
            "normalize_gates": self.normalize_gates,
            "seed": self.seed,
        }

    def frozen_copy(self) -> TuckARouter:
        """A float32 copy on the CPU without gradients, for routing outside the model (export's calibration)."""
        copy = make_router(**self.settings())
        copy.load_state_dict(self.state_dict())
        return copy.requires_grad_(False)

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value}" for key, value in self.settings().items() if key != "kind")

    # --------------------------------------------------------------------------------------------- initialisation
    @torch.no_grad()
    def reset_parameters(self, random: bool) -> None:
        """Kaiming-uniform placeholder centroids until ``calibrate``; ``random`` (``init_weights=False``, for tests)
        also marks them calibrated so that a randomly initialised adapter trains as is."""
        if self.trains_centroids:
            nn.init.kaiming_uniform_(self.centroids, a=math.sqrt(5))
            self.calibrated.fill_(int(random))

    @torch.no_grad()
    def calibrate(self, e: torch.Tensor, seed: int, keep_centroids: bool = False) -> torch.Tensor | None:
        """DAI (paper Eq. 10) from the calibration centroid ``e`` (d,): set E (and e_bar) and mark the router
        calibrated; return the DAI matrix set (float32, CPU; None when none was). Deterministic for the same ``e``
        and ``seed`` on every rank and device. ``keep_centroids``: a resumed run, whose checkpoint holds the trained
        E: set only the frozen calibration state."""
        if not self.trains_centroids:
            return None
        self.calibrated.fill_(1)
        if keep_centroids:
            return None
        initial = self.initial_centroids(e, seed)
        self.centroids.copy_(initial.to(self.centroids.device, self.centroids.dtype))
        return initial

    def initial_centroids(self, e: torch.Tensor, seed: int) -> torch.Tensor | None:
        """E from the calibration centroid ``e`` (float32, CPU); None for a router without centroids."""
        raise NotImplementedError

    def check_calibrated(self, adapter_name: str) -> None:
        """Refuse to train centroids that data-aware initialisation never set (the case the paper shows collapses)."""
        if self.trains_centroids and not bool(self.calibrated):
            raise UncalibratedRouterError(
                f"TuckA adapter '{adapter_name}': its '{self.kind}' router is trained uncalibrated (Kaiming centroids"
                f"{', e_bar = 0' if self.degenerate_at_centre else ''}); calibrate it first: add "
                "tucka_llm.TuckACalibration(...) to the Trainer's callbacks, or call "
                "tucka_llm.data_aware_init(model, batches) before training."
            )

    def perturbations(self, rows: int, seed: int) -> torch.Tensor:
        """eps ~ U(-a, a), (rows, d), from a CPU generator seeded with ``seed`` (the same on every rank and device)."""
        generator = torch.Generator().manual_seed(seed)
        return (torch.rand(rows, self.d, generator=generator) * 2 - 1) * self.perturb_scale

    # --------------------------------------------------------------------------------------------- routing math
    def features(self, x: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """The routing feature h of each sequence, averaged (and centred) in float32 so that a bf16 run's features
        are exact."""
        return routing_features(x.float(), attention_mask)

    def logits(self, features: torch.Tensor, draw: tuple | list[tuple] = (0, 0)) -> torch.Tensor:
        """(n, d) features -> (n, k*t) expert logits; ``draw`` keys a random router's draw (or one per row)."""
        raise NotImplementedError

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """(n, k*t) logits -> (n, k, t) expert scores in (0, 1)."""
        return torch.sigmoid(F.normalize(logits.view(-1, self.k, self.t), dim=-1))

    def route(self, scores: torch.Tensor) -> ActiveRoute:
        """Paper Eqs. 7-8: the winning expert's group is active, gated by its experts' scores. No host sync."""
        group = scores.flatten(1).argmax(dim=-1) // self.t
        chosen = scores.gather(1, group.view(-1, 1, 1).expand(-1, 1, self.t)).squeeze(1)
        gates = chosen / chosen.sum(dim=-1, keepdim=True) if self.normalize_gates else chosen
        return ActiveRoute(group=group, gates=gates)

    def route_features(self, features: torch.Tensor, draw: tuple | list[tuple] = (0, 0)) -> ActiveRoute:
        """features (n, d) -> one route per row."""
        return self.route(self.scores(self.logits(features, draw)))

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
        check_gate_levels(levels)
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


class CentredRouter(TuckARouter):
    """logits E (h - e_bar); E = e_bar + eps for every row (unperturbed, every row would give an input the same
    score e_bar . (h - e_bar): eps is what tells the groups apart). e_bar is a float32 buffer that stays float32
    whatever the model is cast to: the centring must be exact in a bf16 run, and a saved float32 e_bar must load
    without a bf16 rounding."""

    kind = "centred"
    degenerate_at_centre = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer("center", torch.zeros(self.d))

    def _apply(self, fn: Any, recurse: bool = True) -> nn.Module:
        center = self.center
        super()._apply(fn, recurse)
        if self.center.dtype != torch.float32:  # a cast of the model (bf16, fp16) moves e_bar but keeps float32
            self.center = center.to(self.center.device, torch.float32)
        return self

    @torch.no_grad()
    def reset_parameters(self, random: bool) -> None:
        super().reset_parameters(random)
        if random and hasattr(self, "center"):
            self.center.copy_(torch.randn(self.d))

    @torch.no_grad()
    def calibrate(self, e: torch.Tensor, seed: int, keep_centroids: bool = False) -> torch.Tensor | None:
        self.center.copy_(e.float().to(self.center.device))
        return super().calibrate(e, seed, keep_centroids)

    def initial_centroids(self, e: torch.Tensor, seed: int) -> torch.Tensor:
        return e.float().cpu() + self.perturbations(self.k * self.t, seed)

    def logits(self, features: torch.Tensor, draw: tuple[int, int] = (0, 0)) -> torch.Tensor:
        return F.linear(features.float() - self.center.float(), self.centroids.float())


class DaiRouter(TuckARouter):
    """The paper's router: E = [e, e + eps_1, ...] from DAI once, logits E h. Features are averaged in E's dtype, as
    this router always did, so adapters trained with it route exactly as before."""

    kind = "dai"

    def initial_centroids(self, e: torch.Tensor, seed: int) -> torch.Tensor:
        e = e.float().cpu()
        return torch.cat([e.unsqueeze(0), e + self.perturbations(self.k * self.t - 1, seed)])

    def features(self, x: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        return routing_features(x.to(self.centroids.dtype), attention_mask)

    def logits(self, features: torch.Tensor, draw: tuple[int, int] = (0, 0)) -> torch.Tensor:
        return F.linear(features.to(self.centroids.dtype), self.centroids)


class RedrawRouter(TuckARouter):
    """The authors' published behaviour: E = [h, h + eps_1, ...] redrawn around each route's own feature at every
    forward, so E h = |h|^2 + [0, eps_1 h, ...]; nothing is trained or calibrated."""

    kind = "redraw"
    trains_centroids = False
    draws_routes = True

    def initial_centroids(self, e: torch.Tensor, seed: int) -> None:
        return None

    def logits(self, features: torch.Tensor, draw: tuple | list[tuple] = (0, 0)) -> torch.Tensor:
        """``draw`` keys one draw for all rows, or (a list) one draw per row: a sequence's own key."""
        h = features.float()
        if isinstance(draw, list):
            noise = torch.stack([self.redraw_noise(key) for key in draw]).to(features.device)  # (n, k*t, d)
            return (h * h).sum(dim=-1, keepdim=True) + torch.einsum("nd,ned->ne", h, noise)
        return (h * h).sum(dim=-1, keepdim=True) + F.linear(h, self.redraw_noise(draw).to(features.device))

    def redraw_noise(self, draw: tuple) -> torch.Tensor:
        """The perturbations of one forward: (k*t, d), first row 0, the rest U(-a, a), seeded by (seed, step,
        forward) so that the same step of a resumed run draws the same."""
        noise = self.perturbations(self.k * self.t - 1, _seed_of(self.seed, *draw))
        return torch.cat([torch.zeros(1, self.d), noise])


ROUTERS: dict[str, type[TuckARouter]] = {cls.kind: cls for cls in (CentredRouter, DaiRouter, RedrawRouter)}


def make_router(kind: str, **settings: Any) -> TuckARouter:
    """The router of design ``kind`` (one of ROUTERS) with ``settings`` (k, t, d, perturb_scale, ...)."""
    if kind not in ROUTERS:
        raise ValueError(f"Unknown TuckA router {kind!r}: use one of {', '.join(ROUTERS)}.")
    return ROUTERS[kind](**settings)


def _seed_of(*numbers: int) -> int:
    """A 63-bit generator seed that depends on every number (a stable hash, unlike Python's salted ``hash``)."""
    digest = hashlib.sha256(",".join(map(str, numbers)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


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
