"""Energy offers and their sustain clock, without IO: which running replica a measured saving would
move, where, and when."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from orchestrator.scheduler import (
    FleetSnapshot,
    NodeInfo,
    PlacementRequest,
    Prediction,
    Scheduler,
    SchedulerError,
)
from orchestrator.scheduler.energy import EnergyPolicy, EnergyWatch, RunningReplica, energy_offers

MODEL = "m:1"
KIND = "npu"


def node(
    node_id: str,
    energy_j: float | None,
    latency_ms: float = 1.0,
    *,
    replicas: int = 0,
    cordoned: bool = False,
    **kw,
) -> NodeInfo:
    profiles = {} if energy_j is None else {(KIND, MODEL): Prediction(latency_ms, energy_j)}
    return NodeInfo(
        id=node_id,
        online=True,
        cordoned=cordoned,
        labels={},
        accelerators={KIND: frozenset({"INT8"})},
        max_replicas=4,
        memory_bytes=0,
        active_w=2.0,
        attestation_tier="software",
        hardware_profile=f"hw-{node_id}",
        profiles=profiles,
        replicas=replicas,
        per_deployment={"d": replicas} if replicas else {},
        **kw,
    )


def request(replica_id: str = "new", slo: float = 50.0) -> PlacementRequest:
    return PlacementRequest(
        deployment="d",
        accelerators=frozenset(),
        dtypes=frozenset({"INT8"}),
        memory_bytes=0,
        selector={},
        attestation_tier="software",
        model=MODEL,
        max_latency_ms=slo,
        replica_id=replica_id,
    )


def running(energy_j: float, slo: float = 50.0) -> RunningReplica:
    return RunningReplica("old", "a", KIND, energy_j, request(slo=slo))


def plan_of(*nodes: NodeInfo):
    return Scheduler().plan(FleetSnapshot.from_node_infos(list(nodes)))


def test_a_large_measured_saving_is_offered_and_stays_reserved() -> None:
    plan = plan_of(node("a", 1.0, replicas=1), node("b", 0.1))
    [offer] = energy_offers(plan, [running(1.0)], EnergyPolicy(), limit=4)
    assert (offer.placement.node_id, offer.placement.basis) == ("b", "own profile")
    assert offer.saving == pytest.approx(0.9)
    assert "new" in plan.reservations
    assert offer.why() == (
        "moved from a/npu (1000.000 mJ per inference, own profile): predicted 100.000 mJ here (own profile), "
        "90 % less"
    )
    # The replica's own spread count was restored after the look.
    assert plan.deployment_counts("d")[plan.snapshot.index("a")] == 1


@pytest.mark.parametrize(
    ("b", "policy", "slo"),
    [
        (node("b", 0.8), EnergyPolicy(), 50.0),  # 20 % saved: under min_saving
        (node("b", None), EnergyPolicy(), 50.0),  # nothing measured there
        (node("b", 0.1, latency_ms=45.0), EnergyPolicy(), 50.0),  # over SLO x headroom (40 ms)
        (node("b", 0.1, cordoned=True), EnergyPolicy(), 50.0),  # filtered out
        (node("b", 0.5), EnergyPolicy(min_saving=0.6), 50.0),
    ],
)
def test_no_offer_without_a_large_measured_saving_within_the_slo(b: NodeInfo, policy, slo) -> None:
    plan = plan_of(node("a", 1.0, replicas=1), b)
    assert energy_offers(plan, [running(1.0, slo)], policy, limit=4) == []
    assert plan.reservations == {}


def test_no_offer_between_nodes_of_the_same_hardware_profile() -> None:
    """Identical hardware: b's ten times lower figure is noise of its measurement, not a saving."""
    a, b = node("a", 1.0, replicas=1), node("b", 0.1)
    plan = plan_of(a, dataclasses.replace(b, hardware_profile=a.hardware_profile))
    assert energy_offers(plan, [running(1.0)], EnergyPolicy(), limit=4) == []
    assert plan.reservations == {}


def test_a_slow_node_by_live_correction_gets_no_offer() -> None:
    """b's profile meets the SLO, but its telemetry shows it 30x slower than profiled."""
    plan = plan_of(node("a", 1.0, replicas=1), node("b", 0.1, latency_ms=2.0, latency_scale=30.0))
    assert energy_offers(plan, [running(1.0)], EnergyPolicy(), limit=4) == []


def test_replicas_that_cannot_save_enough_anywhere_are_not_tried() -> None:
    """The cheapest measured figure in the fleet bounds every saving: a replica already within
    min_saving of it costs no placement."""
    plan = plan_of(node("a", 1.0, replicas=1), node("b", 0.9))
    tried = []
    place = plan.place
    plan.place = lambda req: tried.append(req) or place(req)  # type: ignore[method-assign]
    assert energy_offers(plan, [running(1.0)], EnergyPolicy(), limit=4) == []
    assert tried == []


def test_limit_bounds_the_offers() -> None:
    plan = plan_of(node("a", 1.0, replicas=2), node("b", 0.1))
    replicas = [RunningReplica(f"old{i}", "a", KIND, 1.0, request(f"new{i}")) for i in range(2)]
    assert len(energy_offers(plan, replicas, EnergyPolicy(), limit=1)) == 1
    assert energy_offers(plan, replicas, EnergyPolicy(), limit=0) == []


def test_the_watch_moves_only_after_sustain_s_and_restarts_when_an_offer_goes() -> None:
    watch = EnergyWatch(EnergyPolicy(sustain_s=30.0))
    assert math.isinf(watch.next_due())
    assert not watch.sustained("r", now=100.0)
    assert watch.next_due() == 130.0
    assert not watch.sustained("r", now=129.9)
    assert watch.sustained("r", now=130.0)
    watch.keep_only(())  # no offer at the next look: the clock starts again
    assert not watch.sustained("r", now=131.0)
    assert watch.sustained("r", now=161.0)


def test_policy_bounds() -> None:
    for bad in ({"min_saving": 0.0}, {"min_saving": 1.0}, {"sustain_s": -1.0}, {"slo_headroom": 0.0}):
        with pytest.raises(SchedulerError):
            EnergyPolicy(**bad)


def test_release_and_restore_leave_the_plan_as_it_was() -> None:
    plan = plan_of(node("a", 1.0, replicas=2), node("b", 0.1))
    before = plan.deployment_counts("d").copy()
    slots = plan.slots_used.copy()
    plan.release("a", "d")
    assert plan.deployment_counts("d")[plan.snapshot.index("a")] == 1
    assert np.array_equal(plan.slots_used, slots)  # it keeps its slot: make before break
    plan.restore("a", "d")
    assert np.array_equal(plan.deployment_counts("d"), before)
