"""A real orchestrator with mutual TLS (embedded TLS broker, gRPC mTLS, authorization, audit) and
async gRPC clients holding certificates of the same fleet CA."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest
from security_support import Client, secure_config

from edgeward.security.errors import PkiError
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
        tls = None
        if role is not None:
            identity = parse_subject(role, name, team)
            try:
                files = fleet_ca.files(identity.common_name)
            except PkiError:
                files = fleet_ca.issue(identity)
            tls = TlsFiles(fleet_ca.ca_file, files.cert_file, files.key_file)
        channel = grpc_aio_channel(secure_orchestrator.address, tls)
        channels.append(channel)
        return Client(channel)

    try:
        yield make
    finally:
        for channel in channels:
            await channel.close()
