"""Rollout actions asked of a replica that does not lead go to the leader through the store: the
leader's next pass takes them, the asking replica answers with the outcome or with the refusal (its
reason id and message, as the leader would have said it); with no leader the action is withdrawn
and refused as such. Two controllers on one real PostgreSQL, as two replicas hold them."""

from __future__ import annotations

import asyncio
import contextlib
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import pytest
from test_rollout_controller import manifest, record

from orchestrator import rollout as rollout_module
from orchestrator.errors import NotFound
from orchestrator.events import EventBus
from orchestrator.fleet import Fleet
from orchestrator.rollout import RolloutController, RolloutError, RolloutState
from orchestrator.store import SqlStore


class Replica:
    """One replica's store and rollout controller, its store calls on one thread as in the server."""

    def __init__(self, store: SqlStore, leading: bool) -> None:
        self.store = store
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="test-store")
        self.rollouts = RolloutController(
            store, self.db, Fleet(), EventBus(), 10.0, wake=lambda: None, leading=lambda: leading, shared=True
        )

    async def db(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pool, partial(fn, *args))

    def close(self) -> None:
        self._pool.shutdown()
        self.store.close()


@pytest.fixture
async def replicas(tmp_path, postgres_url):
    """(leader, follower): a canary rollout of d1 at its second step, stored."""
    leader = Replica(SqlStore(tmp_path / "leader", postgres_url), leading=True)
    follower = Replica(SqlStore(tmp_path / "follower", postgres_url), leading=False)
    try:
        leader.store.put_deployment(manifest("1.0.0"), 1)
        leader.store.put_deployment(manifest("2.0.0"), 2)
        leader.store.put_rollout("d1", record().to_json(), 2)
        for replica in (leader, follower):
            await replica.rollouts.load(announce=False)
        yield leader, follower
    finally:
        leader.close()
        follower.close()


@contextlib.asynccontextmanager
async def passes(leader: Replica):
    """The leader's reconcile passes, each ticking the rollout controller, until the block ends."""

    async def run() -> None:
        while True:
            deployments = await leader.db(leader.store.list_deployments)
            await leader.rollouts.tick(deployments, await leader.db(leader.store.list_replicas))
            await asyncio.sleep(0.05)

    task = asyncio.create_task(run())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def actions_left(store: SqlStore) -> int:
    with store.engine.connect() as conn:
        return conn.exec_driver_sql("SELECT count(*) FROM rollout_actions").scalar_one()


async def test_a_follower_asks_the_leader_and_answers_with_its_outcome(replicas):
    leader, replica = replicas
    follower = replica.rollouts
    async with passes(leader):
        paused = await follower.request("pause", "d1", "hold for a look")
        assert (paused.state, paused.reason, paused.step) == (
            RolloutState.PAUSED,
            "rollout.paused.operator",
            1,
        )
        assert leader.rollouts.get("d1") == paused and follower.get("d1") == paused
        # Refusals come back with the leader's reason and words.
        with pytest.raises(RolloutError) as err:
            await follower.request("pause", "d1")
        assert (err.value.reason, str(err.value)) == (
            "rollout.not_progressing",
            "rollout.not_progressing: the rollout of d1 is Paused",
        )
        with pytest.raises(NotFound, match="deployment 'nope' not found"):
            await follower.request("resume", "nope")
        resumed = await follower.request("resume", "d1")
        assert resumed.state == RolloutState.PROGRESSING
    stored = rollout_module.Rollout.from_json(leader.store.list_rollouts()["d1"])
    assert (stored.state, stored.step) == (RolloutState.PROGRESSING, 1)
    assert actions_left(leader.store) == 0, "every outcome read and forgotten"


async def test_without_a_leader_the_action_is_withdrawn_and_refused(replicas, monkeypatch):
    leader, follower = replicas
    monkeypatch.setattr(rollout_module, "ACTION_TIMEOUT_S", 0.5)
    with pytest.raises(RolloutError, match="no leader took the pause of d1") as err:
        await follower.rollouts.request("pause", "d1")
    assert err.value.reason == "rollout.no_leader"
    assert actions_left(leader.store) == 0
    stored = rollout_module.Rollout.from_json(leader.store.list_rollouts()["d1"])
    assert stored.state == RolloutState.PROGRESSING, "nothing changed"


def test_the_stores_rows_of_actions(tmp_path, store_url):
    """On both engines: asked, taken once (a second outcome is not written over the first), read
    back, withdrawn only while pending, and outcomes nobody read go after ACTIONS_KEPT_MS."""
    from orchestrator.store import ACTIONS_KEPT_MS

    store = SqlStore(tmp_path, store_url)
    try:
        first = store.request_rollout_action("d1", "pause", "a look", 1_000)
        second = store.request_rollout_action("d2", "undo", "", 2_000)
        assert store.pending_rollout_actions() == [
            (first, "d1", "pause", "a look"),
            (second, "d2", "undo", ""),
        ]
        store.finish_rollout_action(first, True, "{}", 3_000)
        store.finish_rollout_action(first, False, "late", 3_000)
        assert store.rollout_action(first) == ("done", "{}")
        assert store.pending_rollout_actions() == [(second, "d2", "undo", "")]
        assert not store.withdraw_rollout_action(first), "taken: its outcome stands"
        assert store.withdraw_rollout_action(second)
        assert store.rollout_action(second) is None
        later = store.request_rollout_action("d1", "resume", "", 4_000)
        store.finish_rollout_action(later, False, "{}", 1_000 + ACTIONS_KEPT_MS + 1)
        assert store.rollout_action(first) is None, "an outcome nobody came back for"
        assert store.rollout_action(later) == ("refused", "{}")
        store.forget_rollout_action(later)
        assert store.rollout_action(later) is None
    finally:
        store.close()
