"""Energy per inference of a live fleet, as placed and as another policy would have placed it.

``edgeward up`` reports, per node, its accelerators and its joules per inference, and for the fleet
its joules per inference against what round-robin placement would have cost on the same fleet,
with the same traffic. All of it rests on one energy table: joules per inference of each model on
each accelerator of each node, taken from the node's own profile of the model where it loaded it
(what the scheduler itself uses), else from profiling the model here on a backend of the same kind
and configuration (the same code the agents run; simulated accelerators are timing and power
models, so this is exactly their figure). A figure is ``measured`` only where the platform
measured it (RAPL on the CPU backend); everything else is ``modelled`` and labelled so.

The fleet's figure as placed weighs each (node, accelerator, model) figure by the inferences the
node served there (agents count them per accelerator, so a replica moved between two
accelerators of a node is counted where each inference ran). The comparison places every
deployment's replicas from scratch on a snapshot of the fleet built from the same table, once
per policy (energy-aware and round-robin knowing every figure; energy-aware knowing only the
cost models and the models' work, as the live scheduler at its cold start), then weighs each
deployment's joules per inference (the mean over its replicas: clients spread requests over
replicas evenly) by the inferences its model served during the run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from edgeward.v1 import api_pb2, node_pb2

from .fleet import accelerator_costs, model_key, model_work
from .scheduler import Scheduler
from .scheduler.placement import NodeInfo, Placement, PlacementRequest, Prediction
from .scheduler.snapshot import FleetSnapshot

log = logging.getLogger(__name__)

ONLINE = node_pb2.NODE_STATE_ONLINE
RUNNING = node_pb2.REPLICA_PHASE_RUNNING


@dataclass(frozen=True)
class EnergyFigure:
    """Joules per inference of one model on one accelerator of one node."""

    energy_j: float
    latency_ms: float  # p95
    source: str  # "measured" or "modelled"
    origin: str  # "node profile" (the node measured it) or "profiled for the report"


#: (node id, accelerator kind, model key) -> its figure
EnergyTable = dict[tuple[str, str, str], EnergyFigure]


def _source(value: int) -> str:
    return "measured" if value == node_pb2.ENERGY_SOURCE_MEASURED else "modelled"


def energy_table(
    nodes: Sequence[api_pb2.Node],
    artifacts: Mapping[str, bytes],
    options_for: Callable[[api_pb2.Node, str], dict[str, Any] | None],
    runs: int = 20,
) -> EnergyTable:
    """Every (node, available accelerator, model in ``artifacts``): the node's own profile, else
    a profile taken here on a backend built from ``options_for(node, kind)`` (None: unknown, left out)."""
    from accelerators import registry
    from accelerators.base import AcceleratorError, ModelArtifact

    table: EnergyTable = {}
    cache: dict[tuple[str, str], EnergyFigure | None] = {}
    for node in nodes:
        own = {(p.accelerator, model_key(p.model_name, p.model_version)): p for p in node.inventory.profiles}
        for acc in node.inventory.accelerators:
            if acc.availability not in ("", "ok"):
                continue
            for key, data in artifacts.items():
                profile = own.get((acc.kind, key))
                if profile is not None:
                    table[node.id, acc.kind, key] = EnergyFigure(
                        profile.energy_j,
                        profile.latency_p95_ms,
                        _source(profile.energy_source),
                        "node profile",
                    )
                    continue
                options = options_for(node, acc.kind)
                if options is None:
                    continue
                cached = (repr(sorted(options.items())) + acc.kind, key)
                if cached not in cache:
                    try:
                        with registry.create(acc.kind, options) as backend:
                            name, _, version = key.partition(":")
                            p = backend.profile(ModelArtifact.from_bytes(name, version, data), runs)
                        cache[cached] = EnergyFigure(
                            p.joules_per_inference, p.p95_ms, p.energy_source, "profiled for the report"
                        )
                    except AcceleratorError as err:  # the kind cannot run it: no figure, as on the node
                        log.info("%s cannot run %s: %s", acc.kind, key, err)
                        cache[cached] = None
                figure = cache[cached]
                if figure is not None:
                    table[node.id, acc.kind, key] = figure
    return table


#: (node id, accelerator kind, model key) -> inferences served there
Served = dict[tuple[str, str, str], int]


def served(nodes: Sequence[api_pb2.Node], deps: Sequence[api_pb2.Deployment]) -> Served:
    """Inferences each node served of each model on each accelerator, since it started (its latest
    telemetry). A model may have run on two accelerators of a node (an energy move); an agent
    that does not split its counts by accelerator has them put on the accelerator its running
    replica was bound to."""
    bound = placed_kinds(deps)
    out: Served = {}
    for n in nodes:
        for m in n.telemetry.models:
            key = model_key(m.model_name, m.model_version)
            by_kind = dict(m.inferences_by_accelerator) or (
                {bound[n.id, key]: int(m.inferences)} if (n.id, key) in bound else {}
            )
            for kind, count in by_kind.items():
                if count:
                    out[n.id, kind, key] = int(count)
    return out


def placed_kinds(deps: Sequence[api_pb2.Deployment]) -> dict[tuple[str, str], str]:
    """(node id, model key) -> the accelerator its running replica was bound to."""
    return {
        (
            rep.node_id,
            model_key(dep.spec.model.name, rep.model_version or dep.spec.model.version),
        ): rep.accelerator
        for dep in deps
        for rep in dep.status.replica_list
        if rep.phase == RUNNING and rep.accelerator
    }


def joules(table: EnergyTable, counts: Served, node_id: str | None = None) -> tuple[float, int, set[str]]:
    """(joules, inferences, energy sources) of what was served (on ``node_id`` only, if given),
    counting only the inferences the table has a figure for."""
    total_j, total, sources = 0.0, 0, set()
    for (node, kind, key), n in counts.items():
        figure = table.get((node, kind, key))
        if figure is None or (node_id is not None and node != node_id):
            continue
        total_j += n * figure.energy_j
        total += n
        sources.add(figure.source)
    return total_j, total, sources


def node_energy(node: api_pb2.Node, table: EnergyTable, counts: Served) -> dict[str, Any]:
    """One node's joules per inference over what it served (None if it served nothing known)."""
    total_j, total, sources = joules(table, counts, node.id)
    return {
        "j_per_inference": total_j / total if total else None,
        "inferences": total,
        "energy_source": "measured" if sources == {"measured"} else "modelled",
    }


def _node_info(node: api_pb2.Node, table: EnergyTable, profiled: bool) -> NodeInfo:
    """What the scheduler knows of ``node``: with ``profiled``, every figure of ``table`` for it;
    without, none (a cold start: the cost models decide)."""
    hello = node.inventory
    return NodeInfo(
        id=node.id,
        online=node.state == ONLINE,
        cordoned=node.cordoned,
        labels=dict(hello.labels),
        accelerators={
            a.kind: frozenset(a.dtypes) for a in hello.accelerators if a.availability in ("", "ok")
        },
        max_replicas=hello.max_replicas or 8,
        memory_bytes=hello.memory_bytes,
        active_w=max((a.active_w for a in hello.accelerators), default=0.0),
        attestation_tier=node.attestation_tier or "none",
        hardware_profile=hello.hardware_profile,
        nj_per_op={a.kind: a.active_w / a.peak_gops for a in hello.accelerators if a.peak_gops > 0},
        costs=accelerator_costs(hello)[0],
        profiles={
            (kind, key): Prediction(f.latency_ms, f.energy_j)
            for (node_id, kind, key), f in table.items()
            if node_id == node.id and profiled
        },
    )


def _requests(dep: api_pb2.Deployment, dtypes: Sequence[str]) -> list[PlacementRequest]:
    req = dep.spec.requirements
    return [
        PlacementRequest(
            deployment=dep.name,
            model=model_key(dep.spec.model.name, dep.spec.model.version),
            max_latency_ms=req.max_latency_ms,
            replica_id=f"{dep.name}-{i}",
            accelerators=frozenset(req.accelerators),
            dtypes=frozenset(dtypes),
            memory_bytes=req.memory_bytes,
            selector=dict(dep.spec.selector),
            attestation_tier=req.attestation_tier or "none",
        )
        for i in range(dep.spec.replicas)
    ]


#: The re-placements compared: name -> (scheduler profile, whether it knows every figure of the
#: table or only the cost models, as the live scheduler did at its cold start).
POLICIES: dict[str, tuple[str, bool]] = {
    "energy-aware": ("energy-aware", True),
    "round-robin": ("round-robin", True),
    "energy-aware-cold-start": ("energy-aware", False),
}


def compare_policies(
    nodes: Sequence[api_pb2.Node],
    deps: Sequence[api_pb2.Deployment],
    models: Mapping[str, api_pb2.Model],
    table: EnergyTable,
    counts: Served,
    policies: Mapping[str, tuple[str, bool]] = POLICIES,
) -> dict[str, dict[str, Any]]:
    """Per policy: where it places every deployment on this fleet (from scratch) and the fleet's
    joules per inference with the inferences each model served. ``models``: model key -> its
    catalog record (the dtypes it needs, its work for the cost models)."""
    by_model: dict[str, int] = {}
    for (_, _, key), n in counts.items():
        by_model[key] = by_model.get(key, 0) + n
    works = {key: w for key, m in models.items() if (w := model_work(m)) is not None}
    out: dict[str, dict[str, Any]] = {}
    for name, (profile, profiled) in policies.items():
        infos = {n.id: _node_info(n, table, profiled) for n in nodes}
        plan = Scheduler(profile).plan(FleetSnapshot.from_node_infos(infos, works=works))
        total_j = inferences = 0.0
        placements: dict[str, list[str]] = {}
        unplaced = 0
        for dep in deps:
            key = model_key(dep.spec.model.name, dep.spec.model.version)
            dtypes = list(models[key].dtypes) if key in models else []
            results = plan.place_many(_requests(dep, dtypes))
            bound = [r for r in results if isinstance(r, Placement)]
            unplaced += len(results) - len(bound)
            placements[dep.name] = [f"{r.node_id}/{r.accelerator}" for r in bound]
            figures = [table.get((r.node_id, r.accelerator, key)) for r in bound]
            known = [f.energy_j for f in figures if f is not None]
            n = by_model.get(key, 0)
            if known and n:
                total_j += n * sum(known) / len(known)
                inferences += n
        out[name] = {
            "j_per_inference": total_j / inferences if inferences else None,
            "placements": placements,
            "unplaced": unplaced,
        }
    return out
