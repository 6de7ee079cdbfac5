"""Export: fold a TuckA, LoRA or DoRA adapter into a plain checkpoint that transformers and vLLM load
(``export_merged``), or convert a TuckA adapter into per-route LoRA adapters for routed serving (``export_lora``)."""

from tucka_llm.export.lora import LoraExportResult, export_lora
from tucka_llm.export.merge import DTYPES, ExportResult, export_merged
from tucka_llm.export.route import ChosenRoute, ExportError, RouteSpec

__all__ = [
    "DTYPES",
    "ChosenRoute",
    "ExportError",
    "ExportResult",
    "LoraExportResult",
    "RouteSpec",
    "export_lora",
    "export_merged",
]
