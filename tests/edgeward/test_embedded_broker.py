"""The embedded amqtt broker: loopback binding, parity with Mosquitto where amqtt 0.12.1 needed
workarounds, payload limit, restart, and a shutdown that leaves nothing running."""

from __future__ import annotations

import asyncio
import logging
import socket
import uuid
from collections.abc import Callable

import psutil
import pytest

from edgeward.mqtt import BrokerURL, Message, MqttError, MqttSession, TopicKind, Will, node_topic
from edgeward.mqtt.broker import EmbeddedBroker

pytestmark = pytest.mark.broker

LOOPBACK = "127.0.0.1"


def client_id(role: str) -> str:
    return f"{role}-{uuid.uuid4().hex[:8]}"


async def receive(session: MqttSession, within: float = 5.0) -> Message:
    return await asyncio.wait_for(anext(session.messages()), within)


async def nothing_received(session: MqttSession, within: float = 0.5) -> bool:
    try:
        await asyncio.wait_for(anext(session.messages()), within)
    except TimeoutError:
        return True
    return False


async def wait_until(condition: Callable[[], bool], within: float = 10.0) -> None:
    async with asyncio.timeout(within):
        while not condition():
            await asyncio.sleep(0.05)


def listening_address(port: int) -> str | None:
    for conn in psutil.Process().net_connections("tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port:
            return str(conn.laddr.ip)
    return None


async def test_binds_free_loopback_ports_and_releases_them() -> None:
    async with EmbeddedBroker() as first, EmbeddedBroker() as second:
        assert first.port != second.port
        assert first.url == BrokerURL(host=LOOPBACK, port=first.port)
        assert listening_address(first.port) == LOOPBACK
        port = first.port
    assert listening_address(port) is None
    with pytest.raises(MqttError, match="not running"):
        _ = first.url
    with pytest.raises(ConnectionRefusedError), socket.create_connection((LOOPBACK, port), timeout=1):
        pass


async def test_a_taken_port_raises_a_typed_error(embedded_broker: EmbeddedBroker) -> None:
    with pytest.raises(MqttError, match="cannot listen"):
        async with EmbeddedBroker(port=embedded_broker.port):
            pass


async def test_quiets_amqtt_logging(embedded_broker: EmbeddedBroker) -> None:
    assert logging.getLogger("amqtt").getEffectiveLevel() >= logging.WARNING
    assert logging.getLogger("transitions").getEffectiveLevel() >= logging.WARNING


async def test_retained_messages_go_only_to_matching_subscribers(
    mqtt_url: BrokerURL, topic_prefix: str
) -> None:
    # amqtt 0.12.1 pushes retained messages to every new client whose broker has *any* matching
    # subscription; the embedded broker must behave like Mosquitto here.
    hello = node_topic("n1", TopicKind.HELLO, topic_prefix)
    async with MqttSession(mqtt_url, client_id("orch")) as orchestrator:
        await orchestrator.publish(hello, b"inventory", qos=1, retain=True)
        await orchestrator.subscribe(f"{topic_prefix}/nodes/+/hello")
        assert (await receive(orchestrator)).retain
        async with MqttSession(mqtt_url, client_id("bystander")) as bystander:
            await bystander.subscribe(f"{topic_prefix}/unrelated")
            assert await nothing_received(bystander)
        await orchestrator.publish(hello, b"", qos=1, retain=True)


async def test_persistent_sessions_keep_queued_messages(
    mqtt_url: BrokerURL, topic_prefix: str, request: pytest.FixtureRequest
) -> None:
    cmd = node_topic("n1", TopicKind.CMD, topic_prefix)
    node_id, orch_id = client_id("node"), client_id("orch")
    async with MqttSession(mqtt_url, node_id, clean_start=False) as node:
        await node.subscribe(cmd, qos=1)
    async with MqttSession(mqtt_url, orch_id) as orchestrator:
        await orchestrator.publish(cmd, b"load model", qos=1)
    if request.node.callspec.params["mqtt_url"] == "embedded":
        # amqtt sweeps disconnected sessions once a second: once the orchestrator's clean session is
        # gone, a sweep ran after both disconnected, and the node's persistent one must have stayed.
        broker: EmbeddedBroker = request.getfixturevalue("embedded_broker")
        async with asyncio.timeout(60):  # bounds a hang only
            while orch_id in broker.session_ids:
                await asyncio.sleep(0.05)
        assert node_id in broker.session_ids
    async with MqttSession(mqtt_url, node_id, clean_start=False) as node:
        message = await receive(node)
        assert (message.payload, message.qos, message.retain) == (b"load model", 1, False)
    async with MqttSession(mqtt_url, node_id, clean_start=True):
        pass  # a clean start discards the broker's copy of the session


async def test_max_payload_is_enforced_by_the_broker(topic_prefix: str) -> None:
    topic = node_topic("n1", TopicKind.TELEMETRY, topic_prefix)
    async with (
        EmbeddedBroker(max_payload=1024) as broker,
        MqttSession(broker.url, client_id("sub")) as sub,
        MqttSession(broker.url, client_id("pub")) as pub,
    ):
        await sub.subscribe(topic)
        await pub.publish(topic, b"x" * 4096, qos=1)  # acknowledged, then dropped
        await pub.publish(topic, b"small", qos=1)
        assert (await receive(sub)).payload == b"small"
        assert broker.dropped_oversize == 1
        assert sub.stats.dropped_oversize == 0
        assert pub.connected


async def test_sessions_come_back_after_a_broker_restart(topic_prefix: str) -> None:
    cmd = node_topic("n1", TopicKind.CMD, topic_prefix)
    broker = EmbeddedBroker()
    await broker.start()
    port = broker.port
    try:
        async with MqttSession(broker.url, client_id("node")) as node:
            await node.subscribe(cmd)
            await broker.stop()
            await wait_until(lambda: not node.connected)
            broker = EmbeddedBroker(port=port)
            await broker.start()
            await wait_until(lambda: node.stats.reconnects == 1, within=15)
            async with MqttSession(broker.url, client_id("orch")) as orchestrator:
                for _ in range(50):
                    await orchestrator.publish(cmd, b"hello again", qos=1)
                    if not await nothing_received(node, within=0.1):
                        break
                else:
                    pytest.fail("no message after the broker restart")
    finally:
        await broker.stop()


async def test_stopping_with_connected_clients_leaves_no_tasks(topic_prefix: str) -> None:
    status = node_topic("n1", TopicKind.STATUS, topic_prefix)
    before = asyncio.all_tasks()
    broker = EmbeddedBroker()
    await broker.start()
    async with (
        MqttSession(broker.url, client_id("node"), will=Will(status, b"offline")) as node,
        MqttSession(broker.url, client_id("orch")) as orchestrator,
    ):
        await orchestrator.subscribe(status)
        await node.publish(status, b"online", qos=1, retain=True)
        await receive(orchestrator)
        await broker.stop()
        await wait_until(lambda: not node.connected and not orchestrator.connected)
    await asyncio.sleep(0)
    assert [t for t in asyncio.all_tasks() if t not in before and not t.done()] == []
