"""Filter and score plugins, table-driven; a pending replica's explanation names the filter."""

import numpy as np
import pytest

from orchestrator.scheduler import (
    Code,
    FleetSnapshot,
    NodeInfo,
    Placement,
    PlacementRequest,
    Prediction,
    Scheduler,
    SchedulerError,
    SchedulerProfile,
    Unschedulable,
)


def node(nid, **kw):
    base = dict(
        id=nid,
        online=True,
        cordoned=False,
        labels={"zone": "a"},
        accelerators={"cpu-litert": frozenset({"FP32", "INT8"})},
        max_replicas=4,
        memory_bytes=1 << 30,
        active_w=5.0,
    )
    base.update(kw)
    return NodeInfo(**base)


REQ = PlacementRequest(
    deployment="d", accelerators=frozenset(), dtypes=frozenset({"INT8"}), memory_bytes=1 << 20, selector={}
)


def request(**kw):
    return PlacementRequest(**{**REQ.__dict__, **kw})


def only(*weights, filters=None, **named):
    """A profile with the default filters and just the given scores."""
    return Scheduler(
        SchedulerProfile(
            name="test", weights=dict(named), **({} if filters is None else {"filters": filters})
        )
    )


# ------------------------------------------------------------------------------------------ filters


@pytest.mark.parametrize(
    ("node_kw", "req_kw", "reason"),
    [
        ({"online": False}, {}, "scheduler.filter.offline"),
        ({"cordoned": True}, {}, "scheduler.filter.cordoned"),
        ({}, {"selector": {"zone": "b"}}, "scheduler.filter.selector"),
        ({}, {"selector": {"rack": "r1"}}, "scheduler.filter.selector"),
        ({}, {"accelerators": frozenset({"fpga-pynq"})}, "scheduler.filter.accelerator"),
        ({"accelerators": {"cpu-litert": frozenset({"FP32"})}}, {}, "scheduler.filter.accelerator"),
        ({}, {"dtypes": frozenset({"FP64"})}, "scheduler.filter.accelerator"),
        ({"accelerators": {}}, {}, "scheduler.filter.accelerator"),
        ({"replicas": 4}, {}, "scheduler.filter.capacity"),
        ({"max_replicas": 0}, {}, "scheduler.filter.capacity"),
        ({"memory_used": (1 << 30) - 10}, {}, "scheduler.filter.memory"),
        ({}, {"attestation_tier": "software"}, "scheduler.filter.attestation"),
        ({"attestation_tier": "software"}, {"attestation_tier": "tpm2"}, "scheduler.filter.attestation"),
    ],
)
def test_each_filter_explains_itself(node_kw, req_kw, reason):
    result = Scheduler().place(request(**req_kw), {"n1": node("n1", **node_kw)})
    assert isinstance(result, Unschedulable)
    assert result.reason == reason
    assert result.message == f"0/1 nodes are available: 1 {reason}"


@pytest.mark.parametrize(
    ("node_kw", "req_kw"),
    [
        ({"memory_bytes": 0, "memory_used": 1 << 40}, {"memory_bytes": 1 << 40}),  # undeclared: unlimited
        ({"attestation_tier": "tpm2"}, {"attestation_tier": "software"}),  # a stronger tier is fine
        ({"labels": {"zone": "a", "rack": "r1"}}, {"selector": {"zone": "a", "rack": "r1"}}),
        ({}, {"dtypes": frozenset()}),  # any accelerator will do
        ({"replicas": 3}, {}),
    ],
)
def test_nodes_that_fit(node_kw, req_kw):
    result = Scheduler().place(request(**req_kw), {"n1": node("n1", **node_kw)})
    assert isinstance(result, Placement)
    assert result.node_id == "n1"


def test_each_node_is_counted_under_its_first_failing_filter():
    nodes = {
        "off": node("off", online=False, cordoned=True, attestation_tier="none"),
        "cord": node("cord", cordoned=True),
        "weak": node("weak", attestation_tier="none"),
        "full": node("full", attestation_tier="tpm2", replicas=4),
        "full2": node("full2", attestation_tier="tpm2", replicas=4, memory_used=1 << 30),
        "mem": node("mem", attestation_tier="tpm2", memory_used=1 << 30),
    }
    result = Scheduler().place(request(attestation_tier="software"), nodes)
    assert isinstance(result, Unschedulable)
    assert result.reasons == {
        "scheduler.filter.offline": 1,
        "scheduler.filter.cordoned": 1,
        "scheduler.filter.attestation": 1,
        "scheduler.filter.capacity": 2,
        "scheduler.filter.memory": 1,
    }
    assert result.reason == "scheduler.filter.capacity"
    assert result.message == (
        "0/6 nodes are available: 1 scheduler.filter.attestation, 2 scheduler.filter.capacity, "
        "1 scheduler.filter.cordoned, 1 scheduler.filter.memory, 1 scheduler.filter.offline"
    )
    by_plugin = {s.plugin: s for s in result.statuses}
    assert list(by_plugin) == ["ready", "selector", "attestation", "accelerator", "capacity"]
    assert by_plugin["capacity"].code is Code.UNSCHEDULABLE
    assert by_plugin["capacity"].reasons == {"scheduler.filter.capacity": 2, "scheduler.filter.memory": 1}
    assert by_plugin["selector"].code is Code.SUCCESS
    assert by_plugin["selector"].reasons == {}


def test_profile_order_decides_which_filter_is_named():
    lone = {"n1": node("n1", online=False, replicas=4)}
    capacity_first = only(filters=("capacity", "ready"), spread=1.0)
    assert capacity_first.place(REQ, dict(lone)).reason == "scheduler.filter.capacity"
    assert Scheduler().place(REQ, dict(lone)).reason == "scheduler.filter.offline"


def test_no_nodes():
    result = Scheduler().place(REQ, {})
    assert isinstance(result, Unschedulable)
    assert result.reason == "scheduler.no_nodes"
    assert result.message == "no nodes are registered"


def test_unknown_attestation_tier_is_a_bug():
    with pytest.raises(SchedulerError, match="unknown attestation tier"):
        Scheduler().place(request(attestation_tier="gold"), {"n1": node("n1")})


# ------------------------------------------------------------------------------------------- scores

PERF = {
    ("board-a", "cpu-litert", "m"): Prediction(latency_ms=30.0, energy_j=0.30),
    ("board-b", "cpu-litert", "m"): Prediction(latency_ms=8.0, energy_j=0.20),
    ("board-c", "cpu-litert", "m"): Prediction(latency_ms=12.0, energy_j=0.05),
    ("board-c", "asic-edgetpu", "m"): Prediction(latency_ms=2.0, energy_j=0.01),
}


def placed(scheduler, nodes, reqs, performance=None):
    plan = scheduler.plan(FleetSnapshot.from_node_infos(nodes, performance=performance))
    return [r.node_id if isinstance(r, Placement) else r.reason for r in plan.place_many(reqs)]


@pytest.mark.parametrize(
    ("weights", "nodes", "reqs", "expected"),
    [
        # energy: predicted joules win over board power...
        (
            {"energy": 1},
            [
                node("a", hardware_profile="board-a", active_w=1.0),
                node("b", hardware_profile="board-b", active_w=9.0),
            ],
            [request(model="m")],
            ["b"],
        ),
        # ...and board power stands in when the model has no prediction
        ({"energy": 1}, [node("a", active_w=2.0), node("b", active_w=9.0)], [request(model="x")], ["a"]),
        # latency: the node within the SLO wins; with no SLO every node is as good (highest id wins)
        (
            {"latency": 1},
            [node("a", hardware_profile="board-b"), node("b", hardware_profile="board-a")],
            [request(model="m", max_latency_ms=20.0)],
            ["a"],
        ),
        (
            {"latency": 1},
            [node("a", hardware_profile="board-b"), node("b", hardware_profile="board-a")],
            [request(model="m")],
            ["b"],
        ),
        # latency scale from telemetry: board-b observed 3x slower than predicted misses the SLO
        (
            {"latency": 1},
            [node("a", hardware_profile="board-b", latency_scale=3.0), node("b", hardware_profile="board-c")],
            [request(model="m", max_latency_ms=20.0)],
            ["b"],
        ),
        # least-loaded: the largest share of free slots
        (
            {"least-loaded": 1},
            [node("a", replicas=1, max_replicas=2), node("b", replicas=2, max_replicas=8)],
            [request()],
            ["b"],
        ),
        # spread: away from the deployment's replicas, then back when all have one
        ({"spread": 1}, [node("a"), node("b", per_deployment={"d": 1})], [request()] * 3, ["a", "b", "a"]),
        # zone spread: the other zone next (ties go to the highest id)
        (
            {"zone-spread": 1},
            [node("a1"), node("a2"), node("b1", labels={"zone": "b"})],
            [request()] * 3,
            ["b1", "a2", "b1"],
        ),
        # round robin: in id order after the last node bound, skipping unfit nodes
        (
            {"round-robin": 1},
            [node("a"), node("b", online=False), node("c"), node("d")],
            [request()] * 5,
            ["a", "c", "d", "a", "c"],
        ),
    ],
)
def test_each_score(weights, nodes, reqs, expected):
    assert placed(only(**weights), nodes, reqs, PERF) == expected


def test_spread_then_energy_and_snapshot_is_updated():
    nodes = {"n1": node("n1", active_w=10.0), "n2": node("n2", active_w=3.0), "n3": node("n3", online=False)}
    sched = Scheduler()
    first = sched.place(REQ, nodes)
    second = sched.place(REQ, nodes)
    assert isinstance(first, Placement)
    assert isinstance(second, Placement)
    assert first.node_id == "n2"  # lower power wins while spread is equal
    assert second.node_id == "n1"  # then spread moves the second replica away
    assert nodes["n2"].replicas == 1
    assert nodes["n2"].per_deployment == {"d": 1}
    assert nodes["n2"].memory_used == REQ.memory_bytes
    assert first.accelerator == "cpu-litert"
    assert 0 <= second.score <= 100


BOARD_C = {"cpu-litert": frozenset({"FP32", "INT8"}), "asic-edgetpu": frozenset({"INT8"})}


def test_energy_aware_keeps_within_the_slo_before_saving_energy():
    # board-c is the most frugal but only its ASIC meets a 5 ms SLO; the FP32 model must use a CPU.
    nodes = [
        node("a", hardware_profile="board-b"),
        node("c", hardware_profile="board-c", accelerators=BOARD_C),
    ]
    plan = Scheduler().plan(FleetSnapshot.from_node_infos(nodes, performance=PERF))
    int8 = plan.place(request(model="m", max_latency_ms=5.0))
    fp32 = plan.place(request(deployment="e", model="m", dtypes=frozenset({"FP32"}), max_latency_ms=10.0))
    assert (int8.node_id, int8.accelerator) == ("c", "asic-edgetpu")
    assert (fp32.node_id, fp32.accelerator) == ("a", "cpu-litert")


@pytest.mark.parametrize(
    ("req_kw", "performance", "accelerator"),
    [
        ({}, None, "asic-edgetpu"),  # no predictions: first by name
        ({"model": "m"}, PERF, "asic-edgetpu"),  # least energy
        ({"accelerators": frozenset({"cpu-litert"})}, PERF, "cpu-litert"),
        ({"dtypes": frozenset({"FP32"})}, PERF, "cpu-litert"),  # the ASIC has no FP32
    ],
)
def test_accelerator_pick(req_kw, performance, accelerator):
    n = node("c", hardware_profile="board-c", accelerators=BOARD_C)
    plan = Scheduler().plan(FleetSnapshot.from_node_infos([n], performance=performance))
    assert plan.place(request(**req_kw)).accelerator == accelerator


def test_placement_is_deterministic():
    def run():
        nodes = {f"n{i}": node(f"n{i}", active_w=float(i % 3)) for i in range(20)}
        sched = Scheduler()
        return [sched.place(REQ, nodes).node_id for _ in range(30)]

    assert run() == run()


def test_unknown_plugin_is_refused():
    with pytest.raises(ValueError, match="unknown scheduler plugins"):
        SchedulerProfile(name="x", filters=("ready", "astrology"))
    with pytest.raises(ValueError, match="unknown scheduler plugins"):
        SchedulerProfile(name="x", weights={"vibes": 1.0})
    with pytest.raises(ValueError, match="extra"):
        SchedulerProfile(name="x", scores={})


def test_named_profiles():
    assert Scheduler().profile.name == "energy-aware"
    assert Scheduler("round-robin").profile.weights == {"round-robin": 1.0}


# ---------------------------------------------------------------------------------- snapshot and plan


def test_snapshot_is_columnar_immutable_and_order_free():
    nodes = [node("b", accelerators={"cpu-litert": frozenset({"FP32"})}), node("a"), node("c", online=False)]
    snap = FleetSnapshot.from_node_infos(nodes)
    assert snap.node_ids == ("a", "b", "c")
    assert snap.index("b") == 1
    assert snap.online.tolist() == [True, True, False]
    assert len(snap.classes) == 2
    assert snap.node_class[0] == snap.node_class[2]
    with pytest.raises(ValueError, match="read-only"):
        snap.online[0] = False
    assert FleetSnapshot.from_node_infos(nodes[::-1]).node_ids == snap.node_ids
    with pytest.raises(SchedulerError, match="listed twice"):
        FleetSnapshot.from_node_infos([node("a"), node("a")])
    with pytest.raises(SchedulerError, match="not in the snapshot"):
        snap.index("z")


def test_place_many_matches_one_at_a_time():
    nodes = [node(f"n{i}", active_w=float(i % 4), max_replicas=2) for i in range(6)]
    reqs = [request(deployment=f"d{i % 3}") for i in range(14)]
    snap = FleetSnapshot.from_node_infos(nodes)
    batch = Scheduler().place_many(reqs, snap)
    plan = Scheduler().plan(snap)
    assert batch == [plan.place(r) for r in reqs]
    assert sum(isinstance(r, Placement) for r in batch) == 12
    assert batch[-1].reason == "scheduler.filter.capacity"


def test_a_fleet_where_every_node_is_a_candidate_places_as_one_with_others_filtered_out():
    """Plugins read whole arrays when every node passes the static filters, and gather the
    candidates otherwise: the same nodes get the same replicas either way."""
    nodes = [
        node(f"n{i:02d}", labels={"zone": "abc"[i % 3]}, max_replicas=1 + i % 3, active_w=3.0 + i % 5)
        for i in range(24)
    ]
    shut_out = node("n99", accelerators={"fpga-sim": frozenset({"INT8"})})  # fails the accelerator filter
    reqs = [request(replica_id=f"r{k}", accelerators=frozenset({"cpu-litert"})) for k in range(40)]
    everyone = Scheduler().plan(FleetSnapshot.from_node_infos(nodes)).place_many(reqs)
    some = Scheduler().plan(FleetSnapshot.from_node_infos([*nodes, shut_out])).place_many(reqs)
    assert [getattr(p, "node_id", p) for p in everyone] == [getattr(p, "node_id", p) for p in some]
    assert {getattr(p, "node_id", None) for p in everyone} - {None} == {n.id for n in nodes}


def test_reserve_and_unreserve_are_idempotent():
    snap = FleetSnapshot.from_node_infos([node("a", max_replicas=1), node("b", max_replicas=1)])
    plan = Scheduler().plan(snap)
    first = plan.place(request(replica_id="r1"))
    assert plan.place(request(replica_id="r1")) == first  # same replica, same answer
    assert plan.slots_used.sum() == 1
    other = plan.place(request(replica_id="r2"))
    assert other.node_id != first.node_id
    assert isinstance(plan.place(request(replica_id="r3")), Unschedulable)
    plan.unreserve("r1")
    plan.unreserve("r1")
    plan.unreserve("never")
    assert plan.slots_used.sum() == 1
    assert plan.memory_free[snap.index(first.node_id)] == 1 << 30
    assert plan.place(request(replica_id="r3")).node_id == first.node_id
    assert list(plan.reservations) == ["r2", "r3"]


def test_reserve_accounts_for_bindings_made_elsewhere():
    snap = FleetSnapshot.from_node_infos([node("a", max_replicas=1), node("b", max_replicas=1)])
    plan = Scheduler().plan(snap)
    plan.reserve(request(replica_id="r1"), "b", "cpu-litert")
    plan.reserve(request(replica_id="r1"), "b")  # again: no change
    assert plan.slots_used.tolist() == [0, 1]
    assert plan.place(request(replica_id="r2")).node_id == "a"
    with pytest.raises(SchedulerError, match="reserved on 'b'"):
        plan.reserve(request(replica_id="r1"), "a")
    with pytest.raises(SchedulerError, match="replica_id"):
        plan.reserve(request(), "a")


def test_snapshot_counts_existing_replicas():
    nodes = [node("a", replicas=3, memory_used=1 << 29, per_deployment={"d": 3}), node("b")]
    plan = Scheduler().plan(FleetSnapshot.from_node_infos(nodes))
    assert plan.deployment_counts("d").tolist() == [3, 0]
    assert plan.slots_used.tolist() == [3, 0]
    assert plan.memory_free.tolist() == [1 << 29, 1 << 30]
    assert np.all(plan.free_share <= 100)
