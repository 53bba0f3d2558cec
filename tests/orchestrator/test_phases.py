import pytest

from orchestrator.errors import IllegalTransition
from orchestrator.phases import TRANSITIONS, Phase, check_transition, from_pb, to_pb


def test_evicted_is_terminal_and_every_phase_has_a_row():
    assert set(TRANSITIONS) == set(Phase)
    assert TRANSITIONS[Phase.EVICTED] == frozenset()


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (Phase.EVICTED, Phase.RUNNING),
        (Phase.PENDING, Phase.RUNNING),
        (Phase.FAILED, Phase.RUNNING),
        (Phase.RUNNING, Phase.PENDING),
    ],
)
def test_illegal_transitions_raise(old, new):
    with pytest.raises(IllegalTransition):
        check_transition(old, new)


def test_wire_round_trip():
    for phase in Phase:
        assert from_pb(to_pb(phase)) is phase
