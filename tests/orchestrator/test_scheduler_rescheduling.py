"""Rescheduling policy: disruption budget and SLO hysteresis, as pure functions."""

import pytest

from orchestrator.scheduler import SchedulerError
from orchestrator.scheduler.rescheduling import (
    MoveCandidate,
    MoveCause,
    SloPolicy,
    SloState,
    allowed_disruptions,
    observe_latency,
    record_move,
    select_moves,
    sustained_violation,
)


@pytest.mark.parametrize(
    ("desired", "available", "max_unavailable", "allowed"),
    [
        (4, 4, 1, 1),
        (4, 3, 1, 0),          # one is already down: the budget is spent
        (4, 2, 1, 0),
        (10, 10, "25%", 3),    # percentages round up
        (10, 9, "25%", 2),
        (1, 1, "10%", 1),
        (3, 3, 0, 0),
        (3, 3, "0%", 0),
        (0, 0, 1, 1),
        (2, 5, 1, 1),          # surplus replicas do not add to the budget
    ],
)
def test_allowed_disruptions(desired, available, max_unavailable, allowed):
    assert allowed_disruptions(desired, available, max_unavailable) == allowed


@pytest.mark.parametrize("bad", ["25", "101%", "-1%", "a%", -1])
def test_bad_budgets_are_refused(bad):
    with pytest.raises(SchedulerError):
        allowed_disruptions(4, 4, bad)


def test_forced_moves_ignore_the_budget_and_voluntary_ones_spend_it():
    candidates = [
        MoveCandidate("a-3", "a", MoveCause.SLO_VIOLATION),
        MoveCandidate("a-1", "a", MoveCause.NODE_LOST),
        MoveCandidate("a-2", "a", MoveCause.DRAIN),
        MoveCandidate("a-4", "a", MoveCause.DRAIN),
        MoveCandidate("b-1", "b", MoveCause.QUARANTINE),
        MoveCandidate("b-2", "b", MoveCause.SLO_VIOLATION),
        MoveCandidate("c-1", "c", MoveCause.SLO_VIOLATION),
    ]
    chosen = select_moves(candidates, {"a": 2, "b": 0})
    assert [c.replica_id for c in chosen] == ["a-1", "b-1", "a-2", "a-4"]
    assert select_moves(reversed(candidates), {"a": 2, "b": 0}) == chosen
    assert MoveCause.QUARANTINE.forced
    assert not MoveCause.DRAIN.forced
    assert MoveCause.SLO_VIOLATION.value == "reschedule.slo_violation"


POLICY = SloPolicy(breach_ratio=1.0, recover_ratio=0.8, sustain_s=30, cooldown_s=120)


def replay(samples, slo=100.0, state=None):
    """Fold (time, latency) samples; return the state and when a move was called for."""
    state = state or SloState()
    calls = []
    for now, latency in samples:
        state = observe_latency(state, latency, slo, now, POLICY)
        if sustained_violation(state, now, POLICY):
            calls.append(now)
    return state, calls


@pytest.mark.parametrize(
    ("samples", "calls"),
    [
        ([(0, 150), (10, 150), (20, 150), (30, 150), (40, 150)], [30, 40]),   # sustained
        ([(0, 150), (10, 150), (20, 70), (30, 150), (40, 150)], []),          # recovered: clock restarts
        ([(0, 150), (10, 90), (20, 90), (30, 150)], [30]),                    # the band keeps the breach
        ([(0, 150), (10, None), (20, None), (30, 150)], [30]),                # no data keeps it too
        ([(0, 100), (10, 100), (40, 100)], []),                               # at the SLO is no breach
        ([(0, 90), (30, 90), (60, 90)], []),                                  # inside the band
    ],
)
def test_slo_hysteresis(samples, calls):
    assert replay(samples)[1] == calls


def test_no_slo_clears_a_breach():
    state, _ = replay([(0, 150)])
    assert observe_latency(state, 150, 0, 10, POLICY).breaching_since is None


def test_a_moved_replica_cools_down():
    moved = record_move(35)
    assert moved == SloState(breaching_since=None, moved_at=35)
    _state, calls = replay([(40, 150), (70, 150), (100, 150), (155, 150), (160, 150)], state=moved)
    assert calls == [155, 160]


def test_policy_is_checked():
    with pytest.raises(SchedulerError):
        SloPolicy(breach_ratio=0.8, recover_ratio=0.9)
    with pytest.raises(SchedulerError):
        SloPolicy(sustain_s=-1)
