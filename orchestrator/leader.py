"""The leader lease of orchestrator replicas that share one store (docs/scale-out.md).

Every replica serves the whole API; the singleton loops (reconciler with the rollout controller,
attestation challenges, wipe deadlines, multi-exit wiring, slowdown mitigations) run on one replica
only: the holder of the lease row in the store. :class:`LeaderElection` takes and renews it and runs
the caller's ``lead`` coroutine while the lease is held, with :data:`CURRENT_LEASE` set, so that
every store write made on the way is fenced by the lease's token (``SqlStore.fenced``).

Timing, all on the replica's monotonic clock except the expiry itself (the database's clock):

- the holder renews every ``ttl / 4``; a follower tries to take the lease every ``ttl / 6``;
- a renewal sent at ``t`` that succeeds makes the database's expiry at least ``t + ttl``; the holder
  counts itself leader only until ``t + ttl * STEP_DOWN_AT`` and cancels ``lead`` then unless a
  newer renewal succeeded: a replica cut off from the database (or too slow) stops acting before its
  lease ends, and whatever it still tries to write is refused by the token check.

On SQLite (one replica) the lease is always held: ``lead`` runs from the start, as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar

from .store import Lease, SqlStore

log = logging.getLogger(__name__)

CURRENT_LEASE: ContextVar[Lease | None] = ContextVar("edgeward_leader_lease", default=None)
STEP_DOWN_AT = 0.75  # of the TTL after a renewal was sent: when a holder that could not renew stops
TICK_S = 0.05


class LeaderElection:
    def __init__(
        self,
        store: SqlStore,
        holder: str,
        ttl_s: float,
        lead: Callable[[Lease], Awaitable[None]],
    ) -> None:
        self._store = store
        self.holder = holder
        self.ttl_s = ttl_s
        self._lead = lead
        self.lease: Lease | None = None
        self.terms = 0  # terms this replica started
        self.became_leader_at: float | None = None  # monotonic
        self._deadline = 0.0
        self._task: asyncio.Task | None = None
        # Renewals on their own thread and connection: never behind the store thread's queue.
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="edgeward-lease")
        self._changed = asyncio.Event()

    @property
    def leading(self) -> bool:
        return self.lease is not None

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        pending: asyncio.Future[Lease | None] | None = None
        sent = next_try = 0.0
        try:
            while True:
                now = time.monotonic()
                # On SQLite the lease is always ours (one process): a renewal seen late because the
                # loop was busy (a 2,000-node pass on a loaded machine) is no reason to step down,
                # and stepping down restarted every singleton loop in the middle of an apply.
                if self.lease is not None and now >= self._deadline and self._store.dialect != "sqlite":
                    log.error(
                        "leader lease %d not renewed within %.1f s: stepping down",
                        self.lease.token,
                        self.ttl_s * STEP_DOWN_AT,
                    )
                    await self._step_down()
                if pending is None and now >= next_try:
                    sent = now
                    ttl_ms = int(self.ttl_s * 1000)
                    pending = loop.run_in_executor(self._pool, self._store.acquire_lease, self.holder, ttl_ms)
                if pending is not None and pending.done():
                    try:
                        lease = pending.result()
                    except Exception as err:  # the database away: keep trying; the deadline decides
                        log.warning("leader lease: cannot reach the store: %s", err)
                        lease = None
                        if self.lease is not None:
                            next_try = sent + self.ttl_s / 8
                            pending = None
                            await asyncio.sleep(TICK_S)
                            continue
                    pending = None
                    await self._took(lease, sent)
                    next_try = sent + (self.ttl_s / 4 if self.lease is not None else self.ttl_s / 6)
                await asyncio.sleep(TICK_S)
        finally:
            await self._step_down()
            if pending is not None:
                with contextlib.suppress(Exception):
                    lease = await asyncio.wait_for(pending, 2)
                    if lease is not None:
                        self.lease = lease
            if self.lease is not None:  # a clean stop ends the term at once
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(
                        loop.run_in_executor(self._pool, self._store.release_lease, self.lease), 2
                    )
                self.lease = None
            self._pool.shutdown(wait=False)

    async def _took(self, lease: Lease | None, sent: float) -> None:
        if lease is None:
            if self.lease is not None:
                log.error("leader lease %d is held by another replica: stepping down", self.lease.token)
                await self._step_down()
            return
        if self.lease is not None and lease.token != self.lease.token:
            log.error("leader lease %d ended (now term %d): stepping down", self.lease.token, lease.token)
            await self._step_down()
        self._deadline = sent + self.ttl_s * STEP_DOWN_AT
        if self.lease is None:
            self.lease = lease
            self.terms += 1
            self.became_leader_at = time.monotonic()
            log.info("this replica (%s) is the leader, term %d", self.holder, lease.token)
            self._task = asyncio.create_task(self._run_lead(lease), name="edgeward-leader")
            self._changed.set()

    async def _run_lead(self, lease: Lease) -> None:
        CURRENT_LEASE.set(lease)  # this task's context: every store call below is fenced
        try:
            await self._lead(lease)
        except asyncio.CancelledError:
            raise
        except Exception:  # never lead with nothing running: give the term up, a new one retries
            log.exception("leader term %d failed", lease.token)
            if self.lease is lease:
                self.lease = None
                self._task = None

    async def _step_down(self) -> None:
        task, self._task = self._task, None
        self.lease = None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            self._changed.set()

    async def wait_leading(self) -> None:
        while not self.leading:
            self._changed.clear()
            await self._changed.wait()
