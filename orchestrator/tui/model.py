"""What the console knows about the fleet, and the events it derives from changes.

:class:`ConsoleState` is plain data fed by the gRPC watch streams and list calls; every ``apply_*``
method returns the :class:`ConsoleEvent` list that the change explains (a replica going
Pending with its reason id, a node going offline, a deployment deleted). The screens only read
it, so this module holds every rule about what an operator is shown and has no Textual in it.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from edgeward.v1 import api_pb2, node_pb2

MAX_EVENTS = 1000
HISTORY = 120  # points per node and metric kept for the sparklines


class Severity(enum.IntEnum):
    INFO = 1
    WARNING = 2
    ERROR = 3

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class ConsoleEvent:
    """One line of the Events screen: ``id`` is ``component.sub.event`` like everywhere else."""

    seq: int  # counts events since the console started; the key of its row
    at: datetime
    severity: Severity
    id: str
    subject: str
    message: str

    def matches(self, text: str) -> bool:
        """Case-insensitive substring filter over every column, plus ``sev>=warning`` style."""
        text = text.strip().lower()
        if not text:
            return True
        words = []
        for word in text.split():
            if word in ("warning", "warnings", "alerts", "alert") and self.severity < Severity.WARNING:
                return False
            if word in ("error", "errors") and self.severity < Severity.ERROR:
                return False
            if word not in ("warning", "warnings", "alerts", "alert", "error", "errors"):
                words.append(word)
        haystack = f"{self.id} {self.subject} {self.message}".lower()
        return all(w in haystack for w in words)


def phase_name(value: int) -> str:
    return node_pb2.ReplicaPhase.Name(value).removeprefix("REPLICA_PHASE_").capitalize()


def state_name(value: int) -> str:
    return node_pb2.NodeState.Name(value).removeprefix("NODE_STATE_").lower()


def source_name(value: int) -> str:
    return "measured" if value == node_pb2.ENERGY_SOURCE_MEASURED else "modelled"


PROBLEM_PHASES = (node_pb2.REPLICA_PHASE_PENDING, node_pb2.REPLICA_PHASE_FAILED)
PHASE_ORDER = [
    node_pb2.REPLICA_PHASE_RUNNING,
    node_pb2.REPLICA_PHASE_LOADING,
    node_pb2.REPLICA_PHASE_DISPATCHED,
    node_pb2.REPLICA_PHASE_PENDING,
    node_pb2.REPLICA_PHASE_FAILED,
    node_pb2.REPLICA_PHASE_EVICTED,
]


def live_replicas(dep: api_pb2.Deployment) -> list[api_pb2.Replica]:
    """Replicas that still count (evicted ones are history), by node then id, so views are stable."""
    reps = [r for r in dep.status.replica_list if r.phase != node_pb2.REPLICA_PHASE_EVICTED]
    return sorted(reps, key=lambda r: (r.node_id or "~", PHASE_ORDER.index(r.phase), r.id))


def phase_counts(dep: api_pb2.Deployment) -> list[tuple[str, int]]:
    counts: dict[int, int] = {}
    for rep in live_replicas(dep):
        counts[rep.phase] = counts.get(rep.phase, 0) + 1
    return [(phase_name(p), counts[p]) for p in PHASE_ORDER if p in counts]


def pending_reasons(dep: api_pb2.Deployment) -> list[tuple[str, int]]:
    """Reason ids of replicas that are not placed or failed, with how many replicas give each."""
    counts: dict[str, int] = {}
    for rep in live_replicas(dep):
        if rep.phase in PROBLEM_PHASES and rep.reason:
            counts[rep.reason] = counts.get(rep.reason, 0) + 1
    return sorted(counts.items())


def accelerator_label(acc: node_pb2.Accelerator) -> str:
    label = acc.kind + (" (simulated)" if acc.simulated else "")
    if acc.availability not in ("", "ok"):
        label += " (unavailable)"
    return label


def model_state_name(value: int) -> str:
    """published / deprecated / revoked ("-" from an orchestrator that does not say)."""
    return api_pb2.ModelState.Name(value).removeprefix("MODEL_STATE_").lower().replace("unspecified", "-")


def rollout_state_name(value: int) -> str:
    return api_pb2.RolloutState.Name(value).removeprefix("ROLLOUT_STATE_").lower().replace("_", " ")


def has_rollout(dep: api_pb2.Deployment) -> bool:
    return dep.status.rollout.state != api_pb2.ROLLOUT_STATE_UNSPECIFIED


def rollout_in_progress(dep: api_pb2.Deployment) -> bool:
    return dep.status.rollout.state in (api_pb2.ROLLOUT_STATE_PROGRESSING, api_pb2.ROLLOUT_STATE_PAUSED)


def rollout_summary(dep: api_pb2.Deployment) -> str:
    """``canary 2/3 paused``, ``rolling done``, ``-`` when the deployment never had a rollout."""
    ro = dep.status.rollout
    if not has_rollout(dep):
        return "-"
    if ro.state == api_pb2.ROLLOUT_STATE_COMPLETED:
        return f"{ro.strategy} done"
    return f"{ro.strategy} {ro.step}/{ro.steps} {rollout_state_name(ro.state)}"


def last_gate(ro: api_pb2.RolloutStatus) -> str:
    """The last observed step's verdict and the gate behind it (``passed``, ``failed: rollout.gate.latency``)."""
    if not ro.history:
        return "not yet observed"
    step = ro.history[-1]
    return f"step {step.step} {step.verdict}" + (f" ({step.reason})" if step.reason else "")


def slo_summary(dep: api_pb2.Deployment) -> str:
    """SLO attainment as the orchestrator computes it: ``100% 3/3``; ``-`` without an SLO."""
    if dep.spec.requirements.max_latency_ms <= 0:
        return "-"
    status = dep.status
    if not status.HasField("slo_attainment"):
        return "no data"
    return f"{status.slo_attainment:.0%} {status.slo_replicas_met}/{status.slo_replicas_measured}"


@dataclass(frozen=True)
class ExitDistribution:
    """Early exits of one multi-exit model on one node, summed over request sources, cumulative
    since the node's agent started: the share of answered requests per exit, and forced exits."""

    model: str
    version: str
    requests: int
    shares: tuple[float, ...]  # per exit, of answered requests (confident exits)
    forced: float  # share stopped early by a latency budget (mitigation)
    refused: int  # refused by a rate limit, not answered
    sources: int


def exit_distributions(telemetry: node_pb2.Telemetry) -> list[ExitDistribution]:
    by_model: dict[tuple[str, str], list[node_pb2.ExitStats]] = {}
    for stats in telemetry.exits:
        by_model.setdefault((stats.model_name, stats.model_version), []).append(stats)
    out = []
    for (model, version), streams in sorted(by_model.items()):
        width = max(len(s.exits) for s in streams)
        exits = [sum(s.exits[k] for s in streams if k < len(s.exits)) for k in range(width)]
        forced = sum(s.forced for s in streams)
        requests = sum(exits) + forced
        out.append(
            ExitDistribution(
                model,
                version,
                requests,
                tuple(e / requests if requests else 0.0 for e in exits),
                forced / requests if requests else 0.0,
                sum(s.refused for s in streams),
                len(streams),
            )
        )
    return out


@dataclass
class NodeHistory:
    """Recent points of one node: power from every telemetry sample; latency and throughput from
    the per-model counters of the node's latest telemetry, one point per new sample."""

    power_w: deque[float] = field(default_factory=lambda: deque(maxlen=HISTORY))
    latency_p95_ms: deque[float] = field(default_factory=lambda: deque(maxlen=HISTORY))
    throughput: deque[float] = field(default_factory=lambda: deque(maxlen=HISTORY))
    last_sample_ms: int = 0
    first_sample_ms: int = 2**62
    _counted: tuple[float, int] | None = None  # (energy counter, inferences) last turned into a point
    _counted_ms: int = 0

    def add_sample(self, sample: api_pb2.TelemetrySample) -> None:
        if sample.unix_ms <= self.last_sample_ms:
            return
        self.last_sample_ms = sample.unix_ms
        self.first_sample_ms = min(self.first_sample_ms, sample.unix_ms)
        self.power_w.append(sample.power_w)

    def add_models(self, telemetry: node_pb2.Telemetry) -> None:
        """Turn a new telemetry message (told apart by its energy counter) into a latency and a
        throughput point."""
        inferences = sum(m.inferences for m in telemetry.models)
        key = (telemetry.energy_j, inferences)
        if self._counted == key:
            return
        at = self.last_sample_ms
        if self._counted is not None and at > self._counted_ms:
            done = max(0, inferences - self._counted[1])
            self.throughput.append(done / ((at - self._counted_ms) / 1000.0))
            self.latency_p95_ms.append(max((m.latency_p95_ms for m in telemetry.models), default=0.0))
        self._counted, self._counted_ms = key, at


class ConsoleState:
    """The fleet as the console last saw it."""

    def __init__(self, clock: Callable[[], datetime]) -> None:
        self.clock = clock
        self.nodes: dict[str, api_pb2.Node] = {}
        self.deployments: dict[str, api_pb2.Deployment] = {}
        self.models: list[api_pb2.Model] = []
        self.placements: dict[str, list[api_pb2.Placement]] = {}  # model name -> where its versions run
        self.wipes: dict[str, api_pb2.WipeStatus] = {}  # wipe id -> its latest status
        self.attestations: dict[str, Any] = {}  # node id -> edgeward.v1 NodeAttestation
        self.attestation_states: dict[str, str] = {}  # node id -> "affirming", "expired", ...
        self.history: dict[str, NodeHistory] = {}
        self.events: deque[ConsoleEvent] = deque(maxlen=MAX_EVENTS)
        self.notification_seq = 0  # the last orchestrator notification shown
        self._seq = 0

    # ------------------------------------------------------------ events

    def event(self, severity: Severity, id: str, subject: str, message: str) -> ConsoleEvent:
        self._seq += 1
        ev = ConsoleEvent(self._seq, self.clock(), severity, id, subject, message)
        self.events.append(ev)
        return ev

    def apply_notifications(self, notes: Iterable[Any]) -> list[ConsoleEvent]:
        """Orchestrator notifications (EventService) as console events, each shown once."""
        out = []
        for note in notes:
            if note.seq <= self.notification_seq:
                continue
            self.notification_seq = note.seq
            severity = Severity(min(max(note.severity, 1), 3))
            subject = note.subject.split("/", 1)[-1] if note.subject.startswith("node/") else note.subject
            out.append(self.event(severity, note.kind, subject, note.message))
        return out

    def find_event(self, seq: int) -> ConsoleEvent | None:
        if not self.events or not self.events[0].seq <= seq <= self.events[-1].seq:
            return None
        return self.events[seq - self.events[0].seq]

    @property
    def alerts(self) -> int:
        return sum(e.severity >= Severity.WARNING for e in self.events)

    # ------------------------------------------------------------ nodes

    def set_nodes(self, nodes: Iterable[api_pb2.Node], *, initial: bool = False) -> list[ConsoleEvent]:
        """Replace the node list; ``initial`` (first list after connecting) reports only problems."""
        new = {n.id: n for n in nodes}
        out: list[ConsoleEvent] = []
        for node_id, node in new.items():
            old = self.nodes.get(node_id)
            if old is None:
                if initial:
                    if node.state != node_pb2.NODE_STATE_ONLINE:
                        out.append(self.event(Severity.ERROR, "node.offline", node_id, "node is offline"))
                else:
                    out.append(
                        self.event(
                            Severity.INFO,
                            "node.joined",
                            node_id,
                            f"{node.inventory.hardware_profile or 'node'} {state_name(node.state)}",
                        )
                    )
            else:
                if old.state != node.state:
                    if node.state == node_pb2.NODE_STATE_ONLINE:
                        out.append(self.event(Severity.INFO, "node.online", node_id, "node is back online"))
                    else:
                        out.append(
                            self.event(
                                Severity.ERROR,
                                "node.offline",
                                node_id,
                                f"node is {state_name(node.state)}; its replicas will be rescheduled",
                            )
                        )
                if old.cordoned != node.cordoned:
                    out.append(
                        self.event(
                            Severity.WARNING if node.cordoned else Severity.INFO,
                            "node.cordoned" if node.cordoned else "node.uncordoned",
                            node_id,
                            "no new replicas are placed on it" if node.cordoned else "schedulable again",
                        )
                    )
            if node.HasField("telemetry"):
                self.history.setdefault(node_id, NodeHistory()).add_models(node.telemetry)
        for node_id in self.nodes.keys() - new.keys():
            out.append(self.event(Severity.WARNING, "node.removed", node_id, "node no longer listed"))
        self.nodes = dict(sorted(new.items()))
        return out

    def set_node(self, node: api_pb2.Node) -> list[ConsoleEvent]:
        return self.set_nodes([*(n for i, n in self.nodes.items() if i != node.id), node])

    def add_sample(self, sample: api_pb2.TelemetrySample) -> None:
        self.history.setdefault(sample.node_id, NodeHistory()).add_sample(sample)

    def seed_history(self, node_id: str, samples: Iterable[api_pb2.TelemetrySample]) -> None:
        """Fill a node's power history from TelemetryService.Query (what was kept before we came)."""
        history = self.history.setdefault(node_id, NodeHistory())
        older = sorted((s for s in samples if s.unix_ms < history.first_sample_ms), key=lambda s: s.unix_ms)
        if not older:
            return
        history.power_w = deque([*(s.power_w for s in older), *history.power_w], maxlen=HISTORY)
        history.first_sample_ms = older[0].unix_ms
        history.last_sample_ms = max(history.last_sample_ms, older[-1].unix_ms)

    def power(self, node: api_pb2.Node) -> tuple[float, str] | None:
        """Latest board power and whether it was measured or modelled."""
        if not node.HasField("telemetry"):
            return None
        return node.telemetry.power_w, source_name(node.telemetry.energy_source)

    # ------------------------------------------------------------ deployments

    def set_deployments(self, deployments: Iterable[api_pb2.Deployment]) -> list[ConsoleEvent]:
        """The first list after connecting: no history, but current problems are alerts."""
        self.deployments = {d.name: d for d in sorted(deployments, key=lambda d: d.name)}
        out = []
        for dep in self.deployments.values():
            for reason, count in pending_reasons(dep):
                out.append(self._replica_problem(dep, reason, count))
        return out

    def apply_deployment_event(self, ev: api_pb2.DeploymentEvent) -> list[ConsoleEvent]:
        dep = ev.deployment
        old = self.deployments.get(dep.name)
        subject = f"deployment/{dep.name}"
        if ev.type == api_pb2.WATCH_EVENT_TYPE_DELETED:
            self.deployments.pop(dep.name, None)
            return [self.event(Severity.INFO, "deployment.deleted", subject, "deleted")]
        self.deployments[dep.name] = dep
        self.deployments = dict(sorted(self.deployments.items()))
        out: list[ConsoleEvent] = []
        if old is None:
            model = f"{dep.spec.model.name}:{dep.spec.model.version}"
            out.append(
                self.event(
                    Severity.INFO, "deployment.created", subject, f"{model}, {dep.spec.replicas} replicas"
                )
            )
        elif old.generation != dep.generation:
            out.append(
                self.event(
                    Severity.INFO,
                    "deployment.updated",
                    subject,
                    f"generation {dep.generation}: {dep.spec.model.name}:{dep.spec.model.version}, "
                    f"{dep.spec.replicas} replicas",
                )
            )
        before = {r.id: r for r in old.status.replica_list} if old is not None else {}
        for rep in dep.status.replica_list:
            prev = before.get(rep.id)
            if prev is not None and prev.phase == rep.phase and prev.reason == rep.reason:
                continue
            out.extend(self._replica_change(dep, prev, rep))
        return out

    def refresh_deployments(self, deployments: Iterable[api_pb2.Deployment]) -> list[ConsoleEvent]:
        """A periodic re-read (SLO attainment and rollout progress change without a watch event):
        changes explain themselves as on the watch stream; deletions arrive there."""
        out = []
        for dep in deployments:
            out.extend(
                self.apply_deployment_event(
                    api_pb2.DeploymentEvent(type=api_pb2.WATCH_EVENT_TYPE_MODIFIED, deployment=dep)
                )
            )
        return out

    def set_rollout(self, status: api_pb2.RolloutStatus) -> None:
        """An operator's rollout action answered with the new status: show it before the next event."""
        dep = self.deployments.get(status.deployment)
        if dep is not None:
            dep.status.rollout.CopyFrom(status)

    def _replica_change(
        self, dep: api_pb2.Deployment, prev: api_pb2.Replica | None, rep: api_pb2.Replica
    ) -> list[ConsoleEvent]:
        phase = phase_name(rep.phase)
        where = f" on {rep.node_id}" if rep.node_id else ""
        subject = f"deployment/{dep.name}"
        detail = f"{rep.reason}: {rep.message}" if rep.message else rep.reason
        if rep.phase == node_pb2.REPLICA_PHASE_FAILED:
            return [self.event(Severity.ERROR, "replica.failed", subject, f"replica{where} failed: {detail}")]
        if rep.phase == node_pb2.REPLICA_PHASE_PENDING and rep.reason:
            return [self.event(Severity.WARNING, "replica.pending", subject, f"not placed: {detail}")]
        if rep.phase == node_pb2.REPLICA_PHASE_EVICTED:
            why = f" ({rep.reason})" if rep.reason else ""
            return [self.event(Severity.INFO, "replica.evicted", subject, f"replica{where} evicted{why}")]
        if prev is None and rep.phase == node_pb2.REPLICA_PHASE_PENDING:
            return []  # a new replica waiting for the scheduler's next pass says nothing yet
        return [self.event(Severity.INFO, f"replica.{phase.lower()}", subject, f"replica{where} {phase}")]

    def _replica_problem(self, dep: api_pb2.Deployment, reason: str, count: int) -> ConsoleEvent:
        reps = [r for r in live_replicas(dep) if r.reason == reason]
        failed = any(r.phase == node_pb2.REPLICA_PHASE_FAILED for r in reps)
        message = next((r.message for r in reps if r.message), "")
        what = "failed" if failed else "not placed"
        return self.event(
            Severity.ERROR if failed else Severity.WARNING,
            "replica.failed" if failed else "replica.pending",
            f"deployment/{dep.name}",
            f"{count} replica(s) {what}: {reason}" + (f": {message}" if message else ""),
        )

    # ------------------------------------------------------------ attestation

    def apply_attestation(self, view: Any, state_name: Callable[[int], str]) -> list[ConsoleEvent]:
        """A NodeAttestation from AttestationService.Watch (the module is optional, hence Any)."""
        old = self.attestations.get(view.node_id)
        self.attestations[view.node_id] = view
        name = state_name(view.state)
        self.attestation_states[view.node_id] = name
        if (
            old is not None
            and old.state == view.state
            and old.result.issued_unix_ms == view.result.issued_unix_ms
        ):
            return []
        if old is None and name in ("affirming", "enrolled"):
            return []  # the first report of a healthy node says nothing new
        severity = {
            "affirming": Severity.INFO,
            "enrolled": Severity.INFO,
            "warning": Severity.WARNING,
            "expired": Severity.WARNING,
        }.get(name, Severity.ERROR)
        reasons = ", ".join(r.id for r in view.result.reasons) or view.last_rejection
        tier = view.result.tier or "no result"
        return [
            self.event(
                severity, f"attestation.{name}", view.node_id, f"{tier}" + (f": {reasons}" if reasons else "")
            )
        ]

    def trust(self, node_id: str) -> str:
        """What the Fleet shows of a node's attestation: its tier while affirmed, else its state."""
        name = self.attestation_states.get(node_id)
        if name is None:
            return "-"
        return self.attestations[node_id].result.tier or name if name == "affirming" else name

    # ------------------------------------------------------------ models

    def deployed_on(self, model: api_pb2.Model) -> list[tuple[str, list[str]]]:
        """(deployment, nodes running it) for every deployment of this model version."""
        out = []
        for dep in self.deployments.values():
            if dep.spec.model.name != model.name or dep.spec.model.version != model.version:
                continue
            nodes = sorted(
                {
                    r.node_id
                    for r in dep.status.replica_list
                    if r.phase == node_pb2.REPLICA_PHASE_RUNNING and r.node_id
                }
            )
            out.append((dep.name, nodes))
        return out

    def placed(self, model: api_pb2.Model) -> list[api_pb2.Placement]:
        """Where this version runs (ModelService.Placements): node, replicas, since, attestation."""
        return [
            p
            for p in self.placements.get(model.name, [])
            if p.model == model.name and p.version == model.version
        ]

    def wipes_of(self, model: api_pb2.Model) -> list[api_pb2.WipeStatus]:
        return sorted(
            (w for w in self.wipes.values() if w.name == model.name and model.version in w.versions),
            key=lambda w: w.created_unix_ms,
        )
