"""Safe rollouts: a changed deployment template replaces the running one step by step, each step
watched through health gates, with an automatic rollback to the last good generation.

A deployment with ``spec.strategy`` that gets a new generation while replicas of an older one run
starts a :class:`Rollout`. Each step asks for a number of replicas of the new generation (canary:
``steps`` percent of ``spec.replicas``; rolling: ``maxUnavailable`` more at a time, at least one)
and keeps the rest on the stable generation. Once the step's new replicas run, the step is observed
for ``pause``: its gates (error rate, p95 latency against the SLO, an accuracy proxy; see
:func:`evaluate`) must hold over at least ``minInferences`` inferences of the new version. A gate
that fails rolls back: the deployment gets the stable template again as a new generation, the
stable replicas are relabelled to it where they run (so nothing restarts), and the new version's
replicas are retired. Pause, resume and undo are operator actions (``edgeward rollout``).

The rollout is persisted (store table ``rollouts``) at every transition, and the reconciler asks
:meth:`RolloutController.split` how many replicas of each generation are wanted now, so an
orchestrator killed mid-rollout resumes at its recorded step with the replicas it had: the
counts come from the record, the replicas from the store. Only the observation of the step in
progress starts again (telemetry is not persisted).

The controller runs inside the reconciler's pass (:meth:`RolloutController.tick` before step 2),
so a rollback never races a pass that still sees the old generation.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from edgeward.v1 import api_pb2, node_pb2
from edgeward.wire import now_ms

from .errors import IllegalTransition, NotFound, OrchestratorError
from .fleet import Fleet
from .manifest import StrategySpec
from .phases import Phase
from .store import ACTION_DONE, ACTION_PENDING, DeploymentRecord, ReplicaRecord, Store

if TYPE_CHECKING:
    from .events import EventBus

log = logging.getLogger(__name__)

DbCall = Callable[..., Awaitable[Any]]
#: An output counts as confident when its top-1 probability reaches this (agent side, ModelStats).
CONFIDENT_P = 0.8
ACTION_TIMEOUT_S = 10.0
ACTION_POLL_S = 0.05  # how often a replica that does not lead looks for the outcome of its action
ASKED_POLL_S = 1.0  # how often the leader's passes look for other replicas' actions unprompted
# Which replica of a generation to retire first: those that serve nothing yet.
_RETIRE_ORDER = {Phase.PENDING: 0, Phase.FAILED: 1, Phase.DISPATCHED: 2, Phase.LOADING: 3, Phase.RUNNING: 4}


class RolloutState(StrEnum):
    PROGRESSING = "Progressing"  # replacing or observing a step
    PAUSED = "Paused"  # by an operator, or a gate short of data: the step's split stays
    COMPLETED = "Completed"  # every replica on the new generation, every step passed
    ROLLED_BACK = "RolledBack"  # a gate failed or an operator undid it: back on the stable template


TRANSITIONS: dict[RolloutState, frozenset[RolloutState]] = {
    RolloutState.PROGRESSING: frozenset(
        {RolloutState.PAUSED, RolloutState.COMPLETED, RolloutState.ROLLED_BACK}
    ),
    RolloutState.PAUSED: frozenset({RolloutState.PROGRESSING, RolloutState.ROLLED_BACK}),
    RolloutState.COMPLETED: frozenset(),
    RolloutState.ROLLED_BACK: frozenset(),
}
_STATE_PB = {
    RolloutState.PROGRESSING: api_pb2.ROLLOUT_STATE_PROGRESSING,
    RolloutState.PAUSED: api_pb2.ROLLOUT_STATE_PAUSED,
    RolloutState.COMPLETED: api_pb2.ROLLOUT_STATE_COMPLETED,
    RolloutState.ROLLED_BACK: api_pb2.ROLLOUT_STATE_ROLLED_BACK,
}


class RolloutError(OrchestratorError):
    """An operator action that does not apply to the rollout as it stands (``reason`` says why)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def _refused(err: Exception) -> str:
    """A refusal as the leader writes it back for the replica that asked."""
    if isinstance(err, NotFound):
        return json.dumps({"not_found": [err.kind, err.name]})
    if isinstance(err, RolloutError):
        return json.dumps({"reason": err.reason, "message": str(err)})
    return json.dumps({"reason": "rollout.failed", "message": f"{type(err).__name__}: {err}"})


def _refusal(outcome: str) -> RolloutError | NotFound:
    """The leader's refusal, as the asking replica raises it (the API maps it as on the leader)."""
    try:
        data = json.loads(outcome)
        if "not_found" in data:
            kind, name = data["not_found"]
            return NotFound(str(kind), str(name))
        reason = str(data["reason"])
        return RolloutError(reason, str(data["message"]).removeprefix(f"{reason}: "))
    except (ValueError, KeyError, TypeError):
        return RolloutError("rollout.refused", "the leader refused the action")


def check_transition(current: RolloutState, new: RolloutState) -> None:
    if new != current and new not in TRANSITIONS[current]:
        raise IllegalTransition(f"rollout {current} -> {new} is not allowed")


# ---------------------------------------------------------------- the record


@dataclass(frozen=True)
class StepRecord:
    """One observed step: what it replaced and what the gates saw."""

    step: int
    replicas: int
    verdict: str  # passed | failed | paused
    at_ms: int
    reason: str = ""
    figures: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Rollout:
    """The rollout of one deployment from ``from_generation`` (stable) to ``to_generation``."""

    deployment: str
    from_generation: int
    to_generation: int
    from_model: str  # name:version
    to_model: str
    strategy: str  # canary | rolling
    state: RolloutState
    step: int  # index into step_counts()
    started_ms: int
    updated_ms: int
    observe_since_ms: int = 0  # 0: the step's replicas are not all running yet
    reason: str = ""  # why it is in its state, e.g. rollout.gate.latency
    message: str = ""
    rollback_generation: int = 0  # the generation a rollback created
    baseline_confidence: float = -1.0  # the stable version's confident share, once measured
    history: tuple[StepRecord, ...] = ()

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Rollout:
        data = json.loads(text)
        data["state"] = RolloutState(data["state"])
        data["history"] = tuple(StepRecord(**h) for h in data.get("history", ()))
        return cls(**data)

    def moved(self, state: RolloutState, now: int, **updates: Any) -> Rollout:
        check_transition(self.state, state)
        return replace(self, state=state, updated_ms=now, **updates)

    @property
    def active(self) -> bool:
        return self.state in (RolloutState.PROGRESSING, RolloutState.PAUSED)


def step_counts(strategy: StrategySpec, replicas: int) -> list[int]:
    """Replicas of the new generation at each step; the last is always ``replicas``."""
    if replicas <= 0:
        return [0]
    if strategy.type == "canary":
        counts = sorted({min(replicas, max(1, math.ceil(replicas * p / 100))) for p in strategy.canary_steps})
    else:
        batch = max(1, strategy.max_unavailable)
        counts = list(range(batch, replicas, batch))
    if not counts or counts[-1] != replicas:
        counts.append(replicas)
    return counts


# ---------------------------------------------------------------- the replica split


@dataclass(frozen=True)
class Split:
    """What the reconciler should run of a deployment in rollout, now."""

    new: int  # replicas of the deployment's (new) generation
    old: int  # replicas of the stable generation
    max_unavailable: int
    stable_generation: int
    stable_model: tuple[str, str]

    def retire(
        self, current: list[ReplicaRecord], old: list[ReplicaRecord]
    ) -> tuple[list[ReplicaRecord], int]:
        """(old replicas to evict now, stable replicas to create): retire old ones beyond ``old``,
        serving ones only while running replicas stay at least replicas - maxUnavailable; replace
        stable ones that were lost. Replicas of other generations (an abandoned rollout's) go first."""
        want = self.new + self.old
        available = sum(r.phase == Phase.RUNNING for r in current) + sum(
            r.phase == Phase.RUNNING for r in old
        )
        stable = [r for r in old if r.generation == self.stable_generation]
        others = [r for r in old if r.generation != self.stable_generation]
        evict: list[ReplicaRecord] = []
        keep = len(stable)
        for rep in sorted(others, key=lambda r: _RETIRE_ORDER[r.phase]) + sorted(
            stable, key=lambda r: (_RETIRE_ORDER[r.phase], -r.updated_ms)
        ):
            if rep.generation == self.stable_generation and keep <= self.old:
                break
            if rep.phase == Phase.RUNNING:
                if available - 1 < want - self.max_unavailable:
                    continue
                available -= 1
            evict.append(rep)
            if rep.generation == self.stable_generation:
                keep -= 1
        return evict, max(0, self.old - keep)


# ---------------------------------------------------------------- gates


@dataclass(frozen=True)
class Counters:
    attempts: int = 0  # inferences + errors
    errors: int = 0
    scored: int = 0  # outputs that were probability distributions
    confident: int = 0

    @classmethod
    def of(cls, stats: node_pb2.ModelStats) -> Counters:
        return cls(stats.inferences + stats.errors, stats.errors, stats.scored, stats.confident)

    def since(self, base: Counters | None) -> Counters:
        # Counters are cumulative since the agent started: a smaller value means it restarted.
        if base is None or self.attempts < base.attempts:
            return self
        return Counters(
            self.attempts - base.attempts,
            self.errors - base.errors,
            max(0, self.scored - base.scored),
            max(0, self.confident - base.confident),
        )

    def __add__(self, other: Counters) -> Counters:
        return Counters(
            self.attempts + other.attempts,
            self.errors + other.errors,
            self.scored + other.scored,
            self.confident + other.confident,
        )


class Outcome(StrEnum):
    """What the gates of a step say so far."""

    PASSED = "pass"  # observed for the whole pause with every gate holding
    FAILED = "fail"  # a gate failed: roll back
    WAIT = "wait"  # keep observing
    NO_DATA = "no_data"  # short of inferences past the progress deadline: pause


class Action(StrEnum):
    """An operator action on a rollout (``edgeward rollout pause|resume|undo``)."""

    PAUSE = "pause"
    RESUME = "resume"
    UNDO = "undo"


@dataclass(frozen=True)
class Verdict:
    """What the gates say (``outcome``); ``reason`` names the gate for FAILED and NO_DATA."""

    outcome: Outcome
    reason: str = ""
    message: str = ""
    figures: dict[str, float] = field(default_factory=dict)


def evaluate(
    strategy: StrategySpec,
    slo_ms: float,
    new: Counters,
    new_p95_ms: float,
    stable: Counters,
    baseline_confidence: float,
    observed_s: float,
) -> Verdict:
    """The gates of one step over its observation window so far.

    * error rate: failed / attempted inferences of the new version <= ``maxErrorRate``;
    * latency: the new version's p95 (the worst node's, over its latest inferences) <= the gate's
      ``maxLatencyMs``, else the deployment's SLO (no gate when both are 0);
    * accuracy proxy: the share of the new version's outputs whose top-1 probability reaches
      CONFIDENT_P may fall at most ``maxConfidenceDrop`` below the stable version's share (over the
      same window, else as measured at an earlier step; no gate without either, or for models
      whose outputs are not probabilities).

    A gate can fail as soon as ``minInferences`` attempts are in; the step passes once ``pause``
    has elapsed with every gate holding; short of data past ``progressDeadline`` it is ``no_data``.
    """
    gates = strategy.gates
    figures: dict[str, float] = {"inferences": float(new.attempts), "observed_s": round(observed_s, 3)}
    enough = new.attempts >= gates.min_inferences
    if not enough:
        if observed_s >= gates.progress_deadline_s:
            return Verdict(
                Outcome.NO_DATA,
                "rollout.gate.no_data",
                f"{new.attempts} of {gates.min_inferences} inferences of the new version in "
                f"{observed_s:.0f} s: not enough to judge it",
                figures,
            )
        return Verdict(Outcome.WAIT, figures=figures)
    error_rate = new.errors / new.attempts
    figures["error_rate"] = round(error_rate, 4)
    if error_rate > gates.max_error_rate:
        return Verdict(
            Outcome.FAILED,
            "rollout.gate.error_rate",
            f"error rate {error_rate:.1%} over {new.attempts} inferences > {gates.max_error_rate:.1%}",
            figures,
        )
    limit = gates.max_latency_ms or slo_ms
    figures["p95_ms"] = round(new_p95_ms, 3)
    if limit > 0 and new_p95_ms > limit:
        return Verdict(
            Outcome.FAILED, "rollout.gate.latency", f"p95 {new_p95_ms:.1f} ms > {limit:g} ms", figures
        )
    if new.scored:
        share = new.confident / new.scored
        figures["confident_share"] = round(share, 4)
        base = (
            stable.confident / stable.scored if stable.scored >= gates.min_inferences else baseline_confidence
        )
        if base >= 0:
            figures["stable_confident_share"] = round(base, 4)
            if base - share > gates.max_confidence_drop:
                return Verdict(
                    Outcome.FAILED,
                    "rollout.gate.accuracy",
                    f"confident outputs {share:.1%} vs {base:.1%} on the stable version: a drop of "
                    f"{base - share:.1%} > {gates.max_confidence_drop:.1%}",
                    figures,
                )
    if observed_s >= strategy.pause_s:
        return Verdict(Outcome.PASSED, figures=figures)
    return Verdict(Outcome.WAIT, figures=figures)


# ---------------------------------------------------------------- the controller


@dataclass
class _Window:
    """The observation of one step: counters per (node, model key) when it began."""

    since_ms: int
    base: dict[tuple[str, str], Counters]
    figures: dict[str, float] = field(default_factory=dict)


@dataclass
class _Action:
    """An operator action for the next pass: asked of this replica (``done`` resolves with its
    outcome), or of another replica that does not lead (``remote``: its row in the store, where the
    outcome goes)."""

    kind: Action
    deployment: str
    reason: str
    done: asyncio.Future[Rollout] | None = None
    remote: int | None = None


class RolloutController:
    """Starts, advances, pauses and rolls back rollouts; see the module docstring."""

    def __init__(
        self,
        store: Store,
        db: DbCall,
        fleet: Fleet,
        events: EventBus,
        node_timeout_s: float,
        wake: Callable[[], None],
        *,
        leading: Callable[[], bool] = lambda: True,
        shared: bool = False,
    ) -> None:
        """``leading``: whether this replica runs the passes now (else an action asked of it goes
        to the leader through the store); ``shared``: whether other replicas may ask actions of
        this one's passes (a store on PostgreSQL)."""
        self._store = store
        self._db = db
        self._leading = leading
        self._shared = shared
        # Other replicas' actions are read from the store when a notification says one was asked
        # (and at least every ASKED_POLL_S, for when notifications do not flow), not every pass.
        self._asked = True
        self._asked_read = 0.0
        self._fleet = fleet
        self._events = events
        self._node_timeout_s = node_timeout_s
        self._wake = wake
        self._records: dict[str, Rollout] = {}
        self._windows: dict[str, _Window] = {}
        self._actions: list[_Action] = []
        self._counts: dict[str, tuple[int, int]] = {}  # deployment -> (new running, old live), last pass

    async def load(self, announce: bool = True) -> None:
        """The rollout records from the store (at start, at a new leader term; on a replica that does
        not lead, after each change another replica made, so that its API answers with them)."""
        rows = await self._db(self._store.list_rollouts)
        self._records = {name: Rollout.from_json(text) for name, text in rows.items()}
        for rec in self._records.values() if announce else ():
            if rec.active:
                log.info(
                    "rollout of %s resumes at step %d (%s -> %s, %s)",
                    rec.deployment,
                    rec.step + 1,
                    rec.from_model,
                    rec.to_model,
                    rec.state,
                )

    def get(self, deployment: str) -> Rollout | None:
        return self._records.get(deployment)

    # ------------------------------------------------------------ the reconciler's questions

    def split(self, dep: DeploymentRecord) -> Split | None:
        """How many replicas of the new and the stable generation ``dep`` wants now; None when no
        rollout is in progress (every replica on the deployment's generation, as usual)."""
        strategy = dep.manifest.spec.strategy
        rec = self._records.get(dep.name)
        if strategy is None or rec is None or not rec.active or rec.to_generation != dep.generation:
            return None
        want = dep.manifest.spec.replicas
        counts = step_counts(strategy, want)
        new = counts[min(rec.step, len(counts) - 1)]
        name, _, version = rec.from_model.partition(":")
        return Split(new, want - new, strategy.max_unavailable, rec.from_generation, (name, version))

    async def tick(self, deployments: list[DeploymentRecord], replicas: list[ReplicaRecord]) -> bool:
        """Advance every rollout by what the fleet shows; True when the store's deployments or
        replicas changed (a rollback), so the pass must read them again."""
        by_dep: dict[str, list[ReplicaRecord]] = {}
        for rep in replicas:
            if rep.phase != Phase.EVICTED:
                by_dep.setdefault(rep.deployment, []).append(rep)
        names = {d.name for d in deployments}
        for name in [n for n in self._records if n not in names]:  # deleted with its deployment
            del self._records[name]
            self._windows.pop(name, None)
        if await self._take_actions(deployments, by_dep):
            return True
        changed = False
        for dep in deployments:
            reps = by_dep.get(dep.name, [])
            try:
                changed |= await self._advance(dep, reps)
            except asyncio.CancelledError:
                raise
            except Exception:  # one deployment's rollout must not stop the others
                log.exception("rollout of %s failed to advance", dep.name)
        return changed

    # ------------------------------------------------------------ operator actions

    async def request(self, kind: Action | str, deployment: str, reason: str = "") -> Rollout:
        """Pause, resume or undo the rollout of ``deployment``; applied in the next pass."""
        try:
            action = Action(kind)
        except ValueError:
            raise RolloutError("rollout.unknown_action", str(kind)) from None
        if not self._leading():
            return await self._ask_leader(action, deployment, reason)
        done: asyncio.Future[Rollout] = asyncio.get_running_loop().create_future()
        self._actions.append(_Action(action, deployment, reason, done))
        self._wake()
        try:
            async with asyncio.timeout(ACTION_TIMEOUT_S):
                return await done
        except TimeoutError:  # this replica stopped leading before a pass took it
            raise RolloutError(
                "rollout.no_leader",
                f"no pass took the {action.value} of {deployment} within {ACTION_TIMEOUT_S:g} s",
            ) from None

    def actions_asked(self) -> None:
        """Another replica asked for an action (a notification): the next pass reads them."""
        self._asked = True

    async def _ask_leader(self, action: Action, deployment: str, reason: str) -> Rollout:
        """On a replica that does not lead: the action goes to the leader through the store (one row;
        on PostgreSQL a notification wakes the leader's pass), and its outcome comes back there. The
        leader alone changes rollouts, so an action never races a step the leader is saving."""
        action_id = await self._db(
            self._store.request_rollout_action, deployment, action.value, reason, now_ms()
        )
        deadline = asyncio.get_running_loop().time() + ACTION_TIMEOUT_S
        while True:
            await asyncio.sleep(ACTION_POLL_S)
            found = await self._db(self._store.rollout_action, action_id)
            if found is None:  # never expected: only the asking replica deletes its pending row
                raise RolloutError(
                    "rollout.no_leader",
                    f"the {action.value} of {deployment} was lost before a leader answered; "
                    "see the rollout's status",
                )
            if found[0] != ACTION_PENDING:
                break
            if asyncio.get_running_loop().time() > deadline and await self._db(
                self._store.withdraw_rollout_action, action_id
            ):
                raise RolloutError(
                    "rollout.no_leader",
                    f"no leader took the {action.value} of {deployment} within {ACTION_TIMEOUT_S:g} s; "
                    "nothing changed",
                )
        await self._db(self._store.forget_rollout_action, action_id)
        state, outcome = found
        if state != ACTION_DONE:
            raise _refusal(outcome or "{}")
        rec = Rollout.from_json(outcome or "")
        self._records[rec.deployment] = rec
        return rec

    async def _take_actions(
        self, deployments: list[DeploymentRecord], by_dep: dict[str, list[ReplicaRecord]]
    ) -> bool:
        """The actions asked of this replica, and of the others (from the store), oldest first within
        each; True when one changed the store's deployments or replicas (a rollback)."""
        actions, self._actions = self._actions, []
        now = time.monotonic()
        if self._shared and (self._asked or now - self._asked_read >= ASKED_POLL_S):
            self._asked, self._asked_read = False, now
            for action_id, name, kind, reason in await self._db(self._store.pending_rollout_actions):
                try:
                    actions.append(_Action(Action(kind), name, reason, remote=action_id))
                except ValueError:
                    err = RolloutError("rollout.unknown_action", kind[:50])
                    await self._db(
                        self._store.finish_rollout_action, action_id, False, _refused(err), now_ms()
                    )
        changed = False
        by_name = {d.name: d for d in deployments}
        for action in actions:
            try:
                rec, moved = await self._act(action, by_name.get(action.deployment), by_dep)
            except Exception as err:  # RolloutError, NotFound: the caller hears it
                if action.remote is not None:
                    await self._db(
                        self._store.finish_rollout_action, action.remote, False, _refused(err), now_ms()
                    )
                elif action.done is not None and not action.done.done():
                    action.done.set_exception(err)
                continue
            changed |= moved
            if action.remote is not None:
                await self._db(
                    self._store.finish_rollout_action, action.remote, True, rec.to_json(), now_ms()
                )
            elif action.done is not None and not action.done.done():
                action.done.set_result(rec)
        return changed

    async def _act(
        self, action: _Action, dep: DeploymentRecord | None, by_dep: dict[str, list[ReplicaRecord]]
    ) -> tuple[Rollout, bool]:
        if dep is None:
            raise NotFound("deployment", action.deployment)
        rec = self._records.get(dep.name)
        if rec is None:
            raise RolloutError("rollout.none", f"deployment {dep.name} has no rollout")
        now = now_ms()
        why = action.reason or f"by the operator ({action.kind})"
        if action.kind == Action.PAUSE:
            if rec.state != RolloutState.PROGRESSING:
                raise RolloutError("rollout.not_progressing", f"the rollout of {dep.name} is {rec.state}")
            self._windows.pop(dep.name, None)
            rec = await self._transition(
                rec.moved(RolloutState.PAUSED, now, reason="rollout.paused.operator", message=why),
                "rollout.paused",
                f"paused at step {rec.step + 1}: {why}",
            )
            return rec, False
        if action.kind == Action.RESUME:
            if rec.state != RolloutState.PAUSED:
                raise RolloutError("rollout.not_paused", f"the rollout of {dep.name} is {rec.state}")
            rec = await self._transition(
                rec.moved(
                    RolloutState.PROGRESSING, now, reason="rollout.resumed", message=why, observe_since_ms=0
                ),
                "rollout.progress",
                f"resumed at step {rec.step + 1}",
            )
            return rec, False
        if rec.active and rec.to_generation == dep.generation:  # Action.UNDO
            return await self._roll_back(dep, rec, "rollout.undo", why, {}), True
        raise RolloutError(
            "rollout.not_active",
            f"the rollout of {dep.name} is {rec.state}; to return to {rec.from_model}, apply it again",
        )

    # ------------------------------------------------------------ progress

    async def _advance(self, dep: DeploymentRecord, reps: list[ReplicaRecord]) -> bool:
        """Move the rollout of ``dep`` by what its replicas and the fleet's telemetry show; True
        when it rolled back (the store's deployments and replicas changed)."""
        strategy = dep.manifest.spec.strategy
        rec = self._records.get(dep.name)
        old = [r for r in reps if r.generation != dep.generation]
        self._counts[dep.name] = live_counts(dep, reps)
        if rec is None or dep.generation not in (rec.to_generation, rec.rollback_generation):
            if strategy is not None and old:
                await self._start(dep, rec, old)
            return False
        if strategy is None or not rec.active:
            return False
        return await _StepPass(self, dep, strategy, rec, reps).run()

    async def _start(self, dep: DeploymentRecord, previous: Rollout | None, old: list[ReplicaRecord]) -> None:
        if previous is not None and previous.active:
            # Superseded mid-way: the last good generation is still the one that rollout started from.
            stable_gen = previous.from_generation
        else:
            running = Counter(r.generation for r in old if r.phase == Phase.RUNNING)
            stable_gen = (running or Counter(r.generation for r in old)).most_common(1)[0][0]
        template = await self._db(self._store.get_template, dep.name, stable_gen)
        now = now_ms()
        strategy = dep.manifest.spec.strategy
        assert strategy is not None
        model = dep.manifest.spec.model
        rec = Rollout(
            deployment=dep.name,
            from_generation=stable_gen,
            to_generation=dep.generation,
            from_model=f"{template.spec.model.name}:{template.spec.model.version}",
            to_model=f"{model.name}:{model.version}",
            strategy=strategy.type,
            state=RolloutState.PROGRESSING,
            step=0,
            started_ms=now,
            updated_ms=now,
            reason="rollout.started",
            message=f"generation {stable_gen} -> {dep.generation}",
            baseline_confidence=previous.baseline_confidence if previous is not None else -1.0,
        )
        self._windows.pop(dep.name, None)
        counts = step_counts(strategy, dep.manifest.spec.replicas)
        rec = await self._save(rec)
        if previous is not None and previous.active:
            self._publish(
                previous,
                "rollout.progress",
                f"rollout to {previous.to_model} superseded by generation {dep.generation}",
            )
        self._publish(
            rec,
            "rollout.started",
            f"{strategy.type} {rec.from_model} -> {rec.to_model} in {len(counts)} step(s) of "
            f"{counts} replicas, each observed for {strategy.pause}",
        )

    async def _roll_back(
        self, dep: DeploymentRecord, rec: Rollout, reason: str, message: str, figures: dict[str, float]
    ) -> Rollout:
        now = now_ms()
        strategy = dep.manifest.spec.strategy
        counts = step_counts(strategy, dep.manifest.spec.replicas) if strategy is not None else [0]
        step = min(rec.step, len(counts) - 1)
        entry = StepRecord(step, counts[step], "failed", now, reason, figures)
        rolled = rec.moved(
            RolloutState.ROLLED_BACK,
            now,
            reason=reason,
            message=message,
            rollback_generation=dep.generation + 1,
            history=(*rec.history, entry),
        )
        # One transaction: the stable template as a new generation, and the rollout's record.
        record = await self._db(
            self._store.roll_back, dep.name, dep.generation, rec.from_generation, rolled.to_json(), now
        )
        self._records[dep.name] = rolled
        self._windows.pop(dep.name, None)
        log.warning("rollout of %s rolled back to %s: %s %s", dep.name, rec.from_model, reason, message)
        self._publish(
            rolled,
            "rollout.rollback",
            f"rolled back {rec.to_model} -> {rec.from_model} at step {step + 1}: {message}",
            node_pb2.SEVERITY_WARNING,
            generation=record.generation,
        )
        return rolled

    async def _transition(
        self, rec: Rollout, kind: str, message: str, severity: node_pb2.Severity = node_pb2.SEVERITY_INFO
    ) -> Rollout:
        """Save ``rec`` (the rollout after a transition), then announce it as a ``kind`` event."""
        rec = await self._save(rec)
        self._publish(rec, kind, message, severity)
        return rec

    async def _save(self, rec: Rollout) -> Rollout:
        await self._db(self._store.put_rollout, rec.deployment, rec.to_json(), rec.updated_ms)
        self._records[rec.deployment] = rec
        return rec

    def _publish(
        self,
        rec: Rollout,
        kind: str,
        message: str,
        severity: node_pb2.Severity = node_pb2.SEVERITY_INFO,
        **extra: object,
    ) -> None:
        self._events.publish(kind, f"deployment/{rec.deployment}", message, severity, **extra, **_attrs(rec))

    # ------------------------------------------------------------ telemetry

    def _counters(self) -> dict[tuple[str, str], Counters]:
        out = {}
        for node_id, node in self._fleet.nodes.items():
            if node.telemetry is None:
                continue
            for stats in node.telemetry.models:
                out[(node_id, f"{stats.model_name}:{stats.model_version}")] = Counters.of(stats)
        return out

    def _observed(
        self, window: _Window, rec: Rollout, current: list[ReplicaRecord]
    ) -> tuple[Counters, float, Counters]:
        """(new version's counters, its worst p95, stable version's counters) over the window."""
        new, stable, p95 = Counters(), Counters(), 0.0
        hosts = {r.node_id for r in current if r.node_id}
        for node_id, node in self._fleet.nodes.items():
            if node.telemetry is None:
                continue
            for stats in node.telemetry.models:
                key = f"{stats.model_name}:{stats.model_version}"
                if key not in (rec.to_model, rec.from_model):
                    continue
                delta = Counters.of(stats).since(window.base.get((node_id, key)))
                if key == rec.to_model:
                    new = new + delta
                    if delta.attempts and node_id in hosts and math.isfinite(stats.latency_p95_ms):
                        p95 = max(p95, stats.latency_p95_ms)
                else:
                    stable = stable + delta
        return new, p95, stable

    # ------------------------------------------------------------ views

    def status_pb(
        self,
        deployment: DeploymentRecord,
        rec: Rollout | None = None,
        replicas: list[ReplicaRecord] | None = None,
        live: tuple[int, int] | None = None,
    ) -> api_pb2.RolloutStatus:
        """``replicas``: the deployment's, as the store has them: its live counts are taken from them
        (on any replica); or ``live``, those counts (``live_counts``) as the store counted them;
        without either, from this controller's last pass (the leader's only)."""
        rec = rec or self._records.get(deployment.name)
        if rec is None:
            return api_pb2.RolloutStatus(deployment=deployment.name)
        strategy = deployment.manifest.spec.strategy
        want = deployment.manifest.spec.replicas
        counts = step_counts(strategy, want) if strategy is not None else [want]
        step = min(rec.step, len(counts) - 1)
        if live is None:
            live = (
                live_counts(deployment, replicas)
                if replicas is not None
                else self._counts.get(deployment.name, (0, 0))
            )
        new_running, old_live = live
        window = self._windows.get(deployment.name)
        return api_pb2.RolloutStatus(
            deployment=rec.deployment,
            state=_STATE_PB[rec.state],
            strategy=rec.strategy,
            from_generation=rec.from_generation,
            to_generation=rec.to_generation,
            from_model=rec.from_model,
            to_model=rec.to_model,
            step=step + 1,
            steps=len(counts),
            step_replicas=counts[step],
            replicas=want,
            new_running=new_running,
            old_live=old_live,
            observing_since_unix_ms=rec.observe_since_ms,
            reason=rec.reason,
            message=rec.message,
            started_unix_ms=rec.started_ms,
            updated_unix_ms=rec.updated_ms,
            rollback_generation=rec.rollback_generation,
            figures=window.figures if window is not None and rec.active else {},
            history=[
                api_pb2.RolloutStep(
                    step=h.step + 1,
                    replicas=h.replicas,
                    verdict=h.verdict,
                    at_unix_ms=h.at_ms,
                    reason=h.reason,
                    figures=h.figures,
                )
                for h in rec.history
            ],
        )


def live_counts(dep: DeploymentRecord, replicas: Iterable[ReplicaRecord]) -> tuple[int, int]:
    """(replicas of the deployment's generation Running, replicas of other generations), evicted
    ones aside (they stay in the store until their node confirms the undeploy), as the passes count."""
    return counted_live(dep.generation, ((r.generation, r.phase, 1) for r in replicas))


def counted_live(generation: int, counts: Iterable[tuple[int, Phase, int]]) -> tuple[int, int]:
    """:func:`live_counts` of (generation, phase, how many) rows, as the store counts them: one rule
    for the passes, the full views and the views of counts."""
    new_running = old = 0
    for gen, phase, n in counts:
        if phase == Phase.EVICTED:
            continue
        if gen != generation:
            old += n
        elif phase == Phase.RUNNING:
            new_running += n
    return new_running, old


class _StepPass:
    """One look at the step in progress of one rollout: one method per phase (a replica of the
    new version failed, the step's replicas are not all running yet, the step is observed and its
    gates decide); each outcome goes through the controller's one transition helper."""

    def __init__(
        self,
        ctl: RolloutController,
        dep: DeploymentRecord,
        strategy: StrategySpec,
        rec: Rollout,
        reps: list[ReplicaRecord],
    ) -> None:
        self.ctl = ctl
        self.dep = dep
        self.strategy = strategy
        self.rec = rec
        self.current = [r for r in reps if r.generation == dep.generation]
        self.old = [r for r in reps if r.generation != dep.generation]
        self.now = now_ms()
        self.replicas = dep.manifest.spec.replicas
        self.counts = step_counts(strategy, self.replicas)
        self.step = min(rec.step, len(self.counts) - 1)

    async def run(self) -> bool:
        """True when the rollout rolled back."""
        if await self._replica_failed():
            return True
        if self.rec.state == RolloutState.PAUSED:
            return False
        if self.rec.observe_since_ms == 0 or self.dep.name not in self.ctl._windows:
            await self._observe_when_ready()
            return False
        verdict = self._judge()
        if verdict.outcome == Outcome.FAILED:
            await self.ctl._roll_back(self.dep, self.rec, verdict.reason, verdict.message, verdict.figures)
            return True
        if verdict.outcome == Outcome.NO_DATA:
            await self._pause(verdict)
        elif verdict.outcome == Outcome.PASSED:
            await self._passed(verdict)
        return False

    async def _replica_failed(self) -> bool:
        # A replica the node could not load or keep (not one a node never acknowledged: that says
        # nothing about the version).
        failed = [r for r in self.current if r.phase == Phase.FAILED and r.reason != "dispatch.timeout"]
        if not failed:
            return False
        rep = failed[0]
        message = (
            f"replica {rep.id} of {self.rec.to_model} failed on {rep.node_id}: {rep.reason} {rep.message}"
        )
        await self.ctl._roll_back(self.dep, self.rec, "rollout.gate.replica_failed", message.strip(), {})
        return True

    async def _observe_when_ready(self) -> None:
        """Start observing the step once its new replicas run and the old ones are down to its share."""
        want = self.counts[self.step]
        new_running = sum(r.phase == Phase.RUNNING for r in self.current)
        if new_running < want or len(self.old) > self.replicas - want:
            return
        self.ctl._windows[self.dep.name] = _Window(self.now, self.ctl._counters())
        self.rec = await self.ctl._transition(
            replace(self.rec, observe_since_ms=self.now, updated_ms=self.now),
            "rollout.progress",
            f"step {self.step + 1}/{len(self.counts)}: {want}/{self.replicas} replicas on "
            f"{self.rec.to_model}; observing for {self.strategy.pause}",
        )

    def _judge(self) -> Verdict:
        window = self.ctl._windows[self.dep.name]
        new, p95, stable = self.ctl._observed(window, self.rec, self.current)
        verdict = evaluate(
            self.strategy,
            self.dep.manifest.spec.requirements.max_latency_ms,
            new,
            p95,
            stable,
            self.rec.baseline_confidence,
            (self.now - window.since_ms) / 1000,
        )
        window.figures = verdict.figures
        return verdict

    async def _pause(self, verdict: Verdict) -> None:
        entry = StepRecord(
            self.step, self.counts[self.step], "paused", self.now, verdict.reason, verdict.figures
        )
        self.ctl._windows.pop(self.dep.name, None)
        await self.ctl._transition(
            self.rec.moved(
                RolloutState.PAUSED,
                self.now,
                reason=verdict.reason,
                message=verdict.message,
                history=(*self.rec.history, entry),
            ),
            "rollout.paused",
            f"paused at step {self.step + 1}: {verdict.message}",
            node_pb2.SEVERITY_WARNING,
        )

    async def _passed(self, verdict: Verdict) -> None:
        rec, step, counts = self.rec, self.step, self.counts
        entry = StepRecord(step, counts[step], "passed", self.now, "", verdict.figures)
        baseline = verdict.figures.get("stable_confident_share", rec.baseline_confidence)
        self.ctl._windows.pop(self.dep.name, None)
        history = (*rec.history, entry)
        if step + 1 >= len(counts):
            await self.ctl._transition(
                rec.moved(
                    RolloutState.COMPLETED,
                    self.now,
                    reason="rollout.completed",
                    message=f"every replica runs {rec.to_model}",
                    history=history,
                    baseline_confidence=baseline,
                ),
                "rollout.completed",
                f"{rec.from_model} -> {rec.to_model}: all {len(counts)} steps passed",
            )
            return
        figures = _figures_text(verdict.figures)
        await self.ctl._transition(
            replace(
                rec,
                step=step + 1,
                observe_since_ms=0,
                updated_ms=self.now,
                reason="rollout.step_passed",
                message=f"step {step + 1} passed: {figures}",
                history=history,
                baseline_confidence=baseline,
            ),
            "rollout.progress",
            f"step {step + 1}/{len(counts)} passed ({figures}); "
            f"going to {counts[step + 1]}/{self.replicas} replicas on {rec.to_model}",
        )
        self.ctl._wake()


def _attrs(rec: Rollout) -> dict[str, object]:
    return {
        "deployment": rec.deployment,
        "from": rec.from_model,
        "to": rec.to_model,
        "step": rec.step + 1,
        "state": rec.state.value,
        "reason": rec.reason,
    }


def _figures_text(figures: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in sorted(figures.items()))
