"""Value objects of a placement decision: what is asked, what the scheduler knows of a node, and
the answer, which is either a :class:`Placement` or an :class:`Unschedulable` that says why."""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..errors import OrchestratorError
from .costs import AcceleratorCost

#: Attestation tiers, weakest first; a node qualifies for a request at its tier or below.
TIERS: Mapping[str, int] = {"none": 0, "software": 1, "tpm2": 2}

NO_NODES = "scheduler.no_nodes"


class SchedulerError(OrchestratorError):
    """A misuse of the scheduler (a bug in the caller), such as reserving one replica twice."""


@dataclass(frozen=True, slots=True)
class Prediction:
    """Predicted latency and energy of one inference of a model on one accelerator of a profile."""

    latency_ms: float
    energy_j: float


@dataclass(frozen=True)
class NodeInfo:
    """What the scheduler knows of one node at snapshot time."""

    id: str
    online: bool
    cordoned: bool
    labels: Mapping[str, str]
    accelerators: Mapping[str, frozenset[str]]  # available backend kind -> supported dtypes
    max_replicas: int
    memory_bytes: int  # 0: not limited
    active_w: float
    replicas: int = 0  # active replicas bound to the node
    memory_used: int = 0
    attestation_tier: str = "none"  # tier of the node's valid attestation result
    per_deployment: Mapping[str, int] = field(default_factory=dict)
    hardware_profile: str = ""  # key of the node's predictions in a PerformanceTable
    latency_scale: float = 1.0  # observed / predicted latency from live telemetry
    #: (accelerator kind, model) -> the node's own profile; overrides its class's prediction
    profiles: Mapping[tuple[str, str], Prediction] = field(default_factory=dict)
    #: accelerator kind -> its active watts per peak GOPS (nJ per operation at peak): which of the
    #: node's accelerators to prefer for a model nothing predicts (no profile, no cost model)
    nj_per_op: Mapping[str, float] = field(default_factory=dict)
    #: accelerator kind -> its cost model: predictions for models the node has not profiled
    costs: Mapping[str, AcceleratorCost] = field(default_factory=dict)


@dataclass(frozen=True)
class PlacementRequest:
    """One replica to place. ``model`` keys the predictions; ``replica_id`` makes reserve idempotent."""

    deployment: str
    accelerators: frozenset[str]  # acceptable kinds; empty = any
    dtypes: frozenset[str]  # dtypes the model needs
    memory_bytes: int
    selector: Mapping[str, str]
    attestation_tier: str = "none"
    model: str = ""
    max_latency_ms: float = 0.0  # latency SLO; 0 = none
    replica_id: str = ""
    avoid_node: str = ""  # never this node (a replica moving off it)


@dataclass(frozen=True)
class Placement:
    node_id: str
    accelerator: str
    score: float
    #: what the scheduler predicted there (p95 latency, joules per inference); NaN: no prediction.
    #: Explanations, not identity: left out of comparisons (NaN never equals itself).
    latency_ms: float = field(default=math.nan, compare=False)
    energy_j: float = field(default=math.nan, compare=False)
    #: what the predictions rest on (:data:`~.snapshot.BASIS`): "own profile", "profiles" (of
    #: nodes of the same hardware profile), "cost model", or "" (none)
    basis: str = field(default="", compare=False)

    def why(self) -> str:
        """The placement's reasons, for ``edgeward explain``."""
        text = f"score {self.score:.1f}"
        if self.accelerator:
            text += f" on {self.accelerator}"
        if math.isnan(self.energy_j):
            return (
                text
                + ": nothing predicts this model here yet (accelerator by nJ/op at peak, node by active W)"
            )
        latency = "" if math.isnan(self.latency_ms) else f"p95 {self.latency_ms:.2f} ms, "
        basis = f" ({self.basis})" if self.basis else ""
        return text + f": predicted {latency}{self.energy_j * 1e3:.3f} mJ per inference{basis}"


class Code(enum.Enum):
    """Outcome of one plugin, as in the Kubernetes scheduler framework."""

    SUCCESS = "success"
    UNSCHEDULABLE = "unschedulable"


@dataclass(frozen=True)
class FilterStatus:
    """What one filter plugin did to the fleet: how many nodes it ruled out, and why."""

    plugin: str
    code: Code
    reasons: Mapping[str, int]  # reason id -> nodes ruled out by it (first failing filter only)


@dataclass(frozen=True)
class Unschedulable:
    """No node fits; ``reasons`` counts the failing filter per node, e.g. {'scheduler.filter.offline': 2}.

    Each node is counted once, under the first filter of the profile that rules it out, so the
    counts add up to ``nodes``.
    """

    reasons: Mapping[str, int]
    nodes: int
    statuses: tuple[FilterStatus, ...] = ()

    @property
    def reason(self) -> str:
        if not self.reasons:
            return NO_NODES
        return max(self.reasons.items(), key=lambda kv: (kv[1], kv[0]))[0]

    @property
    def message(self) -> str:
        if not self.nodes:
            return "no nodes are registered"
        detail = ", ".join(f"{count} {reason}" for reason, count in sorted(self.reasons.items()))
        return f"0/{self.nodes} nodes are available: {detail}"
