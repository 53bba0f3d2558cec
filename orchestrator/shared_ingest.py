"""The ingest that orchestrator replicas share (``broker.ingest: shared`` or ``jetstream``).

Each status and telemetry message of a node reaches one replica (an MQTT shared subscription, or a
JetStream consumer the replicas share). That replica applies it to its own fleet view at once, as a
single orchestrator does, and :class:`SharedIngest` merges it into the store (``node_states``,
orchestrator/node_states.py) at its next flush, every ``FLUSH_S``; every replica reads what the
others merged and applies it to its fleet view in turn:

- statuses whose content changed (a replica's phase, the node's state), every ``STATUS_FOLLOW_S``
  on the leader (the reconciler acts on them) and every ``FOLLOWER_S`` on the others (their API);
- telemetry, every ``TELEMETRY_FOLLOW_S``: rollout gates, SLO and slowdown detectors, the misuse
  monitor read cumulative counters and per-window figures, which need no faster view;
- liveness, every ``SEEN_S``: the nodes heard since the last look by any replica (one query), each
  node's ``last_seen`` moved to when it was last heard, on the database's clock.

A heartbeat that repeats the node's state costs the others nothing but its share of that liveness
query. Applying a message twice changes nothing (statuses are ordered by ``(epoch, seq)``, telemetry
by its sent time and its counters are cumulative), so a message redelivered after a replica died, or
read back through another replica's merge, is harmless.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

from edgeward.v1 import node_pb2

from .fleet import Fleet
from .metrics import StatusLag
from .node_states import Cursor, Merge, NodeStates
from .periodic import every, on_event
from .telemetry import TelemetryStore

log = logging.getLogger(__name__)

FLUSH_S = 0.1
STATUS_FOLLOW_S = 0.1
# While the store's notifications flow (PostgreSQL LISTEN/NOTIFY, orchestrator/sql/notify.py) the
# leader reads the statuses when another replica's merge changed one (not within STATUS_FOLLOW_S of
# its last read: a burst of merges is one read), and at least this often.
NOTIFIED_FOLLOW_S = 1.0
FOLLOWER_S = 1.0
TELEMETRY_FOLLOW_S = 1.0
SEEN_S = 1.0
# A look for nodes heard since the previous one goes this far further back: a merge stamped just
# before that look may have committed after it.
SEEN_MARGIN_MS = 2000
READ_LIMIT = 5000


def status_digest(status: node_pb2.Status) -> bytes:
    """What a status says, without its place in the node's order (epoch, seq): equal for heartbeats
    that repeat the node's state."""
    content = node_pb2.Status(state=status.state, replicas=status.replicas)
    return hashlib.blake2b(content.SerializeToString(deterministic=True), digest_size=16).digest()


class SharedIngest:
    """Merges this replica's share of the fleet's statuses and telemetry into the store, and applies
    the others' shares to this replica's fleet view and telemetry."""

    def __init__(
        self,
        states: NodeStates,
        fleet: Fleet,
        telemetry: TelemetryStore,
        writer: str,
        *,
        on_status: Callable[[], None],
        leading: Callable[[], bool],
        notified: Callable[[], bool] = lambda: False,
        lag: StatusLag | None = None,
    ) -> None:
        """``notified``: whether the store's notifications flow now (:meth:`merged_elsewhere` is
        called for every other replica's merge that changed a status); ``lag``: where the statuses
        read back from the others' merges are timed (path ``merged``)."""
        self._states = states
        self._fleet = fleet
        self._telemetry = telemetry
        self.writer = writer
        self._on_status = on_status
        self._leading = leading
        self._notified = notified
        self._lag: StatusLag | None = None  # set once load() read what was merged before the start
        self._lag_to = lag
        self._others_merged = asyncio.Event()  # another replica merged a changed status
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="edgeward-shared-ingest")
        self._statuses: dict[str, tuple[int, int, bytes, bytes]] = {}
        self._telemetry_out: dict[str, tuple[int, bytes]] = {}
        self._seen: set[str] = set()
        self._flushes = 0
        self._flush_lock = asyncio.Lock()
        self._cursors: dict[str, dict[str, Cursor]] = {"status": {}, "telemetry": {}}
        self._seen_since = 0
        self._followed_at = 0.0
        self._telemetry_ms: dict[str, int] = {}  # newest telemetry applied per node (from anywhere)
        self.counts: Counter[str] = Counter()

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, partial(fn, *args))

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._states.close()

    # ------------------------------------------------------------ this replica's share

    def received(self, msg: node_pb2.NodeMessage, payload: bytes) -> None:
        """A status or telemetry message this replica received and applied: merge it at the next
        flush (the newest one per node)."""
        node_id = msg.node_id
        self._seen.add(node_id)
        self.counts["received"] += 1
        if msg.HasField("status"):
            self.status(msg, payload)
        elif msg.HasField("telemetry"):
            sent = msg.sent_unix_ms
            queued = self._telemetry_out.get(node_id)
            if queued is None or sent > queued[0]:
                self._telemetry_out[node_id] = (sent, payload)

    def stale(self, msg: node_pb2.NodeMessage) -> bool:
        """Whether ``msg`` is telemetry older than (or the same as) the newest this replica applied for
        its node: a sample that reaches a replica late (redelivered after another replica died holding
        it) would put older counters in the view. Statuses need no such check: the fleet view orders
        them by ``(epoch, seq)``."""
        if not msg.HasField("telemetry"):
            return False
        if msg.sent_unix_ms <= self._telemetry_ms.get(msg.node_id, -1):
            self.counts["stale"] += 1
            return True
        self._telemetry_ms[msg.node_id] = msg.sent_unix_ms
        return False

    def status(self, msg: node_pb2.NodeMessage, payload: bytes) -> None:
        """Merge a status at the next flush (also one this replica applied late: a confirmed will)."""
        st = msg.status
        queued = self._statuses.get(msg.node_id)
        if queued is None or (st.epoch, st.status_seq) > queued[:2]:
            self._statuses[msg.node_id] = (st.epoch, st.status_seq, status_digest(st), payload)

    async def flush(self) -> None:
        """Merge what this replica received since the last flush, in one transaction. On a failure
        (the database away) it is kept for the next flush, unless newer has come meanwhile, and the
        error raised (the JetStream path then does not acknowledge the messages)."""
        async with self._flush_lock:
            if not (self._statuses or self._telemetry_out or self._seen):
                return
            merge = Merge(self._statuses, self._telemetry_out, self._seen)
            self._statuses, self._telemetry_out, self._seen = {}, {}, set()
            self._flushes += 1
            try:
                rows = await self._call(self._states.merge, self.writer, self._flushes, merge)
            except Exception:
                for node_id, status in merge.statuses.items():
                    self._statuses.setdefault(node_id, status)
                for node_id, telemetry in merge.telemetry.items():
                    self._telemetry_out.setdefault(node_id, telemetry)
                self._seen.update(merge.seen)
                raise
            self.counts["merged"] += rows
            self.counts["flushes"] += 1

    # ------------------------------------------------------------ the others' shares

    async def load(self) -> None:
        """At start: every status and telemetry merged so far, and when each node was last heard."""
        while await self._follow("status") >= READ_LIMIT:
            pass
        while await self._follow("telemetry") >= READ_LIMIT:
            pass
        await self._follow_seen()
        self._lag = self._lag_to

    async def run(self) -> None:
        await asyncio.gather(
            every(FLUSH_S, self.flush, "merge into the store", log),
            on_event(
                self._others_merged,
                lambda: NOTIFIED_FOLLOW_S if self._notified() else STATUS_FOLLOW_S,
                self._follow_statuses,
                "read the statuses",
                log,
                gap=lambda: STATUS_FOLLOW_S if self._notified() else 0.0,
            ),
            every(TELEMETRY_FOLLOW_S, partial(self._follow, "telemetry"), "read the telemetry", log),
            every(SEEN_S, self._follow_seen, "read the liveness", log),
        )

    def merged_elsewhere(self, writer: str) -> None:
        """The store says a replica's merge changed a status (``writer`` its id, empty if unknown): read
        the statuses now (a follower's read only looks every ``FOLLOWER_S``; waking it too means a
        replica that takes the lead reads at once, not up to ``NOTIFIED_FOLLOW_S`` later)."""
        if writer != self.writer:
            self._others_merged.set()

    async def _follow_statuses(self) -> None:
        """On the leader every round, elsewhere every ``FOLLOWER_S``."""
        now = time.monotonic()
        if self._leading() or now - self._followed_at >= FOLLOWER_S:
            self._followed_at = now
            await self._follow("status")

    async def _follow(self, kind: str) -> int:
        cursors = self._cursors[kind]
        rows = await self._call(self._states.changed_since, kind, dict(cursors), self.writer, READ_LIMIT)
        changed = False
        for row in rows:
            cursors[row.writer] = max(cursors.get(row.writer, row.cursor), row.cursor)
            try:
                msg = node_pb2.NodeMessage.FromString(row.message)
            except Exception:  # stored by a replica that had decoded it: never expected
                self.counts["unreadable"] += 1
                continue
            if kind == "status":
                applied = self._fleet.apply(msg, retained=True) == "status"
                if applied and self._lag is not None:
                    self._lag.record("merged", msg.sent_unix_ms, time.time())
                changed |= applied
            elif not self.stale(msg):
                self._fleet.apply(msg, retained=True)
                self._telemetry.add(msg.node_id, msg.sent_unix_ms, msg.telemetry)
        self.counts[f"read_{kind}"] += len(rows)
        if changed:
            self._on_status()
        return len(rows)

    async def _follow_seen(self) -> None:
        db_now, ids, seen = await self._call(self._states.seen_since, self._seen_since)
        self._seen_since = db_now - SEEN_MARGIN_MS
        now = time.monotonic()
        nodes = self._fleet.nodes
        for node_id, at_ms in zip(ids, seen, strict=True):
            node = nodes.get(node_id)
            if node is not None:
                heard = now - (db_now - at_ms) / 1000.0
                if heard > node.last_seen:
                    node.last_seen = heard
                    node.last_seen_ms = at_ms
