"""gRPC services of the orchestrator (edgeward.v1): deployments, nodes, models, telemetry, rollouts.

Each service is given the collaborators it uses (the store, the reconciler, the catalog...), never
the whole orchestrator. Models are locked: publishing seals them (:mod:`.catalog.publish`), and
``Download`` serves only the sealed artifact; the key leaves the orchestrator only wrapped to an
attested node (docs/attestation.md).

Errors raised by the control plane are mapped to status codes in one place (:func:`_status`):
an invalid manifest is INVALID_ARGUMENT with every field path, an unknown model NOT_FOUND.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import grpc

from edgeward.security.authz import Checked, InvalidRequest, RequestCheck, caller, checked_value
from edgeward.security.identity import Role
from edgeward.v1 import api_pb2, api_pb2_grpc, node_pb2
from edgeward.wire import now_ms

from .artifact_server import Artifact, chunks, read_artifact
from .catalog import ModelState
from .catalog.errors import CatalogError
from .catalog.publish import MAX_MODEL_BYTES, ModelPublisher, PushBudget
from .catalog.service import Catalog
from .catalog.views import compliance, node_trust, placements
from .catalog.wipe import status_pb as wipe_status_pb
from .config import TeamQuotaConfig
from .errors import (
    AlreadyExists,
    Busy,
    InvalidArgument,
    InvalidManifest,
    InvalidModel,
    NotFound,
    OrchestratorError,
    QuotaExceeded,
    RevisionGone,
)
from .events import EventBus
from .fleet import Fleet
from .manifest import NAME_RE, SEMVER_STORED_RE, DeploymentManifest, parse_manifest
from .phases import ACTIVE, Phase
from .reconciler import Reconciler
from .rollout import RolloutController, RolloutError
from .store import DeploymentRecord, ReplicaChange, ReplicaRecord, Store
from .telemetry import TelemetryStore
from .trust_mirror import TrustMirror
from .verifier import FleetVerifier
from .views import VIEWS, ApiViews, deployment_to_pb, model_pb, node_to_pb, replica_to_pb

log = logging.getLogger(__name__)

__all__ = [  # the conversions live in .views; kept importable here
    "MAX_MODEL_BYTES",
    "deployment_to_pb",
    "node_to_pb",
    "replica_to_pb",
]

DbCall = Callable[..., Awaitable[Any]]
APPLY = "/edgeward.v1.DeploymentService/Apply"
MAX_REASON_CHARS = 500  # the reason of a model state change or a rollout action


def _status(err: Exception) -> tuple[grpc.StatusCode, str]:
    if isinstance(err, RolloutError) and err.reason == "rollout.no_leader":
        return grpc.StatusCode.UNAVAILABLE, str(err)  # a takeover in progress: try again
    if isinstance(err, CatalogError | RolloutError):
        return grpc.StatusCode.FAILED_PRECONDITION, str(err)
    if isinstance(err, InvalidArgument | InvalidModel):
        return grpc.StatusCode.INVALID_ARGUMENT, str(err)
    if isinstance(err, NotFound):
        return grpc.StatusCode.NOT_FOUND, str(err)
    if isinstance(err, AlreadyExists):
        return grpc.StatusCode.ALREADY_EXISTS, str(err)
    if isinstance(err, Busy | QuotaExceeded):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(err)
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


def request_checks(
    run_blocking: DbCall, pipeline_stages: Callable[[str], Awaitable[set[str]]]
) -> dict[str, RequestCheck]:
    """The checks the authorization interceptor runs before it authorizes (docs/security.md): Apply's
    manifest is parsed and validated here, once, and its names are what ownership is judged on
    (a multi-exit stage's pipeline too, with the deployments already in it: ``pipeline_stages``)."""

    async def apply(request: api_pb2.ApplyRequest) -> Checked:
        try:
            manifest = await run_blocking(parse_manifest, request.manifest)
        except InvalidManifest as err:
            raise InvalidRequest(str(err)) from err
        name, mx = manifest.metadata.name, manifest.spec.multi_exit
        if mx is None:
            return Checked(request, manifest, name, manifest.spec.model.name)
        stages = frozenset(await pipeline_stages(mx.pipeline) - {name})
        return Checked(request, manifest, name, manifest.spec.model.name, mx.pipeline, stages)

    return {APPLY: apply}


@dataclass(frozen=True)
class Control:
    """What every service that changes desired state uses: the store, through its one committer
    (``db``), the reconciler it wakes, the notification bus, and the change feed's wake-up."""

    store: Store
    db: DbCall
    reconciler: Reconciler
    events: EventBus
    changed: Callable[[], None]  # a deployment changed here: read the store's change feed now


class DeploymentService(api_pb2_grpc.DeploymentServiceServicer):
    def __init__(
        self,
        control: Control,
        views: ApiViews,
        watch: WatchHub,
        run_blocking: DbCall,
        quota: TeamQuotaConfig | None = None,
    ) -> None:
        self._control = control
        self._views = views
        self._watch = watch
        self._run_blocking = run_blocking
        self._quota = quota or TeamQuotaConfig()

    @_rpc
    async def Apply(
        self, request: api_pb2.ApplyRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.ApplyResponse:
        manifest: DeploymentManifest | None = checked_value(request)
        if manifest is None:  # no authorization interceptor (plaintext): parse here, off the loop
            manifest = await self._run_blocking(parse_manifest, request.manifest)
        store = self._control.store
        model = manifest.spec.model
        who = caller()
        team = who.owner if who is not None and who.role is Role.TEAM else None
        found = await self._control.db(store.get_model, model.name, model.version)  # NotFound -> NOT_FOUND
        if found.state == ModelState.REVOKED:
            raise CatalogError(
                "deployment.model_revoked",
                f"spec.model: {model.name}:{model.version} is revoked ({found.state_reason}); its key is destroyed",
            )
        if request.dry_run:
            if team is not None:
                await self._control.db(check_team_quota, store, team, manifest, self._quota)
            try:
                record = await self._control.db(store.get_deployment, manifest.metadata.name)
            except NotFound:
                record = DeploymentRecord(manifest.metadata.name, 0, manifest, now_ms(), now_ms())
            return api_pb2.ApplyResponse(deployment=deployment_to_pb(replace(record, manifest=manifest), []))
        if team is None:
            record, created, changed = await self._control.db(store.put_deployment, manifest, now_ms())
        else:  # the check and the write in one call on the store's thread: no Apply between them
            record, created, changed = await self._control.db(
                put_within_quota, store, team, manifest, self._quota, now_ms()
            )
        log.info(
            "deployment %s %s (generation %d)",
            record.name,
            "created" if created else "changed" if changed else "unchanged",
            record.generation,
        )
        self._control.reconciler.trigger()
        replicas = await self._control.db(store.list_replicas, record.name)
        pb = deployment_to_pb(record, replicas)
        if created or changed:
            self._control.changed()
            self._control.events.publish(
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
        return await self._views.deployment(request.name, _view(request.view))

    @_rpc
    async def List(
        self, request: api_pb2.ListDeploymentsRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.ListDeploymentsResponse:
        return api_pb2.ListDeploymentsResponse(deployments=await self._views.deployments(_view(request.view)))

    @_rpc
    async def Delete(
        self, request: api_pb2.DeleteDeploymentRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.DeleteDeploymentResponse:
        record = await self._control.db(self._control.store.get_deployment, request.name)
        evicted = await self._control.db(self._control.store.delete_deployment, request.name, now_ms())
        self._control.reconciler.trigger()
        self._control.changed()
        self._control.events.publish(
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
        control = self._control
        watcher = self._watch.subscribe()
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
                last = await control.db(control.store.revision)
                deps = await self._views.deployments()
                known = {d.name for d in deps}
                for dep in deps:
                    if not request.name or dep.name == request.name:
                        yield api_pb2.DeploymentEvent(
                            type=api_pb2.WATCH_EVENT_TYPE_ADDED, deployment=dep, revision=last
                        )
            while True:
                event = await self._watch.next(watcher)
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
            self._watch.unsubscribe(watcher)

    async def _replay(
        self, after: int, until: int | None, known: set[str] | None
    ) -> AsyncIterator[api_pb2.DeploymentEvent]:
        """The feed's changes in (after, until] (until None: up to the newest), read from the store."""
        control = self._control
        while until is None or after < until:
            limit = 1000 if until is None else min(1000, until - after)
            changes = await control.db(control.store.changes_since, after, limit)
            if not changes:
                return
            pbs = {n: await self._views.deployment_or_none(n) for n in sorted({n for _, n in changes})}
            for revision, name in changes:
                event = change_event(revision, name, pbs[name])
                _added_or_modified(event, known)
                yield event
                after = revision


def put_within_quota(
    store: Store, owner: str, manifest: DeploymentManifest, quota: TeamQuotaConfig, now: int
) -> tuple[DeploymentRecord, bool, bool]:
    """On the store's thread: :func:`check_team_quota`, then the write. Applies through one replica
    take turns on its store thread; Applies of one team through several replicas at once may each
    pass, so a team may exceed its quota by one Apply per replica."""
    check_team_quota(store, owner, manifest, quota)
    return store.put_deployment(manifest, now)


def check_team_quota(store: Store, owner: str, manifest: DeploymentManifest, quota: TeamQuotaConfig) -> None:
    """On the store's thread: refuse an Apply that adds a deployment, or replicas, beyond the team's
    quota (QuotaExceeded). One that keeps or lowers what the team holds passes, also over a quota
    lowered since."""
    name, wanted = manifest.metadata.name, manifest.spec.replicas
    held = store.owned_replicas(owner)
    before = held.pop(name, None)
    if before is None and len(held) + 1 > quota.deployments:
        raise QuotaExceeded(
            "quota.deployments",
            f"the team holds {len(held)} deployments, its quota is {quota.deployments} (team_quota.deployments)",
        )
    total = sum(held.values()) + wanted
    if wanted > (before or 0) and total > quota.replicas:
        raise QuotaExceeded(
            "quota.replicas",
            f"spec.replicas: {wanted} would take the team's replicas to {total}, its quota is "
            f"{quota.replicas} (team_quota.replicas)",
        )


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


Change = tuple[int, str, "api_pb2.Deployment | None", int]  # revision, name, deployment, its bytes


@dataclass(eq=False)  # hashed by identity: the hub's set of them
class Watcher:
    """One Watch stream's queue of changes, and the bytes of the deployments in it."""

    queue: asyncio.Queue[Change]
    queued_bytes: int = 0


class WatchHub:
    """Fan-out of the store's deployment changes to this replica's Watch streams. A watcher that falls
    more than ``depth`` changes, or ``max_bytes`` of deployments, behind loses its oldest queued
    changes; its stream fills the gap from the store. Every queue holds the one deployment message
    of a change (copied into an event as the stream sends it), not a copy each: stalled streams
    held a copy of every change of a 10,000-replica deployment (780 KB) each."""

    def __init__(self, depth: int = 1024, max_bytes: int = 32 * 1024**2) -> None:
        self._subscribers: set[Watcher] = set()
        self._depth = depth
        self._max_bytes = max_bytes
        self.dropped = 0
        self.revision = 0

    def subscribe(self) -> Watcher:
        watcher = Watcher(asyncio.Queue(self._depth))
        self._subscribers.add(watcher)
        return watcher

    def unsubscribe(self, watcher: Watcher) -> None:
        self._subscribers.discard(watcher)

    @staticmethod
    async def next(watcher: Watcher) -> api_pb2.DeploymentEvent:
        revision, name, pb, size = await watcher.queue.get()
        watcher.queued_bytes -= size
        return change_event(revision, name, pb)  # a copy: streams retype it

    def publish_change(self, revision: int, name: str, pb: api_pb2.Deployment | None) -> None:
        size = pb.ByteSize() if pb is not None else 0
        for watcher in self._subscribers:
            queue = watcher.queue
            while queue.full() or (watcher.queued_bytes + size > self._max_bytes and not queue.empty()):
                watcher.queued_bytes -= queue.get_nowait()[3]
                self.dropped += 1
            queue.put_nowait((revision, name, pb, size))
            watcher.queued_bytes += size

    @property
    def watchers(self) -> int:
        return len(self._subscribers)


# ---------------------------------------------------------------- nodes


MAX_NODES_PAGE = 5_000  # NodeService.List: a larger page_size gets this many
_PAGE_PREFIX = "n1:"  # a page token's version prefix


def _view(view: int) -> int:
    """The deployment view asked for (unspecified: full); InvalidArgument for a value this API lacks."""
    if view not in VIEWS:
        raise InvalidArgument([("view", f"{view} is not a DeploymentView (BASIC or FULL)")])
    return view or api_pb2.DEPLOYMENT_VIEW_FULL


def encode_page_token(last_id: str) -> str:
    """The token of the page after the node ``last_id`` (opaque to clients: base64 of a version and
    the id)."""
    return base64.urlsafe_b64encode((_PAGE_PREFIX + last_id).encode()).decode()


def decode_page_token(token: str) -> str:
    """The node id a page token starts after ("" for no token); InvalidArgument if this server did
    not issue it."""
    if not token:
        return ""
    try:
        text = base64.urlsafe_b64decode(token.encode("ascii")).decode()
    except (ValueError, UnicodeError):
        text = ""
    if not text.startswith(_PAGE_PREFIX) or len(text) == len(_PAGE_PREFIX):
        raise InvalidArgument(
            [("page_token", "not a token of this API: pass the previous page's next_page_token")]
        )
    return text[len(_PAGE_PREFIX) :]


class NodeService(api_pb2_grpc.NodeServiceServicer):
    def __init__(self, control: Control, views: ApiViews) -> None:
        self._control = control
        self._views = views

    @_rpc
    async def List(
        self, request: api_pb2.ListNodesRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.ListNodesResponse:
        """Every node, or a page of them (``page_size``, ``page_token``) in node id order: the
        next page starts after the last node of this one, so nodes that come or go in between
        shift no page."""
        if request.page_size < 0:
            raise InvalidArgument([("page_size", "must be 0 (every node) or more")])
        after = decode_page_token(request.page_token)
        size = min(request.page_size, MAX_NODES_PAGE)
        nodes, more = await self._views.nodes(after=after, limit=size)
        token = encode_page_token(nodes[-1].id) if more and nodes else ""
        return api_pb2.ListNodesResponse(nodes=nodes, next_page_token=token)

    @_rpc
    async def Get(self, request: api_pb2.GetNodeRequest, context: grpc.aio.ServicerContext) -> api_pb2.Node:
        return await self._views.node(request.node_id)

    @_rpc
    async def Cordon(self, request: api_pb2.CordonRequest, context: grpc.aio.ServicerContext) -> api_pb2.Node:
        await self._set_cordon(request.node_id, request.cordon)
        node = await self._views.node(request.node_id)
        verb = "cordoned" if request.cordon else "uncordoned"
        self._control.events.publish(f"node.{verb}", f"node/{request.node_id}", f"node {verb}")
        return node

    @_rpc
    async def Drain(
        self, request: api_pb2.DrainRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.DrainResponse:
        await self._set_cordon(request.node_id, True)
        store = self._control.store

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

        count = await self._control.db(evict)
        self._control.reconciler.trigger()
        self._control.events.publish(
            "node.drained", f"node/{request.node_id}", f"drained: {count} replica(s) evicted", evicted=count
        )
        return api_pb2.DrainResponse(node=await self._views.node(request.node_id), replicas_evicted=count)

    async def _set_cordon(self, node_id: str, cordon: bool) -> None:
        await self._control.db(self._control.store.set_cordoned, node_id, cordon)
        reconciler = self._control.reconciler
        cordoned = set(reconciler.cordoned)
        (cordoned.add if cordon else cordoned.discard)(node_id)
        reconciler.set_cordoned(cordoned)


# ---------------------------------------------------------------- models


class DownloadGate:
    """How many artifact downloads are served at once. Past ``limit`` a download is refused at once
    with RESOURCE_EXHAUSTED, which agents try again after a jittered pause: after an apply to a large
    fleet thousands of nodes ask together, and each download served holds a copy of its artifact in
    the send queue. Refusals are counted (``edgeward_model_downloads_refused_total``)."""

    def __init__(self, limit: int = 256) -> None:
        self.limit = limit
        self.active = 0
        self.refused = 0

    def enter(self) -> bool:
        if self.active >= self.limit:
            self.refused += 1
            return False
        self.active += 1
        return True

    def leave(self) -> None:
        self.active -= 1


class ModelService(api_pb2_grpc.ModelServiceServicer):
    def __init__(
        self,
        control: Control,
        publisher: ModelPublisher,
        catalog: Catalog,
        verifier: FleetVerifier,
        fleet: Fleet,
        budget: PushBudget,
        downloads: DownloadGate | None = None,
        trust: TrustMirror | None = None,
    ) -> None:
        """``trust`` answers the trust columns of Placements and Compliance (the leader's
        verifier, on any replica; the server always gives it, tests of other calls need not)."""
        self._control = control
        self._publisher = publisher
        self._catalog = catalog
        self._verifier = verifier
        self._trust = trust
        self._fleet = fleet
        self._budget = budget
        self._downloads = downloads or DownloadGate()
        # Downloads of one model version that arrive while its read is under way share that read
        # (a fleet's nodes download together after an apply); the next burst reads afresh.
        self._reading: dict[tuple[str, str], asyncio.Future[Artifact]] = {}

    def _read_done(self, key: tuple[str, str], read: asyncio.Future) -> None:
        self._reading.pop(key, None)
        if not read.cancelled():
            read.exception()  # retrieved: every waiter may have left before it failed

    @_rpc
    async def Push(
        self, request_iterator: AsyncIterator[api_pb2.PushModelRequest], context: grpc.aio.ServicerContext
    ) -> api_pb2.Model:
        meta: api_pb2.ModelMetadata | None = None
        publisher = ""
        data = bytearray()
        who = str(caller() or context.peer())
        held = 0
        try:
            async for part in request_iterator:
                which = part.WhichOneof("part")
                if which == "metadata":
                    if meta is not None:
                        raise InvalidModel("model.push.metadata_twice", "metadata must be sent once, first")
                    meta = part.metadata
                    # Everything the metadata alone decides is refused before the artifact streams in.
                    publisher = await self._publisher.admit(meta)
                    self._budget.take(who, meta.size)
                    held = meta.size
                elif which == "chunk":
                    if meta is None:
                        raise InvalidModel(
                            "model.push.no_metadata", "the first message must carry the metadata"
                        )
                    data.extend(part.chunk)
                    if len(data) > meta.size or len(data) > MAX_MODEL_BYTES:
                        raise InvalidModel(
                            "model.push.too_large", f"more than the announced {meta.size} bytes"
                        )
                else:  # what was authorized is the first message's name: nothing may come before it
                    raise InvalidModel("model.push.empty_part", "a message with neither metadata nor a chunk")
            if meta is None:
                raise InvalidModel("model.push.no_metadata", "empty push")
            return await self._publisher.publish(meta, bytes(data), publisher, _owner_team(meta))
        finally:
            if held:
                self._budget.give(who, held)

    @_rpc
    async def History(
        self, request: api_pb2.GetModelRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.ModelHistory:
        versions, entries = await self._control.db(self._control.store.model_history, request.name)
        return api_pb2.ModelHistory(
            name=request.name,
            versions=[model_pb(v) for v in versions],
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
        if len(request.reason) > MAX_REASON_CHARS:  # stored, kept in the history and the event bus
            raise InvalidModel(
                "model.state.reason_too_long",
                f"reason: {len(request.reason)} characters, at most {MAX_REASON_CHARS}",
            )
        if state == ModelState.REVOKED:
            self._verifier.revoke_model_keys(request.name, [request.version])
        record = await self._control.db(
            self._control.store.set_model_state,
            request.name,
            request.version,
            state.value,
            request.reason,
            now_ms(),
        )
        self._control.reconciler.trigger()
        self._control.events.publish(
            f"model.{state.value}",
            f"model/{record.name}",
            f"{record.name}:{record.version} {state.value}"
            + (f": {request.reason}" if request.reason else ""),
            node_pb2.SEVERITY_WARNING if state == ModelState.REVOKED else node_pb2.SEVERITY_INFO,
            model=f"{record.name}:{record.version}",
        )
        return model_pb(record)

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
        known = {n.id for n in nodes} | set(self._fleet.nodes)
        return compliance(catalog, placed, len(known), now_ms())

    async def _placements(self, name: str = "", version: str = "", node_id: str = "") -> tuple[list, tuple]:
        store = self._control.store
        catalog, replicas, nodes = await self._control.db(
            lambda: (store.list_models(), store.list_replicas(), store.list_nodes())
        )
        trust = self._trust
        assert trust is not None, "the server gives every ModelService its replica's TrustMirror"
        placed = placements(
            catalog,
            replicas,
            lambda n: node_trust(trust.snapshot(n), trust.tier(n)),
            self._catalog.inferences,
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
        if request.version and not SEMVER_STORED_RE.fullmatch(
            request.version
        ):  # a version stored before the bounds too
            raise InvalidModel("wipe.bad_version", "version must be a semantic version")
        return wipe_status_pb(await self._catalog.wipes.start(request))

    @_rpc
    async def GetWipe(
        self, request: api_pb2.GetWipeRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.WipeStatus:
        return wipe_status_pb(await self._control.db(self._control.store.get_wipe, request.id))

    @_rpc
    async def ListWipes(
        self, request: api_pb2.ListWipesRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.ListWipesResponse:
        wipes = await self._control.db(self._control.store.list_wipes)
        return api_pb2.ListWipesResponse(wipes=[wipe_status_pb(w) for w in wipes])

    @_rpc
    async def List(
        self, request: api_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.ListModelsResponse:
        records = await self._control.db(self._control.store.list_models)
        return api_pb2.ListModelsResponse(models=[model_pb(r) for r in records])

    @_rpc
    async def Get(self, request: api_pb2.GetModelRequest, context: grpc.aio.ServicerContext) -> api_pb2.Model:
        return model_pb(
            await self._control.db(self._control.store.get_model, request.name, request.version or None)
        )

    async def Download(
        self, request: api_pb2.DownloadModelRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[api_pb2.ModelChunk]:
        """The sealed artifact: useless without a data key released to an attested node."""
        if not self._downloads.enter():
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"model.download.busy: {self._downloads.limit} downloads are being served; try again",
            )
        try:
            async for chunk in self._sealed_chunks(request, context):
                yield chunk
        finally:
            self._downloads.leave()

    async def _sealed_chunks(
        self, request: api_pb2.DownloadModelRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[api_pb2.ModelChunk]:
        key = (request.name, request.version)
        shared = self._reading.get(key)
        if shared is None:
            # One trip to the store's thread, not three, shared by the downloads arriving meanwhile.
            read = self._control.db(read_artifact, self._control.store, request.name, request.version)
            shared = self._reading[key] = asyncio.ensure_future(read)
            shared.add_done_callback(partial(self._read_done, key))
        try:
            artifact = await asyncio.shield(shared)  # one caller leaving cancels no other
        except NotFound as err:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(err))
        if artifact.sealed.revoked_ms:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"model.revoked: {artifact.record.name}:{artifact.record.version} is revoked",
            )
        for chunk in chunks(artifact):
            yield chunk


def _owner_team(meta: api_pb2.ModelMetadata) -> str:
    """The team of the caller's certificate (none for operators); only a plaintext server, which
    knows no caller, takes the push metadata's word for it."""
    who = caller()
    return meta.owner_team if who is None else who.team or ""


# ---------------------------------------------------------------- telemetry


class TelemetryService(api_pb2_grpc.TelemetryServiceServicer):
    def __init__(self, telemetry: TelemetryStore) -> None:
        self._telemetry = telemetry

    @_rpc
    async def Query(
        self, request: api_pb2.QueryTelemetryRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.QueryTelemetryResponse:
        samples = self._telemetry.query(request.node_id, request.since_unix_ms, request.rollup)
        return api_pb2.QueryTelemetryResponse(samples=samples)

    async def Watch(
        self, request: api_pb2.WatchTelemetryRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[api_pb2.TelemetrySample]:
        queue = self._telemetry.subscribe()
        try:
            while True:
                sample = await queue.get()
                if not request.node_id or sample.node_id == request.node_id:
                    yield sample
        finally:
            self._telemetry.unsubscribe(queue)


# ---------------------------------------------------------------- rollouts


class RolloutService(api_pb2_grpc.RolloutServiceServicer):
    """``edgeward rollout status|pause|resume|undo``: the rollout controller's operator actions."""

    def __init__(self, store: Store, db: DbCall, rollouts: RolloutController) -> None:
        self._store = store
        self._db = db
        self._rollouts = rollouts

    @_rpc
    async def Status(
        self, request: api_pb2.RolloutRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.RolloutStatus:
        record, replicas = await self._deployment(request.deployment)
        if self._rollouts.get(record.name) is None:
            raise RolloutError("rollout.none", f"deployment {record.name} has no rollout")
        return self._rollouts.status_pb(record, replicas=replicas)

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
            raise InvalidArgument([("deployment", "must be a DNS-1123 label")])
        rollout = await self._rollouts.request(kind, request.deployment, request.reason[:MAX_REASON_CHARS])
        record, replicas = await self._deployment(request.deployment)
        return self._rollouts.status_pb(record, rollout, replicas)

    async def _deployment(self, name: str) -> tuple[DeploymentRecord, list[ReplicaRecord]]:
        """The deployment and its replicas, read together (one snapshot)."""
        store = self._store
        return await self._db(lambda: (store.get_deployment(name), store.list_replicas(name)))
