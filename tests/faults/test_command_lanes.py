"""Commands run in lanes (node_agent.agent.LANES): attestation beside the replica changes, each lane
in arrival order, no lane waiting for an acknowledgement's PUBACK. A broker that acknowledges the
node's answers late is the fault knob ``answer_ack_delay_ms``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from edgeward.mqtt.session import BrokerURL, MqttSession
from edgeward.mqtt.topics import TopicKind, node_topic
from edgeward.v1 import node_pb2
from node_agent.agent import NodeAgent
from node_agent.config import AgentConfig

pytestmark = [pytest.mark.faults, pytest.mark.broker, pytest.mark.timeout(90)]

NODE = "lanes-1"
LATE_S = 600.0  # far longer than the test's timeout: an answer waiting for its PUBACK never gets it


def _spec(replica_id: str, digest: str = "0") -> node_pb2.DeployReplica:
    return node_pb2.DeployReplica(
        replica_id=replica_id,
        deployment="d",
        model_name="m",
        model_version="1.0.0",
        sha256=digest * 64,
        size=10,
        accelerator="cpu-litert",
        artifact_endpoint="127.0.0.1:9",  # nothing listens: the load fails, the replica stays listed
    )


@dataclass
class FakeOrchestrator:
    """Sends commands to the node and records what it answers, in arrival order."""

    session: MqttSession
    prefix: str
    answers: list[tuple[str, str]] = field(default_factory=list)  # ("ack"|"dup"|"evidence"|event id, id)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def send(self, command_id: str, **body: object) -> None:
        cmd = node_pb2.Command(schema=1, command_id=command_id, node_id=NODE, **body)
        await self.session.publish(
            node_topic(NODE, TopicKind.CMD, self.prefix), cmd.SerializeToString(), qos=1
        )

    async def until(self, done: Callable[[], bool]) -> None:
        while not done():
            self.changed.clear()
            await self.changed.wait()

    def acked(self, command_id: str) -> int:
        return sum(1 for kind, cid in self.answers if kind in ("ack", "dup") and cid == command_id)

    async def listen(self) -> None:
        async for message in self.session.messages():
            msg = node_pb2.NodeMessage.FromString(message.payload)
            if msg.WhichOneof("body") == "evidence":
                self.answers.append(("evidence", ""))
            elif msg.event.ack.command_id:
                ack = msg.event.ack
                self.answers.append(("dup" if ack.duplicate else "ack", ack.command_id))
            else:
                self.answers.append((msg.event.id, ""))
            self.changed.set()


@asynccontextmanager
async def node_and_orchestrator(
    url: BrokerURL, prefix: str, state_dir: Path, late_s: float
) -> AsyncIterator[tuple[NodeAgent, FakeOrchestrator]]:
    config = AgentConfig(
        node_id=NODE,
        heartbeat_s=60,
        broker={"url": str(url), "topic_prefix": prefix},
        state_dir=state_dir,
        fault_injection={"answer_ack_delay_ms": late_s * 1e3},
    )
    async with NodeAgent(config) as agent, MqttSession(url, "fake-orchestrator") as session:
        orch = FakeOrchestrator(session, prefix)
        await session.subscribe(node_topic(NODE, TopicKind.EVENTS, prefix), qos=1)
        await session.subscribe(node_topic(NODE, TopicKind.EVIDENCE, prefix), qos=1)
        listener = asyncio.create_task(orch.listen())
        try:
            yield agent, orch
        finally:
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)


async def test_a_challenge_does_not_wait_for_earlier_acknowledgements(mosquitto, topic_prefix, tmp_path):
    """Run one at a time, each command waiting for its acknowledgement's PUBACK, the enrollment
    below would be answered only after three late PUBACKs (30 minutes): it is answered now."""
    async with node_and_orchestrator(mosquitto, topic_prefix, tmp_path, LATE_S) as (_, orch):
        for i in range(3):
            await orch.send(f"undeploy-{i}", undeploy=node_pb2.UndeployReplica(replica_id=f"ghost-{i}"))
        await orch.send("enroll", attest=node_pb2.Attest(message=b""))
        await orch.until(lambda: ("evidence", "") in orch.answers)
        await orch.until(lambda: all(orch.acked(cid) for cid in ("undeploy-0", "undeploy-1", "undeploy-2")))
        # The enrollment's own acknowledgement follows its evidence's PUBACK, which is late.
        assert orch.acked("enroll") == 0


async def test_replica_commands_keep_their_order(mosquitto, topic_prefix, tmp_path):
    """Deploys, undeploys and syncs of the same replicas, sent back to back while every answer's
    PUBACK is late: the node ends where the commands, in order, lead."""
    steps: list[tuple[str, dict]] = [
        ("deploy", {"deploy": _spec("r1", "a")}),
        ("undeploy", {"undeploy": node_pb2.UndeployReplica(replica_id="r1")}),
        ("deploy", {"deploy": _spec("r1", "b")}),
        ("deploy", {"deploy": _spec("r2", "a")}),
        ("sync", {"sync": node_pb2.SyncReplicas(replicas=[_spec("r2", "a"), _spec("r3", "a")])}),
        ("undeploy", {"undeploy": node_pb2.UndeployReplica(replica_id="r3")}),
        ("deploy", {"deploy": _spec("r1", "c")}),
        ("wipe", {"wipe": node_pb2.Wipe(reason="test.order", model_name="m", model_version="1.0.0")}),
        ("deploy", {"deploy": _spec("r4", "d")}),
    ]
    async with node_and_orchestrator(mosquitto, topic_prefix, tmp_path, LATE_S) as (agent, orch):
        for i, (kind, body) in enumerate(steps):
            await orch.send(f"{i}-{kind}", **body)
        # Everything before the wipe is acknowledged; the wipe's confirmation (agent.wipe.done) is
        # out, its PUBACK late; the deploy after it has run.
        await orch.until(lambda: all(orch.acked(f"{i}-{k}") for i, (k, _) in enumerate(steps) if k != "wipe"))
        assert ("agent.wipe.done", "") in orch.answers
        assert orch.acked("7-wipe") == 0
        assert {rid: s.spec.sha256[0] for rid, s in agent.runtime.replicas.items()} == {"r4": "d"}


async def test_a_command_redelivered_while_it_runs_is_executed_once(mosquitto, topic_prefix, tmp_path):
    """The copy arrives while the first run waits for its answer's PUBACK: one execution, two
    acknowledgements, the second marked duplicate and sent once the first run is done."""
    async with node_and_orchestrator(mosquitto, topic_prefix, tmp_path, 2.0) as (_, orch):
        for _ in range(2):
            await orch.send("enroll-twice", attest=node_pb2.Attest(message=b""))
        await orch.until(lambda: orch.acked("enroll-twice") == 2)
        assert [kind for kind, cid in orch.answers if cid == "enroll-twice"] == ["ack", "dup"]
        assert orch.answers.count(("evidence", "")) == 1
