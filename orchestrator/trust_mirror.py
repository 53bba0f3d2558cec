"""The leader's attestation results, answered by every replica (docs/scale-out.md).

Only the leader challenges the nodes and verifies their evidence, so only its verifier knows their
results. With several replicas (PostgreSQL) the leader writes what changed, every ``PUBLISH_S``, to
the store's ``attestations`` table (one row per node: its ``NodeAttestation`` and its quarantine; a
fenced write, so an ex-leader cannot overwrite its successor's), and the replicas that do not lead
read the rows written since their cursor every ``FOLLOW_S`` (the leader reads them too, so that it
answers from fresh rows the moment it steps down). :class:`TrustMirror` answers the API from
whichever is right for this replica now: the verifier on the leader, the rows elsewhere; when that
changes, its Watch listeners get every node as the new source has it. Its reads (``snapshot``,
``snapshots``, ``subscribe``) are those the attestation API's servicer uses, and ``tier`` /
``quarantine_reason`` those of the node and placement views.

A row keeps the state the leader had when it wrote it; a result that runs out reads as expired on
every replica alike (its ``expires_unix_ms``, compared with the reading replica's clock), as the
verifier's own reads do. What a replica shows lags the leader by up to ``PUBLISH_S + FOLLOW_S``. A
new term's first write is every node the new leader's verifier knows, as it knows it: nodes it has
not attested yet read as enrolled everywhere (a replica that never led knows none attested) until
it re-attests them. Writes go in batches of at most ``WRITE_BATCH`` rows, each its own short
transaction: every replica's writes take turns with them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from edgeward.v1 import attestation_pb2 as apb
from edgeward.wire import now_ms

from .periodic import every
from .reconciler import DbCall
from .store import AttestationRow, Store
from .verifier import FleetVerifier

log = logging.getLogger(__name__)

PUBLISH_S = 0.5
FOLLOW_S = 1.0
READ_LIMIT = 5000
WRITE_BATCH = 500

Listener = Callable[[apb.NodeAttestation], None]

_HOLDS_RESULT = frozenset(
    {
        apb.ATTESTATION_STATE_AFFIRMING,
        apb.ATTESTATION_STATE_WARNING,
        apb.ATTESTATION_STATE_CONTRAINDICATED,
    }
)


def effective(view: apb.NodeAttestation, now: int) -> apb.NodeAttestation:
    """``view`` as of ``now``: a result past its expiry reads as EXPIRED (as the verifier's reads)."""
    if view.state in _HOLDS_RESULT and now >= view.result.expires_unix_ms:
        expired = apb.NodeAttestation()
        expired.CopyFrom(view)
        expired.state = apb.ATTESTATION_STATE_EXPIRED
        return expired
    return view


class TrustMirror:
    """Attestation answers for the API of any replica (see the module docstring)."""

    def __init__(
        self,
        verifier: FleetVerifier,
        store: Store,
        db: DbCall,
        *,
        leading: Callable[[], bool],
        shared: bool,
        clock: Callable[[], int] = now_ms,
    ) -> None:
        """``shared``: several replicas may run (PostgreSQL); on SQLite this process always leads,
        and the mirror only answers from the verifier."""
        self._verifier = verifier
        self._store = store
        self._db = db
        self._leading = leading
        self._clock = clock
        self._views: dict[str, tuple[apb.NodeAttestation, str]] = {}  # node -> (view, quarantine)
        self._cursor: tuple[int, str] = (0, "")
        self._listeners: list[Listener] = []
        self._dirty: set[str] = set()
        self._dirty_lock = threading.Lock()  # the verifier tells of changes from any thread
        self.shared = shared
        self._was_local = self._local  # the source the Watch listeners were last told of
        if shared:
            verifier.service.subscribe(lambda view: self.changed(view.node_id))
            verifier.on_trust_change = self.changed

    @property
    def _local(self) -> bool:
        return not self.shared or self._leading()

    # ------------------------------------------------------------ answers

    def snapshot(self, node_id: str) -> apb.NodeAttestation | None:
        if self._local:
            return self._verifier.service.snapshot(node_id)
        found = self._views.get(node_id)
        return None if found is None else effective(found[0], self._clock())

    def snapshots(self) -> list[apb.NodeAttestation]:
        if self._local:
            return self._verifier.service.snapshots()
        now = self._clock()
        return [effective(view, now) for _, (view, _) in sorted(self._views.items())]

    def tier(self, node_id: str) -> str:
        """As :meth:`FleetVerifier.tier`: the tier of an unexpired affirming result, else "none"."""
        if self._local:
            return self._verifier.tier(node_id)
        view = self.snapshot(node_id)
        if view is None or view.state != apb.ATTESTATION_STATE_AFFIRMING or self.quarantine_reason(node_id):
            return "none"  # a quarantined node is trusted with nothing, affirming or not (as on the leader)
        return view.result.tier

    def quarantine_reason(self, node_id: str) -> str:
        """The reason id of the node's quarantine, "" if it is not quarantined."""
        if self._local:
            held = self._verifier.quarantined.get(node_id)
            return "" if held is None else held.reason
        found = self._views.get(node_id)
        return "" if found is None else found[1]

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """``listener`` gets every change this replica's answers make: the verifier's while it
        leads, the rows it reads while it does not."""

        def from_verifier(view: apb.NodeAttestation) -> None:
            if self._local:
                listener(view)

        unsubscribe = self._verifier.service.subscribe(from_verifier)
        self._listeners.append(listener)

        def both() -> None:
            unsubscribe()
            if listener in self._listeners:
                self._listeners.remove(listener)

        return both

    # ------------------------------------------------------------ the leader writes

    def changed(self, node_id: str) -> None:
        """The verifier's view of the node changed (any thread): write it at the next publish."""
        with self._dirty_lock:
            self._dirty.add(node_id)

    async def publish(self) -> None:
        """On the leader, for its term: every node its verifier knows first (the rows of an earlier
        term, this replica's or another's, are replaced by what this leader has), then what changed,
        every ``PUBLISH_S`` (fenced by the term's lease through ``db``); a failed write is kept for
        the next round."""
        for view in self._verifier.service.snapshots():
            self.changed(view.node_id)
        # The database away, or the term over: the next round retries.
        await every(PUBLISH_S, self.publish_once, "write the attestation results for the other replicas", log)

    async def publish_once(self) -> None:
        with self._dirty_lock:
            dirty, self._dirty = self._dirty, set()
        ordered = sorted(dirty)
        for start in range(0, len(ordered), WRITE_BATCH):
            batch = ordered[start : start + WRITE_BATCH]
            try:
                await self._db(self._store.put_attestations, self._rows(batch))
            except BaseException:  # this batch and the ones after it: the next round
                with self._dirty_lock:
                    self._dirty.update(ordered[start:])
                raise

    def _rows(self, node_ids: list[str]) -> list[AttestationRow]:
        """The verifier's views of these nodes now (read at the write: the newest)."""
        rows = []
        for node_id in node_ids:
            view = self._verifier.service.snapshot(node_id)
            if view is None:  # forgotten by the verifier: its row keeps the last view
                continue
            held = self._verifier.quarantined.get(node_id)
            reason, message = ("", "") if held is None else (held.reason, held.message)
            rows.append(AttestationRow(node_id, view.SerializeToString(), reason, message))
        return rows

    # ------------------------------------------------------------ the others read

    async def load(self) -> None:
        """Every row written so far (at start)."""
        while await self.follow_once() >= READ_LIMIT:
            pass

    async def follow(self) -> None:
        """On every replica (shared store): read the rows written since the cursor every
        ``FOLLOW_S``, and tell the Watch listeners when this replica's answers change source."""

        async def step() -> None:
            try:
                await self.load()
            finally:  # the database away (the next round retries): the source may have changed
                self.switched()

        await every(FOLLOW_S, step, "read the attestation results of the leader", log, first=True)

    def switched(self) -> None:
        """If this replica began or ended leading since the last look, every node as the answers'
        new source has it, to the Watch listeners (a stream on a replica that took over showed
        the old leader's results; it now shows the new leader's)."""
        local = self._local
        if local == self._was_local:
            return
        self._was_local = local
        self._tell(self.snapshots())

    def _tell(self, views: list[apb.NodeAttestation]) -> None:
        for view in views:
            for listener in list(self._listeners):
                try:
                    listener(view)
                except Exception:  # one broken watcher must not stop the others
                    log.exception("attestation listener failed")

    async def follow_once(self) -> int:
        rows = await self._db(self._store.attestations_since, self._cursor, READ_LIMIT)
        now = self._clock()
        for revision, row in rows:
            self._cursor = (revision, row.node_id)
            try:
                view = apb.NodeAttestation.FromString(row.view)
            except Exception:  # written by a leader that had built it: never expected
                log.warning("attestation view of node %s unreadable; skipped", row.node_id)
                continue
            self._views[row.node_id] = (view, row.quarantine_reason)
            if not self._was_local:  # the listeners follow the rows (switched() tells them otherwise)
                self._tell([effective(view, now)])
        return len(rows)
