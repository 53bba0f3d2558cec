"""The leader lease of orchestrator replicas that share one store (docs/scale-out.md).

Every replica serves the whole API; the singleton loops (reconciler with the rollout controller,
attestation challenges, wipe deadlines, multi-exit wiring, slowdown mitigations) run on one replica
only: the holder of the lease row in the store. :class:`LeaderElection` takes and renews it and runs
the caller's ``lead`` coroutine while the lease is held, with :data:`CURRENT_LEASE` set, so that
every store write made on the way is fenced by the lease's token (``SqlStore.fenced``).

Timing, all on the replica's monotonic clock except the expiry itself (the database's clock):

- the holder renews every ``ttl / 4``, a follower tries to take the lease every ``ttl / 6``, on a
  thread of their own (a busy event loop does not delay a renewal);
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
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
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
        self._changed = asyncio.Event()
        # Renewals run on a thread of their own with their own connection: neither the store
        # thread's queue nor an event loop busy with a long pass delays them. Its outcomes
        # (sent at, lease or None, error) are taken in order by run().
        self._outcomes: deque[tuple[float, Lease | None, Exception | None]] = deque()
        self._stop = threading.Event()

    @property
    def leading(self) -> bool:
        return self.lease is not None

    def _renew(self) -> None:
        ttl_ms = int(self.ttl_s * 1000)
        held = False
        while not self._stop.is_set():
            sent = time.monotonic()
            try:
                lease = self._store.acquire_lease(self.holder, ttl_ms)
                self._outcomes.append((sent, lease, None))
                held = lease is not None
            except Exception as err:  # the database away: the holder's deadline decides
                self._outcomes.append((sent, None, err))
            pause = self.ttl_s / 4 if held else self.ttl_s / 6
            self._stop.wait(max(0.0, sent + pause - time.monotonic()))

    async def run(self) -> None:
        renewer = threading.Thread(target=self._renew, name="edgeward-lease", daemon=True)
        renewer.start()
        try:
            while True:
                while self._outcomes:  # first what the database said, then the clock
                    sent, lease, err = self._outcomes.popleft()
                    if err is not None:
                        log.warning("leader lease: cannot reach the store: %s", err)
                    else:
                        await self._took(lease, sent)
                # On SQLite the lease is always ours (one process): a renewal seen late because the
                # loop was busy (a 2,000-node pass on a loaded machine) is no reason to step down,
                # and stepping down restarted every singleton loop in the middle of an apply.
                if (
                    self.lease is not None
                    and time.monotonic() >= self._deadline
                    and self._store.dialect != "sqlite"
                ):
                    log.error(
                        "leader lease %d not renewed within %.1f s: stepping down",
                        self.lease.token,
                        self.ttl_s * STEP_DOWN_AT,
                    )
                    await self._step_down()
                await asyncio.sleep(TICK_S)
        finally:
            self._stop.set()
            held = self.lease
            await self._step_down()
            await _joined(renewer, within_s=5.0)
            for _, lease, _ in self._outcomes:  # a renewal that answered after the last tick
                held = lease or held
            if held is not None and not renewer.is_alive():  # a clean stop ends the term at once
                release = threading.Thread(
                    target=self._release, args=(held,), name="edgeward-lease-release", daemon=True
                )
                release.start()
                await _joined(release, within_s=3.0)

    def _release(self, lease: Lease) -> None:
        try:
            self._store.release_lease(lease)
        except Exception as err:  # it runs out by itself
            log.warning("leader lease %d not released: %s", lease.token, err)

    async def _took(self, lease: Lease | None, sent: float) -> None:
        if lease is None:
            if self.lease is not None:
                log.error("leader lease %d is held by another replica: stepping down", self.lease.token)
                await self._step_down()
            return
        if self.lease is not None and lease.token != self.lease.token:
            log.error("leader lease %d ended (now term %d): stepping down", self.lease.token, lease.token)
            await self._step_down()
        deadline = sent + self.ttl_s * STEP_DOWN_AT
        if time.monotonic() >= deadline and self._store.dialect != "sqlite":
            return  # an answer too late to act on: the next renewal decides
        self._deadline = deadline
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


async def _joined(thread: threading.Thread, within_s: float) -> None:
    """Wait (without blocking the loop, and without an executor thread) for ``thread`` to end."""
    deadline = time.monotonic() + within_s
    while thread.is_alive() and time.monotonic() < deadline:  # noqa: ASYNC110 - a thread sets no Event
        await asyncio.sleep(TICK_S)
