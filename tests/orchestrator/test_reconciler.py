"""The reconciler's pass on a real SQLite store, without a broker: reasons and pass accounting."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import sqlite3
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import pytest
from trust_stubs import Affirmed, NoTrust

from attestation.errors import KeyReleaseError
from edgeward.v1 import api_pb2, node_pb2
from edgeward.wire import node_message
from orchestrator import reconciler as reconciler_module
from orchestrator.config import OrchestratorConfig
from orchestrator.errors import StoreError
from orchestrator.fleet import Fleet
from orchestrator.manifest import parse_manifest
from orchestrator.phases import Phase
from orchestrator.reconciler import PUBLISH_WINDOW, Reconciler, publish_all
from orchestrator.scheduler import Scheduler
from orchestrator.store import ModelRecord, ReplicaRecord, SealedArtifact, SqlStore

MANIFEST = (
    "apiVersion: edgeward/v1\nkind: Deployment\nmetadata: {name: vib}\n"
    "spec:\n  model: {name: vib-cnn, version: 1.0.0}\n  replicas: 1\n"
)


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

    return built(store, tmp_path, Fleet(), db, publish, NoTrust())


def built(store: SqlStore, tmp_path: Path, fleet: Fleet, db, publish, trust) -> Reconciler:
    return Reconciler(
        store,
        db,
        fleet,
        Scheduler(),
        publish,
        OrchestratorConfig(state_dir=tmp_path / "orch"),
        artifact_endpoint=lambda: "127.0.0.1:1",
        on_change=lambda _: None,
        trust=trust,
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


async def test_a_pass_reads_the_store_again_only_after_a_write(store, tmp_path, monkeypatch) -> None:
    """The change feed's revision gates the read: a pass after one that wrote nothing reuses what it
    read, and a write through another handle on the same database (another replica, or the API)
    is read by the next pass."""
    store.put_deployment(parse_manifest(MANIFEST), 1)
    rec = reconciler(store, tmp_path)
    reads: list[int] = []
    real = store.list_replicas
    monkeypatch.setattr(store, "list_replicas", lambda *a: reads.append(1) or real(*a))
    await rec.reconcile_once()  # adds the replica, pending (no model): a write
    await rec.reconcile_once()  # reads it; nothing new to say
    await rec.reconcile_once()
    assert len(reads) == 2
    other = SqlStore(tmp_path / "orch")
    try:
        other.put_deployment(parse_manifest(MANIFEST.replace("replicas: 1", "replicas: 2")), 2)
    finally:
        other.close()
    await rec.reconcile_once()
    assert len(reads) == 3
    assert len(store.list_replicas("vib")) == 2
    assert {r.reason for r in store.list_replicas("vib")} == {"model.not_found"}


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


async def _direct(fn, *args):
    return fn(*args)


def affirmed(store: SqlStore, tmp_path: Path, fleet: Fleet, db, publish) -> Reconciler:
    """A reconciler whose nodes all hold an affirming attestation, past the start-up grace."""
    rec = built(store, tmp_path, fleet, db, publish, Affirmed())
    rec._grace_ends = 0.0
    return rec


def five_nodes_and_five_replicas(store: SqlStore) -> Fleet:
    """Five online nodes, a sealed model in the catalog and a deployment of five replicas."""
    fleet = Fleet()
    for i in range(5):
        acc = node_pb2.Accelerator(kind="cpu-litert", dtypes=["INT8"], peak_gops=1.0)
        hello = node_pb2.Hello(accelerators=[acc], max_replicas=8, memory_bytes=2**30, boot_unix_ms=1)
        fleet.apply(node_message(f"node-{i}", hello=hello))
        fleet.apply(node_message(f"node-{i}", status=node_pb2.Status(state=node_pb2.NODE_STATE_ONLINE)))
    blob = b"sealed model"
    info = api_pb2.Model(name="vib-cnn", version="1.0.0", sha256="0" * 64, size=5, dtypes=["INT8"])
    sealed = SealedArtifact(hashlib.sha256(blob).hexdigest(), len(blob), b"k" * 32)
    store.put_model(ModelRecord("vib-cnn", "1.0.0", "0" * 64, 5, info.SerializeToString(), 1), blob, sealed)
    store.put_deployment(parse_manifest(MANIFEST.replace("replicas: 1", "replicas: 5")), 1)
    return fleet


async def test_a_large_apply_is_saved_and_sent_in_slices(store, tmp_path, monkeypatch) -> None:
    """Binding many replicas, the pass saves and starts sending every COMMIT_SLICE bindings: the
    first nodes get their commands while the rest are bound, each after its decision is saved."""
    monkeypatch.setattr(reconciler_module, "COMMIT_SLICE", 2)
    fleet = five_nodes_and_five_replicas(store)
    writes = 0
    published: list[tuple[int, set[str]]] = []  # (saves started so far, replicas saved as dispatched)

    pool = ThreadPoolExecutor(1)  # the store's thread, as in the orchestrator: the loop runs meanwhile

    async def db(fn, *args):
        nonlocal writes
        writes += fn == store.apply_replica_changes
        return await asyncio.get_running_loop().run_in_executor(pool, partial(fn, *args))

    async def publish(node_id: str, cmd: node_pb2.Command) -> None:
        saved = {r.id for r in store.list_replicas("vib") if r.phase == Phase.DISPATCHED}
        published.append((writes, saved))
        assert cmd.deploy.replica_id in saved, "a command goes out only after its decision is saved"

    rec = affirmed(store, tmp_path, fleet, db, publish)
    try:
        await rec.reconcile_once()
    finally:
        pool.shutdown()
    assert writes == 3  # after the 2nd and the 4th binding, then the rest
    # The first slice's commands go out while the second slice is saved, and so on.
    assert [w for w, _ in published] == [2, 2, 3, 3, 3]
    assert len({r.node_id for r in store.list_replicas("vib")}) == 5


async def test_a_key_revoked_since_the_leader_read_it_does_not_go_out(store, tmp_path, monkeypatch) -> None:
    """Another replica revokes the model (destroying its key in the store) after this one read the
    key and before its trust refreshed: the releases are refused at their write, no deploy carrying
    the key is sent (also of a later slice, whose releases an earlier slice's save wrote), and a
    node's sync goes without it."""
    monkeypatch.setattr(reconciler_module, "COMMIT_SLICE", 2)
    fleet = five_nodes_and_five_replicas(store)
    sent: list[node_pb2.Command] = []
    pool = ThreadPoolExecutor(1)  # the store's thread: the pass binds on while a slice is saved

    async def db(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(pool, partial(fn, *args))

    async def publish(node_id: str, cmd: node_pb2.Command) -> None:
        sent.append(cmd)

    rec = affirmed(store, tmp_path, fleet, db, publish)
    entry = await rec._model("vib-cnn", "1.0.0")  # read (and cached) before the revocation
    store.set_model_state("vib-cnn", "1.0.0", "revoked", "leaked", 2)
    try:
        await rec.reconcile_once()
    finally:
        pool.shutdown()
    assert len(store.list_replicas("vib")) == 5  # bound and saved: only the keys stay home
    assert [c for c in sent if c.HasField("deploy")] == []
    assert [r for c in sent if c.HasField("sync") for r in c.sync.replicas] == []
    assert store.key_holders("vib-cnn", ["1.0.0"]) == set()

    assert entry is not None
    placed = store.list_replicas("vib")[0]
    body = node_pb2.DeployReplica(replica_id=placed.id, model_name="vib-cnn", model_version="1.0.0")
    other = reconciler_module.command("node-0", undeploy=node_pb2.UndeployReplica(replica_id="x"))
    with pytest.raises(KeyReleaseError):  # what it now knows: revoked
        rec._deploy_body(placed, entry)
    # A key released before (a node's earlier replica) and sent again is checked as well.
    rec2 = affirmed(store, tmp_path, fleet, db, publish)
    rec2._recorded.add(("vib-cnn", "1.0.0", "node-1"))
    assert await rec2._record_releases(set()) == set()  # nothing to write or send: no store call
    rec2._db = partial(_direct)
    assert await rec2._record_releases({("vib-cnn", "1.0.0")}) == {("vib-cnn", "1.0.0")}
    assert rec2._refused_keys == {("vib-cnn", "1.0.0")}
    sync = reconciler_module.command(placed.node_id or "", sync=node_pb2.SyncReplicas(replicas=[body]))
    kept = reconciler_module.without_keys([("n", sync), ("node-0", other)], {("vib-cnn", "1.0.0")})
    assert [(n, c.WhichOneof("body"), len(c.sync.replicas)) for n, c in kept] == [
        ("n", "sync", 0),
        ("node-0", "undeploy", 0),
    ]


async def test_the_pass_binds_on_while_the_store_saves(store, tmp_path, monkeypatch) -> None:
    """The binding does not wait for each slice's save: at 10,000 nodes those waits held it up for
    a seventh of its time. The first save is held until every replica is bound (it would wait for
    ever if binding waited for it: the timeout fails the test instead)."""
    monkeypatch.setattr(reconciler_module, "COMMIT_SLICE", 1)
    fleet = five_nodes_and_five_replicas(store)
    all_bound = asyncio.Event()

    class Counting(Affirmed):
        released = 0

        def release_key(self, node_id: str, name: str, version: str, data_key: bytes) -> bytes:
            Counting.released += 1
            if Counting.released == 5:
                all_bound.set()
            return super().release_key(node_id, name, version, data_key)

    held: list[int] = []  # replicas bound when the first save was let through

    async def db(fn, *args):
        if fn == store.apply_replica_changes and not held:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(all_bound.wait(), 5.0)
            held.append(Counting.released)
        return fn(*args)

    async def publish(node_id: str, cmd: node_pb2.Command) -> None:
        saved = {r.id for r in store.list_replicas("vib") if r.phase == Phase.DISPATCHED}
        assert cmd.deploy.replica_id in saved, "a command goes out only after its decision is saved"

    rec = built(store, tmp_path, fleet, db, publish, Counting())
    rec._grace_ends = 0.0
    await rec.reconcile_once()
    assert held == [5]
    assert {r.phase for r in store.list_replicas("vib")} == {Phase.DISPATCHED}


async def test_a_failed_save_fails_the_pass_and_nothing_after_it_is_saved_or_sent(
    store, tmp_path, monkeypatch
) -> None:
    """Saves run behind the binding, in order: when one fails, the saves after it write nothing,
    their commands are never sent, and the pass fails (the next one starts from the store)."""
    monkeypatch.setattr(reconciler_module, "COMMIT_SLICE", 1)
    fleet = five_nodes_and_five_replicas(store)
    writes = 0
    sent: list[str] = []

    async def db(fn, *args):
        nonlocal writes
        if fn == store.apply_replica_changes:
            writes += 1
            if writes == 2:
                raise StoreError("database is locked")
        return fn(*args)

    async def publish(node_id: str, cmd: node_pb2.Command) -> None:
        sent.append(cmd.deploy.replica_id)

    rec = affirmed(store, tmp_path, fleet, db, publish)
    with pytest.raises(StoreError):
        await rec.reconcile_once()
    dispatched = [r.id for r in store.list_replicas("vib") if r.phase == Phase.DISPATCHED]
    assert writes == 2 and len(dispatched) == 1 and sent == dispatched


async def test_a_long_pass_records_running_while_it_still_binds(store, tmp_path, monkeypatch) -> None:
    """A pass that binds for long follows the reports of the replicas it has already dispatched
    (at its yields): a node that runs its replica at once is recorded Running before the pass binds
    the last replica, not at the next pass."""
    monkeypatch.setattr(reconciler_module, "COMMIT_SLICE", 1)
    monkeypatch.setattr(reconciler_module, "PLACE_SLICE_S", 0.0)
    monkeypatch.setattr(reconciler_module, "FOLLOW_BOUND_S", 0.0)
    fleet = five_nodes_and_five_replicas(store)
    batches: list[list[tuple[str, Phase]]] = []  # each write: (replica, phase) of its changes

    async def db(fn, *args):
        if fn == store.apply_replica_changes:
            batches.append([(c.replica.id, c.replica.phase) for c in args[0]])
        return fn(*args)

    async def publish(node_id: str, cmd: node_pb2.Command) -> None:  # the node runs it at once
        report = node_pb2.ReplicaReport(
            replica_id=cmd.deploy.replica_id, phase=node_pb2.REPLICA_PHASE_RUNNING
        )
        seq = fleet.nodes[node_id].status_seq + 1
        status = node_pb2.Status(state=node_pb2.NODE_STATE_ONLINE, status_seq=seq, replicas=[report])
        fleet.apply(node_message(node_id, status=status))

    rec = affirmed(store, tmp_path, fleet, db, publish)
    await rec.reconcile_once()
    first_running = next(i for i, b in enumerate(batches) if any(p == Phase.RUNNING for _, p in b))
    last_bound = max(i for i, b in enumerate(batches) if any(p == Phase.DISPATCHED for _, p in b))
    assert first_running < last_bound, batches
    await rec.reconcile_once()  # the last ones, sent at the pass's end, at the next pass
    assert {r.phase for r in store.list_replicas("vib")} == {Phase.RUNNING}


async def test_a_replica_is_stamped_when_the_pass_changes_it(store, tmp_path, monkeypatch) -> None:
    """Not when the pass began: a long pass's last bindings would look older than they are (the
    dispatch timeout fails a replica by its stamp)."""
    clock = iter(range(1_000_000, 2_000_000, 1_000))  # every reading 1 s after the one before
    monkeypatch.setattr(reconciler_module, "now_ms", lambda: next(clock))
    fleet = five_nodes_and_five_replicas(store)

    async def db(fn, *args):
        return fn(*args)

    async def publish(node_id: str, cmd: node_pb2.Command) -> None:
        pass

    rec = affirmed(store, tmp_path, fleet, db, publish)
    await rec.reconcile_once()
    replicas = store.list_replicas("vib")
    assert {r.phase for r in replicas} == {Phase.DISPATCHED}
    assert len({r.updated_ms for r in replicas}) == 5, [r.updated_ms for r in replicas]


async def test_a_command_is_timed_from_when_its_replica_was_bound(store, tmp_path, monkeypatch) -> None:
    """Not from when the pass began: a replica bound late in a long pass and not acknowledged yet
    was sent its command again at the next pass, as if it had waited the whole pass."""
    monkeypatch.setattr(reconciler_module, "COMMIT_SLICE", 1)
    fleet = five_nodes_and_five_replicas(store)

    async def db(fn, *args):
        await asyncio.sleep(0.01)  # each binding's save takes time: the pass lasts
        return fn(*args)

    async def publish(node_id: str, cmd: node_pb2.Command) -> None:
        pass

    rec = affirmed(store, tmp_path, fleet, db, publish)
    await rec.reconcile_once()
    assert len(set(rec._last_sent.values())) == 5, rec._last_sent  # one time per binding


async def test_a_failed_save_stops_the_binding_at_the_next_flush(store, tmp_path, monkeypatch) -> None:
    """The pass does not bind (release keys, build commands) to the end before it notices that a
    save failed: the next flush raises it."""
    monkeypatch.setattr(reconciler_module, "COMMIT_SLICE", 1)
    monkeypatch.setattr(reconciler_module, "PLACE_SLICE_S", 0.0)  # a yield after every binding
    fleet = five_nodes_and_five_replicas(store)
    released: list[str] = []

    class Counting(Affirmed):
        def release_key(self, node_id: str, name: str, version: str, data_key: bytes) -> bytes:
            released.append(node_id)
            return super().release_key(node_id, name, version, data_key)

    async def db(fn, *args):
        if fn == store.apply_replica_changes:
            raise StoreError("database is locked")
        return fn(*args)

    async def publish(node_id: str, cmd: node_pb2.Command) -> None:
        raise AssertionError("nothing is sent after a failed save")

    rec = built(store, tmp_path, fleet, db, publish, Counting())
    rec._grace_ends = 0.0
    with pytest.raises(StoreError):
        await rec.reconcile_once()
    assert len(released) < 5, released


async def test_a_pass_cancelled_while_it_settles_leaves_nothing_running(store, tmp_path, monkeypatch) -> None:
    """A shutdown cancels a pass, then cancels it again when its bound runs out, while it waits for
    a save: the publishing that earlier saves started is cancelled with it, not left running (on a
    closed MQTT session)."""
    monkeypatch.setattr(reconciler_module, "COMMIT_SLICE", 1)
    fleet = five_nodes_and_five_replicas(store)
    publishing = asyncio.Event()
    writes = 0

    async def db(fn, *args):
        nonlocal writes
        if fn == store.apply_replica_changes:
            writes += 1
            if writes == 2:
                await asyncio.Event().wait()  # the second save never ends
        return fn(*args)

    async def publish(node_id: str, cmd: node_pb2.Command) -> None:
        publishing.set()
        await asyncio.Event().wait()  # the broker never acknowledges

    rec = affirmed(store, tmp_path, fleet, db, publish)
    before = asyncio.all_tasks()
    task = asyncio.create_task(rec.reconcile_once())
    await asyncio.wait_for(publishing.wait(), 10.0)  # the first slice is saved and going out
    task.cancel()  # the pass fails and settles: it waits for the second save
    for _ in range(5):
        await asyncio.sleep(0)
    task.cancel()  # the shutdown stops waiting
    with pytest.raises(asyncio.CancelledError):
        await task
    started = [t for t in asyncio.all_tasks() - before if t is not asyncio.current_task()]
    if started:
        _, running = await asyncio.wait(started, timeout=5.0)
        assert not running, running


async def test_a_resend_is_timed_from_when_the_command_went_out(store, tmp_path) -> None:
    """Not from when it was decided: after an apply to 10,000 nodes the commands waited seconds for
    their saves and the broker, and thousands were sent again before the nodes had had them for the
    resend interval."""
    fleet = five_nodes_and_five_replicas(store)
    acknowledged: dict[str, float] = {}

    async def db(fn, *args):
        return fn(*args)

    async def publish(node_id: str, cmd: node_pb2.Command) -> None:
        await asyncio.sleep(0.05)  # the broker's PUBACK comes after a while
        acknowledged[cmd.deploy.replica_id] = time.monotonic()

    rec = affirmed(store, tmp_path, fleet, db, publish)
    await rec.reconcile_once()
    assert len(acknowledged) == 5
    assert all(rec._last_sent[rid] >= at for rid, at in acknowledged.items()), (rec._last_sent, acknowledged)


async def test_publish_all_starts_commands_in_order_within_its_window() -> None:
    """Thousands of commands: they start in list order, at most PUBLISH_WINDOW await their PUBACK at
    once, and one that fails stops none of the others (its error is raised at the end)."""
    count = 3 * PUBLISH_WINDOW + 7
    started: list[str] = []
    in_flight = peak = 0
    gate = asyncio.Event()

    async def publish(node_id: str, cmd: node_pb2.Command) -> None:
        nonlocal in_flight, peak
        started.append(node_id)
        in_flight += 1
        peak = max(peak, in_flight)
        await gate.wait()
        in_flight -= 1
        if node_id == "n00005":
            raise RuntimeError("broker away")

    commands = [(f"n{i:05d}", node_pb2.Command(node_id=f"n{i:05d}")) for i in range(count)]
    sending = asyncio.create_task(publish_all(publish, commands))
    while len(started) < PUBLISH_WINDOW:
        await asyncio.sleep(0)
    assert len(started) == PUBLISH_WINDOW  # the window is full; the rest wait
    gate.set()
    with pytest.raises(RuntimeError, match="broker away"):
        await sending
    assert started == [node_id for node_id, _ in commands]
    assert peak == PUBLISH_WINDOW


@pytest.mark.parametrize(("slice_s", "turns"), [(0.0, 5), (3600.0, 0)])
async def test_binding_yields_to_the_loop_each_time_its_slice_of_time_is_used(
    store, tmp_path, monkeypatch, slice_s, turns
) -> None:
    """The pass binds for PLACE_SLICE_S, then lets the loop run (ingest): with no time at all, it
    yields before every binding; with an hour, never while it binds five."""
    monkeypatch.setattr(reconciler_module, "PLACE_SLICE_S", slice_s)
    fleet = five_nodes_and_five_replicas(store)
    binding = True
    seen = 0

    async def db(fn, *args):
        return fn(*args)  # inline: the only turns the loop gets are the pass's own yields

    async def publish(node_id: str, cmd: node_pb2.Command) -> None:
        pass

    async def other_work() -> None:
        nonlocal seen
        while binding:
            seen += 1
            await asyncio.sleep(0)

    rec = affirmed(store, tmp_path, fleet, db, publish)
    task = asyncio.get_running_loop().create_task(other_work())
    await asyncio.sleep(0)  # it starts, counted once
    run = reconciler_module.ReconcilePass(rec, store.list_deployments(), store.list_replicas())
    await run.place(run.scale())
    binding = False
    await task
    assert seen - 1 == turns


async def test_replicas_a_node_makes_up_are_unloaded_with_one_command_not_one_each(store, tmp_path) -> None:
    """A status may name 1,024 replica ids no deployment has: each was sent an undeploy (thousands of
    commands from a few statuses), and each id was remembered for good. A few orphans are still
    undeployed one by one; many make one full set; what the node stops reporting is forgotten."""
    fleet = Fleet()
    acc = node_pb2.Accelerator(kind="cpu-litert", dtypes=["INT8"], peak_gops=1.0)
    hello = node_pb2.Hello(accelerators=[acc], max_replicas=8, memory_bytes=2**30, boot_unix_ms=1)
    fleet.apply(node_message("n1", hello=hello))
    sent: list[node_pb2.Command] = []

    async def publish(node_id: str, cmd: node_pb2.Command) -> None:
        sent.append(cmd)

    rec = affirmed(store, tmp_path, fleet, _direct, publish)

    def report(seq: int, ids: list[str]) -> None:
        replicas = [node_pb2.ReplicaReport(replica_id=i, phase=node_pb2.REPLICA_PHASE_RUNNING) for i in ids]
        status = node_pb2.Status(state=node_pb2.NODE_STATE_ONLINE, epoch=1, status_seq=seq, replicas=replicas)
        fleet.apply(node_message("n1", status=status))

    report(1, ["a", "b"])
    await rec.reconcile_once()
    assert sorted(c.undeploy.replica_id for c in sent if c.HasField("undeploy")) == ["a", "b"]
    sent.clear()
    many = [f"made-up-{i}" for i in range(reconciler_module.MAX_ORPHAN_UNDEPLOYS + 1)]
    report(2, many)
    await rec.reconcile_once()
    await rec.reconcile_once()  # the full set goes with the pass after (the node's sync)
    assert [c for c in sent if c.HasField("undeploy")] == []
    assert [len(c.sync.replicas) for c in sent if c.HasField("sync")] == [0]
    assert set(rec._orphans_sent) == set()  # none undeployed one by one: nothing to remember
    report(3, [])
    await rec.reconcile_once()
    assert rec._orphans_sent == {}
