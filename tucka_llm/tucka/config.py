"""TuckAConfig: the peft configuration of a TuckA adapter (method note, sections 1-3)."""

from __future__ import annotations

from dataclasses import dataclass, field

from peft.config import PeftConfig

from tucka_llm.tucka.registration import TUCKA_PEFT_TYPE


@dataclass
class TuckAConfig(PeftConfig):
    """Configuration of a TuckA adapter.

    Defaults are the paper's Llama-2-7B reference run (r16 k4 t2 p2, alpha 512, perturbation 20 on q_proj and
    v_proj); see ``shared/docs/tucka-method.md`` section 6.

    Args:
        r: rank of every expert (size of the subspace factor U, d x r).
        k: number of expert groups (one core tensor G_i each).
        t: number of experts per group (rows of the expert factor C).
        p: rank shared by the experts of a group (mode-1 size of the cores).
        alpha: scale of the update; large because every factor is divided by its Frobenius norm.
        perturb_scale: half-width ``a`` of the uniform perturbation of the data-aware centroid init.
        target_modules: names (or a regex) of the Linear layers to adapt; None uses peft's per-architecture default.
        exclude_modules: names (or a regex) of modules never to adapt.
        router_module: full name of the layer that routes for all others; None picks the first adapted layer and
            records it here so that a saved adapter reloads with the router in the same place.
    """

    r: int = field(default=16, metadata={"help": "Rank of every expert (U is d x r)."})
    k: int = field(default=4, metadata={"help": "Number of expert groups."})
    t: int = field(default=2, metadata={"help": "Number of experts in each group."})
    p: int = field(default=2, metadata={"help": "Rank shared by the experts of a group."})
    alpha: float = field(default=512.0, metadata={"help": "Scale of the (normalised) update."})
    perturb_scale: float = field(default=20.0, metadata={"help": "Half-width of the DAI centroid perturbation."})
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
        if self.perturb_scale < 0:
            raise ValueError(f"TuckAConfig: `perturb_scale` must be >= 0, got {self.perturb_scale!r}.")
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)

    @property
    def num_experts(self) -> int:
        """k * t: the number of centroids the router scores."""
        return self.k * self.t
