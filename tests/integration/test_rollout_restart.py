"""kill -9 of a real orchestrator process in the middle of a canary rollout: after the restart the
rollout resumes at its recorded step with the same replicas (none lost, none doubled) and completes."""

from __future__ import annotations

import contextlib
import signal
import threading

import grpc
import numpy as np
import pytest
import yaml
from conftest import MODEL_INT8, PUBLISHER, manifest, trust_publisher
from processes import Proc, listen_port, wait_passes
from processes import wait_for as wait_until
from test_rollout import INPUT, INPUT_SCALE, INPUT_ZERO_POINT, rebuilt, strategy

from attestation.tokens import TokenStore
from edgeward.oip import grpc_predict_v2_pb2 as oip
from edgeward.oip import grpc_predict_v2_pb2_grpc as oip_grpc
from edgeward.v1 import api_pb2, api_pb2_grpc, attestation_pb2, attestation_pb2_grpc, node_pb2
from orchestrator.client import ClientError, EdgewardClient
from usecases.industrial.generator import make_dataset

pytestmark = [pytest.mark.slow, pytest.mark.broker]

RUNNING = node_pb2.REPLICA_PHASE_RUNNING
LIVE = (
    node_pb2.REPLICA_PHASE_PENDING,
    node_pb2.REPLICA_PHASE_DISPATCHED,
    node_pb2.REPLICA_PHASE_LOADING,
    RUNNING,
)


#: Bound on every wait: it only stops a hang (each wait returns as soon as its condition holds).
WAIT_S = 120.0


def wait_for(check, timeout: float = WAIT_S, what: str = "condition", procs=()):
    return wait_until(check, timeout, what, procs=procs, retry=(ClientError, grpc.RpcError))


def status(server: str) -> api_pb2.RolloutStatus:
    with grpc.insecure_channel(server) as channel:
        return api_pb2_grpc.RolloutServiceStub(channel).Status(
            api_pb2.RolloutRequest(deployment="vib"), timeout=5
        )


def attested(server: str) -> int:
    with grpc.insecure_channel(server) as channel:
        stub = attestation_pb2_grpc.AttestationServiceStub(channel)
        nodes = stub.List(attestation_pb2.ListAttestationsRequest(), timeout=5).nodes
    return sum(n.state == attestation_pb2.ATTESTATION_STATE_AFFIRMING for n in nodes)


def live(client: EdgewardClient) -> set[tuple[str, str, str]]:
    dep = client.get_deployment("vib")
    return {(r.id, r.node_id, r.model_version) for r in dep.status.replica_list if r.phase in LIVE}


def all_running(client: EdgewardClient, version: str, n: int = 4) -> bool:
    dep = client.get_deployment("vib")
    reps = [r for r in dep.status.replica_list if r.phase in LIVE]
    return len(reps) == n and all(r.phase == RUNNING and r.model_version == version for r in reps)


def traffic(endpoints: list[str], stop: threading.Event) -> None:
    x, _ = make_dataset(2, seed=3)
    q = np.clip(np.round(x / INPUT_SCALE) + INPUT_ZERO_POINT, -128, 127).astype(np.int8)
    channels = [grpc.insecure_channel(e) for e in endpoints]
    stubs = [oip_grpc.GRPCInferenceServiceStub(c) for c in channels]
    i = 0
    while not stop.is_set():
        row = q[i % len(q)][None]
        request = oip.ModelInferRequest(
            model_name="vib-cnn",
            inputs=[
                oip.ModelInferRequest.InferInputTensor(name=INPUT.name, datatype="INT8", shape=row.shape)
            ],
            raw_input_contents=[row.tobytes()],
        )
        for stub in stubs:
            with contextlib.suppress(grpc.RpcError):  # between steps a node may not serve it
                stub.ModelInfer(request, timeout=5)
        i += 1
        stop.wait(0.02)
    for channel in channels:
        channel.close()


def test_kill9_mid_rollout_resumes_at_the_recorded_step(tmp_path, mosquitto, topic_prefix):
    grpc_port, metrics_port = listen_port(), listen_port()  # a restart binds them again
    publishers = trust_publisher(tmp_path / "publishers")
    config = tmp_path / "orchestrator.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "state_dir": str(tmp_path / "state"),
                "grpc_bind": f"127.0.0.1:{grpc_port}",
                "metrics_bind": f"127.0.0.1:{metrics_port}",
                "broker": {"url": str(mosquitto), "topic_prefix": topic_prefix},
                "node_timeout_s": 4.0,
                "reconcile_interval_s": 0.2,
                "resend_interval_s": 1.0,
                "catalog": {"trusted_publishers": [str(p) for p in publishers["trusted_publishers"]]},
            }
        )
    )
    server, metrics = f"127.0.0.1:{grpc_port}", f"127.0.0.1:{metrics_port}"
    procs = [Proc("orchestrator", ["orchestrator", "-c", str(config)], tmp_path)]
    try:
        procs[0].wait_serving(server)
        for i in (1, 2):
            node = tmp_path / f"node-{i}.yaml"
            node.write_text(
                yaml.safe_dump(
                    {
                        "node_id": f"node-{i}",
                        "enrollment_token": TokenStore.in_state_dir(tmp_path / "state")
                        .mint(f"node-{i}")
                        .token,
                        "heartbeat_s": 0.5,
                        "broker": {"url": str(mosquitto), "topic_prefix": topic_prefix},
                        "state_dir": str(tmp_path / "agents"),
                    }
                )
            )
            procs.append(Proc(f"node-{i}", ["agent", "-c", str(node)], tmp_path))
        rollout = strategy(steps="[25, 50, 100]", pause="3s", min_inferences=5)
        with EdgewardClient(server) as client:
            wait_for(lambda: attested(server) == 2, what="2 nodes attested", procs=procs)
            base = MODEL_INT8.read_bytes()
            client.push_model(base, "vib-cnn", "1.0.0", key=PUBLISHER)
            client.push_model(
                rebuilt(base, "vibration cnn, republished 1.1.0"), "vib-cnn", "1.1.0", key=PUBLISHER
            )
            client.apply(manifest(replicas=4, extra=rollout))
            wait_for(lambda: all_running(client, "1.0.0"), what="4 replicas of 1.0.0")
            endpoints = [n.inventory.inference_endpoint for n in client.list_nodes()]
        stop = threading.Event()
        driver = threading.Thread(target=traffic, args=(endpoints, stop), daemon=True)
        driver.start()
        try:
            with EdgewardClient(server) as client:
                client.apply(manifest(replicas=4, version="1.1.0", extra=rollout))

                def at_step_2() -> bool:
                    s = status(server)
                    versions = [v for _, _, v in live(client)]
                    return (
                        s.step == 2
                        and s.observing_since_unix_ms > 0
                        and sorted(versions) == ["1.0.0", "1.0.0", "1.1.0", "1.1.0"]
                    )

                wait_for(at_step_2, what="step 2 of 3 observed")
                before = live(client)
                recorded = status(server)
            procs[0].popen.send_signal(signal.SIGKILL)
            procs[0].popen.wait()
            procs.append(Proc("orchestrator-2", ["orchestrator", "-c", str(config)], tmp_path))
            procs[-1].wait_serving(server)
            with EdgewardClient(server) as client:
                resumed = status(server)
                assert resumed.step == 2, "resumes at the recorded step"
                assert (resumed.from_generation, resumed.to_generation) == (
                    recorded.from_generation,
                    recorded.to_generation,
                )
                assert resumed.state == api_pb2.ROLLOUT_STATE_PROGRESSING
                assert live(client) == before, "the same replicas on the same nodes"
                wait_passes(metrics, 3, procs=procs[-1:])
                now = live(client)
                if status(server).step == 2:  # still at step 2 (read after now): nothing lost or doubled
                    assert now == before
                else:  # a loaded machine took the step's pause to get here: step 2's new replicas stay
                    assert {r for r in before if r[2] == "1.1.0"} <= now
                wait_for(
                    lambda: status(server).state == api_pb2.ROLLOUT_STATE_COMPLETED,
                    what="rollout completed after the restart",
                )
                wait_for(lambda: all_running(client, "1.1.0"), what="4 replicas of 1.1.0")
                final = live(client)
                kept = {r for r in before if r[2] == "1.1.0"}
                assert kept <= final, "the new replicas of step 2 were kept, not replaced"
                done = status(server)
                assert [h.verdict for h in done.history] == ["passed", "passed", "passed"]
                per_node = {}
                for _, node_id, _ in final:
                    per_node[node_id] = per_node.get(node_id, 0) + 1
                assert sum(per_node.values()) == 4
        finally:
            stop.set()
            driver.join(10)
    finally:
        for proc in reversed(procs):
            proc.stop()
