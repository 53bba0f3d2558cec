"""Replica lifecycle: the phases and the only transitions allowed between them."""

from __future__ import annotations

from enum import StrEnum

from edgeward.v1 import node_pb2

from .errors import IllegalTransition


class Phase(StrEnum):
    PENDING = "Pending"  # wanted, not yet placed (or no node fits: see the reason)
    DISPATCHED = "Dispatched"  # bound to a node, deploy command sent
    LOADING = "Loading"  # the node acknowledged and is fetching/loading the model
    RUNNING = "Running"  # the node serves it
    FAILED = "Failed"  # the node could not load or keep it; the reconciler replaces it
    EVICTED = "Evicted"  # being removed (scale-down, delete, drain, node lost); terminal


TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    Phase.PENDING: frozenset({Phase.DISPATCHED, Phase.EVICTED}),
    Phase.DISPATCHED: frozenset({Phase.LOADING, Phase.RUNNING, Phase.FAILED, Phase.EVICTED}),
    Phase.LOADING: frozenset({Phase.RUNNING, Phase.FAILED, Phase.EVICTED}),
    Phase.RUNNING: frozenset({Phase.LOADING, Phase.FAILED, Phase.EVICTED}),
    Phase.FAILED: frozenset({Phase.EVICTED}),
    Phase.EVICTED: frozenset(),
}

# Phases in which a replica occupies (or is about to occupy) a slot on its node.
ACTIVE = frozenset({Phase.DISPATCHED, Phase.LOADING, Phase.RUNNING})


def check_transition(current: Phase, new: Phase) -> None:
    if new != current and new not in TRANSITIONS[current]:
        raise IllegalTransition(f"replica phase {current} -> {new} is not allowed")


_TO_PB = {
    Phase.PENDING: node_pb2.REPLICA_PHASE_PENDING,
    Phase.DISPATCHED: node_pb2.REPLICA_PHASE_DISPATCHED,
    Phase.LOADING: node_pb2.REPLICA_PHASE_LOADING,
    Phase.RUNNING: node_pb2.REPLICA_PHASE_RUNNING,
    Phase.FAILED: node_pb2.REPLICA_PHASE_FAILED,
    Phase.EVICTED: node_pb2.REPLICA_PHASE_EVICTED,
}
_FROM_PB: dict[int, Phase] = {v: k for k, v in _TO_PB.items()}


def to_pb(phase: Phase) -> node_pb2.ReplicaPhase:
    return _TO_PB[phase]


def from_pb(value: int) -> Phase | None:
    return _FROM_PB.get(value)
