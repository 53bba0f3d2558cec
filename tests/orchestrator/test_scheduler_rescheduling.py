"""Rescheduling policy: disruption budget and SLO hysteresis, as pure functions."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.scheduler import SchedulerError
from orchestrator.scheduler.rescheduling import (
    MoveCandidate,
    MoveCause,
    MoveRate,
    SloPolicy,
    SloState,
    allowed_disruptions,
    observe_window,
    record_move,
    select_moves,
    sustained_violation,
)


@pytest.mark.parametrize(
    ("desired", "available", "max_unavailable", "allowed"),
    [
        (4, 4, 1, 1),
        (4, 3, 1, 0),  # one is already down: the budget is spent
        (4, 2, 1, 0),
        (10, 10, "25%", 3),  # percentages round up
        (10, 9, "25%", 2),
        (1, 1, "10%", 1),
        (3, 3, 0, 0),
        (3, 3, "0%", 0),
        (0, 0, 1, 1),
        (2, 5, 1, 1),  # surplus replicas do not add to the budget
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


POLICY = SloPolicy(breach_ratio=1.0, recover_ratio=0.8, breach_windows=3, cooldown_s=120)
SLO = 100.0


def replay(windows, state=None, now=1000.0):
    """Fold p95 windows in order; return the state and the windows after which a move was called for."""
    state = state or SloState()
    calls = []
    for i, p95 in enumerate(windows):
        state = observe_window(state, p95, SLO, POLICY)
        if sustained_violation(state, now, POLICY):
            calls.append(i)
    return state, calls


@pytest.mark.parametrize(
    ("windows", "calls"),
    [
        ([150, 150, 150, 150], [2, 3]),  # three consecutive windows over
        ([150, 150, 70, 150, 150], []),  # a healthy window breaks the run
        ([150, 150, 90, 150, 150], []),  # so does one in the band, before a violation
        ([150, 150, 150, 90, 90, 150], [2, 3, 4, 5]),  # once violating, the band holds it
        ([150, 150, 150, 80, 150], [2]),  # at the recovery threshold it ends
        ([100, 100, 100, 100], []),  # at the SLO is not over it
        ([101, 101, 101], [2]),
    ],
)
def test_slo_hysteresis(windows, calls):
    assert replay(windows)[1] == calls


def test_no_slo_clears_a_violation():
    state, _ = replay([150, 150, 150])
    assert state.violating
    assert not observe_window(state, 150, 0, POLICY).violating


def test_a_moved_replica_cools_down():
    moved = record_move(35)
    assert moved == SloState(moved_at=35)
    state = moved
    for p95 in (150, 150, 150):
        state = observe_window(state, p95, SLO, POLICY)
    assert state.violating
    assert not sustained_violation(state, 35 + 119, POLICY)
    assert sustained_violation(state, 35 + 120, POLICY)


# Noise around a p95 that meets the SLO: single windows may cross it, never three in a row.
noisy = st.lists(
    st.one_of(st.floats(0, SLO * POLICY.breach_ratio), st.floats(SLO + 1e-6, SLO * 3)),
    min_size=1,
    max_size=200,
).filter(lambda ws: all(not all(w > SLO for w in ws[i : i + 3]) for i in range(len(ws) - 2)))


@settings(max_examples=300, deadline=None)
@given(noisy)
def test_noise_that_never_stays_over_never_moves(windows):
    assert replay(windows)[1] == []


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(0, SLO * 3), max_size=60), st.integers(3, 20))
def test_a_run_of_breach_windows_always_moves(prefix, run):
    state, calls = replay([*prefix, *([SLO * 2] * run)])
    assert state.violating
    assert calls and calls[-1] == len(prefix) + run - 1


def test_move_rate_caps_voluntary_moves_per_sliding_minute():
    rate = MoveRate(2)
    assert rate.available(0.0) == 2
    rate.spend(0.0)
    rate.spend(10.0)
    assert rate.available(30.0) == 0
    assert rate.available(60.0) == 1  # the first move left the window
    assert rate.available(70.0) == 2
    with pytest.raises(SchedulerError):
        MoveRate(-1)


def test_policy_is_checked():
    with pytest.raises(SchedulerError):
        SloPolicy(breach_ratio=0.8, recover_ratio=0.9)
    with pytest.raises(SchedulerError):
        SloPolicy(breach_windows=0)
    with pytest.raises(SchedulerError):
        SloPolicy(cooldown_s=-1)
