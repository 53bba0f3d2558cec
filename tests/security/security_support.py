"""Helpers of the security tests: async API clients, manifests, a secure orchestrator config, MQTT
sessions against a TLS broker."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

from edgeward.mqtt.session import BrokerURL, Message, MqttSession
from edgeward.security.errors import PkiError
from edgeward.security.pki import FleetCA, IssuedFiles, parse_subject
from edgeward.security.tls import TlsFiles
from edgeward.v1 import api_pb2, api_pb2_grpc
from orchestrator.config import BrokerConfig, OrchestratorConfig
from usecases import model_path

MODEL = model_path("industrial", "int8")
LOOPBACK = "127.0.0.1"
#: Deadline of a client call: it only stops a hang. The orchestrator runs in the test's own process
#: and event loop, so on a loaded machine a call can take seconds; a tight deadline turned that
#: into DEADLINE_EXCEEDED.
CALL_S = 120.0


def manifest(name: str, model: str, replicas: int = 0) -> str:
    return (
        "apiVersion: edgeward/v1\nkind: Deployment\n"
        f"metadata: {{name: {name}}}\n"
        f"spec:\n  model: {{name: {model}, version: 1.0.0}}\n  replicas: {replicas}\n"
    )


class Client:
    """Async stubs of the public API over one channel with one certificate."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.channel = channel
        self.deployments = api_pb2_grpc.DeploymentServiceStub(channel)
        self.nodes = api_pb2_grpc.NodeServiceStub(channel)
        self.models = api_pb2_grpc.ModelServiceStub(channel)

    async def push(
        self,
        name: str,
        version: str = "1.0.0",
        owner_team: str = "",
        lead: tuple[api_pb2.PushModelRequest, ...] = (),
    ) -> api_pb2.Model:
        """Push the test model; ``lead``: messages sent before its metadata (a hostile client's)."""
        data = MODEL.read_bytes()
        meta = api_pb2.ModelMetadata(
            name=name,
            version=version,
            size=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
            owner_team=owner_team,
        )

        async def parts():
            for part in lead:
                yield part
            yield api_pb2.PushModelRequest(metadata=meta)
            yield api_pb2.PushModelRequest(chunk=data)

        return await self.models.Push(parts(), timeout=CALL_S)

    async def apply(self, text: str) -> api_pb2.ApplyResponse:
        return await self.deployments.Apply(api_pb2.ApplyRequest(manifest=text), timeout=CALL_S)

    async def get(self, name: str) -> api_pb2.Deployment:
        return await self.deployments.Get(api_pb2.GetDeploymentRequest(name=name), timeout=CALL_S)

    async def delete(self, name: str) -> api_pb2.DeleteDeploymentResponse:
        return await self.deployments.Delete(api_pb2.DeleteDeploymentRequest(name=name), timeout=CALL_S)

    async def list(self) -> list[str]:
        response = await self.deployments.List(api_pb2.ListDeploymentsRequest(), timeout=CALL_S)
        return sorted(d.name for d in response.deployments)


def client_tls(ca: FleetCA, role: str | None, name: str = "", team: str | None = None) -> TlsFiles | None:
    """TLS files of a certificate of that identity, issued on first use (None for ``role`` None:
    no TLS at all)."""
    if role is None:
        return None
    identity = parse_subject(role, name, team)
    try:
        files = ca.files(identity.common_name)
    except PkiError:
        files = ca.issue(identity)
    return TlsFiles(ca.ca_file, files.cert_file, files.key_file)


def secure_config(ca: FleetCA, state_dir: Path, topic_prefix: str, **kw: object) -> OrchestratorConfig:
    return OrchestratorConfig.model_validate(
        {
            "state_dir": state_dir,
            "grpc_bind": "127.0.0.1:0",
            "node_timeout_s": 5.0,
            "reconcile_interval_s": 0.2,
            "resend_interval_s": 1.0,
            "broker": BrokerConfig(topic_prefix=topic_prefix),
            "security": {"pki_dir": ca.dir},
            # Publisher signatures are the catalog's business (tests/integration); here: authorization.
            "catalog": {"require_signatures": False},
            **kw,
        }
    )


@dataclass
class SecureBroker:
    kind: str
    port: int
    ca: FleetCA
    reload: Callable[[], None]  # make the broker see a new CRL

    def url(self, files: IssuedFiles | None, ca: FleetCA | None = None) -> BrokerURL:
        ca_file = str((ca or self.ca).ca_file)
        if files is None:
            return BrokerURL(host=LOOPBACK, port=self.port, tls=True, ca_file=ca_file)
        return BrokerURL(
            host=LOOPBACK,
            port=self.port,
            tls=True,
            ca_file=ca_file,
            cert_file=str(files.cert_file),
            key_file=str(files.key_file),
        )


def session(broker: SecureBroker, subject: str, client_id: str | None = None, **kw) -> MqttSession:
    return MqttSession(broker.url(broker.ca.files(subject)), client_id or subject.replace(":", "-"), **kw)


async def collect_until(sess: MqttSession, sentinel_topic: str, timeout: float = 5.0) -> list[Message]:
    """Messages received up to and including the first one on ``sentinel_topic``."""
    got: list[Message] = []
    async with asyncio.timeout(timeout):
        async for message in sess.messages():
            got.append(message)
            if message.topic == sentinel_topic:
                return got
    raise AssertionError("session closed")
