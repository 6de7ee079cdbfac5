"""Routing behaviour: padding, batch composition and generation never change a sequence's route."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from conftest import PROMPTS, tucka_llama

import tucka_llm
from tucka_llm.tucka.model import routing_states
from tucka_llm.tucka.router import make_router


def current_route(model):
    route = routing_states(model)["default"].route
    return route.group.clone(), route.gates.clone()


def pad(batch, extra: int, side: str, pad_id: int):
    """The same sequences with ``extra`` more padding columns on ``side``."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    pad_ids = torch.full((ids.shape[0], extra), pad_id)
    pad_mask = torch.zeros_like(pad_ids)
    if side == "left":
        return {"input_ids": torch.cat([pad_ids, ids], 1), "attention_mask": torch.cat([pad_mask, mask], 1)}
    return {"input_ids": torch.cat([ids, pad_ids], 1), "attention_mask": torch.cat([mask, pad_mask], 1)}


@pytest.mark.parametrize("mode", ["batch", "sequence"])
def test_padding_never_moves_the_route(batch, tokenizer, mode):
    model = tucka_llama(seed=1)
    routes = []
    with tucka_llm.routing(model, mode), torch.no_grad():
        for padded in (batch, pad(batch, 9, "right", tokenizer.pad_token_id), pad(batch, 5, "left", 0)):
            model(**padded)
            routes.append(current_route(model))
    for group, gates in routes[1:]:
        assert torch.equal(group, routes[0][0])
        torch.testing.assert_close(gates, routes[0][1], rtol=1e-6, atol=1e-7)


def test_padding_would_move_an_unmasked_route(batch, tokenizer):
    """The control for the test above: without the mask, padding does change the routing decision's inputs."""
    model = tucka_llama(seed=1)
    padded = pad(batch, 9, "right", tokenizer.pad_token_id)
    with tucka_llm.routing(model, "sequence"), torch.no_grad():
        model(input_ids=padded["input_ids"])
        unmasked = current_route(model)
        model(**padded)
        masked = current_route(model)
    assert (unmasked[1] - masked[1]).abs().max() > 1e-4


def test_sequence_mode_gives_each_sequence_its_own_route(batch):
    model = tucka_llama(seed=1)
    lengths = batch["attention_mask"].sum(1)
    with tucka_llm.routing(model, "sequence"), torch.no_grad():
        together = model(**batch).logits
        groups, _ = current_route(model)
        for b, prompt_length in enumerate(lengths.tolist()):
            alone = model(input_ids=batch["input_ids"][b : b + 1, :prompt_length]).logits[0]
            mine = together[b, :prompt_length]
            assert (mine - alone).norm() / alone.norm() <= 1e-5
    assert len(set(groups.tolist())) > 1, "the prompts should route differently, or this test proves nothing"

    with tucka_llm.routing(model, "batch"), torch.no_grad():
        batched = model(**batch).logits
    assert not torch.allclose(batched, together, atol=1e-4), "batch mode shares one route across the batch"


def test_default_mode_is_batch_in_training_and_sequence_in_eval(batch):
    model = tucka_llama(seed=1)
    with torch.no_grad():
        model.train()
        model(**batch)
        assert current_route(model)[0].shape == (1,)
        model.eval()
        model(**batch)
        assert current_route(model)[0].shape == (len(PROMPTS),)


def test_generate_holds_the_prefill_route(tokenizer):
    """Greedy generation in sequence mode equals generation under the fixed Route that the prompt alone selects."""
    model = tucka_llama(seed=1)
    tokenizer.padding_side = "left"
    prompts = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    settings = dict(max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    with tucka_llm.routing(model, "sequence"), torch.no_grad():
        batched = model.generate(**prompts, **settings)[:, prompts["input_ids"].shape[1] :]
    decode_routes_differ = False
    for b, prompt in enumerate(PROMPTS):
        alone = tokenizer(prompt, return_tensors="pt")
        with tucka_llm.routing(model, "sequence"), torch.no_grad():
            model(**alone)
            group, gates = current_route(model)
            # what a router that re-routed at a decode step would see: the last generated token alone
            model(input_ids=batched[b : b + 1, -1:])
            decode_routes_differ |= not torch.equal(current_route(model)[1], gates)
        route = tucka_llm.Route(int(group[0]), gates[0].tolist())
        with tucka_llm.routing(model, route), torch.no_grad():
            fixed = model.generate(**alone, **settings)[0, alone["input_ids"].shape[1] :]
        assert batched[b].tolist() == fixed.tolist(), f"prompt {b}"
    assert decode_routes_differ, "re-routing per decode step would have changed the route; the test must see that"


def test_expert_load_counts_routes_since_last_read(batch):
    model = tucka_llama(seed=1)
    with tucka_llm.routing(model, "sequence"), torch.no_grad():
        model(**batch)
        groups, gates = current_route(model)
        model(**batch)
    load = tucka_llm.expert_load(model)["default"]
    assert load.routes == 2 * len(PROMPTS)
    expected = torch.bincount(groups, minlength=3) * 2
    assert load.counts == expected.tolist()
    assert sum(load.fraction) == pytest.approx(1.0)
    first = int(groups[0])
    mine = gates[groups == first].mean(0)
    assert load.mean_gates[first] == pytest.approx(mine.tolist(), rel=1e-5)
    probabilities = expected.float() / expected.sum()
    entropy = float(-(probabilities[probabilities > 0] * probabilities[probabilities > 0].log()).sum())
    assert load.entropy == pytest.approx(entropy, rel=1e-6)
    assert tucka_llm.expert_load(model)["default"].routes == 0  # reset by the read


# ------------------------------------------------------------------------------------------------- routers
def entropy_over_routes(groups: torch.Tensor, k: int) -> float:
    shares = torch.bincount(groups, minlength=k).double() / len(groups)
    return float(-(shares[shares > 0] * shares[shares > 0].log()).sum())


def shared_component_features(n: int = 512, d: int = 64) -> torch.Tensor:
    """Features like real routing features: a large common part (the prompt template, the norm's big channels) and a
    per-sequence part a quarter of its size (method note, section 3)."""
    generator = torch.Generator().manual_seed(0)
    common = torch.randn(d, generator=generator) * 3
    return common + torch.randn(n, d, generator=generator) * 0.25 * common.norm() / math.sqrt(d)


def test_centred_router_spreads_inputs_with_a_large_shared_component_over_the_groups_and_dai_does_not():
    h = shared_component_features()
    calibration, held_out = h[:256], h[256:]
    e = calibration.mean(dim=0)
    entropy = {}
    for kind in ("centred", "dai"):
        router = make_router(kind, k=4, t=2, d=h.shape[-1], perturb_scale=0.5)
        entropy[kind] = []
        for seed in range(6):
            router.calibrate(e, seed)
            entropy[kind].append(entropy_over_routes(router.route_features(held_out).group, 4))
    assert min(entropy["centred"]) >= 0.9 * math.log(4), entropy
    assert statistics.mean(entropy["dai"]) <= 0.6 * math.log(4), entropy  # the collapse the centred router removes
    assert min(entropy["dai"]) <= 0.1 * math.log(4), entropy  # some seeds send everything to one group


def test_centred_routes_depend_only_on_the_direction_of_h_minus_e_bar():
    h = shared_component_features(n=64)
    e = h.mean(dim=0)
    router = make_router("centred", k=4, t=2, d=h.shape[-1], perturb_scale=0.5)
    router.calibrate(e, seed=1)
    route = router.route_features(h)
    for scale in (0.05, 0.5, 40.0):
        scaled = router.route_features(e + scale * (h - e))
        assert torch.equal(scaled.group, route.group)
        torch.testing.assert_close(scaled.gates, route.gates, rtol=1e-4, atol=1e-5)


def test_gates_sum_to_one_unless_normalisation_is_off_as_in_the_authors_code():
    h = shared_component_features(n=32)
    e = h.mean(dim=0)
    normalised = make_router("centred", k=4, t=2, d=h.shape[-1], perturb_scale=0.5)
    raw = make_router("centred", k=4, t=2, d=h.shape[-1], perturb_scale=0.5, normalize_gates=False)
    normalised.calibrate(e, seed=2)
    raw.calibrate(e, seed=2)
    a, b = normalised.route_features(h), raw.route_features(h)
    assert torch.equal(a.group, b.group)
    torch.testing.assert_close(a.gates.sum(-1), torch.ones(32))
    assert ((b.gates > 0) & (b.gates < 1)).all() and not torch.allclose(b.gates.sum(-1), torch.ones(32))
    torch.testing.assert_close(b.gates / b.gates.sum(-1, keepdim=True), a.gates)


def test_redraw_router_draws_by_key_the_same_key_gives_the_same_route():
    h = shared_component_features(n=64)
    router = make_router("redraw", k=4, t=2, d=h.shape[-1], perturb_scale=20.0, seed=5)
    first = router.route_features(h, (3, 1))
    again = router.route_features(h, (3, 1))
    assert torch.equal(first.group, again.group) and torch.equal(first.gates, again.gates)
    groups = torch.stack([router.route_features(h[:1], (step, 1)).group[0] for step in range(64)])
    assert entropy_over_routes(groups, 4) >= 0.8 * math.log(4)  # a fresh random draw at every step
    other_seed = make_router("redraw", k=4, t=2, d=h.shape[-1], perturb_scale=20.0, seed=6)
    assert not torch.equal(other_seed.route_features(h, (3, 1)).gates, first.gates)


def test_redraw_router_in_a_model_draws_per_forward_and_repeats_the_draw_of_a_step(batch):
    model = tucka_llama(seed=1, router="redraw").train()
    state = routing_states(model)["default"]
    groups = []
    with torch.no_grad():
        for step in (0, 1, 0):
            state.start_step(step)
            model(**batch)
            groups.append(current_route(model))
    assert torch.equal(groups[0][1], groups[2][1])  # the same step draws the same: a resumed run routes the same
    assert not torch.equal(groups[0][1], groups[1][1])
