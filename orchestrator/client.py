"""A small synchronous Python client of the orchestrator's gRPC API, used by the CLI and by
use-case teams' scripts."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc

from edgeward.security.errors import SecurityError
from edgeward.security.tls import TlsFiles, grpc_channel
from edgeward.v1 import api_pb2, api_pb2_grpc, events_pb2, events_pb2_grpc

from .catalog.signing import PublisherKey, sign_metadata

CHUNK = 256 * 1024


class ClientError(Exception):
    """A call failed; ``code`` is the gRPC status code name (NOT_FOUND, INVALID_ARGUMENT, ...)."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


def _call(fn: Callable, request: object, timeout: float) -> object:
    try:
        return fn(request, timeout=timeout)
    except grpc.RpcError as err:
        raise ClientError(err.code().name, err.details() or "") from err


class EdgewardClient:
    def __init__(self, server: str, timeout: float = 15.0, tls: TlsFiles | None = None) -> None:
        """``tls``: mutual TLS with this certificate; default: $EDGEWARD_CA/CERT/KEY, else plaintext."""
        try:
            self._channel = grpc_channel(server, tls or TlsFiles.from_env())
        except SecurityError as err:
            raise ClientError("INVALID_ARGUMENT", str(err)) from err
        self.deployments = api_pb2_grpc.DeploymentServiceStub(self._channel)
        self.nodes = api_pb2_grpc.NodeServiceStub(self._channel)
        self.models = api_pb2_grpc.ModelServiceStub(self._channel)
        self.events = events_pb2_grpc.EventServiceStub(self._channel)
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
                raise ClientError(err.code().name, err.details() or "") from err
        finally:
            stream.cancel()

    def list_nodes(self) -> list[api_pb2.Node]:
        return list(_call(self.nodes.List, api_pb2.ListNodesRequest(), self.timeout).nodes)

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
            raise ClientError(err.code().name, err.details() or "") from err

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
