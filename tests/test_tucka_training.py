"""What training relies on: a gradient for every parameter, checkpointing-invariant gradients, deterministic DAI."""

from __future__ import annotations

import pytest
import torch
from conftest import tucka_llama

import tucka_llm
from tucka_llm.tucka.dai import routing_layers
from tucka_llm.tucka.model import routing_states


def trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    loss = model(**batch, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in trainable(model).items()}


def test_every_trainable_parameter_gets_a_gradient_every_step(batch):
    model = tucka_llama(seed=4).train()
    # calibrated on part of the batch: on all of it, h - e_bar would be exactly 0 and give E no gradient
    tucka_llm.data_aware_init(model, calibration_batches(batch)[:1], seed=7)
    _, grads = loss_and_grads(model, batch)
    assert set(grads) == set(trainable(model))
    group = int(routing_states(model)["default"].route.group[0])
    for name, grad in grads.items():
        assert torch.isfinite(grad).all(), name
        if "tucka_core" in name:  # only the active group's core moves; the others get zeros, not None
            others = torch.cat([grad[:group], grad[group + 1 :]])
            assert grad[group].abs().sum() > 0 and others.abs().sum() == 0, name
        elif "tucka_router" in name:  # E learns through the gates of the active group only
            rows = grad.view(3, 2, -1)
            assert rows[group].abs().sum() > 0, name
            assert torch.cat([rows[:group], rows[group + 1 :]]).abs().sum() == 0, name
        else:
            assert grad.abs().sum() > 0, name


@pytest.mark.parametrize("router", ["centred", "dai", "redraw"])
def test_non_reentrant_gradient_checkpointing_changes_no_gradient(batch, router):
    plain = tucka_llama(seed=4, router=router).train()
    tucka_llm.data_aware_init(plain, calibration_batches(batch), seed=7)
    loss, grads = loss_and_grads(plain, batch)

    checkpointed = tucka_llama(seed=4, router=router).train()
    tucka_llm.data_aware_init(checkpointed, calibration_batches(batch), seed=7)
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert checkpointed.base_model.model.model.gradient_checkpointing
    loss_ckpt, grads_ckpt = loss_and_grads(checkpointed, batch)
    # one route per forward: the recomputation during backward is not counted as a second routing decision
    assert tucka_llm.expert_load(checkpointed)["default"].routes == 1

    assert torch.equal(loss, loss_ckpt)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def calibration_batches(batch):
    return [
        {"input_ids": batch["input_ids"][:2], "attention_mask": batch["attention_mask"][:2]},
        {"input_ids": batch["input_ids"][2:], "attention_mask": batch["attention_mask"][2:]},
    ]


def centroids(model) -> torch.Tensor:
    return next(p for n, p in model.named_parameters() if "tucka_router" in n).detach().clone()


@pytest.mark.parametrize("router", ["centred", "dai"])
def test_dai_sets_centroids_to_the_masked_feature_centroid_plus_bounded_noise(batch, router):
    model = tucka_llama(seed=5, perturb_scale=0.25, router=router)
    before = centroids(model)
    e = tucka_llm.data_aware_init(model, calibration_batches(batch), seed=7)["default"]

    llama = model.base_model.model.model
    with torch.no_grad():
        x = llama.layers[0].input_layernorm(llama.embed_tokens(batch["input_ids"]))
    mask = batch["attention_mask"].bool()
    expected = torch.stack([x[b, mask[b]].mean(0) for b in range(x.shape[0])]).mean(0)
    torch.testing.assert_close(e, expected, rtol=1e-5, atol=1e-6)

    E = centroids(model)
    assert not torch.equal(E, before)
    assert ((E - e).abs() <= 0.25).all()
    if router == "dai":  # the paper's E = [e, e + eps_1, ...]
        torch.testing.assert_close(E[0], e)
        assert (E[1:] - e).abs().amax() > 0.2  # the perturbation spans the interval, it is not ~0
    else:  # centred: every row perturbed (an unperturbed row would score 0 for every input), and e_bar = e
        assert (E - e).abs().amax(dim=1).min() > 0.2
        (layer,) = routing_layers(model).values()
        assert torch.equal(layer.router("default").center, e)
    assert model.training is False  # calibration left the mode as it found it


def test_redraw_router_has_no_centroids_and_no_trainable_router_parameter(batch):
    model = tucka_llama(seed=5, router="redraw").train()
    assert not [n for n, _ in model.named_parameters() if "tucka_router" in n]
    tucka_llm.data_aware_init(model, calibration_batches(batch), seed=7)
    _, grads = loss_and_grads(model, batch)
    assert set(grads) == set(trainable(model)) and all(g.abs().sum() > 0 for g in grads.values())


def test_dai_is_deterministic_for_the_same_batches_and_seed(batch):
    runs = []
    for seed in (7, 7, 8):
        model = tucka_llama(seed=5)
        tucka_llm.data_aware_init(model, calibration_batches(batch), seed=seed)
        runs.append(centroids(model))
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def test_dai_ignores_padding(batch, tokenizer):
    model = tucka_llama(seed=5)
    e = tucka_llm.data_aware_init(model, [batch], seed=1)["default"]
    extra = torch.full((batch["input_ids"].shape[0], 6), tokenizer.pad_token_id)
    padded = {
        "input_ids": torch.cat([batch["input_ids"], extra], 1),
        "attention_mask": torch.cat([batch["attention_mask"], torch.zeros_like(extra)], 1),
    }
    e_padded = tucka_llm.data_aware_init(model, [padded], seed=1)["default"]
    torch.testing.assert_close(e_padded, e, rtol=1e-6, atol=1e-7)
