"""The artifact server (real orchestrator, real certificates): it serves sealed artifacts to node
certificates only, over mutual TLS with the API's CRL, and audits every refusal."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable

import grpc
import pytest
from security_support import CALL_S, Client, client_tls

from edgeward.security.audit import read_audit
from edgeward.security.pki import FleetCA
from edgeward.security.tls import grpc_aio_channel
from edgeward.v1 import api_pb2, api_pb2_grpc
from orchestrator.server import Orchestrator


def stub(orch: Orchestrator, fleet_ca: FleetCA, role: str | None, name: str = "", team: str | None = None):
    """A ModelService stub on the artifact server's port with a certificate of that identity (None:
    no TLS at all), and its channel."""
    channel = grpc_aio_channel(orch.artifact_address, client_tls(fleet_ca, role, name, team))
    return api_pb2_grpc.ModelServiceStub(channel), channel


async def download(models: api_pb2_grpc.ModelServiceStub, name: str, version: str = "1.0.0") -> bytes:
    request = api_pb2.DownloadModelRequest(name=name, version=version)
    chunks = [c async for c in models.Download(request, timeout=CALL_S)]
    data = b"".join(c.data for c in chunks)
    assert {(c.size, c.sha256) for c in chunks} == {(len(data), hashlib.sha256(data).hexdigest())}
    return data


async def refused(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


async def test_nodes_only_download_from_the_artifact_server(
    connect: Callable[..., Client], fleet_ca: FleetCA, secure_orchestrator: Orchestrator
) -> None:
    orch = secure_orchestrator
    assert orch.artifact_port not in (0, orch.grpc_port)
    assert orch.advertise == orch.artifact_address  # what deploy commands name
    await connect("operator", "alice").push("vib")
    sealed = await orch.db(lambda: orch.store.read_artifact(orch.store.get_sealed("vib", "1.0.0").sha256))

    node, node_channel = stub(orch, fleet_ca, "node", "node-7")
    operator, operator_channel = stub(orch, fleet_ca, "operator", "alice")
    team, team_channel = stub(orch, fleet_ca, "team", "ci", "smart-home")
    bare, bare_channel = stub(orch, fleet_ca, None)
    try:
        assert await download(node, "vib") == sealed
        assert await download(node, "vib", "") == sealed  # no version: the newest
        for who in (operator, team):
            err = await refused(download(who, "vib"))
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED, err.details()
            assert "nodes only" in (err.details() or "")
        err = await refused(download(bare, "vib"))  # no client certificate: no TLS session at all
        assert err.code() == grpc.StatusCode.UNAVAILABLE
        err = await refused(download(node, "nope"))
        assert err.code() == grpc.StatusCode.NOT_FOUND
        err = await refused(download(node, "x" * 300))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT

        fleet_ca.revoke("node-7")
        await asyncio.sleep(1.1)  # the CRL is re-read at most once a second
        err = await refused(download(node, "vib"))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "security.authn.revoked" in (err.details() or "")
    finally:
        for channel in (node_channel, operator_channel, team_channel, bare_channel):
            await channel.close()

    assert orch.guard is not None
    lines = [e for e in read_audit(orch.guard.audit.path) if e["method"].endswith("/Download")]
    assert [(e["who"], e["result"]) for e in lines] == [
        ("operator:alice", "PERMISSION_DENIED"),
        ("team:smart-home:ci", "PERMISSION_DENIED"),
        ("node-7", "INVALID_ARGUMENT"),
        ("node-7", "UNAUTHENTICATED"),
    ]
    metrics = orch.render_metrics().decode()
    assert 'edgeward_artifact_downloads_total{result="served"} 2' in metrics
    assert 'edgeward_artifact_downloads_total{result="refused"} 5' in metrics
