"""The attestation exchange window (orchestrator.attest_window): how many exchanges are in flight,
who goes first, and how the limit follows the answers' round-trip time. Time is passed in."""

from __future__ import annotations

import pytest

from orchestrator.attest_window import ExchangeWindow

TTL = 10.0


def window(**kw: float) -> ExchangeWindow:
    args = {"target_rtt_s": 4.0, "initial": 4, "minimum": 2, "maximum": 64} | kw
    return ExchangeWindow(**args)  # type: ignore[arg-type]


def test_sends_no_more_than_the_window_and_the_next_when_one_finishes() -> None:
    w = window()
    for i in range(10):
        w.want(f"n{i}", renewal=False)
    assert w.ready(0.0, TTL) == ["n0", "n1", "n2", "n3"]
    assert w.ready(0.0, TTL) == []  # full
    assert (w.in_flight, w.queued) == (4, 6)
    w.finish("n1")
    assert w.ready(0.1, TTL) == ["n4"]


def test_renewals_go_before_nodes_without_a_result() -> None:
    w = window()
    for i in range(3):
        w.want(f"new{i}", renewal=False)
    w.want("old", renewal=True)
    assert w.ready(0.0, TTL)[0] == "old"


def test_a_node_is_queued_once_and_never_in_flight_twice() -> None:
    w = window()
    w.want("a", renewal=False)
    w.want("a", renewal=True)
    assert w.queued == 1
    assert w.ready(0.0, TTL) == ["a"]
    w.want("a", renewal=True)  # in flight: not queued again
    assert w.busy("a") and w.queued == 0 and w.ready(0.0, TTL) == []


def test_answers_on_time_widen_the_window_late_ones_halve_it_once_per_event() -> None:
    w = window(initial=8)
    for i in range(8):
        w.want(f"n{i}", renewal=False)
    sent = w.ready(0.0, TTL)
    for n in sent[:4]:
        assert w.answered(n, 1.0)  # 1 s < target 4 s: slow start, +1 each
    assert w.size == 12
    assert w.answered(sent[4], 5.0)  # late
    assert w.size == 6 and w.late == 1 and w.narrowed == 1
    assert w.answered(sent[5], 5.5)  # late again, within the same event
    assert w.size == 6 and w.narrowed == 1
    for n in sent:
        w.finish(n)
    w.want("x", renewal=False)
    w.want("y", renewal=False)
    assert w.ready(6.0, TTL) == ["x", "y"]
    assert w.answered("x", 7.0)  # on time again: congestion avoidance, +1/size
    assert w.size == pytest.approx(6 + 1 / 6)
    assert w.answered("y", 10.5)  # late, a new event (over 4 s after the last narrowing)
    assert w.size == pytest.approx((6 + 1 / 6) / 2) and w.narrowed == 2


def test_exchanges_past_their_deadline_end_and_narrow_the_window() -> None:
    w = window(initial=8)
    for i in range(8):
        w.want(f"n{i}", renewal=False)
    w.ready(0.0, TTL)
    assert w.expire(TTL) == []
    assert sorted(w.expire(TTL + 0.1)) == [f"n{i}" for i in range(8)]
    assert (w.in_flight, w.size, w.lost) == (0, 4, 8)
    assert not w.answered("n0", 11.0)  # its answer came too late to count


def test_the_window_stays_within_its_bounds() -> None:
    w = window(initial=2, minimum=2, maximum=3)
    for t in range(0, 100, 5):  # a late answer every 5 s
        w.want("a", renewal=False)
        w.ready(float(t), TTL)
        w.answered("a", t + 4.5)
        w.finish("a")
    assert w.size == 2
    for _ in range(10):
        w.want("a", renewal=False)
        w.ready(200.0, TTL)
        w.answered("a", 200.5)
        w.finish("a")
    assert w.size == 3


def test_next_step_gives_the_exchange_a_new_deadline() -> None:
    w = window()
    w.want("a", renewal=False)
    w.ready(0.0, TTL)
    w.answered("a", 1.0)  # the ask to enroll answered; the enrollment challenge goes out
    w.next_step("a", 1.0, 30.0)
    assert w.expire(20.0) == []
    assert w.expire(31.5) == ["a"]


def test_a_reconnected_node_is_queued_again_without_a_congestion_signal() -> None:
    w = window()
    w.want("a", renewal=False)
    w.ready(0.0, TTL)
    w.restart("a")
    assert (w.in_flight, w.queued, w.size, w.lost) == (0, 1, 4, 0)


def test_nodes_that_went_offline_while_queued_take_no_place() -> None:
    w = window(initial=2)
    for n in ("gone", "a", "b"):
        w.want(n, renewal=False)
    assert w.ready(0.0, TTL, eligible=lambda n: n != "gone") == ["a", "b"]
    assert not w.busy("gone")


def test_forget_while_queued() -> None:
    w = window()
    w.want("a", renewal=False)
    w.want("b", renewal=False)
    w.forget("a")
    assert w.ready(0.0, TTL) == ["b"]
    w.want("a", renewal=False)
    assert w.ready(0.0, TTL) == ["a"]


def test_bounds_are_checked() -> None:
    with pytest.raises(ValueError, match="minimum <= initial"):
        ExchangeWindow(target_rtt_s=1.0, initial=1, minimum=2)
