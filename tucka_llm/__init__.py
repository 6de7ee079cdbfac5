"""tucka-llm: TuckA, LoRA and DoRA fine-tuning of LLMs with peft and DeepSpeed, merged export, vLLM evaluation.

``import tucka_llm`` registers TuckA with the installed peft, so ``peft.get_peft_model(model, TuckAConfig())``,
``save_pretrained`` and ``peft.PeftModel.from_pretrained`` work for TuckA adapters; ``TuckACalibration`` is the
callback that calibrates its router inside any ``transformers.Trainer`` (TRL's too).
"""

import logging
from importlib import metadata

# bitsandbytes (imported by peft) logs, on CPUs with AVX-512 BF16 and without the optional `kernels` package, that
# a faster CPU 4-bit kernel is unavailable, at import, before every command's own output; it then uses its own kernel,
# which is correct. Keep that line out of the way of our commands' one-line messages.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: "gemm_4bit_forward from kernels-community" not in record.getMessage()
)

from tucka_llm.tucka import (  # noqa: E402  (after the filter: importing peft imports bitsandbytes)
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

__version__ = "0.3.0"  # the one place of the version (pyproject.toml reads it)


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
