"""Routed serving of TuckA adapters by LoRA engines (vLLM): each prompt's route computed outside the model
(``PromptRouter``) and served by that route's LoRA adapter (``RoutedLoRA``, made by ``tucka export --format
lora``)."""

from tucka_llm.serving.prompt_router import PromptRouter, PromptRouterError
from tucka_llm.serving.routed_lora import DEFAULT_GATE_LEVELS, RoutedLoRA, RoutedLoRAError, route_name

__all__ = ["DEFAULT_GATE_LEVELS", "PromptRouter", "PromptRouterError", "RoutedLoRA", "RoutedLoRAError", "route_name"]
