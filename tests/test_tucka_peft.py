"""TuckA as a peft method: registration, save/load, parameter counts on the meta device, merging, clear errors."""

from __future__ import annotations

import json

import bitsandbytes as bnb
import peft
import pytest
import torch
from conftest import TUCKA_CONFIG, tiny_llama, tucka_llama
from transformers import AutoModelForCausalLM, LlamaForCausalLM

import tucka_llm
from tucka_llm.loading import quantization_config
from tucka_llm.models import llama2_7b_config
from tucka_llm.tucka.dai import routers
from tucka_llm.tucka.model import routing_states


def test_save_and_load_round_trip_gives_identical_logits_and_keeps_centroids(batch, tmp_path):
    model = tucka_llama(seed=6)
    tucka_llm.data_aware_init(model, [batch], seed=3)
    with torch.no_grad():  # stand-in for training: every factor moves away from its initial value
        for name, param in model.named_parameters():
            if "tucka_" in name:
                param.add_(0.01 * torch.randn_like(param))
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if "tucka_" in n}
    with torch.no_grad():
        expected = model(**batch).logits
    model.save_pretrained(tmp_path)

    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "TUCKA"
    assert saved["router_module"] == "model.layers.0.self_attn.q_proj"
    assert (tmp_path / "adapter_model.safetensors").is_file()

    loaded = peft.PeftModel.from_pretrained(tiny_llama(seed=6), tmp_path).eval()
    assert isinstance(loaded.peft_config["default"], tucka_llm.TuckAConfig)
    for name, param in loaded.named_parameters():
        if "tucka_" in name:
            assert torch.equal(param, trained[name]), name
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, expected)


def test_registration_uses_the_unmodified_peft():
    assert peft.PeftType.TUCKA.value == "TUCKA"
    assert peft.mapping.PEFT_TYPE_TO_TUNER_MAPPING["TUCKA"] is tucka_llm.TuckAModel
    assert peft.PeftConfig.from_peft_type(peft_type="TUCKA", r=8).r == 8


@pytest.mark.parametrize(
    "config, expected",
    [
        (tucka_llm.TuckAConfig(r=16, k=4, t=2, p=2, target_modules=["q_proj", "v_proj"]), 4_358_400),
        (peft.LoraConfig(r=32, lora_alpha=32, target_modules=["q_proj", "v_proj"]), 16_777_216),
        (peft.LoraConfig(r=32, lora_alpha=32, use_dora=True, target_modules=["q_proj", "v_proj"]), 17_039_360),
    ],
    ids=["tucka-r16-k4-t2-p2", "lora-r32", "dora-r32"],
)
def test_llama2_7b_trainable_parameters_counted_on_the_meta_device(config, expected):
    with torch.device("meta"):
        base = LlamaForCausalLM(llama2_7b_config())
    model = peft.get_peft_model(base, config)
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == expected
    assert all(p.device.type == "meta" for p in model.parameters())


def test_merge_under_a_fixed_route_equals_the_adapter_model(batch):
    model = tucka_llama(seed=8)
    route = tucka_llm.Route(2, [0.6, 0.4])
    with tucka_llm.routing(model, route), torch.no_grad():
        expected = model(**batch).logits
        merged = model.merge_and_unload()
    assert not any(isinstance(m, tucka_llm.TuckALayer) for m in merged.modules())
    with torch.no_grad():
        actual = merged(**batch).logits
    assert (actual - expected).norm() / expected.norm() <= 1e-5


def test_tucka_wraps_a_4bit_linear_as_it_wraps_a_linear_and_refuses_to_merge_into_it(tiny_model, batch):
    """On a base quantised by bitsandbytes (NF4), the update is applied to the layer's input as on a Linear: the same
    adapter (same init, same DAI) gives the logits it gives on a plain base holding the dequantised weights. A merge
    needs full-precision weights, and says so."""
    quantized = AutoModelForCausalLM.from_pretrained(
        tiny_model, quantization_config=quantization_config(torch.float32), device_map="cpu"
    )
    plain = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if isinstance(module, bnb.nn.Linear4bit):
                weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
                plain.get_submodule(name).weight.copy_(weight)
    models = []
    for base in (quantized, plain):
        torch.manual_seed(0)
        model = peft.get_peft_model(base, tucka_llm.TuckAConfig(**TUCKA_CONFIG)).eval()
        tucka_llm.data_aware_init(model, [batch], seed=0)
        models.append(model)
    on_4bit, on_plain = models
    assert isinstance(on_4bit.base_model.model.model.layers[0].self_attn.q_proj, tucka_llm.TuckALayer)
    assert isinstance(on_4bit.base_model.model.model.layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear4bit)
    torch.testing.assert_close(routers(on_4bit)["default"].centroids, routers(on_plain)["default"].centroids)
    with torch.no_grad():
        adapted = (on_4bit(**batch).logits - on_plain(**batch).logits).abs().max()
        with on_4bit.disable_adapter(), on_plain.disable_adapter():
            base = (on_4bit(**batch).logits - on_plain(**batch).logits).abs().max()
    # Equal up to what the 4-bit layer's own matmul differs from the dequantized weights: nothing on AVX2 CPUs, ~3e-3 in
    # the logits on CPUs with AVX-512 BF16, where bitsandbytes takes another CPU kernel (backends/cpu/ops.py).
    assert adapted <= 1.5 * base + 1e-5, (float(adapted), float(base))
    groups = []
    for model in models:  # each sequence routed to the same group on both
        with tucka_llm.routing(model, "sequence"), torch.no_grad():
            model(**batch)
            groups.append(routing_states(model)["default"].route.group)
    assert torch.equal(groups[0], groups[1])

    with (
        tucka_llm.routing(on_4bit, tucka_llm.Route(0, [0.5, 0.5])),
        pytest.raises(
            ValueError,
            match=r"Linear4bit is stored quantised \(torch.uint8\); merge into the base loaded in full precision",
        ),
    ):
        on_4bit.merge_and_unload()
    layer = on_4bit.base_model.model.model.layers[0].self_attn.q_proj  # routed LoRA conversion needs W U too
    with pytest.raises(ValueError, match=r"stored quantised \(torch.uint8\); convert against the base loaded in full"):
        layer.lora_basis("default")


def test_merge_without_a_fixed_route_is_refused():
    model = tucka_llama(seed=8)
    with pytest.raises(ValueError, match="cannot be merged as is"):
        model.merge_and_unload()


@pytest.mark.parametrize("field", ["r", "k", "t", "p"])
@pytest.mark.parametrize("value", [0, -2])
def test_non_positive_sizes_are_refused(field, value):
    with pytest.raises(ValueError, match=f"`{field}` must be a positive integer"):
        tucka_llm.TuckAConfig(**{field: value})


def test_rank_larger_than_the_input_size_is_refused():
    with pytest.raises(ValueError, match="r=65 is larger than the input size 64"):
        peft.get_peft_model(tiny_llama(), tucka_llm.TuckAConfig(r=65))


def test_missing_target_module_lists_the_linear_layers():
    with pytest.raises(ValueError, match=r"matches no module.*down_proj, gate_proj, k_proj, lm_head, o_proj"):
        peft.get_peft_model(tiny_llama(), tucka_llm.TuckAConfig(target_modules=["query"]))


def test_non_linear_target_is_refused():
    with pytest.raises(TypeError, match=r"'model\.embed_tokens' is a Embedding, not a torch\.nn\.Linear"):
        peft.get_peft_model(tiny_llama(), tucka_llm.TuckAConfig(target_modules=["embed_tokens", "q_proj"]))


def test_gates_of_the_wrong_length_are_refused():
    model = tucka_llama()
    with (
        pytest.raises(ValueError, match="3 gates, but each group has t=2 experts"),
        tucka_llm.routing(model, tucka_llm.Route(0, [0.2, 0.3, 0.5])),
    ):
        pass


@pytest.mark.parametrize("group", [3, -1])
def test_group_out_of_range_is_refused(group):
    model = tucka_llama()
    with (
        pytest.raises(ValueError, match=f"group {group} is out of range: the adapter has k=3 groups"),
        tucka_llm.routing(model, tucka_llm.Route(group, [0.5, 0.5])),
    ):
        pass


def test_unknown_routing_mode_is_refused():
    with pytest.raises(ValueError, match="Unknown routing mode 'token'"), tucka_llm.routing(tucka_llama(), "token"):
        pass


def test_an_adapter_saved_before_routers_were_configurable_loads_with_the_dai_router_and_says_so(
    batch, tmp_path, caplog
):
    """tucka-llm 0.1 saved no router settings and routed with DAI once (logits E h): it must keep doing so."""
    model = tucka_llama(seed=6, router="dai")
    tucka_llm.data_aware_init(model, [batch], seed=3)
    with torch.no_grad():
        expected = model(**batch).logits
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    config = json.loads(path.read_text())
    for key in ("router", "normalize_gates", "seed"):
        del config[key]
    path.write_text(json.dumps(config))

    caplog.set_level("WARNING", logger="tucka_llm")
    loaded = peft.PeftModel.from_pretrained(tiny_llama(seed=6), tmp_path).eval()
    assert loaded.peft_config["default"].router == "dai"
    assert "router='dai'" in caplog.text
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, expected)


def test_centred_adapter_saves_e_bar_in_float32_and_alpha_auto_as_the_number_it_resolved_to(batch, tmp_path):
    model = peft.get_peft_model(tiny_llama(seed=6).to(torch.bfloat16), tucka_llm.TuckAConfig(r=4, k=3))
    e = tucka_llm.data_aware_init(model, [batch], seed=3)["default"]
    assert model.peft_config["default"].alpha == pytest.approx(512 * (64 / 4096) ** 0.5)  # width 64: 64.0
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (saved["alpha"], saved["router"], saved["normalize_gates"]) == (64.0, "centred", True)
    loaded = peft.PeftModel.from_pretrained(tiny_llama(seed=6).to(torch.bfloat16), tmp_path)
    (center,) = [b for n, b in loaded.named_buffers() if "tucka_router.default.center" in n]
    assert center.dtype == torch.float32 and torch.equal(center, e)
