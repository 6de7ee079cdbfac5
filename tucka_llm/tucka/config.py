"""TuckAConfig: the peft configuration of a TuckA adapter (method note, sections 1-3)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

from peft.config import PeftConfig

from tucka_llm.tucka.registration import TUCKA_PEFT_TYPE
from tucka_llm.tucka.router import ROUTERS

logger = logging.getLogger("tucka_llm")

REFERENCE_ALPHA, REFERENCE_WIDTH = 512.0, 4096  # the paper's alpha, tuned for Llama-2-7B (input size 4096)


def width_scaled_alpha(width: int) -> float:
    """``alpha="auto"``: 512 * sqrt(d / 4096) for an adapted input size d (exactly 512 on Llama-2-7B, 192 at 576).

    U, C and G are each divided by their Frobenius norm, so the update alpha * x U M U^T changes x by about
    alpha / (r * sqrt(d)) relative to |x|: the paper's 512 is a 2.7x larger change on SmolLM2 (d = 576) than on
    Llama-2-7B, and damages the model at step 0 (docs/benchmarks.md). Scaling by sqrt(d / 4096) keeps the ratio.
    """
    return REFERENCE_ALPHA * math.sqrt(width / REFERENCE_WIDTH)


@dataclass
class TuckAConfig(PeftConfig):
    """Configuration of a TuckA adapter.

    Defaults are the paper's Llama-2-7B reference run (r16 k4 t2 p2, alpha "auto" = 512 there, perturbation 20 on
    q_proj and v_proj); see the method note (docs/method.md), section 6.

    Args:
        r: rank of every expert (size of the subspace factor U, d x r).
        k: number of expert groups (one core tensor G_i each).
        t: number of experts per group (rows of the expert factor C).
        p: rank shared by the experts of a group (mode-1 size of the cores).
        alpha: scale of the update; large because every factor is divided by its Frobenius norm. "auto" (default):
            ``width_scaled_alpha`` of the routing layer's input size, resolved (and saved) when the adapter is
            created.
        perturb_scale: half-width ``a`` of the uniform perturbation of the data-aware centroid init.
        router: "centred" (default), "dai" (the paper's design) or "redraw" (the authors' published code); see
            ``tucka_llm.tucka.routing``.
        normalize_gates: divide the gates by their sum (paper Eq. 8); False reproduces the authors' code.
        seed: seed of the redraw router's draws (training sets it to the run's --seed).
        init_weights: True (default): the authors' initialisation (every group starts from the same core) and a
            router that must be calibrated (``data_aware_init`` or ``TuckACalibration``) before it trains. False:
            peft's meaning, a random initialisation for tests: every core drawn on its own, the router random and
            counted as calibrated.
        target_modules: names (or a regex) of the Linear layers to adapt; None uses peft's per-architecture default.
        exclude_modules: names (or a regex) of modules never to adapt.
        router_module: full name of the layer that routes for all others; None picks the first adapted layer and
            records it here so that a saved adapter reloads with the router in the same place.
    """

    r: int = field(default=16, metadata={"help": "Rank of every expert (U is d x r)."})
    k: int = field(default=4, metadata={"help": "Number of expert groups."})
    t: int = field(default=2, metadata={"help": "Number of experts in each group."})
    p: int = field(default=2, metadata={"help": "Rank shared by the experts of a group."})
    alpha: float | str = field(
        default="auto", metadata={"help": "Scale of the (normalised) update; 'auto': 512 * sqrt(d / 4096)."}
    )
    perturb_scale: float = field(default=20.0, metadata={"help": "Half-width of the DAI centroid perturbation."})
    router: str = field(default="centred", metadata={"help": f"Router design: {', '.join(ROUTERS)}."})
    normalize_gates: bool = field(default=True, metadata={"help": "Gates divided by their sum (paper Eq. 8)."})
    seed: int = field(default=0, metadata={"help": "Seed of the redraw router's random draws."})
    init_weights: bool = field(
        default=True, metadata={"help": "The method's initialisation (True) or a random one, for tests (False)."}
    )
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Linear layers to adapt (names or a regex); None: peft's default."}
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Modules never to adapt (names or a regex)."}
    )
    router_module: str | None = field(
        default=None, metadata={"help": "Full name of the routing layer; None: the first adapted layer."}
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Extra modules trained in full and saved with the adapter."}
    )
    # peft's target matching reads these; TuckA adapts Linear modules only.
    target_parameters: list[str] | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = TUCKA_PEFT_TYPE
        for name in ("r", "k", "t", "p"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"TuckAConfig: `{name}` must be a positive integer, got {value!r}.")
        if not (math.isfinite(self.perturb_scale) and self.perturb_scale >= 0):
            raise ValueError(f"TuckAConfig: `perturb_scale` must be a finite number >= 0, got {self.perturb_scale!r}.")
        if self.alpha != "auto" and (
            isinstance(self.alpha, bool)
            or not isinstance(self.alpha, int | float)
            or not (math.isfinite(self.alpha) and self.alpha > 0)
        ):
            raise ValueError(f"TuckAConfig: `alpha` must be 'auto' or a finite number > 0, got {self.alpha!r}.")
        if self.router not in ROUTERS:
            raise ValueError(f"TuckAConfig: `router` must be one of {', '.join(ROUTERS)}, got {self.router!r}.")
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)

    @classmethod
    def check_kwargs(cls, **kwargs: Any) -> dict[str, Any]:
        """A saved config without ``router`` comes from before routers were configurable: it routed with DAI once
        and logits E h, gates normalised. Load it that way (so its outputs do not change), and say so once."""
        if "router" not in kwargs:
            kwargs = {**kwargs, "router": "dai", "normalize_gates": True}
            if not _legacy_noted:
                _legacy_noted.append(True)
                logger.warning(
                    "TuckA adapter saved without a `router` setting (tucka-llm before 0.2): loading it with the router "
                    "it was trained with, router='dai' (DAI once, logits E h) and normalize_gates=True."
                )
        return super().check_kwargs(**kwargs)

    @property
    def num_experts(self) -> int:
        """k * t: the number of centroids the router scores."""
        return self.k * self.t


_legacy_noted: list[bool] = []  # the old-adapter note is logged once per process
