"""The orchestrator's background loops: a step run every so often, or when woken, until cancelled.

A step that fails is logged and the loop goes on (the next step is the retry: the database was away,
the term ended, one pass met a bad record); only cancellation ends a loop. Every loop of the
orchestrator that does "sleep, step, log a failure, go on" uses these, so they all behave alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["every", "on_event"]


async def every(
    period_s: float,
    step: Callable[[], Awaitable[Any]],
    what: str,
    log: logging.Logger,
    *,
    first: bool = False,
    trace: bool = False,
) -> None:
    """``step`` every ``period_s`` seconds (the first one at once with ``first``, else after a
    period); ``what`` names it in the warning a failure logs, with its traceback if ``trace``."""
    if first:
        await _step(step, what, log, trace)
    await on_event(asyncio.Event(), lambda: period_s, step, what, log, trace=trace)  # never set


async def on_event(
    event: asyncio.Event,
    period: Callable[[], float],
    step: Callable[[], Awaitable[Any]],
    what: str,
    log: logging.Logger,
    *,
    gap: Callable[[], float] = lambda: 0.0,
    trace: bool = False,
) -> None:
    """``step`` when ``event`` is set, but not within ``gap()`` of the last time (a burst of
    wake-ups is one step), and at the latest ``period()`` after the last time."""
    while True:
        await asyncio.sleep(gap())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(period()):
                await event.wait()
        event.clear()
        await _step(step, what, log, trace)


async def _step(step: Callable[[], Awaitable[Any]], what: str, log: logging.Logger, trace: bool) -> None:
    try:
        await step()
    except asyncio.CancelledError:
        raise
    except Exception as err:  # the next step retries
        log.warning("cannot %s: %s", what, err, exc_info=trace)
