"""Generation backends: vLLM (default) and transformers ``generate`` (also for an unmerged adapter).

Both take the prompts of a chunk and return, per prompt, the completion text (stop string excluded, as vLLM
returns it), its number of generated tokens, why it ended, and for a TuckA adapter the route that served it. vLLM
serves adapters as LoRA adapters, one per request (``tucka_llm.serving``): a LoRA adapter as it is, a TuckA adapter
routed, each prompt by its route's adapter.
"""

from __future__ import annotations

import contextlib
import importlib.util
import typing
from dataclasses import dataclass
from pathlib import Path

import torch

from tucka_llm.errors import TuckaError
from tucka_llm.eval.reaper import end_descendants_at_exit
from tucka_llm.serving.requests import LoRARequests, RoutedRequests
from tucka_llm.tucka.layer import TuckALayer
from tucka_llm.tucka.model import last_routes, routing
from tucka_llm.tucka.routing import Route

BACKENDS = ("vllm", "hf")
CONTEXT_TOKENS = 5  # prompt tokens a completion is decoded after (vLLM's incremental detokenizer reads as many)


class EvalError(TuckaError):
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
    route: Route | None = None  # the TuckA route that served the prompt


def vllm_available() -> bool:
    """Whether vLLM is installed (found, not imported: importing it takes seconds)."""
    return importlib.util.find_spec("vllm") is not None


class VLLMBackend:
    """vLLM's offline engine over a merged (or any plain) checkpoint, or over a base model with ``adapters``: LoRA
    adapters chosen per prompt (``tucka_llm.serving.requests``). On a CPU, vLLM's CPU build."""

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
        adapters: LoRARequests | RoutedRequests | None = None,
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
        self.adapters = adapters
        if adapters is not None:
            settings |= dict(enable_lora=True, max_lora_rank=lora_rank(adapters.max_rank), max_loras=adapters.max_loras)
            settings["lora_target_modules"] = adapters.target_modules
        if torch.cuda.is_available():
            settings["gpu_memory_utilization"] = gpu_memory_utilization
            if kv_cache_gb is not None:
                settings["kv_cache_memory_bytes"] = int(kv_cache_gb * 1024**3)
        else:
            # On a CPU vLLM's default KV cache is a fraction of all RAM (once 20 GiB here): give it a size, and a
            # context that fits it (vLLM refuses an engine whose cache cannot hold one sequence of the model's full
            # length: Llama-2-7B's 4,096 tokens need 2 GiB).
            cache = int((kv_cache_gb or 1.0) * 1024**3)
            settings["kv_cache_memory_bytes"] = cache
            settings["enforce_eager"] = True
            if max_model_len is None:
                settings["max_model_len"] = context_in_cache(model, cache, dtype)
        self.watchdog = end_descendants_at_exit()  # vLLM's engine processes end with this process, even if killed
        self.llm = vllm.LLM(**settings)

    def generate(self, prompts: list[str], sampling: Sampling) -> list[Generation]:
        import vllm
        from vllm.lora.request import LoRARequest

        params = vllm.SamplingParams(
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_tokens=sampling.max_new_tokens,
            stop=list(sampling.stop),
            seed=sampling.seed,
        )
        if self.adapters is None:
            outputs = self.llm.generate(prompts, params, use_tqdm=False)
            served = [None] * len(prompts)
        else:  # routed on the very token ids that are served
            tokenizer = self.llm.get_tokenizer()
            token_ids = [tokenizer.encode(prompt) for prompt in prompts]
            served = self.adapters.requests(token_ids)
            requests = [LoRARequest(a.name, a.int_id, str(a.path)) for a in served]
            inputs = [{"prompt_token_ids": ids} for ids in token_ids]
            outputs = self.llm.generate(inputs, params, use_tqdm=False, lora_request=requests)
        return [
            Generation(
                o.outputs[0].text,
                len(o.outputs[0].token_ids),
                "length" if o.outputs[0].finish_reason == "length" else "stop",
                None if adapter is None else adapter.route,
            )
            for o, adapter in zip(outputs, served, strict=True)
        ]


def context_in_cache(model: str, cache_bytes: int, dtype: str) -> int | None:
    """The longest context whose keys and values fit ``cache_bytes`` (with vLLM's reserve, about 10%), at most the
    model's own; None (vLLM's default) for a model whose config does not say its attention sizes."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model)
    try:
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        layers, longest = config.num_hidden_layers, config.max_position_embeddings
    except AttributeError:
        return None
    width = torch.finfo(config.dtype if dtype == "auto" and config.dtype else getattr(torch, dtype, torch.float16)).bits
    per_token = 2 * layers * heads * head_dim * width // 8  # keys and values
    return min(longest, int(0.9 * cache_bytes / per_token) // 16 * 16)


def lora_rank(rank: int) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that holds adapters of rank ``rank``."""
    from vllm.config.lora import MaxLoRARanks

    accepted = [r for r in typing.get_args(MaxLoRARanks) if r >= rank]
    if not accepted:
        raise EvalError(f"--adapter: rank {rank} is above the largest LoRA rank vLLM serves; evaluate it merged.")
    return min(accepted)


class HFBackend:
    """transformers ``generate`` in batches with left padding; with ``adapter``, a peft adapter left unmerged.

    A TuckA adapter routes per sequence here (its eval-mode default), from the prompt's real tokens only, and holds
    that route for every decode step: a problem's answer never depends on its batch neighbours. ``gate_levels``
    quantises its gates as routed serving does (``tucka_llm.routing``); None keeps them exact.
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
        gate_levels: int | None = None,
    ) -> None:
        from tucka_llm.loading import load_base_model, load_checked_adapter, load_tokenizer, tokenizer_source

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.batch_size = batch_size
        self.tokenizer = load_tokenizer(tokenizer_source(adapter, model), "--model")
        self.tokenizer.padding_side = "left"
        torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
        network = load_base_model(model, "--model", torch_dtype).to(self.device)
        non_finite = [name for name, p in network.named_parameters() if not bool(torch.isfinite(p).all())]
        if non_finite:
            raise EvalError(
                f"--model {model}: {len(non_finite)} weights hold NaN or inf values ({', '.join(non_finite[:3])}); "
                "evaluate a model whose training and export finished cleanly."
            )
        if adapter is not None:
            network = load_checked_adapter(network, Path(adapter), "--model")
        self.model = network.eval()
        self.routed = any(isinstance(module, TuckALayer) for module in network.modules())
        self.gate_levels = gate_levels

    @torch.no_grad()
    def generate(self, prompts: list[str], sampling: Sampling) -> list[Generation]:
        results: list[Generation] = []
        with routing(self.model, "sequence", self.gate_levels) if self.routed else contextlib.nullcontext():
            for start in range(0, len(prompts), self.batch_size):
                results += self._generate_batch(prompts[start : start + self.batch_size], sampling, start)
        return results

    def _generate_batch(self, prompts: list[str], sampling: Sampling, start: int) -> list[Generation]:
        """One ``generate`` call; ``start`` (the batch's first prompt) seeds sampling."""
        batch = self.tokenizer(prompts, return_tensors="pt", padding=True).to(self.device)
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
        routes = last_routes(self.model) if self.routed else [None] * len(prompts)  # the prefill's, held
        width = batch["input_ids"].shape[1]
        contexts = batch["input_ids"][:, width - CONTEXT_TOKENS :].tolist()  # left padding: the prompts' ends
        rows = output[:, width:].tolist()
        return [self._completion(*row, sampling) for row in zip(contexts, rows, routes, strict=True)]

    def _completion(self, context: list[int], tokens: list[int], route: Route | None, sampling: Sampling) -> Generation:
        """Cut at EOS (finished rows are padded with it) and before the first stop string, as vLLM does; decoded
        after the prompt's last tokens ``context``, as vLLM's detokenizer does: a SentencePiece tokenizer decoding
        the completion alone drops the space before its first word ("Note" where vLLM gives " Note")."""
        eos = self.tokenizer.eos_token_id
        ended = eos in tokens
        if ended:
            tokens = tokens[: tokens.index(eos) + 1]
        prefix = self.tokenizer.decode(context, skip_special_tokens=True)  # padding is special: skipped
        text = self.tokenizer.decode(context + tokens, skip_special_tokens=True)
        if text.startswith(prefix):
            text = text[len(prefix) :]
        else:  # the context does not decode on its own (a character split across tokens): decode alone
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        cuts = [text.find(stop) for stop in sampling.stop if stop in text]
        if cuts:
            return Generation(text[: min(cuts)], len(tokens), "stop", route)
        return Generation(text, len(tokens), "stop" if ended else "length", route)
