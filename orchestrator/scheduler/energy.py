"""Energy moves: finding running replicas that a measured, significant and sustained energy saving
justifies moving (docs/scheduler.md, "Energy moves"). No IO and no clock of its own.

A replica is placed before any node has profiled its model, on predictions (cost models); once
nodes have profiled it (agents profile each model they run, on each of their accelerators that
can run it), the measured figures may show a much cheaper place. An *offer* is what the scheduler
would do with the replica now: its replacement placed by the same profile (filters and scores;
the replica itself left out of the spread counts), kept only when

- the place differs in hardware: another accelerator of the same node, or a node of another
  hardware profile (two nodes of one profile are the same hardware: a difference between their
  profiles is measurement noise, not a saving);
- both figures are measured: the replica's own node profiled the model where it runs, and the
  target's figure is a profile too (the target node's own, or that of nodes of its hardware
  profile), never a cost-model prediction;
- the saving, 1 - target / current joules per inference, is at least ``min_saving`` (hysteresis:
  the reverse move would cost more, so two places never swap a replica back and forth);
- the target is predicted (corrected by its live latency scale) at or under the SLO times
  ``slo_headroom``.

An offer becomes a move only once it has held for ``sustain_s`` (:class:`EnergyWatch`), within the
same disruption budget, cooldown and global rate as SLO moves; the reconciler then starts the
replacement and evicts the replica only once the replacement runs (make before break).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from .placement import Placement, PlacementRequest, SchedulerError
from .plan import PlacementPlan
from .snapshot import BASIS, LATENCY_FLOOR_MS, OWN_PROFILE, TABLE

#: The bases a target's figure may rest on for a move: measurements, not cost models.
MEASURED = frozenset({BASIS[OWN_PROFILE], BASIS[TABLE]})


@dataclass(frozen=True)
class EnergyPolicy:
    """When a saving is worth a move."""

    min_saving: float = 0.3  # least share of the replica's joules per inference the move saves
    sustain_s: float = 30.0  # how long the saving must hold before the replica moves
    slo_headroom: float = 0.8  # the target's corrected p95 must be at or under SLO x this

    def __post_init__(self) -> None:
        if not 0 < self.min_saving < 1:
            raise SchedulerError("min_saving must be in (0, 1)")
        if self.sustain_s < 0:
            raise SchedulerError("sustain_s must not be negative")
        if not 0 < self.slo_headroom <= 10:
            raise SchedulerError("slo_headroom must be in (0, 10]")


@dataclass(frozen=True)
class RunningReplica:
    """A running replica as an energy move sees it."""

    replica_id: str
    node_id: str
    accelerator: str
    energy_j: float  # measured on its node (the node's own profile of the model there)
    request: PlacementRequest  # its replacement: same deployment and needs, a new replica id


@dataclass(frozen=True)
class EnergyOffer:
    """Where a replica's replacement would go, reserved in the plan, and what it saves."""

    replica: RunningReplica
    placement: Placement

    @property
    def saving(self) -> float:
        return 1.0 - self.placement.energy_j / self.replica.energy_j

    def why(self) -> str:
        """How the move explains itself on the replacement (``edgeward explain``)."""
        r, p = self.replica, self.placement
        return (
            f"moved from {r.node_id}/{r.accelerator} ({r.energy_j * 1e3:.3f} mJ per inference, own profile): "
            f"predicted {p.energy_j * 1e3:.3f} mJ here ({p.basis}), {100 * self.saving:.0f} % less"
        )


def energy_offers(
    plan: PlacementPlan, replicas: Sequence[RunningReplica], policy: EnergyPolicy, limit: int
) -> list[EnergyOffer]:
    """Up to ``limit`` offers, the largest possible savings tried first; each offer's replacement
    stays reserved in ``plan`` (``plan.unreserve`` it when the move is not made).

    Replicas whose saving could not reach ``min_saving`` even on the cheapest measured place of
    their model anywhere in the fleet are not tried, so a settled fleet costs one vectorised pass.
    """
    if limit <= 0 or not replicas:
        return []
    snap = plan.snapshot
    cheapest = np.full(len(snap.models), np.inf)
    np.minimum.at(cheapest, snap.own_model, snap.own_energy_j)
    index = {m: i for i, m in enumerate(snap.models)}
    bound = [
        cheapest[index[r.request.model]] / r.energy_j if r.request.model in index and r.energy_j > 0 else 1.0
        for r in replicas
    ]
    tried = sorted(
        (b, r.replica_id, r) for b, r in zip(bound, replicas, strict=True) if b <= 1 - policy.min_saving
    )
    offers: list[EnergyOffer] = []
    for _, _, replica in tried:
        if len(offers) >= limit:
            break
        offer = _offer(plan, replica, policy)
        if offer is not None:
            offers.append(offer)
    return offers


def _offer(plan: PlacementPlan, replica: RunningReplica, policy: EnergyPolicy) -> EnergyOffer | None:
    req = replica.request
    plan.release(replica.node_id, req.deployment)
    try:
        result = plan.place(req)
    finally:
        plan.restore(replica.node_id, req.deployment)
    if not isinstance(result, Placement):
        return None
    offer = EnergyOffer(replica, result)
    if (
        _interchangeable(plan, replica, result)
        or result.basis not in MEASURED
        or not offer.saving >= policy.min_saving  # NaN (no prediction) is no saving
        or not _meets_slo(plan, result, req.max_latency_ms * policy.slo_headroom)
    ):
        plan.unreserve(req.replica_id)
        return None
    return offer


def _interchangeable(plan: PlacementPlan, replica: RunningReplica, placed: Placement) -> bool:
    """The same accelerator kind on a node of the same hardware profile (or the very place): the
    same hardware, so a difference between the two nodes' profiles is measurement noise (a busy
    moment while one of them profiled), not a saving."""
    if placed.accelerator != replica.accelerator:
        return False
    snap = plan.snapshot
    here, there = snap.node_class[snap.index(replica.node_id)], snap.node_class[snap.index(placed.node_id)]
    return snap.classes[here].profile == snap.classes[there].profile


def _meets_slo(plan: PlacementPlan, placed: Placement, limit_ms: float) -> bool:
    """The target's predicted p95, corrected by the node's live latency scale, within ``limit_ms``
    (no SLO: always); an unknown latency does not meet it."""
    if limit_ms <= 0:
        return True
    scale = float(plan.snapshot.latency_scale[plan.snapshot.index(placed.node_id)])
    return max(placed.latency_ms, LATENCY_FLOOR_MS) * scale <= limit_ms  # NaN compares False


class EnergyWatch:
    """Since when each replica has had an offer: a move waits until its offer has held
    ``sustain_s``. An offer that goes away (the saving fell under the threshold, the target
    filled up) starts the clock again."""

    def __init__(self, policy: EnergyPolicy) -> None:
        self.policy = policy
        self._since: dict[str, float] = {}

    def sustained(self, replica_id: str, now: float) -> bool:
        """Record an offer for ``replica_id`` seen at ``now``; True once offers have held long enough."""
        since = self._since.setdefault(replica_id, now)
        return now - since >= self.policy.sustain_s

    def keep_only(self, replica_ids: Iterable[str]) -> None:
        """Forget the replicas that had no offer this time."""
        keep = set(replica_ids)
        for rid in [r for r in self._since if r not in keep]:
            del self._since[rid]

    def next_due(self) -> float:
        """When the earliest watched offer will have held long enough (inf: none watched)."""
        return min(self._since.values(), default=math.inf) + self.policy.sustain_s


def replacement(req: PlacementRequest, replica_id: str) -> PlacementRequest:
    """The request that places a replica's replacement under a new id."""
    return replace(req, replica_id=replica_id, avoid_node="")
