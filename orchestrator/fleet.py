"""The orchestrator's live view of the fleet, fed by the nodes' MQTT messages.

Node liveness comes from two signals: the retained ``status`` (with the broker-published last will
``OFFLINE`` when a node dies) and message recency (a node silent for ``node_timeout_s`` is lost).

What the scheduler learns of performance also lands here: the node's own model profiles and its
accelerators' cost models (from its hello) and, per model, the latency *windows* of its telemetry:
a telemetry message is a window of a model when the model served inferences since the previous
one; its p95 is the window's figure.
"""

from __future__ import annotations

import math
import time
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from edgeward.v1 import api_pb2, node_pb2
from edgeward.wire import MAX_MODEL_STATS

from .scheduler.costs import AcceleratorCost, ModelWork

#: Latency windows kept per node and model: enough for a few reconcile passes to catch up.
WINDOWS_KEPT = 8
PROFILE_INVALID = "fleet.profile.invalid"
COST_MODEL_INVALID = "fleet.cost_model.invalid"
LATENCY_INVALID = "fleet.telemetry.invalid_latency"


def model_key(name: str, version: str) -> str:
    """How the scheduler names a model version: ``name:version``."""
    return f"{name}:{version}"


def accelerator_costs(hello: node_pb2.Hello) -> tuple[dict[str, AcceleratorCost], int]:
    """(kind -> cost model of each available accelerator that advertises a valid one, how many
    advertised one that is not: non-finite or negative figures, no rate, idle over active power)."""
    costs: dict[str, AcceleratorCost] = {}
    invalid = 0
    for acc in hello.accelerators:
        if acc.availability not in ("", "ok") or not acc.HasField("cost"):
            continue
        c = acc.cost
        cost = AcceleratorCost(
            c.invoke_overhead_s,
            c.macs_per_s,
            c.elements_per_s,
            c.layer_overhead_s,
            c.link_bytes_per_s,
            float(c.weight_cache_bytes),
            acc.idle_w,
            acc.active_w,
        )
        if cost.valid():
            costs[acc.kind] = cost
        else:
            invalid += 1
    return costs, invalid


def model_work_pb(work: WorkTotals) -> api_pb2.ModelWork:
    """The catalog's record of a model's work (from ``accelerators.base.ModelWork``)."""
    return api_pb2.ModelWork(
        macs=int(work.macs),
        elements=int(work.elements),
        mac_layers=int(work.mac_layers),
        element_layers=int(work.element_layers),
        weight_bytes=int(work.weight_bytes),
        io_bytes=int(work.io_bytes),
    )


def model_work(model: api_pb2.Model) -> ModelWork | None:
    """The work of one inference of a catalog model (None: the catalog could not read it)."""
    if not model.HasField("work"):
        return None
    w = model.work
    return ModelWork(
        float(w.macs),
        float(w.elements),
        float(w.mac_layers),
        float(w.element_layers),
        float(w.weight_bytes),
        float(w.io_bytes),
    )


class WorkTotals(Protocol):
    """A model's work as the accelerators package reads it (``accelerators.base.ModelWork``)."""

    macs: int
    elements: int
    mac_layers: int
    element_layers: int
    weight_bytes: int
    io_bytes: int


@dataclass(frozen=True, slots=True)
class LatencyWindow:
    seq: int  # increases by one per window of this node and model
    p95_ms: float
    inferences: int  # the model's inference counter at the end of the window


@dataclass
class NodeView:
    id: str
    hello: node_pb2.Hello | None = None
    state: int = node_pb2.NODE_STATE_UNSPECIFIED
    last_seen: float = 0.0  # time.monotonic() of the last message
    last_seen_ms: int = 0
    reports: dict[str, node_pb2.ReplicaReport] = field(default_factory=dict)
    status_seq: int = -1
    epoch: int = 0  # Status.epoch of the newest status: the node's current broker connection
    boot_ms: int = 0
    telemetry: node_pb2.Telemetry | None = None
    #: (model key, accelerator kind) -> the node's own profile of that model
    profiles: dict[tuple[str, str], node_pb2.ModelProfile] = field(default_factory=dict)
    #: accelerator kind -> its cost model (valid ones only), for cold-start predictions
    costs: dict[str, AcceleratorCost] = field(default_factory=dict)
    #: model key -> its latest latency windows, oldest first
    latency: dict[str, deque[LatencyWindow]] = field(default_factory=dict)

    def online(self, now: float, timeout_s: float) -> bool:
        return (
            self.state == node_pb2.NODE_STATE_ONLINE
            and self.hello is not None
            and now - self.last_seen <= timeout_s
        )


class Fleet:
    """Applies node messages to :class:`NodeView` objects; reports what changed."""

    def __init__(self) -> None:
        self.nodes: dict[str, NodeView] = {}
        self.dropped: Counter[str] = Counter()  # reason id -> profiles or latencies refused
        self.windows_added = 0  # latency windows appended so far, for "anything new?"
        self.profile_updates = 0  # hellos that changed a node's profiles, for "anything new?"

    def view(self, node_id: str) -> NodeView:
        node = self.nodes.get(node_id)
        if node is None:
            node = self.nodes[node_id] = NodeView(node_id)
        return node

    def apply(self, msg: node_pb2.NodeMessage, *, retained: bool = False) -> str | None:
        """Update the view; return 'hello', 'status', 'profiles' (a hello that only brings new model
        profiles: not a reconnect) or None (nothing the reconciler must act on at once)."""
        node = self.view(msg.node_id)
        if not retained:
            node.last_seen = time.monotonic()
            node.last_seen_ms = msg.sent_unix_ms
        body = msg.WhichOneof("body")
        if body == "hello":
            rebooted = msg.hello.boot_unix_ms != node.boot_ms
            only_profiles = (
                node.hello is not None and not rebooted and _inventory(node.hello) == _inventory(msg.hello)
            )
            node.hello = msg.hello
            node.boot_ms = msg.hello.boot_unix_ms
            profiles = self._profiles(msg.hello.profiles)
            if profiles != node.profiles:
                self.profile_updates += 1
            node.profiles = profiles
            node.costs, invalid = accelerator_costs(msg.hello)
            if invalid:
                self.dropped[COST_MODEL_INVALID] += invalid
            if rebooted:  # a new order of statuses (a board without a clock may start at 1970)
                node.status_seq, node.epoch = -1, 0
                node.latency = {}
            if retained and not node.last_seen:
                node.last_seen = time.monotonic()
            return "profiles" if only_profiles else "hello"
        if body == "status":
            status = msg.status
            if status.epoch < node.epoch:
                # Of an earlier connection: e.g. the will the broker publishes when the node's new
                # connection takes over its client id, after the new connection's first statuses.
                return None
            if status.epoch > node.epoch:
                node.epoch, node.status_seq = status.epoch, -1
            elif status.epoch and status.status_seq <= node.status_seq:
                return None  # late, repeated, or after its connection's will: (epoch, seq) orders them
            if status.state == node_pb2.NODE_STATE_OFFLINE:
                node.state = status.state
                node.reports = {}
                if status.epoch:
                    node.status_seq = status.status_seq  # FINAL_STATUS_SEQ: nothing of this epoch after it
                return "status"
            if status.status_seq <= node.status_seq and status.state == node.state:
                return None  # a late or repeated status: keep the newer one
            reports = {r.replica_id: r for r in status.replicas}
            same = status.state == node.state and reports == node.reports
            node.state = status.state
            node.status_seq = status.status_seq
            node.reports = reports
            if retained and not node.last_seen:
                # A retained status read at start-up proves nothing about now; give the node one
                # timeout to speak before it is declared lost.
                node.last_seen = time.monotonic()
            # A heartbeat that repeats the node's state is liveness only: no reconcile pass for it
            # (10,000 nodes heartbeat 2,000 times a second).
            return None if same else "status"
        if body == "telemetry":
            node.telemetry = msg.telemetry
            self._windows(node, msg.telemetry.models)
            return None
        return None

    def _profiles(
        self, profiles: Iterable[node_pb2.ModelProfile]
    ) -> dict[tuple[str, str], node_pb2.ModelProfile]:
        out = {}
        for p in profiles:
            numbers = (p.latency_p50_ms, p.latency_p95_ms, p.energy_j)
            if not (p.model_name and p.accelerator and all(math.isfinite(x) and x >= 0 for x in numbers)) or (
                p.latency_p95_ms <= 0
            ):
                self.dropped[PROFILE_INVALID] += 1
                continue
            out[(model_key(p.model_name, p.model_version), p.accelerator)] = p
        return out

    def _windows(self, node: NodeView, models: Iterable[node_pb2.ModelStats]) -> None:
        for stats in models:
            key = model_key(stats.model_name, stats.model_version)
            windows = node.latency.get(key)
            last = windows[-1] if windows else None
            if last is not None and stats.inferences == last.inferences:
                continue  # nothing served since the previous window
            if not (math.isfinite(stats.latency_p95_ms) and stats.latency_p95_ms >= 0):
                self.dropped[LATENCY_INVALID] += 1
                continue
            if not stats.inferences:
                continue
            if windows is None:
                if len(node.latency) >= MAX_MODEL_STATS:  # names a node made up, one report after the other
                    del node.latency[next(iter(node.latency))]  # its oldest model goes
                windows = node.latency[key] = deque(maxlen=WINDOWS_KEPT)
            windows.append(LatencyWindow(last.seq + 1 if last else 1, stats.latency_p95_ms, stats.inferences))
            self.windows_added += 1


def _inventory(hello: node_pb2.Hello) -> bytes:
    """The hello without its profiles, for telling a profile update from a reconnect."""
    copy = node_pb2.Hello()
    copy.CopyFrom(hello)
    del copy.profiles[:]
    return copy.SerializeToString(deterministic=True)
