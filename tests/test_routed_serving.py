"""Routed serving: a TuckA adapter as per-route LoRA adapters (tucka export --format lora), exact layer by layer;
the served routes' gate quantisation; the prompt router outside the model; what cannot be converted is refused."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import peft
import pytest
import torch
from conftest import PROMPTS, TUCKA_CONFIG, save_adapter
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import tucka_llm
from tucka_llm.cli import main as tucka_main
from tucka_llm.eval import backends
from tucka_llm.eval.backends import EvalError
from tucka_llm.eval.problems import load_problems
from tucka_llm.eval.run import EvalOptions, evaluate
from tucka_llm.export import ExportError, export_lora
from tucka_llm.serving import RoutedLoRA, route_name
from tucka_llm.serving.requests import RoutedRequests
from tucka_llm.serving.routed_lora import RoutedLoRAError
from tucka_llm.tucka.dai import routing_layers
from tucka_llm.tucka.model import last_routes, routing
from tucka_llm.tucka.router import gate_range, make_router
from tucka_llm.tucka.routing import ActiveRoute, Route

LEVELS = 5


@pytest.fixture(scope="module")
def routed_export(adapters, tmp_path_factory) -> Path:
    """The calibrated TuckA adapter of ``adapters`` exported as routed LoRA adapters."""
    out = tmp_path_factory.mktemp("routed") / "lora"
    export_lora(adapters["tucka"], out, gate_levels=LEVELS)
    return out


def tucka_model(tiny_model: Path, adapter: Path) -> peft.PeftModel:
    return peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), adapter).eval()


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm())


def test_each_converted_lora_layer_gives_the_tucka_layer_output_under_its_route(routed_export, adapters, tiny_model):
    model, routed = tucka_model(tiny_model, adapters["tucka"]), RoutedLoRA(routed_export)
    torch.manual_seed(0)
    routes = [Route(g, gates) for g in range(3) for gates in ([0.3222658, 0.6777342], [0.5, 0.5], [0.6, 0.4])]
    layers = {n: m for n, m in model.get_base_model().named_modules() if isinstance(m, tucka_llm.TuckALayer)}
    assert len(layers) == 4
    for route in routes:
        weights = load_file(routed.adapter(route) / "adapter_model.safetensors")
        assert len(weights) == 2 * len(layers)
        with routing(model, route), torch.no_grad():
            for name, layer in layers.items():
                x = torch.randn(2, 5, layer.in_features)
                expected = layer(x)  # the routing layer takes the fixed route too
                a = weights[f"base_model.model.{name}.lora_A.weight"]
                b = weights[f"base_model.model.{name}.lora_B.weight"]
                assert a.shape == (TUCKA_CONFIG["r"], layer.in_features)
                lora = layer.get_base_layer()(x) + (x @ a.t()) @ b.t()
                assert relative_error(lora, expected) <= 1e-5, (route, name)


def test_a_route_adapter_is_a_peft_lora_adapter_that_gives_the_routed_tucka_model(
    routed_export, adapters, tiny_model, tokenizer
):
    route = Route(1, [0.4111329, 0.5888671])
    path = RoutedLoRA(routed_export).adapter(route)
    config = peft.PeftConfig.from_pretrained(str(path))
    assert isinstance(config, peft.LoraConfig) and config.r == config.lora_alpha == TUCKA_CONFIG["r"]
    assert json.loads((path / "tucka_route.json").read_text())["group"] == 1 and path.name == route_name(route)
    lora = tucka_model(tiny_model, path)
    tucka = tucka_model(tiny_model, adapters["tucka"])
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad(), routing(tucka, route):
        expected = tucka(**batch).logits
    with torch.no_grad():
        assert relative_error(lora(**batch).logits, expected) <= 1e-5


def test_quantised_gates_take_the_levels_of_the_reachable_range_and_sum_to_one():
    low, high = gate_range(2, True)
    unit = torch.nn.functional.normalize(torch.randn(20000, 2, dtype=torch.float64), dim=-1)
    gates = torch.sigmoid(unit) / torch.sigmoid(unit).sum(dim=-1, keepdim=True)
    assert low <= float(gates.min()) + 1e-9 and float(gates.max()) <= high + 1e-9
    assert float(gates.min()) - low < 1e-4 and high - float(gates.max()) < 1e-4  # the range is reached
    router = make_router("centred", k=3, t=2, d=8, perturb_scale=1.0)
    route = ActiveRoute(torch.zeros(len(gates), dtype=torch.long), gates.float())
    for levels in (1, 2, LEVELS):
        served = router.quantise(route, levels).gates.double()
        grid = torch.linspace(low, high, levels, dtype=torch.float64) if levels > 1 else torch.full((1,), 0.5).double()
        assert torch.allclose(served.sum(dim=-1), torch.ones(len(gates), dtype=torch.float64))
        distance = (served[:, :1] - grid).abs()
        assert float(distance.min(dim=-1).values.max()) < 1e-6  # on the grid
        nearest = grid[(gates[:, :1] - grid).abs().argmin(dim=-1)]
        assert torch.allclose(served[:, 0], nearest, atol=1e-6)
        assert len({round(g, 6) for g in served[:, 0].tolist()}) == levels
    assert router.quantise(route, 1).gates.unique().tolist() == [0.5]


class RouteTaken(Exception):
    pass


def stop_forward(*args: object) -> None:
    raise RouteTaken


def test_prompt_router_gives_the_adapters_sequence_routes_for_every_gsm8k_test_prompt(
    routed_export, adapters, tiny_model, tokenizer
):
    options = EvalOptions(task="gsm8k", model=str(tiny_model), data="gsm8k")
    prompts = [options.prompt(p.question) for p in load_problems("gsm8k", "gsm8k")]
    assert len(prompts) == 1319
    router = RoutedLoRA(routed_export).prompt_router()
    router.gate_levels = None  # exact gates first
    ids = [tokenizer(prompt)["input_ids"] for prompt in prompts]
    outside = router.routes(ids)

    model = tucka_model(tiny_model, adapters["tucka"])
    (routing_layer,) = routing_layers(model).values()
    stop = routing_layer.register_forward_hook(stop_forward)  # the route is taken: the rest of the model is not needed
    tokenizer.padding_side = "left"
    inside: list[Route] = []
    with torch.no_grad(), routing(model, "sequence"):
        for start in range(0, len(prompts), 64):
            batch = tokenizer(prompts[start : start + 64], return_tensors="pt", padding=True)
            with contextlib.suppress(RouteTaken):
                model(**batch)
            inside += last_routes(model)
    stop.remove()
    assert [r.group for r in outside] == [r.group for r in inside]
    gates = torch.tensor([r.gates for r in outside]), torch.tensor([r.gates for r in inside])
    assert float((gates[0] - gates[1]).abs().max()) < 1e-5
    assert len({r.group for r in inside}) == 3  # the prompts spread over the groups: the check can tell

    def served(routes: list[Route]) -> list[Route]:
        active = ActiveRoute(torch.tensor([r.group for r in routes]), torch.tensor([r.gates for r in routes]))
        quantised = router.router.quantise(active, LEVELS)
        return [Route(g, q) for g, q in zip(quantised.group.tolist(), quantised.gates.tolist(), strict=True)]

    assert served(outside) == served(inside)


def test_export_writes_the_calibration_routes_a_manifest_and_the_router(routed_export, adapters):
    manifest = json.loads((routed_export / "manifest.json").read_text())
    assert manifest["format"] == "tucka-routed-lora" and manifest["gate_levels"] == LEVELS
    assert manifest["adapter"] == str(adapters["tucka"].resolve()) and manifest["lora"]["r"] == TUCKA_CONFIG["r"]
    adapted = [f"model.layers.{i}.self_attn.{name}" for i in (0, 1) for name in ("q_proj", "v_proj")]
    assert manifest["lora"]["modules"] == adapted
    router = manifest["router"]
    assert router["kind"] == "centred" and router["module"] == "model.layers.0.self_attn.q_proj"
    assert router["inputs"] == {"embedding": "model.embed_tokens", "norm": "model.layers.0.input_layernorm"}
    routes = manifest["routes"]
    assert sum(r["calibration_sequences"] for r in routes) == 32  # the sample training recorded
    assert len({r["group"] for r in routes}) >= 2
    for record in routes:
        assert (routed_export / "routes" / record["name"] / "adapter_model.safetensors").is_file()
        assert math.isclose(sum(record["gates"]), 1.0, rel_tol=1e-6)
    modules = RoutedLoRA(routed_export).lora_modules()  # for vllm serve --lora-modules
    assert {r["name"] for r in routes} <= {m.split("=")[0] for m in modules}
    assert all(Path(m.split("=")[1]).is_dir() for m in modules)
    router_tensors = load_file(routed_export / "router" / "router.safetensors")
    assert set(router_tensors) == {"embedding.weight", "norm.weight", "centroids", "center"}


def test_the_engine_gets_a_slot_for_every_route_that_can_occur_sized_from_the_adapter(routed_export, tiny_model):
    """vLLM holds max_loras adapters at once; with fewer slots than routes a long evaluation swaps adapters."""
    routed = RoutedLoRA(routed_export)
    served = RoutedRequests(routed, routed.prompt_router())
    assert served.max_loras == TUCKA_CONFIG["k"] * LEVELS  # t = 2, normalised gates: one free gate per group
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    adapted = [m for name, m in base.named_modules() if name.endswith(("q_proj", "v_proj"))]
    assert served.slot_bytes == TUCKA_CONFIG["r"] * sum(m.in_features + m.out_features for m in adapted) * 2


def test_the_command_line_exports_routed_lora_and_refuses_merged_only_flags(adapters, tmp_path, capsys):
    out = tmp_path / "lora"
    tucka_main(
        ["export", "--adapter", str(adapters["tucka"]), "--out", str(out), "--format", "lora", "--gate-levels", "3"]
    )
    assert "route adapters" in capsys.readouterr().out
    assert json.loads((out / "manifest.json").read_text())["gate_levels"] == 3
    refusals = {
        ("--format", "lora", "--route", "majority"): "--route applies to --format merged only",
        ("--format", "lora", "--dtype", "float16"): "--dtype applies to --format merged only",
        ("--format", "lora", "--gate-levels", "0"): "--gate-levels 0: give an integer from 1",
        ("--gate-levels", "3",): "--gate-levels applies to --format lora",
    }  # fmt: skip
    for flags, message in refusals.items():
        with pytest.raises(SystemExit, match=message):
            tucka_main(["export", "--adapter", str(adapters["tucka"]), "--out", str(tmp_path / "x"), *flags])
    assert not (tmp_path / "x").exists()


def test_what_cannot_be_served_as_routed_lora_is_refused(adapters, tiny_model, tokenizer, tmp_path):
    with pytest.raises(ExportError, match="holds a LoRA adapter, which LoRA engines serve as it is"):
        export_lora(adapters["lora"], tmp_path / "a")
    with pytest.raises(ExportError, match="holds a DoRA adapter, which vLLM cannot serve: export it merged"):
        export_lora(adapters["dora"], tmp_path / "a")
    redraw = tucka_llm.TuckAConfig(**TUCKA_CONFIG | {"router": "redraw"}, task_type="CAUSAL_LM")
    save_adapter(tmp_path / "redraw", tiny_model, redraw, tokenizer)
    with pytest.raises(ExportError, match="redraw router, whose routes are random draws"):
        export_lora(tmp_path / "redraw", tmp_path / "a")
    late = tucka_llm.TuckAConfig(**TUCKA_CONFIG | {"layers_to_transform": [1]}, task_type="CAUSAL_LM")
    save_adapter(tmp_path / "late", tiny_model, late, tokenizer)
    with pytest.raises(RoutedLoRAError, match=r"routes at 'model.layers.1.self_attn.q_proj', whose input is not"):
        export_lora(tmp_path / "late", tmp_path / "a", calibration_data="gsm8k-train", calibration_samples=8)
    assert not (tmp_path / "a").exists()


def read_responses(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "responses.jsonl").read_text().splitlines()]


def evaluate_both(adapter: Path, tiny_model: Path, output: Path, limit: int, **settings) -> dict[str, tuple]:
    """The same evaluation on vLLM (in this process: its engine starts in seconds) and on hf."""
    runs = {}
    for backend in ("vllm", "hf"):
        options = EvalOptions(
            task="gsm8k", model=str(tiny_model), adapter=str(adapter), data="gsm8k", limit=limit, backend=backend,
            max_new_tokens=12, dtype="float32", batch_size=limit, output=str(output / backend), **settings,
        )  # fmt: skip
        runs[backend] = evaluate(options), read_responses(output / backend)
    return runs


@pytest.mark.skipif(not backends.vllm_available(), reason="the eval-cpu extra installs vLLM's CPU build")
def test_vllm_routed_and_hf_unmerged_evaluations_record_the_same_routes_and_greedy_completions(
    adapters, tiny_model, tmp_path, monkeypatch
):
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    runs = evaluate_both(adapters["tucka"], tiny_model, tmp_path, 12, gate_levels=LEVELS)
    (vllm_summary, vllm_records), (hf_summary, hf_records) = runs["vllm"], runs["hf"]
    assert [r["route"] for r in vllm_records] == [r["route"] for r in hf_records]
    assert [r["completion"] for r in vllm_records] == [r["completion"] for r in hf_records]
    assert all(r["tokens"] > 0 for r in vllm_records)
    assert len({r["route"]["group"] for r in vllm_records}) >= 2  # routed: a merged model could not do this
    load = vllm_summary["group_load"]
    assert load == hf_summary["group_load"] and sum(load["counts"]) == 12 and len(load["counts"]) == 3
    assert vllm_summary["gate_levels"] == hf_summary["gate_levels"] == LEVELS
    made = sorted(p.name for p in (tmp_path / "vllm" / "routed_lora" / "routes").iterdir())
    assert made == sorted({route_name(Route(**r["route"])) for r in vllm_records})
    assert len(made) == load["distinct_routes"]


@pytest.mark.skipif(not backends.vllm_available(), reason="the eval-cpu extra installs vLLM's CPU build")
def test_vllm_serves_a_lora_adapter_as_it_is_and_refuses_dora_pointing_to_merged_export(
    adapters, tiny_model, tmp_path, monkeypatch
):
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    runs = evaluate_both(adapters["lora"], tiny_model, tmp_path, 4)
    assert [r["completion"] for r in runs["vllm"][1]] == [r["completion"] for r in runs["hf"][1]]
    assert "route" not in runs["vllm"][1][0] and "group_load" not in runs["vllm"][0]
    options = EvalOptions(task="gsm8k", model=str(tiny_model), adapter=str(adapters["dora"]), data="gsm8k")
    with pytest.raises(EvalError, match=r"DoRA adapter, which vLLM cannot serve: export it merged \(tucka export "):
        evaluate(options)
    options.adapter, options.gate_levels = str(adapters["lora"]), 3
    with pytest.raises(EvalError, match=r"--gate-levels applies to TuckA adapters; .* holds a lora adapter"):
        evaluate(options)
