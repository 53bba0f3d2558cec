"""An agent whose broker goes away keeps its telemetry in a bounded buffer (oldest dropped first,
drops counted) and replays it, in order, once the broker is back; then it says what it replayed
and dropped (event ``agent.telemetry.replayed``)."""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid

import pytest

from edgeward.mqtt.session import MqttSession
from edgeward.mqtt.topics import TopicKind, node_topic
from edgeward.v1 import node_pb2
from edgeward.wire import now_ms
from node_agent.agent import NodeAgent
from node_agent.config import AgentConfig

pytestmark = [pytest.mark.faults, pytest.mark.broker, pytest.mark.timeout(60)]

HEARTBEAT_S = 0.2
BUFFER = 5


async def _until(check, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within:g} s waiting for {what}")
        await asyncio.sleep(0.05)


async def test_telemetry_is_buffered_while_the_broker_is_away_and_replayed_oldest_dropped_first(
    mosquitto_factory, topic_prefix, tmp_path
):
    # Persistence keeps the observer's session (and the QoS 1 replay queued for it) across the
    # restart, so what it sees does not depend on which client reconnects first.
    broker = mosquitto_factory("persistence true\nautosave_interval 1\n")
    node_id = "buf-1"
    telemetry_topic = node_topic(node_id, TopicKind.TELEMETRY, topic_prefix)
    events_topic = node_topic(node_id, TopicKind.EVENTS, topic_prefix)
    samples: list[int] = []  # sent_unix_ms of every telemetry message seen, in arrival order
    events: list[node_pb2.Event] = []

    async def observe(session: MqttSession) -> None:
        async for message in session.messages():
            msg = node_pb2.NodeMessage.FromString(message.payload)
            if message.topic == telemetry_topic:
                samples.append(msg.sent_unix_ms)
            elif msg.event.id == "agent.telemetry.replayed":
                events.append(msg.event)

    config = AgentConfig(
        node_id=node_id,
        heartbeat_s=HEARTBEAT_S,
        telemetry_buffer=BUFFER,
        telemetry_replay_rate=200,
        broker={"url": str(broker.url), "topic_prefix": topic_prefix},
        state_dir=tmp_path / "agents",
    )
    observer = MqttSession(broker.url, f"observer-{uuid.uuid4().hex[:8]}", clean_start=False)
    await observer.connect()
    watch = asyncio.create_task(observe(observer))
    try:
        await observer.subscribe(telemetry_topic, qos=1)
        await observer.subscribe(events_topic, qos=1)
        async with NodeAgent(config) as agent:
            await _until(lambda: len(samples) >= 3, 10, "live telemetry")
            broker.stop()
            stopped_ms = now_ms()
            await _until(lambda: agent.telemetry_dropped >= 3, 15, "a full buffer dropping samples")
            assert agent.telemetry_buffered == BUFFER
            before_restart = len(samples)
            broker.start()  # same port
            await _until(lambda: agent.telemetry_buffered == 0 and events, 20, "the replay and its report")
            taken_during_outage = agent.telemetry_replayed + agent.telemetry_dropped
            await _until(lambda: len(samples) >= before_restart + BUFFER + 2, 10, "live telemetry again")

        report = events[0]
        assert report.severity == node_pb2.SEVERITY_WARNING
        assert int(report.attributes["dropped"]) == agent.telemetry_dropped
        assert int(report.attributes["replayed"]) == agent.telemetry_replayed
        assert agent.telemetry_replayed >= BUFFER
        assert taken_during_outage > BUFFER

        # What came after the outage began: the replayed samples, then live ones, in order.
        after = [t for t in samples[before_restart:] if t > stopped_ms]
        assert after == sorted(after), "replayed in the order the samples were taken"
        replayed = after[: agent.telemetry_replayed]
        assert len(replayed) == agent.telemetry_replayed
        # Oldest dropped first: the hole is between the last sample before the outage and the first
        # replayed one (the dropped samples were taken there); the replayed run has no such hole.
        last_before = max(t for t in samples[:before_restart] if t <= stopped_ms)
        hole_ms = replayed[0] - last_before
        gaps = [b - a for a, b in itertools.pairwise(replayed)]
        assert hole_ms >= agent.telemetry_dropped * HEARTBEAT_S * 1000 * 0.5, (hole_ms, gaps)
        assert max(gaps) < hole_ms, (hole_ms, gaps)
    finally:
        watch.cancel()
        await asyncio.gather(watch, return_exceptions=True)
        await observer.close()
