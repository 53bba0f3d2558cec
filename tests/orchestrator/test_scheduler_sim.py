"""The simulator on a small synthetic fleet: deterministic, and the policies compare as they should.

Only the placement outcomes are asserted; timings are for bench/, never for tests.
"""

import pytest

from orchestrator.scheduler import FleetSnapshot, Placement, Scheduler
from orchestrator.scheduler.sim import run
from orchestrator.scheduler.synthetic import MODELS, classes_from_catalog, fleet, performance_table, workload


def test_energy_aware_beats_round_robin_on_energy_and_slo():
    report = run(nodes=300, replicas=600, seed=3)
    energy, rr = report.result("energy-aware"), report.result("round-robin")
    assert energy.placed == rr.placed == 600
    assert energy.joules_per_inference <= 0.7 * rr.joules_per_inference
    assert energy.slo_attainment >= rr.slo_attainment
    table = report.table()
    assert "energy-aware" in table
    assert "round-robin" in table
    assert "mJ/inference" in table


def test_synthetic_fleet_and_workload_are_deterministic():
    a, b = fleet(200, seed=7), fleet(200, seed=7)
    assert a.nodes == b.nodes
    assert a.slowdown.tolist() == b.slowdown.tolist()
    assert workload(300, 7, a.zones) == workload(300, 7, b.zones)
    assert fleet(200, seed=8).nodes != a.nodes
    assert {n.hardware_profile for n in a.nodes} == {"x86-microserver", "arm-sbc", "fpga-board", "asic-board"}


def test_every_model_has_a_home():
    table = performance_table()
    for model in MODELS:
        assert any(pred.latency_ms <= model.slo_ms for (_, _, m), pred in table.items() if m == model.name)


def test_placements_on_the_synthetic_fleet_are_feasible_and_repeatable():
    synthetic = fleet(200, seed=1)
    reqs = workload(400, 1, synthetic.zones)
    snap = FleetSnapshot.from_node_infos(synthetic.nodes, performance=performance_table())
    first = Scheduler().place_many(reqs, snap)
    assert first == Scheduler().place_many(reqs, snap)
    by_id = {n.id: n for n in synthetic.nodes}
    for req, result in zip(reqs, first, strict=True):
        if isinstance(result, Placement):
            n = by_id[result.node_id]
            assert n.online
            assert not n.cordoned
            assert req.dtypes <= n.accelerators[result.accelerator]


def test_fleet_from_the_hardware_catalog():
    profiles = pytest.importorskip("accelerators.profiles")
    catalog = profiles.load_catalog()
    classes = classes_from_catalog(catalog)
    assert {c.name for c in classes} <= set(catalog.profiles)
    assert classes
    report = run(nodes=300, replicas=600, seed=2, classes=classes)
    energy, rr = report.result("energy-aware"), report.result("round-robin")
    assert energy.joules_per_inference < rr.joules_per_inference
    assert energy.slo_attainment >= rr.slo_attainment
