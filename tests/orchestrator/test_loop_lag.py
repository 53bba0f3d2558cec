"""The event loop lag probe behind ``edgeward_event_loop_lag_seconds``: a loop held up is seen."""

from __future__ import annotations

import asyncio
import contextlib
import time

from orchestrator.metrics import LoopLag, StatusLag, render


async def test_a_loop_held_up_shows_in_the_lag_histogram() -> None:
    lag = LoopLag(period=0.05)
    probe = asyncio.create_task(lag.run())
    try:
        while lag.count < 2:  # the probe runs
            await asyncio.sleep(0.01)
        time.sleep(0.4)  # noqa: ASYNC251 - holds the loop on purpose: the probe wakes at least 0.35 s late
        seen = lag.count
        while lag.count == seen:
            await asyncio.sleep(0.01)
    finally:
        probe.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await probe
    assert lag.worst >= 0.35
    bounds = dict(zip(LoopLag.BOUNDS, lag.cumulative, strict=True))
    assert bounds[0.25] < lag.count  # the late wake-up is above 0.25 s
    assert lag.cumulative == sorted(lag.cumulative) and lag.cumulative[-1] <= lag.count
    text = render(lag.families()).decode()
    assert "# TYPE edgeward_event_loop_lag_seconds histogram" in text
    assert f"edgeward_event_loop_lag_seconds_count {float(lag.count)!r}" in text
    assert f"edgeward_event_loop_lag_max_seconds {lag.worst!r}" in text


def test_status_lag_counts_each_path_in_its_buckets() -> None:
    lag = StatusLag()
    sent_ms = 1_000_000
    for seconds in (0.003, 0.01, 0.2, 30.0):  # 0.01 is at its bound: counted there ("le")
        lag.record("received", sent_ms, sent_ms / 1000 + seconds)
    lag.record("merged", sent_ms, sent_ms / 1000 - 1.0)  # a node's clock ahead: counted as 0
    received = dict(zip(StatusLag.BOUNDS, lag.paths["received"].cumulative, strict=True))
    assert (received[0.005], received[0.01], received[0.25], received[10.0]) == (1, 2, 3, 3)
    assert lag.paths["received"].count == 4 and lag.paths["merged"].cumulative[0] == 1
    text = render([lag.family()]).decode()
    assert 'edgeward_status_lag_seconds_bucket{le="+Inf",path="received"} 4.0' in text
    assert 'edgeward_status_lag_seconds_count{path="merged"} 1.0' in text
