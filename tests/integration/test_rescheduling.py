"""Sustained SLO violation end to end: real broker, orchestrator, agents, LiteRT and inference traffic.

Three nodes of one hardware profile. ``n1`` is slowed by the agent's fault-injection knob
(``fault_injection.inference_delay_ms``: every served inference takes that much longer, profiles do
not), ``n2`` is noisy but within the SLO (``inference_jitter_ms``), ``n3`` is healthy. The
deployment's two replicas start on n1 and n2 (n3 cordoned until they run); with traffic flowing,
the replica on n1 must move to n3 and say why, while n2 keeps its replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest
from conftest import MODEL_INT8, Api, eventually, manifest, trust_publisher

from attestation.tokens import TokenStore
from edgeward.oip import grpc_predict_v2_pb2 as oip
from edgeward.oip import grpc_predict_v2_pb2_grpc as oip_grpc
from edgeward.v1 import api_pb2, node_pb2
from node_agent.agent import NodeAgent
from node_agent.config import AgentConfig
from orchestrator.config import BrokerConfig, OrchestratorConfig
from orchestrator.server import Orchestrator

pytestmark = [pytest.mark.broker, pytest.mark.slow]

SLO_MS = 40.0
SLOW_MS = 70.0  # n1: every served inference takes this much longer than the model itself
JITTER_MS = 12.0  # n2: up to this much longer, uniformly; its p95 stays under SLO x recover_ratio
BREACH_WINDOWS = 3
HEARTBEAT_S = 0.25


@pytest.fixture
async def three_nodes(mqtt_url, topic_prefix, tmp_path) -> AsyncIterator[tuple[Orchestrator, Api]]:
    config = OrchestratorConfig(
        state_dir=tmp_path / "orch",
        grpc_bind="127.0.0.1:0",
        node_timeout_s=3.0,
        reconcile_interval_s=0.2,
        resend_interval_s=1.0,
        broker=BrokerConfig(url=str(mqtt_url), topic_prefix=topic_prefix),
        catalog=trust_publisher(tmp_path / "publishers"),
        scheduler={
            "rescheduling": {"breach_windows": BREACH_WINDOWS, "cooldown_s": 60, "max_unavailable": 1}
        },
    )
    faults = {
        "n1": {"inference_delay_ms": SLOW_MS},
        "n2": {"inference_jitter_ms": JITTER_MS},
        "n3": {},
    }
    async with contextlib.AsyncExitStack() as stack:
        orch = await stack.enter_async_context(Orchestrator(config))
        for node_id, fault in faults.items():
            await stack.enter_async_context(
                NodeAgent(
                    AgentConfig(
                        node_id=node_id,
                        hardware_profile="test-board",
                        heartbeat_s=HEARTBEAT_S,
                        broker={"url": str(mqtt_url), "topic_prefix": topic_prefix},
                        state_dir=tmp_path / "agents",
                        fault_injection=fault,
                        enrollment_token=TokenStore.in_state_dir(orch.config.state_dir).mint(node_id).token,
                    )
                )
            )
        channel = await stack.enter_async_context(grpc.aio.insecure_channel(orch.address))
        api = Api(channel)

        async def attested() -> bool:
            nodes = await api.nodes_list()
            return (
                len(nodes) == 3
                and all(n.state == 1 for n in nodes)
                and all(orch.verifier.tier(n.id) != "none" for n in nodes)
            )

        await eventually(attested, what="3 nodes online and attested")
        yield orch, api


async def _traffic(api: Api, model: api_pb2.Model, stop: asyncio.Event) -> None:
    """Requests to every node that runs a replica, one at a time per node, until ``stop``."""
    spec = model.inputs[0]
    x = np.zeros([d if d > 0 else 1 for d in spec.shape], np.int8)
    request = oip.ModelInferRequest(
        model_name=model.name,
        model_version=model.version,
        inputs=[oip.ModelInferRequest.InferInputTensor(name=spec.name, datatype="INT8", shape=list(x.shape))],
        raw_input_contents=[x.tobytes()],
    )
    channels: dict[str, grpc.aio.Channel] = {}

    async def one(endpoint: str) -> None:
        if endpoint not in channels:
            channels[endpoint] = grpc.aio.insecure_channel(endpoint)
        with contextlib.suppress(grpc.aio.AioRpcError):  # a replica being moved answers UNAVAILABLE
            await oip_grpc.GRPCInferenceServiceStub(channels[endpoint]).ModelInfer(request, timeout=5)

    try:
        while not stop.is_set():
            dep = await api.deployment("vib")
            nodes = {r.node_id for r in dep.status.replica_list if r.phase == node_pb2.REPLICA_PHASE_RUNNING}
            endpoints = {n.id: n.inventory.inference_endpoint for n in await api.nodes_list()}
            for _ in range(10):
                await asyncio.gather(*(one(endpoints[n]) for n in sorted(nodes)))
    finally:
        for channel in channels.values():
            await channel.close()


async def test_sustained_slo_violation_moves_the_replica_and_noise_does_not(three_nodes):
    orch, api = three_nodes
    model = await api.push(MODEL_INT8)
    await api.nodes.Cordon(api_pb2.CordonRequest(node_id="n3", cordon=True))
    await api.apply(manifest(replicas=2, extra=f"  requirements: {{maxLatencyMs: {SLO_MS:g}}}\n"))

    async def running_on(nodes: set[str]) -> bool:
        dep = await api.deployment("vib")
        live = [r for r in dep.status.replica_list if r.phase == node_pb2.REPLICA_PHASE_RUNNING]
        return {r.node_id for r in live} == nodes and len(live) == len(nodes)

    await eventually(lambda: running_on({"n1", "n2"}), what="replicas running on n1 and n2")
    before = {r.node_id: r.id for r in (await api.deployment("vib")).status.replica_list}
    await api.nodes.Cordon(api_pb2.CordonRequest(node_id="n3", cordon=False))

    stop = asyncio.Event()
    traffic = asyncio.create_task(_traffic(api, model, stop))
    try:
        started = time.monotonic()
        await eventually(lambda: running_on({"n2", "n3"}), timeout=30, what="n1's replica running on n3")
        moved_after = time.monotonic() - started
        dep = await api.deployment("vib")
        by_node = {r.node_id: r for r in dep.status.replica_list if r.phase == node_pb2.REPLICA_PHASE_RUNNING}
        assert by_node["n2"].id == before["n2"], "the noisy node within its SLO keeps its replica"
        assert by_node["n3"].id != before["n1"]
        assert by_node["n3"].reason == "reschedule.slo_violation"
        assert by_node["n3"].message.startswith("moved from n1 (p95 ")
        assert f"over the {SLO_MS:g} ms SLO for" in by_node["n3"].message

        # The corrected predictions say why: n1 is seen as slow, n2 a little, n3 not at all.
        scales = orch.reconciler.latency_scales
        # (n1's delay alone is SLOW_MS; how much over the SLO its corrected prediction has come when
        # the move happens depends on this machine's pace, so the bounds are the SLO's, not tighter.)
        assert scales["n1"] > SLO_MS > scales["n2"] > 1.0
        # Keep the traffic flowing: nothing moves again (no flapping), nothing returns to n1.
        deadline = time.monotonic() + 4 * BREACH_WINDOWS * HEARTBEAT_S + 1.0
        while time.monotonic() < deadline:
            dep = await api.deployment("vib")
            live = {
                r.node_id: r.id for r in dep.status.replica_list if r.phase != node_pb2.REPLICA_PHASE_EVICTED
            }
            assert live == {"n2": before["n2"], "n3": by_node["n3"].id}
            await asyncio.sleep(0.2)
    finally:
        stop.set()
        await traffic
    print(f"moved {moved_after:.1f} s after the traffic started")
