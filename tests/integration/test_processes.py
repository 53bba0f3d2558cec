"""The real processes: `edgeward orchestrator` and `edgeward agent` started as subprocesses and
driven through the public gRPC API, against Mosquitto and against the embedded broker."""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest
import yaml
from conftest import PUBLISHER, trust_publisher
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from processes import Proc, listen_port, wait_passes
from processes import wait_for as wait_until

from attestation.tokens import TokenStore
from edgeward.oip import grpc_predict_v2_pb2 as oip
from edgeward.oip import grpc_predict_v2_pb2_grpc as oip_grpc
from edgeward.v1 import attestation_pb2, attestation_pb2_grpc, node_pb2
from orchestrator.client import ClientError, EdgewardClient
from usecases import model_path
from usecases.industrial.generator import make_dataset

pytestmark = [pytest.mark.slow, pytest.mark.broker]

RUNNING = node_pb2.REPLICA_PHASE_RUNNING
NODE_TIMEOUT_S = 4.0


#: Bound on every wait below: it only stops a hang (each wait returns as soon as its condition
#: holds, and fails at once if a process it needs has exited).
WAIT_S = 120.0


@pytest.fixture(params=["mosquitto", "embedded"])
def cluster(request, tmp_path, topic_prefix):
    """Writes configs; yields a helper that starts/stops the processes; stops all at the end."""
    procs: list[Proc] = []
    # Below the ephemeral range: a restarted orchestrator binds the same ports again.
    grpc_port, metrics_port = listen_port(), listen_port()
    broker: dict = {"topic_prefix": topic_prefix}
    if request.param == "mosquitto":
        broker["url"] = str(request.getfixturevalue("mosquitto"))
        agent_url = broker["url"]
    else:
        broker["embedded_port"] = listen_port()
        agent_url = f"mqtt://127.0.0.1:{broker['embedded_port']}"
    orch_cfg = tmp_path / "orchestrator.yaml"
    orch_settings = {
        "state_dir": str(tmp_path / "state"),
        "grpc_bind": f"127.0.0.1:{grpc_port}",
        "metrics_bind": f"127.0.0.1:{metrics_port}",
        "broker": broker,
        "node_timeout_s": NODE_TIMEOUT_S,
        "reconcile_interval_s": 0.3,
        "resend_interval_s": 1.0,
        "catalog": {
            "trusted_publishers": [
                str(p) for p in trust_publisher(tmp_path / "publishers")["trusted_publishers"]
            ]
        },
    }

    class Cluster:
        server = f"127.0.0.1:{grpc_port}"
        metrics = f"127.0.0.1:{metrics_port}"
        broker_kind = request.param

        @property
        def alive(self) -> list[Proc]:
            """The processes started and not stopped by the test: a wait fails at once if one exits."""
            return [p for p in procs if not p.stopped]

        def orchestrator(self, **overrides) -> Proc:
            """Starts the orchestrator and waits until it serves; ``overrides``: top-level config
            keys to change."""
            orch_cfg.write_text(yaml.safe_dump({**orch_settings, **overrides}))
            proc = Proc("orchestrator", ["orchestrator", "-c", str(orch_cfg)], tmp_path)
            procs.append(proc)
            return proc.wait_serving(self.server)

        def wait(self, check, what: str, timeout: float = WAIT_S):
            """Poll ``check`` until truthy (API errors: not yet); fail at once if a process exits."""
            return wait_until(
                check, timeout, what, procs=self.alive, retry=(ClientError, grpc.RpcError), interval=0.2
            )

        def agent(self, i: int) -> Proc:
            cfg = tmp_path / f"node-{i}.yaml"
            cfg.write_text(
                yaml.safe_dump(
                    {
                        "node_id": f"node-{i}",
                        "labels": {"zone": f"z{i % 2}"},
                        "heartbeat_s": 0.5,
                        "broker": {"url": agent_url, "topic_prefix": topic_prefix},
                        "state_dir": str(tmp_path / "agents"),
                        "enrollment_token": TokenStore.in_state_dir(tmp_path / "state")
                        .mint(f"node-{i}")
                        .token,
                    }
                )
            )
            proc = Proc(f"node-{i}", ["agent", "-c", str(cfg)], tmp_path)
            procs.append(proc)
            return proc

    yield Cluster()
    for proc in reversed(procs):
        proc.stop()


MANIFEST = """
apiVersion: edgeward/v1
kind: Deployment
metadata: {name: vib}
spec:
  model: {name: vib-cnn, version: 1.0.0}
  replicas: 3
  requirements: {accelerators: [cpu-litert], memory: 16Mi}
"""


def _attested(server: str) -> int:
    """How many nodes hold an affirming attestation result (placement waits for them)."""
    with grpc.insecure_channel(server) as channel:
        stub = attestation_pb2_grpc.AttestationServiceStub(channel)
        nodes = stub.List(attestation_pb2.ListAttestationsRequest(), timeout=10).nodes
    return sum(n.state == attestation_pb2.ATTESTATION_STATE_AFFIRMING for n in nodes)


def _running(client: EdgewardClient, n: int) -> bool:
    dep = client.get_deployment("vib")
    return (
        dep.status.running == n
        and sum(r.phase != node_pb2.REPLICA_PHASE_EVICTED for r in dep.status.replica_list) == n
    )


def _infer(endpoint: str, client: EdgewardClient) -> int:
    model = client.get_model("vib-cnn", "1.0.0")
    spec = model.inputs[0]
    x, _ = make_dataset(1, seed=5)
    q = np.clip(np.round(x[:1] / spec.scale) + spec.zero_point, -128, 127).astype(np.int8)
    with grpc.insecure_channel(endpoint) as channel:
        resp = oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            oip.ModelInferRequest(
                model_name="vib-cnn",
                inputs=[
                    oip.ModelInferRequest.InferInputTensor(
                        name=spec.name, datatype="INT8", shape=list(q.shape)
                    )
                ],
                raw_input_contents=[q.tobytes()],
            ),
            timeout=10,
        )
    return len(resp.raw_output_contents[0])


def test_processes_end_to_end(cluster):
    cluster.orchestrator()
    for i in range(1, 4):
        cluster.agent(i)
    with EdgewardClient(cluster.server) as client:
        cluster.wait(
            lambda: sum(n.state == node_pb2.NODE_STATE_ONLINE for n in client.list_nodes()) == 3,
            what="3 nodes",
        )
        cluster.wait(lambda: _attested(cluster.server) == 3, what="3 nodes attested")
        client.push_model(model_path("industrial", "int8"), "vib-cnn", "1.0.0", key=PUBLISHER)
        assert client.apply(MANIFEST).created
        cluster.wait(lambda: _running(client, 3), what="3 replicas running")
        endpoints = {n.id: n.inventory.inference_endpoint for n in client.list_nodes()}
        for rep in client.get_deployment("vib").status.replica_list:
            assert _infer(endpoints[rep.node_id], client) == 4  # four int8 class scores
        client.delete_deployment("vib")
        cluster.wait(
            lambda: all(not n.replicas for n in client.list_nodes()), what="replicas gone from nodes"
        )
        with pytest.raises(ClientError) as info:
            client.get_deployment("vib")
        assert info.value.code == "NOT_FOUND"


def test_kill9_orchestrator_restart_converges_without_double_placement(cluster):
    orch = cluster.orchestrator()
    agents = [cluster.agent(i) for i in range(1, 4)]
    with EdgewardClient(cluster.server) as client:
        cluster.wait(
            lambda: sum(n.state == node_pb2.NODE_STATE_ONLINE for n in client.list_nodes()) == 3,
            what="3 nodes",
        )
        cluster.wait(lambda: _attested(cluster.server) == 3, what="3 nodes attested")
        client.push_model(model_path("industrial", "int8"), "vib-cnn", "1.0.0", key=PUBLISHER)
        client.apply(MANIFEST)
        cluster.wait(lambda: _running(client, 3), what="3 replicas running")
        before = {(r.id, r.node_id) for r in client.get_deployment("vib").status.replica_list}
    orch.kill9()
    # The embedded broker went down with the orchestrator: the nodes have to reconnect to the new
    # one at their own backoff, up to 8 s after it is back. Held (SIGSTOP) until one node timeout
    # after the restart, they come back that late on purpose: their replicas must still count as
    # unknown, not lost (a grace of one node timeout alone evicted and placed them again).
    late = cluster.broker_kind == "embedded"
    if late:
        for agent in agents:
            agent.pause()
    cluster.orchestrator()
    if late:
        time.sleep(NODE_TIMEOUT_S + 1.0)  # the wall time under test: past one node timeout
        for agent in agents:
            agent.resume()
    with EdgewardClient(cluster.server) as client:
        cluster.wait(
            lambda: sum(n.state == node_pb2.NODE_STATE_ONLINE for n in client.list_nodes()) == 3,
            what="3 nodes heard from after the restart",
        )
        cluster.wait(lambda: _running(client, 3), what="3 replicas running after restart")
        wait_passes(cluster.metrics, 3, procs=cluster.alive)  # passes that saw the nodes' reports
        dep = client.get_deployment("vib")
        after = {(r.id, r.node_id) for r in dep.status.replica_list}
        assert after == before, "the same replicas on the same nodes: no double placement"
        per_node = {n.id: [r.id for r in n.replicas] for n in client.list_nodes()}
        assert sorted(len(v) for v in per_node.values()) == [1, 1, 1]


def test_reflection_lists_the_api(cluster):
    cluster.orchestrator()  # serving: every service is registered
    with grpc.insecure_channel(cluster.server) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
        )
        names = {s.name for r in responses for s in r.list_services_response.service}
    assert {
        "edgeward.v1.DeploymentService",
        "edgeward.v1.NodeService",
        "edgeward.v1.ModelService",
        "edgeward.v1.AttestationService",
        "grpc.health.v1.Health",
    } <= names


def test_killed_node_replicas_run_elsewhere_before_it_falls_silent(cluster):
    # Silence would take 5 minutes to count: the node can only be found gone, within the 2 minutes
    # waited for below, through its last will (which the broker publishes when the killed
    # process's connection drops) - on a machine of any speed.
    cluster.orchestrator(node_timeout_s=300.0)
    agents = {f"node-{i}": cluster.agent(i) for i in range(1, 4)}
    with EdgewardClient(cluster.server) as client:
        cluster.wait(
            lambda: sum(n.state == node_pb2.NODE_STATE_ONLINE for n in client.list_nodes()) == 3,
            what="3 nodes",
        )
        cluster.wait(lambda: _attested(cluster.server) == 3, what="3 nodes attested")
        client.push_model(model_path("industrial", "int8"), "vib-cnn", "1.0.0", key=PUBLISHER)
        client.apply(MANIFEST.replace("replicas: 3", "replicas: 2"))
        cluster.wait(lambda: _running(client, 2), what="2 replicas running")
        victim = client.get_deployment("vib").status.replica_list[0].node_id
        agents[victim].kill9()
        killed_at = time.monotonic()

        def moved() -> bool:
            dep = client.get_deployment("vib")
            live = [r for r in dep.status.replica_list if r.phase == RUNNING]
            return len(live) == 2 and victim not in {r.node_id for r in live}

        cluster.wait(moved, what="replicas rescheduled off the killed node")
        print(f"rescheduled {time.monotonic() - killed_at:.1f} s after the kill")
        node = client.get_node(victim)
        assert node.state == node_pb2.NODE_STATE_OFFLINE
