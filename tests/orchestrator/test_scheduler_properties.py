"""Property tests on random fleets: hard constraints always hold, explanations add up, the per-call
adapter and the batched path agree, and a placement depends only on its inputs."""

import random
from collections import Counter

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.scheduler import (
    PROFILES,
    SCORERS,
    TIERS,
    FleetSnapshot,
    NodeInfo,
    Placement,
    PlacementRequest,
    Prediction,
    RequestShape,
    Scheduler,
    Unschedulable,
)

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

KINDS = ("asic-edgetpu", "cpu-litert", "fpga-pynq")
DTYPES = ("FP32", "INT8", "UINT8")
HARDWARE = ("", "p1", "p2")
MODELS = ("", "m1", "m2")
MI = 1 << 20

dtype_sets = st.frozensets(st.sampled_from(DTYPES))


def _node(i, fields):
    # replicas may exceed max_replicas by one (an over-committed node), memory_used not memory_bytes
    return NodeInfo(
        id=f"n{i:02d}",
        **{
            **fields,
            "replicas": min(fields["replicas"], fields["max_replicas"] + 1),
            "memory_used": fields["memory_used"] % (fields["memory_bytes"] + 1),
        },
    )


node_fields = st.fixed_dictionaries(
    {
        "online": st.booleans(),
        "cordoned": st.booleans(),
        "labels": st.fixed_dictionaries(
            {"zone": st.sampled_from("abc")}, optional={"rack": st.sampled_from(["r1", "r2"])}
        ),
        "accelerators": st.dictionaries(st.sampled_from(KINDS), dtype_sets, max_size=3),
        "max_replicas": st.integers(0, 4),
        "memory_bytes": st.sampled_from([0, 256 * MI, 1024 * MI]),
        "active_w": st.floats(0, 40),
        "replicas": st.integers(0, 5),
        "memory_used": st.integers(0, 1024 * MI),
        "attestation_tier": st.sampled_from(list(TIERS)),
        "per_deployment": st.dictionaries(st.sampled_from(["d0", "d1"]), st.integers(0, 2), max_size=2),
        "hardware_profile": st.sampled_from(HARDWARE),
        "latency_scale": st.sampled_from([0.5, 1.0, 2.0]),
    }
)
fleets = st.lists(node_fields, max_size=12).map(lambda fields: [_node(i, f) for i, f in enumerate(fields)])


requests = st.lists(
    st.builds(
        PlacementRequest,
        deployment=st.sampled_from(["d0", "d1", "d2"]),
        accelerators=st.frozensets(st.sampled_from(KINDS), max_size=2),
        dtypes=dtype_sets,
        memory_bytes=st.sampled_from([0, 64 * MI, 512 * MI]),
        selector=st.dictionaries(
            st.sampled_from(["zone", "rack"]), st.sampled_from(["a", "b", "r1"]), max_size=1
        ),
        attestation_tier=st.sampled_from(list(TIERS)),
        model=st.sampled_from(MODELS),
        max_latency_ms=st.sampled_from([0.0, 5.0, 50.0]),
    ),
    max_size=20,
)

performance = st.dictionaries(
    st.tuples(st.sampled_from(HARDWARE[1:]), st.sampled_from(KINDS), st.sampled_from(MODELS[1:])),
    st.builds(Prediction, latency_ms=st.floats(0.1, 100), energy_j=st.floats(0, 2)),
)


def first_failure(req, n, used, mem_used):
    """The reason the default profile gives for ``n``, written as plainly as possible."""
    if not n.online:
        return "scheduler.filter.offline"
    if n.cordoned:
        return "scheduler.filter.cordoned"
    if any(n.labels.get(k) != v for k, v in req.selector.items()):
        return "scheduler.filter.selector"
    if TIERS[n.attestation_tier] < TIERS[req.attestation_tier]:
        return "scheduler.filter.attestation"
    if not any(
        (not req.accelerators or kind in req.accelerators) and req.dtypes <= dtypes
        for kind, dtypes in n.accelerators.items()
    ):
        return "scheduler.filter.accelerator"
    if used >= n.max_replicas:
        return "scheduler.filter.capacity"
    if n.memory_bytes and mem_used + req.memory_bytes > n.memory_bytes:
        return "scheduler.filter.memory"
    return None


def describe(results):
    return [
        (r.node_id, r.accelerator, r.score) if isinstance(r, Placement) else dict(r.reasons) for r in results
    ]


@SETTINGS
@given(fleet=fleets, reqs=requests, perf=performance, profile=st.sampled_from(sorted(PROFILES)))
def test_placements_keep_every_hard_constraint_and_explanations_add_up(fleet, reqs, perf, profile):
    by_id = {n.id: n for n in fleet}
    used = {n.id: n.replicas for n in fleet}
    mem_used = {n.id: n.memory_used for n in fleet}
    plan = Scheduler(profile).plan(FleetSnapshot.from_node_infos(fleet, performance=perf))
    for req in reqs:
        result = plan.place(req)
        expected = Counter(first_failure(req, n, used[n.id], mem_used[n.id]) for n in fleet)
        feasible = expected.pop(None, 0)
        if isinstance(result, Unschedulable):
            assert feasible == 0, "a feasible node was missed"
            assert dict(result.reasons) == dict(expected)
            assert sum(result.reasons.values()) == result.nodes == len(fleet)
            continue
        n = by_id[result.node_id]
        assert first_failure(req, n, used[n.id], mem_used[n.id]) is None
        assert req.dtypes <= n.accelerators[result.accelerator]
        assert not req.accelerators or result.accelerator in req.accelerators
        assert 0 <= result.score <= 100
        used[n.id] += 1
        mem_used[n.id] += req.memory_bytes
        assert used[n.id] <= n.max_replicas
        assert not n.memory_bytes or mem_used[n.id] <= n.memory_bytes


@SETTINGS
@given(fleet=fleets, reqs=requests, perf=performance, seed=st.integers(0, 2**32 - 1))
def test_placement_depends_only_on_the_inputs(fleet, reqs, perf, seed):
    shuffled = list(fleet)
    random.Random(seed).shuffle(shuffled)
    first = Scheduler().place_many(reqs, FleetSnapshot.from_node_infos(fleet, performance=perf))
    again = Scheduler().place_many(reqs, FleetSnapshot.from_node_infos(shuffled, performance=perf))
    assert describe(first) == describe(again)


@SETTINGS
@given(fleet=fleets, reqs=requests)
def test_adapter_and_batched_path_agree(fleet, reqs):
    as_dict = {n.id: n for n in fleet}
    one_by_one = [Scheduler().place(req, as_dict) for req in reqs]
    batched = Scheduler().place_many(reqs, FleetSnapshot.from_node_infos(fleet))
    assert describe(one_by_one) == describe(batched)


@SETTINGS
@given(fleet=fleets, reqs=requests, perf=performance)
def test_scores_are_normalised(fleet, reqs, perf):
    snap = FleetSnapshot.from_node_infos(fleet, performance=perf)
    plan = Scheduler().plan(snap)
    everyone = np.arange(snap.size)
    for req in reqs:
        shape = RequestShape.resolve(snap, req)
        for scorer in SCORERS.values():
            scores = scorer.score(req, shape, plan, everyone, None)
            assert scores.shape == (snap.size,)
            assert np.all((scores >= 0) & (scores <= 100)), scorer.name
        plan.place(req)


@SETTINGS
@given(fleet=fleets, reqs=requests)
def test_unreserving_everything_restores_the_snapshot(fleet, reqs):
    snap = FleetSnapshot.from_node_infos(fleet)
    plan = Scheduler().plan(snap)
    plan.place_many(reqs)
    for replica_id in list(plan.reservations):
        plan.unreserve(replica_id)
    assert plan.slots_used.tolist() == snap.slots_used.tolist()
    assert plan.memory_free.tolist() == snap.memory_free.tolist()
    for dep in ("d0", "d1", "d2"):
        counts = plan.deployment_counts(dep)
        initial = np.zeros(snap.size, np.int32)
        if dep in snap.per_deployment:
            idx, cnt = snap.per_deployment[dep]
            initial[idx] = cnt
        assert (np.zeros(snap.size, np.int32) if counts is None else counts).tolist() == initial.tolist()
