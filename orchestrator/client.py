"""The Python client of the orchestrator's gRPC API: :class:`EdgewardClient` (synchronous: the
CLI, use-case teams' scripts) and :class:`AsyncEdgewardClient` (asyncio: the operator console).

Both convert gRPC errors at this boundary into one error type, :class:`ClientError` (its
:class:`Unreachable` subclass when the orchestrator did not answer at all), and both speak mutual
TLS with $EDGEWARD_CA/CERT/KEY when those are set (docs/security.md), else plaintext.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from edgeward.security.errors import SecurityError
from edgeward.security.tls import MAX_RESPONSE_BYTES, TlsFiles, grpc_aio_channel, grpc_channel
from edgeward.v1 import api_pb2, api_pb2_grpc, events_pb2, events_pb2_grpc

from .catalog.signing import PublisherKey, sign_metadata

CHUNK = 256 * 1024
NODES_PAGE = 1_000  # nodes per List call (about 0.6 MB at 10,000 nodes' worth of replicas)
ATTESTATION_SERVICE = "edgeward.v1.AttestationService"
EVENT_SERVICE = "edgeward.v1.EventService"
UNREACHABLE_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class ClientError(Exception):
    """A call to the orchestrator failed; ``code`` is the gRPC status name (NOT_FOUND, ...)."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}" if detail else code)
        self.code = code
        self.detail = detail


class Unreachable(ClientError):
    """The orchestrator did not answer (down, wrong address, network)."""


def client_error(err: grpc.RpcError) -> ClientError:
    """The one conversion of a gRPC error into ours."""
    code = err.code()
    cls = Unreachable if code in UNREACHABLE_CODES else ClientError
    return cls(code.name, err.details() or "")


def _call(fn: Callable[..., Any], request: object, timeout: float) -> Any:
    try:
        return fn(request, timeout=timeout)
    except grpc.RpcError as err:
        raise client_error(err) from err


class _Stubs:
    """The stubs of every edgeward.v1 service on one channel (sync or asyncio alike)."""

    def __init__(self, channel: grpc.Channel | grpc.aio.Channel) -> None:
        self.deployments = api_pb2_grpc.DeploymentServiceStub(channel)
        self.nodes = api_pb2_grpc.NodeServiceStub(channel)
        self.models = api_pb2_grpc.ModelServiceStub(channel)
        self.events = events_pb2_grpc.EventServiceStub(channel)
        self.telemetry = api_pb2_grpc.TelemetryServiceStub(channel)
        self.rollouts = api_pb2_grpc.RolloutServiceStub(channel)


def _tls(tls: TlsFiles | None) -> TlsFiles | None:
    return tls or TlsFiles.from_env()


class EdgewardClient(_Stubs):
    def __init__(self, server: str, timeout: float = 15.0, tls: TlsFiles | None = None) -> None:
        """``tls``: mutual TLS with this certificate; default: $EDGEWARD_CA/CERT/KEY, else plaintext."""
        try:
            self._channel = grpc_channel(server, _tls(tls), max_receive=MAX_RESPONSE_BYTES)
        except SecurityError as err:
            raise ClientError("INVALID_ARGUMENT", str(err)) from err
        super().__init__(self._channel)
        self.timeout = timeout

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> EdgewardClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def apply(self, manifest: str, dry_run: bool = False) -> api_pb2.ApplyResponse:
        return _call(
            self.deployments.Apply, api_pb2.ApplyRequest(manifest=manifest, dry_run=dry_run), self.timeout
        )

    def get_deployment(self, name: str) -> api_pb2.Deployment:
        return _call(self.deployments.Get, api_pb2.GetDeploymentRequest(name=name), self.timeout)

    def list_deployments(self) -> list[api_pb2.Deployment]:
        return list(_call(self.deployments.List, api_pb2.ListDeploymentsRequest(), self.timeout).deployments)

    def delete_deployment(self, name: str) -> api_pb2.DeleteDeploymentResponse:
        return _call(self.deployments.Delete, api_pb2.DeleteDeploymentRequest(name=name), self.timeout)

    def list_events(
        self, flt: events_pb2.EventFilter | None = None, limit: int = 100
    ) -> list[events_pb2.Notification]:
        request = events_pb2.ListEventsRequest(filter=flt, limit=limit)
        return list(_call(self.events.List, request, self.timeout).events)

    def watch_events(
        self, flt: events_pb2.EventFilter | None = None, after_seq: int = 0
    ) -> Iterator[events_pb2.Notification]:
        """Live events (after replaying those with seq > ``after_seq``); blocks until cancelled."""
        stream = self.events.Watch(events_pb2.WatchEventsRequest(filter=flt, after_seq=after_seq))
        try:
            yield from stream
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.CANCELLED:
                raise client_error(err) from err
        finally:
            stream.cancel()

    def list_nodes(self) -> list[api_pb2.Node]:
        """Every node, a page (``NODES_PAGE``) per call."""
        nodes: list[api_pb2.Node] = []
        token = ""
        while True:
            request = api_pb2.ListNodesRequest(page_size=NODES_PAGE, page_token=token)
            page = _call(self.nodes.List, request, self.timeout)
            nodes += page.nodes
            token = page.next_page_token
            if not token:
                return nodes

    def get_node(self, node_id: str) -> api_pb2.Node:
        return _call(self.nodes.Get, api_pb2.GetNodeRequest(node_id=node_id), self.timeout)

    def list_models(self) -> list[api_pb2.Model]:
        return list(_call(self.models.List, api_pb2.ListModelsRequest(), self.timeout).models)

    def get_model(self, name: str, version: str = "") -> api_pb2.Model:
        return _call(self.models.Get, api_pb2.GetModelRequest(name=name, version=version), self.timeout)

    def push_model(
        self,
        data: bytes | Path,
        name: str,
        version: str,
        *,
        use_case: str = "",
        description: str = "",
        labels: dict[str, str] | None = None,
        parent_version: str = "",
        owner_team: str = "",
        key: PublisherKey | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> api_pb2.Model:
        """Publish a model version, signed with the publisher ``key`` (the orchestrator refuses
        unsigned pushes unless its ``catalog.require_signatures`` is off)."""
        if isinstance(data, Path):
            data = data.read_bytes()
        meta = api_pb2.ModelMetadata(
            name=name,
            version=version,
            sha256=hashlib.sha256(data).hexdigest(),
            size=len(data),
            use_case=use_case,
            description=description,
            labels=labels or {},
            parent_version=parent_version,
            owner_team=owner_team,
        )
        if key is not None:
            sign_metadata(meta, key)

        def parts() -> Iterator[api_pb2.PushModelRequest]:
            yield api_pb2.PushModelRequest(metadata=meta)
            for offset in range(0, len(data), CHUNK):
                yield api_pb2.PushModelRequest(chunk=data[offset : offset + CHUNK])
                if progress is not None:
                    progress(min(offset + CHUNK, len(data)), len(data))

        try:
            return self.models.Push(parts(), timeout=self.timeout * 4)
        except grpc.RpcError as err:
            raise client_error(err) from err

    def model_history(self, name: str) -> api_pb2.ModelHistory:
        return _call(self.models.History, api_pb2.GetModelRequest(name=name), self.timeout)

    def deprecate_model(self, name: str, version: str, reason: str = "") -> api_pb2.Model:
        request = api_pb2.SetModelStateRequest(name=name, version=version, reason=reason)
        return _call(self.models.Deprecate, request, self.timeout)

    def revoke_model(self, name: str, version: str, reason: str = "") -> api_pb2.Model:
        request = api_pb2.SetModelStateRequest(name=name, version=version, reason=reason)
        return _call(self.models.Revoke, request, self.timeout)

    def placements(self, name: str = "", version: str = "", node_id: str = "") -> list[api_pb2.Placement]:
        request = api_pb2.PlacementsRequest(name=name, version=version, node_id=node_id)
        return list(_call(self.models.Placements, request, self.timeout).placements)

    def compliance(self) -> api_pb2.ComplianceReport:
        return _call(self.models.Compliance, api_pb2.ComplianceRequest(), self.timeout)

    def wipe_model(
        self,
        name: str,
        version: str = "",
        *,
        node_ids: list[str] | None = None,
        deadline_s: float = 0.0,
        reason: str = "",
    ) -> api_pb2.WipeStatus:
        request = api_pb2.WipeRequest(
            name=name, version=version, node_ids=node_ids or [], deadline_s=deadline_s, reason=reason
        )
        return _call(self.models.Wipe, request, self.timeout)

    def get_wipe(self, wipe_id: str) -> api_pb2.WipeStatus:
        return _call(self.models.GetWipe, api_pb2.GetWipeRequest(id=wipe_id), self.timeout)

    def list_wipes(self) -> list[api_pb2.WipeStatus]:
        return list(_call(self.models.ListWipes, api_pb2.ListWipesRequest(), self.timeout).wipes)

    def rollout(self, action: str, deployment: str, reason: str = "") -> api_pb2.RolloutStatus:
        """``action``: status, pause, resume or undo the rollout of ``deployment``."""
        method = getattr(self.rollouts, action.capitalize())
        return _call(method, api_pb2.RolloutRequest(deployment=deployment, reason=reason), self.timeout)


def attestation_modules() -> tuple[ModuleType, ModuleType] | None:
    """The generated attestation modules, or None where this build has no attestation.proto."""
    try:
        from edgeward.v1 import attestation_pb2, attestation_pb2_grpc
    except ImportError:
        return None
    return attestation_pb2, attestation_pb2_grpc


class AsyncEdgewardClient(_Stubs):
    """The orchestrator's API on an asyncio channel, with our errors instead of gRPC's.

    The console makes one per connection attempt, so a channel stuck in gRPC's own reconnect
    backoff never delays the operator's retry."""

    def __init__(self, server: str, timeout: float = 5.0, tls: TlsFiles | None = None) -> None:
        self.server = server
        self.timeout = timeout
        try:
            self._channel = grpc_aio_channel(server, _tls(tls), max_receive=MAX_RESPONSE_BYTES)
        except SecurityError as err:
            raise ClientError("INVALID_ARGUMENT", str(err)) from err
        super().__init__(self._channel)
        self._attestation: Any = None
        self.attestation_pb: ModuleType | None = None

    async def close(self) -> None:
        await self._channel.close()

    async def _unary(self, method: Any, request: Any, wait_s: float | None = None) -> Any:
        try:
            return await method(request, timeout=wait_s or self.timeout)
        except grpc.aio.AioRpcError as err:
            raise client_error(err) from err

    async def _stream(self, method: Any, request: Any) -> AsyncIterator[Any]:
        call = method(request)
        try:
            async for item in call:
                yield item
        except grpc.aio.AioRpcError as err:
            raise client_error(err) from err
        finally:
            call.cancel()
        raise Unreachable("UNAVAILABLE", "the orchestrator ended the stream")

    # ------------------------------------------------------------ discovery

    async def services(self) -> set[str]:
        """Services the orchestrator serves (server reflection); also the reachability probe."""
        # The generated stub takes either kind of channel; its stubs type only the synchronous one.
        stub: Any = reflection_pb2_grpc.ServerReflectionStub(self._channel)  # type: ignore[arg-type]
        call = stub.ServerReflectionInfo(timeout=self.timeout)
        try:
            await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
            await call.done_writing()
            response = await call.read()
        except grpc.aio.AioRpcError as err:
            raise client_error(err) from err
        finally:
            call.cancel()
        if response is grpc.aio.EOF:
            raise Unreachable("UNAVAILABLE", "no reflection answer")
        return {s.name for s in response.list_services_response.service}

    def enable_attestation(self) -> bool:
        """Use the AttestationService (call when :meth:`services` lists it)."""
        modules = attestation_modules()
        if modules is None:
            return False
        self.attestation_pb, grpc_mod = modules
        self._attestation = grpc_mod.AttestationServiceStub(self._channel)
        return True

    # ------------------------------------------------------------ nodes

    async def list_nodes(self) -> list[api_pb2.Node]:
        """Every node, a page (``NODES_PAGE``) per call."""
        nodes: list[api_pb2.Node] = []
        token = ""
        while True:
            request = api_pb2.ListNodesRequest(page_size=NODES_PAGE, page_token=token)
            page = await self._unary(self.nodes.List, request)
            nodes += page.nodes
            token = page.next_page_token
            if not token:
                return nodes

    async def get_node(self, node_id: str) -> api_pb2.Node:
        return await self._unary(self.nodes.Get, api_pb2.GetNodeRequest(node_id=node_id))

    async def cordon(self, node_id: str, cordon: bool) -> api_pb2.Node:
        return await self._unary(self.nodes.Cordon, api_pb2.CordonRequest(node_id=node_id, cordon=cordon))

    async def drain(self, node_id: str) -> api_pb2.DrainResponse:
        return await self._unary(self.nodes.Drain, api_pb2.DrainRequest(node_id=node_id))

    # ------------------------------------------------------------ deployments

    async def list_deployments(self) -> list[api_pb2.Deployment]:
        resp = await self._unary(self.deployments.List, api_pb2.ListDeploymentsRequest())
        return list(resp.deployments)

    def watch_deployments(self) -> AsyncIterator[api_pb2.DeploymentEvent]:
        return self._stream(self.deployments.Watch, api_pb2.WatchDeploymentsRequest())

    async def apply(self, manifest: str, dry_run: bool = False) -> api_pb2.ApplyResponse:
        return await self._unary(
            self.deployments.Apply, api_pb2.ApplyRequest(manifest=manifest, dry_run=dry_run)
        )

    async def delete_deployment(self, name: str) -> api_pb2.DeleteDeploymentResponse:
        return await self._unary(self.deployments.Delete, api_pb2.DeleteDeploymentRequest(name=name))

    # ------------------------------------------------------------ models

    async def list_models(self) -> list[api_pb2.Model]:
        return list((await self._unary(self.models.List, api_pb2.ListModelsRequest())).models)

    async def placements(self, name: str) -> list[api_pb2.Placement]:
        resp = await self._unary(self.models.Placements, api_pb2.PlacementsRequest(name=name))
        return list(resp.placements)

    async def list_wipes(self) -> list[api_pb2.WipeStatus]:
        return list((await self._unary(self.models.ListWipes, api_pb2.ListWipesRequest())).wipes)

    async def wipe(self, name: str, version: str, reason: str) -> api_pb2.WipeStatus:
        request = api_pb2.WipeRequest(name=name, version=version, reason=reason)
        # Wipe revokes, evicts and sends the orders before it answers: give it longer.
        return await self._unary(self.models.Wipe, request, wait_s=self.timeout * 4)

    async def get_wipe(self, wipe_id: str) -> api_pb2.WipeStatus:
        return await self._unary(self.models.GetWipe, api_pb2.GetWipeRequest(id=wipe_id))

    # ------------------------------------------------------------ rollouts

    async def rollout(self, action: str, deployment: str, reason: str = "") -> api_pb2.RolloutStatus:
        """``action`` is Status, Pause, Resume or Undo (RolloutService)."""
        method = getattr(self.rollouts, action)
        return await self._unary(method, api_pb2.RolloutRequest(deployment=deployment, reason=reason))

    # ------------------------------------------------------------ notifications

    async def list_events(self, limit: int = 200) -> list[events_pb2.Notification]:
        resp = await self._unary(self.events.List, events_pb2.ListEventsRequest(limit=limit))
        return list(resp.events)

    def watch_events(self, after_seq: int = 0) -> AsyncIterator[events_pb2.Notification]:
        return self._stream(self.events.Watch, events_pb2.WatchEventsRequest(after_seq=after_seq))

    # ------------------------------------------------------------ telemetry

    async def query_telemetry(self, node_id: str) -> list[api_pb2.TelemetrySample]:
        resp = await self._unary(self.telemetry.Query, api_pb2.QueryTelemetryRequest(node_id=node_id))
        return list(resp.samples)

    def watch_telemetry(self) -> AsyncIterator[api_pb2.TelemetrySample]:
        return self._stream(self.telemetry.Watch, api_pb2.WatchTelemetryRequest())

    # ------------------------------------------------------------ attestation

    def watch_attestations(self) -> AsyncIterator[Any]:
        assert self.attestation_pb is not None
        return self._stream(self._attestation.Watch, self.attestation_pb.WatchAttestationsRequest())

    async def attest_now(self, node_id: str) -> Any:
        assert self.attestation_pb is not None
        # AttestNow waits for the node's answer; give it longer than an ordinary call.
        return await self._unary(
            self._attestation.AttestNow,
            self.attestation_pb.AttestNowRequest(node_id=node_id),
            wait_s=self.timeout * 4,
        )
