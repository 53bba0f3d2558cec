"""The orchestrator's background loops (orchestrator/periodic.py): a failing step is logged and the
loop goes on, cancellation ends it, a wake-up runs a step before its period is up."""

from __future__ import annotations

import asyncio
import logging

import pytest

from orchestrator.periodic import every, on_event

log = logging.getLogger("test_periodic")


async def test_a_failing_step_is_logged_and_the_loop_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    calls = 0
    third = asyncio.Event()

    async def step() -> None:
        nonlocal calls
        calls += 1
        if calls >= 3:
            third.set()
        if calls == 1:
            raise OSError("the database is away")

    with caplog.at_level(logging.WARNING, logger="test_periodic"):
        loop = asyncio.create_task(every(0.01, step, "read the rows", log, first=True))
        async with asyncio.timeout(30):
            await third.wait()
        loop.cancel()
        with pytest.raises(asyncio.CancelledError):
            await loop
    assert [r.getMessage() for r in caplog.records] == ["cannot read the rows: the database is away"]
    assert not caplog.records[0].exc_info  # trace=False: no traceback


async def test_first_runs_a_step_at_once_and_trace_logs_the_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ran = asyncio.Event()

    async def step() -> None:
        ran.set()
        raise KeyError("x")

    with caplog.at_level(logging.WARNING, logger="test_periodic"):
        loop = asyncio.create_task(every(3600, step, "run the pass", log, first=True, trace=True))
        async with asyncio.timeout(30):
            await ran.wait()  # long before the hour's period
        loop.cancel()
        with pytest.raises(asyncio.CancelledError):
            await loop
    [record] = caplog.records
    assert record.getMessage() == "cannot run the pass: 'x'" and record.exc_info is not None


async def test_a_wake_up_runs_a_step_before_the_period_ends() -> None:
    event = asyncio.Event()
    steps: list[int] = []
    done = asyncio.Event()

    async def step() -> None:
        steps.append(1)
        done.set()

    loop = asyncio.create_task(on_event(event, lambda: 3600, step, "follow", log))
    try:
        await asyncio.sleep(0)
        assert not steps
        event.set()
        async with asyncio.timeout(30):
            await done.wait()
        assert steps == [1]
        assert not event.is_set(), "cleared for the next wake-up"
    finally:
        loop.cancel()
        with pytest.raises(asyncio.CancelledError):
            await loop
