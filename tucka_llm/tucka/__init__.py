"""TuckA as a native peft method: config, layer, tuner model, routing and data-aware initialisation."""

from tucka_llm.tucka.calibration import TuckACalibration
from tucka_llm.tucka.config import TuckAConfig
from tucka_llm.tucka.dai import data_aware_init
from tucka_llm.tucka.layer import TuckALayer
from tucka_llm.tucka.model import TuckAModel, expert_load, routing
from tucka_llm.tucka.registration import register_tucka
from tucka_llm.tucka.router import ROUTERS, TuckARouter, UncalibratedRouterError, make_router
from tucka_llm.tucka.routing import ExpertLoad, Route, RouteMixture

register_tucka(TuckAConfig, TuckAModel)

__all__ = [
    "ROUTERS",
    "ExpertLoad",
    "Route",
    "RouteMixture",
    "TuckACalibration",
    "TuckAConfig",
    "TuckALayer",
    "TuckAModel",
    "TuckARouter",
    "UncalibratedRouterError",
    "data_aware_init",
    "expert_load",
    "make_router",
    "routing",
]
