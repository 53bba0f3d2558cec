"""Hollow nodes (``edgeward sim-fleet``) against the real orchestrator and a real Mosquitto: they
come online, enroll and attest over the real protocol, and run replicas."""

from __future__ import annotations

import pytest
from conftest import eventually, manifest

from edgeward.mqtt.session import BrokerURL
from edgeward.v1 import node_pb2
from node_agent.hollow import HollowFleetSpec, hollow_fleet

pytestmark = [pytest.mark.broker, pytest.mark.timeout(180)]

NODES = 60


@pytest.fixture
def mqtt_url(mosquitto: BrokerURL) -> BrokerURL:
    """Mosquitto only: the embedded broker's limits are measured by bench/fleet_scale.py."""
    return mosquitto


async def test_hollow_fleet_comes_online_attests_and_runs_replicas(fleet, mosquitto, tmp_path, topic_prefix):
    orch, _, api = await fleet(nodes=0)
    spec = HollowFleetSpec(
        nodes=NODES,
        broker_url=str(mosquitto),
        state_dir=tmp_path / "hollow",
        topic_prefix=topic_prefix,
        heartbeat_s=0.5,
        concurrency=20,
        token_state_dir=orch.config.state_dir,
    )
    progress: list[int] = []
    async with hollow_fleet(spec, lambda started, total: progress.append(started)) as agents:
        assert len(agents) == NODES and progress[-1] == NODES
        assert len({a.node_id for a in agents}) == NODES

        async def all_online() -> bool:
            return sum(n.state == node_pb2.NODE_STATE_ONLINE for n in await api.nodes_list()) == NODES

        await eventually(all_online, 60, f"{NODES} hollow nodes online")

        async def all_attested() -> bool:
            return all(orch.verifier.tier(a.node_id) == "software" for a in agents)

        await eventually(all_attested, 60, f"{NODES} hollow nodes attested (software tier)")
        shown = (await api.nodes_list())[0]
        assert (
            shown.inventory.accelerators[0].kind == "sim-hollow" and shown.inventory.accelerators[0].simulated
        )

        await api.push()
        requirements = "  requirements: {accelerators: [sim-hollow], memory: 1Mi}\n"
        await api.apply(manifest("hollow", replicas=NODES, extra=requirements))

        async def all_running() -> bool:
            replicas = (await api.deployment("hollow")).status.replica_list
            return sum(r.phase == node_pb2.REPLICA_PHASE_RUNNING for r in replicas) == NODES

        await eventually(all_running, 90, f"{NODES} replicas running on hollow nodes")
        assert sum(len(a.runtime.replicas) for a in agents) == NODES
        assert all(a._mqtt is not None and a._mqtt.stats.dropped_overflow == 0 for a in agents)
