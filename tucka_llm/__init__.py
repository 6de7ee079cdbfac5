"""tucka-llm: TuckA, LoRA and DoRA fine-tuning of LLMs with peft and DeepSpeed, merged export, vLLM evaluation.

``import tucka_llm`` registers TuckA with the installed peft, so ``peft.get_peft_model(model, TuckAConfig())``,
``save_pretrained`` and ``peft.PeftModel.from_pretrained`` work for TuckA adapters; ``TuckACalibration`` is the
callback that calibrates its router inside any ``transformers.Trainer`` (TRL's too).
"""

from importlib import metadata

from tucka_llm.tucka import (
    ExpertLoad,
    Route,
    RouteMixture,
    TuckACalibration,
    TuckAConfig,
    TuckALayer,
    TuckAModel,
    UncalibratedRouterError,
    data_aware_init,
    expert_load,
    routing,
)

__version__ = "0.2.0"


def package_versions(*packages: str) -> dict[str, str]:
    """This project's version and those of ``packages`` that are installed, for the records runs leave behind."""
    found = {"tucka_llm": __version__}
    for package in packages:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return found


__all__ = [
    "ExpertLoad",
    "Route",
    "RouteMixture",
    "TuckACalibration",
    "TuckAConfig",
    "TuckALayer",
    "TuckAModel",
    "UncalibratedRouterError",
    "__version__",
    "data_aware_init",
    "expert_load",
    "package_versions",
    "routing",
]
