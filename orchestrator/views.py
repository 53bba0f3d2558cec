"""What the API shows of deployments, nodes and models: store records joined with the live fleet,
telemetry, rollouts and attestation, converted to their ``edgeward.v1`` messages."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from edgeward.v1 import api_pb2, node_pb2

from .catalog.lifecycle import ModelState
from .errors import NotFound
from .fleet import Fleet, NodeView
from .phases import Phase, to_pb
from .rollout import RolloutController, counted_live
from .store import DeploymentRecord, ModelRecord, NodeRecord, ReplicaRecord, Store
from .telemetry import SloQuestion, TelemetryStore
from .trust_mirror import TrustMirror

DbCall = Callable[..., Awaitable[Any]]
FULL = api_pb2.DEPLOYMENT_VIEW_FULL
BASIC = api_pb2.DEPLOYMENT_VIEW_BASIC
VIEWS = frozenset(api_pb2.DeploymentView.values())


# ---------------------------------------------------------------- conversions


def replica_to_pb(rep: ReplicaRecord) -> api_pb2.Replica:
    return api_pb2.Replica(
        id=rep.id,
        node_id=rep.node_id or "",
        phase=to_pb(rep.phase),
        reason=rep.reason,
        message=rep.message,
        updated_unix_ms=rep.updated_ms,
        accelerator=rep.accelerator or "",
        model_version=rep.model_version,
    )


def deployment_to_pb(record: DeploymentRecord, replicas: list[ReplicaRecord]) -> api_pb2.Deployment:
    """The full view: every replica listed, the Running ones of the current generation counted."""
    return _deployment_pb(
        record,
        api_pb2.DeploymentStatus(
            replicas=record.manifest.spec.replicas,
            running=sum(r.phase == Phase.RUNNING and r.generation == record.generation for r in replicas),
            replica_list=[replica_to_pb(r) for r in replicas],
            observed_generation=record.generation,
        ),
    )


def deployment_basic_pb(record: DeploymentRecord, running: int) -> api_pb2.Deployment:
    """The basic view (``DEPLOYMENT_VIEW_BASIC``): the counts, ``running`` as the store counted it."""
    return _deployment_pb(
        record,
        api_pb2.DeploymentStatus(
            replicas=record.manifest.spec.replicas, running=running, observed_generation=record.generation
        ),
    )


def _deployment_pb(record: DeploymentRecord, status: api_pb2.DeploymentStatus) -> api_pb2.Deployment:
    spec = record.manifest.spec
    req = spec.requirements
    return api_pb2.Deployment(
        name=record.name,
        labels=record.manifest.metadata.labels,
        generation=record.generation,
        spec=api_pb2.DeploymentSpec(
            model=api_pb2.ModelRef(name=spec.model.name, version=spec.model.version),
            replicas=spec.replicas,
            requirements=api_pb2.Requirements(
                accelerators=req.accelerators,
                max_latency_ms=req.max_latency_ms,
                memory_bytes=req.memory_bytes,
                attestation_tier="" if req.attestation == "none" else req.attestation,
            ),
            selector=spec.selector.match_labels,
        ),
        status=status,
        created_unix_ms=record.created_ms,
        updated_unix_ms=record.updated_ms,
    )


def node_to_pb(
    node_id: str,
    record: NodeRecord | None,
    view: NodeView | None,
    online: bool,
    replicas: Iterable[ReplicaRecord],
) -> api_pb2.Node:
    """The node as the API shows it; ``replicas`` are the replicas bound to it (any phase)."""
    pb = api_pb2.Node(id=node_id, cordoned=bool(record and record.cordoned))
    pb.state = node_pb2.NODE_STATE_ONLINE if online else node_pb2.NODE_STATE_OFFLINE
    if view is not None and view.hello is not None:
        pb.inventory.CopyFrom(view.hello)
    elif record is not None and record.inventory:
        pb.inventory.ParseFromString(record.inventory)
    if view is not None:
        pb.last_seen_unix_ms = view.last_seen_ms
        if view.telemetry is not None:
            pb.telemetry.CopyFrom(view.telemetry)
    elif record is not None:
        pb.last_seen_unix_ms = record.last_seen_ms
    pb.replicas.extend(replica_to_pb(r) for r in replicas if r.phase != Phase.EVICTED)
    return pb


def model_pb(record: ModelRecord) -> api_pb2.Model:
    """The model as published, with its current lifecycle state from the store."""
    model = api_pb2.Model()
    model.ParseFromString(record.info)
    model.state = ModelState(record.state).to_pb()
    model.state_reason = record.state_reason
    model.updated_unix_ms = record.updated_ms or record.created_ms
    return model


# ---------------------------------------------------------------- joined views


class ApiViews:
    """Deployments and nodes as the API returns them (Get, List, Watch)."""

    def __init__(
        self,
        *,
        store: Store,
        db: DbCall,
        fleet: Fleet,
        telemetry: TelemetryStore,
        rollouts: RolloutController,
        trust: TrustMirror,
        node_timeout_s: float,
    ) -> None:
        self._store = store
        self._db = db
        self._fleet = fleet
        self._telemetry = telemetry
        self._rollouts = rollouts
        self._trust = trust
        self._node_timeout_s = node_timeout_s

    async def deployment(self, name: str, view: int = FULL) -> api_pb2.Deployment:
        if view == BASIC:
            record, counts = await self._db(
                lambda: (self._store.get_deployment(name), self._store.replica_counts(name))
            )
            return self._basic([record], counts)[0]
        record, replicas = await self._db(
            lambda: (self._store.get_deployment(name), self._store.list_replicas(name))
        )
        return self._deployments([(record, replicas)])[0]

    async def deployment_or_none(self, name: str) -> api_pb2.Deployment | None:
        """The deployment, or None once it is deleted."""
        try:
            return await self.deployment(name)
        except NotFound:
            return None

    async def deployments(self, view: int = FULL) -> list[api_pb2.Deployment]:
        if view == BASIC:
            records, counts = await self._db(
                lambda: (self._store.list_deployments(), self._store.replica_counts())
            )
            return self._basic(records, counts)
        records, replicas = await self._db(
            lambda: (self._store.list_deployments(), self._store.list_replicas())
        )
        by_dep: dict[str, list[ReplicaRecord]] = {}
        for rep in replicas:
            by_dep.setdefault(rep.deployment, []).append(rep)
        return self._deployments([(r, by_dep.get(r.name, [])) for r in records])

    def _basic(
        self, records: list[DeploymentRecord], counts: dict[tuple[str, int, Phase], int]
    ) -> list[api_pb2.Deployment]:
        """The counts' view: Running of the current generation, and a rollout's live counts (Running
        of the current generation, live of the others), from the store's counts (on any replica)."""
        rows: dict[str, list[tuple[int, Phase, int]]] = {}
        for (name, generation, phase), n in counts.items():
            rows.setdefault(name, []).append((generation, phase, n))
        live = {r.name: counted_live(r.generation, rows.get(r.name, ())) for r in records}
        out = [deployment_basic_pb(r, live[r.name][0]) for r in records]
        for record, pb in zip(records, out, strict=True):
            self._add_rollout(record, pb, live=live[record.name])
        return out

    def _add_rollout(
        self,
        record: DeploymentRecord,
        pb: api_pb2.Deployment,
        replicas: list[ReplicaRecord] | None = None,
        live: tuple[int, int] | None = None,
    ) -> None:
        """The deployment's latest rollout into its status (both views show it, with its live
        replicas counted from ``replicas`` or as ``live``, on any replica)."""
        if self._rollouts.get(record.name) is not None:
            pb.status.rollout.CopyFrom(self._rollouts.status_pb(record, replicas=replicas, live=live))

    def _deployments(
        self, rows: list[tuple[DeploymentRecord, list[ReplicaRecord]]]
    ) -> list[api_pb2.Deployment]:
        """Deployment messages with their rollout and SLO attainment (telemetry, one pass)."""
        out = [deployment_to_pb(record, replicas) for record, replicas in rows]
        attained = self._telemetry.slo_attainment(
            [
                SloQuestion(
                    record.manifest.spec.requirements.max_latency_ms,
                    [
                        (r.node_id, r.model_name, r.model_version)
                        for r in replicas
                        if r.phase == Phase.RUNNING and r.generation == record.generation and r.node_id
                    ],
                )
                for record, replicas in rows
            ]
        )
        for (record, replicas), pb, slo in zip(rows, out, attained, strict=True):
            if slo.measured:
                pb.status.slo_replicas_measured = slo.measured
                pb.status.slo_replicas_met = slo.met
                pb.status.slo_attainment = slo.met / slo.measured
            self._add_rollout(record, pb, replicas)
        return out

    async def nodes(self, after: str = "", limit: int = 0) -> tuple[list[api_pb2.Node], bool]:
        """The nodes whose id sorts after ``after``, at most ``limit`` of them (0: all), in id order,
        and whether more follow. Only the page's nodes are built."""
        records, replicas = await self._db(lambda: (self._store.list_nodes(), self._store.list_replicas()))
        by_id = {r.id: r for r in records}
        ids = sorted(
            i
            for i in set(by_id) | {n for n, v in self._fleet.nodes.items() if v.hello is not None}
            if i > after
        )
        more = 0 < limit < len(ids)
        if more:
            del ids[limit:]
        page = set(ids)
        on_node: dict[str, list[ReplicaRecord]] = defaultdict(list)  # one pass, not one per node
        for rep in replicas:
            if rep.node_id in page:
                on_node[rep.node_id].append(rep)
        return [self._node(i, by_id.get(i), on_node.get(i, ())) for i in ids], more

    async def node(self, node_id: str) -> api_pb2.Node:
        record, replicas = await self._db(
            lambda: (self._store.get_node(node_id), self._store.list_replicas())
        )
        if record is None and node_id not in self._fleet.nodes:
            raise NotFound("node", node_id)
        return self._node(node_id, record, [r for r in replicas if r.node_id == node_id])

    def _node(
        self, node_id: str, record: NodeRecord | None, replicas: Iterable[ReplicaRecord]
    ) -> api_pb2.Node:
        view = self._fleet.nodes.get(node_id)
        online = view is not None and view.online(time.monotonic(), self._node_timeout_s)
        pb = node_to_pb(node_id, record, view, online, replicas)
        pb.attestation_tier = self._trust.tier(node_id)  # the leader's verifier, on any replica
        pb.quarantine_reason = self._trust.quarantine_reason(node_id)
        return pb
