"""The reconciler's pass on a real SQLite store, without a broker: reasons and pass accounting."""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgeward.v1 import api_pb2, node_pb2
from orchestrator.config import OrchestratorConfig
from orchestrator.fleet import Fleet
from orchestrator.manifest import parse_manifest
from orchestrator.phases import Phase
from orchestrator.reconciler import Reconciler
from orchestrator.scheduler import Scheduler
from orchestrator.store import ModelRecord, ReplicaRecord, SqlStore

MANIFEST = (
    "apiVersion: edgeward/v1\nkind: Deployment\nmetadata: {name: vib}\n"
    "spec:\n  model: {name: vib-cnn, version: 1.0.0}\n  replicas: 1\n"
)


class NoTrust:
    """No node is attested (there are no nodes here): the reconciler's trust seam."""

    def tier(self, node_id: str) -> str:
        return "none"

    def why_not_trusted(self, node_id: str) -> tuple[str, str] | None:
        return None

    def release_key(self, node_id: str, name: str, version: str, data_key: bytes) -> bytes:
        raise AssertionError("no key is released without a node")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqlStore]:
    store = SqlStore(tmp_path / "orch")
    yield store
    store.close()


def reconciler(store: SqlStore, tmp_path: Path) -> Reconciler:
    async def db(fn, *args):
        return fn(*args)

    async def publish(node_id: str, cmd: node_pb2.Command) -> None:
        raise AssertionError(f"nothing to send to {node_id}")

    return Reconciler(
        store,
        db,
        Fleet(),
        Scheduler(),
        publish,
        OrchestratorConfig(state_dir=tmp_path / "orch"),
        artifact_endpoint=lambda: "127.0.0.1:1",
        on_change=lambda _: None,
        trust=NoTrust(),
    )


def push(store: SqlStore) -> None:
    digest = hashlib.sha256(b"x").hexdigest()
    info = api_pb2.Model(name="vib-cnn", version="1.0.0", sha256=digest, size=1, dtypes=["INT8"])
    store.put_model(ModelRecord("vib-cnn", "1.0.0", digest, 1, info.SerializeToString(), 1), b"x")


async def test_a_model_missing_from_the_catalog_is_model_not_found(store, tmp_path) -> None:
    store.put_deployment(parse_manifest(MANIFEST), 1)
    await reconciler(store, tmp_path).reconcile_once()
    [replica] = store.list_replicas("vib")
    assert replica.reason == "model.not_found"


async def test_a_store_failure_in_the_model_lookup_is_not_model_not_found(
    store, tmp_path, monkeypatch
) -> None:
    """Fault injection at the store seam: the catalog lookup fails as a locked database would. The
    pass fails (the control loop logs it and retries) and decides nothing; no replica is told its
    model does not exist."""
    store.put_deployment(parse_manifest(MANIFEST), 1)
    push(store)
    rec = reconciler(store, tmp_path)

    def locked(*args: object) -> ModelRecord:
        raise sqlite3.OperationalError("database is locked")

    with monkeypatch.context() as patch:
        patch.setattr(store, "get_model", locked)
        with pytest.raises(sqlite3.OperationalError):
            await rec.reconcile_once()
    assert store.list_replicas("vib") == []
    assert rec.passes == 1  # a failed pass still counts: nobody waiting on passes hangs
    await rec.reconcile_once()  # the store is back: the replica is placed, or says why not
    [replica] = store.list_replicas("vib")
    assert replica.reason.startswith("scheduler.")


async def test_wait_passes_returns_after_whole_passes(store, tmp_path) -> None:
    rec = reconciler(store, tmp_path)
    loop = asyncio.create_task(rec.run())
    try:
        before = rec.passes
        await asyncio.wait_for(rec.wait_passes(2), 30)
        assert rec.passes >= before + 2
    finally:
        loop.cancel()
        with pytest.raises(asyncio.CancelledError):
            await loop


async def test_the_grace_period_starts_when_the_fleet_can_be_heard(store, tmp_path) -> None:
    """A replica on a node not heard from yet is unknown, not lost, for one node timeout from the
    moment the orchestrator could first hear the fleet (start_grace), however long the start-up
    took before it."""
    from orchestrator.phases import Phase
    from orchestrator.store import ReplicaChange, ReplicaRecord

    store.put_deployment(parse_manifest(MANIFEST), 1)
    push(store)
    bound = ReplicaRecord("vib-1", "vib", 1, "vib-cnn", "1.0.0", Phase.RUNNING, 1, node_id="node-1")
    store.apply_replica_changes([ReplicaChange(bound)])
    rec = reconciler(store, tmp_path)
    rec._grace_ends -= 3600  # a start-up that took longer than the node timeout before subscribing
    rec.start_grace()
    await rec.reconcile_once()
    [replica] = store.list_replicas("vib")
    assert replica.phase == Phase.RUNNING, replica.reason
    rec._grace_ends -= 3600  # the grace is over and the node never spoke: now it is lost
    await rec.reconcile_once()
    phases = {r.id: (r.phase, r.reason) for r in store.list_replicas("vib")}
    assert phases["vib-1"] == (Phase.EVICTED, "node.lost")


async def test_the_grace_period_covers_the_fleets_reconnect(store, tmp_path) -> None:
    """With an embedded broker that started with the orchestrator, every node must reconnect before
    it can be heard, at its own backoff: the grace is that long plus one node timeout, and a
    replica on a node that comes back within it is never evicted."""
    from orchestrator.phases import Phase
    from orchestrator.store import ReplicaChange, ReplicaRecord

    store.put_deployment(parse_manifest(MANIFEST), 1)
    push(store)
    bound = ReplicaRecord("vib-1", "vib", 1, "vib-cnn", "1.0.0", Phase.RUNNING, 1, node_id="node-1")
    store.apply_replica_changes([ReplicaChange(bound)])
    rec = reconciler(store, tmp_path)
    timeout = rec._config.node_timeout_s
    rec.start_grace(reconnect_s=8.0)
    rec._grace_ends -= timeout + 1.0  # one node timeout and a second of the reconnect gone by
    await rec.reconcile_once()
    [replica] = store.list_replicas("vib")
    assert replica.phase == Phase.RUNNING, replica.reason
    rec._grace_ends -= 7.0  # the whole reconnect allowance too: the silent node is lost
    await rec.reconcile_once()
    phases = {r.id: (r.phase, r.reason) for r in store.list_replicas("vib")}
    assert phases["vib-1"] == (Phase.EVICTED, "node.lost")


async def test_resends_of_one_replica_back_off_to_four_times_the_interval(store, tmp_path) -> None:
    """A node slow to act on a command is sent it again after resend_interval_s, then after twice and
    four times that; once it reports the replica moving on, the next resend comes early again."""
    rec = reconciler(store, tmp_path)
    interval = rec._config.resend_interval_s
    rep = ReplicaRecord("vib-1", "vib", 1, "vib-cnn", "1.0.0", Phase.EVICTED, 0, node_id="node-1")
    commands: list = []
    sent_at = []
    rec._last_sent[rep.id] = t = 1000.0  # sent when it was bound (or evicted)
    while t < 1000.0 + 12 * interval:
        before = len(commands)
        rec._resend(commands, rep, t, undeploy=True)
        if len(commands) > before:
            sent_at.append((t - 1000.0) / interval)
        t += interval / 10
    assert [round(s, 1) for s in sent_at] == [1.0, 3.0, 7.0, 11.0]

    rec._resent.pop(rep.id)  # what following a report that moved the replica does
    before = len(commands)
    rec._resend(commands, rep, t + interval, undeploy=True)
    assert len(commands) == before + 1
