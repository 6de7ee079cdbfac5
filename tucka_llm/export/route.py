"""Which route a TuckA adapter is folded with (method note, section 4) and how it was chosen.

A merged checkpoint is the adapter under one fixed route (group i, gates g). ``--route`` picks it:

- ``centroid`` (default): the route the router gives the training-data centroid ``e`` (recorded by training in
  ``tucka_router_calibration.safetensors``, or recomputed from ``--calibration-data``);
- ``group:I``: group I (0-based), gates from the centroid's scores within group I;
- ``group:I:g1,g2,...``: group I with the given gates, as given.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tucka_llm.calibration import ROUTER_CALIBRATION, load_router_centroid
from tucka_llm.tucka.dai import routing_layers
from tucka_llm.tucka.routing import Route, route_from_features, route_scores

ROUTE_SYNTAX = "centroid, group:I or group:I:g1,g2,... (I counts groups from 0)"


class ExportError(ValueError):
    """An export that cannot be done as asked; the message names the flag or file to change."""


@dataclass(frozen=True)
class RouteSpec:
    """A parsed ``--route``: ``kind`` is "centroid", "group" (gates from the centroid) or "explicit"."""

    kind: str
    group: int | None = None
    gates: tuple[float, ...] | None = None

    @classmethod
    def parse(cls, text: str) -> RouteSpec:
        parts = text.strip().split(":")
        if parts == ["centroid"]:
            return cls("centroid")
        if parts[0] != "group" or len(parts) not in (2, 3):
            raise ExportError(f"--route {text!r}: unknown route; give {ROUTE_SYNTAX}.")
        try:
            group = int(parts[1])
        except ValueError:
            raise ExportError(
                f"--route {text!r}: the group {parts[1]!r} is not an integer; give {ROUTE_SYNTAX}."
            ) from None
        if len(parts) == 2:
            return cls("group", group)
        try:
            gates = tuple(float(g) for g in parts[2].split(","))
        except ValueError:
            raise ExportError(f"--route {text!r}: the gates must be numbers separated by commas.") from None
        if not all(math.isfinite(g) for g in gates):
            raise ExportError(f"--route {text!r}: every gate must be a finite number.")
        return cls("explicit", group, gates)


@dataclass
class ChosenRoute:
    """The route folded into a checkpoint and how it was chosen: what ``tucka_route.json`` records."""

    route: Route
    adapter: str
    k: int
    t: int
    chosen_by: str
    centroid: dict[str, Any] | None = None  # where the centroid came from, when one was used
    scores: list[list[float]] | None = field(default=None)  # the centroid's expert scores, k x t

    def to_json(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "group": self.route.group,
            "gates": list(self.route.gates),
            "adapter": self.adapter,
            "k": self.k,
            "t": self.t,
            "chosen_by": self.chosen_by,
        }
        if self.centroid is not None:
            record["centroid"] = self.centroid
        if self.scores is not None:
            record["centroid_scores"] = self.scores
        return record


CentroidFromData = Callable[[], tuple[torch.Tensor, dict[str, Any]]]


def recorded_centroid(adapter_dir: Path, adapter_name: str) -> tuple[torch.Tensor, dict[str, Any]] | None:
    """The training-data centroid that training recorded beside the adapter (or beside a checkpoint's run)."""
    candidates = [adapter_dir / ROUTER_CALIBRATION]
    if adapter_dir.parent.name == "checkpoints":  # OUT/checkpoints/checkpoint-N: the run directory holds the file
        candidates.append(adapter_dir.parent.parent / ROUTER_CALIBRATION)
    for path in candidates:
        if path.is_file():
            try:
                e, meta = load_router_centroid(path, adapter_name)
            except ValueError as error:
                raise ExportError(f"{error} Delete it and pass --calibration-data to recompute the centroid.") from None
            return e, {"source": "recorded by training", "file": str(path.resolve()), **meta}
    return None


def choose_route(
    model: nn.Module, spec: RouteSpec, adapter_dir: Path, centroid_from_data: CentroidFromData | None
) -> ChosenRoute:
    """The route to fold for the (single) TuckA adapter of ``model``, checked against its k and t.

    The centroid comes from the training record, else from ``centroid_from_data`` (``--calibration-data``).
    """
    layers = routing_layers(model)
    if len(layers) != 1:
        raise ExportError(f"The model holds {len(layers)} TuckA adapters ({', '.join(layers)}); export folds one.")
    ((name, layer),) = layers.items()
    state = layer.tucka_state[name]
    k, t = state.k, state.t
    if spec.group is not None and not 0 <= spec.group < k:
        raise ExportError(f"--route: group {spec.group} is out of range; this adapter has k={k} groups: 0..{k - 1}.")
    if spec.kind == "explicit":
        if len(spec.gates) != t:
            raise ExportError(f"--route: {len(spec.gates)} gates given, but each group has t={t} experts: give {t}.")
        return ChosenRoute(Route(spec.group, spec.gates), name, k, t, chosen_by="explicit gates (--route)")

    found = recorded_centroid(adapter_dir, name)
    if found is None:
        if centroid_from_data is None:
            raise ExportError(
                f"--route {spec.kind}: needs the training-data centroid, but {adapter_dir} has no {ROUTER_CALIBRATION} "
                "(launch/train.py writes it). Pass --calibration-data (a MetaMathQA .json/.jsonl or gsm8k-train) "
                "to recompute it, or choose the route yourself: --route group:I:g1,g2,..."
            )
        found = centroid_from_data()
    e, source = found
    centroids = layer.tucka_centroids[name].detach().float().cpu()
    if e.shape != (centroids.shape[1],):
        raise ExportError(
            f"The centroid in {source.get('file', 'the calibration data')} has shape {tuple(e.shape)}, but the "
            f"adapter's router expects ({centroids.shape[1]},): it belongs to another model. Pass --calibration-data."
        )
    scores = route_scores(centroids, e.unsqueeze(0), k, t)[0]
    if spec.kind == "centroid":
        active = route_from_features(centroids, e.unsqueeze(0), k, t)
        route = Route(int(active.group[0]), active.gates[0].tolist())
        chosen_by = "the router's choice for the training-data centroid"
    else:
        route = Route(spec.group, (scores[spec.group] / scores[spec.group].sum()).tolist())
        chosen_by = f"group {spec.group} (--route), gates from the training-data centroid's scores"
    return ChosenRoute(route, name, k, t, chosen_by, centroid=source, scores=scores.tolist())
