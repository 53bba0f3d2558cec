"""The event loop lag probe behind ``edgeward_event_loop_lag_seconds``: a loop held up is seen."""

from __future__ import annotations

import asyncio
import contextlib
import time

from orchestrator.metrics import LoopLag, render


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
