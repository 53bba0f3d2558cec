"""Edge autonomy: with the orchestrator gone, nodes keep serving the models already released to
them until their attestation lease runs out; then they stop serving and say why (replicas Failed
with reason agent.attestation.expired, and an event). A returning orchestrator re-attests them and
they serve again, with nothing lost or doubled."""

from __future__ import annotations

import asyncio
import hashlib
import re
import time

import grpc
import numpy as np
import pytest
from fault_support import MODEL, PUBLISHER, catalog_config, deployment_manifest, enrollment_token

from edgeward.oip import grpc_predict_v2_pb2 as oip
from edgeward.oip import grpc_predict_v2_pb2_grpc as oip_grpc
from edgeward.v1 import api_pb2, api_pb2_grpc, node_pb2
from node_agent.agent import LEASE_EXPIRED, NodeAgent
from node_agent.config import AgentConfig
from orchestrator.catalog import sign_metadata
from orchestrator.config import OrchestratorConfig
from orchestrator.server import Orchestrator
from usecases.industrial.generator import make_dataset

pytestmark = [pytest.mark.faults, pytest.mark.broker, pytest.mark.timeout(90)]

LEASE_S = 4.0
RUNNING = node_pb2.REPLICA_PHASE_RUNNING


async def _until(check, within: float, what: str) -> float:
    """Wait until ``check()`` (a plain or an async function) is true; the seconds it took."""
    start = time.monotonic()
    while not (await value if asyncio.iscoroutine(value := check()) else value):
        if time.monotonic() - start > within:
            raise AssertionError(f"timed out after {within:g} s waiting for {what}")
        await asyncio.sleep(0.1)
    return time.monotonic() - start


async def _infer(agent: NodeAgent) -> int:
    """One real inference on the node's OIP endpoint; the gRPC status code's value (0 = OK)."""
    x, _ = make_dataset(1, seed=3)
    states = sorted(agent.runtime.replicas.values(), key=lambda s: s.phase != RUNNING)
    state = states[0]  # a running replica if there is one
    name = state.spec.model_name
    async with grpc.aio.insecure_channel(agent.inference_endpoint) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        request = oip.ModelInferRequest(
            model_name=name,
            inputs=[
                oip.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=list(x[:1].shape))
            ],
            raw_input_contents=[x[:1].astype(np.float32).tobytes()],
        )
        handle = state.handle
        if handle is not None:
            request.inputs[0].name = handle.inputs[0].name
        try:
            await stub.ModelInfer(request, timeout=10)
        except grpc.aio.AioRpcError as err:
            return err.code().value[0]
    return 0


async def test_nodes_serve_without_the_orchestrator_until_their_lease_expires(
    mosquitto, topic_prefix, tmp_path
):
    config = OrchestratorConfig(
        state_dir=tmp_path / "orch",
        grpc_bind="127.0.0.1:0",
        node_timeout_s=3.0,
        reconcile_interval_s=0.2,
        resend_interval_s=1.0,
        broker={"url": str(mosquitto), "topic_prefix": topic_prefix},
        attestation={"challenge_interval_s": 1.0, "verifier": {"result_ttl_s": LEASE_S + 2}},
        catalog=catalog_config(tmp_path / "publishers"),
    )
    agents = [
        NodeAgent(
            AgentConfig(
                node_id=f"auto-{i}",
                enrollment_token=enrollment_token(config.state_dir, f"auto-{i}"),
                heartbeat_s=0.5,
                attestation_lease_s=LEASE_S,
                broker={"url": str(mosquitto), "topic_prefix": topic_prefix},
                state_dir=tmp_path / "agents",
            )
        )
        for i in (1, 2)
    ]
    orch = Orchestrator(config)
    await orch.__aenter__()
    started = [orch]
    try:
        for agent in agents:
            await agent.__aenter__()
            started.append(agent)
        channel = grpc.aio.insecure_channel(orch.address)
        api = api_pb2_grpc.DeploymentServiceStub(channel)
        models = api_pb2_grpc.ModelServiceStub(channel)
        data = MODEL.read_bytes()
        meta = api_pb2.ModelMetadata(
            name="vib-cnn", version="1.0.0", size=len(data), sha256=hashlib.sha256(data).hexdigest()
        )
        sign_metadata(meta, PUBLISHER)

        async def parts():
            yield api_pb2.PushModelRequest(metadata=meta)
            yield api_pb2.PushModelRequest(chunk=data)

        async def running(n: int) -> bool:
            on_nodes = [s for a in agents for s in a.runtime.replicas.values() if s.phase == RUNNING]
            return len(on_nodes) == n and all(a.runtime.replicas for a in agents)

        await _until(lambda: all(orch.verifier.tier(a.node_id) != "none" for a in agents), 30, "attested")
        await models.Push(parts())
        await api.Apply(api_pb2.ApplyRequest(manifest=deployment_manifest("vib", 2)))
        await _until(lambda: running(2), 30, "2 replicas running, one per node")
        await channel.close()

        # The orchestrator goes away: the nodes keep serving what they hold...
        started.remove(orch)
        await orch.__aexit__(None, None, None)
        gone = time.monotonic()
        assert [await _infer(a) for a in agents] == [0, 0]
        # ...until the lease runs out; then they stop, and say why.
        await _until(lambda: not any(a.runtime.running("vib-cnn") for a in agents), LEASE_S + 5, "a stop")
        # The lease counts from the last challenge answered before the orchestrator left: no node
        # stopped before it ran out (how late after it depends on the machine's load: the wait above
        # bounds that).
        print(f"served {time.monotonic() - gone:.1f} s after the orchestrator left")
        for agent in agents:
            states = list(agent.runtime.replicas.values())
            assert [(s.phase, s.reason) for s in states] == [(node_pb2.REPLICA_PHASE_FAILED, LEASE_EXPIRED)]
            idle_s = float(re.match(r"no attestation for ([0-9.]+) s", states[0].message)[1])
            assert idle_s >= LEASE_S, states[0].message
            assert states[0].handle is None, "the model is unloaded, not just hidden"
            assert await _infer(agent) == grpc.StatusCode.NOT_FOUND.value[0]

        # The orchestrator comes back (same state): it re-attests the nodes and replaces the
        # stopped replicas; they serve again.
        orch = Orchestrator(config)
        await orch.__aenter__()
        started.insert(0, orch)

        async def converged() -> bool:
            dep = await orch.deployment_pb("vib")
            listed = list(dep.status.replica_list)
            held = {rid for a in agents for rid, s in a.runtime.replicas.items() if s.phase == RUNNING}
            return (
                await running(2)
                and len(listed) == 2
                and all(r.phase == RUNNING for r in listed)
                and {r.id for r in listed} == held
            )

        await _until(converged, 30, "serving again after re-attestation")
        async with asyncio.timeout(30):  # a few whole reconcile passes, however slow: nothing more is placed
            await orch.reconciler.wait_passes(3)
        assert await converged(), "nothing lost, nothing doubled"
        assert [await _infer(a) for a in agents] == [0, 0]
    finally:
        for item in reversed(started):
            await item.__aexit__(None, None, None)
