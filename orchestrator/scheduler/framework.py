"""The scheduling framework: filter plugins rule nodes out with a reason, score plugins rank the
rest on a 0-100 scale, and the best node is bound.

Plugins are registered by name in :data:`FILTERS` and :data:`SCORERS`; a profile enables a list
of them with weights. The scheduler works on an immutable snapshot of the fleet taken once per
reconcile pass; the reconciler is the single committer of the resulting bindings.

Every filter says *why* a node is unfit, with a machine-readable id such as
``scheduler.filter.accelerator``, so a pending replica carries an exact explanation.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

TIERS = {"none": 0, "software": 1, "tpm2": 2}


@dataclass(frozen=True)
class NodeInfo:
    """What the scheduler knows of one node at snapshot time."""

    id: str
    online: bool
    cordoned: bool
    labels: Mapping[str, str]
    accelerators: Mapping[str, frozenset[str]]  # available backend kind -> supported dtypes
    max_replicas: int
    memory_bytes: int
    active_w: float
    replicas: int = 0                 # active replicas bound to the node
    memory_used: int = 0
    attestation_tier: str = "none"    # tier of the node's valid attestation result
    per_deployment: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class PlacementRequest:
    deployment: str
    accelerators: frozenset[str]      # acceptable kinds; empty = any
    dtypes: frozenset[str]            # dtypes the model needs
    memory_bytes: int
    selector: Mapping[str, str]
    attestation_tier: str = "none"


@dataclass(frozen=True)
class Placement:
    node_id: str
    accelerator: str
    score: float


@dataclass(frozen=True)
class Unschedulable:
    """No node fits; ``reasons`` counts the failing filter per node, e.g. {'scheduler.filter.offline': 2}."""

    reasons: Mapping[str, int]
    nodes: int

    @property
    def reason(self) -> str:
        if not self.reasons:
            return "scheduler.no_nodes"
        return max(self.reasons.items(), key=lambda kv: (kv[1], kv[0]))[0]

    @property
    def message(self) -> str:
        if not self.nodes:
            return "no nodes are registered"
        detail = ", ".join(f"{count} {reason}" for reason, count in sorted(self.reasons.items()))
        return f"0/{self.nodes} nodes are available: {detail}"


FilterFn = Callable[[PlacementRequest, NodeInfo], str | None]
ScoreFn = Callable[[PlacementRequest, NodeInfo, Sequence[NodeInfo]], float]


def _ready(req: PlacementRequest, node: NodeInfo) -> str | None:
    if not node.online:
        return "scheduler.filter.offline"
    if node.cordoned:
        return "scheduler.filter.cordoned"
    return None


def _attestation(req: PlacementRequest, node: NodeInfo) -> str | None:
    if TIERS[node.attestation_tier] < TIERS[req.attestation_tier]:
        return "scheduler.filter.attestation"
    return None


def _accelerator(req: PlacementRequest, node: NodeInfo) -> str | None:
    return None if _pick_accelerator(req, node) else "scheduler.filter.accelerator"


def _capacity(req: PlacementRequest, node: NodeInfo) -> str | None:
    if node.replicas >= node.max_replicas:
        return "scheduler.filter.capacity"
    if node.memory_bytes and node.memory_used + req.memory_bytes > node.memory_bytes:
        return "scheduler.filter.memory"
    return None


def _selector(req: PlacementRequest, node: NodeInfo) -> str | None:
    for key, value in req.selector.items():
        if node.labels.get(key) != value:
            return "scheduler.filter.selector"
    return None


def _spread(req: PlacementRequest, node: NodeInfo, fit: Sequence[NodeInfo]) -> float:
    most = max(n.per_deployment.get(req.deployment, 0) for n in fit)
    if most == 0:
        return 100.0
    return 100.0 * (1 - node.per_deployment.get(req.deployment, 0) / (most + 1))


def _least_loaded(req: PlacementRequest, node: NodeInfo, fit: Sequence[NodeInfo]) -> float:
    return 100.0 * (1 - node.replicas / max(node.max_replicas, 1))


def _energy(req: PlacementRequest, node: NodeInfo, fit: Sequence[NodeInfo]) -> float:
    lo = min(n.active_w for n in fit)
    hi = max(n.active_w for n in fit)
    return 100.0 if hi == lo else 100.0 * (hi - node.active_w) / (hi - lo)


FILTERS: dict[str, FilterFn] = {
    "ready": _ready,
    "attestation": _attestation,
    "accelerator": _accelerator,
    "capacity": _capacity,
    "selector": _selector,
}
SCORERS: dict[str, ScoreFn] = {"spread": _spread, "least-loaded": _least_loaded, "energy": _energy}

DEFAULT_FILTERS = ("ready", "selector", "attestation", "accelerator", "capacity")
DEFAULT_WEIGHTS = {"spread": 4.0, "least-loaded": 2.0, "energy": 1.0}


def _pick_accelerator(req: PlacementRequest, node: NodeInfo) -> str | None:
    for kind in sorted(node.accelerators):
        if req.accelerators and kind not in req.accelerators:
            continue
        if req.dtypes <= node.accelerators[kind]:
            return kind
    return None


class Scheduler:
    """Places one replica at a time on a snapshot, updating the snapshot as it binds."""

    def __init__(
        self,
        filters: Sequence[str] = DEFAULT_FILTERS,
        weights: Mapping[str, float] = DEFAULT_WEIGHTS,
    ) -> None:
        unknown = [n for n in filters if n not in FILTERS] + [n for n in weights if n not in SCORERS]
        if unknown:
            raise ValueError(f"unknown scheduler plugins: {unknown}")
        self._filters = [(name, FILTERS[name]) for name in filters]
        self._scorers = [(SCORERS[name], w) for name, w in weights.items() if w > 0]

    def place(self, req: PlacementRequest, nodes: dict[str, NodeInfo]) -> Placement | Unschedulable:
        reasons: Counter[str] = Counter()
        fit: list[NodeInfo] = []
        for node in nodes.values():
            for _name, check in self._filters:
                why = check(req, node)
                if why is not None:
                    reasons[why] += 1
                    break
            else:
                fit.append(node)
        if not fit:
            return Unschedulable(dict(reasons), len(nodes))
        total_weight = sum(w for _, w in self._scorers) or 1.0
        best = max(
            fit,
            key=lambda n: (sum(fn(req, n, fit) * w for fn, w in self._scorers) / total_weight, n.id),
        )
        score = sum(fn(req, best, fit) * w for fn, w in self._scorers) / total_weight
        accelerator = _pick_accelerator(req, best)
        assert accelerator is not None
        per_dep = dict(best.per_deployment)
        per_dep[req.deployment] = per_dep.get(req.deployment, 0) + 1
        nodes[best.id] = NodeInfo(
            **{**best.__dict__, "replicas": best.replicas + 1, "memory_used": best.memory_used + req.memory_bytes,
               "per_deployment": per_dep}
        )
        return Placement(best.id, accelerator, score)
