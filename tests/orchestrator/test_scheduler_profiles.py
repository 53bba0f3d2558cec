"""Node profiles and live correction in placement: own profiles override class predictions, the
latency scale from telemetry, the fleet's profile and latency-window bookkeeping."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeward.v1 import node_pb2
from edgeward.wire import node_message
from orchestrator.fleet import COST_MODEL_INVALID, LATENCY_INVALID, PROFILE_INVALID, Fleet
from orchestrator.scheduler import (
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
from orchestrator.scheduler.correction import CorrectionPolicy, LatencyCorrection
from orchestrator.scheduler.plan import RequestShape
from orchestrator.scheduler.snapshot import LATENCY_FLOOR_MS, class_estimates

CPU = "cpu-litert"
FPGA = "fpga-pynq"
MODEL = "m:1"


def node(nid, profile="board", accelerators=(CPU,), **kw):
    base = dict(
        id=nid,
        online=True,
        cordoned=False,
        labels={"zone": "a"},
        accelerators={k: frozenset({"INT8"}) for k in accelerators},
        max_replicas=4,
        memory_bytes=0,
        active_w=5.0,
        attestation_tier="software",
        hardware_profile=profile,
    )
    base.update(kw)
    return NodeInfo(**base)


def request(**kw):
    base = dict(
        deployment="d",
        accelerators=frozenset(),
        dtypes=frozenset({"INT8"}),
        memory_bytes=0,
        selector={},
        model=MODEL,
        max_latency_ms=20.0,
    )
    base.update(kw)
    return PlacementRequest(**base)


def scores(**weights):
    return Scheduler(SchedulerProfile(name="t", weights=weights))


CLASS_TABLE = {("board", CPU, MODEL): Prediction(30.0, 0.3)}


def test_own_profile_overrides_the_class_prediction_for_that_node_only():
    fast = {(CPU, MODEL): Prediction(5.0, 0.05)}
    nodes = [node("a"), node("b", profiles=fast), node("c")]
    snap = FleetSnapshot.from_node_infos(nodes, performance=CLASS_TABLE)
    # Class: 30 ms misses the 20 ms SLO; b measured 5 ms itself.
    assert scores(latency=1).plan(snap).place(request()).node_id == "b"
    assert scores(energy=1).plan(snap).place(request()).node_id == "b"
    shape = RequestShape.resolve(snap, request())
    assert shape.latency_at(snap, slice(None)).tolist() == [30.0, 5.0, 30.0]
    assert shape.latency_at(snap, np.array([0, 2])).tolist() == [30.0, 30.0]
    assert shape.energy_at(snap, np.array([1, 2])).tolist() == [0.05, 0.3]


def test_own_profile_can_change_the_accelerator_picked_on_its_node():
    table = {("fpga", CPU, MODEL): Prediction(15.0, 0.5), ("fpga", FPGA, MODEL): Prediction(40.0, 0.1)}
    own = {(FPGA, MODEL): Prediction(3.0, 0.05)}
    nodes = [node("a", "fpga", (CPU, FPGA)), node("b", "fpga", (CPU, FPGA), profiles=own)]
    snap = FleetSnapshot.from_node_infos(nodes, performance=table)
    # On a the class says the FPGA misses the SLO, so the CPU is picked; b's FPGA meets it.
    shape = RequestShape.resolve(snap, request())
    assert [snap.kinds[k] for k in shape.kind_at(snap, slice(None))] == [CPU, FPGA]
    plan = scores(latency=1).plan(snap)
    assert plan.place(request(replica_id="1")) == Placement("b", FPGA, 100.0)
    assert plan.place(request(replica_id="2", avoid_node="b")) == Placement("a", CPU, 75.0)  # 15 of 20 ms


def test_a_model_known_only_from_own_profiles_is_predicted_there():
    nodes = [node("a"), node("b", profiles={(CPU, MODEL): Prediction(50.0, 1.0)})]
    snap = FleetSnapshot.from_node_infos(nodes)
    shape = RequestShape.resolve(snap, request())
    assert shape.has_latency and shape.has_energy
    assert np.isnan(shape.latency_at(snap, slice(None))[0])
    # b is predicted to miss (50 > 1.5 x 20): a, unknown, scores 50 and wins.
    assert scores(latency=1).plan(snap).place(request()).node_id == "a"


def test_predicted_latency_is_own_then_class_then_unknown():
    nodes = [node("a"), node("b", profiles={(CPU, MODEL): Prediction(4.0, 0.1)}), node("c", "other")]
    snap = FleetSnapshot.from_node_infos(nodes, performance=CLASS_TABLE)
    m, k = snap.models.index(MODEL), snap.kinds.index(CPU)
    got = snap.predicted_latency(np.array([0, 1, 2]), np.array([m, m, m]), np.array([k, k, k]))
    assert got[:2].tolist() == [30.0, 4.0] and np.isnan(got[2])


def test_latency_scale_from_telemetry_lowers_a_node_that_serves_slower():
    nodes = [node("a", latency_scale=3.0), node("b")]
    snap = FleetSnapshot.from_node_infos(nodes, performance={("board", CPU, MODEL): Prediction(10.0, 0.1)})
    assert scores(latency=1).plan(snap).place(request()).node_id == "b"
    swapped = FleetSnapshot.from_node_infos(
        [node("a"), node("b", latency_scale=3.0)], performance={("board", CPU, MODEL): Prediction(10.0, 0.1)}
    )
    assert scores(latency=1).plan(swapped).place(request()).node_id == "a"


def test_sub_millisecond_predictions_count_as_the_floor():
    table = {("board", CPU, MODEL): Prediction(0.01, 0.0)}
    slow = node("a", latency_scale=25.0)  # 0.01 ms x 25 would look fast; 1 ms x 25 misses 20 ms
    plan = scores(latency=1).plan(FleetSnapshot.from_node_infos([slow, node("b")], performance=table))
    assert plan.place(request()).node_id == "b"
    assert LATENCY_FLOOR_MS == 1.0


def test_an_avoided_node_is_never_picked_and_explains_itself():
    plan = Scheduler().plan(FleetSnapshot.from_node_infos([node("a"), node("b")]))
    assert plan.place(request(avoid_node="b", replica_id="1")).node_id == "a"
    assert plan.place(request(avoid_node="a", replica_id="2")).node_id == "b"
    lone = Scheduler().plan(FleetSnapshot.from_node_infos([node("a"), node("b", online=False)]))
    result = lone.place(request(avoid_node="a"))
    assert isinstance(result, Unschedulable)
    assert result.reasons == {"scheduler.filter.avoided": 1, "scheduler.filter.offline": 1}


def test_class_estimates_are_the_median_of_the_peers_profiles():
    nodes = [
        node(f"n{i}", profiles={(CPU, MODEL): Prediction(float(ms), ms / 10)})
        for i, ms in enumerate((1, 2, 9))
    ]
    nodes.append(node("x", "other", profiles={(CPU, MODEL): Prediction(7.0, 0.7)}))
    assert class_estimates(nodes) == {
        ("board", CPU, MODEL): Prediction(2.0, 0.2),
        ("other", CPU, MODEL): Prediction(7.0, 0.7),
    }


# A per-node reference of what the vectorised shape must give: own profile, else class, else NaN.
fleets = st.lists(
    st.tuples(st.sampled_from(["p", "q"]), st.booleans(), st.floats(0.1, 100), st.floats(0.0, 5.0)),
    min_size=1,
    max_size=30,
)


@settings(max_examples=150, deadline=None)
@given(fleets, st.floats(0.1, 100))
def test_vectorised_predictions_match_a_per_node_reference(spec, class_ms):
    infos = [
        node(f"n{i:02d}", prof, profiles={(CPU, MODEL): Prediction(ms, j)} if own else {})
        for i, (prof, own, ms, j) in enumerate(spec)
    ]
    table = {("p", CPU, MODEL): Prediction(class_ms, 1.0)}
    snap = FleetSnapshot.from_node_infos(infos, performance=table)
    shape = RequestShape.resolve(snap, request(max_latency_ms=0.0))
    expected = [ms if own else (class_ms if prof == "p" else math.nan) for prof, own, ms, _ in spec]
    np.testing.assert_array_equal(shape.latency_at(snap, slice(None)), expected)
    subset = np.arange(0, len(spec), 2)
    np.testing.assert_array_equal(shape.latency_at(snap, subset), np.array(expected)[subset])
    assert [shape.kind_of(snap, i) for i in range(len(spec))] == shape.kind_at(snap, slice(None)).tolist()


# ------------------------------------------------------------------------------ latency correction


def test_correction_sets_then_smooths_then_clamps():
    corr = LatencyCorrection(CorrectionPolicy(smoothing=0.5, min_scale=0.5, max_scale=100.0))
    assert corr.scale("a") == 1.0
    assert corr.fold(["a", "b"], [40.0, 5.0], [10.0, 10.0]) == 2
    assert corr.scales() == pytest.approx({"a": 4.0, "b": 0.5})
    corr.fold(["a"], [20.0], [10.0])
    assert corr.scale("a") == pytest.approx(3.0)  # 0.5 x 4 + 0.5 x 2
    corr.fold(["a"], [1e6], [1.0])
    assert corr.scale("a") == 100.0
    corr.retain(["b"])
    assert corr.scales() == {"b": 0.5}


def test_correction_averages_models_geometrically_and_floors_sub_millisecond_figures():
    corr = LatencyCorrection()
    corr.fold(["a", "a"], [40.0, 2.5], [10.0, 10.0])  # ratios 4 and 1/4
    assert corr.scale("a") == pytest.approx(1.0)
    corr.fold(["f"], [0.4], [0.02])  # serving overhead on a tiny model is no slowdown
    assert corr.scale("f") == 1.0


def test_correction_drops_unusable_windows_and_refuses_misaligned_batches():
    corr = LatencyCorrection()
    assert corr.fold(["a", "b", "c"], [math.nan, -1.0, 5.0], [1.0, 1.0, math.inf]) == 0
    assert corr.scales() == {}
    with pytest.raises(SchedulerError):
        corr.fold(["a"], [1.0, 2.0], [1.0, 2.0])
    with pytest.raises(SchedulerError):
        CorrectionPolicy(smoothing=0)


# ---------------------------------------------------------------------------- fleet bookkeeping


def _hello(profiles=(), boot=1):
    return node_message(
        "n1", hello=node_pb2.Hello(hardware_profile="board", boot_unix_ms=boot, profiles=profiles)
    )


def _profile(p95=2.0, **kw):
    return node_pb2.ModelProfile(
        model_name="m",
        model_version="1",
        accelerator=CPU,
        runs=30,
        latency_p50_ms=1.0,
        latency_p95_ms=p95,
        energy_j=0.01,
        **kw,
    )


def test_a_hello_that_only_adds_profiles_is_not_a_reconnect():
    fleet = Fleet()
    assert fleet.apply(_hello()) == "hello"
    assert fleet.apply(_hello([_profile()])) == "profiles"
    assert fleet.nodes["n1"].profiles[(MODEL, CPU)].latency_p95_ms == 2.0
    assert fleet.apply(_hello([_profile()], boot=2)) == "hello"  # rebooted


def test_bad_profiles_are_dropped_and_counted():
    fleet = Fleet()
    bad = _profile()
    bad.energy_j = -1.0
    fleet.apply(_hello([_profile(p95=math.nan), _profile(p95=0.0), bad]))
    assert fleet.nodes["n1"].profiles == {}
    assert fleet.dropped[PROFILE_INVALID] == 3


def test_cost_models_are_read_from_the_hello_and_bad_ones_dropped_and_counted():
    good = node_pb2.CostModel(
        invoke_overhead_s=1e-4, macs_per_s=1e9, elements_per_s=2e9, link_bytes_per_s=5e8
    )
    bad = node_pb2.CostModel(invoke_overhead_s=math.nan, macs_per_s=1e9, elements_per_s=2e9)
    no_rate = node_pb2.CostModel(invoke_overhead_s=1e-4)
    hello = node_pb2.Hello(
        hardware_profile="board",
        boot_unix_ms=1,
        accelerators=[
            node_pb2.Accelerator(kind="npu", idle_w=0.5, active_w=2.0, cost=good),
            node_pb2.Accelerator(kind="gpu", idle_w=0.5, active_w=2.0, cost=bad),
            node_pb2.Accelerator(kind="dsp", idle_w=0.5, active_w=2.0, cost=no_rate),
            node_pb2.Accelerator(kind="cpu-litert", idle_w=1.0, active_w=2.0),  # an older agent: none
            node_pb2.Accelerator(kind="tpu", availability="unavailable: no device", cost=good),
        ],
    )
    fleet = Fleet()
    fleet.apply(node_message("n1", hello=hello))
    [(kind, cost)] = fleet.nodes["n1"].costs.items()
    assert kind == "npu" and (cost.macs_per_s, cost.idle_w, cost.active_w) == (1e9, 0.5, 2.0)
    assert fleet.dropped[COST_MODEL_INVALID] == 2


def _telemetry(inferences, p95):
    stats = node_pb2.ModelStats(model_name="m", model_version="1", inferences=inferences, latency_p95_ms=p95)
    return node_message("n1", telemetry=node_pb2.Telemetry(models=[stats]))


def test_a_telemetry_window_counts_only_when_the_model_served_since_the_last():
    fleet = Fleet()
    fleet.apply(_hello())
    for inferences, p95 in [(0, 0.0), (10, 5.0), (10, 5.0), (25, 7.0), (40, math.nan), (41, 9.0)]:
        fleet.apply(_telemetry(inferences, p95))
    windows = fleet.nodes["n1"].latency[MODEL]
    assert [(w.seq, w.p95_ms, w.inferences) for w in windows] == [(1, 5.0, 10), (2, 7.0, 25), (3, 9.0, 41)]
    assert fleet.dropped[LATENCY_INVALID] == 1


def test_placement_with_profiles_is_deterministic():
    infos = [
        node(f"n{i}", profiles={(CPU, MODEL): Prediction(1.0 + i % 3, 0.1 * (i % 4))}) for i in range(12)
    ]
    reqs = [request(replica_id=f"r{i}") for i in range(20)]
    runs = [
        [
            (p.node_id, p.accelerator) if isinstance(p, Placement) else None
            for p in Scheduler().plan(FleetSnapshot.from_node_infos(list(order))).place_many(reqs)
        ]
        for order in (infos, reversed(infos))
    ]
    assert runs[0] == runs[1] and None not in runs[0]
