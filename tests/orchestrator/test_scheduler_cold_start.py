"""Cold start: placing a model nothing has profiled yet, from the model's work and the accelerators'
cost models, on the heterogeneous demo fleet (`edgeward up`'s first three boards of the hardware
catalog, each accelerator built as its agent builds it)."""

from __future__ import annotations

import math

import pytest

from accelerators import registry
from accelerators.base import ModelArtifact
from accelerators.profiles import load_catalog
from accelerators.tflite_model import inspect_tflite
from orchestrator.scheduler import FleetSnapshot, NodeInfo, Placement, PlacementRequest, Prediction, Scheduler
from orchestrator.scheduler.costs import AcceleratorCost, ModelWork
from usecases import model_path

BOARDS = {"node-1": "x86-n100", "node-2": "pynq-z2", "node-3": "coral-devboard"}
SMALL_INT8 = {
    "vibration-cnn:1.0.0": model_path("industrial", "int8"),
    "occupancy-cnn:1.0.0": model_path("smart_home", "int8"),
}


def _backends(board: str) -> dict:
    """Kind -> (capabilities, backend options) of a catalog board's accelerators."""
    out = {}
    for acc in load_catalog()[board].accelerator_configs():
        with registry.create(acc["kind"], acc["options"]) as backend:
            out[acc["kind"]] = (backend.capabilities, acc["options"])
    return out


@pytest.fixture(scope="module")
def fleet() -> dict[str, dict]:
    return {node: _backends(board) for node, board in BOARDS.items()}


def _infos(fleet: dict[str, dict], **extra: dict) -> list[NodeInfo]:
    infos = []
    for node, board in BOARDS.items():
        caps = {kind: c for kind, (c, _) in fleet[node].items()}
        fields = {
            "accelerators": {kind: c.dtypes for kind, c in caps.items()},
            "nj_per_op": {kind: c.power.active_w / c.peak_gops for kind, c in caps.items()},
            "costs": {
                kind: AcceleratorCost(
                    *(getattr(c.cost, f) for f in AcceleratorCost._fields[:6]),
                    c.power.idle_w,
                    c.power.active_w,
                )
                for kind, c in caps.items()
            },
            **extra.get(node, {}),
        }
        infos.append(
            NodeInfo(
                id=node,
                online=True,
                cordoned=False,
                labels={},
                max_replicas=8,
                memory_bytes=0,
                active_w=max(c.power.active_w for c in caps.values()),
                attestation_tier="software",
                hardware_profile=board,
                **fields,
            )
        )
    return infos


def _works() -> dict[str, ModelWork]:
    works = {}
    for key, path in SMALL_INT8.items():
        work = inspect_tflite(path.read_bytes()).work
        assert work is not None
        works[key] = ModelWork(*(float(getattr(work, f)) for f in ModelWork._fields))
    return works


def _request(model: str, deployment: str = "d", selector: dict | None = None) -> PlacementRequest:
    return PlacementRequest(
        deployment=deployment,
        accelerators=frozenset(),
        dtypes=frozenset({"INT8"}),
        memory_bytes=0,
        selector=selector or {},
        attestation_tier="software",
        model=model,
        max_latency_ms=50,
    )


def _backend_energy(caps, work: ModelWork) -> float:
    """The backend's own cost model and power model: what the scheduler must reproduce."""
    from accelerators.base import ModelWork as BackendWork

    latency, busy = caps.cost.latency(BackendWork(*(int(v) for v in work)))
    return caps.power.energy_j(latency, busy)


@pytest.mark.parametrize("model", sorted(SMALL_INT8))
def test_each_board_runs_a_small_int8_model_on_its_lowest_energy_backend(fleet, model) -> None:
    works = _works()
    picked = {}
    for node in BOARDS:
        energies = {kind: _backend_energy(c, works[model]) for kind, (c, _) in fleet[node].items()}
        cheapest = min(energies, key=energies.__getitem__)
        node_plan = Scheduler().plan(
            FleetSnapshot.from_node_infos([i for i in _infos(fleet) if i.id == node], works=works)
        )
        placed = node_plan.place(_request(model))
        assert isinstance(placed, Placement)
        assert placed.accelerator == cheapest
        assert placed.basis == "cost model"
        assert math.isclose(placed.energy_j, energies[cheapest], rel_tol=1e-9)
        picked[BOARDS[node]] = placed.accelerator
    # The FPGA engine on the PYNQ-Z2 and the Edge TPU on the Coral board, not their CPUs.
    assert picked == {"x86-n100": "cpu-litert", "pynq-z2": "fpga-pynq", "coral-devboard": "asic-edgetpu"}


@pytest.mark.parametrize("model", sorted(SMALL_INT8))
def test_one_replica_goes_to_the_lowest_energy_node_and_says_why(fleet, model) -> None:
    plan = Scheduler().plan(FleetSnapshot.from_node_infos(_infos(fleet), works=_works()))
    placed = plan.place(_request(model))
    assert isinstance(placed, Placement)
    assert (placed.node_id, placed.accelerator) == ("node-3", "asic-edgetpu")
    assert placed.why().endswith(" mJ per inference (cost model)")
    assert "predicted p95 0.1" in placed.why()


@pytest.mark.parametrize("kind", ["fpga-pynq", "asic-edgetpu"])
def test_cold_start_predictions_are_the_simulated_backends_own_figures(fleet, kind) -> None:
    """For models whose weights fit on the device, the summary cost model gives what the
    simulated backend itself reports once it runs the model."""
    node = "node-2" if kind == "fpga-pynq" else "node-3"
    caps, options = fleet[node][kind]
    works = _works()
    snap = FleetSnapshot.from_node_infos(_infos(fleet), works=works)
    for model, path in SMALL_INT8.items():
        with registry.create(kind, options) as backend:
            name, _, version = model.partition(":")
            profile = backend.profile(ModelArtifact.from_bytes(name, version, path.read_bytes()), 3)
        c, k, m = snap.node_class[snap.index(node)], snap.kinds.index(kind), snap.models.index(model)
        assert math.isclose(snap.energy_j[c, k, m], profile.joules_per_inference, rel_tol=1e-3)
        assert math.isclose(snap.latency_ms[c, k, m], profile.p95_ms, rel_tol=1e-3)


def test_measurements_take_precedence_over_the_cost_model(fleet) -> None:
    """The node's own profile, else its peers', else the cost model."""
    works = _works()
    model = "vibration-cnn:1.0.0"
    # node-2 profiled the model on its CPU (faster than its cost model says): it is now its pick.
    own = {"node-2": {"profiles": {("cpu-litert", model): Prediction(0.02, 1e-5)}}}
    plan = Scheduler().plan(FleetSnapshot.from_node_infos(_infos(fleet, **own), works=works))
    placed = plan.place(_request(model))
    assert (placed.node_id, placed.accelerator, placed.basis) == ("node-2", "cpu-litert", "own profile")
    # A table of peers' figures (the reconciler's class estimates) outranks the cost model.
    table = {("coral-devboard", "asic-edgetpu", model): Prediction(0.5, 0.5)}
    snap = FleetSnapshot.from_node_infos(_infos(fleet), works=works, performance=table)
    c, k, m = (
        snap.node_class[snap.index("node-3")],
        snap.kinds.index("asic-edgetpu"),
        snap.models.index(model),
    )
    assert snap.energy_j[c, k, m] == 0.5 and snap.basis[c, k, m] == 1


def test_without_a_cost_model_or_work_the_priors_decide(fleet) -> None:
    """An older agent (no cost model) or a model the catalog could not read: the nJ/op prior."""
    model = "vibration-cnn:1.0.0"
    no_costs = {node: {"costs": {}} for node in BOARDS}
    for snap in (
        FleetSnapshot.from_node_infos(_infos(fleet, **no_costs), works=_works()),
        FleetSnapshot.from_node_infos(_infos(fleet)),
    ):
        placed = Scheduler().plan(snap).place(_request(model))
        assert isinstance(placed, Placement)
        assert math.isnan(placed.energy_j) and placed.basis == ""
        assert "nothing predicts this model here yet" in placed.why()


def test_invalid_cost_models_are_not_valid() -> None:
    good = AcceleratorCost(1e-5, 1e9, 1e9, 0.0, 0.0, 0.0, 1.0, 2.0)
    assert good.valid()
    for bad in (
        good._replace(macs_per_s=0.0),
        good._replace(invoke_overhead_s=-1.0),
        good._replace(link_bytes_per_s=math.nan),
        good._replace(elements_per_s=math.inf),
        good._replace(idle_w=3.0),
    ):
        assert not bad.valid()
