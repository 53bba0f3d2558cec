"""When to move replicas that are already running: pure functions, no IO, no clock of their own.

Two kinds of move:

- *forced* (the node is lost or quarantined): the replica is gone or must not run there; it moves
  at once, whatever the budget (it is already unavailable);
- *voluntary* (a cordon/drain, a sustained SLO violation): the replica still serves, so moving it
  costs availability and respects the deployment's disruption budget.

An SLO violation is *sustained* when the replica's latency stays above the SLO for a while, and it
clears only once latency is back well under it (hysteresis), so a replica near its SLO does not
flap between nodes; after a move the replica is left alone for a cooldown.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from .placement import SchedulerError

_PERCENT = re.compile(r"(\d{1,3})%")


class MoveCause(enum.Enum):
    """Why a running replica should move; the value is the reason id recorded on the replica."""

    NODE_LOST = "reschedule.node_lost"
    QUARANTINE = "reschedule.quarantine"
    DRAIN = "reschedule.drain"
    SLO_VIOLATION = "reschedule.slo_violation"

    @property
    def forced(self) -> bool:
        return self in (MoveCause.NODE_LOST, MoveCause.QUARANTINE)


# Voluntary moves spend the budget in this order: an operator's drain before an SLO repair.
_PRIORITY = {MoveCause.NODE_LOST: 0, MoveCause.QUARANTINE: 1, MoveCause.DRAIN: 2, MoveCause.SLO_VIOLATION: 3}


def allowed_disruptions(desired: int, available: int, max_unavailable: int | str) -> int:
    """How many more replicas of a deployment may be taken down now.

    ``max_unavailable`` is a count or a percentage of ``desired`` ("25%", rounded up, as in
    Kubernetes); replicas already unavailable (``desired - available``) use the budget first.
    """
    if desired < 0 or available < 0:
        raise SchedulerError(f"negative replica counts: desired={desired}, available={available}")
    if isinstance(max_unavailable, str):
        match = _PERCENT.fullmatch(max_unavailable)
        if match is None or int(match.group(1)) > 100:
            raise SchedulerError(f"max_unavailable must be a count or 0-100%, got {max_unavailable!r}")
        budget = math.ceil(desired * int(match.group(1)) / 100)
    elif max_unavailable < 0:
        raise SchedulerError(f"max_unavailable must not be negative, got {max_unavailable}")
    else:
        budget = max_unavailable
    return max(0, budget - max(0, desired - available))


@dataclass(frozen=True)
class MoveCandidate:
    replica_id: str
    deployment: str
    cause: MoveCause


def select_moves(
    candidates: Iterable[MoveCandidate], allowed: Mapping[str, int]
) -> tuple[MoveCandidate, ...]:
    """The candidates to move now: every forced one, and voluntary ones within ``allowed``.

    ``allowed`` is :func:`allowed_disruptions` per deployment (missing: 0). The answer is in a
    fixed order (cause, then replica id), so equal inputs give equal plans.
    """
    left = dict(allowed)
    chosen = []
    for cand in sorted(candidates, key=lambda c: (_PRIORITY[c.cause], c.replica_id)):
        if cand.cause.forced:
            chosen.append(cand)
        elif left.get(cand.deployment, 0) > 0:
            left[cand.deployment] -= 1
            chosen.append(cand)
    return tuple(chosen)


@dataclass(frozen=True)
class SloPolicy:
    """Thresholds of the SLO hysteresis, as ratios of the SLO and seconds."""

    breach_ratio: float = 1.0     # latency above slo * breach_ratio is a breach
    recover_ratio: float = 0.8    # latency at or below slo * recover_ratio is healthy again
    sustain_s: float = 30.0       # a breach must last this long to call for a move
    cooldown_s: float = 120.0     # after a move, the replica is not moved again for this long

    def __post_init__(self) -> None:
        if not 0 < self.recover_ratio <= self.breach_ratio:
            raise SchedulerError("need 0 < recover_ratio <= breach_ratio")
        if self.sustain_s < 0 or self.cooldown_s < 0:
            raise SchedulerError("durations must not be negative")


@dataclass(frozen=True)
class SloState:
    """What the hysteresis remembers of one replica."""

    breaching_since: float | None = None   # monotonic time the current breach started
    moved_at: float | None = None          # monotonic time of the last move


def observe_latency(
    state: SloState, latency_ms: float | None, slo_ms: float, now: float, policy: SloPolicy
) -> SloState:
    """Fold one latency observation (e.g. a p95 window) into ``state``.

    Between the recover and breach thresholds nothing changes (that is the hysteresis band); no
    observation (None) or no SLO (``slo_ms <= 0``) leaves a breach as it is, or clears it.
    """
    if slo_ms <= 0:
        return replace(state, breaching_since=None)
    if latency_ms is None:
        return state
    if latency_ms > slo_ms * policy.breach_ratio:
        return state if state.breaching_since is not None else replace(state, breaching_since=now)
    if latency_ms <= slo_ms * policy.recover_ratio:
        return replace(state, breaching_since=None)
    return state


def sustained_violation(state: SloState, now: float, policy: SloPolicy) -> bool:
    """True when the replica has breached for ``sustain_s`` and is out of its cooldown."""
    if state.breaching_since is None or now - state.breaching_since < policy.sustain_s:
        return False
    return state.moved_at is None or now - state.moved_at >= policy.cooldown_s


def record_move(now: float) -> SloState:
    """The state of a replica just moved: in its cooldown, with a clean record on its new node."""
    return SloState(breaching_since=None, moved_at=now)
