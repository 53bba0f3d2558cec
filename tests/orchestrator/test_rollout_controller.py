"""Rollouts without a fleet: strategy validation, step sizes, the replica split, the gates, the
persisted record and the store's rollback transaction."""

from __future__ import annotations

import pytest

from orchestrator.errors import IllegalTransition, InvalidManifest, NotFound
from orchestrator.manifest import parse_manifest
from orchestrator.phases import Phase
from orchestrator.rollout import (
    Counters,
    Rollout,
    RolloutState,
    Split,
    StepRecord,
    counted_live,
    evaluate,
    live_counts,
    step_counts,
)
from orchestrator.store import DeploymentRecord, ReplicaChange, ReplicaRecord, SqlStore

BASE = """apiVersion: edgeward/v1
kind: Deployment
metadata: {name: d1}
spec:
  model: {name: m, version: VERSION}
  replicas: REPLICAS
"""


def manifest(version: str = "1.0.0", replicas: int = 4, strategy: str = "{type: canary}"):
    text = BASE.replace("VERSION", version).replace("REPLICAS", str(replicas))
    return parse_manifest(text + (f"  strategy: {strategy}\n" if strategy else ""))


def strategy(text: str = "{type: canary}"):
    s = manifest(strategy=text).spec.strategy
    assert s is not None
    return s


# ---------------------------------------------------------------- manifest


@pytest.mark.parametrize(
    ("text", "path", "reason"),
    [
        ("{type: canary, steps: [50, 10, 100]}", "spec.strategy.steps", "strictly increasing"),
        ("{type: canary, steps: [10, 50]}", "spec.strategy.steps", "must end at 100"),
        ("{type: canary, steps: [0, 100]}", "spec.strategy.steps[0]", "greater than or equal to 1"),
        ("{type: rolling, steps: [100]}", "spec.strategy", "steps are for type canary"),
        ("{type: blue-green}", "spec.strategy.type", "'rolling' or 'canary'"),
        ("{type: canary, pause: 30}", "spec.strategy.pause", "duration"),
        ("{type: canary, pause: 2d}", "spec.strategy.pause", "duration"),
        ("{type: canary, maxUnavailable: -1}", "spec.strategy.maxUnavailable", "greater than or equal to 0"),
        ("{type: canary, gates: {maxErrorRate: 1.5}}", "spec.strategy.gates.maxErrorRate", "less than"),
        ("{type: canary, gates: {minInferences: 0}}", "spec.strategy.gates.minInferences", "greater"),
        ("{type: canary, gates: {p99: 3}}", "spec.strategy.gates.p99", "Extra inputs"),
        (
            "{type: canary, gates: {progressDeadline: soon}}",
            "spec.strategy.gates.progressDeadline",
            "duration",
        ),
    ],
)
def test_bad_strategy_is_refused_with_field_path(text, path, reason):
    with pytest.raises(InvalidManifest) as info:
        manifest(strategy=text)
    assert any(p == path and reason in r for p, r in info.value.errors), info.value.errors


def test_strategy_parses_durations_and_defaults():
    s = strategy("{type: canary, pause: 1500ms, gates: {maxLatencyMs: 20, progressDeadline: 2m}}")
    assert (s.pause_s, s.canary_steps, s.max_unavailable) == (1.5, [10, 50, 100], 1)
    assert (s.gates.max_latency_ms, s.gates.progress_deadline_s, s.gates.max_error_rate) == (20, 120, 0.05)


def test_changing_only_the_strategy_makes_no_new_generation(tmp_path, store_url):
    store = SqlStore(tmp_path, store_url)
    try:
        store.put_deployment(manifest(strategy="{type: canary}"), 1)
        rec, _, changed = store.put_deployment(manifest(strategy="{type: rolling, maxUnavailable: 2}"), 2)
        assert (rec.generation, changed) == (1, True)
        rec, _, _ = store.put_deployment(manifest("2.0.0", strategy="{type: rolling}"), 3)
        assert rec.generation == 2
    finally:
        store.close()


# ---------------------------------------------------------------- steps and split


@pytest.mark.parametrize(
    ("text", "replicas", "counts"),
    [
        ("{type: canary}", 4, [1, 2, 4]),
        ("{type: canary}", 10, [1, 5, 10]),
        ("{type: canary, steps: [25, 100]}", 4, [1, 4]),
        ("{type: canary, steps: [1, 2, 100]}", 3, [1, 3]),  # equal counts collapse
        ("{type: canary}", 0, [0]),
        ("{type: rolling, maxUnavailable: 1}", 3, [1, 2, 3]),
        ("{type: rolling, maxUnavailable: 2}", 5, [2, 4, 5]),
        ("{type: rolling, maxUnavailable: 0}", 2, [1, 2]),
    ],
)
def test_step_counts(text, replicas, counts):
    assert step_counts(strategy(text), replicas) == counts


def rep(i: int, gen: int, phase: Phase = Phase.RUNNING, updated: int = 0) -> ReplicaRecord:
    return ReplicaRecord(f"r{gen}-{i}", "d1", gen, "m", f"{gen}.0.0", phase, updated, node_id=f"n{i}")


def test_split_retires_old_only_within_max_unavailable():
    split = Split(new=2, old=2, max_unavailable=1, stable_generation=1, stable_model=("m", "1.0.0"))
    old = [rep(i, 1) for i in range(4)]
    # New replicas not running yet: one old may go (4 running -> 3 = 4 - maxUnavailable).
    evict, missing = split.retire([rep(0, 2, Phase.PENDING), rep(1, 2, Phase.PENDING)], old)
    assert (len(evict), missing) == (1, 0)
    # One new runs: the second surplus old may go too.
    evict, missing = split.retire([rep(0, 2), rep(1, 2, Phase.LOADING)], old)
    assert (len(evict), missing) == (2, 0)
    # maxUnavailable 0: nothing goes before a new one runs.
    strict = Split(2, 2, 0, 1, ("m", "1.0.0"))
    assert strict.retire([rep(0, 2, Phase.LOADING), rep(1, 2, Phase.LOADING)], old) == ([], 0)


def test_split_evicts_non_serving_first_and_replaces_lost_stable():
    split = Split(new=1, old=3, max_unavailable=0, stable_generation=1, stable_model=("m", "1.0.0"))
    old = [rep(0, 1), rep(1, 1, Phase.PENDING), rep(2, 1), rep(3, 1)]
    evict, missing = split.retire([rep(0, 2, Phase.PENDING)], old)
    assert [r.id for r in evict] == ["r1-1"] and missing == 0
    # Two stable replicas were lost (node gone): one comes back in kind, none is retired.
    evict, missing = split.retire([rep(0, 2)], [rep(0, 1), rep(1, 1)])
    assert (evict, missing) == ([], 1)
    # A superseded rollout's replicas (generation 3) go before any stable one.
    evict, _ = split.retire([rep(0, 2)], [rep(0, 1), rep(1, 1), rep(2, 1), rep(9, 3)])
    assert [r.generation for r in evict] == [3]


# ---------------------------------------------------------------- gates


def gates(text: str = "{type: canary, pause: 10s, gates: {minInferences: 20, maxLatencyMs: 0}}"):
    return strategy(text)


def test_gate_waits_for_enough_inferences_then_passes_after_the_pause():
    s = gates()
    few = Counters(attempts=5)
    assert evaluate(s, 50, few, 1.0, Counters(), -1, 60).outcome == "wait"
    ok = Counters(attempts=40, errors=1, scored=39, confident=35)
    stable = Counters(attempts=40, scored=40, confident=37)
    assert evaluate(s, 50, ok, 3.0, stable, -1, 5).outcome == "wait"
    verdict = evaluate(s, 50, ok, 3.0, stable, -1, 10)
    assert verdict.outcome == "pass"
    assert verdict.figures["error_rate"] == round(1 / 40, 4)
    assert verdict.figures["stable_confident_share"] == round(37 / 40, 4)


def test_gate_no_data_past_the_deadline():
    s = gates("{type: canary, pause: 1s, gates: {minInferences: 20, progressDeadline: 30s}}")
    verdict = evaluate(s, 0, Counters(attempts=3), 0.0, Counters(), -1, 31)
    assert (verdict.outcome, verdict.reason) == ("no_data", "rollout.gate.no_data")


@pytest.mark.parametrize(
    ("new", "p95", "stable", "baseline", "reason"),
    [
        (Counters(attempts=40, errors=8), 1.0, Counters(), -1, "rollout.gate.error_rate"),
        (Counters(attempts=40), 80.0, Counters(), -1, "rollout.gate.latency"),
        (
            Counters(attempts=40, scored=40, confident=10),
            1.0,
            Counters(attempts=40, scored=40, confident=38),
            -1,
            "rollout.gate.accuracy",
        ),
        # no stable figures in this window: the share measured at an earlier step is the baseline
        (Counters(attempts=40, scored=40, confident=10), 1.0, Counters(), 0.9, "rollout.gate.accuracy"),
    ],
)
def test_failing_gate_names_itself_before_the_pause_ends(new, p95, stable, baseline, reason):
    verdict = evaluate(gates(), 50, new, p95, stable, baseline, 1)
    assert (verdict.outcome, verdict.reason) == ("fail", reason)
    assert verdict.message


def test_latency_gate_uses_the_slo_unless_the_gate_sets_its_own():
    slow = Counters(attempts=40)
    assert evaluate(gates(), 50, slow, 60.0, Counters(), -1, 1).reason == "rollout.gate.latency"
    assert evaluate(gates(), 0, slow, 60.0, Counters(), -1, 1).outcome == "wait"  # no SLO, no gate
    own = gates("{type: canary, pause: 10s, gates: {minInferences: 20, maxLatencyMs: 100}}")
    assert evaluate(own, 50, slow, 60.0, Counters(), -1, 1).outcome == "wait"


def test_counters_survive_an_agent_restart():
    base = Counters(100, 2, 90, 80)
    assert Counters(130, 3, 120, 100).since(base) == Counters(30, 1, 30, 20)
    assert Counters(7, 0, 7, 7).since(base) == Counters(7, 0, 7, 7)  # restarted: counts since then


# ---------------------------------------------------------------- record and store


def record(**kw) -> Rollout:
    base = dict(
        deployment="d1",
        from_generation=1,
        to_generation=2,
        from_model="m:1.0.0",
        to_model="m:2.0.0",
        strategy="canary",
        state=RolloutState.PROGRESSING,
        step=1,
        started_ms=1,
        updated_ms=2,
        history=(StepRecord(0, 1, "passed", 2, "", {"p95_ms": 1.5}),),
    )
    base.update(kw)
    return Rollout(**base)


def test_record_round_trips_and_checks_transitions():
    rec = record()
    assert Rollout.from_json(rec.to_json()) == rec
    done = rec.moved(RolloutState.COMPLETED, 5)
    with pytest.raises(IllegalTransition):
        done.moved(RolloutState.PROGRESSING, 6)
    with pytest.raises(IllegalTransition):
        record(state=RolloutState.ROLLED_BACK).moved(RolloutState.PAUSED, 6)


def test_roll_back_relabels_stable_replicas_in_one_transaction(tmp_path, store_url):
    store = SqlStore(tmp_path, store_url)
    try:
        store.put_deployment(manifest("1.0.0"), 1)
        store.put_deployment(manifest("2.0.0"), 2)
        store.apply_replica_changes(
            [ReplicaChange(rep(i, 1)) for i in range(3)]
            + [ReplicaChange(rep(3, 1, Phase.EVICTED)), ReplicaChange(rep(0, 2))]
        )
        rec = record(state=RolloutState.ROLLED_BACK, rollback_generation=3)
        with pytest.raises(NotFound):  # the deployment moved on meanwhile: refused, nothing written
            store.roll_back("d1", 1, 1, rec.to_json(), 9)
        back = store.roll_back("d1", 2, 1, rec.to_json(), 9)
        assert (back.generation, back.manifest.spec.model.version) == (3, "1.0.0")
        by_gen = {(r.id, r.generation) for r in store.list_replicas()}
        assert {("r1-0", 3), ("r1-1", 3), ("r1-2", 3), ("r1-3", 1), ("r2-0", 2)} == by_gen
        assert Rollout.from_json(store.list_rollouts()["d1"]) == rec
        assert store.get_template("d1", 3).spec.model.version == "1.0.0"
        store.delete_deployment("d1", 10)
        assert store.list_rollouts() == {}
        with pytest.raises(NotFound):
            store.get_template("d1", 1)
    finally:
        store.close()


def test_live_counts_leave_out_evicted_replicas():
    """A rollout's live counts as any replica's API gives them from the store: the new generation's
    Running replicas, and the other generations' replicas not evicted (an evicted one stays in the
    store until its node confirms the undeploy), as the leader's passes count them."""
    dep = DeploymentRecord("d1", 2, manifest("1.1.0"), 0, 0)

    def rep(rid: str, generation: int, phase: Phase) -> ReplicaRecord:
        return ReplicaRecord(rid, "d1", generation, "m", "1.1.0" if generation == 2 else "1.0.0", phase, 0)

    replicas = [
        rep("new-running", 2, Phase.RUNNING),
        rep("new-pending", 2, Phase.PENDING),
        rep("new-evicted", 2, Phase.EVICTED),
        rep("old-running", 1, Phase.RUNNING),
        rep("old-dispatched", 1, Phase.DISPATCHED),
        rep("old-evicted", 1, Phase.EVICTED),
    ]
    assert live_counts(dep, replicas) == (1, 2)
    assert live_counts(dep, []) == (0, 0)
    # The same rule over the store's (generation, phase, count) rows: the views of counts.
    rows = [(r.generation, r.phase, 1) for r in replicas] + [(dep.generation, Phase.RUNNING, 3)]
    assert counted_live(dep.generation, rows) == (4, 2)
