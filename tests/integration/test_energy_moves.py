"""Energy moves end to end: real broker, orchestrator, agents, LiteRT and the simulated FPGA.

The figures that decide are deterministic: the simulated fpga-pynq reports its timing model, and
the CPU backend in the first tests draws so little power (a few milliwatts) and is rated so slow
(0.01 GOPS) that its cost model predicts it far dearer than the FPGA engine while what it
measures, on any machine, is far cheaper: the cold start puts the replica on the FPGA, the
node's profiles of both show the CPU saves more than 90 %, and the replica moves to the CPU of
the same node (make before break), or does not when the disruption budget is zero. The last test
has two FPGA boards 7 % apart: nothing moves (hysteresis).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable

import grpc
import pytest
from conftest import Api, eventually, manifest, quiet_for, trust_publisher

from attestation.tokens import TokenStore
from edgeward.v1 import api_pb2, node_pb2
from node_agent.agent import NodeAgent
from node_agent.config import AgentConfig
from orchestrator.config import BrokerConfig, OrchestratorConfig
from orchestrator.fleet import model_key
from orchestrator.server import Orchestrator

pytestmark = [pytest.mark.broker, pytest.mark.slow]

MODEL = model_key("vib-cnn", "1.0.0")
#: The PYNQ-Z2's figures (the agent would otherwise give the backend its board's power).
FPGA = {
    "kind": "fpga-pynq",
    "options": {"board": "pynq-z2", "mode": "simulated", "power": {"idle_w": 2.0, "active_w": 3.0}},
}
#: Rated at 0.01 GOPS: its cost model predicts seconds per inference; drawing 1-2 mW, it measures
#: under 0.3 mJ whatever the machine does (that would take 150 ms per inference on average).
SLOW_RATED_FRUGAL_CPU = {
    "kind": "cpu-litert",
    "options": {
        "num_threads": 1,
        "peak_gops": 0.01,
        "power": {"idle_w": 0.001, "active_w": 0.002},
        "energy_counter": None,
    },
}


@pytest.fixture
async def cluster(mqtt_url, topic_prefix, tmp_path) -> AsyncIterator[Callable]:
    """``await cluster(rescheduling, {node: (accelerators, zone)})`` -> (orchestrator, api)."""
    async with contextlib.AsyncExitStack() as stack:

        async def start(
            rescheduling: dict, nodes: dict[str, tuple[list[dict], str]]
        ) -> tuple[Orchestrator, Api]:
            config = OrchestratorConfig(
                state_dir=tmp_path / "orch",
                grpc_bind="127.0.0.1:0",
                node_timeout_s=3.0,
                reconcile_interval_s=0.2,
                resend_interval_s=1.0,
                broker=BrokerConfig(url=str(mqtt_url), topic_prefix=topic_prefix),
                catalog=trust_publisher(tmp_path / "publishers"),
                scheduler={"rescheduling": {"energy_sustain_s": 0, **rescheduling}},
            )
            orch = await stack.enter_async_context(Orchestrator(config))
            tokens = TokenStore.in_state_dir(config.state_dir)
            for node_id, (accelerators, zone) in nodes.items():
                await stack.enter_async_context(
                    NodeAgent(
                        AgentConfig(
                            node_id=node_id,
                            hardware_profile=f"board-{node_id}",
                            labels={"zone": zone},
                            accelerators=accelerators,
                            heartbeat_s=0.25,
                            broker={"url": str(mqtt_url), "topic_prefix": topic_prefix},
                            state_dir=tmp_path / "agents",
                            enrollment_token=tokens.mint(node_id).token,
                        )
                    )
                )
            api = Api(await stack.enter_async_context(grpc.aio.insecure_channel(orch.address)))

            async def attested() -> bool:
                listed = await api.nodes_list()
                return len(listed) == len(nodes) and all(
                    n.state == 1 and orch.verifier.tier(n.id) != "none" for n in listed
                )

            await eventually(attested, what="nodes online and attested")
            await api.push()
            return orch, api

        yield start


async def running(api: Api, name: str = "vib") -> list[api_pb2.ReplicaStatus]:
    dep = await api.deployment(name)
    return [r for r in dep.status.replica_list if r.phase == node_pb2.REPLICA_PHASE_RUNNING]


async def profiled(orch: Orchestrator, node_id: str, kinds: set[str]) -> bool:
    node = orch.fleet.nodes.get(node_id)
    return node is not None and {k for (m, k) in node.profiles if m == MODEL} >= kinds


async def looked_after(orch: Orchestrator, profile_updates: int) -> bool:
    """A look for energy moves saw these profiles and no cordoned node."""
    seen, cordoned = orch.reconciler.energy_view
    return seen >= profile_updates and not cordoned


@pytest.mark.parametrize("budget", [1, 0])
async def test_measured_saving_moves_the_replica_to_the_other_accelerator_of_its_node(
    cluster, budget
) -> None:
    orch, api = await cluster({"max_unavailable": budget}, {"n1": ([FPGA, SLOW_RATED_FRUGAL_CPU], "a")})
    await api.apply(manifest(replicas=1, extra="  requirements: {maxLatencyMs: 1000}\n"))

    await eventually(lambda: running(api), what="the replica running")
    [first] = await running(api)
    assert (first.node_id, first.accelerator) == ("n1", "fpga-pynq")  # the cold start's pick
    assert first.message.endswith("mJ per inference (cost model)"), first.message
    # The agent profiles the model on the FPGA it runs on and on its CPU, the alternative.
    await eventually(lambda: profiled(orch, "n1", {"fpga-pynq", "cpu-litert"}), what="both profiles")

    if budget == 0:
        updates = orch.fleet.profile_updates
        await eventually(lambda: looked_after(orch, updates), what="a look with both profiles")
        await quiet_for(orch, passes=3)
        assert [(r.id, r.accelerator) for r in await running(api)] == [(first.id, "fpga-pynq")]
        assert not [e for e in orch.events.recent() if e.kind.startswith("reschedule.energy")]
        return

    async def moved() -> bool:
        live = (await api.deployment("vib")).status.replica_list
        return [(r.node_id, r.accelerator) for r in live] == [("n1", "cpu-litert")]

    await eventually(moved, timeout=30, what="the replica moved to n1's CPU, its old self gone")
    [now] = await running(api)
    assert now.id != first.id and now.reason == "reschedule.energy"
    assert now.message.startswith("moved from n1/fpga-pynq (0.451 mJ per inference, own profile): ")
    [event] = [e for e in orch.events.recent() if e.kind == "reschedule.energy"]
    assert event.subject == "deployment/vib"
    assert event.attributes["replaced"] == first.id and event.attributes["target"] == "n1/cpu-litert"
    assert float(event.attributes["saving"]) > 0.9
    await quiet_for(orch, passes=5)  # settled: no move back
    assert [r.id for r in await running(api)] == [now.id]


async def test_a_small_measured_saving_moves_nothing(cluster) -> None:
    """n2's FPGA board draws 0.2 W less: 7 % less energy per inference, under energy_min_saving."""
    frugal = {"kind": "fpga-pynq", "options": {**FPGA["options"], "power": {"idle_w": 1.8, "active_w": 2.8}}}
    orch, api = await cluster({}, {"n1": ([FPGA], "a"), "n2": ([frugal], "b")})
    # n2 measures the model (it runs it for another deployment), then stays out of vib's placement.
    await api.apply(manifest(name="probe", replicas=1, extra="  selector: {matchLabels: {zone: b}}\n"))
    await eventually(lambda: running(api, "probe"), what="the probe running on n2")
    await eventually(lambda: profiled(orch, "n2", {"fpga-pynq"}), what="n2's profile")
    await api.nodes.Cordon(api_pb2.CordonRequest(node_id="n2", cordon=True))
    await api.apply(manifest(replicas=1))
    await eventually(lambda: running(api), what="vib running on n1")
    [first] = await running(api)
    assert first.node_id == "n1"
    await eventually(lambda: profiled(orch, "n1", {"fpga-pynq"}), what="n1's profile")
    updates = orch.fleet.profile_updates
    await api.nodes.Cordon(api_pb2.CordonRequest(node_id="n2", cordon=False))

    await eventually(lambda: looked_after(orch, updates), what="a look with n2 back and both profiles")
    await quiet_for(orch, passes=3)
    live = (await api.deployment("vib")).status.replica_list
    assert [(r.id, r.node_id) for r in live] == [(first.id, "n1")]
    assert not [e for e in orch.events.recent() if e.kind.startswith("reschedule.energy")]
