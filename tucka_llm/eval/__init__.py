"""Evaluation on GSM8K and MATH: problems, generation (vLLM or transformers), scoring, resumable runs."""

from tucka_llm.eval.scoring import extract_answer, extract_answer_with_rule, is_correct

__all__ = ["extract_answer", "extract_answer_with_rule", "is_correct"]
