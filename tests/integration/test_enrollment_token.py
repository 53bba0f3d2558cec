"""Enrollment approval end to end (orchestrator default policy token-or-ek, real agents, real broker):
a node the operator did not approve is refused and gets no model; a token minted with
``edgeward pki token`` lets it enroll; the spent token admits nobody else; an enrolled node restarts
without a new token."""

from __future__ import annotations

import asyncio
import sys

import pytest
from conftest import eventually, manifest, quiet_for

from attestation.tokens import TOKEN_RE, TokenStore
from edgeward.v1 import events_pb2, node_pb2
from node_agent.agent import NodeAgent
from node_agent.config import AgentConfig
from orchestrator.server import Orchestrator

pytestmark = [pytest.mark.broker]

RUNNING = node_pb2.REPLICA_PHASE_RUNNING


def refusals(orch: Orchestrator, node_id: str) -> list[str]:
    """Reason ids of the attestation.enrollment.refused events about ``node_id``."""
    flt = events_pb2.EventFilter(
        kind_prefix="attestation.enrollment.refused", subject_prefix=f"node/{node_id}"
    )
    return [e.attributes["reason"] for e in orch.events.recent(flt) if e.subject == f"node/{node_id}"]


async def pki_token(state_dir, node_id: str) -> str:
    """What the operator does: ``edgeward pki token NODE`` against the running orchestrator's state."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "edgeward",
        "pki",
        "token",
        node_id,
        "--ttl",
        "5m",
        "--state-dir",
        str(state_dir),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    token = out.decode().strip()
    assert TOKEN_RE.fullmatch(token), "stdout is the token alone"
    assert token not in err.decode()
    return token


async def test_only_approved_nodes_enroll_and_restarts_need_no_new_token(fleet, tmp_path):
    orch, [n1], api = await fleet(nodes=1, max_replicas=1)  # the fixture approves n1 with a token
    await api.push()
    await api.apply(manifest(replicas=2))

    async def running() -> list[str]:
        dep = await api.deployment("vib")
        return sorted(r.node_id for r in dep.status.replica_list if r.phase == RUNNING)

    async def online(node_id: str) -> bool:
        return any(n.id == node_id and n.state == 1 for n in await api.nodes_list())

    await eventually(lambda: _is(running, ["n1"]), what="the replica on n1")

    def config(node_id: str, token: str | None = None) -> AgentConfig:
        return AgentConfig(
            node_id=node_id,
            heartbeat_s=0.5,
            max_replicas=1,
            broker=n1.config.broker,
            state_dir=tmp_path / "agents",
            enrollment_token=token,
        )

    # 1. Not approved: refused (reason recorded, event published), never trusted, never given a model.
    async with NodeAgent(config("n2")) as n2:
        await eventually(lambda: online("n2"), what="n2 online")
        await eventually(
            lambda: _true(refusals(orch, "n2") == ["enrollment.token.missing"]),
            what="n2's enrollment refused",
        )
        await quiet_for(orch, passes=5)  # several reconcile passes with a free replica and a free node
        assert await running() == ["n1"]
        assert n2.runtime.replicas == {}
        assert orch.verifier.tier("n2") == "none" and orch.verifier.service.state("n2") is None
        assert orch.verifier.service.rejections.counts["enrollment.token.missing"] >= 1
        reason, message = orch.verifier.why_not_trusted("n2")
        assert reason == "attestation.missing" and "enrollment.token.missing" in message

    # 2. The operator approves n2: the same device (same key) enrolls and takes the free replica.
    token = await pki_token(orch.config.state_dir, "n2")
    async with NodeAgent(config("n2", token)) as n2:
        await eventually(lambda: _is(running, ["n1", "n2"]), what="a replica on n2")
        [record] = [e for e in orch.verifier.service.enrollments() if e.node_id == "n2"]
        used = [r for r in TokenStore.in_state_dir(orch.config.state_dir).list() if r.node_id == "n2"]
        assert [r.used_unix_ms is not None for r in used] == [True]

        # 3. The spent token admits no other node.
        async with NodeAgent(config("n3", token)) as n3:
            await eventually(
                lambda: _true(refusals(orch, "n3") == ["enrollment.token.used"]),
                what="n3's enrollment refused",
            )
            assert orch.verifier.service.state("n3") is None and n3.runtime.replicas == {}

    # 4. n2 restarts (its spent token still in its config): it attests again, no new enrollment.
    async with NodeAgent(config("n2", token)):
        await eventually(lambda: _is(running, ["n1", "n2"]), timeout=30, what="the replica back on n2")
        assert [e for e in orch.verifier.service.enrollments() if e.node_id == "n2"] == [record]
    assert refusals(orch, "n2") == ["enrollment.token.missing"]


async def _is(probe, expected) -> bool:
    return await probe() == expected


async def _true(value: bool) -> bool:
    return value
