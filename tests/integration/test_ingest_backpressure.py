"""The orchestrator's ingest under a slow consumer: QoS 1 messages are held back at the broker and
all arrive; QoS 0 telemetry beyond the inbox is shed and counted in /metrics."""

from __future__ import annotations

import asyncio
import threading

import pytest
from conftest import eventually

from edgeward.mqtt.session import MqttSession
from edgeward.mqtt.topics import node_topic
from edgeward.v1 import node_pb2
from edgeward.wire import node_message
from orchestrator.config import BrokerConfig, OrchestratorConfig
from orchestrator.server import Orchestrator

pytestmark = pytest.mark.broker


@pytest.fixture
def mqtt_url(mosquitto):
    """Mosquitto: amqtt 0.12.1 gives a QoS 1 message up when its subscriber has not acknowledged it
    within a hard-coded 5 s (it cannot hold messages back for a slow consumer)."""
    return mosquitto


INBOX = 16
TELEMETRY = 100
EVENTS = 60


async def _metrics(port: int) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    body = (await reader.read()).decode()
    writer.close()
    await writer.wait_closed()
    return body


async def test_a_stalled_ingest_loses_no_qos1_message_and_counts_shed_telemetry(
    mqtt_url, topic_prefix, tmp_path
):
    config = OrchestratorConfig(
        state_dir=tmp_path,
        grpc_bind="127.0.0.1:0",
        metrics_bind="127.0.0.1:0",
        broker=BrokerConfig(url=str(mqtt_url), topic_prefix=topic_prefix, ingest_queue=INBOX),
    )
    async with Orchestrator(config) as orch, MqttSession(mqtt_url, "n1-publisher") as node:
        assert orch._mqtt is not None
        # The store's single thread is held: the batch holding the hello waits for it, so ingest
        # takes nothing more from its inbox until the gate opens (a consumer stalled on its store).
        gate = threading.Event()
        stalled = asyncio.ensure_future(orch.db(gate.wait, 60))
        try:
            hello = node_message("n1", hello=node_pb2.Hello(agent_version="test"))
            await node.publish(node_topic("n1", "hello", topic_prefix), hello.SerializeToString(), qos=1)
            await eventually(lambda: _true(orch._mqtt.stats.received >= 1), what="the hello taken")
            telemetry = node_message("n1", telemetry=node_pb2.Telemetry(power_w=3.0, energy_j=1.0))
            for _ in range(TELEMETRY):
                await node.publish(node_topic("n1", "telemetry", topic_prefix), telemetry.SerializeToString())

            async def full() -> bool:
                stats = orch._mqtt.stats
                return stats.received + stats.dropped_overflow >= 1 + TELEMETRY

            await eventually(full, what="the flood read")
            for i in range(EVENTS):
                event = node_pb2.Event(id="agent.test.qos1", message=str(i))
                await node.publish(
                    node_topic("n1", "events", topic_prefix),
                    node_message("n1", event=event).SerializeToString(),
                    qos=1,
                )
            await eventually(lambda: _true(orch._mqtt.stats.paused >= 1), what="ingest holding QoS 1 back")
            assert orch._mqtt.queued <= INBOX + 1
        finally:
            gate.set()
            await stalled

        def relayed() -> list[str]:
            return [e.message for e in orch.events.recent(limit=1000) if e.kind == "agent.test.qos1"]

        await eventually(lambda: _true(len(relayed()) == EVENTS), what="every QoS 1 event relayed")
        assert relayed() == [str(i) for i in range(EVENTS)], "in order, none lost"
        shed = orch._mqtt.stats.dropped_overflow
        orch.telemetry.flush()
        assert shed > 0 and orch.telemetry.ingested + shed == TELEMETRY
        body = await _metrics(orch.metrics_port)
        assert f'edgeward_mqtt_shed_total{{qos="0"}} {float(shed)}' in body
        assert "edgeward_mqtt_ingest_paused_total 0.0" not in body


async def _true(value: bool) -> bool:
    return value


async def test_ingest_never_waits_on_a_puback_while_it_holds_qos1_back(
    mqtt_url, topic_prefix, tmp_path, caplog
):
    """A hello's challenge is published while the inbox is full and the session has stopped
    reading its socket: ingest goes on taking the inbox (the challenge waits for its PUBACK on its
    own), so reading resumes and the PUBACK arrives; it never times out."""
    config = OrchestratorConfig(
        state_dir=tmp_path,
        grpc_bind="127.0.0.1:0",
        broker=BrokerConfig(url=str(mqtt_url), topic_prefix=topic_prefix, ingest_queue=INBOX),
    )
    async with Orchestrator(config) as orch, MqttSession(mqtt_url, "n1-agent") as node:
        assert orch._mqtt is not None
        await node.subscribe(node_topic("n1", "cmd", topic_prefix), qos=1)
        gate = threading.Event()
        stalled = asyncio.ensure_future(orch.db(gate.wait, 60))  # the hello's batch waits for the store
        try:
            hello = node_message("n1", hello=node_pb2.Hello(agent_version="test"))
            await node.publish(node_topic("n1", "hello", topic_prefix), hello.SerializeToString(), qos=1)
            await eventually(lambda: _true(orch._mqtt.stats.received >= 1), what="the hello taken")
            for i in range(EVENTS):
                event = node_pb2.Event(id="agent.test.qos1", message=str(i))
                payload = node_message("n1", event=event).SerializeToString()
                await node.publish(node_topic("n1", "events", topic_prefix), payload, qos=1)
            await eventually(lambda: _true(orch._mqtt.stats.paused >= 1), what="ingest holding QoS 1 back")
            published = orch._mqtt.stats.published
        finally:
            gate.set()
            await stalled

        def relayed() -> int:
            return sum(e.kind == "agent.test.qos1" for e in orch.events.recent(limit=1000))

        await eventually(lambda: _true(relayed() == EVENTS), what="every QoS 1 event relayed")
        # The challenge was acknowledged by the broker (counted once its PUBACK is read).
        await eventually(lambda: _true(orch._mqtt.stats.published > published), what="the challenge's PUBACK")
        command = await asyncio.wait_for(anext(node.messages()), 30)
        assert command.topic == node_topic("n1", "cmd", topic_prefix)
    assert "cannot send" not in caplog.text
