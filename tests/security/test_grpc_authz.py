"""Mutual TLS and authorization on the orchestrator's gRPC API (real server, real certificates)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from security_support import Client, manifest

from edgeward.security.audit import read_audit
from edgeward.security.authz import may_use, team_of
from edgeward.security.identity import Identity, Role
from edgeward.security.pki import FleetCA, parse_subject
from edgeward.security.tls import TlsFiles, grpc_aio_channel
from edgeward.v1 import api_pb2
from orchestrator.server import Orchestrator

DENIED = grpc.StatusCode.PERMISSION_DENIED


def audit(orch: Orchestrator) -> list[dict]:
    assert orch.guard is not None
    return read_audit(orch.guard.audit.path)


async def expect(code: grpc.StatusCode, call) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == code, info.value.details()
    return info.value.details() or ""


async def test_a_team_cannot_read_or_change_another_teams_deployment(
    connect: Callable[..., Client], secure_orchestrator: Orchestrator
):
    home = connect("team", "ci", team="smart-home")
    auto = connect("team", "ci", team="automotive")
    await home.push("home-model")
    await home.apply(manifest("home-dep", "home-model"))
    assert (await home.get("home-dep")).name == "home-dep"

    details = {
        "get": await expect(DENIED, auto.get("home-dep")),
        "delete": await expect(DENIED, auto.delete("home-dep")),
        "overwrite": await expect(DENIED, auto.apply(manifest("home-dep", "home-model", replicas=3))),
        "use model": await expect(DENIED, auto.apply(manifest("auto-dep", "home-model"))),
        "push over model": await expect(DENIED, auto.push("home-model", "2.0.0")),
    }
    assert "security.authz.not_owner" in details["get"]
    assert "team/smart-home" in details["delete"]
    assert "security.authz.model_not_owned" in details["use model"]
    assert await auto.list() == []
    assert await home.list() == ["home-dep"]
    # Nothing of it changed the deployment, and the operator still sees and can manage everything.
    operator = connect("operator", "alice")
    assert (await operator.get("home-dep")).spec.replicas == 0
    await auto.push("auto-model")
    await auto.apply(manifest("auto-dep", "auto-model"))
    assert await operator.list() == ["auto-dep", "home-dep"]
    assert await home.list() == ["home-dep"]

    lines = audit(secure_orchestrator)
    denials = [x for x in lines if x["result"] == "PERMISSION_DENIED"]
    assert [(x["who"], x["method"].rsplit("/", 1)[-1], x["target"]) for x in denials] == [
        ("team:automotive:ci", "Get", "deployment/home-dep"),
        ("team:automotive:ci", "Delete", "deployment/home-dep"),
        ("team:automotive:ci", "Apply", "deployment/home-dep"),
        ("team:automotive:ci", "Apply", "deployment/auto-dep"),
        ("team:automotive:ci", "Push", "model/home-model"),
    ]
    assert all(x["role"] == "team" and x["team"] == "automotive" and x["reason"] for x in denials)
    allowed = [(x["who"], x["method"].rsplit("/", 1)[-1], x["target"]) for x in lines if x["result"] == "OK"]
    assert allowed == [
        ("team:smart-home:ci", "Push", "model/home-model"),
        ("team:smart-home:ci", "Apply", "deployment/home-dep"),
        ("team:automotive:ci", "Push", "model/auto-model"),
        ("team:automotive:ci", "Apply", "deployment/auto-dep"),
    ]
    # Reads are not audited (only mutations and refusals), and no line carries a secret.
    assert not any(x["method"].endswith(("/Get", "/List")) and x["result"] == "OK" for x in lines)


async def test_a_team_deletes_its_own_deployment_and_the_name_is_free_again(connect: Callable[..., Client]):
    home = connect("team", "ci", team="smart-home")
    auto = connect("team", "ci", team="automotive")
    await home.push("home-model")
    await auto.push("auto-model")
    await home.apply(manifest("shared-name", "home-model"))
    await expect(DENIED, auto.apply(manifest("shared-name", "auto-model")))
    await home.delete("shared-name")
    await auto.apply(manifest("shared-name", "auto-model"))
    await expect(DENIED, home.get("shared-name"))


async def test_two_teams_racing_for_a_new_name_get_one_owner(connect: Callable[..., Client]):
    home = connect("team", "ci", team="smart-home")
    auto = connect("team", "ci", team="automotive")
    await home.push("home-model")
    await auto.push("auto-model")
    outcomes = await asyncio.gather(
        home.apply(manifest("contested", "home-model")),
        auto.apply(manifest("contested", "auto-model")),
        return_exceptions=True,
    )
    winners = [o for o in outcomes if isinstance(o, api_pb2.ApplyResponse)]
    losers = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    assert len(winners) == 1 and [e.code() for e in losers] == [DENIED]
    owner = home if winners[0].deployment.spec.model.name == "home-model" else auto
    assert (await owner.get("contested")).spec.model.name == winners[0].deployment.spec.model.name


async def test_nodes_and_teams_have_no_operator_methods(connect: Callable[..., Client]):
    node = connect("node", "node-1")
    team = connect("team", "ci", team="smart-home")
    await expect(DENIED, node.list())
    await expect(DENIED, node.nodes.List(api_pb2.ListNodesRequest()))
    await expect(DENIED, team.nodes.List(api_pb2.ListNodesRequest()))
    await expect(DENIED, team.nodes.Cordon(api_pb2.CordonRequest(node_id="node-1", cordon=True)))
    # Health checks are for every identity of the fleet.
    for client in (node, team):
        health = health_pb2_grpc.HealthStub(client.channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_unauthenticated_clients_are_refused(
    connect: Callable[..., Client], secure_orchestrator: Orchestrator, tmp_path
):
    other = FleetCA.init(tmp_path / "other-pki")
    stranger = other.issue(parse_subject("operator", "alice"))
    own_ca = secure_orchestrator.config.security.ca_file
    attempts = {
        "plaintext": connect(None),
        "TLS without a client certificate": Client(
            grpc.aio.secure_channel(
                secure_orchestrator.address, grpc.ssl_channel_credentials(own_ca.read_bytes())
            )
        ),
        "certificate of another CA": Client(
            grpc_aio_channel(
                secure_orchestrator.address, TlsFiles(own_ca, stranger.cert_file, stranger.key_file)
            )
        ),
    }
    try:
        for what, client in attempts.items():
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await client.deployments.List(api_pb2.ListDeploymentsRequest(), timeout=3)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE, what
    finally:
        for client in list(attempts.values())[1:]:
            await client.channel.close()
    assert await connect("operator", "alice").list() == []  # the positive control


async def test_a_revoked_certificate_is_refused(
    connect: Callable[..., Client], fleet_ca: FleetCA, secure_orchestrator: Orchestrator
):
    mallory = connect("operator", "mallory")
    assert await mallory.list() == []
    fleet_ca.revoke("operator:mallory")
    await asyncio.sleep(1.1)  # the orchestrator re-reads a changed CRL at most once a second
    detail = await expect(grpc.StatusCode.UNAUTHENTICATED, mallory.list())
    assert "security.authn.revoked" in detail
    assert await connect("operator", "alice").list() == []
    last = audit(secure_orchestrator)[-1]
    assert (last["who"], last["result"]) == ("operator:mallory", "UNAUTHENTICATED")


def test_node_side_ownership_rule():
    """What a node's inference API lets a caller use, from the owner teams of the replicas it holds."""
    assert [team_of(o) for o in ("team/automotive", "operator", None, "teamless")] == [
        "automotive",
        "",
        "",
        "",
    ]
    auto = Identity(Role.TEAM, "ci", "automotive")
    assert may_use(auto, {"automotive"}) and may_use(auto, {""}) and may_use(auto, set())
    assert may_use(auto, {"", "automotive"})
    assert not may_use(auto, {"smart-home"}) and not may_use(auto, {"", "smart-home"})
    assert not may_use(auto, {"automotive", "smart-home"})  # e.g. a pipeline whose stages span teams
    for anyone in (None, Identity(Role.OPERATOR, "alice"), Identity(Role.NODE, "edge-1")):
        assert may_use(anyone, {"smart-home"})
