"""Telemetry end to end through a real broker: ingest, query, watch, Prometheus."""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np
import pytest
from conftest import eventually

from edgeward.mqtt.session import MqttSession
from edgeward.mqtt.topics import node_topic
from edgeward.v1 import api_pb2, api_pb2_grpc, node_pb2
from edgeward.wire import node_message
from orchestrator.config import BrokerConfig, OrchestratorConfig
from orchestrator.server import Orchestrator
from usecases.industrial.generator import make_dataset

pytestmark = [pytest.mark.broker]


async def test_node_telemetry_reaches_query_watch_and_metrics(fleet, mqtt_url, topic_prefix, tmp_path):
    orch, agents, api = await fleet(nodes=1)
    await api.push()
    await api.apply(
        "apiVersion: edgeward/v1\nkind: Deployment\nmetadata: {name: vib}\n"
        "spec: {model: {name: vib-cnn, version: 1.0.0}, replicas: 1}\n"
    )

    async def running() -> bool:
        return (await api.deployment("vib")).status.running == 1

    await eventually(running, what="replica running")
    agent = agents[0]
    resolved = agent.runtime.resolve("vib-cnn")
    assert resolved is not None
    backend, handle = resolved
    x, _ = make_dataset(2, seed=1)
    sent = 40
    client_ms = []
    for i in range(sent):
        started = time.perf_counter()
        await agent.runtime.infer(backend, handle, {handle.inputs[0].name: x[i % len(x)][None]})
        client_ms.append((time.perf_counter() - started) * 1000)

    channel = grpc.aio.insecure_channel(orch.address)
    stub = api_pb2_grpc.TelemetryServiceStub(channel)

    async def reported() -> bool:
        samples = (await stub.Query(api_pb2.QueryTelemetryRequest(node_id="n1"))).samples
        return bool(samples) and any(m.inferences == sent for m in samples[-1].models)

    await eventually(reported, what="inference counts in telemetry")
    samples = (await stub.Query(api_pb2.QueryTelemetryRequest(node_id="n1"))).samples
    energy = [s.energy_j for s in samples]
    assert energy == sorted(energy) and energy[-1] > 0, "energy counter is monotonic"
    assert all(s.energy_source == node_pb2.ENERGY_SOURCE_MODELLED for s in samples), "no RAPL here: modelled"
    stats = samples[-1].models[0]
    # the node measures the same calls the client timed, from inside them
    assert 0 < stats.latency_p50_ms <= float(np.percentile(client_ms, 50)) * 1.05
    assert stats.latency_p50_ms <= stats.latency_p95_ms <= stats.latency_p99_ms

    watch = stub.Watch(api_pb2.WatchTelemetryRequest(node_id="n1"))
    first = await asyncio.wait_for(watch.read(), 5)
    assert first.node_id == "n1"
    watch.cancel()
    await channel.close()


async def test_malformed_telemetry_is_dropped_and_counted(mqtt_url, topic_prefix, tmp_path):
    config = OrchestratorConfig(
        state_dir=tmp_path,
        grpc_bind="127.0.0.1:0",
        metrics_bind="127.0.0.1:0",
        broker=BrokerConfig(url=str(mqtt_url), topic_prefix=topic_prefix),
    )
    async with Orchestrator(config) as orch, MqttSession(mqtt_url, "sensor") as s:
        good = node_message("n9", telemetry=node_pb2.Telemetry(power_w=3.0, energy_j=10.0))
        bad = node_message("n9", telemetry=node_pb2.Telemetry(power_w=float("nan"), energy_j=-1.0))
        topic = node_topic("n9", "telemetry", topic_prefix)
        await s.publish(topic, good.SerializeToString(), qos=1)
        await s.publish(topic, bad.SerializeToString(), qos=1)
        await s.publish(topic, b"\xde\xad\xbe\xef", qos=1)

        async def settled() -> bool:
            orch.telemetry.flush()
            c = orch.drop_counts()
            garbage = c.get("wire.payload.unparseable", 0) + c.get("wire.payload.unknown_schema", 0)
            return (
                c.get("wire.telemetry.invalid_value") == 1 and garbage == 1 and orch.telemetry.ingested == 1
            )

        await eventually(settled, what="one sample kept, one refused, one unparseable")
        reader, writer = await asyncio.open_connection("127.0.0.1", orch.metrics_port)
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        body = (await reader.read()).decode()
        writer.close()
        await writer.wait_closed()
        assert "200 OK" in body
        assert 'edgeward_node_power_watts{node="n9",source="modelled"} 3.0' in body
        assert 'edgeward_mqtt_dropped_total{reason="wire.telemetry.invalid_value"} 1.0' in body
