"""kill -9 of the orchestrator in the middle of a burst of applies, and of node agents: after each,
no acknowledged deployment is lost, no replica is doubled, the store is intact, the state converges."""

from __future__ import annotations

import random
import sqlite3
import threading
import time

import grpc
import pytest
from fault_support import EVICTED, MODEL, WAIT_S, deployment_manifest, wait_for, wait_passes

pytestmark = [pytest.mark.faults, pytest.mark.broker, pytest.mark.slow, pytest.mark.timeout(600)]
# The timeout only stops a hang: each process's start is bounded on its own (conftest.STARTUP_S) and
# each step the test measures by its own wait; their sum on a loaded machine is far above a minute.
BURST_CAP = 5_000  # applies a burst may make before the kill lands (it lands after a few dozen)


def _integrity(db_path) -> str:
    db = sqlite3.connect(db_path)
    try:
        return db.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        db.close()


def test_kill9_orchestrator_during_apply_loses_no_acknowledged_deployment(cluster, mosquitto):
    cluster.broker_url = str(mosquitto)
    rng = random.Random()
    seed = rng.randrange(2**32)
    rng.seed(seed)
    orch = cluster.orchestrator()
    agents = {f"node-{i}": cluster.agent(i) for i in range(1, 4)}
    cluster.agents_started(agents)
    with cluster.probe() as probe:
        wait_for(lambda: len(probe.online()) == len(agents), WAIT_S, "3 nodes online")
        wait_for(lambda: len(probe.attested()) == len(agents), WAIT_S, "3 nodes attested")
        probe.push(MODEL)
        probe.apply(deployment_manifest("base", 3))
        wait_for(lambda: probe.converged({"base": 3}), WAIT_S, "the base deployment running")
        base = probe.placement("base")
    desired = {"base": 3}
    for round_ in range(2):
        # The kill lands after a random number of acknowledged applies, while the burst goes on
        # (it goes on until the orchestrator is gone, however late the test thread gets to the
        # kill on a loaded machine): a few deployments have a replica (the fleet has room for
        # them), the rest none.
        names = [f"burst{round_}-{k}" for k in range(BURST_CAP)]
        replicas = {name: 1 if k < 4 else 0 for k, name in enumerate(names)}
        kill_after = rng.randrange(3, 50)
        acknowledged: list[str] = []
        enough = threading.Event()
        cut = threading.Event()

        def burst(
            names=names,
            acknowledged=acknowledged,
            replicas=replicas,
            kill_after=kill_after,
            enough=enough,
            cut=cut,
        ) -> None:
            with cluster.probe() as p:
                for name in names:
                    try:
                        p.apply(deployment_manifest(name, replicas[name]))
                    except grpc.RpcError:
                        cut.set()  # the orchestrator is gone
                        break
                    acknowledged.append(name)
                    if len(acknowledged) == kill_after:
                        enough.set()  # the kill comes from the test thread while the next apply is in flight
            enough.set()

        applying = threading.Thread(target=burst, name=f"burst-{round_}")
        applying.start()
        assert enough.wait(30), "the burst did not start"
        orch.kill9()
        applying.join(timeout=30)
        assert cut.is_set() and len(acknowledged) >= kill_after, (
            f"the kill did not land inside the burst (seed {seed})"
        )
        assert _integrity(cluster.tmp_path / "state" / "edgeward.db") == "ok", f"seed {seed}"
        orch = cluster.orchestrator()
        with cluster.probe() as probe:
            present = wait_for(probe.deployment_names, WAIT_S, "the orchestrator back")
            lost = set(acknowledged) - present
            assert not lost, f"acknowledged deployments lost by kill -9 (seed {seed}): {sorted(lost)}"
            # An apply whose answer the kill swallowed may or may not have committed: both are fine.
            desired.update({name: replicas[name] for name in present if name in replicas})
            wait_for(lambda: probe.converged(desired), WAIT_S, f"convergence after kill -9 #{round_ + 1}")
            assert probe.placement("base") == base, "no replica of the base deployment moved or doubled"


def test_killed_agents_are_replaced_and_their_return_doubles_nothing(cluster, mosquitto):
    cluster.broker_url = str(mosquitto)
    agents = cluster.start_fleet(3)
    with cluster.probe() as probe:
        probe.apply(deployment_manifest("vib", 4))
        wait_for(lambda: probe.converged({"vib": 4}), WAIT_S, "4 replicas running")
        placement = probe.placement("vib")
        victims = sorted(set(placement.values()))[:2]
        for victim in victims:
            agents[victim].kill9()
        killed_at = time.monotonic()
        wait_for(lambda: not probe.online() & set(victims), WAIT_S, "the killed nodes offline")
        detected_s = time.monotonic() - killed_at
        wait_for(lambda: probe.converged({"vib": 4}), WAIT_S, "the replicas rescheduled")
        moved = probe.placement("vib")
        assert not set(moved.values()) & set(victims)
        for victim in victims:  # the same nodes come back, with their sealed-artifact caches
            agents[victim] = cluster.agent(int(victim.rsplit("-", 1)[1]))
        cluster.agents_started({victim: agents[victim] for victim in victims})
        wait_for(lambda: len(probe.online()) == 3, WAIT_S, "the killed nodes back")
        wait_for(lambda: len(probe.attested()) == 3, WAIT_S, "the killed nodes attested again")
        wait_passes(cluster.metrics, 3)  # passes that saw their reports: nothing may move back
        wait_for(lambda: probe.converged({"vib": 4}), WAIT_S, "convergence after their return")
        assert probe.placement("vib") == moved, "nothing moves back and nothing doubles"
        dep = probe.deployment("vib")
        assert not [r for r in dep.status.replica_list if r.phase == EVICTED]
        for node in probe.nodes():
            assert {r.id for r in node.replicas} == {r for r, n in moved.items() if n == node.id}
        print(f"offline detected {detected_s:.1f} s after the kill")  # bounded by the wait above
