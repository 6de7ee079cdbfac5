"""Which route a TuckA adapter is folded with (method note, section 4) and how it was chosen.

A merged checkpoint is the adapter under one fixed selection of experts. A router that balances its groups sends
each group ~1/k of the inputs, so one route serves only those; ``--route`` says what to fold. Every rule but
``explicit`` reads the routes that the calibration sequences take under the TRAINED router (their routing features
are recorded by training in ``tucka_router_calibration.safetensors``, or recomputed from ``--calibration-data``):

- ``expected`` (default): the mean update over the calibration routes, sum_i share_i * update(group i, its mean
  gates). Exact in expectation over inputs like the calibration sample; exact for no single input. The natural fold
  for the redraw router, whose routes are random draws (then also averaged over 16 draws).
- ``majority``: the group most calibration sequences take, with their mean gates; exact for that share of inputs.
- ``centroid``: the router's choice for the calibration centroid e (the paper's router, ``dai``, sends most inputs
  there). Refused for the centred router, where e's route is degenerate (every score exactly 0.5).
- ``group:I``: group I (0-based) with the mean gates of the calibration sequences routed to it.
- ``group:I:g1,g2,...``: group I with the given gates, as given.

``docs/benchmarks.md`` (routing and export) measures the held-out loss of each fold against the unmerged adapter.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tucka_llm.errors import TuckaError
from tucka_llm.tucka.calibration import ROUTER_CALIBRATION, load_router_calibration
from tucka_llm.tucka.dai import routing_layers
from tucka_llm.tucka.router import TuckARouter
from tucka_llm.tucka.routing import ActiveRoute, Route, RouteMixture

ROUTE_SYNTAX = "expected, majority, centroid, group:I or group:I:g1,g2,... (I counts groups from 0)"
DEFAULT_ROUTE = "expected"
REDRAW_DRAWS = 16  # draws of the redraw router averaged over (its route is random)


class ExportError(TuckaError):
    """An export that cannot be done as asked; the message names the flag or file to change."""


@dataclass(frozen=True)
class RouteSpec:
    """A parsed ``--route``: ``kind`` is "expected", "majority", "centroid", "group" or "explicit"."""

    kind: str
    group: int | None = None
    gates: tuple[float, ...] | None = None

    @classmethod
    def parse(cls, text: str) -> RouteSpec:
        parts = text.strip().split(":")
        if len(parts) == 1 and parts[0] in ("expected", "majority", "centroid"):
            return cls(parts[0])
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
        if not all(math.isfinite(g) and g >= 0 for g in gates):
            raise ExportError(f"--route {text!r}: every gate must be a finite number >= 0.")
        return cls("explicit", group, gates)


@dataclass
class CalibrationRoutes:
    """Where the calibration sequences go under the trained router: the share of each group and the mean gates
    of the sequences routed to it (each group's mean over all sequences' normalised scores where none went)."""

    share: list[float]
    mean_gates: list[list[float]]
    sequences: int
    source: dict[str, Any]

    @classmethod
    def of(
        cls, router: TuckARouter, routes: ActiveRoute, scores: torch.Tensor, source: dict[str, Any]
    ) -> CalibrationRoutes:
        k, n = router.k, int(routes.group.numel())
        counts = torch.bincount(routes.group, minlength=k).double()
        sums = torch.zeros(k, router.t, dtype=torch.float64).index_add_(0, routes.group, routes.gates.double())
        fallback = (scores / scores.sum(dim=-1, keepdim=True)).double().mean(dim=0)  # (k, t)
        means = torch.where(counts.view(-1, 1) > 0, sums / counts.clamp_min(1).view(-1, 1), fallback)
        return cls((counts / n).tolist(), means.tolist(), n, source)

    def to_json(self) -> dict[str, Any]:
        return {"sequences": self.sequences, "group_share": self.share, "mean_gates": self.mean_gates} | {
            "features": self.source
        }


@dataclass
class ChosenRoute:
    """The selection folded into a checkpoint, how it was chosen, and the share of calibration inputs it serves
    exactly (None for a mixture, which is exact for none): what ``tucka_route.json`` records."""

    route: Route | RouteMixture
    adapter: str
    k: int
    t: int
    router: str
    chosen_by: str
    served_share: float | None = None
    calibration: CalibrationRoutes | None = None

    def describe(self) -> str:
        """One line for logs and the model card."""
        if isinstance(self.route, RouteMixture):
            parts = "; ".join(
                f"{w:.3f} x group {r.group} [{', '.join(f'{g:.4g}' for g in r.gates)}]" for w, r in self.route.parts
            )
            return f"mixture of routes ({parts}), {self.chosen_by}"
        gates = ", ".join(f"{g:.6g}" for g in self.route.gates)
        return f"group {self.route.group}, gates [{gates}], {self.chosen_by}"

    def to_json(self) -> dict[str, Any]:
        record: dict[str, Any] = {"adapter": self.adapter, "k": self.k, "t": self.t, "router": self.router}
        if isinstance(self.route, RouteMixture):
            record |= {"group": None, "gates": None}
            record["mixture"] = [{"weight": w, "group": r.group, "gates": list(r.gates)} for w, r in self.route.parts]
        else:
            record |= {"group": self.route.group, "gates": list(self.route.gates)}
        record |= {"chosen_by": self.chosen_by, "served_share": self.served_share}
        if self.calibration is not None:
            record["calibration"] = self.calibration.to_json()
        return record


FeaturesFromData = Callable[[], tuple[torch.Tensor, dict[str, Any]]]


def recorded_features(adapter_dir: Path, adapter_name: str) -> tuple[torch.Tensor, dict[str, Any]] | None:
    """The calibration sample's routing features that training recorded beside the adapter (or its run), (n, d);
    a record from before features were kept yields its centroid alone, (1, d)."""
    candidates = [adapter_dir / ROUTER_CALIBRATION]
    if adapter_dir.parent.name == "checkpoints":  # OUT/checkpoints/checkpoint-N: the run directory holds the file
        candidates.append(adapter_dir.parent.parent / ROUTER_CALIBRATION)
    for path in candidates:
        if path.is_file():
            try:
                record = load_router_calibration(path, adapter_name)
            except ValueError as error:
                raise ExportError(f"{error} Delete it and pass --calibration-data to recompute it.") from None
            features = record.features if record.features is not None else record.centroid.unsqueeze(0)
            return features, {"source": "recorded by training", "file": str(path.resolve()), **record.meta}
    return None


def calibration_routes(router: TuckARouter, features: torch.Tensor, source: dict) -> CalibrationRoutes:
    """The routes of ``features`` under the router, per sequence (the redraw router: over REDRAW_DRAWS draws)."""
    draws = [(0, i) for i in range(REDRAW_DRAWS)] if router.draws_routes else [(0, 0)]
    groups, gates, scores = [], [], []
    for draw in draws:
        score = router.scores(router.logits(features, draw))
        route = router.route(score)
        groups.append(route.group)
        gates.append(route.gates)
        scores.append(score)
    routes = ActiveRoute(torch.cat(groups), torch.cat(gates))
    return CalibrationRoutes.of(router, routes, torch.cat(scores), source)


def calibration_sample(
    adapter_dir: Path, adapter_name: str, width: int, features_from_data: FeaturesFromData | None, sequences: bool
) -> tuple[torch.Tensor, dict[str, Any]] | None:
    """The calibration sample's routing features, (n, d), and where they come from: the training record, else
    ``features_from_data`` (``--calibration-data``), which is also used when ``sequences`` are needed and the record
    holds the centroid alone; None when neither has them. Features of another width are an ExportError."""
    found = recorded_features(adapter_dir, adapter_name)
    if features_from_data is not None and (found is None or (sequences and found[0].shape[0] == 1)):
        found = features_from_data()
    if found is not None and found[0].shape[-1] != width:
        raise ExportError(
            f"The calibration features in {found[1].get('file', 'the calibration data')} have size "
            f"{found[0].shape[-1]}, but the adapter's router expects {width}: they belong to another model. Pass "
            "--calibration-data."
        )
    return found


def no_calibration_error(what: str, rule: str, adapter_dir: Path) -> ExportError:
    """The error for a rule that needs calibration features that neither training nor --calibration-data gave."""
    return ExportError(
        f"{rule}: needs the {what}, but {adapter_dir} has no {ROUTER_CALIBRATION} with them (tucka train writes "
        "it). Pass --calibration-data (a MetaMathQA .json/.jsonl or gsm8k-train) to recompute them"
    )


def check_gates_reachable(gates: tuple[float, ...], router: TuckARouter) -> None:
    """Explicit gates must be gates the router can produce (each within ``gate_range``; summing to 1 when it
    normalises them): a fold of gates no input takes serves no input as the adapter would."""
    low, high = router.gate_range()
    shown = ",".join(f"{g:g}" for g in gates)
    if not all(low - 1e-6 <= g <= high + 1e-6 for g in gates):
        raise ExportError(
            f"--route group:I:{shown}: this router's gates lie in [{low:.4f}, {high:.4f}] (t={router.t}); no input "
            "takes these. Give gates in that range, or --route group:I for the group's mean calibration gates."
        )
    if router.normalize_gates and abs(sum(gates) - 1) > 1e-6:
        raise ExportError(f"--route group:I:{shown}: this router's gates sum to 1; these sum to {sum(gates):g}.")


def choose_route(
    model: nn.Module, spec: RouteSpec, adapter_dir: Path, features_from_data: FeaturesFromData | None
) -> ChosenRoute:
    """The selection to fold for the (single) TuckA adapter of ``model``, checked against its k and t.

    The calibration features come from the training record, else from ``features_from_data``
    (``--calibration-data``); an explicit route needs none.
    """
    layers = routing_layers(model)
    if len(layers) != 1:
        raise ExportError(f"The model holds {len(layers)} TuckA adapters ({', '.join(layers)}); export folds one.")
    ((name, layer),) = layers.items()
    router = layer.tucka_state[name].router
    k, t = router.k, router.t
    if spec.group is not None and not 0 <= spec.group < k:
        raise ExportError(f"--route: group {spec.group} is out of range; this adapter has k={k} groups: 0..{k - 1}.")
    if spec.kind == "explicit" and len(spec.gates) != t:
        raise ExportError(f"--route: {len(spec.gates)} gates given, but each group has t={t} experts: give {t}.")
    if spec.kind == "explicit":
        check_gates_reachable(spec.gates, router)
    if spec.kind == "centroid" and router.degenerate_at_centre:
        raise ExportError(
            f"--route centroid: under the {router.kind} router the calibration centroid's route is degenerate (h - "
            "e_bar = 0 scores every expert 0.5); use --route expected (default) or majority."
        )

    needs_sequences = spec.kind in ("expected", "majority", "group")
    found = calibration_sample(adapter_dir, name, layer.in_features, features_from_data, needs_sequences)
    calibration, centroid = None, None
    if found is not None:
        features, source = found
        frozen = router.frozen_copy()
        if features.shape[0] > 1:  # a record from before features were kept holds the centroid alone
            calibration = calibration_routes(frozen, features.float(), source)
        if spec.kind == "centroid":
            active = frozen.route_features(features.float().mean(dim=0, keepdim=True))
            centroid = Route(int(active.group[0]), active.gates[0].tolist())

    def chosen(route: Route | RouteMixture, how: str, share: float | None) -> ChosenRoute:
        return ChosenRoute(route, name, k, t, router.kind, how, share, calibration)

    def share_of(group: int) -> float | None:
        return calibration.share[group] if calibration is not None else None

    if spec.kind == "explicit":
        return chosen(Route(spec.group, spec.gates), "explicit gates (--route)", share_of(spec.group))
    if spec.kind == "centroid" and centroid is not None:
        return chosen(centroid, "the router's choice for the calibration centroid", share_of(centroid.group))
    if calibration is None:
        what = "centroid" if spec.kind == "centroid" else "routing features of calibration sequences"
        error = no_calibration_error(what, f"--route {spec.kind}", adapter_dir)
        raise ExportError(f"{error}, or choose the route yourself: --route group:I:g1,g2,...")
    share, gates = calibration.share, calibration.mean_gates
    if spec.kind == "group":
        how = f"group {spec.group} (--route), mean gates of the calibration sequences routed to it"
        return chosen(Route(spec.group, gates[spec.group]), how, share[spec.group])
    if spec.kind == "majority":
        group = max(range(k), key=lambda i: share[i])
        return chosen(Route(group, gates[group]), "the group most calibration sequences take, mean gates", share[group])
    mixture = RouteMixture([(share[i], Route(i, gates[i])) for i in range(k) if share[i] > 0])
    return chosen(mixture, "the mean update over the calibration sequences' routes (exact in expectation)", None)
