"""TuckA through peft's adapter API: several adapters, exact unmerge, init_weights, old layouts, calibration."""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
from conftest import TUCKA_CONFIG, tiny_llama
from safetensors.torch import load_file, save_file

import tucka_llm
from tucka_llm.loading import load_checked_adapter
from tucka_llm.tucka.dai import routers, routing_layers
from tucka_llm.tucka.model import routing_states

ROUTE = tucka_llm.Route(1, [0.3, 0.7])
OTHER = dict(TUCKA_CONFIG, k=2, init_weights=False)


def two_adapter_model(seed: int = 3) -> peft.PeftModel:
    """A tiny Llama with adapters "default" (k=3) and "other" (k=2, random init), both calibrated."""
    torch.manual_seed(seed)
    model = peft.get_peft_model(tiny_llama(seed), tucka_llm.TuckAConfig(**TUCKA_CONFIG, init_weights=False))
    model.add_adapter("other", tucka_llm.TuckAConfig(**OTHER))
    return model.eval()


def logits(model: torch.nn.Module, batch, mode="sequence") -> torch.Tensor:
    with tucka_llm.routing(model, mode), torch.no_grad():
        return model(**batch).logits


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer.weight" in n}


def test_a_second_adapter_gets_its_own_router_routing_state_and_outputs(batch):
    model = two_adapter_model()
    states = routing_states(model)
    assert set(states) == {"default", "other"} and states["default"] is not states["other"]
    by_name = routers(model)
    assert (by_name["default"].k, by_name["other"].k) == (3, 2)
    assert by_name["default"].centroids.shape == (6, 64) and by_name["other"].centroids.shape == (4, 64)
    first = logits(model, batch)
    model.set_adapter("other")
    second = logits(model, batch)
    assert not torch.allclose(first, second)
    with model.disable_adapter():
        base = logits(model, batch)
    assert not torch.allclose(base, first) and not torch.allclose(base, second)
    model.set_adapter("default")
    assert torch.equal(logits(model, batch), first)


def test_each_adapter_saves_and_loads_on_its_own_with_its_router(batch, tmp_path):
    model = two_adapter_model()
    model.set_adapter("other")
    expected = logits(model, batch)
    model.save_pretrained(tmp_path)  # every adapter: default in tmp_path, "other" in tmp_path/other
    assert json.loads((tmp_path / "other" / "adapter_config.json").read_text())["k"] == 2
    saved = load_file(tmp_path / "other" / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.self_attn.q_proj.tucka_router.centroids" in saved

    fresh = peft.PeftModel.from_pretrained(tiny_llama(3), tmp_path).eval()  # "default" first
    fresh.load_adapter(tmp_path / "other", adapter_name="second")
    fresh.set_adapter("second")
    assert torch.equal(logits(fresh, batch), expected)
    fresh.delete_adapter("second")
    assert set(routing_states(fresh)) == {"default"} and set(routers(fresh)) == {"default"}
    assert not [n for n, _ in fresh.named_parameters() if ".second" in n]
    fresh(**batch)  # still routes with the adapter that is left


def test_two_active_adapters_add_their_updates_each_under_its_own_route(batch):
    """Both active: y = W (x + sum_a (x U_a) M_a U_a^T), each adapter routed by its own router. Merged together
    (fixed routes) the model gives the same outputs, and unmerging gives back the base."""
    model = two_adapter_model()
    model.base_model.set_adapter(["default", "other"])
    states = routing_states(model)
    with torch.no_grad(), tucka_llm.routing(model, "sequence"):
        model(**batch)
        assert states["default"].route.group.max() < 3 and states["other"].route.group.max() < 2
    base = weights(model)
    routes = {"default": ROUTE, "other": tucka_llm.Route(0, [0.6, 0.4])}
    for name, route in routes.items():
        states[name].mode = route
    with torch.no_grad():
        both = model(**batch).logits
        model.merge_adapter()
        merged = model(**batch).logits
        assert (merged - both).norm() / both.norm() < 1e-5
        model.unmerge_adapter()
    for name, weight in weights(model).items():
        torch.testing.assert_close(weight, base[name], rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        assert (model(**batch).logits - both).norm() / both.norm() < 1e-6


def test_merges_in_separate_calls_add_up_and_unmerge_is_exact_in_fp32(batch):
    model = two_adapter_model()
    model.base_model.set_adapter(["default", "other"])
    base = weights(model)
    layer = routing_layers(model)["default"]
    with tucka_llm.routing(model, ROUTE.__class__(0, [0.5, 0.5])), torch.no_grad():
        unmerged = model(**batch).logits
        model.merge_adapter(["default"])
        model.merge_adapter(["other"])  # sequential: the second merge adds its update to W, not to W (I + A_1)
        assert layer.merged_adapters == ["default", "other"]
        sequential = weights(model)
        assert (model(**batch).logits - unmerged).norm() / unmerged.norm() < 1e-5
        model.unmerge_adapter()
        model.merge_adapter(["default", "other"])
        for name, weight in weights(model).items():
            torch.testing.assert_close(weight, sequential[name], rtol=1e-5, atol=1e-6)
        model.unmerge_adapter()
    assert not layer.merged and not layer.tucka_merged_route
    for name, weight in weights(model).items():
        torch.testing.assert_close(weight, base[name], rtol=1e-5, atol=1e-6)


def test_merge_and_unmerge_round_trip_in_bf16_comes_back_within_its_rounding(batch):
    """bf16 weights: the merge rounds W (I + A) once and the unmerge (fp32 Woodbury solve) rounds once more, so
    the weights come back within a couple of bf16 roundings (LoRA's round trip rounds the same way:
    docs/benchmarks.md, merge round trip)."""
    torch.manual_seed(3)
    model = peft.get_peft_model(tiny_llama(3, torch.bfloat16), tucka_llm.TuckAConfig(**TUCKA_CONFIG)).eval()
    base = weights(model)
    with tucka_llm.routing(model, ROUTE), torch.no_grad():
        model.merge_adapter()
        moved = weights(model)
        model.unmerge_adapter()
    eps = torch.finfo(torch.bfloat16).eps
    for name, weight in weights(model).items():
        original = base[name].float()
        if not torch.equal(moved[name], base[name]):  # an adapted layer
            error = (weight.float() - original).norm() / original.norm()
            assert error <= 2 * eps, (name, float(error))


def test_safe_merge_of_a_broken_adapter_says_so_as_peft_does_and_changes_nothing():
    model = two_adapter_model()
    with torch.no_grad():
        routing_layers(model)["default"].tucka_subspace["default"][0, 0] = float("inf")
    base = weights(model)
    with tucka_llm.routing(model, ROUTE), pytest.raises(ValueError, match="NaNs detected in the merged weights"):
        model.merge_adapter(safe_merge=True)
    assert all(torch.equal(w, base[n]) for n, w in weights(model).items())


def test_disable_adapter_unmerges_a_merged_model(batch):
    model = two_adapter_model()
    with torch.no_grad():
        with model.disable_adapter():
            base = model(**batch).logits
        with tucka_llm.routing(model, ROUTE):
            model.merge_adapter()
        with model.disable_adapter():
            assert (model(**batch).logits - base).abs().max() < 1e-5


def test_init_weights_false_gives_every_group_its_own_core_and_is_saved(tmp_path):
    default = peft.get_peft_model(tiny_llama(), tucka_llm.TuckAConfig(**TUCKA_CONFIG))
    random = peft.get_peft_model(tiny_llama(), tucka_llm.TuckAConfig(**TUCKA_CONFIG, init_weights=False))
    (paper,) = [p for n, p in default.named_parameters() if n.endswith("layers.0.self_attn.q_proj.tucka_core.default")]
    (drawn,) = [p for n, p in random.named_parameters() if n.endswith("layers.0.self_attn.q_proj.tucka_core.default")]
    assert all(torch.equal(paper[0, 0], core) for core in paper.flatten(0, 1))  # the authors' init: one copied core
    assert not torch.equal(drawn[0, 0], drawn[1, 0]) and not torch.equal(drawn[0, 0], drawn[0, 1])
    assert int(routers(random)["default"].calibrated) == 1 and int(routers(default)["default"].calibrated) == 0
    random.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["init_weights"] is False


@pytest.mark.parametrize("router", ["centred", "dai"])
def test_training_an_uncalibrated_router_is_refused_in_one_line(batch, router):
    model = peft.get_peft_model(tiny_llama(), tucka_llm.TuckAConfig(**TUCKA_CONFIG, router=router)).train()
    with pytest.raises(tucka_llm.UncalibratedRouterError, match=r"TuckACalibration.*data_aware_init") as error:
        model(**batch, labels=batch["input_ids"]).loss.backward()
    assert "\n" not in str(error.value)
    with torch.no_grad():  # evaluation does not train the router: allowed
        model(**batch)
    tucka_llm.data_aware_init(model, [batch])
    model(**batch, labels=batch["input_ids"]).loss.backward()


def test_the_redraw_router_trains_without_calibration(batch):
    model = peft.get_peft_model(tiny_llama(), tucka_llm.TuckAConfig(**TUCKA_CONFIG, router="redraw")).train()
    model(**batch, labels=batch["input_ids"]).loss.backward()


def test_an_adapter_saved_with_the_router_tensors_on_the_layer_loads_identically_and_says_so(
    batch, tiny_model, tmp_path, caplog
):
    """tucka-llm 0.2 saved E as <layer>.tucka_centroids and e_bar as <layer>.tucka_center, and no calibration
    flag; such an adapter loads into the router module, is taken as calibrated, and trains on."""
    torch.manual_seed(5)
    model = peft.get_peft_model(tiny_llama(), tucka_llm.TuckAConfig(**TUCKA_CONFIG)).eval()
    tucka_llm.data_aware_init(model, [batch], seed=2)
    expected = logits(model, batch)
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    legacy = {
        key.replace("tucka_router.centroids", "tucka_centroids").replace("tucka_router.center", "tucka_center"): value
        for key, value in load_file(path).items()
        if not key.endswith("tucka_router.calibrated")
    }
    assert any(k.endswith("q_proj.tucka_centroids") for k in legacy) and any(k.endswith("tucka_center") for k in legacy)
    save_file(legacy, str(path))

    caplog.set_level("WARNING", logger="tucka_llm")
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    assert "taken as calibrated" in caplog.text
    assert torch.equal(logits(loaded.eval(), batch), expected)
    assert int(routers(loaded)["default"].calibrated) == 1
    loaded.train()(**batch, labels=batch["input_ids"]).loss.backward()  # calibrated: trains on
    load_checked_adapter(tiny_llama(), tmp_path, "--model")  # our loader's key check knows the old layout too


def test_a_deep_copy_routes_with_its_own_routing_state(batch):
    model = two_adapter_model()
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin(**batch)
    assert routing_states(twin)["default"].route is not None
    assert routing_states(model)["default"].route is None


def test_mixed_adapter_batches_are_refused_with_what_to_do(batch):
    model = two_adapter_model()
    with pytest.raises(ValueError, match="does not support mixed adapter batches"), torch.no_grad():
        model(**batch, adapter_names=["default", "other", "default", "other"])
