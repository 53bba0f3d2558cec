"""The store's side of the ingest that replicas share (docs/scale-out.md, "Ingest").

With ``broker.ingest: shared`` or ``jetstream`` each node message reaches one replica. What the
others (above all the leader) must know of it is merged into one row per node of ``node_states``:

- the newest **status**: the NodeMessage as the node sent it; a status replaces the stored one only
  if it is newer by ``(epoch, seq)``, the order the node gives its statuses (a status is the node's
  whole state, so the newest one is all there is to know);
- the newest **telemetry**, by the node's sent time: its counters are cumulative since the agent
  started, so the newest sample carries every count of the older ones;
- ``seen_ms``: when a replica last heard the node, on the database's clock.

Every merge is idempotent (a message merged twice, or an older one merged after a newer one, changes
nothing), so a message that the broker delivers again after a replica died is harmless. A merge
that changed a status's content stamps the row ``(swriter, sseq)``, one that brought newer telemetry
``(twriter, tseq)``: the replica's id and the number of its flush (a heartbeat that repeats the
node's state stamps nothing: readers are not asked to read it again). One replica's flushes commit
in the order of their numbers (one thread, one transaction after the other), so a reader that keeps a
cursor ``(flush, node id)`` per writer sees every change, none twice, however many nodes one flush
changed.

This class works on a connection of its own, on the caller's thread (the shared ingest's), never on
the store thread's: merges and reads of the fleet's heartbeats do not queue behind API calls and
reconcile passes.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TypeVar

import sqlalchemy as sa

from .sql import schema as t
from .sql.engine import MERGE, PURPOSE, READ, retryable
from .sql.notify import STATES

_T = TypeVar("_T")
Cursor = tuple[int, str]  # a reader's place in one writer's changes: (flush, node id), both read
ATTEMPTS = 6
MAX_SEQ = 2**63 - 1  # the will's status_seq (2^64 - 1, FINAL_STATUS_SEQ) as a signed 64-bit column
_PG_NOW_MS = "(extract(epoch from clock_timestamp()) * 1000)::bigint"
_NEWER_STATUS = (
    "excluded.status IS NOT NULL AND (excluded.epoch > node_states.epoch OR "
    "(excluded.epoch = node_states.epoch AND excluded.seq > node_states.seq))"
)
# A newer status whose content differs from the stored one: a change readers must see (a heartbeat
# that repeats the node's state only moves epoch, seq and seen_ms).
_STATUS_CHANGED = (
    f"({_NEWER_STATUS}) AND (node_states.digest IS NULL OR excluded.digest <> node_states.digest)"
)
_NEWER_TELEMETRY = "excluded.telemetry IS NOT NULL AND excluded.telemetry_ms > node_states.telemetry_ms"
# After a merge on PostgreSQL: tell the other replicas (the leader) if it changed a status's content
# (the rows it stamped; an index serves the look). Delivered at commit.
_NOTIFY_CHANGED = sa.text(
    f"SELECT pg_notify('{STATES}', :writer) WHERE EXISTS "  # noqa: S608 - a constant channel name
    "(SELECT 1 FROM node_states WHERE swriter = :writer AND sseq = :flush AND status IS NOT NULL)"
)


def _merge_sql(now: str) -> sa.TextClause:
    keep = {
        "status": _NEWER_STATUS,
        "epoch": _NEWER_STATUS,
        "seq": _NEWER_STATUS,
        "digest": _NEWER_STATUS,
        "swriter": _STATUS_CHANGED,
        "sseq": _STATUS_CHANGED,
        "telemetry": _NEWER_TELEMETRY,
        "telemetry_ms": _NEWER_TELEMETRY,
        "twriter": _NEWER_TELEMETRY,
        "tseq": _NEWER_TELEMETRY,
        "seen_ms": "excluded.seen_ms > node_states.seen_ms",
    }
    sets = ", ".join(
        f"{col} = CASE WHEN {cond} THEN excluded.{col} ELSE node_states.{col} END"
        for col, cond in keep.items()
    )
    columns = (
        "node_id, status, epoch, seq, digest, swriter, sseq, telemetry, telemetry_ms, twriter, tseq, seen_ms"
    )
    sql = (  # constant SQL: every value is bound
        f"INSERT INTO node_states ({columns}) VALUES (:node_id, :status, :epoch, :seq, :digest, :swriter, "  # noqa: S608
        f":sseq, :telemetry, :telemetry_ms, :twriter, :tseq, {now}) "
        f"ON CONFLICT (node_id) DO UPDATE SET {sets}"
    )
    return sa.text(sql)


@dataclass(frozen=True, slots=True)
class NodeState:
    """A node's row as another replica changed it: the stored NodeMessage (status or telemetry, as
    asked), and the stamp of the change."""

    node_id: str
    message: bytes
    writer: str
    seq: int

    @property
    def cursor(self) -> Cursor:
        """Where a reader of ``writer``'s changes stands once it has read this row."""
        return (self.seq, self.node_id)


@dataclass(frozen=True, slots=True)
class Merge:
    """One flush of a replica's ingest: per node its newest status ``(epoch, seq, digest, message)``
    and telemetry ``(sent_unix_ms, message)`` received since the last flush, and every node it heard."""

    statuses: Mapping[str, tuple[int, int, bytes, bytes]]
    telemetry: Mapping[str, tuple[int, bytes]]
    seen: Iterable[str]

    def rows(self, writer: str, flush: int, now_ms: int) -> list[dict]:
        """One row per node, sorted by node id: two replicas merging rows of the same nodes lock them
        in the same order (no deadlock)."""
        out = []
        for node_id in sorted({*self.statuses, *self.telemetry, *self.seen}):
            status = self.statuses.get(node_id)
            telemetry = self.telemetry.get(node_id)
            out.append(
                {
                    "node_id": node_id,
                    "status": None if status is None else status[3],
                    "epoch": -1 if status is None else status[0],
                    "seq": -1 if status is None else min(status[1], MAX_SEQ),
                    "digest": None if status is None else status[2],
                    "swriter": writer,
                    "sseq": flush,
                    "telemetry": None if telemetry is None else telemetry[1],
                    "telemetry_ms": -1 if telemetry is None else telemetry[0],
                    "twriter": writer,
                    "tseq": flush,
                    "now": now_ms,
                }
            )
        return out


class NodeStates:
    """Merges and reads of ``node_states``, on a connection of this object's own (one thread)."""

    def __init__(self, engine: sa.Engine) -> None:
        self._engine = engine
        self._sqlite = engine.dialect.name == "sqlite"
        self._merge = _merge_sql(":now" if self._sqlite else _PG_NOW_MS)
        self._now = sa.text("SELECT 0" if self._sqlite else f"SELECT {_PG_NOW_MS}")
        self._conn: sa.Connection | None = None
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def _run(self, what: str, work: Callable[[sa.Connection], _T]) -> _T:
        for attempt in range(ATTEMPTS):
            with self._lock:
                if self._conn is None or self._conn.closed:
                    self._conn = self._engine.connect()
                conn = self._conn
                conn.info[PURPOSE] = what
                tx = conn.begin()
                try:
                    result = work(conn)
                    tx.commit()
                    return result
                except sa.exc.DBAPIError as err:
                    if tx.is_active:
                        tx.rollback()
                    if attempt == ATTEMPTS - 1 or not (retryable(err) or err.connection_invalidated):
                        raise
                except BaseException:
                    if tx.is_active:
                        tx.rollback()
                    raise
            time.sleep(random.uniform(0, 0.002 * 2**attempt))  # noqa: S311 - jitter, not a secret
        raise AssertionError("unreachable")

    def _db_now_ms(self, conn: sa.Connection) -> int:
        return int(time.time() * 1000) if self._sqlite else int(conn.execute(self._now).scalar_one())

    def merge(self, writer: str, flush: int, merge: Merge) -> int:
        """Merge flush number ``flush`` of ``writer`` in one transaction; the node rows it touched."""
        rows = merge.rows(writer, flush, int(time.time() * 1000))
        notify = not self._sqlite and bool(merge.statuses)

        def work(conn: sa.Connection) -> None:
            conn.execute(self._merge, rows)
            if notify:
                conn.execute(_NOTIFY_CHANGED, {"writer": writer, "flush": flush})

        if rows:
            self._run(MERGE, work)
        return len(rows)

    def changed_since(
        self, kind: str, cursors: Mapping[str, Cursor], exclude: str, limit: int = 5000
    ) -> list[NodeState]:
        """The statuses (``kind`` "status") or telemetry ("telemetry") that writers other than
        ``exclude`` changed after their cursor (all of a writer not in ``cursors``), in the order of
        (writer, flush, node id); at most ``limit``: the caller moves each writer's cursor to the
        last row's :attr:`NodeState.cursor` and asks again. The node id is part of the cursor
        because one flush may change more nodes than one read returns."""
        c = t.node_states.c
        message, writer, seq = (
            (c.status, c.swriter, c.sseq) if kind == "status" else (c.telemetry, c.twriter, c.tseq)
        )
        newer = [
            sa.and_(writer == w, sa.tuple_(seq, c.node_id) > sa.tuple_(sa.literal(n), sa.literal(node)))
            for w, (n, node) in cursors.items()
            if w != exclude
        ]
        unknown = sa.and_(writer != "", writer.not_in([*cursors, exclude]))
        query = (
            sa.select(c.node_id, message, writer, seq)
            .where(sa.or_(unknown, *newer), message.is_not(None))
            .order_by(writer, seq, c.node_id)
            .limit(limit)
        )
        rows = self._run(READ, lambda conn: conn.execute(query).all())
        return [NodeState(n, bytes(m), w, int(q)) for n, m, w, q in rows]

    def seen_since(self, since_ms: int) -> tuple[int, list[str], list[int]]:
        """(the database's now, node ids, when each was last heard) of the nodes heard after
        ``since_ms``, all on the database's clock."""
        c = t.node_states.c
        query = sa.select(c.node_id, c.seen_ms).where(c.seen_ms > since_ms)

        def read(conn: sa.Connection) -> tuple[int, list[str], list[int]]:
            now = self._db_now_ms(conn)
            rows = conn.execute(query).all()
            return now, [r[0] for r in rows], [int(r[1]) for r in rows]

        return self._run(READ, read)
