"""The console's async client of the orchestrator's public gRPC API.

One :class:`ConsoleClient` per connection attempt (the app makes a new one to reconnect, so a
channel stuck in gRPC's own reconnect backoff never delays the operator's retry). gRPC errors
are converted here into :class:`ConsoleError`; :class:`Unreachable` says the orchestrator could
not be reached at all, which the app shows as the banner rather than as a failed action.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from types import ModuleType
from typing import Any

import grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from edgeward.security.errors import SecurityError
from edgeward.security.tls import TlsFiles, grpc_aio_channel
from edgeward.v1 import api_pb2, api_pb2_grpc, events_pb2, events_pb2_grpc

ATTESTATION_SERVICE = "edgeward.v1.AttestationService"
EVENT_SERVICE = "edgeward.v1.EventService"
UNREACHABLE_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class ConsoleError(Exception):
    """A call to the orchestrator failed; ``code`` is the gRPC status name (NOT_FOUND, ...)."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}" if detail else code)
        self.code = code
        self.detail = detail


class Unreachable(ConsoleError):
    """The orchestrator did not answer (down, wrong address, network)."""


def _convert(err: grpc.aio.AioRpcError) -> ConsoleError:
    cls = Unreachable if err.code() in UNREACHABLE_CODES else ConsoleError
    return cls(err.code().name, err.details() or "")


def attestation_modules() -> tuple[ModuleType, ModuleType] | None:
    """The generated attestation modules, or None where this build has no attestation.proto."""
    try:
        from edgeward.v1 import attestation_pb2, attestation_pb2_grpc
    except ImportError:
        return None
    return attestation_pb2, attestation_pb2_grpc


class ConsoleClient:
    """Async stubs of one orchestrator, with our errors instead of gRPC's."""

    def __init__(self, server: str, timeout: float = 5.0) -> None:
        self.server = server
        self.timeout = timeout
        try:  # mutual TLS with $EDGEWARD_CA/CERT/KEY when set (docs/security.md)
            self._channel = grpc_aio_channel(server, TlsFiles.from_env())
        except SecurityError as err:
            raise ConsoleError("INVALID_ARGUMENT", str(err)) from err
        self._deployments = api_pb2_grpc.DeploymentServiceStub(self._channel)
        self._nodes = api_pb2_grpc.NodeServiceStub(self._channel)
        self._models = api_pb2_grpc.ModelServiceStub(self._channel)
        self._events = events_pb2_grpc.EventServiceStub(self._channel)
        self._telemetry = api_pb2_grpc.TelemetryServiceStub(self._channel)
        self._rollouts = api_pb2_grpc.RolloutServiceStub(self._channel)
        self._attestation: Any = None
        self.attestation_pb: ModuleType | None = None

    async def close(self) -> None:
        await self._channel.close()

    async def _unary(self, method: Any, request: Any, wait_s: float | None = None) -> Any:
        try:
            return await method(request, timeout=wait_s or self.timeout)
        except grpc.aio.AioRpcError as err:
            raise _convert(err) from err

    async def _stream(self, method: Any, request: Any) -> AsyncIterator[Any]:
        call = method(request)
        try:
            async for item in call:
                yield item
        except grpc.aio.AioRpcError as err:
            raise _convert(err) from err
        finally:
            call.cancel()
        raise Unreachable("UNAVAILABLE", "the orchestrator ended the stream")

    # ------------------------------------------------------------ discovery

    async def services(self) -> set[str]:
        """Services the orchestrator serves (server reflection); also the reachability probe."""
        stub = reflection_pb2_grpc.ServerReflectionStub(self._channel)
        call = stub.ServerReflectionInfo(timeout=self.timeout)
        try:
            await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
            await call.done_writing()
            response = await call.read()
        except grpc.aio.AioRpcError as err:
            raise _convert(err) from err
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
        return list((await self._unary(self._nodes.List, api_pb2.ListNodesRequest())).nodes)

    async def get_node(self, node_id: str) -> api_pb2.Node:
        return await self._unary(self._nodes.Get, api_pb2.GetNodeRequest(node_id=node_id))

    async def cordon(self, node_id: str, cordon: bool) -> api_pb2.Node:
        return await self._unary(self._nodes.Cordon, api_pb2.CordonRequest(node_id=node_id, cordon=cordon))

    async def drain(self, node_id: str) -> api_pb2.DrainResponse:
        return await self._unary(self._nodes.Drain, api_pb2.DrainRequest(node_id=node_id))

    # ------------------------------------------------------------ deployments

    async def list_deployments(self) -> list[api_pb2.Deployment]:
        resp = await self._unary(self._deployments.List, api_pb2.ListDeploymentsRequest())
        return list(resp.deployments)

    def watch_deployments(self) -> AsyncIterator[api_pb2.DeploymentEvent]:
        return self._stream(self._deployments.Watch, api_pb2.WatchDeploymentsRequest())

    async def apply(self, manifest: str, dry_run: bool = False) -> api_pb2.ApplyResponse:
        return await self._unary(
            self._deployments.Apply, api_pb2.ApplyRequest(manifest=manifest, dry_run=dry_run)
        )

    async def delete_deployment(self, name: str) -> api_pb2.DeleteDeploymentResponse:
        return await self._unary(self._deployments.Delete, api_pb2.DeleteDeploymentRequest(name=name))

    # ------------------------------------------------------------ models

    async def list_models(self) -> list[api_pb2.Model]:
        return list((await self._unary(self._models.List, api_pb2.ListModelsRequest())).models)

    async def placements(self, name: str) -> list[api_pb2.Placement]:
        resp = await self._unary(self._models.Placements, api_pb2.PlacementsRequest(name=name))
        return list(resp.placements)

    async def list_wipes(self) -> list[api_pb2.WipeStatus]:
        return list((await self._unary(self._models.ListWipes, api_pb2.ListWipesRequest())).wipes)

    async def wipe(self, name: str, version: str, reason: str) -> api_pb2.WipeStatus:
        request = api_pb2.WipeRequest(name=name, version=version, reason=reason)
        # Wipe revokes, evicts and sends the orders before it answers: give it longer.
        return await self._unary(self._models.Wipe, request, wait_s=self.timeout * 4)

    async def get_wipe(self, wipe_id: str) -> api_pb2.WipeStatus:
        return await self._unary(self._models.GetWipe, api_pb2.GetWipeRequest(id=wipe_id))

    # ------------------------------------------------------------ rollouts

    async def rollout(self, action: str, deployment: str, reason: str = "") -> api_pb2.RolloutStatus:
        """``action`` is Status, Pause, Resume or Undo (RolloutService)."""
        method = getattr(self._rollouts, action)
        return await self._unary(method, api_pb2.RolloutRequest(deployment=deployment, reason=reason))

    # ------------------------------------------------------------ notifications

    async def list_events(self, limit: int = 200) -> list[events_pb2.Notification]:
        resp = await self._unary(self._events.List, events_pb2.ListEventsRequest(limit=limit))
        return list(resp.events)

    def watch_events(self, after_seq: int = 0) -> AsyncIterator[events_pb2.Notification]:
        return self._stream(self._events.Watch, events_pb2.WatchEventsRequest(after_seq=after_seq))

    # ------------------------------------------------------------ telemetry

    async def query_telemetry(self, node_id: str) -> list[api_pb2.TelemetrySample]:
        resp = await self._unary(self._telemetry.Query, api_pb2.QueryTelemetryRequest(node_id=node_id))
        return list(resp.samples)

    def watch_telemetry(self) -> AsyncIterator[api_pb2.TelemetrySample]:
        return self._stream(self._telemetry.Watch, api_pb2.WatchTelemetryRequest())

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
