"""Export: fold a TuckA, LoRA or DoRA adapter into a plain checkpoint that transformers and vLLM load."""

from tucka_llm.export.merge import DTYPES, ExportResult, export_merged
from tucka_llm.export.route import ChosenRoute, ExportError, RouteSpec

__all__ = ["DTYPES", "ChosenRoute", "ExportError", "ExportResult", "RouteSpec", "export_merged"]
