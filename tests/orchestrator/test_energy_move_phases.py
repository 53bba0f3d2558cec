"""Energy moves in the reconciler, step by step: a real SQLite store and the real scheduler, node
messages fed to the fleet view by hand (no broker), so every phase of a move is observed exactly.

Two simulated fpga-pynq boards: ``n1`` with the PYNQ-Z2's power, ``n2`` drawing less (its figures
set per test). The deployment's replica starts on n1 (n2 cordoned); both nodes have profiled the
model; n2 is uncordoned and the reconciler decides.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from trust_stubs import Affirmed

from accelerators.fpga_pynq import FpgaPynqBackend, FpgaPynqConfig
from accelerators.tflite_model import inspect_tflite
from edgeward.v1 import api_pb2, node_pb2
from edgeward.wire import SCHEMA_VERSION, now_ms
from orchestrator.config import OrchestratorConfig
from orchestrator.fleet import Fleet, model_key, model_work_pb
from orchestrator.manifest import parse_manifest
from orchestrator.phases import Phase
from orchestrator.reconciler import ENERGY, ENERGY_ABANDONED, ENERGY_REPLACING, Reconciler
from orchestrator.scheduler import Scheduler
from orchestrator.store import ModelRecord, SealedArtifact, SqlStore
from usecases import model_path

MODEL = model_path("industrial", "int8")
KEY = model_key("vib-cnn", "1.0.0")
KIND = "fpga-pynq"
MANIFEST = (
    "apiVersion: edgeward/v1\nkind: Deployment\nmetadata: {name: vib}\n"
    "spec:\n  model: {name: vib-cnn, version: 1.0.0}\n  replicas: 1\n"
    "  requirements: {maxLatencyMs: 50}\n"
)


class Board:
    """One simulated node: its hello (accelerator, cost model, profiles) and its statuses."""

    def __init__(self, node_id: str, idle_w: float, active_w: float) -> None:
        self.id = node_id
        self.backend = FpgaPynqBackend(
            FpgaPynqConfig(mode="simulated", power={"idle_w": idle_w, "active_w": active_w})
        )
        self.profiles: list[node_pb2.ModelProfile] = []
        self.reports: dict[str, int] = {}  # replica id -> phase
        self.seq = 0

    def profile(self) -> float:
        """Profile the model here (the simulated board's modelled figures); its joules per inference."""
        from accelerators.base import ModelArtifact

        p = self.backend.profile(ModelArtifact.from_bytes("vib-cnn", "1.0.0", MODEL.read_bytes()), 3)
        self.profiles = [
            node_pb2.ModelProfile(
                model_name="vib-cnn",
                model_version="1.0.0",
                accelerator=KIND,
                runs=p.runs,
                latency_p50_ms=p.p50_ms,
                latency_p95_ms=p.p95_ms,
                energy_j=p.joules_per_inference,
                energy_source=node_pb2.ENERGY_SOURCE_MODELLED,
            )
        ]
        return p.joules_per_inference

    def hello(self) -> node_pb2.NodeMessage:
        caps = self.backend.capabilities
        assert caps.cost is not None
        acc = node_pb2.Accelerator(
            kind=KIND,
            device=caps.device,
            simulated=True,
            dtypes=sorted(caps.dtypes),
            peak_gops=caps.peak_gops,
            idle_w=caps.power.idle_w,
            active_w=caps.power.active_w,
            cost=node_pb2.CostModel(
                invoke_overhead_s=caps.cost.invoke_overhead_s,
                macs_per_s=caps.cost.macs_per_s,
                elements_per_s=caps.cost.elements_per_s,
                layer_overhead_s=caps.cost.layer_overhead_s,
                link_bytes_per_s=caps.cost.link_bytes_per_s,
                weight_cache_bytes=caps.cost.weight_cache_bytes,
            ),
        )
        hello = node_pb2.Hello(
            hardware_profile=f"board-{self.id}",
            accelerators=[acc],
            max_replicas=8,
            boot_unix_ms=1,
            inference_endpoint="127.0.0.1:1",
            profiles=self.profiles,
            labels={"zone": self.id},
        )
        return node_pb2.NodeMessage(
            schema=SCHEMA_VERSION, node_id=self.id, sent_unix_ms=now_ms(), hello=hello
        )

    def status(self) -> node_pb2.NodeMessage:
        self.seq += 1
        status = node_pb2.Status(
            state=node_pb2.NODE_STATE_ONLINE,
            status_seq=self.seq,
            epoch=1,
            replicas=[
                node_pb2.ReplicaReport(replica_id=rid, deployment="vib", phase=phase, accelerator=KIND)
                for rid, phase in self.reports.items()
            ],
        )
        return node_pb2.NodeMessage(
            schema=SCHEMA_VERSION, node_id=self.id, sent_unix_ms=now_ms(), status=status
        )


class World:
    """The reconciler with its store, fleet view, the commands it sent and the events it raised."""

    def __init__(
        self, store: SqlStore, tmp_path: Path, rescheduling: dict, cheap: tuple[float, float]
    ) -> None:
        self.store = store
        self.fleet = Fleet()
        self.sent: list[node_pb2.Command] = []
        self.events: list[tuple[str, str, dict]] = []
        self.boards = {"n1": Board("n1", 2.0, 3.0), "n2": Board("n2", *cheap)}

        async def db(fn, *args):
            return fn(*args)

        async def publish(node_id: str, cmd: node_pb2.Command) -> None:
            self.sent.append(cmd)

        world = self

        class Events:
            def publish(
                self, kind: str, subject: str, message: str, severity: int = 0, **attributes: object
            ) -> None:
                world.events.append((kind, message, attributes))

        config = OrchestratorConfig(
            state_dir=tmp_path / "orch",
            scheduler={"rescheduling": {"energy_sustain_s": 0, **rescheduling}},
        )
        self.rec = Reconciler(
            store,
            db,
            self.fleet,
            Scheduler(),
            publish,
            config,
            artifact_endpoint=lambda: "127.0.0.1:1",
            on_change=lambda _: None,
            trust=Affirmed(),
            events=Events(),
        )

    def report(self, node_id: str, replica_id: str, phase: int | None) -> None:
        board = self.boards[node_id]
        if phase is None:
            board.reports.pop(replica_id, None)
        else:
            board.reports[replica_id] = phase
        self.fleet.apply(board.status())

    def announce(self) -> None:
        for board in self.boards.values():
            self.fleet.apply(board.hello())
            self.fleet.apply(board.status())

    def replicas(self) -> dict[str, tuple[str | None, Phase, str]]:
        return {r.id: (r.node_id, r.phase, r.reason) for r in self.store.list_replicas("vib")}

    async def passes(self, count: int = 1) -> None:
        for _ in range(count):
            self.rec._energy_checked = float("-inf")  # no minimum interval between looks here
            await self.rec.reconcile_once()

    def deploys(self, node_id: str) -> list[str]:
        return [
            c.deploy.replica_id
            for c in self.sent
            if c.node_id == node_id and c.WhichOneof("body") == "deploy"
        ]

    def undeploys(self, node_id: str) -> list[str]:
        return [
            c.undeploy.replica_id
            for c in self.sent
            if c.node_id == node_id and c.WhichOneof("body") == "undeploy"
        ]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqlStore]:
    store = SqlStore(tmp_path / "orch")
    data = MODEL.read_bytes()
    work = inspect_tflite(data).work
    assert work is not None
    info = api_pb2.Model(
        name="vib-cnn",
        version="1.0.0",
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
        dtypes=["INT8"],
        work=model_work_pb(work),
    )
    blob = b"sealed"
    sealed = SealedArtifact(hashlib.sha256(blob).hexdigest(), len(blob), b"k" * 32)
    store.put_model(
        ModelRecord("vib-cnn", "1.0.0", info.sha256, len(data), info.SerializeToString(), 1), blob, sealed
    )
    store.put_deployment(parse_manifest(MANIFEST), 1)
    yield store
    store.close()


async def running_on_n1(world: World) -> str:
    """Place the replica with n2 cordoned, let it run on n1, let both nodes profile the model,
    uncordon n2; the replica's id."""
    world.rec.set_cordoned({"n2"})
    world.announce()
    await world.passes()
    [(rid, (node, phase, _))] = world.replicas().items()
    assert (node, phase) == ("n1", Phase.DISPATCHED)
    world.report("n1", rid, node_pb2.REPLICA_PHASE_RUNNING)
    await world.passes()
    assert world.replicas()[rid][1] == Phase.RUNNING
    for board in world.boards.values():
        board.profile()
    world.announce()
    world.rec.set_cordoned(())
    return rid


async def test_a_large_measured_saving_moves_the_replica_make_before_break(store, tmp_path) -> None:
    world = World(store, tmp_path, {}, cheap=(0.2, 1.2))
    old = await running_on_n1(world)
    await world.passes()
    [new] = [rid for rid in world.replicas() if rid != old]
    replicas = world.replicas()
    assert replicas[new] == ("n2", Phase.DISPATCHED, ENERGY)
    assert replicas[old] == ("n1", Phase.RUNNING, ENERGY_REPLACING)  # still serving
    assert world.deploys("n2") == [new] and world.undeploys("n1") == []
    [replacement] = [r for r in store.list_replicas("vib") if r.id == new]
    assert replacement.message.startswith("moved from n1/fpga-pynq (0.451 mJ per inference, own profile): ")
    assert "here (own profile), 67 % less" in replacement.message

    world.report("n2", new, node_pb2.REPLICA_PHASE_LOADING)
    await world.passes(2)
    assert world.replicas()[old][1] == Phase.RUNNING and world.undeploys("n1") == []

    world.report("n2", new, node_pb2.REPLICA_PHASE_RUNNING)
    await world.passes()
    replicas = world.replicas()
    assert replicas[new] == ("n2", Phase.RUNNING, ENERGY)
    assert replicas[old] == ("n1", Phase.EVICTED, ENERGY)
    assert world.undeploys("n1") == [old]
    [(kind, message, attributes)] = world.events
    assert (
        kind == ENERGY and attributes["source"] == "n1/fpga-pynq" and attributes["target"] == "n2/fpga-pynq"
    )
    assert f"replica {old} moved to n2/fpga-pynq as {new}" in message

    world.report("n1", old, None)  # n1 unloaded it
    await world.passes(3)  # settled: it stays where it is (a move back would cost more)
    assert set(world.replicas()) == {new} and len(world.events) == 1


async def test_a_failed_replacement_is_given_up_and_the_replica_stays(store, tmp_path) -> None:
    world = World(store, tmp_path, {"cooldown_s": 3600}, cheap=(0.2, 1.2))
    old = await running_on_n1(world)
    await world.passes()
    [new] = [rid for rid in world.replicas() if rid != old]
    world.report("n2", new, node_pb2.REPLICA_PHASE_FAILED)
    await world.passes()
    replicas = world.replicas()
    assert replicas[old] == ("n1", Phase.RUNNING, ENERGY_ABANDONED)
    assert replicas[new][1:] == (Phase.EVICTED, ENERGY_ABANDONED)
    assert [kind for kind, _, _ in world.events] == [ENERGY_ABANDONED]
    assert world.undeploys("n1") == []


@pytest.mark.parametrize(
    ("cheap", "rescheduling", "why"),
    [
        ((1.8, 2.8), {}, "7 % saved is under energy_min_saving (hysteresis)"),
        ((0.2, 1.2), {"max_unavailable": 0}, "no disruption budget"),
        ((0.2, 1.2), {"max_moves_per_minute": 0}, "no voluntary moves per minute"),
        ((0.2, 1.2), {"energy": False}, "energy moves off"),
        ((0.2, 1.2), {"energy_min_saving": 0.7}, "67 % saved is under energy_min_saving"),
    ],
)
async def test_no_move_without_a_large_saving_or_a_budget(store, tmp_path, cheap, rescheduling, why) -> None:
    world = World(store, tmp_path, rescheduling, cheap=cheap)
    old = await running_on_n1(world)
    await world.passes(3)
    assert world.replicas() == {old: ("n1", Phase.RUNNING, "scheduler.bound")}, why
    assert world.events == [] and world.deploys("n2") == []


async def test_a_cost_model_prediction_alone_moves_nothing(store, tmp_path) -> None:
    """n2 is predicted (cost model) to save 67 %, but has not profiled the model: no move."""
    world = World(store, tmp_path, {}, cheap=(0.2, 1.2))
    old = await running_on_n1(world)
    world.boards["n2"].profiles = []
    world.announce()
    await world.passes(3)
    assert world.replicas() == {old: ("n1", Phase.RUNNING, "scheduler.bound")}
