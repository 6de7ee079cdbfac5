"""Data-aware initialisation of the router centroids (paper Sec. 3.4, Eq. 10; method note, section 3).

An explicit calibration step, run once before training (and before a DeepSpeed engine copies the weights into its
fp32 master), on the same batches and seed on every rank. Nothing else ever writes DAI values: loading an adapter
keeps its trained centroids.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from tucka_llm.tucka.layer import FeaturesCollected, TuckALayer


def routing_layers(model: nn.Module) -> dict[str, TuckALayer]:
    """The layer that holds the centroids E (and routes), per TuckA adapter name."""
    return {name: m for m in model.modules() if isinstance(m, TuckALayer) for name in m.tucka_centroids}


@torch.no_grad()
def routing_centroids(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``{adapter: e}`` for every active TuckA adapter: the centroid (float32, CPU) of the routing features of
    ``batches`` (per-sequence means of the routing layer's input over real tokens). Changes no weight.

    Each batch is a mapping with ``input_ids`` and optionally ``attention_mask``; only the model up to the routing
    layer runs.
    """
    layers = routing_layers(model)
    batches = list(batches)
    if not batches:
        raise ValueError("TuckA calibration needs at least one batch (input_ids, attention_mask).")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    centroids: dict[str, torch.Tensor] = {}
    try:
        for name, layer in layers.items():
            if name not in layer.active_adapters:
                continue
            state = layer.tucka_state[name]
            state.calibration = []
            try:
                for batch in batches:
                    mask = batch.get("attention_mask")
                    with contextlib.suppress(FeaturesCollected):  # the routing layer stops the forward
                        model(
                            input_ids=batch["input_ids"].to(device),
                            attention_mask=None if mask is None else mask.to(device),
                        )
                centroids[name] = torch.cat([f.cpu() for f in state.calibration]).mean(dim=0)
            finally:
                state.calibration = None
    finally:
        model.train(was_training)
    return centroids


@torch.no_grad()
def data_aware_init(
    model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], seed: int = 0
) -> dict[str, torch.Tensor]:
    """Set E = [e, e + eps_1, ..., e + eps_{kt-1}], eps ~ U(-a, a), for every active TuckA adapter of ``model``.

    ``e`` is ``routing_centroids(model, batches)``. Deterministic for the same batches and seed. Returns
    ``{adapter: e}``: the training-data centroid that export uses to pick a route.
    """
    centroids = routing_centroids(model, batches)
    layers = routing_layers(model)
    for name, e in centroids.items():
        state = layers[name].tucka_state[name]
        generator = torch.Generator().manual_seed(seed)
        noise = (torch.rand(state.k * state.t - 1, e.numel(), generator=generator) * 2 - 1) * state.perturb_scale
        target = layers[name].tucka_centroids[name]
        target.copy_(torch.cat([e.unsqueeze(0), e + noise]).to(target.device, target.dtype))
    return centroids
