"""When to move replicas that are already running: pure functions, no IO, no clock of their own.

Two kinds of move:

- *forced* (the node is lost or quarantined): the replica is gone or must not run there; it moves
  at once, whatever the budget (it is already unavailable);
- *voluntary* (a cordon/drain, a sustained SLO violation): the replica still serves, so moving it
  costs availability and respects the deployment's disruption budget.

An SLO violation is *sustained* when the replica's latency is above the SLO in ``breach_windows``
consecutive telemetry windows, and it clears only once a window is back well under it
(``recover_ratio``; hysteresis), so a replica near its SLO does not flap between nodes; after a
move the replica is left alone for a cooldown.
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
    """Thresholds of the SLO hysteresis: ratios of the SLO, a window count and seconds."""

    breach_ratio: float = 1.0  # a window with p95 above slo * breach_ratio is over
    recover_ratio: float = 0.8  # a window at or below slo * recover_ratio ends a violation
    breach_windows: int = 3  # consecutive windows over that make a violation sustained
    cooldown_s: float = 120.0  # after a move, the replica is not moved again for this long

    def __post_init__(self) -> None:
        if not 0 < self.recover_ratio <= self.breach_ratio:
            raise SchedulerError("need 0 < recover_ratio <= breach_ratio")
        if self.breach_windows < 1:
            raise SchedulerError("breach_windows must be at least 1")
        if self.cooldown_s < 0:
            raise SchedulerError("cooldown_s must not be negative")


@dataclass(frozen=True)
class SloState:
    """What the hysteresis remembers of one replica."""

    over: int = 0  # consecutive windows over the breach threshold
    violating: bool = False  # set after breach_windows over; cleared by a window under recover
    last_p95_ms: float = 0.0  # the newest window's figure, for explanations
    moved_at: float | None = None  # monotonic time of the last move


def observe_window(state: SloState, p95_ms: float, slo_ms: float, policy: SloPolicy) -> SloState:
    """Fold one telemetry window's p95 latency into ``state``.

    A window over the breach threshold extends the run of windows over; any other window ends
    the run. A violation starts when the run reaches ``breach_windows`` and ends only at a window
    at or under the recover threshold: between the two thresholds (the band) it holds. Without an
    SLO (``slo_ms <= 0``) there is nothing to violate.
    """
    if slo_ms <= 0:
        return replace(state, over=0, violating=False, last_p95_ms=p95_ms)
    if p95_ms > slo_ms * policy.breach_ratio:
        over = state.over + 1
        return replace(
            state, over=over, violating=state.violating or over >= policy.breach_windows, last_p95_ms=p95_ms
        )
    violating = state.violating and p95_ms > slo_ms * policy.recover_ratio
    return replace(state, over=0, violating=violating, last_p95_ms=p95_ms)


def sustained_violation(state: SloState, now: float, policy: SloPolicy) -> bool:
    """True when the replica violates its SLO and is out of its cooldown."""
    if not state.violating:
        return False
    return state.moved_at is None or now - state.moved_at >= policy.cooldown_s


def record_move(now: float) -> SloState:
    """The state of a replica just moved: in its cooldown, with a clean record on its new node."""
    return SloState(moved_at=now)


class MoveRate:
    """A global cap on voluntary moves: at most ``per_minute`` in any sliding minute."""

    def __init__(self, per_minute: int) -> None:
        if per_minute < 0:
            raise SchedulerError(f"per_minute must not be negative, got {per_minute}")
        self.per_minute = per_minute
        self._times: list[float] = []

    def available(self, now: float) -> int:
        self._times = [t for t in self._times if now - t < 60.0]
        return max(0, self.per_minute - len(self._times))

    def spend(self, now: float) -> None:
        self._times.append(now)
