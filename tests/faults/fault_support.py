"""Helpers of the fault-injection suite: real processes, a synchronous probe of the public gRPC API,
and the invariants every scenario checks afterwards (no deployment lost, no replica doubled,
telemetry gap bounded, state converged)."""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator
from pathlib import Path

import grpc
from processes import Proc, wait_for, wait_passes  # noqa: F401  (re-exported for the fault tests and bench/faults.py)

from attestation.tokens import TokenStore
from edgeward.v1 import api_pb2, api_pb2_grpc, attestation_pb2, attestation_pb2_grpc, node_pb2
from orchestrator.catalog import PublisherKey, sign_metadata
from usecases import model_path

RUNNING = node_pb2.REPLICA_PHASE_RUNNING
EVICTED = node_pb2.REPLICA_PHASE_EVICTED
ONLINE = node_pb2.NODE_STATE_ONLINE
MODEL = model_path("industrial", "int8")
#: Bound on a wait for the fleet to reach a state: it only stops a hang (a wait returns as soon as
#: its condition holds), so it is far above what a loaded machine takes.
WAIT_S = 120.0
#: Signs the suite's model pushes; orchestrators trust it through ``catalog_config``.
PUBLISHER = PublisherKey.generate()


def catalog_config(directory: Path) -> dict:
    """The ``catalog`` config section of an orchestrator that trusts ``PUBLISHER``."""
    directory.mkdir(parents=True, exist_ok=True)
    public = directory / f"{PUBLISHER.key_id}.pub"
    public.write_bytes(PUBLISHER.public_pem())
    return {"trusted_publishers": [str(public)]}


def enrollment_token(orchestrator_state_dir: Path, node_id: str) -> str:
    """A one-time enrollment token for ``node_id``, as the operator mints it (``edgeward pki token``)."""
    return TokenStore.in_state_dir(orchestrator_state_dir).mint(node_id).token


def deployment_manifest(name: str, replicas: int, model: str = "vib-cnn", version: str = "1.0.0") -> str:
    return (
        "apiVersion: edgeward/v1\nkind: Deployment\n"
        f"metadata: {{name: {name}}}\n"
        f"spec:\n  model: {{name: {model}, version: {version}}}\n  replicas: {replicas}\n"
        "  requirements: {accelerators: [cpu-litert], memory: 16Mi}\n"
    )


class Probe:
    """Synchronous stubs of the orchestrator's public API at ``address`` (host:port or unix:path)."""

    def __init__(self, address: str, timeout: float = 5.0) -> None:
        self.channel = grpc.insecure_channel(address)
        self.timeout = timeout
        self.deployments = api_pb2_grpc.DeploymentServiceStub(self.channel)
        self.nodes_stub = api_pb2_grpc.NodeServiceStub(self.channel)
        self.models = api_pb2_grpc.ModelServiceStub(self.channel)
        self.telemetry_stub = api_pb2_grpc.TelemetryServiceStub(self.channel)
        self.attestation = attestation_pb2_grpc.AttestationServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Probe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def nodes(self) -> list[api_pb2.Node]:
        return list(self.nodes_stub.List(api_pb2.ListNodesRequest(), timeout=self.timeout).nodes)

    def online(self) -> set[str]:
        return {n.id for n in self.nodes() if n.state == ONLINE}

    def attested(self) -> set[str]:
        nodes = self.attestation.List(attestation_pb2.ListAttestationsRequest(), timeout=self.timeout).nodes
        return {n.node_id for n in nodes if n.state == attestation_pb2.ATTESTATION_STATE_AFFIRMING}

    def deployment(self, name: str) -> api_pb2.Deployment:
        return self.deployments.Get(api_pb2.GetDeploymentRequest(name=name), timeout=self.timeout)

    def deployment_names(self) -> set[str]:
        listed = self.deployments.List(api_pb2.ListDeploymentsRequest(), timeout=self.timeout)
        return {d.name for d in listed.deployments}

    def apply(self, manifest: str) -> api_pb2.ApplyResponse:
        return self.deployments.Apply(api_pb2.ApplyRequest(manifest=manifest), timeout=self.timeout)

    def push(self, path: Path, name: str = "vib-cnn", version: str = "1.0.0") -> api_pb2.Model:
        data = path.read_bytes()
        meta = api_pb2.ModelMetadata(
            name=name, version=version, size=len(data), sha256=hashlib.sha256(data).hexdigest()
        )
        sign_metadata(meta, PUBLISHER)

        def parts() -> Iterator[api_pb2.PushModelRequest]:
            yield api_pb2.PushModelRequest(metadata=meta)
            yield api_pb2.PushModelRequest(chunk=data)

        return self.models.Push(parts(), timeout=30)

    def telemetry(self, node_id: str, since_unix_ms: int = 0) -> list[int]:
        """Sorted unix-ms stamps of the node's raw telemetry samples the orchestrator holds."""
        response = self.telemetry_stub.Query(
            api_pb2.QueryTelemetryRequest(node_id=node_id, since_unix_ms=since_unix_ms), timeout=self.timeout
        )
        return sorted(s.unix_ms for s in response.samples if s.node_id == node_id)

    def placement(self, name: str) -> dict[str, str]:
        """replica id -> node id of the deployment's replicas that are not evicted."""
        dep = self.deployment(name)
        return {r.id: r.node_id for r in dep.status.replica_list if r.phase != EVICTED}

    def converged(self, desired: dict[str, int]) -> bool:
        """Every deployment has exactly its replicas, all running, on online nodes, and no evicted
        replica is left over (a node still reporting one would keep it in the list): nothing lost,
        nothing doubled."""
        online = self.online()
        for name, replicas in desired.items():
            dep = self.deployment(name)
            listed = list(dep.status.replica_list)
            if len(listed) != replicas or dep.status.running != replicas:
                return False
            if any(r.phase != RUNNING or r.node_id not in online for r in listed):
                return False
        return True


def max_gap_ms(stamps: list[int], start_ms: int, end_ms: int) -> int:
    """Largest gap between consecutive samples inside [start_ms, end_ms], its ends included."""
    inside = [start_ms, *(t for t in stamps if start_ms < t < end_ms), end_ms]
    return max(b - a for a, b in itertools.pairwise(inside))
