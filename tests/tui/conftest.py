"""Real fleets for the console's tests.

``console_fleet``: an orchestrator (with its embedded broker) and node agents in the test's own
event loop, for pilot tests (``App.run_test``) that act and then check the orchestrator.

``demo_fleet``: one orchestrator and three agents as child processes for the whole session,
with fixed node ids, three deployments (one that cannot be placed) and four model versions,
converged before any test sees it. Snapshot tests and the tmux test only read it, or undo what
they change, so its state is the same for every test.
"""

from __future__ import annotations

import hashlib
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from tui_support import eventually, manifest, push_parts, trusted_publishers, vibration_model

from attestation.tokens import TokenStore
from edgeward.v1 import api_pb2, api_pb2_grpc, node_pb2
from node_agent.agent import NodeAgent
from node_agent.config import AgentConfig
from orchestrator.config import BrokerConfig, OrchestratorConfig
from orchestrator.server import Orchestrator

# ------------------------------------------------------------------ in-process fleet


@dataclass
class ConsoleFleet:
    orch: Orchestrator
    agents: list[NodeAgent]
    channel: grpc.aio.Channel

    @property
    def address(self) -> str:
        return self.orch.address

    @property
    def nodes(self) -> api_pb2_grpc.NodeServiceStub:
        return api_pb2_grpc.NodeServiceStub(self.channel)

    @property
    def deployments(self) -> api_pb2_grpc.DeploymentServiceStub:
        return api_pb2_grpc.DeploymentServiceStub(self.channel)


@pytest.fixture
async def console_fleet(tmp_path: Path) -> AsyncIterator[ConsoleFleet]:
    """An orchestrator and two agents (n1 in zone a, n2 in zone b), both online."""
    config = OrchestratorConfig(
        state_dir=tmp_path / "orch",
        grpc_bind="127.0.0.1:0",
        node_timeout_s=5.0,
        reconcile_interval_s=0.2,
        resend_interval_s=1.0,
        broker=BrokerConfig(),
        catalog={"trusted_publishers": trusted_publishers(tmp_path / "publishers")},
    )
    stack: list = []
    channel = None
    try:
        orch = Orchestrator(config)
        await orch.__aenter__()
        stack.append(orch)
        agents = []
        for i, zone in enumerate(("a", "b"), 1):
            agent = NodeAgent(
                AgentConfig(
                    node_id=f"n{i}",
                    labels={"zone": zone},
                    hardware_profile="arm-sbc",
                    heartbeat_s=0.3,
                    broker={"url": orch.broker_url},
                    state_dir=tmp_path / "agents",
                    enrollment_token=TokenStore.in_state_dir(config.state_dir).mint(f"n{i}").token,
                )
            )
            await agent.__aenter__()
            stack.append(agent)
            agents.append(agent)
        channel = grpc.aio.insecure_channel(orch.address)
        fleet = ConsoleFleet(orch, agents, channel)

        async def online() -> bool:
            nodes = (await fleet.nodes.List(api_pb2.ListNodesRequest())).nodes
            return sum(n.state == node_pb2.NODE_STATE_ONLINE for n in nodes) == len(agents)

        await eventually(online, what="nodes online")
        yield fleet
    finally:
        if channel is not None:
            await channel.close()
        for item in reversed(stack):
            await item.__aexit__(None, None, None)


# ------------------------------------------------------------------ session fleet of processes

DEMO_NODES = [
    {
        "node_id": "edge-1",
        "max_replicas": 1,
        "hardware_profile": "x86-microserver",
        "labels": {"zone": "edge-a"},
        "power": {"idle_w": 8.0, "active_w": 25.0},
        "accelerators": [{"kind": "cpu-litert", "options": {"num_threads": 1}}],
    },
    {
        "node_id": "edge-2",
        "max_replicas": 1,
        "hardware_profile": "pynq-z2",
        "labels": {"zone": "edge-b"},
        "power": {"idle_w": 2.7, "active_w": 6.4},
        "accelerators": [{"kind": "cpu-litert", "options": {"num_threads": 1}}, {"kind": "fpga-pynq"}],
    },
    {
        "node_id": "edge-3",
        "max_replicas": 2,
        "hardware_profile": "arm-sbc-lowpower",
        "labels": {"zone": "edge-c"},
        "power": {"idle_w": 1.2, "active_w": 3.5},
        "accelerators": [{"kind": "cpu-litert", "options": {"num_threads": 1}}],
    },
]
# Applied in this order, each placed before the next: with the nodes' max_replicas, the
# placement is forced (bearing-watch on edge-3, then one vibration-monitor replica per node),
# whatever the scheduler's scores prefer; line-camera's selector matches no node.
DEMO_DEPLOYMENTS = [
    manifest("bearing-watch", "vibration-cnn", "1.1.0", replicas=1, selector={"zone": "edge-c"}),
    manifest("vibration-monitor", "vibration-cnn", replicas=3, max_latency_ms=50),
    manifest("line-camera", "vibration-cnn", "1.1.0", replicas=2, selector={"zone": "edge-z"}),
]
DEMO_MODELS = [  # (precision of the industrial model, name, version, use case)
    ("int8", "vibration-cnn", "1.0.0", "industrial"),
    ("float32", "vibration-cnn", "1.1.0", "industrial"),
    ("float32", "vibration-cnn", "0.9.0", "industrial"),
]
STARTUP_S = 180.0  # bounds a hang only: the fleet is ready as soon as it is ready


@dataclass
class DemoFleet:
    address: str
    root: Path
    procs: list[subprocess.Popen] = field(default_factory=list)

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.address)


def _read_ready_line(proc: subprocess.Popen, timeout: float) -> str:
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise RuntimeError(f"orchestrator printed nothing within {timeout} s")
    return proc.stdout.readline().decode()


def _stop(procs: list[subprocess.Popen]) -> None:
    for proc in reversed(procs):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in reversed(procs):
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.fixture(scope="session")
def demo_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoFleet]:
    root = tmp_path_factory.mktemp("demo-fleet")
    env = {**os.environ, "EDGEWARD_DIE_WITH_PARENT": str(os.getpid())}
    conf = root / "orchestrator.yaml"
    conf.write_text(
        yaml.safe_dump(
            {
                "state_dir": str(root / "orch"),
                "grpc_bind": "127.0.0.1:0",
                "node_timeout_s": 60,  # a busy test machine must not make nodes flap
                "reconcile_interval_s": 0.2,
                "catalog": {"trusted_publishers": trusted_publishers(root / "publishers")},
            }
        )
    )
    procs: list[subprocess.Popen] = []
    try:
        with (root / "orchestrator.log").open("ab") as log:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "edgeward", "orchestrator", "-c", str(conf)],
                    stdout=subprocess.PIPE,
                    stderr=log,
                    stdin=subprocess.DEVNULL,
                    env=env,
                )
            )
        line = _read_ready_line(procs[0], STARTUP_S)
        fields = dict(part.split("=", 1) for part in line.split()[2:])
        address, broker = fields["grpc"], fields["broker"]
        for node in DEMO_NODES:
            path = root / f"{node['node_id']}.yaml"
            path.write_text(
                yaml.safe_dump(
                    {
                        **node,
                        "broker": {"url": broker},
                        "heartbeat_s": 1.0,
                        "state_dir": str(root / "agents"),
                        "enrollment_token": TokenStore.in_state_dir(root / "orch")
                        .mint(node["node_id"])
                        .token,
                    }
                )
            )
            with (root / f"{node['node_id']}.log").open("ab") as log:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "edgeward", "agent", "-c", str(path)],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                        env=env,
                    )
                )
        fleet = DemoFleet(address, root, procs)
        with fleet.channel() as channel:
            _populate(channel)
        yield fleet
    finally:
        _stop(procs)


def _populate(channel: grpc.Channel) -> None:
    nodes = api_pb2_grpc.NodeServiceStub(channel)
    deployments = api_pb2_grpc.DeploymentServiceStub(channel)
    models = api_pb2_grpc.ModelServiceStub(channel)
    deadline = time.monotonic() + STARTUP_S

    def wait(what: str, check) -> None:
        while not check():
            if time.monotonic() > deadline:
                raise RuntimeError(f"demo fleet: timed out waiting for {what}")
            time.sleep(0.1)

    def listed() -> list[api_pb2.Node]:
        return list(nodes.List(api_pb2.ListNodesRequest(), timeout=5).nodes)

    wait(
        "nodes online",
        lambda: sum(n.state == node_pb2.NODE_STATE_ONLINE for n in listed()) == len(DEMO_NODES),
    )
    for precision, name, version, use_case in DEMO_MODELS:
        models.Push(iter(push_parts(vibration_model(precision), name, version, use_case)), timeout=30)
    for text in DEMO_DEPLOYMENTS:
        name = deployments.Apply(api_pb2.ApplyRequest(manifest=text), timeout=10).deployment.name

        def settled(name: str = name) -> bool:
            dep = deployments.Get(api_pb2.GetDeploymentRequest(name=name), timeout=5)
            if name == "line-camera":
                return sum(bool(r.reason) for r in dep.status.replica_list) == dep.spec.replicas
            return dep.status.running == dep.spec.replicas

        wait(f"deployment {name}", settled)
    idle = {n["node_id"]: n["power"]["idle_w"] for n in DEMO_NODES}
    # the first telemetry sample of a node covers its start-up; from the second on, an idle
    # node's modelled power is its idle power exactly
    wait(
        "steady telemetry",
        lambda: all(
            n.HasField("telemetry") and round(n.telemetry.power_w, 1) == idle[n.id] for n in listed()
        ),
    )


# ------------------------------------------------------------------ attestation


@dataclass
class AttestedFleet:
    """The in-process fleet's API and a verifier's AttestationService on one gRPC server, as the
    orchestrator serves them, but with a verifier whose clock and nodes the test controls."""

    address: str
    verifier: Any
    responders: dict[str, Any]
    clock: Callable[[], float]

    def attest(self, node_id: str) -> None:
        """One challenge/evidence round trip, as the orchestrator relays it over MQTT."""
        responder = self.responders[node_id]
        self.verifier.receive(node_id, responder.handle(self.verifier.challenge(node_id)))


GOOD_CODE = b"edgeward agent, release build\n"
AGENT_CONFIG = b"node_id: nX\n"


@pytest.fixture
async def attested_fleet(console_fleet: ConsoleFleet, tmp_path: Path) -> AsyncIterator[AttestedFleet]:
    """n1 measures the released agent and is affirmed; n2 runs other code and is contraindicated.
    The verifier's clock stands still at 2026-01-01 09:30 local time, so expiries are stable."""
    pytest.importorskip("edgeward.v1.attestation_pb2_grpc", reason="this build has no attestation.proto")
    from grpc_reflection.v1alpha import reflection

    from attestation import attesters
    from attestation.grpc_api import AttestationServicer
    from attestation.reference import ReferenceValues
    from attestation.responder import AttestationResponder
    from attestation.service import AttestationVerifierService, VerifierConfig
    from edgeward.v1 import attestation_pb2, attestation_pb2_grpc

    def sha(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    frozen = datetime(2026, 1, 1, 9, 30).timestamp()
    reference = ReferenceValues.model_validate(
        {
            "version": 1,
            "required": ["agent.code", "agent.config"],
            "components": {
                "agent.code": {"digests": [sha(GOOD_CODE)]},
                "agent.config": {"digests": [sha(AGENT_CONFIG)]},
            },
        }
    )
    verifier = AttestationVerifierService(VerifierConfig(), reference, clock=lambda: frozen)
    responders = {}
    for node_id, code in (("n1", GOOD_CODE), ("n2", b"edgeward agent, patched on the device\n")):
        config = attesters.SoftwareAttesterConfig(key_dir=tmp_path / f"keys-{node_id}")
        responder = AttestationResponder(node_id, attesters.create(config))
        responder.open()
        responder.measure("agent.code", code)
        responder.measure("agent.config", AGENT_CONFIG)
        reply = verifier.receive(node_id, responder.enrollment_request()).reply
        verifier.receive(node_id, responder.handle(reply))
        responders[node_id] = responder
    fleet = AttestedFleet("", verifier, responders, lambda: frozen)
    for node_id in responders:
        fleet.attest(node_id)

    async def attest_now(node_id: str) -> None:
        fleet.attest(node_id)

    orch = console_fleet.orch
    server = grpc.aio.server()
    services = orch.services()
    api_pb2_grpc.add_DeploymentServiceServicer_to_server(services.deployments, server)
    api_pb2_grpc.add_NodeServiceServicer_to_server(services.nodes, server)
    api_pb2_grpc.add_ModelServiceServicer_to_server(services.models, server)
    api_pb2_grpc.add_TelemetryServiceServicer_to_server(services.telemetry, server)
    attestation_pb2_grpc.add_AttestationServiceServicer_to_server(
        AttestationServicer(verifier, attest_now, attest_timeout_s=2.0), server
    )
    names = [api_pb2.DESCRIPTOR.services_by_name[n].full_name for n in ("DeploymentService", "NodeService")]
    names += [api_pb2.DESCRIPTOR.services_by_name[n].full_name for n in ("ModelService", "TelemetryService")]
    names += [
        attestation_pb2.DESCRIPTOR.services_by_name["AttestationService"].full_name,
        reflection.SERVICE_NAME,
    ]
    reflection.enable_server_reflection(names, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    fleet.address = f"127.0.0.1:{port}"
    try:
        yield fleet
    finally:
        await server.stop(None)
        for responder in responders.values():
            responder.close()
