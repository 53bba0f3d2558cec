"""gRPC services of the orchestrator (edgeward.v1): deployments, nodes, models.

Models are locked: a pushed artifact is sealed with a data key of its own (AES-256-GCM, one key per
model version) before it is stored, and ``Download`` serves only the sealed artifact; the key
leaves the orchestrator only wrapped to an attested node (docs/attestation.md).

Errors raised by the control plane are mapped to status codes in one place (:func:`_status`):
an invalid manifest is INVALID_ARGUMENT with every field path, an unknown model NOT_FOUND.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np

from attestation.artifacts import model_aad
from attestation.keyrelease import new_data_key, seal
from edgeward.security.authz import Checked, InvalidRequest, RequestCheck, caller, checked_value
from edgeward.v1 import api_pb2, api_pb2_grpc, node_pb2
from edgeward.wire import now_ms

from .catalog import ModelState
from .catalog.errors import CatalogError, VersionExists
from .catalog.views import compliance, node_trust, placements
from .catalog.wipe import status_pb as wipe_status_pb
from .errors import AlreadyExists, InvalidManifest, InvalidModel, NotFound, OrchestratorError, RevisionGone
from .fleet import model_work_pb
from .manifest import NAME_RE, SEMVER_RE, DeploymentManifest, parse_manifest
from .phases import ACTIVE, Phase, to_pb
from .rollout import RolloutError
from .store import DeploymentRecord, ModelRecord, NodeRecord, ReplicaChange, ReplicaRecord, SealedArtifact

if TYPE_CHECKING:
    from .server import Orchestrator

log = logging.getLogger(__name__)

MAX_MODEL_BYTES = 64 * 1024 * 1024
CHUNK = 256 * 1024
APPLY = "/edgeward.v1.DeploymentService/Apply"


def _status(err: Exception) -> tuple[grpc.StatusCode, str]:
    if isinstance(err, CatalogError | RolloutError):
        return grpc.StatusCode.FAILED_PRECONDITION, str(err)
    if isinstance(err, InvalidManifest | InvalidModel):
        return grpc.StatusCode.INVALID_ARGUMENT, str(err)
    if isinstance(err, NotFound):
        return grpc.StatusCode.NOT_FOUND, str(err)
    if isinstance(err, AlreadyExists):
        return grpc.StatusCode.ALREADY_EXISTS, str(err)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(err).__name__}"


def _rpc(method: Callable) -> Callable:
    """Convert our errors into gRPC status codes at the boundary."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(self, request, context)
        except OrchestratorError as err:
            code, detail = _status(err)
            await context.abort(code, detail)
        except asyncio.CancelledError:
            raise
        except grpc.aio.AbortError:
            raise
        except Exception as err:
            log.exception("%s failed", method.__name__)
            code, detail = _status(err)
            await context.abort(code, detail)

    return wrapper


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
    spec = record.manifest.spec
    req = spec.requirements
    live = [r for r in replicas if r.phase != Phase.EVICTED]
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
        status=api_pb2.DeploymentStatus(
            replicas=spec.replicas,
            running=sum(r.phase == Phase.RUNNING and r.generation == record.generation for r in live),
            replica_list=[replica_to_pb(r) for r in replicas],
            observed_generation=record.generation,
        ),
        created_unix_ms=record.created_ms,
        updated_unix_ms=record.updated_ms,
    )


def fill_slo_attainment(
    deployments: list[tuple[DeploymentRecord, list[ReplicaRecord], api_pb2.Deployment]],
    reported: Callable[[str], list[node_pb2.ModelStats]],
) -> None:
    """Set ``status.slo_attainment`` of every deployment with a latency SLO, in one pass.

    A running replica of the current generation is measured when its node's latest telemetry has
    a p95 for the replica's model version (the node's recent inferences); it meets the SLO when
    that p95 is at most ``max_latency_ms``. One lookup per node, one vectorised comparison."""
    latest: dict[str, dict[tuple[str, str], float]] = {}
    owner: list[int] = []
    p95: list[float] = []
    slo: list[float] = []
    for i, (record, replicas, _) in enumerate(deployments):
        limit = record.manifest.spec.requirements.max_latency_ms
        if limit <= 0:
            continue
        for rep in replicas:
            if rep.phase != Phase.RUNNING or rep.generation != record.generation or not rep.node_id:
                continue
            stats = latest.get(rep.node_id)
            if stats is None:
                stats = latest[rep.node_id] = {
                    (m.model_name, m.model_version): m.latency_p95_ms
                    for m in reported(rep.node_id)
                    if m.inferences
                }
            value = stats.get((rep.model_name, rep.model_version))
            if value is not None:
                owner.append(i)
                p95.append(value)
                slo.append(limit)
    if not owner:
        return
    rows = np.asarray(owner)
    measured = np.bincount(rows, minlength=len(deployments))
    met = np.bincount(rows, weights=np.asarray(p95) <= np.asarray(slo), minlength=len(deployments))
    for i in np.flatnonzero(measured):
        status = deployments[i][2].status
        status.slo_replicas_measured = int(measured[i])
        status.slo_replicas_met = int(met[i])
        status.slo_attainment = float(met[i] / measured[i])


# ---------------------------------------------------------------- deployments


def request_checks(orch: Orchestrator) -> dict[str, RequestCheck]:
    """The checks the authorization interceptor runs before it authorizes (docs/security.md): Apply's
    manifest is parsed and validated here, once, and its names are what ownership is judged on."""

    async def apply(request: api_pb2.ApplyRequest) -> Checked:
        try:
            manifest = await orch.run_blocking(parse_manifest, request.manifest)
        except InvalidManifest as err:
            raise InvalidRequest(str(err)) from err
        return Checked(request, manifest, manifest.metadata.name, manifest.spec.model.name)

    return {APPLY: apply}


class DeploymentService(api_pb2_grpc.DeploymentServiceServicer):
    def __init__(self, orch: Orchestrator) -> None:
        self._orch = orch

    @_rpc
    async def Apply(
        self, request: api_pb2.ApplyRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.ApplyResponse:
        manifest: DeploymentManifest | None = checked_value(request)
        if manifest is None:  # no authorization interceptor (plaintext): parse here, off the loop
            manifest = await self._orch.run_blocking(parse_manifest, request.manifest)
        store = self._orch.store
        model = manifest.spec.model
        found = await self._orch.db(store.get_model, model.name, model.version)  # NotFound -> NOT_FOUND
        if found.state == ModelState.REVOKED:
            raise CatalogError(
                "deployment.model_revoked",
                f"spec.model: {model.name}:{model.version} is revoked ({found.state_reason}); its key is destroyed",
            )
        if request.dry_run:
            try:
                record = await self._orch.db(store.get_deployment, manifest.metadata.name)
            except NotFound:
                record = DeploymentRecord(manifest.metadata.name, 0, manifest, now_ms(), now_ms())
            return api_pb2.ApplyResponse(deployment=deployment_to_pb(replace(record, manifest=manifest), []))
        record, created, changed = await self._orch.db(store.put_deployment, manifest, now_ms())
        log.info(
            "deployment %s %s (generation %d)",
            record.name,
            "created" if created else "changed" if changed else "unchanged",
            record.generation,
        )
        self._orch.reconciler.trigger()
        replicas = await self._orch.db(store.list_replicas, record.name)
        pb = deployment_to_pb(record, replicas)
        if created or changed:
            self._orch.changed()
            self._orch.events.publish(
                "deployment.applied",
                f"deployment/{record.name}",
                f"{'created' if created else 'changed'}: {model.name}:{model.version} "
                f"x{manifest.spec.replicas} (generation {record.generation})",
                model=f"{model.name}:{model.version}",
                generation=record.generation,
            )
        return api_pb2.ApplyResponse(deployment=pb, created=created, changed=changed)

    @_rpc
    async def Get(
        self, request: api_pb2.GetDeploymentRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.Deployment:
        return await self._orch.deployment_pb(request.name)

    @_rpc
    async def List(
        self, request: api_pb2.ListDeploymentsRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.ListDeploymentsResponse:
        return api_pb2.ListDeploymentsResponse(deployments=await self._orch.all_deployments_pb())

    @_rpc
    async def Delete(
        self, request: api_pb2.DeleteDeploymentRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.DeleteDeploymentResponse:
        record = await self._orch.db(self._orch.store.get_deployment, request.name)
        evicted = await self._orch.db(self._orch.store.delete_deployment, request.name, now_ms())
        self._orch.reconciler.trigger()
        self._orch.changed()
        self._orch.events.publish(
            "deployment.deleted", f"deployment/{record.name}", f"deleted; {len(evicted)} replica(s) evicted"
        )
        return api_pb2.DeleteDeploymentResponse(replicas_evicted=len(evicted))

    async def Watch(
        self, request: api_pb2.WatchDeploymentsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[api_pb2.DeploymentEvent]:
        """Every change of the store's change feed after the snapshot (or ``after_revision``), once,
        in revision order, whichever replica made it. The replica's hub hands changes over as it
        reads them; a gap (this watcher fell behind and lost queued events, or the replica's
        reader is behind the replay) is filled from the store."""
        orch = self._orch
        queue = orch.watch.subscribe()
        try:
            known: set[str] | None = None  # names seen, to tell ADDED from MODIFIED
            if request.after_revision:
                last = request.after_revision
                try:
                    async for event in self._replay(last, None, known):
                        last = event.revision
                        if not request.name or event.deployment.name == request.name:
                            yield event
                except RevisionGone as err:
                    await context.abort(grpc.StatusCode.OUT_OF_RANGE, str(err))
            else:
                last = await orch.db(orch.store.revision)
                deps = await orch.all_deployments_pb()
                known = {d.name for d in deps}
                for dep in deps:
                    if not request.name or dep.name == request.name:
                        yield api_pb2.DeploymentEvent(
                            type=api_pb2.WATCH_EVENT_TYPE_ADDED, deployment=dep, revision=last
                        )
            while True:
                event = await queue.get()
                if event.revision <= last:
                    continue
                events = [event]
                if event.revision > last + 1:
                    try:
                        events = [e async for e in self._replay(last, event.revision - 1, known)] + events
                    except RevisionGone as err:
                        await context.abort(grpc.StatusCode.OUT_OF_RANGE, str(err))
                for e in events:
                    _added_or_modified(e, known)
                    last = e.revision
                    if not request.name or e.deployment.name == request.name:
                        yield e
        finally:
            orch.watch.unsubscribe(queue)

    async def _replay(
        self, after: int, until: int | None, known: set[str] | None
    ) -> AsyncIterator[api_pb2.DeploymentEvent]:
        """The feed's changes in (after, until] (until None: up to the newest), read from the store."""
        orch = self._orch
        while until is None or after < until:
            limit = 1000 if until is None else min(1000, until - after)
            changes = await orch.db(orch.store.changes_since, after, limit)
            if not changes:
                return
            pbs = {n: await orch.deployment_pb_or_none(n) for n in sorted({n for _, n in changes})}
            for revision, name in changes:
                event = change_event(revision, name, pbs[name])
                _added_or_modified(event, known)
                yield event
                after = revision


def change_event(revision: int, name: str, pb: api_pb2.Deployment | None) -> api_pb2.DeploymentEvent:
    if pb is None:
        return api_pb2.DeploymentEvent(
            type=api_pb2.WATCH_EVENT_TYPE_DELETED, deployment=api_pb2.Deployment(name=name), revision=revision
        )
    return api_pb2.DeploymentEvent(type=api_pb2.WATCH_EVENT_TYPE_MODIFIED, deployment=pb, revision=revision)


def _added_or_modified(event: api_pb2.DeploymentEvent, known: set[str] | None) -> None:
    """A watcher that began with a snapshot hears a new deployment as ADDED, once."""
    if known is None:
        return
    name = event.deployment.name
    if event.type == api_pb2.WATCH_EVENT_TYPE_DELETED:
        known.discard(name)
    elif name not in known:
        known.add(name)
        event.type = api_pb2.WATCH_EVENT_TYPE_ADDED


class WatchHub:
    """Fan-out of the store's deployment changes to this replica's Watch streams. A watcher that falls
    more than ``depth`` changes behind loses queued events; its stream fills the gap from the store."""

    def __init__(self, depth: int = 1024) -> None:
        self._subscribers: set[asyncio.Queue[api_pb2.DeploymentEvent]] = set()
        self._depth = depth
        self.dropped = 0
        self.revision = 0

    def subscribe(self) -> asyncio.Queue[api_pb2.DeploymentEvent]:
        queue: asyncio.Queue[api_pb2.DeploymentEvent] = asyncio.Queue(self._depth)
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue) -> None:
        self._subscribers.discard(queue)

    def publish_change(self, revision: int, name: str, pb: api_pb2.Deployment | None) -> None:
        for queue in self._subscribers:
            if queue.full():
                queue.get_nowait()
                self.dropped += 1
            queue.put_nowait(change_event(revision, name, pb))  # one copy each: streams retype it

    @property
    def watchers(self) -> int:
        return len(self._subscribers)


# ---------------------------------------------------------------- nodes


class NodeService(api_pb2_grpc.NodeServiceServicer):
    def __init__(self, orch: Orchestrator) -> None:
        self._orch = orch

    @_rpc
    async def List(
        self, request: api_pb2.ListNodesRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.ListNodesResponse:
        return api_pb2.ListNodesResponse(nodes=await self._orch.nodes_pb())

    @_rpc
    async def Get(self, request: api_pb2.GetNodeRequest, context: grpc.aio.ServicerContext) -> api_pb2.Node:
        return await self._orch.node_pb(request.node_id)

    @_rpc
    async def Cordon(self, request: api_pb2.CordonRequest, context: grpc.aio.ServicerContext) -> api_pb2.Node:
        await self._orch.set_cordon(request.node_id, request.cordon)
        node = await self._orch.node_pb(request.node_id)
        verb = "cordoned" if request.cordon else "uncordoned"
        self._orch.events.publish(f"node.{verb}", f"node/{request.node_id}", f"node {verb}")
        return node

    @_rpc
    async def Drain(
        self, request: api_pb2.DrainRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.DrainResponse:
        await self._orch.set_cordon(request.node_id, True)
        store = self._orch.store

        def evict() -> int:
            wall = now_ms()
            reps = [
                r
                for r in store.list_replicas()
                if r.node_id == request.node_id and r.phase in ACTIVE | {Phase.PENDING, Phase.FAILED}
            ]
            store.apply_replica_changes(
                ReplicaChange(
                    replace(r, phase=Phase.EVICTED, reason="node.drained", message="", updated_ms=wall)
                )
                for r in reps
            )
            return len(reps)

        count = await self._orch.db(evict)
        self._orch.reconciler.trigger()
        self._orch.events.publish(
            "node.drained", f"node/{request.node_id}", f"drained: {count} replica(s) evicted", evicted=count
        )
        return api_pb2.DrainResponse(node=await self._orch.node_pb(request.node_id), replicas_evicted=count)


# ---------------------------------------------------------------- models


class ModelService(api_pb2_grpc.ModelServiceServicer):
    def __init__(self, orch: Orchestrator) -> None:
        self._orch = orch

    @_rpc
    async def Push(
        self, request_iterator: AsyncIterator[api_pb2.PushModelRequest], context: grpc.aio.ServicerContext
    ) -> api_pb2.Model:
        meta: api_pb2.ModelMetadata | None = None
        data = bytearray()
        async for part in request_iterator:
            which = part.WhichOneof("part")
            if which == "metadata":
                if meta is not None:
                    raise InvalidModel("model.push.metadata_twice", "metadata must be sent once, first")
                meta = part.metadata
                _check_metadata(meta)
                # Everything the metadata alone decides is refused before the artifact streams in.
                publisher = self._orch.catalog.trust.verify(meta)
                await self._check_catalog(meta)
            elif which == "chunk":
                if meta is None:
                    raise InvalidModel("model.push.no_metadata", "the first message must carry the metadata")
                data.extend(part.chunk)
                if len(data) > meta.size or len(data) > MAX_MODEL_BYTES:
                    raise InvalidModel("model.push.too_large", f"more than the announced {meta.size} bytes")
        if meta is None:
            raise InvalidModel("model.push.no_metadata", "empty push")
        if len(data) != meta.size:
            raise InvalidModel(
                "model.push.size_mismatch", f"received {len(data)} bytes, announced {meta.size}"
            )
        digest = hashlib.sha256(data).hexdigest()
        if digest != meta.sha256:
            raise InvalidModel("model.push.sha256_mismatch", f"received {digest}, announced {meta.sha256}")
        info = await self._orch.run_blocking(_inspect, bytes(data))
        created = now_ms()
        model = api_pb2.Model(
            name=meta.name,
            version=meta.version,
            sha256=digest,
            size=len(data),
            use_case=meta.use_case,
            description=meta.description,
            labels=meta.labels,
            created_unix_ms=created,
            updated_unix_ms=created,
            inputs=[_tensor(t) for t in info.inputs],
            outputs=[_tensor(t) for t in info.outputs],
            ops=sorted(info.ops),
            dtypes=sorted(info.dtypes),
            parent_version=meta.parent_version,
            owner_team=_owner_team(meta),
            signature=meta.signature if publisher else None,
            state=api_pb2.MODEL_STATE_PUBLISHED,
            profiles=meta.profiles,
            work=None if info.work is None else model_work_pb(info.work),
        )
        record = ModelRecord(
            meta.name, meta.version, digest, len(data), model.SerializeToString(), created, updated_ms=created
        )
        blob, sealed = await self._orch.run_blocking(
            _seal, bytes(data), model_aad(meta.name, meta.version, digest)
        )
        try:
            await self._orch.db(self._orch.store.put_model, record, blob, sealed)
        except AlreadyExists as err:  # pushed concurrently since the check
            raise VersionExists(meta.name, meta.version) from err
        self._orch.verifier.allow_model(meta.name, digest)
        log.info(
            "model %s:%s pushed (%d bytes, sha256 %s, publisher %s), stored sealed",
            meta.name,
            meta.version,
            len(data),
            digest[:12],
            publisher or "unsigned",
        )
        self._orch.reconciler.trigger()
        self._orch.events.publish(
            "model.published",
            f"model/{meta.name}",
            f"{meta.name}:{meta.version} published ({len(data)} bytes"
            + (f", derived from {meta.parent_version}" if meta.parent_version else "")
            + (f", signed by {publisher})" if publisher else ", unsigned)"),
            model=f"{meta.name}:{meta.version}",
            sha256=digest,
            publisher=publisher or None,
            parent_version=meta.parent_version or None,
        )
        return model

    async def _check_catalog(self, meta: api_pb2.ModelMetadata) -> None:
        store = self._orch.store
        try:
            await self._orch.db(store.get_model, meta.name, meta.version)
        except NotFound:
            pass
        else:
            raise VersionExists(meta.name, meta.version)
        if meta.parent_version:
            if not SEMVER_RE.fullmatch(meta.parent_version):
                raise InvalidModel(
                    "model.push.bad_parent", "metadata.parent_version must be a semantic version"
                )
            try:
                await self._orch.db(store.get_model, meta.name, meta.parent_version)
            except NotFound as err:
                raise InvalidModel(
                    "model.push.parent_not_found",
                    f"metadata.parent_version: {meta.name}:{meta.parent_version} is not in the catalog",
                ) from err

    @_rpc
    async def History(
        self, request: api_pb2.GetModelRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.ModelHistory:
        versions, entries = await self._orch.db(self._orch.store.model_history, request.name)
        return api_pb2.ModelHistory(
            name=request.name,
            versions=[_model_pb(v) for v in versions],
            entries=[
                api_pb2.ModelHistoryEntry(
                    version=e.version, action=e.action, reason=e.reason, at_unix_ms=e.at_ms
                )
                for e in entries
            ],
        )

    @_rpc
    async def Deprecate(
        self, request: api_pb2.SetModelStateRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.Model:
        return await self._set_state(request, ModelState.DEPRECATED)

    @_rpc
    async def Revoke(
        self, request: api_pb2.SetModelStateRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.Model:
        return await self._set_state(request, ModelState.REVOKED)

    async def _set_state(self, request: api_pb2.SetModelStateRequest, state: ModelState) -> api_pb2.Model:
        if not request.version:
            raise InvalidModel("model.state.no_version", "version is required: name one version")
        if state == ModelState.REVOKED:
            self._orch.verifier.revoke_model_keys(request.name, [request.version])
        record = await self._orch.db(
            self._orch.store.set_model_state,
            request.name,
            request.version,
            state.value,
            request.reason,
            now_ms(),
        )
        self._orch.reconciler.trigger()
        self._orch.events.publish(
            f"model.{state.value}",
            f"model/{record.name}",
            f"{record.name}:{record.version} {state.value}"
            + (f": {request.reason}" if request.reason else ""),
            node_pb2.SEVERITY_WARNING if state == ModelState.REVOKED else node_pb2.SEVERITY_INFO,
            model=f"{record.name}:{record.version}",
        )
        return _model_pb(record)

    @_rpc
    async def Placements(
        self, request: api_pb2.PlacementsRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.PlacementsResponse:
        if not request.name and not request.node_id:
            raise InvalidModel("model.placements.no_filter", "name or node_id is required")
        placed, _ = await self._placements(request.name, request.version, request.node_id)
        return api_pb2.PlacementsResponse(placements=placed)

    @_rpc
    async def Compliance(
        self, request: api_pb2.ComplianceRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.ComplianceReport:
        placed, (catalog, nodes) = await self._placements()
        known = {n.id for n in nodes} | set(self._orch.fleet.nodes)
        return compliance(catalog, placed, len(known), now_ms())

    async def _placements(self, name: str = "", version: str = "", node_id: str = "") -> tuple[list, tuple]:
        store = self._orch.store
        catalog, replicas, nodes = await self._orch.db(
            lambda: (store.list_models(), store.list_replicas(), store.list_nodes())
        )
        verifier = self._orch.verifier
        placed = placements(
            catalog,
            replicas,
            lambda n: node_trust(verifier.service.snapshot(n), verifier.tier(n)),
            self._orch.catalog.inferences,
            name=name,
            version=version,
            node_id=node_id,
        )
        return placed, (catalog, nodes)

    @_rpc
    async def Wipe(
        self, request: api_pb2.WipeRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.WipeStatus:
        if not NAME_RE.fullmatch(request.name):
            raise InvalidModel("wipe.bad_name", "name must be a DNS-1123 label")
        if request.version and not SEMVER_RE.fullmatch(request.version):
            raise InvalidModel("wipe.bad_version", "version must be a semantic version")
        return wipe_status_pb(await self._orch.catalog.wipes.start(request))

    @_rpc
    async def GetWipe(
        self, request: api_pb2.GetWipeRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.WipeStatus:
        return wipe_status_pb(await self._orch.db(self._orch.store.get_wipe, request.id))

    @_rpc
    async def ListWipes(
        self, request: api_pb2.ListWipesRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.ListWipesResponse:
        wipes = await self._orch.db(self._orch.store.list_wipes)
        return api_pb2.ListWipesResponse(wipes=[wipe_status_pb(w) for w in wipes])

    @_rpc
    async def List(
        self, request: api_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.ListModelsResponse:
        records = await self._orch.db(self._orch.store.list_models)
        return api_pb2.ListModelsResponse(models=[_model_pb(r) for r in records])

    @_rpc
    async def Get(self, request: api_pb2.GetModelRequest, context: grpc.aio.ServicerContext) -> api_pb2.Model:
        return _model_pb(
            await self._orch.db(self._orch.store.get_model, request.name, request.version or None)
        )

    async def Download(
        self, request: api_pb2.DownloadModelRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[api_pb2.ModelChunk]:
        """The sealed artifact: useless without a data key released to an attested node."""
        try:
            record = await self._orch.db(self._orch.store.get_model, request.name, request.version or None)
            sealed = await self._orch.db(self._orch.store.get_sealed, record.name, record.version)
            data = await self._orch.db(self._orch.store.read_artifact, sealed.sha256)
        except NotFound as err:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(err))
        if sealed.revoked_ms:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"model.revoked: {record.name}:{record.version} is revoked",
            )
        for offset in range(0, len(data), CHUNK):
            yield api_pb2.ModelChunk(
                data=data[offset : offset + CHUNK], offset=offset, size=len(data), sha256=sealed.sha256
            )


def _seal(data: bytes, aad: bytes) -> tuple[bytes, SealedArtifact]:
    data_key = new_data_key()
    blob = seal(data_key, data, aad)
    return blob, SealedArtifact(hashlib.sha256(blob).hexdigest(), len(blob), data_key)


def _check_metadata(meta: api_pb2.ModelMetadata) -> None:
    if not NAME_RE.fullmatch(meta.name):
        raise InvalidModel("model.push.bad_name", "metadata.name must be a DNS-1123 label")
    if not SEMVER_RE.fullmatch(meta.version):
        raise InvalidModel(
            "model.push.bad_version", "metadata.version must be a semantic version such as 1.0.0"
        )
    if len(meta.sha256) != 64:
        raise InvalidModel("model.push.bad_sha256", "metadata.sha256 must be 64 hex digits")
    if not 0 < meta.size <= MAX_MODEL_BYTES:
        raise InvalidModel("model.push.bad_size", f"metadata.size must be within 1..{MAX_MODEL_BYTES}")


def _owner_team(meta: api_pb2.ModelMetadata) -> str:
    """The team of the caller's certificate (none for operators); only a plaintext server, which
    knows no caller, takes the push metadata's word for it."""
    who = caller()
    return meta.owner_team if who is None else who.team or ""


def _inspect(data: bytes) -> Any:
    from accelerators.base import InvalidModel as NotTflite
    from accelerators.tflite_model import inspect_tflite

    try:
        return inspect_tflite(data)
    except NotTflite as err:
        raise InvalidModel("model.push.not_tflite", str(err)) from err


def _tensor(spec: Any) -> api_pb2.TensorSpec:
    quant = spec.quantization
    scale, zero = (quant.scale, quant.zero_point) if quant is not None else (0.0, 0)
    return api_pb2.TensorSpec(
        name=spec.name, datatype=spec.dtype, shape=list(spec.shape), scale=scale, zero_point=zero
    )


def _model_pb(record: ModelRecord) -> api_pb2.Model:
    """The model as published, with its current lifecycle state from the store."""
    model = api_pb2.Model()
    model.ParseFromString(record.info)
    model.state = ModelState(record.state).to_pb()
    model.state_reason = record.state_reason
    model.updated_unix_ms = record.updated_ms or record.created_ms
    return model


def node_to_pb(
    node_id: str, record: NodeRecord | None, view: Any, online: bool, replicas: Iterable[ReplicaRecord]
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


# ---------------------------------------------------------------- telemetry


class TelemetryService(api_pb2_grpc.TelemetryServiceServicer):
    def __init__(self, orch: Orchestrator) -> None:
        self._orch = orch

    @_rpc
    async def Query(
        self, request: api_pb2.QueryTelemetryRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.QueryTelemetryResponse:
        samples = self._orch.telemetry.query(request.node_id, request.since_unix_ms, request.rollup)
        return api_pb2.QueryTelemetryResponse(samples=samples)

    async def Watch(
        self, request: api_pb2.WatchTelemetryRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[api_pb2.TelemetrySample]:
        queue = self._orch.telemetry.subscribe()
        try:
            while True:
                sample = await queue.get()
                if not request.node_id or sample.node_id == request.node_id:
                    yield sample
        finally:
            self._orch.telemetry.unsubscribe(queue)


# ---------------------------------------------------------------- rollouts


class RolloutService(api_pb2_grpc.RolloutServiceServicer):
    """``edgeward rollout status|pause|resume|undo``: the rollout controller's operator actions."""

    def __init__(self, orch: Orchestrator) -> None:
        self._orch = orch

    @_rpc
    async def Status(
        self, request: api_pb2.RolloutRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.RolloutStatus:
        record = await self._orch.db(self._orch.store.get_deployment, request.deployment)
        if self._orch.rollouts.get(record.name) is None:
            raise RolloutError("rollout.none", f"deployment {record.name} has no rollout")
        return self._orch.rollouts.status_pb(record)

    @_rpc
    async def Pause(
        self, request: api_pb2.RolloutRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.RolloutStatus:
        return await self._act("pause", request)

    @_rpc
    async def Resume(
        self, request: api_pb2.RolloutRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.RolloutStatus:
        return await self._act("resume", request)

    @_rpc
    async def Undo(
        self, request: api_pb2.RolloutRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.RolloutStatus:
        return await self._act("undo", request)

    async def _act(self, kind: str, request: api_pb2.RolloutRequest) -> api_pb2.RolloutStatus:
        if not NAME_RE.fullmatch(request.deployment):
            raise InvalidManifest([("deployment", "must be a DNS-1123 label")])
        rollout = await self._orch.rollouts.request(kind, request.deployment, request.reason[:500])
        record = await self._orch.db(self._orch.store.get_deployment, request.deployment)
        return self._orch.rollouts.status_pb(record, rollout)
