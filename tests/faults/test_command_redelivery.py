"""QoS 1 redelivers: every kind of command sent twice under one command_id is executed once and
acknowledged twice (the second ack marked duplicate), its side effects seen once."""

from __future__ import annotations

import asyncio

import pytest

from edgeward.mqtt.session import MqttSession
from edgeward.mqtt.topics import TopicKind, node_topic
from edgeward.v1 import node_pb2
from node_agent.agent import NodeAgent
from node_agent.config import AgentConfig

pytestmark = [pytest.mark.faults, pytest.mark.broker, pytest.mark.timeout(600)]
WAIT_S = 120.0  # bounds a hang only: each wait ends when its acknowledgement or message is in

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

        async def send(cmd: node_pb2.Command, acks_after: int) -> None:
            """Publish ``cmd`` and wait for its ``acks_after``-th acknowledgement."""
            await orch.publish(node_topic(NODE, TopicKind.CMD, topic_prefix), cmd.SerializeToString(), qos=1)
            async with asyncio.timeout(WAIT_S):
                while len(acks.get(cmd.command_id, [])) < acks_after:
                    await asyncio.sleep(0.02)

        try:
            for kind, body in BODIES.items():
                cmd = node_pb2.Command(schema=1, command_id=f"once-{kind}", node_id=NODE, **body)
                first = None
                for attempt in range(2):
                    await send(cmd, attempt + 1)
                    if kind in ("deploy", "sync"):
                        state = agent.runtime.replicas.get("r1")
                        if attempt == 0:
                            first = state
                        else:
                            assert state is first, f"a redelivered {kind} started the replica again"
                assert acks[cmd.command_id] == [False, True], kind
            # One more attest and wipe, new commands on the same lanes as the redelivered ones: once
            # their answers are in, whatever a second execution of those would have sent is in too
            # (a lane runs its commands in order, and one client's messages arrive in order).
            for kind in ("attest", "wipe"):
                await send(
                    node_pb2.Command(schema=1, command_id=f"after-{kind}", node_id=NODE, **BODIES[kind]), 1
                )
            async with asyncio.timeout(WAIT_S):
                while evidence < 2 or wipes < 2:
                    await asyncio.sleep(0.02)
            assert evidence == 2, "attest answered once (and once for the command after it)"
            assert wipes == 2, "wiped once (and once for the command after it)"
        finally:
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)
