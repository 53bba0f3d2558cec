"""A node with valid credentials sends what no agent sends: the orchestrator's ingest goes on.

A real Mosquitto, the hostile node a plain MQTT client publishing on its own topics, the
orchestrator in this event loop. After each hostile message an honest status of the same node must
still be applied: before the fixes, one event whose attributes were named ``kind`` or ``subject``
ended the ingest task for good (every node then fell silent, the fleet was lost).
"""

from __future__ import annotations

import paho.mqtt.client as paho
import pytest
from conftest import eventually
from paho.mqtt.enums import CallbackAPIVersion

from edgeward.mqtt.topics import node_topic
from edgeward.v1 import node_pb2
from orchestrator.config import BrokerConfig, OrchestratorConfig
from orchestrator.server import Orchestrator

pytestmark = [pytest.mark.broker]

EPOCH = 1_700_000_000_000
ONLINE = node_pb2.NODE_STATE_ONLINE


def _message(node: str, sent_ms: int, **body) -> bytes:
    return node_pb2.NodeMessage(schema=1, node_id=node, sent_unix_ms=sent_ms, **body).SerializeToString()


class Node:
    """A node that publishes whatever it is told to, in order (QoS 1)."""

    def __init__(self, node_id: str, broker, prefix: str) -> None:
        self.id, self.prefix, self.sent = node_id, prefix, EPOCH
        self.client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=node_id)
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()

    def send(self, kind: str, retain: bool = False, **body) -> None:
        self.sent += 1
        topic = node_topic(self.id, kind, self.prefix)
        self.client.publish(topic, _message(self.id, self.sent, **body), 1, retain).wait_for_publish(10)

    def status(self, seq: int) -> None:
        self.send("status", status=node_pb2.Status(state=ONLINE, epoch=EPOCH, status_seq=seq))

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
async def orchestrator(mosquitto, topic_prefix, tmp_path):
    config = OrchestratorConfig(
        state_dir=tmp_path / "orch",
        grpc_bind="127.0.0.1:0",
        broker=BrokerConfig(url=str(mosquitto), topic_prefix=topic_prefix),
    )
    async with Orchestrator(config) as orch:
        yield orch


async def _applied(orch: Orchestrator, node_id: str, seq: int) -> None:
    async def seen() -> bool:
        view = orch.fleet.nodes.get(node_id)
        return view is not None and view.status_seq >= seq

    await eventually(seen, what=f"{node_id}'s status {seq} applied")


async def test_an_event_with_attributes_named_like_the_buses_parameters_is_relayed(
    orchestrator, mosquitto, topic_prefix
):
    node = Node("n1", mosquitto, topic_prefix)
    try:
        node.send("hello", retain=True, hello=node_pb2.Hello(agent_version="sim", boot_unix_ms=EPOCH))
        node.status(1)
        await _applied(orchestrator, "n1", 1)
        attributes = {"kind": "x", "subject": "y", "message": "z", "severity": "3", "self": "s"}
        event = node_pb2.Event(id="agent.model.load_failed", message="m", attributes=attributes)
        node.send("events", event=event)
        node.status(2)
        await _applied(orchestrator, "n1", 2)
        relayed = [e for e in orchestrator.events.recent() if e.kind == "agent.model.load_failed"]
        assert [(e.subject, dict(e.attributes)) for e in relayed] == [("node/n1", attributes)]
    finally:
        node.close()


async def test_a_message_whose_handling_fails_is_dropped_alone_and_counted(
    orchestrator, mosquitto, topic_prefix, monkeypatch
):
    """Whatever still slips through validation and breaks a handler costs that message only."""
    add = orchestrator.telemetry.add

    def add_or_fail(node_id: str, sent: int, telemetry: node_pb2.Telemetry) -> bool:
        if node_id == "bad":
            raise RuntimeError("a handler's bug, met by one node's payload")
        return add(node_id, sent, telemetry)

    monkeypatch.setattr(orchestrator.telemetry, "add", add_or_fail)
    bad, good = Node("bad", mosquitto, topic_prefix), Node("good", mosquitto, topic_prefix)
    try:
        for node in (bad, good):
            node.send("hello", retain=True, hello=node_pb2.Hello(agent_version="sim", boot_unix_ms=EPOCH))
            node.status(1)
        await _applied(orchestrator, "good", 1)
        bad.send("telemetry", telemetry=node_pb2.Telemetry(power_w=1.0))
        bad.status(2)
        good.status(2)
        await _applied(orchestrator, "bad", 2)
        await _applied(orchestrator, "good", 2)
        assert orchestrator.drop_counts().get("wire.ingest.failed") == 1
    finally:
        bad.close()
        good.close()
