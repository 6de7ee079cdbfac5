"""Generation backends: vLLM (default) and transformers ``generate`` (also for an unmerged adapter).

Both take the prompts of a chunk and return, per prompt, the completion text (stop string excluded, as vLLM
returns it), its number of generated tokens, and why it ended.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer

from tucka_llm.data import tokenizer_source
from tucka_llm.eval.reaper import end_descendants_at_exit

BACKENDS = ("vllm", "hf")


class EvalError(ValueError):
    """An evaluation that cannot run as asked; the message names the flag or file to change."""


@dataclass(frozen=True)
class Sampling:
    """Decoding settings, recorded in the summary. Greedy when ``temperature`` is 0."""

    max_new_tokens: int
    stop: tuple[str, ...]
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0


@dataclass(frozen=True)
class Generation:
    text: str
    tokens: int
    finish_reason: str  # "stop" (EOS or a stop string) or "length"


def vllm_available() -> bool:
    """Whether vLLM is installed (found, not imported: importing it takes seconds)."""
    return importlib.util.find_spec("vllm") is not None


class VLLMBackend:
    """vLLM's offline engine over a merged (or any plain) checkpoint; on a CPU, vLLM's CPU build."""

    name = "vllm"

    def __init__(
        self,
        model: str,
        *,
        dtype: str = "auto",
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.9,
        max_model_len: int | None = None,
        kv_cache_gb: float | None = None,
        seed: int = 0,
    ) -> None:
        if not vllm_available():
            raise EvalError(
                "--backend vllm: vLLM is not installed. Install it (CPU: pip install -e '.[eval-cpu]'; GPU: "
                "pip install -e '.[eval-gpu]'), or pass --backend hf."
            )
        try:
            import vllm
        except ImportError as error:
            raise EvalError(f"--backend vllm: vLLM is installed but does not import ({error}).") from error

        settings = dict(model=model, dtype=dtype, tensor_parallel_size=tensor_parallel_size, seed=seed)
        settings["max_model_len"] = max_model_len
        if torch.cuda.is_available():
            settings["gpu_memory_utilization"] = gpu_memory_utilization
            if kv_cache_gb is not None:
                settings["kv_cache_memory_bytes"] = int(kv_cache_gb * 1024**3)
        else:
            # On a CPU vLLM's default KV cache is a fraction of all RAM (once 20 GiB here): give it a size.
            settings["kv_cache_memory_bytes"] = int((kv_cache_gb or 1.0) * 1024**3)
            settings["enforce_eager"] = True
        self.watchdog = end_descendants_at_exit()  # vLLM's engine processes end with this process, even if killed
        self.llm = vllm.LLM(**settings)

    def generate(self, prompts: list[str], sampling: Sampling) -> list[Generation]:
        import vllm

        params = vllm.SamplingParams(
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_tokens=sampling.max_new_tokens,
            stop=list(sampling.stop),
            seed=sampling.seed,
        )
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return [
            Generation(
                o.outputs[0].text,
                len(o.outputs[0].token_ids),
                "length" if o.outputs[0].finish_reason == "length" else "stop",
            )
            for o in outputs
        ]


class HFBackend:
    """transformers ``generate`` in batches with left padding; with ``adapter``, a peft adapter left unmerged.

    A TuckA adapter routes per sequence here (its eval-mode default), from the prompt's real tokens only, and holds
    that route for every decode step: a problem's answer never depends on its batch neighbours.
    """

    name = "hf"

    def __init__(
        self,
        model: str,
        *,
        adapter: str | None = None,
        dtype: str = "auto",
        batch_size: int = 8,
        device: str | None = None,
    ) -> None:
        from tucka_llm.adapter_loading import AdapterLoadError, load_checked_adapter

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.batch_size = batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_source(adapter, model))
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
        try:
            network = AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype).to(self.device)
        except (OSError, SafetensorError) as error:  # SafetensorError: a truncated or corrupt weights file
            raise EvalError(f"--model {model}: could not load it ({' '.join(str(error).split())}).") from error
        non_finite = [name for name, p in network.named_parameters() if not bool(torch.isfinite(p).all())]
        if non_finite:
            raise EvalError(
                f"--model {model}: {len(non_finite)} weights hold NaN or inf values ({', '.join(non_finite[:3])}); "
                "evaluate a model whose training and export finished cleanly."
            )
        if adapter is not None:
            try:
                network = load_checked_adapter(network, Path(adapter), "--model")
            except AdapterLoadError as error:
                raise EvalError(str(error)) from error
        self.model = network.eval()

    @torch.no_grad()
    def generate(self, prompts: list[str], sampling: Sampling) -> list[Generation]:
        results: list[Generation] = []
        for start in range(0, len(prompts), self.batch_size):
            batch = self.tokenizer(prompts[start : start + self.batch_size], return_tensors="pt", padding=True)
            batch = batch.to(self.device)
            greedy = sampling.temperature == 0
            if not greedy:
                torch.manual_seed(sampling.seed + start)
            output = self.model.generate(
                **batch,
                max_new_tokens=sampling.max_new_tokens,
                do_sample=not greedy,
                temperature=None if greedy else sampling.temperature,
                top_p=None if greedy else sampling.top_p,
                stop_strings=list(sampling.stop) or None,
                tokenizer=self.tokenizer,
                pad_token_id=self.tokenizer.pad_token_id,
            )
            for row in output[:, batch["input_ids"].shape[1] :].tolist():
                results.append(self._completion(row, sampling))
        return results

    def _completion(self, tokens: list[int], sampling: Sampling) -> Generation:
        """Cut at EOS (finished rows are padded with it) and before the first stop string, as vLLM does."""
        eos = self.tokenizer.eos_token_id
        ended = eos in tokens
        if ended:
            tokens = tokens[: tokens.index(eos) + 1]
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        cuts = [text.find(stop) for stop in sampling.stop if stop in text]
        if cuts:
            return Generation(text[: min(cuts)], len(tokens), "stop")
        return Generation(text, len(tokens), "stop" if ended else "length")
