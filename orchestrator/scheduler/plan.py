"""One scheduling pass over one snapshot: place, reserve and unreserve replicas.

The snapshot never changes; the plan keeps its own copy of what binding changes (free slots and
memory, load, replicas per deployment and zone) and updates it in place on every reservation, so a
batch never overcommits a node. The reconciler is the single committer of a plan's reservations.

Per placement, the work is a handful of numpy operations over the nodes that pass the static
filters; those nodes and their static scores are computed once per kind of request (see
:func:`shape_key`) and kept in a small LRU cache.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
from numpy.typing import NDArray

from .placement import Code, FilterStatus, Placement, PlacementRequest, SchedulerError, Unschedulable
from .plugins import FilterPlugin, ScorePlugin
from .shape import Nodes, RequestShape
from .snapshot import BASIS, FleetSnapshot

#: The only node left is the one the replica moves off.
AVOIDED = "scheduler.filter.avoided"
_SHAPE_CACHE = 64
_DENSE_CACHE = 16
_ALL = slice(None)


def shape_key(req: PlacementRequest) -> Hashable:
    """The request fields static plugins may read; requests with equal keys share one evaluation."""
    return (
        req.accelerators,
        req.dtypes,
        tuple(sorted(req.selector.items())),
        req.attestation_tier,
        req.model,
        req.max_latency_ms,
    )


@dataclass(frozen=True, eq=False)
class _Evaluated:
    shape: RequestShape
    candidates: NDArray[np.intp]  # nodes passing every static filter, ascending
    static_score: NDArray[np.float64]  # weighted sum of the static scores of the candidates
    # What the dynamic plugins index with: the candidates, or ``_ALL`` when every node is one, so
    # that they read their arrays whole (a view) instead of gathering every element (a copy each).
    select: Nodes


@dataclass(frozen=True)
class Reservation:
    replica_id: str
    node: int
    deployment: str
    memory_bytes: int
    placement: Placement


class PlacementPlan:
    """Placements being made on one immutable :class:`FleetSnapshot` (create with ``Scheduler.plan``)."""

    def __init__(
        self,
        snapshot: FleetSnapshot,
        filters: Sequence[FilterPlugin],
        scorers: Sequence[tuple[ScorePlugin, float]],
    ) -> None:
        self.snapshot = snapshot
        self._filters = tuple(filters)
        self._static_filters = tuple(f for f in filters if not f.dynamic)
        self._dynamic_filters = tuple(f for f in filters if f.dynamic)
        self._static_scorers = tuple((s, w) for s, w in scorers if not s.dynamic)
        self._dynamic_scorers = tuple((s, w) for s, w in scorers if s.dynamic)
        self._total_weight = sum(w for _, w in scorers) or 1.0

        self.slots_used = snapshot.slots_used.copy()
        self.has_slot = snapshot.slots_used < snapshot.slots_total
        self.memory_free = snapshot.memory_free.copy()
        share = 100.0 * (1.0 - self.slots_used / np.maximum(snapshot.slots_total, 1))
        self.free_share = np.clip(share, 0.0, 100.0)
        self.last_bound = -1
        self._per_deployment: dict[str, dict[int, int]] = {
            dep: dict(zip(idx.tolist(), cnt.tolist(), strict=True))
            for dep, (idx, cnt) in snapshot.per_deployment.items()
        }
        self._dense: OrderedDict[str, NDArray[np.int32]] = OrderedDict()
        self._zones: dict[str, NDArray[np.int32]] = {}
        self._shapes: OrderedDict[Hashable, _Evaluated] = OrderedDict()
        self._reservations: dict[str, Reservation] = {}
        self._anonymous = 0

    # ------------------------------------------------------------------ placing

    def place(self, req: PlacementRequest) -> Placement | Unschedulable:
        """Pick the best node for ``req`` and reserve it; the same ``replica_id`` gets the same answer."""
        if req.replica_id:
            held = self._reservations.get(req.replica_id)
            if held is not None:
                return held.placement
        evaluated = self._evaluate(req)
        candidates = evaluated.candidates
        if candidates.size:
            fit: NDArray[np.bool_] | None = None
            for plugin in self._dynamic_filters:
                for _reason, passes in plugin.filter(req, evaluated.shape, self, evaluated.select):
                    fit = passes if fit is None else fit & passes
            total = evaluated.static_score
            for scorer, weight in self._dynamic_scorers:
                total = total + weight * scorer.score(req, evaluated.shape, self, evaluated.select, fit)
            masked = total if fit is None else np.where(fit, total, -np.inf)
            if req.avoid_node and req.avoid_node in self.snapshot.positions:
                avoid = np.searchsorted(candidates, self.snapshot.positions[req.avoid_node])
                if avoid < candidates.size and candidates[avoid] == self.snapshot.positions[req.avoid_node]:
                    masked = masked.copy()  # ``total`` may be the cached static score
                    masked[avoid] = -np.inf
            # Ties go to the highest node id: the last maximum in ascending id order.
            best = masked.size - 1 - int(np.argmax(masked[::-1]))
            if masked[best] > -np.inf:
                node = int(candidates[best])
                kind = evaluated.shape.kind_of(self.snapshot, node)
                at_node = np.array([node], np.intp)
                placement = Placement(
                    node_id=self.snapshot.node_ids[node],
                    accelerator=self.snapshot.kinds[kind] if kind >= 0 else "",
                    score=float(total[best]) / self._total_weight,
                    latency_ms=float(evaluated.shape.latency_at(self.snapshot, at_node)[0]),
                    energy_j=float(evaluated.shape.energy_at(self.snapshot, at_node)[0]),
                    basis=BASIS[evaluated.shape.basis_of(self.snapshot, node)],
                )
                self._reserve(req, node, placement)
                return placement
        return self._unschedulable(req, evaluated)

    def place_many(self, requests: Iterable[PlacementRequest]) -> list[Placement | Unschedulable]:
        """Place in order; each placement sees the capacity the previous ones took."""
        return [self.place(req) for req in requests]

    # ------------------------------------------------------------------ reservations

    @property
    def reservations(self) -> Mapping[str, Reservation]:
        """Replica id (generated for requests without one) -> reservation, in binding order."""
        return MappingProxyType(self._reservations)

    def reserve(self, req: PlacementRequest, node_id: str, accelerator: str = "") -> Placement:
        """Account for ``req`` on ``node_id`` without filtering (a binding decided elsewhere).

        Idempotent: reserving a replica again on the same node changes nothing; on another node
        it is a bug and raises ``SchedulerError``.
        """
        if not req.replica_id:
            raise SchedulerError("reserve needs a replica_id")
        node = self.snapshot.index(node_id)
        held = self._reservations.get(req.replica_id)
        if held is not None:
            if held.node != node:
                raise SchedulerError(
                    f"replica {req.replica_id!r} is reserved on {self.snapshot.node_ids[held.node]!r}, "
                    f"not {node_id!r}"
                )
            return held.placement
        placement = Placement(node_id, accelerator, 0.0)
        self._reserve(req, node, placement)
        return placement

    def unreserve(self, replica_id: str) -> None:
        """Give back what a reservation took; unknown or already released ids are ignored."""
        held = self._reservations.pop(replica_id, None)
        if held is not None:
            self._account(held.node, held.deployment, held.memory_bytes, -1)

    def _reserve(self, req: PlacementRequest, node: int, placement: Placement) -> None:
        replica_id = req.replica_id
        if not replica_id:
            self._anonymous += 1
            replica_id = f"{req.deployment}#{self._anonymous}"
        self._reservations[replica_id] = Reservation(
            replica_id, node, req.deployment, req.memory_bytes, placement
        )
        self._account(node, req.deployment, req.memory_bytes, +1)
        self.last_bound = node

    def release(self, node_id: str, deployment: str) -> None:
        """Leave one running replica of ``deployment`` on ``node_id`` out of the spread counts while
        a replacement for it is placed (:meth:`restore` undoes it). It keeps its slot and memory:
        it runs until its replacement does (make before break)."""
        self._count(self.snapshot.index(node_id), deployment, -1)

    def restore(self, node_id: str, deployment: str) -> None:
        """Count the replica :meth:`release` left out again."""
        self._count(self.snapshot.index(node_id), deployment, +1)

    def _account(self, node: int, deployment: str, memory: int, sign: int) -> None:
        self.slots_used[node] += sign
        self.has_slot[node] = self.slots_used[node] < self.snapshot.slots_total[node]
        self.memory_free[node] -= sign * memory
        total = max(int(self.snapshot.slots_total[node]), 1)
        self.free_share[node] = min(max(100.0 * (1.0 - self.slots_used[node] / total), 0.0), 100.0)
        self._count(node, deployment, sign)

    def _count(self, node: int, deployment: str, sign: int) -> None:
        counts = self._per_deployment.setdefault(deployment, {})
        left = counts.get(node, 0) + sign
        if left:
            counts[node] = left
        else:
            counts.pop(node, None)
        dense = self._dense.get(deployment)
        if dense is not None:
            dense[node] += sign
        zones = self._zones.get(deployment)
        if zones is not None:
            zones[self.snapshot.zone[node]] += sign

    # ------------------------------------------------------------------ state read by plugins

    def deployment_counts(self, deployment: str) -> NDArray[np.int32] | None:
        """Replicas of ``deployment`` per node (None while it has none); do not modify."""
        if not self._per_deployment.get(deployment):
            return None
        dense = self._dense.get(deployment)
        if dense is None:
            dense = np.zeros(self.snapshot.size, np.int32)
            counts = self._per_deployment[deployment]
            dense[list(counts)] = list(counts.values())
            self._dense[deployment] = dense
            if len(self._dense) > _DENSE_CACHE:
                self._dense.popitem(last=False)
        else:
            self._dense.move_to_end(deployment)
        return dense

    def zone_counts(self, deployment: str) -> NDArray[np.int32] | None:
        """Replicas of ``deployment`` per zone (None while it has none); do not modify."""
        if not self._per_deployment.get(deployment):
            return None
        zones = self._zones.get(deployment)
        if zones is None:
            counts = self._per_deployment[deployment]
            zones = np.bincount(
                self.snapshot.zone[list(counts)],
                weights=list(counts.values()),
                minlength=len(self.snapshot.zones),
            ).astype(np.int32)
            self._zones[deployment] = zones
        return zones

    # ------------------------------------------------------------------ static evaluation

    def _evaluate(self, req: PlacementRequest) -> _Evaluated:
        key = shape_key(req)
        evaluated = self._shapes.get(key)
        if evaluated is not None:
            self._shapes.move_to_end(key)
            return evaluated
        shape = RequestShape.resolve(self.snapshot, req)
        passes = np.ones(self.snapshot.size, np.bool_)
        for plugin in self._static_filters:
            for _reason, mask in plugin.filter(req, shape, self, _ALL):
                passes &= mask
        candidates = np.flatnonzero(passes)
        static = np.zeros(candidates.size)
        for scorer, weight in self._static_scorers:
            static += weight * scorer.score(req, shape, self, candidates, None)
        select = _ALL if candidates.size == self.snapshot.size else candidates
        evaluated = _Evaluated(shape, candidates, static, select)
        self._shapes[key] = evaluated
        if len(self._shapes) > _SHAPE_CACHE:
            self._shapes.popitem(last=False)
        return evaluated

    def _unschedulable(self, req: PlacementRequest, evaluated: _Evaluated) -> Unschedulable:
        """Count every node once, under the first filter of the profile that rules it out."""
        remaining = np.ones(self.snapshot.size, np.bool_)
        reasons: dict[str, int] = {}
        statuses = []
        for plugin in self._filters:
            rejected: dict[str, int] = {}
            for reason, passes in plugin.filter(req, evaluated.shape, self, _ALL):
                count = int(np.count_nonzero(remaining & ~passes))
                if count:
                    rejected[reason] = rejected.get(reason, 0) + count
                    reasons[reason] = reasons.get(reason, 0) + count
                remaining &= passes
            code = Code.UNSCHEDULABLE if rejected else Code.SUCCESS
            statuses.append(FilterStatus(plugin.name, code, rejected))
        avoided = self.snapshot.positions.get(req.avoid_node)
        if avoided is not None and remaining[avoided]:
            reasons[AVOIDED] = 1
        return Unschedulable(reasons, self.snapshot.size, tuple(statuses))
