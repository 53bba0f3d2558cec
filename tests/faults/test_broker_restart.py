"""Restart the broker (Mosquitto, same port) under a running fleet: no replica moves or doubles, the
telemetry of the outage is replayed (gap bounded), and commands are acknowledged again."""

from __future__ import annotations

import time

import pytest
from fault_support import WAIT_S, deployment_manifest, max_gap_ms, wait_for

from edgeward.wire import now_ms

pytestmark = [pytest.mark.faults, pytest.mark.broker, pytest.mark.slow, pytest.mark.timeout(600)]
# The timeout only stops a hang: each process's start is bounded on its own (conftest.STARTUP_S) and
# each step the test measures by its own wait; their sum on a loaded machine is far above a minute.

OUTAGE_S = 3.0
HEARTBEAT_MS = 500


def test_broker_restart_moves_nothing_and_telemetry_resumes(mosquitto_factory, cluster):
    # mosquitto_factory first: torn down last, the broker outlives the processes that use it.
    broker = mosquitto_factory()
    cluster.broker_url = str(broker.url)
    nodes = sorted(cluster.start_fleet(3))
    with cluster.probe() as probe:
        probe.apply(deployment_manifest("vib", 3))
        wait_for(lambda: probe.converged({"vib": 3}), WAIT_S, "3 replicas running")
        before = probe.placement("vib")

        broker.stop()
        stopped_ms = now_ms()
        time.sleep(OUTAGE_S)
        assert probe.online() == set(nodes), "our own outage is no evidence that the nodes are gone"
        broker.start()  # same port
        restarted_ms = now_ms()

        wait_for(
            lambda: all(probe.telemetry(n, restarted_ms) for n in nodes), WAIT_S, "telemetry from every node"
        )
        for node in nodes:
            # The samples taken during the outage were replayed: no hole longer than a few beats.
            stamps = probe.telemetry(node, stopped_ms - 2000)
            gap = max_gap_ms(stamps, stopped_ms - HEARTBEAT_MS, restarted_ms)
            assert gap <= 4 * HEARTBEAT_MS, f"{node}: telemetry gap of {gap} ms across the broker restart"

        probe.apply(deployment_manifest("vib", 4))  # a command that must be sent and acknowledged
        wait_for(lambda: probe.converged({"vib": 4}), WAIT_S, "the scale-up running after the restart")
        after = probe.placement("vib")
        assert before.items() <= after.items(), "no replica moved or doubled across the broker restart"
