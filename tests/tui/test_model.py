"""What the console derives from changes: events with their reason ids, filters, sparkline points."""

from __future__ import annotations

from datetime import datetime

from edgeward.v1 import api_pb2, node_pb2
from orchestrator.tui.model import (
    ConsoleState,
    Severity,
    exit_distributions,
    last_gate,
    rollout_summary,
    slo_summary,
)
from orchestrator.tui.views import expiry

T0 = datetime(2026, 1, 1, 9, 30)
P = node_pb2


def deployment(name: str, generation: int, *replicas: tuple[str, str, int, str, str]) -> api_pb2.Deployment:
    dep = api_pb2.Deployment(name=name, generation=generation)
    dep.spec.model.name, dep.spec.model.version, dep.spec.replicas = "m", "1.0.0", len(replicas)
    for rid, node, phase, reason, message in replicas:
        dep.status.replica_list.add(id=rid, node_id=node, phase=phase, reason=reason, message=message)
    return dep


def event(kind: int, dep: api_pb2.Deployment) -> api_pb2.DeploymentEvent:
    return api_pb2.DeploymentEvent(type=kind, deployment=dep)


def test_replica_changes_become_events_with_their_reason_ids():
    state = ConsoleState(lambda: T0)
    added = api_pb2.WATCH_EVENT_TYPE_ADDED
    modified = api_pb2.WATCH_EVENT_TYPE_MODIFIED
    out = state.apply_deployment_event(
        event(added, deployment("vib", 1, ("r1", "", P.REPLICA_PHASE_PENDING, "", "")))
    )
    assert [(e.id, e.severity) for e in out] == [("deployment.created", Severity.INFO)]

    pending = ("r1", "", P.REPLICA_PHASE_PENDING, "scheduler.filter.selector", "0/2 nodes are available")
    out = state.apply_deployment_event(event(modified, deployment("vib", 1, pending)))
    assert [(e.id, e.severity, e.message) for e in out] == [
        (
            "replica.pending",
            Severity.WARNING,
            "not placed: scheduler.filter.selector: 0/2 nodes are available",
        )
    ]
    assert state.apply_deployment_event(event(modified, deployment("vib", 1, pending))) == [], "no change"

    running = ("r1", "n1", P.REPLICA_PHASE_RUNNING, "", "")
    out = state.apply_deployment_event(event(modified, deployment("vib", 2, running)))
    assert [e.id for e in out] == ["deployment.updated", "replica.running"]
    failed = ("r1", "n1", P.REPLICA_PHASE_FAILED, "agent.model.load_failed", "")
    out = state.apply_deployment_event(event(modified, deployment("vib", 2, failed)))
    assert [(e.id, e.severity) for e in out] == [("replica.failed", Severity.ERROR)]
    out = state.apply_deployment_event(event(api_pb2.WATCH_EVENT_TYPE_DELETED, deployment("vib", 2)))
    assert [e.id for e in out] == ["deployment.deleted"] and not state.deployments
    assert [e.seq for e in state.events] == list(range(1, 7))


def test_first_list_reports_current_problems_only():
    state = ConsoleState(lambda: T0)
    ok = deployment("a", 1, ("r1", "n1", P.REPLICA_PHASE_RUNNING, "", ""))
    stuck = deployment(
        "b",
        1,
        ("r2", "", P.REPLICA_PHASE_PENDING, "scheduler.filter.capacity", ""),
        ("r3", "", P.REPLICA_PHASE_PENDING, "scheduler.filter.capacity", ""),
    )
    out = state.set_deployments([stuck, ok])
    assert [(e.id, e.subject, e.message) for e in out] == [
        ("replica.pending", "deployment/b", "2 replica(s) not placed: scheduler.filter.capacity")
    ]
    online = api_pb2.Node(id="n1", state=P.NODE_STATE_ONLINE)
    offline = api_pb2.Node(id="n2", state=P.NODE_STATE_OFFLINE)
    assert [e.id for e in state.set_nodes([online, offline], initial=True)] == ["node.offline"]
    cordoned = api_pb2.Node(id="n1", state=P.NODE_STATE_OFFLINE, cordoned=True)
    assert [e.id for e in state.set_nodes([cordoned, offline])] == ["node.offline", "node.cordoned"]
    assert state.alerts == 4


def test_filter_words_and_alerts():
    state = ConsoleState(lambda: T0)
    info = state.event(Severity.INFO, "node.online", "n1", "node is back online")
    warn = state.event(Severity.WARNING, "replica.pending", "deployment/vib", "scheduler.filter.selector")
    assert info.matches("") and info.matches("N1 online") and not info.matches("n1 offline")
    assert not info.matches("alerts") and warn.matches("alerts selector") and not warn.matches("errors")


def test_sparkline_points_from_telemetry():
    state = ConsoleState(lambda: T0)
    for ms, watts in ((1000, 2.0), (2000, 2.5), (2000, 9.9), (3000, 3.0)):  # a repeated sample is ignored
        state.add_sample(api_pb2.TelemetrySample(node_id="n1", unix_ms=ms, power_w=watts))
    history = state.history["n1"]
    assert list(history.power_w) == [2.0, 2.5, 3.0]
    state.seed_history(
        "n1", [api_pb2.TelemetrySample(node_id="n1", unix_ms=ms, power_w=1.0) for ms in (0, 500, 1000)]
    )
    assert list(history.power_w) == [1.0, 1.0, 2.0, 2.5, 3.0], (
        "only points older than the live ones are added"
    )

    def telemetry(energy: float, inferences: int, p95: float) -> node_pb2.Telemetry:
        return node_pb2.Telemetry(
            energy_j=energy, models=[node_pb2.ModelStats(inferences=inferences, latency_p95_ms=p95)]
        )

    history.add_models(telemetry(10.0, 100, 4.0))  # the first message only sets the baseline
    state.add_sample(api_pb2.TelemetrySample(node_id="n1", unix_ms=5000, power_w=3.0))
    history.add_models(telemetry(12.0, 300, 5.0))
    history.add_models(telemetry(12.0, 300, 5.0))  # the same message again: no point
    assert list(history.throughput) == [100.0] and list(history.latency_p95_ms) == [5.0]


def test_expiry_is_relative_to_the_console_clock():
    now = T0.timestamp() * 1000
    assert expiry(int(now + 90_000), T0) == "in 1m30s"
    assert expiry(int(now + 7_260_000), T0) == "in 2h01m"
    assert expiry(int(now - 5_000), T0) == "expired 0m05s ago"
    assert expiry(0, T0) == "-"


def test_exit_distribution_sums_sources_per_model():
    telemetry = node_pb2.Telemetry()
    telemetry.exits.add(
        model_name="sign", model_version="1.0.0", source="cam-1", requests=10, exits=[6, 3, 1]
    )
    telemetry.exits.add(
        model_name="sign",
        model_version="1.0.0",
        source="cam-2",
        requests=10,
        exits=[2, 2, 4],
        forced=2,
        refused=5,
    )
    [dist] = exit_distributions(telemetry)
    assert (dist.model, dist.requests, dist.sources, dist.refused) == ("sign", 20, 2, 5)
    assert dist.shares == (8 / 20, 5 / 20, 5 / 20)
    assert dist.forced == 2 / 20
    assert sum(dist.shares) + dist.forced == 1.0
    assert exit_distributions(node_pb2.Telemetry()) == []


def test_slo_and_rollout_summaries_say_what_the_orchestrator_reported():
    dep = api_pb2.Deployment(name="vib")
    assert (slo_summary(dep), rollout_summary(dep)) == ("-", "-")  # no SLO, never rolled out
    dep.spec.requirements.max_latency_ms = 50
    assert slo_summary(dep) == "no data"  # no running replica has reported a p95 yet
    dep.status.slo_attainment, dep.status.slo_replicas_met, dep.status.slo_replicas_measured = 2 / 3, 2, 3
    assert slo_summary(dep) == "67% 2/3"
    ro = dep.status.rollout
    ro.state, ro.strategy, ro.step, ro.steps = api_pb2.ROLLOUT_STATE_PAUSED, "canary", 2, 3
    assert rollout_summary(dep) == "canary 2/3 paused"
    assert last_gate(ro) == "not yet observed"
    ro.history.add(step=1, verdict="passed")
    ro.history.add(step=2, verdict="paused", reason="rollout.gate.no_data")
    assert last_gate(ro) == "step 2 paused (rollout.gate.no_data)"
    ro.state = api_pb2.ROLLOUT_STATE_COMPLETED
    assert rollout_summary(dep) == "canary done"
