"""Drives the actual state of the fleet towards the desired state in the store.

One pass reads the deployments and replicas, compares them with what the nodes report, and
produces a list of replica changes (committed in one transaction) plus the commands to send
(published only after the commit, so a crash can lose a command but never a decision; lost
commands are re-sent, and a node that reconnects gets its whole desired set).

Every decision carries a reason id (``node.lost``, ``replica.failed``, ``scheduler.filter.*``...),
stored on the replica and shown by the CLI as it is.

Attestation gates every step (the ``trust`` seam, :class:`orchestrator.verifier.FleetVerifier`):
a replica is placed only on a node whose attestation tier meets its deployment's (at least
``software``: every model is locked, and its key is released to affirming nodes only), its deploy
command carries the model's data key wrapped to that node, and a replica on a node that lost its
trust is evicted (reason ``attestation.*``) and placed elsewhere in the same pass.

Performance feeds placement: each node's own model profiles (from its hello) are its predictions,
and the median of the profiles of a hardware profile's nodes is the prediction for its other nodes;
every telemetry window corrects the node's ``latency_scale`` (observed p95 / predicted). A running
replica whose p95 stays over its deployment's SLO (``scheduler.rescheduling``: N consecutive windows
over, cleared only under the recovery threshold) moves to a node predicted to meet it, within the
deployment's disruption budget and a global rate; both its eviction and its replacement carry the
reason ``reschedule.slo_violation`` and say what was measured.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import math
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from attestation.errors import KeyReleaseError
from edgeward.security.authz import MODEL, team_of
from edgeward.v1 import api_pb2, node_pb2
from edgeward.wire import SCHEMA_VERSION, now_ms

from .config import OrchestratorConfig
from .errors import NotFound
from .fleet import Fleet, LatencyWindow, NodeView, model_key, model_work
from .phases import ACTIVE, TRANSITIONS, Phase
from .scheduler import (
    TIERS,
    FleetSnapshot,
    NodeInfo,
    Placement,
    PlacementPlan,
    PlacementRequest,
    Prediction,
    Scheduler,
    Unschedulable,
)
from .scheduler.correction import LatencyCorrection
from .scheduler.energy import EnergyOffer, EnergyWatch, RunningReplica, energy_offers
from .scheduler.rescheduling import (
    MoveCandidate,
    MoveCause,
    MoveRate,
    SloState,
    allowed_disruptions,
    observe_window,
    record_move,
    select_moves,
    sustained_violation,
)
from .scheduler.snapshot import LATENCY_FLOOR_MS, class_estimates
from .store import DeploymentRecord, ReplicaChange, ReplicaRecord, SealedArtifact, Store

if TYPE_CHECKING:
    from .rollout import RolloutController

log = logging.getLogger(__name__)

FAILED_RETENTION_MS = 5_000
#: Commands of one pass awaiting their PUBACK at once (below the session's bound on queued QoS 1).
PUBLISH_WINDOW = 1_000
#: Longest a pass binds replicas before it yields to the event loop (ingest runs in between): time,
#: not a count, so a pass keeps a share of a busy loop. At 10,000 nodes (bench/fleet_scale.py, one
#: run each) the last of 10,000 replicas was dispatched 35 s after the first with a yield every 256
#: replicas (about 0.1 s of binding), 29 s with this; the binding alone takes 4.6 s.
PLACE_SLICE_S = 0.5
# A pass that binds many replicas saves and starts sending every this many bindings (at most
# PUBLISH_WINDOW, so one slice's publishes all start before the next slice's): the first nodes load
# while the rest are bound, instead of every node waiting for the whole pass.
COMMIT_SLICE = 1000
# While a pass binds, it follows the reports of the replicas it has dispatched at most this often
# (at its yields): a pass that binds 10,000 replicas for tens of seconds does not hold back the
# first ones' Running until it ends.
FOLLOW_BOUND_S = 1.0
# More replicas than this that a node reports and no deployment has: it is sent its full set (one
# command) instead of an undeploy for each (a status may name 1,024 made-up ids).
MAX_ORPHAN_UNDEPLOYS = 16
# The n-th resend of a replica's command waits resend_interval_s x RESEND_BACKOFF[n] after the
# previous send: a node that is slow to report (a loaded fleet, a broker behind) is not sent the
# same command, each with its key released again, every few seconds while it works through them.
RESEND_BACKOFF = (1, 2, 4)
# Phase changes logged one line each (the others are counted per save).
_NEWS = frozenset({Phase.FAILED, Phase.EVICTED})
_REPORTED_PHASE = {
    node_pb2.REPLICA_PHASE_LOADING: Phase.LOADING,
    node_pb2.REPLICA_PHASE_RUNNING: Phase.RUNNING,
    node_pb2.REPLICA_PHASE_FAILED: Phase.FAILED,
}
# Which replica to give up first when scaling down.
_EVICTION_ORDER = {Phase.PENDING: 0, Phase.FAILED: 1, Phase.DISPATCHED: 2, Phase.LOADING: 3, Phase.RUNNING: 4}

DbCall = Callable[..., Awaitable]
Publish = Callable[[str, node_pb2.Command], Awaitable[None]]
CatalogEntry = tuple[api_pb2.Model, SealedArtifact | None]
#: Every model is locked, so a node needs an affirming result even for a deployment asking "none".
MIN_TIER = "software"
#: A replica the scheduler placed: the message says why there (score, accelerator, predictions).
BOUND = "scheduler.bound"
RESCHEDULE = "reschedule."
#: A replica that keeps missing its SLO but has nowhere better to go (it stays, and says so).
SLO_STUCK = "reschedule.slo_violation.no_better_node"
#: A replica moved for a measured energy saving (its replacement's reason, then its own when evicted).
ENERGY = "reschedule.energy"
#: A running replica whose replacement is starting elsewhere; it serves until that one runs.
ENERGY_REPLACING = "reschedule.energy.replacing"
#: An energy move given up: its replacement failed or vanished; the replica stays.
ENERGY_ABANDONED = "reschedule.energy.abandoned"
#: Energy moves are looked for at most this often, and at least this often while nothing changes.
ENERGY_MIN_INTERVAL_S = 1.0
ENERGY_RECHECK_S = 60.0
#: Looks take at most this share of the reconciler's time: the next waits 1/ENERGY_DUTY times as
#: long as the last one took (a look at 10,000 nodes builds a snapshot: about half a second).
ENERGY_DUTY = 0.05
#: Offers tried per look beyond what the rate and budgets allow to move (the others wait).
ENERGY_TRIES = 32


class EventPublisher(Protocol):
    """Where the reconciler's notifications go: the event bus (orchestrator.events.EventBus)."""

    def publish(
        self,
        kind: str,
        subject: str,
        message: str,
        severity: node_pb2.Severity = ...,
        /,
        **attributes: object,
    ) -> Any: ...


class _NoEvents:
    def publish(
        self, kind: str, subject: str, message: str, severity: int = 0, /, **attributes: object
    ) -> None:
        """Nobody listens (a reconciler built without an event bus)."""


@dataclass(frozen=True)
class EnergyMove:
    """An energy move in flight: its replacement is starting; ``replaced`` serves until it runs."""

    replaced: str
    deployment: str
    source: str  # node/accelerator it leaves
    target: str  # node/accelerator it goes to
    saving: float
    why: str


class Trust(Protocol):
    """What the reconciler asks the verifier."""

    def tier(self, node_id: str) -> str: ...

    def tiers(self, node_ids: Iterable[str]) -> dict[str, str]:
        """``tier`` of each node at once."""
        ...

    def why_not_trusted(self, node_id: str) -> tuple[str, str] | None: ...

    def release_key(self, node_id: str, name: str, version: str, data_key: bytes) -> bytes: ...

    def revoke_model_keys(self, name: str, versions: list[str]) -> None:
        """Refuse these versions' keys from now on (``release_key`` raises)."""
        ...


def required_tier(dep: DeploymentRecord) -> str:
    asked = dep.manifest.spec.requirements.attestation
    return asked if TIERS[asked] >= TIERS[MIN_TIER] else MIN_TIER


def new_replica_id(deployment: str) -> str:
    return f"{deployment}-{uuid.uuid4().hex[:8]}"


class Reconciler:
    def __init__(
        self,
        store: Store,
        db: DbCall,
        fleet: Fleet,
        scheduler: Scheduler,
        publish: Publish,
        config: OrchestratorConfig,
        artifact_endpoint: Callable[[], str],
        on_change: Callable[[set[str]], None],
        trust: Trust,
        rollouts: RolloutController | None = None,
        events: EventPublisher | None = None,
    ) -> None:
        self._store = store
        self._events: EventPublisher = events or _NoEvents()
        self._rollouts = rollouts
        self._trust = trust
        self._db = db
        self._fleet = fleet
        self._scheduler = scheduler
        self._publish = publish
        self._config = config
        self._artifact_endpoint = artifact_endpoint
        self._on_change = on_change
        self._wake = asyncio.Event()
        self._grace_ends = time.monotonic() + config.node_timeout_s
        self._last_sent: dict[str, float] = {}  # replica id -> monotonic time of the last command
        self._resent: dict[str, int] = {}  # replica id -> resends since its phase last moved
        self._needs_sync: set[str] = set()  # nodes that (re)connected: send their full set
        # node -> replica id it reports that no deployment has -> monotonic time of its undeploy
        # (kept for the node's current orphans only); node -> time its full set was sent instead
        self._orphans_sent: dict[str, dict[str, float]] = {}
        self._orphan_syncs: dict[str, float] = {}
        self._cordoned: set[str] = set()
        self._models: dict[tuple[str, str], CatalogEntry] = {}
        # model name -> the team owning it ("" none): nodes serve a model to its team only (a
        # model's owner is recorded before its first version and never changes)
        self._teams: dict[str, str] = {}
        # (model, version, node) of the keys released: written to the store before the commands that
        # carry them go out (a wipe on any replica, in any later term, orders those nodes too)
        self._releases: list[tuple[str, str, str]] = []
        self._recorded: set[tuple[str, str, str]] = set()
        # (model name, version) whose key the store refused to record a release of: revoked, for good.
        self._refused_keys: set[tuple[str, str]] = set()
        resched = config.scheduler.rescheduling
        self._slo_policy = resched.slo_policy()
        self._slo: dict[str, SloState] = {}  # running replica id -> its SLO hysteresis
        self._slo_seen: dict[str, int] = {}  # running replica id -> newest window folded
        self._correction = LatencyCorrection(resched.correction_policy())
        self._corrected: dict[tuple[str, str], int] = {}  # (node, model) -> newest window folded
        self._windows_folded = -1  # the fleet's windows_added at the last fold
        self._move_rate = MoveRate(resched.max_moves_per_minute)
        self._energy_watch = EnergyWatch(resched.energy_policy())
        self._energy_in_flight: dict[str, EnergyMove] = {}  # replacement id -> its move
        self._energy_seen: tuple[int, int, frozenset[str]] = (-1, -1, frozenset())
        self._energy_checked = -math.inf  # monotonic time of the last look for energy moves
        self._energy_tried: dict[str, float] = {}  # replica id -> when a look last found it no move
        self._energy_cost = 0.0  # seconds the last look took
        self._changed_passes = 0  # passes that changed replicas, for "anything new?"
        # (change feed revision, deployments, replicas) of the last read of the store
        self._last_read: tuple[int, list[DeploymentRecord], list[ReplicaRecord]] | None = None
        self.passes = 0
        self._in_pass = False
        self._pass_done = asyncio.Event()

    # ------------------------------------------------------------ triggers

    def trigger(self) -> None:
        self._wake.set()

    def start_grace(self, reconnect_s: float = 0.0) -> None:
        """Start the grace period now, when the orchestrator has subscribed and its ingest runs:
        a node not heard from yet is unknown, not lost, for ``reconnect_s`` (how long the fleet may
        take to reconnect: nonzero when the broker started with us and every node must come back
        to it) plus one node timeout. Counted from construction, a start-up slowed by a loaded
        machine used it up before the retained statuses arrived; without ``reconnect_s``, nodes
        whose reconnect backoff had grown while the orchestrator and its embedded broker were down
        came back after it, and their running replicas were evicted as lost and placed again."""
        self._grace_ends = time.monotonic() + reconnect_s + self._config.node_timeout_s

    def node_connected(self, node_id: str) -> None:
        self._needs_sync.add(node_id)
        self.trigger()

    @property
    def latency_scales(self) -> dict[str, float]:
        """Node -> its current latency correction (observed / predicted), for inspection."""
        return self._correction.scales()

    @property
    def energy_view(self) -> tuple[int, frozenset[str]]:
        """What the last look for energy moves saw: the fleet's count of profile updates and the
        cordoned nodes (tests wait on it rather than on time)."""
        return self._energy_seen[0], self._energy_seen[2]

    @property
    def cordoned(self) -> frozenset[str]:
        return frozenset(self._cordoned)

    def set_cordoned(self, cordoned: Iterable[str]) -> None:
        self._cordoned = set(cordoned)
        self.trigger()

    async def run(self) -> None:
        while True:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
            # arrives as the event fires, and the loop would then never stop.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._config.reconcile_interval_s):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self.reconcile_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug in one pass must not stop the control loop
                log.exception("reconcile pass failed")

    # ------------------------------------------------------------ one pass

    async def reconcile_once(self) -> None:
        self._in_pass = True
        try:
            deployments, replicas = await self._read()
            # Rollouts move inside the pass, so a rollback never races a pass that read the old state.
            if self._rollouts is not None and await self._rollouts.tick(deployments, replicas):
                deployments, replicas = await self._read()
            run = ReconcilePass(self, deployments, replicas)
            try:
                run.follow_reports()
                await run.rebalance()
                pending = run.scale()
                await run.place(pending)
                await run.sync_nodes()
                await run.commit()
            except BaseException:
                await run.settle()
                raise
        finally:
            self._in_pass = False
            self.passes += 1
            self._pass_done.set()
            self._pass_done = asyncio.Event()

    async def wait_passes(self, count: int = 1) -> None:
        """Return once ``count`` passes that started after this call have completed (a pass
        already running read the store before the caller's change, so it does not count). Tests
        wait on this instead of sleeping for "nothing happened"."""
        target = self.passes + count + (1 if self._in_pass else 0)
        while self.passes < target:
            self.trigger()
            await self._pass_done.wait()

    async def _read(self) -> tuple[list[DeploymentRecord], list[ReplicaRecord]]:
        """The deployments and their replicas, read again only when the store's change feed moved
        since the last read: every write of either records a revision there, whichever replica
        made it. At 10,000 replicas a pass with nothing to change spent most of its time reading
        them, once a second. The revision is read first: a write between it and the lists makes
        the next pass read again, never miss it. The records are frozen; the lists are copied."""
        last = self._last_read

        def read() -> tuple[int, list[DeploymentRecord], list[ReplicaRecord]]:
            revision = self._store.revision()
            if last is not None and last[0] == revision:
                return last
            return revision, self._store.list_deployments(), self._store.list_replicas()

        self._last_read = await self._db(read)
        return list(self._last_read[1]), list(self._last_read[2])

    # ------------------------------------------------------------ performance

    async def _plan(
        self,
        replicas: list[ReplicaRecord],
        changes: list[ReplicaChange],
        deployments: list[DeploymentRecord],
        now: float,
        models: Iterable[tuple[str, str]],
    ) -> PlacementPlan:
        """One immutable, columnar snapshot of the fleet as it is now; the plan reserves as it binds.
        Predictions: the nodes' own profiles, their peers' (``class_estimates``), else the cost
        models of their accelerators with the work of ``models`` (name, version) as the catalog read it."""
        works = {}
        for name, version in set(models):
            entry = await self._model(name, version)
            work = model_work(entry[0]) if entry is not None else None
            if work is not None:
                works[model_key(name, version)] = work
        infos = self._snapshot(replicas, changes, deployments, now)
        snapshot = FleetSnapshot.from_node_infos(
            infos,
            performance=class_estimates(
                i for i in infos.values() if i.online and i.attestation_tier != "none"
            ),
            works=works,
        )
        return self._scheduler.plan(snapshot)

    def _correct(self, by_deployment: dict[str, list[ReplicaRecord]], now: float, timeout: float) -> None:
        """Fold the telemetry windows that arrived since the last pass into the latency correction:
        per (node, model) that runs a replica, observed p95 against the node's own profile. Nothing
        to do (and no walk over every replica) when no window arrived since the last fold."""
        if self._fleet.windows_added == self._windows_folded:
            return
        self._windows_folded = self._fleet.windows_added
        nodes: list[str] = []
        observed: list[float] = []
        predicted: list[float] = []
        seen: set[tuple[str, str]] = set()
        for reps in by_deployment.values():
            for rep in reps:
                if rep.phase != Phase.RUNNING or not rep.node_id or not rep.accelerator:
                    continue
                node = self._fleet.nodes.get(rep.node_id)
                key = (rep.node_id, model_key(rep.model_name, rep.model_version))
                if node is None or key in seen or not node.online(now, timeout):
                    continue
                seen.add(key)
                windows = node.latency.get(key[1])
                profile = node.profiles.get((key[1], rep.accelerator))
                last = self._corrected.get(key, 0)
                if not windows or profile is None or windows[-1].seq <= last:
                    continue
                for window in windows:
                    if window.seq > last:
                        nodes.append(rep.node_id)
                        observed.append(window.p95_ms)
                        predicted.append(profile.latency_p95_ms)
                self._corrected[key] = windows[-1].seq
        if nodes:
            self._correction.fold(nodes, observed, predicted)
        for key in [k for k in self._corrected if k not in seen]:
            del self._corrected[key]
        self._correction.retain(self._fleet.nodes)

    def _slo_candidates(
        self, deployments: list[DeploymentRecord], by_deployment: dict[str, list[ReplicaRecord]], now: float
    ) -> tuple[list[MoveCandidate], dict[str, ReplicaRecord], dict[str, int], list[ReplicaRecord]]:
        """Fold each running replica's new telemetry windows into its SLO hysteresis: (replicas that
        keep missing their SLO, the running replicas by id, each deployment's disruption budget,
        replicas stuck over their SLO that have recovered where they are)."""
        policy = self._slo_policy
        budget_cfg = self._config.scheduler.rescheduling.max_unavailable
        candidates: list[MoveCandidate] = []
        running: dict[str, ReplicaRecord] = {}
        allowed: dict[str, int] = {}
        recovered: list[ReplicaRecord] = []
        alive = {r.id for reps in by_deployment.values() for r in reps if r.phase in ACTIVE}
        for rid in [r for r in self._slo if r not in alive]:
            del self._slo[rid]
            self._slo_seen.pop(rid, None)
        for dep in deployments:
            slo = dep.manifest.spec.requirements.max_latency_ms
            reps = by_deployment.get(dep.name, [])
            current = [r for r in reps if r.generation == dep.generation and r.phase == Phase.RUNNING]
            allowed[dep.name] = allowed_disruptions(dep.manifest.spec.replicas, len(current), budget_cfg)
            for rep in current:
                running[rep.id] = rep
                windows = self._windows(rep.node_id, rep.model_name, rep.model_version)
                state = self._slo.get(rep.id)
                if state is None:  # windows from before it ran are not its own
                    state = SloState()
                    self._slo_seen[rep.id] = windows[-1].seq if windows else 0
                for window in windows:
                    if window.seq > self._slo_seen[rep.id]:
                        state = observe_window(state, window.p95_ms, slo, policy)
                        self._slo_seen[rep.id] = window.seq
                self._slo[rep.id] = state
                if sustained_violation(state, now, policy):
                    candidates.append(MoveCandidate(rep.id, dep.name, MoveCause.SLO_VIOLATION))
                elif rep.reason == SLO_STUCK and not state.violating:
                    recovered.append(rep)
        return candidates, running, allowed, recovered

    def _windows(self, node_id: str | None, name: str, version: str) -> Sequence[LatencyWindow]:
        node = self._fleet.nodes.get(node_id or "")
        return node.latency.get(model_key(name, version), ()) if node is not None else ()

    def _moved(self, old: ReplicaRecord, new: ReplicaRecord, now: float) -> None:
        """SLO bookkeeping of a move: the replacement starts its own hysteresis, after a cooldown."""
        self._move_rate.spend(now)
        self._slo[new.id] = record_move(now)
        windows = self._windows(new.node_id, new.model_name, new.model_version)
        self._slo_seen[new.id] = windows[-1].seq if windows else 0
        self._slo.pop(old.id, None)

    def _cheapest_measured(self) -> dict[str, float]:
        """Model key -> the least joules per inference any node measured for it, on any accelerator:
        no energy move of that model can save more than down to this."""
        cheapest: dict[str, float] = {}
        for node in self._fleet.nodes.values():
            for (key, _), profile in node.profiles.items():
                if profile.energy_j < cheapest.get(key, math.inf):
                    cheapest[key] = profile.energy_j
        return cheapest

    def _cool_down(self, rep: ReplicaRecord, now: float) -> None:
        """Leave ``rep`` where it is for a cooldown (an energy move of it was just given up)."""
        self._slo[rep.id] = replace(self._slo.get(rep.id, SloState()), moved_at=now)
        windows = self._windows(rep.node_id, rep.model_name, rep.model_version)
        self._slo_seen.setdefault(rep.id, windows[-1].seq if windows else 0)

    def _energy_due(self, now: float) -> bool:
        """Whether to look for energy moves in this pass: something they depend on changed (node
        profiles, replicas, cordons), an offer's sustain time or a cooldown may have ended, or
        ``ENERGY_RECHECK_S`` passed; never more often than every ``ENERGY_MIN_INTERVAL_S``, nor
        than ``ENERGY_DUTY`` of the time allows."""
        if now - self._energy_checked < max(ENERGY_MIN_INTERVAL_S, self._energy_cost / ENERGY_DUTY):
            return False
        seen = (self._fleet.profile_updates, self._changed_passes, frozenset(self._cordoned))
        due = min(self._energy_watch.next_due(), self._energy_checked + ENERGY_RECHECK_S)
        if seen == self._energy_seen and now < due:
            return False
        if (seen[0], seen[2]) != (self._energy_seen[0], self._energy_seen[2]):
            self._energy_tried.clear()  # new measurements or nodes: a try in vain may succeed now
        self._energy_seen, self._energy_checked = seen, now
        return True

    def _predicted_latency(self, plan: PlacementPlan, model: api_pb2.Model, placed: Placement) -> float:
        """The corrected p95 predicted for ``model`` on the node ``placed`` chose; NaN when unknown."""
        snap = plan.snapshot
        node = snap.index(placed.node_id)
        key = model_key(model.name, model.version)
        if key not in snap.models or placed.accelerator not in snap.kinds:
            return float("nan")
        base = snap.predicted_latency(
            np.array([node]),
            np.array([snap.models.index(key)]),
            np.array([snap.kinds.index(placed.accelerator)]),
        )[0]
        return max(float(base), LATENCY_FLOOR_MS) * float(snap.latency_scale[node])

    # ------------------------------------------------------------ helpers

    def _untrusted(
        self, rep: ReplicaRecord, need: str | None, tier_of: Callable[[str], str] | None = None
    ) -> tuple[str, str] | None:
        """Why ``rep`` may not stay on its node: the node lost its attestation (or did not get one in
        time), or holds a lower tier than the deployment needs. None when it may stay."""
        if rep.node_id is None or need is None:
            return None
        tier = (tier_of or self._trust.tier)(rep.node_id)
        if TIERS[tier] >= TIERS[need]:
            return None
        why = self._trust.why_not_trusted(rep.node_id)
        if why is not None or tier == "none":  # no reason while the node is still attesting
            return why
        return (
            "attestation.tier_insufficient",
            f"node {rep.node_id} is attested {tier}, the deployment needs {need}",
        )

    def _went_out(self, cmd: node_pb2.Command) -> None:
        """A replica's command reached the broker: its resend is timed from now, not from when it
        was decided. After an apply to 10,000 nodes the commands waited seconds for their saves and
        the broker, and a resend timed from the decision sent thousands again (each a command for
        the broker and the node to handle) before the nodes had had them for the resend interval."""
        body = cmd.WhichOneof("body")
        if body in ("deploy", "undeploy"):
            replica_id = getattr(cmd, body).replica_id
            if replica_id in self._last_sent:  # not a replica forgotten meanwhile
                self._last_sent[replica_id] = time.monotonic()

    def _resend(self, commands: list, rep: ReplicaRecord, now: float, *, undeploy: bool = False) -> None:
        resent = self._resent.get(rep.id, 0)
        interval = self._config.resend_interval_s * RESEND_BACKOFF[min(resent, len(RESEND_BACKOFF) - 1)]
        if now - self._last_sent.get(rep.id, 0.0) < interval:
            return
        self._last_sent[rep.id] = now
        self._resent[rep.id] = resent + 1
        assert rep.node_id is not None
        if undeploy:
            commands.append(
                (rep.node_id, command(rep.node_id, undeploy=node_pb2.UndeployReplica(replica_id=rep.id)))
            )
            return
        model = self._models.get((rep.model_name, rep.model_version))
        if model is None:
            return
        try:
            commands.append((rep.node_id, self._deploy_command(rep, model)))
        except KeyReleaseError as err:  # step 1 evicts it if the node stays untrusted
            log.info("replica %s not re-sent: %s", rep.id, err)

    async def _model(self, name: str, version: str) -> CatalogEntry | None:
        """The catalog entry of a model version (cached); None when the catalog has no such version.
        A store failure propagates: the pass fails and the next one retries, rather than telling the
        replica its model does not exist."""
        key = (name, version)
        if key not in self._models:
            try:
                record = await self._db(self._store.get_model, name, version)
            except NotFound:  # the catalog has no such version (yet)
                return None
            try:
                sealed = await self._db(self._store.get_sealed, name, version)
            except NotFound:  # pushed before models were locked: it cannot be released
                sealed = None
            model = api_pb2.Model()
            model.ParseFromString(record.info)
            if name not in self._teams:
                self._teams[name] = team_of(await self._db(self._store.owner_of, MODEL, name))
            self._models[key] = (model, sealed)
        return self._models[key]

    def _deploy_body(self, rep: ReplicaRecord, entry: CatalogEntry) -> node_pb2.DeployReplica:
        """The deploy body for ``rep`` with the model's key released to its node (KeyReleaseError)."""
        model, sealed = entry
        assert rep.node_id is not None
        if sealed is None:
            raise KeyReleaseError(
                "attestation.key.no_data_key", f"{model.name}:{model.version} is not sealed"
            )
        wrapped = self._trust.release_key(rep.node_id, model.name, model.version, sealed.data_key)
        release = (model.name, model.version, rep.node_id)
        if release not in self._recorded:
            self._releases.append(release)
        return node_pb2.DeployReplica(
            replica_id=rep.id,
            deployment=rep.deployment,
            model_name=model.name,
            model_version=model.version,
            sha256=model.sha256,
            size=model.size,
            accelerator=rep.accelerator or "",
            artifact_endpoint=self._artifact_endpoint(),
            wrapped_key=wrapped,
            owner_team=self._teams.get(model.name, ""),
        )

    async def _record_releases(
        self, carried: AbstractSet[tuple[str, str]] = frozenset()
    ) -> set[tuple[str, str]]:
        """Write the key releases not written yet (before the commands carrying the keys go out).
        Returns the (model name, version), of these and of the ``carried`` ones (the keys in the
        commands about to go out, released before), whose key the store has destroyed since this
        process read it (revoked through another replica, not refreshed here yet), and keeps them
        in ``_refused_keys``: no command carries their keys from then on."""
        releases, self._releases = self._releases, []
        fresh = [r for r in dict.fromkeys(releases) if r not in self._recorded]
        carried = carried - self._refused_keys
        if not fresh and not carried:
            return set()
        try:
            refused = await self._db(self._store.record_key_releases, fresh, now_ms(), carried)
        except BaseException:
            self._releases[:0] = fresh  # written by a later flush, before its commands
            raise
        self._recorded.update(r for r in fresh if r[:2] not in refused)
        self._refused_keys |= refused  # for the commands built already
        for name, version in refused:  # and the verifier refuses them for any built from now on
            self._trust.revoke_model_keys(name, [version])
        if refused:
            log.warning(
                "not sending the keys of %s: revoked in the store since this replica read them",
                ", ".join(f"{n}:{v}" for n, v in sorted(refused)),
            )
        return refused

    def _deploy_command(self, rep: ReplicaRecord, model: CatalogEntry) -> node_pb2.Command:
        assert rep.node_id is not None
        return command(rep.node_id, deploy=self._deploy_body(rep, model))

    def _snapshot(
        self,
        replicas: list[ReplicaRecord],
        changes: list[ReplicaChange],
        deployments: list[DeploymentRecord],
        now: float,
    ) -> dict[str, NodeInfo]:
        need = {d.name: d.manifest.spec.requirements.memory_bytes for d in deployments}
        latest = {r.id: r for r in replicas}
        for ch in changes:
            latest[ch.replica.id] = ch.replica
        count: dict[str, int] = defaultdict(int)
        per_dep: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        memory: dict[str, int] = defaultdict(int)
        for rep in latest.values():
            if rep.node_id and rep.phase in ACTIVE:
                count[rep.node_id] += 1
                per_dep[rep.node_id][rep.deployment] += 1
                memory[rep.node_id] += need.get(rep.deployment, 0)
        snapshot = {}
        tiers = self._trust.tiers(self._fleet.nodes)
        for node in self._fleet.nodes.values():
            if node.hello is None:
                continue
            snapshot[node.id] = _node_info(
                node,
                now,
                self._config.node_timeout_s,
                node.id in self._cordoned,
                count[node.id],
                memory[node.id],
                dict(per_dep[node.id]),
                tiers[node.id],
                self._correction.scale(node.id),
            )
        return snapshot


class Placed(enum.Enum):
    """What placing one pending replica came to."""

    BOUND = "bound"  # dispatched to a node
    NO_MODEL = "no_model"  # its model version is not in the catalog
    UNSCHEDULABLE = "unschedulable"  # no node fits (the scheduler's reason)
    KEY_REFUSED = "key_refused"  # the node fits but the model's key was not released to it


class ReconcilePass:
    """One pass of the reconciler over one read of the store, one method per phase:

    1. :meth:`follow_reports` follows what the nodes report (and what they no longer do);
    2. :meth:`rebalance` folds telemetry into the latency correction and moves replicas that keep
       missing their SLO;
    3. :meth:`scale` creates and retires replicas to each deployment's desired count (and its
       rollout's split);
    4. :meth:`place` binds the pending replicas on one snapshot of the fleet (and, while it binds,
       follows what the nodes report of those it has dispatched: :meth:`follow_dispatched`);
    5. :meth:`sync_nodes` sends reconnected nodes their whole desired set and unloads orphans;
    6. :meth:`commit` saves every decision in one transaction, then publishes the commands.

    Decisions accumulate through :meth:`change`, the one place a replica changes, so nothing is
    saved or sent before the whole pass has decided."""

    def __init__(
        self, rec: Reconciler, deployments: list[DeploymentRecord], replicas: list[ReplicaRecord]
    ) -> None:
        self.rec = rec
        self.deployments = deployments
        self.replicas = replicas
        self.now = time.monotonic()
        self.wall = now_ms()
        self.timeout = rec._config.node_timeout_s
        # Just after a start the retained hello/status messages (or the nodes) are still arriving.
        self.in_grace = self.now < rec._grace_ends
        self.need = {d.name: required_tier(d) for d in deployments}
        self.changes: list[ReplicaChange] = []
        self.commands: list[tuple[str, node_pb2.Command]] = []
        self.touched: set[str] = set()
        self._saved = 0  # changes[:_saved] are in the store
        self._started = 0  # commands[:_started] are being sent
        self.sending: list[asyncio.Task[None]] = []
        self._saving: asyncio.Task[None] | None = None  # the last flush's save, chained to the earlier
        self._changed = False
        self.by_deployment: dict[str, list[ReplicaRecord]] = defaultdict(list)
        self._tiers: dict[str, str] | None = None
        self.dispatched: list[ReplicaRecord] = []  # bound by this pass, not yet seen running
        self.moves: Counter[tuple[Phase, Phase]] = Counter()  # phase changes not logged yet
        self._requests: dict[tuple[str, str, str], PlacementRequest] = {}

    def tier(self, node_id: str) -> str:
        """The node's attestation tier, asked of the verifier once per pass for the whole fleet (not
        once per replica, nor once per node)."""
        tiers = self._tiers
        if tiers is None:
            tiers = self._tiers = self.rec._trust.tiers(self.rec._fleet.nodes)
        tier = tiers.get(node_id)
        if tier is None:  # a node the fleet does not know (yet)
            tier = tiers[node_id] = self.rec._trust.tier(node_id)
        return tier

    # ------------------------------------------------------------ decisions

    def change(self, rep: ReplicaRecord, **updates: Any) -> ReplicaRecord:
        """The replica with ``updates``, recorded to be saved at the commit, stamped with the time
        of the change: a pass that binds 10,000 replicas lasts tens of seconds, and a replica
        bound at its end stamped with its start looked that much older to the dispatch timeout."""
        return self.record(rep, replace(rep, updated_ms=now_ms(), **updates))

    def record(self, rep: ReplicaRecord, new: ReplicaRecord) -> ReplicaRecord:
        """Record ``new`` (``rep`` changed, stamped) to be saved at the commit (see :meth:`change`)."""
        if new.phase != rep.phase:
            # A failure or an eviction is news, one line each; the routine moves of 10,000 replicas
            # (30,000 lines in an apply, 7 % of a busy loop) are counted and logged per save.
            log.log(
                logging.INFO if new.phase in _NEWS else logging.DEBUG,
                "replica %s %s -> %s on %s (%s)",
                rep.id,
                rep.phase,
                new.phase,
                new.node_id or "-",
                new.reason,
            )
            self.moves[(rep.phase, new.phase)] += 1
        self.changes.append(ReplicaChange(new))
        self.touched.add(rep.deployment)
        return new

    def add(self, rep: ReplicaRecord) -> ReplicaRecord:
        """A new replica, recorded to be saved at the commit."""
        self.changes.append(ReplicaChange(rep))
        self.touched.add(rep.deployment)
        return rep

    def forget(self, rep: ReplicaRecord) -> None:
        """An evicted replica its node no longer holds: deleted at the commit."""
        self.changes.append(ReplicaChange(rep, delete=True))
        self.rec._last_sent.pop(rep.id, None)
        self.rec._resent.pop(rep.id, None)
        self.touched.add(rep.deployment)

    def resend(self, rep: ReplicaRecord, *, undeploy: bool = False) -> None:
        self.rec._resend(self.commands, rep, self.now, undeploy=undeploy)

    def send(self, node_id: str, cmd: node_pb2.Command) -> None:
        self.commands.append((node_id, cmd))

    def evict(self, rep: ReplicaRecord, reason: str, message: str = "") -> ReplicaRecord:
        """Evict ``rep``; a replica on a node is told to unload (now, whatever was sent before)."""
        evicted = self.change(rep, phase=Phase.EVICTED, reason=reason, message=message)
        if rep.phase != Phase.PENDING and rep.node_id is not None:
            self.rec._last_sent.pop(rep.id, None)
            self.rec._resent.pop(rep.id, None)
            self.resend(evicted, undeploy=True)
        return evicted

    def new_replica(
        self, dep: DeploymentRecord, generation: int, model: tuple[str, str], reason: str
    ) -> ReplicaRecord:
        return self.add(
            ReplicaRecord(
                id=new_replica_id(dep.name),
                deployment=dep.name,
                generation=generation,
                model_name=model[0],
                model_version=model[1],
                phase=Phase.PENDING,
                updated_ms=self.wall,
                reason=reason,
            )
        )

    # ------------------------------------------------------------ 1. follow the nodes

    def follow_reports(self) -> None:
        for rep in self.replicas:
            counted = self._follow(rep)
            if counted is not None:
                self.by_deployment[counted.deployment].append(counted)

    def _follow(self, rep: ReplicaRecord) -> ReplicaRecord | None:
        """``rep`` after what its node reports; None when it no longer counts towards its deployment."""
        rec = self.rec
        node = rec._fleet.nodes.get(rep.node_id) if rep.node_id else None
        node_ok = node is not None and node.online(self.now, self.timeout)
        # A node we have not heard from yet in the grace period is unknown, not lost, unless it
        # said it is offline.
        node_unknown = (
            rep.node_id is not None
            and self.in_grace
            and not node_ok
            and (node is None or node.state != node_pb2.NODE_STATE_OFFLINE)
        )
        held = node is not None and node_ok and rep.id in node.reports
        if rep.phase == Phase.EVICTED:
            if held:
                self.resend(rep, undeploy=True)
            elif not node_unknown:
                self.forget(rep)
            return None
        if rep.node_id and rep.phase in ACTIVE and not node_ok:
            if node_unknown:
                return rep  # still counts towards the desired total
            self.change(
                rep,
                phase=Phase.EVICTED,
                reason="node.lost",
                message=f"node {rep.node_id} went offline or silent",
            )
            return None
        untrusted = (
            rec._untrusted(rep, self.need.get(rep.deployment), self.tier) if rep.phase in ACTIVE else None
        )
        if untrusted is not None:
            self.evict(rep, untrusted[0], untrusted[1])
            return None
        report = node.reports.get(rep.id) if node is not None and node_ok else None
        if report is not None:
            rep = self._follow_report(rep, report)
        elif rep.phase in (Phase.LOADING, Phase.RUNNING):
            # The node forgot it (agent restart): back to loading, and tell it again.
            rep = self.change(
                rep,
                phase=Phase.LOADING,
                reason="node.replica_missing",
                message="the node no longer reports this replica; re-sent",
            )
            self.resend(rep)
        elif rep.phase == Phase.DISPATCHED:
            if self.wall - rep.updated_ms > rec._config.dispatch_timeout_s * 1000:
                rep = self.change(
                    rep,
                    phase=Phase.FAILED,
                    reason="dispatch.timeout",
                    message="the node never acknowledged the deployment",
                )
            else:
                self.resend(rep)
        if rep.phase == Phase.FAILED and self.wall - rep.updated_ms > FAILED_RETENTION_MS:
            rep = self.change(rep, phase=Phase.EVICTED, reason="replica.failed", message=rep.message)
            if held:
                self.resend(rep, undeploy=True)
        return rep

    def _follow_report(self, rep: ReplicaRecord, report: node_pb2.ReplicaReport) -> ReplicaRecord:
        reported = _REPORTED_PHASE.get(report.phase)
        # A report that would be an illegal move (a Failed replica the node says runs again) is not
        # followed: the failed replica is retired and replaced, never revived.
        if (
            reported is None
            or reported == rep.phase
            or rep.phase == Phase.PENDING
            or reported not in TRANSITIONS[rep.phase]
        ):
            return rep
        self.rec._resent.pop(rep.id, None)  # the node moved it on: the next resend comes early again
        if not report.reason and (rep.reason.startswith(RESCHEDULE) or rep.reason == BOUND):
            return self.change(rep, phase=reported)  # keep saying why it runs here
        return self.change(rep, phase=reported, reason=report.reason, message=report.message)

    # ------------------------------------------------------------ 2. telemetry

    async def rebalance(self) -> None:
        """Correct each node's predictions from its telemetry windows; finish the energy moves in
        flight; move replicas that keep missing their SLO (within the disruption budget) to a node
        predicted to meet it; start energy moves where measurements show a large, sustained saving."""
        rec = self.rec
        rec._correct(self.by_deployment, self.now, self.timeout)
        self._advance_energy_moves()
        resched = rec._config.scheduler.rescheduling
        if resched.slo_violation:
            await self._slo_moves()
        if resched.energy and rec._energy_due(self.now):
            started = time.monotonic()
            await self._energy_moves()
            rec._energy_cost = time.monotonic() - started

    async def _slo_moves(self) -> None:
        rec = self.rec
        candidates, running, allowed, recovered = rec._slo_candidates(
            self.deployments, self.by_deployment, self.now
        )
        for rep in recovered:  # it recovered where it is
            reps = self.by_deployment[rep.deployment]
            reps[reps.index(rep)] = self.change(rep, reason="", message="")
        replaced = {m.replaced for m in rec._energy_in_flight.values()}  # its replacement is starting
        moves = select_moves([c for c in candidates if c.replica_id not in replaced], allowed)
        if not moves:
            return
        by_name = {d.name: d for d in self.deployments}
        moving = [(running[m.replica_id].model_name, running[m.replica_id].model_version) for m in moves]
        plan = await rec._plan(self.replicas, self.changes, self.deployments, self.now, moving)
        for move in moves:
            if not rec._move_rate.available(self.now):
                log.info("SLO moves held back: %d per minute reached", rec._move_rate.per_minute)
                break
            rep, dep = running[move.replica_id], by_name[move.deployment]
            reps = self.by_deployment[dep.name]
            here = next(i for i, r in enumerate(reps) if r.id == rep.id)
            reps[here], new = await self._move(reps[here], dep, plan)
            if new is None:
                continue
            self.add(new)
            reps.append(new)
            rec._moved(rep, new, self.now)

    async def _move(
        self, rep: ReplicaRecord, dep: DeploymentRecord, plan: PlacementPlan
    ) -> tuple[ReplicaRecord, ReplicaRecord | None]:
        """Move ``rep`` off its node to one predicted to meet the SLO: (the evicted replica, its
        replacement), or (the replica saying why it stays, None) when there is no such node."""
        rec = self.rec
        assert rep.node_id is not None
        state = rec._slo[rep.id]
        slo = dep.manifest.spec.requirements.max_latency_ms
        breach = (
            f"p95 {state.last_p95_ms:.1f} ms over the {slo:g} ms SLO "
            f"for {max(state.over, rec._slo_policy.breach_windows)} windows"
        )
        model = await rec._model(rep.model_name, rep.model_version)
        if model is None:
            return rep, None
        new_id = new_replica_id(dep.name)
        result = plan.place(
            replace(_request(dep, model[0], self.need[dep.name], new_id), avoid_node=rep.node_id)
        )
        if isinstance(result, Unschedulable):
            return self._stuck(rep, plan, new_id, f"{breach} on {rep.node_id}; not moved: {result.message}")
        predicted = rec._predicted_latency(plan, model[0], result)
        if predicted > slo * rec._slo_policy.breach_ratio:  # NaN (unknown) is given a chance
            why_not = f"the best other node, {result.node_id}, is predicted at {predicted:.1f} ms"
            return self._stuck(rep, plan, new_id, f"{breach} on {rep.node_id}; not moved: {why_not}")
        target = ReplicaRecord(
            id=new_id,
            deployment=dep.name,
            generation=dep.generation,
            model_name=rep.model_name,
            model_version=rep.model_version,
            phase=Phase.DISPATCHED,
            updated_ms=now_ms(),
            node_id=result.node_id,
            accelerator=result.accelerator,
        )
        try:
            deploy = rec._deploy_command(target, model)
        except KeyReleaseError as err:
            why_not = f"node {result.node_id}: {err}"
            return self._stuck(rep, plan, new_id, f"{breach} on {rep.node_id}; not moved: {why_not}")
        guess = "unknown" if np.isnan(predicted) else f"{predicted:.1f} ms"
        evicted = self.evict(
            rep,
            MoveCause.SLO_VIOLATION.value,
            f"{breach} on {rep.node_id}; replaced by {new_id} on {target.node_id}",
        )
        new = replace(
            target,
            reason=MoveCause.SLO_VIOLATION.value,
            message=f"moved from {rep.node_id} ({breach}); predicted {guess} here",
        )
        self.send(result.node_id, deploy)
        rec._last_sent[new.id] = time.monotonic()
        log.warning(
            "replica %s moved from %s to %s as %s: %s", rep.id, rep.node_id, new.node_id, new.id, breach
        )
        return evicted, new

    def _stuck(
        self, rep: ReplicaRecord, plan: PlacementPlan, new_id: str, message: str
    ) -> tuple[ReplicaRecord, None]:
        plan.unreserve(new_id)
        if (rep.reason, rep.message) != (SLO_STUCK, message):
            rep = self.change(rep, reason=SLO_STUCK, message=message)
        return rep, None

    # ------------------------------------------------------------ 2b. energy moves

    def _advance_energy_moves(self) -> None:
        """Finish the energy moves in flight: a replacement that runs takes over (the replica it
        replaces is evicted); one that failed or vanished is given up (the replica stays); one
        whose replica went away meanwhile is simply one of the deployment's replicas now."""
        rec = self.rec
        for new_id, move in list(rec._energy_in_flight.items()):
            reps = self.by_deployment.get(move.deployment, [])
            at = {r.id: i for i, r in enumerate(reps)}
            new = reps[at[new_id]] if new_id in at else None
            old = reps[at[move.replaced]] if move.replaced in at else None
            if new is not None and new.phase in (Phase.DISPATCHED, Phase.LOADING) and old is not None:
                continue  # still starting
            del rec._energy_in_flight[new_id]
            if old is None or old.phase == Phase.EVICTED:
                continue
            if new is not None and new.phase == Phase.RUNNING:
                reps[at[old.id]] = self.evict(
                    old,
                    ENERGY,
                    f"replaced by {new_id} on {move.target}: {100 * move.saving:.0f} % less energy",
                )
                rec._events.publish(
                    "reschedule.energy",
                    f"deployment/{move.deployment}",
                    f"replica {old.id} moved to {move.target} as {new_id}: {move.why}",
                    replica=new_id,
                    replaced=old.id,
                    source=move.source,
                    target=move.target,
                    saving=f"{move.saving:.3f}",
                )
                continue
            ended = "vanished" if new is None else "failed" if new.phase == Phase.FAILED else "was evicted"
            why = f"its replacement {new_id} on {move.target} {ended}"
            if new is not None and new.phase == Phase.FAILED:
                reps[at[new_id]] = self.evict(
                    new, ENERGY_ABANDONED, f"replacement of {old.id}: {new.message}"
                )
            reps[at[old.id]] = self.change(
                old, reason=ENERGY_ABANDONED, message=f"energy move given up: {why}"
            )
            rec._cool_down(old, self.now)
            rec._events.publish(
                "reschedule.energy.abandoned",
                f"deployment/{move.deployment}",
                f"replica {old.id} stays: {why}",
                node_pb2.SEVERITY_WARNING,
                replica=old.id,
                target=move.target,
            )

    async def _energy_moves(self) -> None:
        """Start the energy moves whose measured saving has held long enough (``EnergyWatch``),
        within each deployment's disruption budget and the global rate of voluntary moves. A look
        tries at most the rate plus ``ENERGY_TRIES`` replicas, the largest possible savings first;
        one whose try found no move is not tried again for ``ENERGY_RECHECK_S``."""
        rec = self.rec
        rate = rec._move_rate.available(self.now)
        candidates, budget = await self._energy_candidates(rate + ENERGY_TRIES if rate else 0)
        if not candidates:
            rec._energy_watch.keep_only(())
            return
        models = [(r.request.model.partition(":")[0], r.request.model.partition(":")[2]) for r in candidates]
        plan = await rec._plan(self.replicas, self.changes, self.deployments, self.now, models)
        offers = energy_offers(plan, candidates, rec._energy_watch.policy, len(candidates))
        offered = {o.replica.replica_id for o in offers}
        rec._energy_watch.keep_only(offered)
        rec._energy_tried.update((r.replica_id, self.now) for r in candidates if r.replica_id not in offered)
        for offer in offers:
            dep = offer.replica.request.deployment
            ready = rec._energy_watch.sustained(offer.replica.replica_id, self.now)
            if not (
                ready and budget[dep] > 0 and rec._move_rate.available(self.now)
            ) or not await self._start_energy_move(offer):
                plan.unreserve(offer.replica.request.replica_id)
                continue
            budget[dep] -= 1

    async def _energy_candidates(self, tries: int) -> tuple[list[RunningReplica], dict[str, int]]:
        """(up to ``tries`` running replicas that may move for energy, the largest possible savings
        first; each deployment's budget for it): replicas of settled deployments (every replica of
        the current generation running, no rollout, budget left) that are not violating their SLO,
        not in a cooldown, measured where they run, that the cheapest measurement of their model
        anywhere would save enough, and not tried in vain lately."""
        rec = self.rec
        budget: dict[str, int] = {}
        ranked: list[tuple[float, str, ReplicaRecord, DeploymentRecord, float]] = []
        cheapest = rec._cheapest_measured()
        keep = 1.0 - rec._energy_watch.policy.min_saving
        rec._energy_tried = {r: t for r, t in rec._energy_tried.items() if self.now - t < ENERGY_RECHECK_S}
        for dep in self.deployments if tries > 0 else ():
            key = model_key(dep.manifest.spec.model.name, dep.manifest.spec.model.version)
            for rep in self._energy_settled(dep, budget) if key in cheapest else ():
                node = rec._fleet.nodes.get(rep.node_id or "")
                profile = node.profiles.get((key, rep.accelerator or "")) if node is not None else None
                if profile is None or cheapest[key] > profile.energy_j * keep:
                    continue
                if rep.id not in rec._energy_tried and self._energy_free(rep):
                    ranked.append((cheapest[key] / profile.energy_j, rep.id, rep, dep, profile.energy_j))
        candidates: list[RunningReplica] = []
        for _, _, rep, dep, energy_j in sorted(ranked)[:tries]:
            model = await rec._model(rep.model_name, rep.model_version)
            if model is not None:
                request = _request(dep, model[0], self.need[dep.name], new_replica_id(dep.name))
                candidates.append(
                    RunningReplica(rep.id, rep.node_id or "", rep.accelerator or "", energy_j, request)
                )
        return candidates, budget

    def _energy_settled(self, dep: DeploymentRecord, budget: dict[str, int]) -> list[ReplicaRecord]:
        """The replicas of ``dep`` if it is settled and has disruption budget left (set in ``budget``),
        else none: every replica of its generation running, no rollout in progress."""
        rec = self.rec
        spec = dep.manifest.spec
        reps = [r for r in self.by_deployment.get(dep.name, []) if r.phase != Phase.EVICTED]
        settled = [r for r in reps if r.id not in rec._energy_in_flight]
        if len(settled) != spec.replicas or any(
            r.generation != dep.generation or r.phase != Phase.RUNNING for r in settled
        ):
            return []
        if rec._rollouts is not None and rec._rollouts.split(dep) is not None:
            return []
        budget_cfg = rec._config.scheduler.rescheduling.max_unavailable
        budget[dep.name] = allowed_disruptions(spec.replicas, len(settled), budget_cfg) - (
            len(reps) - len(settled)
        )
        return settled if budget[dep.name] > 0 else []

    def _energy_free(self, rep: ReplicaRecord) -> bool:
        """Whether ``rep`` may move for energy now: placed on a known accelerator, not the replica of
        a move in flight, not violating its SLO, not in its cooldown."""
        rec = self.rec
        if not rep.node_id or not rep.accelerator:
            return False
        if any(m.replaced == rep.id for m in rec._energy_in_flight.values()):
            return False
        state = rec._slo.get(rep.id)
        if state is None:
            return True
        cooling = state.moved_at is not None and self.now - state.moved_at < rec._slo_policy.cooldown_s
        return not (state.violating or cooling)

    async def _start_energy_move(self, offer: EnergyOffer) -> bool:
        """Start the replacement of ``offer``'s replica where the offer places it; the replica keeps
        serving, and says so, until the replacement runs. False if the model's key is refused."""
        rec = self.rec
        placed, req = offer.placement, offer.replica.request
        reps = self.by_deployment[req.deployment]
        here = next(i for i, r in enumerate(reps) if r.id == offer.replica.replica_id)
        old = reps[here]
        model = await rec._model(old.model_name, old.model_version)
        if model is None:
            return False
        target = ReplicaRecord(
            id=req.replica_id,
            deployment=req.deployment,
            generation=old.generation,
            model_name=old.model_name,
            model_version=old.model_version,
            phase=Phase.DISPATCHED,
            updated_ms=self.wall,
            node_id=placed.node_id,
            accelerator=placed.accelerator,
            reason=ENERGY,
            message=offer.why(),
        )
        try:
            deploy = rec._deploy_command(target, model)
        except KeyReleaseError as err:
            log.info("energy move of %s to %s not started: %s", old.id, placed.node_id, err)
            return False
        source, to = f"{old.node_id}/{old.accelerator}", f"{placed.node_id}/{placed.accelerator}"
        reps.append(self.add(target))
        self.send(placed.node_id, deploy)
        rec._last_sent[target.id] = time.monotonic()
        reps[here] = self.change(
            old, reason=ENERGY_REPLACING, message=f"being replaced by {target.id} on {to}: {offer.why()}"
        )
        rec._energy_in_flight[target.id] = EnergyMove(
            old.id, req.deployment, source, to, offer.saving, offer.why()
        )
        rec._moved(old, target, self.now)
        log.info("energy move of %s from %s to %s as %s: %s", old.id, source, to, target.id, offer.why())
        return True

    # ------------------------------------------------------------ 3. scale

    def scale(self) -> list[tuple[DeploymentRecord, ReplicaRecord]]:
        """Scale each deployment to its desired count and retire replicas of older generations;
        the replicas left to place."""
        pending: list[tuple[DeploymentRecord, ReplicaRecord]] = []
        for dep in self.deployments:
            pending.extend((dep, r) for r in self._scale(dep))
        live_names = {d.name for d in self.deployments}
        for name, reps in self.by_deployment.items():
            if name not in live_names:  # deleted while replicas were still being created
                for rep in reps:
                    if rep.phase != Phase.EVICTED:
                        self.evict(rep, "deployment.deleted")
        return pending

    def _scale(self, dep: DeploymentRecord) -> list[ReplicaRecord]:
        surge = self.rec._energy_in_flight  # replacements that join once they run (make before break)
        reps = [
            r for r in self.by_deployment.get(dep.name, []) if r.phase != Phase.EVICTED and r.id not in surge
        ]
        current = [r for r in reps if r.generation == dep.generation]
        old = [r for r in reps if r.generation != dep.generation]
        spec = dep.manifest.spec
        want = spec.replicas
        rollouts = self.rec._rollouts
        split = rollouts.split(dep) if rollouts is not None else None
        if split is not None:
            want = split.new  # this rollout step's share of the new generation
        for _ in range(want - len(current)):
            current.append(
                self.new_replica(
                    dep, dep.generation, (spec.model.name, spec.model.version), "replica.created"
                )
            )
        if len(current) > want:
            surplus = sorted(current, key=lambda r: (_EVICTION_ORDER[r.phase], -r.updated_ms))[
                : len(current) - want
            ]
            for rep in surplus:
                self.evict(rep, "deployment.scaled_down")
            current = [r for r in current if r not in surplus]
        pending: list[ReplicaRecord] = []
        if split is not None:
            retire, missing = split.retire(current, old)
            for rep in retire:
                self.evict(rep, "rollout.replaced")
            for _ in range(missing):  # a stable replica was lost mid-rollout: replace it in kind
                old.append(
                    self.new_replica(
                        dep, split.stable_generation, split.stable_model, "rollout.stable_replaced"
                    )
                )
            pending.extend(r for r in old if r.phase == Phase.PENDING and r not in retire)
        else:
            running_current = sum(r.phase == Phase.RUNNING for r in current)
            for rep in old:
                if rep.phase == Phase.PENDING or running_current >= want:
                    self.evict(rep, "deployment.updated")
        pending.extend(r for r in current if r.phase == Phase.PENDING)
        return pending

    # ------------------------------------------------------------ 4. place

    async def place(self, pending: list[tuple[DeploymentRecord, ReplicaRecord]]) -> dict[Placed, int]:
        """Bind the pending replicas on one immutable, columnar snapshot of the fleet (the plan
        updates capacity as it binds); how many came to each outcome."""
        outcomes: dict[Placed, int] = defaultdict(int)
        if not pending:
            return outcomes
        models = [(rep.model_name, rep.model_version) for _, rep in pending]
        plan = await self.rec._plan(self.replicas, self.changes, self.deployments, self.now, models)
        bound = 0
        slice_ends = time.perf_counter() + PLACE_SLICE_S
        follow_at = time.perf_counter() + FOLLOW_BOUND_S
        for dep, rep in pending:
            if time.perf_counter() >= slice_ends:
                await asyncio.sleep(0)  # let ingest run: binding 10,000 replicas takes seconds
                if time.perf_counter() >= follow_at:
                    if self.follow_dispatched():
                        await self.flush()
                    follow_at = time.perf_counter() + FOLLOW_BOUND_S
                slice_ends = time.perf_counter() + PLACE_SLICE_S
            outcome = await self._place(plan, dep, rep)
            outcomes[outcome] += 1
            if outcome is Placed.BOUND:
                bound += 1
                if not bound % COMMIT_SLICE:
                    await self.flush()
        return outcomes

    async def _place(self, plan: PlacementPlan, dep: DeploymentRecord, rep: ReplicaRecord) -> Placed:
        rec = self.rec
        model = await rec._model(rep.model_name, rep.model_version)
        if model is None:
            self._explain(
                rep, "model.not_found", f"model {rep.model_name}:{rep.model_version} is not in the catalog"
            )
            return Placed.NO_MODEL
        result = plan.place(self._request_for(dep, model[0], rep.id))
        if isinstance(result, Unschedulable):
            self._explain(rep, result.reason, result.message)
            return Placed.UNSCHEDULABLE
        bound = replace(
            rep,
            phase=Phase.DISPATCHED,
            node_id=result.node_id,
            accelerator=result.accelerator,
            reason=BOUND,
            message=result.why(),
            updated_ms=now_ms(),
        )
        try:
            deploy = rec._deploy_command(bound, model)
        except KeyReleaseError as err:
            self._explain(rep, "attestation.key_release_refused", f"node {result.node_id}: {err}")
            return Placed.KEY_REFUSED
        self.record(rep, bound)
        self.send(result.node_id, deploy)
        # Now, not the pass's start: a replica bound 30 s into a long pass and not yet acknowledged
        # was sent its command again at the next pass, as if it had waited 30 s.
        rec._last_sent[bound.id] = time.monotonic()
        self.dispatched.append(bound)
        return Placed.BOUND

    def follow_dispatched(self) -> int:
        """Follow what the nodes report of the replicas this pass dispatched (step 1 of the next pass
        would, once this one ends); how many moved on."""
        nodes = self.rec._fleet.nodes
        now = time.monotonic()
        moved = 0
        waiting = []
        for rep in self.dispatched:
            node = nodes.get(rep.node_id or "")
            report = node.reports.get(rep.id) if node is not None and node.online(now, self.timeout) else None
            new = rep if report is None else self._follow_report(rep, report)
            moved += new is not rep
            if new.phase in (Phase.DISPATCHED, Phase.LOADING):
                waiting.append(new)
        self.dispatched = waiting
        return moved

    def _request_for(self, dep: DeploymentRecord, model: api_pb2.Model, replica_id: str) -> PlacementRequest:
        """The placement request for a replica of ``dep``: built once per deployment and model in
        a pass (a pass that binds 10,000 replicas built 10,000 equal ones), given the replica's id."""
        key = (dep.name, model.name, model.version)
        base = self._requests.get(key)
        if base is None:
            base = self._requests[key] = _request(dep, model, self.need[dep.name], "")
        return replace(base, replica_id=replica_id)

    def _explain(self, rep: ReplicaRecord, reason: str, message: str) -> None:
        """Say why a replica stays pending (only when that changed: no write per pass)."""
        if (rep.reason, rep.message) != (reason, message):
            self.change(rep, reason=reason, message=message)

    # ------------------------------------------------------------ 5. sync the nodes

    async def sync_nodes(self) -> None:
        """Nodes that (re)connected get their whole desired set; unknown replicas get unloaded."""
        final = {r.id: r for r in self.replicas}
        for ch in self.changes:
            if ch.delete:
                final.pop(ch.replica.id, None)
            else:
                final[ch.replica.id] = ch.replica
        if self.rec._needs_sync:  # most passes: none (no walk of every replica for nothing)
            desired_by_node: dict[str, list[ReplicaRecord]] = defaultdict(list)
            for rep in final.values():
                if rep.node_id and rep.phase in ACTIVE:
                    desired_by_node[rep.node_id].append(rep)
            for node_id in list(self.rec._needs_sync):
                await self._sync(node_id, desired_by_node.get(node_id, []))
        self._unload_orphans(final)

    async def _sync(self, node_id: str, desired: list[ReplicaRecord]) -> None:
        rec = self.rec
        node = rec._fleet.nodes.get(node_id)
        if node is None or not node.online(self.now, self.timeout):
            return
        if rec._trust.tier(node_id) == "none" and rec._trust.why_not_trusted(node_id) is None:
            # Still attesting (just connected, or this orchestrator just started): its keys cannot
            # be released yet, and a sync without them would unload its models.
            return
        rec._needs_sync.discard(node_id)
        sync = node_pb2.SyncReplicas()
        for rep in desired:
            model = await rec._model(rep.model_name, rep.model_version)
            if model is None:
                continue
            try:
                sync.replicas.append(rec._deploy_body(rep, model))
            except KeyReleaseError as err:  # left out: the node unloads it, step 1 evicts it
                log.info("replica %s left out of the sync of %s: %s", rep.id, node_id, err)
        self.send(node_id, command(node_id, sync=sync))

    def _unload_orphans(self, final: dict[str, ReplicaRecord]) -> None:
        """Unload the replicas a node reports that no deployment has. Each is undeployed (again
        every ``resend_interval_s``); a node reporting more than ``MAX_ORPHAN_UNDEPLOYS`` is sent
        its full set instead (one command, not one per id its status names), at most as often."""
        rec = self.rec
        interval = rec._config.resend_interval_s
        for node in rec._fleet.nodes.values():
            if not node.online(self.now, self.timeout):
                continue
            orphans = [rid for rid in node.reports if rid not in final]
            sent = rec._orphans_sent.pop(node.id, {})
            if not orphans:
                continue
            if len(orphans) > MAX_ORPHAN_UNDEPLOYS:
                if self.now - rec._orphan_syncs.get(node.id, 0.0) >= interval:
                    rec._orphan_syncs[node.id] = self.now
                    rec._needs_sync.add(node.id)
                continue
            sent = rec._orphans_sent[node.id] = {rid: sent[rid] for rid in orphans if rid in sent}
            for rid in orphans:
                if self.now - sent.get(rid, 0.0) >= interval:
                    sent[rid] = self.now
                    self.send(node.id, command(node.id, undeploy=node_pb2.UndeployReplica(replica_id=rid)))

    # ------------------------------------------------------------ 6. commit

    async def commit(self) -> None:
        """Save the decisions not saved yet in one transaction, then publish their commands (a crash
        between the two loses commands, which are re-sent, never a decision), and wait until every
        command of the pass is out."""
        self.follow_dispatched()
        await self.flush()
        # The saves and the commands of a large pass take seconds: follow the nodes meanwhile, as
        # the binding does, so that a replica running by then is recorded now, not a pass later.
        while outstanding := [t for t in (self._saving, *self.sending) if t is not None and not t.done()]:
            await asyncio.wait(outstanding, timeout=FOLLOW_BOUND_S)
            if self.follow_dispatched():
                await self.flush()
        if self._saving is not None:
            await self._saving
        await self.sent()
        if self._changed:
            self.rec._changed_passes += 1

    async def flush(self) -> None:
        """Start saving the decisions made so far (one transaction, after the earlier flushes'
        saves) and then publishing their commands, in order; wait for neither (:meth:`commit`
        does). ``place`` flushes every ``COMMIT_SLICE`` bindings and after following the nodes'
        reports, and binds on while the store writes: waiting for each write held the binding of
        10,000 replicas up for a seventh of its time. A crash after a save leaves a store that the
        next pass carries on from; a save that fails fails the ones after it, and the pass."""
        changes, self._saved = self.changes[self._saved :], len(self.changes)
        commands, self._started = self.commands[self._started :], len(self.commands)
        moves, self.moves = self.moves, Counter()
        touched, self.touched = self.touched, set()
        self._changed |= bool(changes)
        earlier = self._saving
        if earlier is not None and earlier.done():
            earlier.result()  # a failed save fails the pass now, not once it has bound everything
        if changes or commands or moves or touched:
            self._saving = asyncio.create_task(self._save(earlier, changes, moves, commands, touched))

    async def _save(
        self,
        earlier: asyncio.Task[None] | None,
        changes: list[ReplicaChange],
        moves: Counter[tuple[Phase, Phase]],
        commands: list[tuple[str, node_pb2.Command]],
        touched: set[str],
    ) -> None:
        """One flush: after the earlier flushes' saves (a failed one fails this one: nothing after
        it is written or sent), write ``changes``, then start publishing ``commands``."""
        if earlier is not None:
            await earlier
        rec = self.rec
        if changes:
            await rec._db(rec._store.apply_replica_changes, changes)
        if commands:
            # Also the releases of later slices' commands, built meanwhile.
            await rec._record_releases(carried_keys(commands))
            if rec._refused_keys:
                commands = without_keys(commands, rec._refused_keys)
        if moves:
            moved = ", ".join(f"{n} {a} -> {b}" for (a, b), n in sorted(moves.items()))
            log.info("replicas saved: %s", moved)
        if commands:
            self.sending.append(asyncio.create_task(publish_all(rec._publish, commands, rec._went_out)))
        if touched:
            rec._on_change(touched)

    async def sent(self) -> None:
        """Wait for the commands being published (raise the first failure)."""
        sending, self.sending = self.sending, []
        results = await asyncio.gather(*sending, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def settle(self) -> None:
        """After a failed pass: wait for what it started (saves, then publishing) to end, however.
        Cancelled meanwhile (a shutdown that stops waiting): cancel them all, none is left running."""
        try:
            if self._saving is not None:
                await asyncio.gather(self._saving, return_exceptions=True)
            await asyncio.gather(*self.sending, return_exceptions=True)  # started: out, or failed
        except asyncio.CancelledError:
            for task in (self._saving, *self.sending):
                if task is not None:
                    task.cancel()
            raise


def _node_info(
    node: NodeView,
    now: float,
    timeout: float,
    cordoned: bool,
    replicas: int,
    memory_used: int,
    per_deployment: dict[str, int],
    attestation_tier: str,
    latency_scale: float,
) -> NodeInfo:
    hello = node.hello
    assert hello is not None
    accelerators = {
        acc.kind: frozenset(acc.dtypes) for acc in hello.accelerators if acc.availability in ("", "ok")
    }
    return NodeInfo(
        id=node.id,
        online=node.online(now, timeout),
        cordoned=cordoned,
        labels=dict(hello.labels),
        accelerators=accelerators,
        max_replicas=hello.max_replicas or 8,
        memory_bytes=hello.memory_bytes,
        active_w=max((a.active_w for a in hello.accelerators), default=0.0),
        replicas=replicas,
        memory_used=memory_used,
        per_deployment=per_deployment,
        attestation_tier=attestation_tier,
        hardware_profile=hello.hardware_profile,
        latency_scale=latency_scale,
        nj_per_op={
            acc.kind: acc.active_w / acc.peak_gops
            for acc in hello.accelerators
            if acc.availability in ("", "ok") and acc.peak_gops > 0
        },
        costs=node.costs,
        # The SLO is on p95: a profile predicts the p95 it measured.
        profiles={
            (kind, model): Prediction(p.latency_p95_ms, p.energy_j)
            for (model, kind), p in node.profiles.items()
        },
    )


def _request(dep: DeploymentRecord, model: api_pb2.Model, tier: str, replica_id: str) -> PlacementRequest:
    req = dep.manifest.spec.requirements
    return PlacementRequest(
        deployment=dep.name,
        model=model_key(model.name, model.version),
        max_latency_ms=req.max_latency_ms,
        replica_id=replica_id,
        accelerators=frozenset(req.accelerators),
        dtypes=frozenset(model.dtypes),
        memory_bytes=req.memory_bytes,
        selector=dict(dep.manifest.spec.selector.match_labels),
        attestation_tier=tier,
    )


async def publish_all(
    publish: Publish,
    commands: Sequence[tuple[str, node_pb2.Command]],
    went_out: Callable[[node_pb2.Command], None] = lambda _cmd: None,
) -> None:
    """Publish ``commands`` in their order, up to ``PUBLISH_WINDOW`` of them awaiting their PUBACK
    at once: one at a time, a pass that binds thousands of replicas waited a broker round trip
    per command (MQTT keeps the order of one client's QoS 1 messages, so each node still gets
    its commands in the order they were decided). ``went_out`` is told of each acknowledged one."""
    if len(commands) <= 1:
        for node_id, cmd in commands:
            await publish(node_id, cmd)
            went_out(cmd)
        return
    # A window of senders, each taking the next command when its last one is acknowledged: the
    # publishes start in list order. (A task per command behind an asyncio.Semaphore costs a scan of
    # every waiter on each entry once the window frees up: quadratic in a 10,000-node fan-out.)
    queue = iter(commands)

    async def sender() -> None:
        failed: Exception | None = None
        for node_id, cmd in queue:
            try:
                await publish(node_id, cmd)
                went_out(cmd)
            except Exception as err:  # the other commands are still sent; the first failure is raised
                failed = failed or err
        if failed is not None:
            raise failed

    await asyncio.gather(*(sender() for _ in range(min(PUBLISH_WINDOW, len(commands)))))


def carried_keys(commands: list[tuple[str, node_pb2.Command]]) -> set[tuple[str, str]]:
    """The (model name, version) whose keys ``commands`` carry."""
    out = set()
    for _, cmd in commands:
        if cmd.HasField("deploy"):
            out.add((cmd.deploy.model_name, cmd.deploy.model_version))
        elif cmd.HasField("sync"):
            out.update((r.model_name, r.model_version) for r in cmd.sync.replicas)
    return out


def without_keys(
    commands: list[tuple[str, node_pb2.Command]], refused: set[tuple[str, str]]
) -> list[tuple[str, node_pb2.Command]]:
    """``commands`` without the keys of the ``refused`` (model name, version): a deploy of one is
    left out, a sync goes without it (the node unloads it)."""

    def refused_body(body: node_pb2.DeployReplica) -> bool:
        return (body.model_name, body.model_version) in refused

    out = []
    for node_id, cmd in commands:
        if cmd.HasField("deploy") and refused_body(cmd.deploy):
            continue
        if cmd.HasField("sync") and any(refused_body(r) for r in cmd.sync.replicas):
            kept = [r for r in cmd.sync.replicas if not refused_body(r)]
            del cmd.sync.replicas[:]
            cmd.sync.replicas.extend(kept)
        out.append((node_id, cmd))
    return out


def command(node_id: str, **body: Any) -> node_pb2.Command:
    return node_pb2.Command(
        schema=SCHEMA_VERSION, command_id=uuid.uuid4().hex, node_id=node_id, issued_unix_ms=now_ms(), **body
    )
