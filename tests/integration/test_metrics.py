"""The orchestrator's /metrics against ``promtool check metrics`` (Prometheus' own linter), with a
real fleet serving inferences: latency histograms in seconds, model name and version as labels,
and no series left behind by a node that went away.

promtool comes from Debian's prometheus package, unpacked into .cache/prometheus by ``make
test-deps`` (or from PATH); without it the test is skipped and says why.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import eventually, manifest

from edgeward.mqtt.session import MqttSession
from edgeward.mqtt.topics import node_topic
from edgeward.oip import grpc_predict_v2_pb2 as oip
from edgeward.oip import grpc_predict_v2_pb2_grpc as oip_grpc
from edgeward.v1 import node_pb2
from edgeward.wire import LATENCY_BUCKETS_S, node_message

pytestmark = [pytest.mark.broker]

UNPACKED = Path(__file__).resolve().parents[2] / ".cache" / "prometheus" / "usr" / "bin" / "promtool"


def promtool() -> str:
    found = shutil.which("promtool") or (str(UNPACKED) if UNPACKED.exists() else None)
    if found is None:
        pytest.skip("promtool not found: `make test-deps` unpacks it from Debian's prometheus package")
    return found


async def check(text: bytes) -> str:
    proc = await asyncio.create_subprocess_exec(
        promtool(),
        "check",
        "metrics",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(text), timeout=60)
    assert proc.returncode == 0, out.decode() + "\n---\n" + text.decode()
    return out.decode()


@pytest.mark.parametrize("mqtt_url", ["mosquitto"], indirect=True)
async def test_metrics_pass_promtool_and_forget_nodes_that_left(fleet, mqtt_url, topic_prefix):
    promtool()  # skip before starting anything
    orch, agents, api = await fleet(nodes=2)
    model = await api.push()
    await api.apply(manifest(replicas=2))

    async def running() -> bool:
        dep = await api.deployment("vib")
        return dep.status.running == 2

    await eventually(running, what="2 replicas running")
    spec = model.inputs[0]
    x = np.zeros([max(1, d) for d in spec.shape], np.int8)
    request = oip.ModelInferRequest(
        model_name="vib-cnn",
        inputs=[oip.ModelInferRequest.InferInputTensor(name=spec.name, datatype="INT8", shape=list(x.shape))],
        raw_input_contents=[x.tobytes()],
    )
    for agent in agents:
        async with grpc.aio.insecure_channel(agent.inference_endpoint) as channel:
            stub = oip_grpc.GRPCInferenceServiceStub(channel)
            for _ in range(20):
                await stub.ModelInfer(request, timeout=10)

    def counted() -> str:
        return orch.render_metrics().decode()

    async def histograms() -> bool:
        text = counted()
        return all(
            f'edgeward_model_inference_duration_seconds_count{{model="vib-cnn",node="{a.node_id}",version="1.0.0"}} 20.0'
            in text
            for a in agents
        )

    await eventually(histograms, what="both nodes' latency histograms with their 20 inferences")
    text = orch.render_metrics()
    await check(text)
    body = text.decode()
    assert "_ms" not in body, "base units only"
    assert f'le="{LATENCY_BUCKETS_S[0]!r}"' in body and 'le="+Inf"' in body
    assert 'edgeward_model_inferences_total{model="vib-cnn",node="n1",version="1.0.0"} 20.0' in body
    passes = next(line for line in body.splitlines() if line.startswith("edgeward_reconcile_passes_total "))
    assert float(passes.split()[1]) >= 1  # the replicas were placed by a pass
    assert "edgeward_event_loop_lag_seconds_count " in body  # the loop's own lag, checked by promtool too
    # The attestation window (its values depend on how fast the answers came: only its series here).
    assert "edgeward_attestation_window " in body
    assert 'edgeward_attestation_exchanges{state="in_flight"} ' in body
    assert 'edgeward_attestation_congestion_total{signal="lost"} ' in body

    # A node that reports and then leaves (its last will: OFFLINE): only its node_up stays, at 0.
    async with MqttSession(mqtt_url, "gone-1") as gone:
        hello = node_message("gone-1", hello=node_pb2.Hello(hardware_profile="x"))
        await gone.publish(node_topic("gone-1", "hello", topic_prefix), hello.SerializeToString(), qos=1)
        telemetry = node_message("gone-1", telemetry=node_pb2.Telemetry(power_w=2.0, energy_j=5.0))
        await gone.publish(
            node_topic("gone-1", "telemetry", topic_prefix), telemetry.SerializeToString(), qos=1
        )
        await eventually(
            lambda: _true('edgeward_node_power_watts{node="gone-1"' in counted()), what="gone-1's series"
        )
        offline = node_message("gone-1", status=node_pb2.Status(state=node_pb2.NODE_STATE_OFFLINE))
        await gone.publish(node_topic("gone-1", "status", topic_prefix), offline.SerializeToString(), qos=1)

    async def left() -> bool:
        lines = [line for line in counted().splitlines() if 'node="gone-1"' in line]
        return lines == ['edgeward_node_up{node="gone-1"} 0.0']

    await eventually(left, what="gone-1's series dropped but node_up 0")
    await check(orch.render_metrics())


async def _true(value: bool) -> bool:
    return value
