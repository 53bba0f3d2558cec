"""Notifications end to end: the same event reaches a gRPC Watch stream, an MQTT subscriber and the
``edgeward events`` CLI, through a real broker and a real orchestrator."""

from __future__ import annotations

import asyncio
import json
import sys

import grpc
import pytest
from conftest import manifest

from edgeward.mqtt.session import MqttSession
from edgeward.v1 import api_pb2, events_pb2, events_pb2_grpc

pytestmark = [pytest.mark.broker]


async def test_events_reach_watch_mqtt_and_cli(fleet, mqtt_url, topic_prefix):
    orch, agents, api = await fleet(nodes=1)
    async with (
        grpc.aio.insecure_channel(orch.address) as channel,
        MqttSession(mqtt_url, "event-observer") as mqtt,
    ):
        events = events_pb2_grpc.EventServiceStub(channel)
        await mqtt.subscribe(f"{topic_prefix}/events/#", qos=1)
        watch = events.Watch(
            events_pb2.WatchEventsRequest(filter=events_pb2.EventFilter(subject_prefix="deployment/"))
        )
        await api.push()
        await api.apply(manifest(replicas=1))
        async with asyncio.timeout(10):
            first = await watch.read()
        assert (first.kind, first.subject) == ("deployment.applied", "deployment/vib")
        assert first.attributes["model"] == "vib-cnn:1.0.0"

        await api.nodes.Cordon(api_pb2.CordonRequest(node_id="n1", cordon=True))
        kinds = []
        async with asyncio.timeout(10):
            async for message in mqtt.messages():
                event = events_pb2.Notification.FromString(message.payload)
                assert message.topic == f"{topic_prefix}/events/{event.kind}"
                kinds.append(event.kind)
                if event.kind == "node.cordoned":
                    break
        assert kinds[:2] == ["model.published", "deployment.applied"] and event.subject == "node/n1"
        watch.cancel()

        listed = await events.List(
            events_pb2.ListEventsRequest(filter=events_pb2.EventFilter(kind_prefix="node."))
        )
        assert [e.kind for e in listed.events] == ["node.cordoned"]

    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "edgeward",
        "events",
        "--server",
        orch.address,
        "--json",
        "--kind",
        "deployment.",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(30):
        stdout, stderr = await proc.communicate()
    assert proc.returncode == 0, stderr.decode()
    lines = [json.loads(line) for line in stdout.decode().splitlines()]
    assert [e["kind"] for e in lines] == ["deployment.applied"]
