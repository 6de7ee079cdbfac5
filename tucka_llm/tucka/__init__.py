"""TuckA as a native peft method: config, layer, tuner model, routing and data-aware initialisation."""

from tucka_llm.tucka.config import TuckAConfig
from tucka_llm.tucka.dai import data_aware_init
from tucka_llm.tucka.layer import TuckALayer
from tucka_llm.tucka.model import TuckAModel
from tucka_llm.tucka.registration import register_tucka
from tucka_llm.tucka.routing import ExpertLoad, Route, expert_load, routing

register_tucka(TuckAConfig, TuckAModel)

__all__ = [
    "ExpertLoad",
    "Route",
    "TuckAConfig",
    "TuckALayer",
    "TuckAModel",
    "data_aware_init",
    "expert_load",
    "routing",
]
