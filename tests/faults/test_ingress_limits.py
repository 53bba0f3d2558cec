"""Size and rate limits on every ingress: a per-node token bucket on MQTT ingest (excess dropped
and counted before decoding), the MQTT payload size, the gRPC message size."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from fault_support import catalog_config

from edgeward.mqtt.session import MqttSession
from edgeward.mqtt.topics import TopicKind, node_topic
from edgeward.v1 import api_pb2, api_pb2_grpc, node_pb2
from edgeward.wire import RATE_EXCEEDED, NodeRateLimiter, node_message
from orchestrator.config import OrchestratorConfig
from orchestrator.server import Orchestrator

pytestmark = [pytest.mark.faults]


def test_token_bucket_allows_the_burst_then_the_rate():
    limiter = NodeRateLimiter(rate=10, burst=5)
    assert [limiter.allow("a", 0.0) for _ in range(7)] == [True] * 5 + [False] * 2
    assert limiter.allow("b", 0.0), "buckets are per node"
    assert [limiter.allow("a", 0.1), limiter.allow("a", 0.1)] == [True, False]  # 0.1 s = one token
    allowed = sum(limiter.allow("a", 1.0 + i / 1000) for i in range(1000))  # 1 s at 1000 msg/s
    assert 10 <= allowed <= 10 + 5 + 1


def test_bucket_table_is_bounded_and_forgets_only_idle_nodes():
    limiter = NodeRateLimiter(rate=1, burst=2, max_nodes=3)
    for node in "abc":
        assert limiter.allow(node, 0.0)
    assert not limiter.allow("d", 0.0), "full of busy nodes: a new id is refused, not tracked"
    assert len(limiter) == 3
    assert limiter.allow("d", 10.0), "idle buckets (refilled) are pruned to make room"
    assert len(limiter) == 1


@pytest.mark.broker
async def test_a_flooding_node_is_throttled_and_counted_others_are_not(mosquitto, topic_prefix, tmp_path):
    config = OrchestratorConfig(
        state_dir=tmp_path / "orch",
        grpc_bind="127.0.0.1:0",
        broker={"url": str(mosquitto), "topic_prefix": topic_prefix, "node_rate": 5, "node_burst": 10},
        catalog=catalog_config(tmp_path / "publishers"),
        max_grpc_message=1024 * 1024,
    )
    flood, calm = 300, 4
    async with Orchestrator(config) as orch, MqttSession(mosquitto, "rogue") as rogue:
        sample = node_pb2.Telemetry(power_w=1.0, energy_j=1.0, interval_s=1.0)
        started = time.monotonic()
        for i in range(flood):
            await rogue.publish(
                node_topic("flooder", TopicKind.TELEMETRY, topic_prefix),
                node_message("flooder", telemetry=sample).SerializeToString(),
                qos=1 if i == flood - 1 else 0,
            )
        for _ in range(calm):
            await rogue.publish(
                node_topic("calm", TopicKind.TELEMETRY, topic_prefix),
                node_message("calm", telemetry=sample).SerializeToString(),
                qos=1,
            )
        elapsed = time.monotonic() - started
        deadline = time.monotonic() + 10
        while orch.telemetry.ingested + orch.drop_counts().get(RATE_EXCEEDED, 0) < flood + calm:
            assert time.monotonic() < deadline, (orch.telemetry.ingested, orch.drop_counts())
            await asyncio.sleep(0.05)
            orch.telemetry.flush()
        dropped = orch.drop_counts()[RATE_EXCEEDED]
        # At most the burst plus what the rate refilled while the flood lasted got through.
        assert flood - dropped <= 10 + 5 * (elapsed + 1)
        assert dropped >= flood - 10 - 5 * (elapsed + 1)
        assert orch.telemetry.ingested == flood - dropped + calm, "the calm node lost nothing"

        # gRPC: a message over max_grpc_message is refused before it reaches a handler.
        async with grpc.aio.insecure_channel(orch.address) as channel:
            stub = api_pb2_grpc.DeploymentServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Apply(api_pb2.ApplyRequest(manifest="x" * (2 * 1024 * 1024)))
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.mark.broker
async def test_oversize_mqtt_payloads_are_dropped_and_counted(mosquitto, topic_prefix, tmp_path):
    config = OrchestratorConfig(
        state_dir=tmp_path / "orch",
        grpc_bind="127.0.0.1:0",
        broker={"url": str(mosquitto), "topic_prefix": topic_prefix, "max_payload": 4096},
        catalog=catalog_config(tmp_path / "publishers"),
    )
    async with Orchestrator(config) as orch, MqttSession(mosquitto, "big") as client:
        big = node_message(
            "n1", telemetry=node_pb2.Telemetry(models=[node_pb2.ModelStats(model_name="m" * 8000)])
        )
        await client.publish(
            node_topic("n1", TopicKind.TELEMETRY, topic_prefix), big.SerializeToString(), qos=1
        )
        deadline = time.monotonic() + 10
        while orch.drop_counts().get("wire.payload.too_large", 0) < 1:
            assert time.monotonic() < deadline, orch.drop_counts()
            await asyncio.sleep(0.05)
        assert orch.telemetry.ingested == 0
