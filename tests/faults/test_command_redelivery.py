"""QoS 1 redelivers: every kind of command sent twice under one command_id is executed once and
acknowledged twice (the second ack marked duplicate), its side effects seen once."""

from __future__ import annotations

import asyncio
import time

import pytest

from edgeward.mqtt.session import MqttSession
from edgeward.mqtt.topics import TopicKind, node_topic
from edgeward.v1 import node_pb2
from node_agent.agent import NodeAgent
from node_agent.config import AgentConfig

pytestmark = [pytest.mark.faults, pytest.mark.broker, pytest.mark.timeout(60)]

NODE = "redeliver-1"
SPEC = node_pb2.DeployReplica(
    replica_id="r1",
    deployment="d",
    model_name="m",
    model_version="1.0.0",
    sha256="0" * 64,
    size=10,
    accelerator="cpu-litert",
    artifact_endpoint="127.0.0.1:9",  # nothing listens: the load fails, which is a side effect too
)
BODIES = {
    "deploy": {"deploy": SPEC},
    "undeploy": {"undeploy": node_pb2.UndeployReplica(replica_id="ghost")},
    "sync": {"sync": node_pb2.SyncReplicas(replicas=[SPEC])},
    "attest": {"attest": node_pb2.Attest(message=b"")},  # please enroll: one evidence message
    "wipe": {"wipe": node_pb2.Wipe(reason="test.redelivery")},  # one agent.wipe.done event
}
for kind in ("pipelines", "mitigate"):  # newer kinds, where this release has them
    if kind in node_pb2.Command.DESCRIPTOR.fields_by_name:
        field = node_pb2.Command.DESCRIPTOR.fields_by_name[kind]
        BODIES[kind] = {kind: getattr(node_pb2, field.message_type.name)()}


async def test_every_command_kind_redelivered_is_executed_once(mosquitto, topic_prefix, tmp_path):
    config = AgentConfig(
        node_id=NODE,
        heartbeat_s=0.5,
        broker={"url": str(mosquitto), "topic_prefix": topic_prefix},
        state_dir=tmp_path / "agents",
    )
    acks: dict[str, list[bool]] = {}
    evidence = 0
    wipes = 0
    async with NodeAgent(config) as agent, MqttSession(mosquitto, "fake-orchestrator") as orch:
        await orch.subscribe(node_topic(NODE, TopicKind.EVENTS, topic_prefix), qos=1)
        await orch.subscribe(node_topic(NODE, TopicKind.EVIDENCE, topic_prefix), qos=1)

        async def listen() -> None:
            nonlocal evidence, wipes
            async for message in orch.messages():
                msg = node_pb2.NodeMessage.FromString(message.payload)
                if msg.WhichOneof("body") == "evidence":
                    evidence += 1
                elif msg.event.id == "agent.wipe.done":
                    wipes += 1
                elif msg.event.ack.command_id:
                    acks.setdefault(msg.event.ack.command_id, []).append(msg.event.ack.duplicate)

        listener = asyncio.create_task(listen())
        try:
            for kind, body in BODIES.items():
                cmd = node_pb2.Command(schema=1, command_id=f"once-{kind}", node_id=NODE, **body)
                first = None
                for attempt in range(2):
                    await orch.publish(
                        node_topic(NODE, TopicKind.CMD, topic_prefix), cmd.SerializeToString(), qos=1
                    )
                    deadline = time.monotonic() + 10
                    while len(acks.get(cmd.command_id, [])) < attempt + 1:
                        assert time.monotonic() < deadline, f"no ack for {kind} #{attempt + 1}"
                        await asyncio.sleep(0.02)
                    if kind in ("deploy", "sync"):
                        state = agent.runtime.replicas.get("r1")
                        if attempt == 0:
                            first = state
                        else:
                            assert state is first, f"a redelivered {kind} started the replica again"
                assert acks[cmd.command_id] == [False, True], kind
            await asyncio.sleep(0.5)  # anything a second execution would have sent has arrived
            assert evidence == 1, "attest answered once"
            assert wipes == 1, "wiped once"
        finally:
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)
