"""A real orchestrator with mutual TLS (embedded TLS broker, gRPC mTLS, authorization, audit), async
gRPC clients holding certificates of the same fleet CA, and TLS brokers (Mosquitto and embedded)."""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest
from security_support import LOOPBACK, Client, SecureBroker, client_tls, secure_config

from edgeward.mqtt.broker import EmbeddedBroker
from edgeward.security.mqtt_acl import mosquitto_acl
from edgeward.security.pki import FleetCA, parse_subject
from edgeward.security.tls import TlsFiles, grpc_aio_channel
from orchestrator.server import Orchestrator


@pytest.fixture
async def secure_orchestrator(
    fleet_ca: FleetCA, tmp_path: Path, topic_prefix: str
) -> AsyncIterator[Orchestrator]:
    async with Orchestrator(secure_config(fleet_ca, tmp_path / "orch", topic_prefix)) as orch:
        yield orch


@pytest.fixture
async def connect(
    fleet_ca: FleetCA, secure_orchestrator: Orchestrator
) -> AsyncIterator[Callable[..., Client]]:
    """``connect("team", "ci", team="smart-home")``: a client with a fresh certificate of that identity
    (``connect(None)``: a channel without TLS)."""
    channels: list[grpc.aio.Channel] = []

    def make(role: str | None, name: str = "", team: str | None = None) -> Client:
        channel = grpc_aio_channel(secure_orchestrator.address, client_tls(fleet_ca, role, name, team))
        channels.append(channel)
        return Client(channel)

    try:
        yield make
    finally:
        for channel in channels:
            await channel.close()


@pytest.fixture(params=["mosquitto", "embedded"])
async def secure_broker(request, fleet_ca: FleetCA, topic_prefix: str) -> AsyncIterator[SecureBroker]:
    """The same TLS broker rules twice: Mosquitto configured by `edgeward pki mosquitto-conf`, and the
    embedded broker. ``reload()`` does what an operator does after `edgeward pki revoke`: Mosquitto gets
    a regenerated ACL and a SIGHUP (it reloads between two network loop turns); the embedded broker
    follows the CRL file by itself."""
    for node in ("node-1", "node-2"):
        fleet_ca.issue(parse_subject("node", node))
    fleet_ca.issue(parse_subject("team", "ci", "smart-home"))
    if request.param == "mosquitto":
        mosquitto = request.getfixturevalue("mosquitto_tls")()

        def reload() -> None:
            live = [r for r in fleet_ca.list() if r.revoked_at is None]
            subjects = {
                role: sorted({r.subject for r in live if r.role == role}) for role in ("orchestrator", "node")
            }
            acl = mosquitto_acl(topic_prefix, subjects["orchestrator"], [], subjects["node"])
            (mosquitto.workdir / "generated" / "acl").write_text(acl + "\n")
            assert mosquitto.proc is not None
            mosquitto.proc.send_signal(signal.SIGHUP)

        yield SecureBroker("mosquitto", mosquitto.port, fleet_ca, reload)
        return
    orch = fleet_ca.files("orchestrator:main")
    tls = TlsFiles(fleet_ca.ca_file, orch.cert_file, orch.key_file, fleet_ca.crl_file)
    async with EmbeddedBroker(LOOPBACK, 0, tls=tls, topic_prefix=topic_prefix) as broker:
        yield SecureBroker("embedded", broker.port, fleet_ca, lambda: None)
