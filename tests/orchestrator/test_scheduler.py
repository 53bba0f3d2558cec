"""Filter and score plugins, table-driven; a pending replica's explanation names the filter."""

import pytest

from orchestrator.scheduler import NodeInfo, Placement, PlacementRequest, Scheduler, Unschedulable


def node(nid, **kw):
    base = dict(id=nid, online=True, cordoned=False, labels={"zone": "a"},
                accelerators={"cpu-litert": frozenset({"FP32", "INT8"})}, max_replicas=4,
                memory_bytes=1 << 30, active_w=5.0)
    base.update(kw)
    return NodeInfo(**base)


REQ = PlacementRequest(deployment="d", accelerators=frozenset(), dtypes=frozenset({"INT8"}),
                       memory_bytes=1 << 20, selector={})


@pytest.mark.parametrize(
    ("node_kw", "req_kw", "reason"),
    [
        ({"online": False}, {}, "scheduler.filter.offline"),
        ({"cordoned": True}, {}, "scheduler.filter.cordoned"),
        ({}, {"selector": {"zone": "b"}}, "scheduler.filter.selector"),
        ({}, {"accelerators": frozenset({"fpga-pynq"})}, "scheduler.filter.accelerator"),
        ({"accelerators": {"cpu-litert": frozenset({"FP32"})}}, {}, "scheduler.filter.accelerator"),
        ({"replicas": 4}, {}, "scheduler.filter.capacity"),
        ({"memory_used": (1 << 30) - 10}, {}, "scheduler.filter.memory"),
        ({}, {"attestation_tier": "software"}, "scheduler.filter.attestation"),
        ({"attestation_tier": "software"}, {"attestation_tier": "tpm2"}, "scheduler.filter.attestation"),
    ],
)
def test_each_filter_explains_itself(node_kw, req_kw, reason):
    req = PlacementRequest(**{**REQ.__dict__, **req_kw})
    result = Scheduler().place(req, {"n1": node("n1", **node_kw)})
    assert isinstance(result, Unschedulable)
    assert result.reason == reason
    assert result.message == f"0/1 nodes are available: 1 {reason}"


def test_no_nodes():
    result = Scheduler().place(REQ, {})
    assert isinstance(result, Unschedulable)
    assert result.reason == "scheduler.no_nodes"


def test_spread_then_energy_and_snapshot_is_updated():
    nodes = {"n1": node("n1", active_w=10.0), "n2": node("n2", active_w=3.0), "n3": node("n3", online=False)}
    sched = Scheduler()
    first = sched.place(REQ, nodes)
    second = sched.place(REQ, nodes)
    assert isinstance(first, Placement) and isinstance(second, Placement)
    assert first.node_id == "n2"   # lower power wins while spread is equal
    assert second.node_id == "n1"  # then spread moves the second replica away
    assert nodes["n2"].replicas == 1 and nodes["n2"].per_deployment == {"d": 1}
    assert first.accelerator == "cpu-litert"


def test_placement_is_deterministic():
    def run():
        nodes = {f"n{i}": node(f"n{i}", active_w=float(i % 3)) for i in range(20)}
        sched = Scheduler()
        return [sched.place(REQ, nodes).node_id for _ in range(30)]

    assert run() == run()


def test_unknown_plugin_is_refused():
    with pytest.raises(ValueError, match="unknown scheduler plugins"):
        Scheduler(filters=("ready", "astrology"))
