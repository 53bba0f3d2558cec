"""Remote wipe of a model (``edgeward models wipe NAME[:VERSION]``).

One wipe, in this order:

1. the versions' data keys are refused by the key release at once (in memory), then, in one store
   transaction, the versions are revoked, their data keys destroyed, the replicas on the ordered
   nodes evicted (reason ``model.wiped``) and the wipe recorded with every node pending;
2. every ordered node gets a ``wipe`` command naming the model, versions and artifact digests; it
   is sent again every ``wipe_resend_s`` until the node confirms (``agent.wipe.done`` carrying the
   wipe id), so a node that was away gets it when it is back;
3. a node still pending at the deadline is quarantined (reason ``model.wipe.unconfirmed``, shown
   by ``edgeward get nodes``); a confirmation after that is recorded, and the node leaves quarantine
   only by attesting again (orchestrator/verifier.py).

Wipes live in the store, so an orchestrator restart resumes tracking them.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import replace

from edgeward.v1 import api_pb2, node_pb2
from edgeward.wire import now_ms

from ..errors import InvalidModel, NotFound
from ..events import ERROR, INFO, WARNING, EventBus
from ..fleet import Fleet
from ..phases import Phase
from ..store import WIPE_PENDING, ReplicaChange, ReplicaRecord, Store, WipeNode, WipeRecord
from .config import CatalogConfig
from .misuse import InvocationMonitor

log = logging.getLogger(__name__)

PENDING, CONFIRMED, QUARANTINED = WIPE_PENDING, "confirmed", "quarantined"
_PB_STATE = {
    PENDING: api_pb2.WIPE_NODE_STATE_PENDING,
    CONFIRMED: api_pb2.WIPE_NODE_STATE_CONFIRMED,
    QUARANTINED: api_pb2.WIPE_NODE_STATE_QUARANTINED,
}
UNCONFIRMED = "model.wipe.unconfirmed"
WIPE_ID_HEX = 10
WIPE_ID_RE = re.compile(f"wipe-[0-9a-f]{{{WIPE_ID_HEX}}}")

DbCall = Callable[..., Awaitable]
SendWipe = Callable[[str, node_pb2.Wipe], Awaitable[None]]
Quarantine = Callable[[str, str, str], Awaitable[None]]


def status_pb(wipe: WipeRecord) -> api_pb2.WipeStatus:
    states = [n.state for n in wipe.nodes.values()]
    return api_pb2.WipeStatus(
        id=wipe.id,
        name=wipe.name,
        versions=wipe.versions,
        reason=wipe.reason,
        created_unix_ms=wipe.created_ms,
        deadline_unix_ms=wipe.deadline_ms,
        done=PENDING not in states,
        confirmed=states.count(CONFIRMED),
        pending=states.count(PENDING),
        quarantined=states.count(QUARANTINED),
        replicas_evicted=wipe.replicas_evicted,
        nodes=[
            api_pb2.WipeNodeStatus(
                node_id=node_id, state=_PB_STATE[n.state], updated_unix_ms=n.updated_ms, message=n.message
            )
            for node_id, n in sorted(wipe.nodes.items())
        ],
    )


class WipeController:
    def __init__(
        self,
        config: CatalogConfig,
        *,
        store: Store,
        db: DbCall,
        fleet: Fleet,
        telemetry_models: Callable[[str], list[node_pb2.ModelStats]],
        send: SendWipe,
        quarantine: Quarantine,
        revoke_keys: Callable[[str, list[str]], None],
        released_to: Callable[[str, list[str]], set[str]],
        events: EventBus,
        monitor: InvocationMonitor,
        on_change: Callable[[], None],
    ) -> None:
        self.config = config
        self._store = store
        self._db = db
        self._fleet = fleet
        self._telemetry_models = telemetry_models
        self._send = send
        self._quarantine = quarantine
        self._revoke_keys = revoke_keys
        self._released_to = released_to
        self._events = events
        self._monitor = monitor
        self._on_change = on_change
        self.active: dict[str, WipeRecord] = {}  # wipes with a node not confirmed yet
        self._last_sent: dict[tuple[str, str], float] = {}

    async def restore(self) -> None:
        """Resume the wipes an earlier run left unconfirmed; re-quarantine their silent nodes."""
        for wipe in await self._db(self._store.unconfirmed_wipes):
            self.active[wipe.id] = wipe
            for node_id, n in wipe.nodes.items():
                if n.state == QUARANTINED:
                    await self._quarantine(node_id, UNCONFIRMED, n.message)
        if self.active:
            log.info("wipe: %d unconfirmed wipe(s) resumed", len(self.active))

    async def adopt(self) -> None:
        """On the leader: take on the unconfirmed wipes that another replica's API started (that
        replica ordered the nodes; their confirmations, deadlines and re-sends are the leader's).
        Called at every refresh from the store, and at once when a confirmation names a wipe this
        replica does not know."""
        for wipe in await self._db(self._store.unconfirmed_wipes):
            self._adopt(wipe)

    def _adopt(self, wipe: WipeRecord) -> None:
        if wipe.id in self.active or all(n.state == CONFIRMED for n in wipe.nodes.values()):
            return
        self.active[wipe.id] = wipe
        after = time.monotonic() + self.config.misuse.window_s
        for node_id in wipe.nodes:
            for version in wipe.versions:
                self._monitor.wiped(node_id, wipe.name, version, after)
        log.info("wipe %s of %s, started by another replica, taken on", wipe.id, wipe.name)

    # ------------------------------------------------------------ start

    async def start(self, request: api_pb2.WipeRequest) -> WipeRecord:
        store = self._store
        deadline_s = request.deadline_s or self.config.wipe_deadline_s
        if not 0 < deadline_s <= 7 * 86400:
            raise InvalidModel("wipe.bad_deadline", "deadline_s must be within (0, 604800]")
        versions = (
            [request.version]
            if request.version
            else [m.version for m in (await self._db(store.model_history, request.name))[0]]
        )
        records = [await self._db(store.get_model, request.name, v) for v in versions]  # NotFound
        known = set(self._fleet.nodes) | {n.id for n in await self._db(store.list_nodes)}
        for i, node_id in enumerate(request.node_ids):
            if node_id not in known:
                raise InvalidModel("wipe.unknown_node", f"node_ids[{i}]: no node {node_id!r} is known")
        # Refuse the keys before anything else: from here on no node gets them again.
        self._revoke_keys(request.name, versions)
        wanted = set(versions)
        holders = self._holders(request.name, wanted, await self._db(store.list_replicas))
        # ... and every node a key of these versions went to: from this process (a write in
        # flight), and from any replica in any term, read again by the wipe's own transaction after
        # it destroys the keys (a release written later is refused: record_key_releases).
        holders |= self._released_to(request.name, versions)
        holders |= await self._db(store.key_holders, request.name, versions)
        targets = sorted(set(request.node_ids) if request.node_ids else holders)
        wall = now_ms()
        reason = request.reason or "operator request"
        wipe = WipeRecord(
            id=f"wipe-{uuid.uuid4().hex[:WIPE_ID_HEX]}",
            name=request.name,
            versions=tuple(versions),
            sha256s=tuple(r.sha256 for r in records),
            reason=reason,
            created_ms=wall,
            deadline_ms=wall + int(deadline_s * 1000),
            nodes={n: WipeNode(PENDING, wall) for n in targets},
        )
        wipe = await self._db(self._begin, wipe, reason, not request.node_ids)
        self._on_change()
        after = time.monotonic() + self.config.misuse.window_s
        for node_id in wipe.nodes:
            for version in wipe.versions:
                self._monitor.wiped(node_id, wipe.name, version, after)
        self._events.publish(
            "model.wipe.started",
            f"model/{wipe.name}",
            f"wipe {wipe.id} of {', '.join(wipe.versions)}: {len(wipe.nodes)} node(s) ordered, "
            f"{wipe.replicas_evicted} replica(s) evicted, deadline {deadline_s:.0f} s ({reason})",
            WARNING,
            wipe_id=wipe.id,
            versions=",".join(wipe.versions),
            nodes=",".join(wipe.nodes),
        )
        if wipe.nodes:
            self.active[wipe.id] = wipe
            for node_id in wipe.nodes:
                await self._order(wipe, node_id)
        else:
            self._completed(wipe)
        return wipe

    def _begin(self, wipe: WipeRecord, reason: str, by_holders: bool) -> WipeRecord:
        """The wipe's transaction (in the store's thread): the replicas of the wiped versions on
        every node it orders (those its own read of the key releases adds included) are evicted in
        it (``by_holders``: the wipe orders the holders)."""
        wanted = set(wipe.versions)

        def evict(r: ReplicaRecord, nodes: set[str]) -> ReplicaChange | None:
            if not (r.model_name == wipe.name and r.model_version in wanted and r.node_id in nodes):
                return None
            if r.phase == Phase.EVICTED:
                return None
            message = f"{wipe.id}: {reason}"
            evicted = replace(
                r, phase=Phase.EVICTED, reason="model.wiped", message=message, updated_ms=wipe.created_ms
            )
            return ReplicaChange(evicted)

        return self._store.start_wipe(wipe, [], f"wiped: {reason}", key_holders=by_holders, evict=evict)

    def _holders(self, name: str, versions: set[str], replicas: list) -> set[str]:
        """Every node known to hold the model: replicas in the store (evicted ones may still be
        unloading), what the nodes report, and what their telemetry says they have served (the
        caller adds the nodes its key was released to)."""
        nodes = {
            r.node_id for r in replicas if r.node_id and r.model_name == name and r.model_version in versions
        }
        for node_id, view in self._fleet.nodes.items():
            if any(r.model_name == name and r.model_version in versions for r in view.reports.values()):
                nodes.add(node_id)
            if any(
                m.model_name == name and m.model_version in versions for m in self._telemetry_models(node_id)
            ):
                nodes.add(node_id)
        return nodes

    async def _order(self, wipe: WipeRecord, node_id: str) -> None:
        self._last_sent[(wipe.id, node_id)] = time.monotonic()
        await self._send(
            node_id,
            node_pb2.Wipe(
                reason="model.wiped",
                model_name=wipe.name,
                model_version=wipe.versions[0] if len(wipe.versions) == 1 else "",
                sha256=wipe.sha256s,
                wipe_id=wipe.id,
            ),
        )

    # ------------------------------------------------------------ confirmations

    async def confirmed(self, node_id: str, event: node_pb2.Event) -> None:
        wipe_id = event.attributes.get("wipe_id", "")
        if WIPE_ID_RE.fullmatch(wipe_id) and wipe_id not in self.active:
            # Started through another replica since the last refresh: that one wipe from the store
            # (a node naming wipes that do not exist costs one indexed read each, nothing more).
            with contextlib.suppress(NotFound):
                self._adopt(await self._db(self._store.get_wipe, wipe_id))
        wipe = self.active.get(wipe_id)
        if wipe is None or node_id not in wipe.nodes or wipe.nodes[node_id].state == CONFIRMED:
            return
        late = wipe.nodes[node_id].state == QUARANTINED
        node = WipeNode(
            CONFIRMED, now_ms(), (event.message + (" (after the deadline)" if late else ""))[:500]
        )
        await self._db(self._store.set_wipe_node, wipe.id, node_id, node)
        wipe = replace(wipe, nodes={**wipe.nodes, node_id: node})
        self.active[wipe.id] = wipe
        self._events.publish(
            "model.wipe.confirmed",
            f"model/{wipe.name}",
            f"node {node_id} confirmed wipe {wipe.id}: {event.message}"
            + (" (after the deadline)" if late else ""),
            INFO,
            wipe_id=wipe.id,
            node=node_id,
        )
        if all(n.state == CONFIRMED for n in wipe.nodes.values()):
            del self.active[wipe.id]
        if all(n.state != PENDING for n in wipe.nodes.values()) and not late:
            self._completed(wipe)

    def _completed(self, wipe: WipeRecord) -> None:
        states = [n.state for n in wipe.nodes.values()]
        self._events.publish(
            "model.wipe.completed",
            f"model/{wipe.name}",
            f"wipe {wipe.id}: {states.count(CONFIRMED)} node(s) confirmed, {states.count(QUARANTINED)} quarantined",
            INFO if QUARANTINED not in states else WARNING,
            wipe_id=wipe.id,
        )

    # ------------------------------------------------------------ periodic work

    async def tick(self) -> None:
        now = time.monotonic()
        wall = now_ms()
        for wipe in list(self.active.values()):
            for node_id, n in wipe.nodes.items():
                if n.state == CONFIRMED:
                    continue
                if n.state == PENDING and wall > wipe.deadline_ms:
                    await self._expire(wipe.id, node_id, wall)
                    continue
                due = now - self._last_sent.get((wipe.id, node_id), 0.0) >= self.config.wipe_resend_s
                if due and self._reachable(node_id):
                    await self._order(wipe, node_id)

    def _reachable(self, node_id: str) -> bool:
        """Worth sending to: the node said it is online (commands are not kept for absent nodes)."""
        view = self._fleet.nodes.get(node_id)
        return view is not None and view.state == node_pb2.NODE_STATE_ONLINE

    async def _expire(self, wipe_id: str, node_id: str, wall: int) -> None:
        wipe = self.active[wipe_id]
        message = f"did not confirm wipe {wipe.id} of {wipe.name} within the deadline"
        node = WipeNode(QUARANTINED, wall, message)
        await self._db(self._store.set_wipe_node, wipe.id, node_id, node)
        wipe = replace(wipe, nodes={**wipe.nodes, node_id: node})
        self.active[wipe.id] = wipe
        self._events.publish(
            "model.wipe.timeout",
            f"node/{node_id}",
            f"{message}; quarantined",
            ERROR,
            wipe_id=wipe.id,
            model=wipe.name,
        )
        await self._quarantine(node_id, UNCONFIRMED, message)
        if all(n.state != PENDING for n in wipe.nodes.values()):
            self._completed(wipe)
