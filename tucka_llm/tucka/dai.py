"""Data-aware initialisation of the router (paper Sec. 3.4, Eq. 10; method note, section 3).

An explicit calibration step, run once before training (and before a DeepSpeed engine copies the weights into its
fp32 master), on the same batches and seed on every rank. Nothing else ever writes DAI values: loading an adapter
keeps its trained centroids (and its e_bar).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from tucka_llm.tucka.layer import FeaturesCollected, TuckALayer
from tucka_llm.tucka.router import TuckARouter


def routing_layers(model: nn.Module) -> dict[str, TuckALayer]:
    """The layer that routes (and holds the router), per TuckA adapter name."""
    return {name: m for m in model.modules() if isinstance(m, TuckALayer) for name in m.tucka_router}


def routers(model: nn.Module) -> dict[str, TuckARouter]:
    """The router of every TuckA adapter of ``model``, per adapter name."""
    return {name: layer.router(name) for name, layer in routing_layers(model).items()}


@torch.no_grad()
def calibration_features(
    model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], stop_early: bool = True
) -> dict[str, torch.Tensor]:
    """``{adapter: h}`` for every active TuckA adapter: the routing feature of every sequence of ``batches``, (n, d)
    float32 on the CPU (the mean of the routing layer's input over its real tokens). Changes no weight.

    Each batch is a mapping with ``input_ids`` and optionally ``attention_mask``; with ``stop_early`` only the model
    up to the routing layer runs (under ZeRO-3 the whole forward must run), so the features depend on the base model
    alone when the routing layer is the first adapted one.
    """
    layers = routing_layers(model)
    batches = list(batches)
    if not batches:
        raise ValueError("TuckA calibration needs at least one batch (input_ids, attention_mask).")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    features: dict[str, torch.Tensor] = {}
    try:
        for name, layer in layers.items():
            if name not in layer.active_adapters:
                continue
            state = layer.tucka_state[name]
            state.calibration, state.calibration_stops = [], stop_early
            try:
                for batch in batches:
                    mask = batch.get("attention_mask")
                    with contextlib.suppress(FeaturesCollected):  # the routing layer stops the forward
                        model(
                            input_ids=batch["input_ids"].to(device),
                            attention_mask=None if mask is None else mask.to(device),
                        )
                features[name] = torch.cat([f.cpu() for f in state.calibration])
            finally:
                state.calibration = None
                state.read_load(reset=True)  # calibration forwards are not routes the adapter took
    finally:
        model.train(was_training)
    return features


def routing_centroids(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``{adapter: e}``: the centroid (float32, CPU) of the routing features of ``batches``."""
    return {name: h.mean(dim=0) for name, h in calibration_features(model, batches).items()}


@torch.no_grad()
def initialise_router(
    model: nn.Module, features: Mapping[str, torch.Tensor], seed: int = 0
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """DAI from calibration features ``{adapter: (n, d)}``: e = their mean, from which each adapter's router sets
    its centroids as its design wants (``TuckARouter.calibrate``). Returns ``({adapter: e}, {adapter: the DAI matrix
    set})``; a router without centroids (redraw) has no DAI matrix."""
    by_name = routers(model)
    centroids, dai = {}, {}
    for name, h in features.items():
        e = h.float().mean(dim=0)
        initial = by_name[name].calibrate(e, seed)
        centroids[name] = e
        if initial is not None:
            dai[name] = initial
    return centroids, dai


def data_aware_init(
    model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], seed: int = 0
) -> dict[str, torch.Tensor]:
    """Calibrate the router of every active TuckA adapter of ``model`` on ``batches`` (deterministic for the same
    batches and seed) and return ``{adapter: e}``, the calibration centroid (see ``initialise_router``)."""
    return initialise_router(model, calibration_features(model, batches), seed)[0]
