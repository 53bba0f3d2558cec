"""On SQLite the one orchestrator process always holds the leader lease: a busy event loop that
sees its renewal late does not step down (that restarted every singleton loop mid-apply)."""

from __future__ import annotations

import asyncio
import contextlib
import time

from orchestrator.leader import LeaderElection
from orchestrator.store import Lease, SqlStore


async def test_a_stalled_loop_keeps_the_sqlite_lease(tmp_path) -> None:
    store = SqlStore(tmp_path)
    leading = asyncio.Event()
    terms: list[int] = []
    cancelled: list[int] = []

    async def lead(lease: Lease) -> None:
        terms.append(lease.token)
        leading.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(lease.token)
            raise

    election = LeaderElection(store, "me", ttl_s=0.5, lead=lead)
    task = asyncio.create_task(election.run())
    try:
        await asyncio.wait_for(leading.wait(), 30)
        time.sleep(1.0)  # the loop stalls past the step-down point (0.75 of the TTL)  # noqa: ASYNC251
        for _ in range(10):  # a few election ticks after the stall
            await asyncio.sleep(0.06)
        assert election.leading and terms == [1] and not cancelled
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        store.close()
