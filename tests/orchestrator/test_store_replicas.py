"""The store's parts for several replicas: the leader lease, the fencing of singleton writes, and
the deployments' change feed (on both engines where both apply)."""

from __future__ import annotations

import threading

import pytest
import sqlalchemy as sa

from orchestrator.errors import IllegalTransition, NotLeader, RevisionGone
from orchestrator.manifest import parse_manifest
from orchestrator.phases import Phase
from orchestrator.store import AttestationRow, Lease, ReplicaChange, ReplicaRecord, SqlStore

MANIFEST = """
apiVersion: edgeward/v1
kind: Deployment
metadata: {name: NAME}
spec: {model: {name: m, version: 1.0.0}, replicas: 1}
"""


def manifest(name: str = "d1"):
    return parse_manifest(MANIFEST.replace("NAME", name))


def replica(dep: str, rid: str, phase: Phase = Phase.PENDING) -> ReplicaChange:
    return ReplicaChange(ReplicaRecord(rid, dep, 1, "m", "1.0.0", phase, 1))


@pytest.fixture
def pg_stores(tmp_path, postgres_url):
    """Two replicas' stores on one PostgreSQL database."""
    a, b = SqlStore(tmp_path / "a", postgres_url), SqlStore(tmp_path / "b", postgres_url)
    yield a, b
    a.close()
    b.close()


def test_on_sqlite_the_lease_is_always_held_and_fencing_is_a_no_op(tmp_path):
    store = SqlStore(tmp_path)
    try:
        lease = store.acquire_lease("only", 1)
        assert lease is not None
        store.fenced(lease, store.put_deployment, manifest(), 1)
        assert [d.name for d in store.list_deployments()] == ["d1"]
    finally:
        store.close()


def test_one_holder_at_a_time_and_a_takeover_starts_a_new_term(pg_stores):
    a, b = pg_stores
    first = a.acquire_lease("a", 60_000)
    assert first is not None
    assert b.acquire_lease("b", 60_000) is None
    renewed = a.acquire_lease("a", 60_000)
    assert renewed is not None and renewed.token == first.token
    a.release_lease(renewed)
    taken = b.acquire_lease("b", 60_000)
    assert taken is not None and taken.token == first.token + 1
    assert a.acquire_lease("a", 60_000) is None


def test_a_followers_try_does_not_lock_the_lease_row(pg_stores):
    """The leader's fenced writes hold the lease row FOR SHARE until they commit. A follower's try
    used INSERT ... ON CONFLICT DO UPDATE, which locks the row even when its WHERE leaves it alone:
    it waited behind the leader's write (here: until its lock timeout, then an error) and the
    leader's next write queued behind it. It now reads the row first and stops while another
    holder's lease runs."""
    a, b = pg_stores
    assert a.acquire_lease("a", 60_000) is not None
    with a.engine.connect() as conn, conn.begin():  # a fenced write of the leader, in flight
        conn.execute(sa.text("SELECT 1 FROM leases WHERE name = 'leader' FOR SHARE")).one()
        assert b.acquire_lease("b", 60_000) is None


def terms(a: SqlStore, b: SqlStore) -> tuple[Lease, Lease]:
    """A term of ``a`` that ran out (it lasted a millisecond), and ``b``'s term after it."""
    old = a.acquire_lease("a", 1)
    assert old is not None
    new = None
    while new is None:  # no fixed sleep: retry until the database's clock passed the expiry
        new = b.acquire_lease("b", 60_000)
    return old, new


def test_a_paused_ex_leaders_write_is_refused_by_the_token_check(pg_stores):
    """A leader whose lease ran out while it was paused: its next singleton write fails and
    nothing of it is stored, even though no one took over (the term is over)."""
    a, b = pg_stores
    old, new = terms(a, b)
    assert new.token == old.token + 1
    with pytest.raises(NotLeader):
        a.fenced(old, a.put_deployment, manifest("stale"), 1)
    assert a.list_deployments() == []
    b.fenced(new, b.put_deployment, manifest("fresh"), 1)  # the new leader's writes go through
    assert [d.name for d in a.list_deployments()] == ["fresh"]
    a.put_deployment(manifest("api"), 1)  # unfenced writes (any replica's API) are not affected
    with pytest.raises(NotLeader):  # the old holder renewing after expiry does not get its term back
        a.fenced(old, a.apply_replica_changes, [replica("api", "r1")])


def test_a_takeover_waits_for_the_fenced_write_in_flight(pg_stores, monkeypatch):
    """The fencing check holds the lease row until the write commits: no takeover can slip
    between a leader's check and its commit."""
    a, b = pg_stores
    lease = a.acquire_lease("a", 60_000)
    assert lease is not None
    a.put_deployment(manifest(), 1)
    inside, release = threading.Event(), threading.Event()
    original = a._apply_changes

    def held_open(conn, changes):  # the write waits inside its transaction, after the check
        inside.set()
        release.wait(30)
        original(conn, changes)

    monkeypatch.setattr(a, "_apply_changes", held_open)
    writer = threading.Thread(target=a.fenced, args=(lease, a.apply_replica_changes, [replica("d1", "r1")]))
    writer.start()
    try:
        assert inside.wait(30)
        with b.engine.connect() as conn, conn.begin():
            conn.execute(sa.text("SET LOCAL lock_timeout = 300"))
            with pytest.raises(sa.exc.OperationalError, match="lock timeout"):
                conn.execute(sa.text("UPDATE leases SET expires_ms = 0"))  # what a takeover writes
    finally:
        release.set()
        writer.join(30)
    assert [r.id for r in a.list_replicas()] == ["r1"]


def test_the_change_feed_numbers_every_deployment_change_in_commit_order(tmp_path, store_url):
    store = SqlStore(tmp_path, store_url)
    try:
        assert store.revision() == 0
        store.put_deployment(manifest("a"), 1)
        store.put_deployment(manifest("b"), 1)
        store.put_deployment(manifest("a"), 2)  # unchanged: no revision
        store.apply_replica_changes([replica("a", "a1"), replica("b", "b1")])
        store.delete_deployment("b", 3)
        assert store.revision() == 5
        assert store.changes_since(0) == [(1, "a"), (2, "b"), (3, "a"), (4, "b"), (5, "b")]
        assert store.changes_since(3) == [(4, "b"), (5, "b")]
        assert store.changes_since(5) == []
        assert store.changes_since(1, limit=2) == [(2, "b"), (3, "a")]
    finally:
        store.close()


def test_resuming_from_a_forgotten_revision_is_refused(tmp_path, monkeypatch):
    import orchestrator.store as store_module

    monkeypatch.setattr(store_module, "CHANGES_KEPT", 10)
    store = SqlStore(tmp_path)
    try:
        for i in range(1100):
            store.put_deployment(manifest(f"d{i}"), 1)
        with pytest.raises(RevisionGone) as err:
            store.changes_since(5)
        assert err.value.oldest > 6
        assert store.changes_since(1095) == [
            (1096, "d1095"),
            (1097, "d1096"),
            (1098, "d1097"),
            (1099, "d1098"),
            (1100, "d1099"),
        ]
    finally:
        store.close()


def test_concurrent_writers_on_three_replicas_queue_and_leave_no_gap_in_the_feed(tmp_path, postgres_url):
    """Every write bumps the feed's counter row. Writes of several replicas take turns (the table lock
    each takes first) instead of failing each other as serialization conflicts and running again:
    without the lock, bursts like these cost dozens of retries."""
    stores = [SqlStore(tmp_path / p, postgres_url) for p in "abc"]
    try:

        def burst(store: SqlStore, prefix: str) -> None:
            for i in range(30):
                store.put_deployment(manifest(f"{prefix}{i}"), 1)

        threads = [threading.Thread(target=burst, args=(s, p)) for s, p in zip(stores, "abc", strict=True)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(120)
        assert not any(th.is_alive() for th in threads)
        changes = stores[0].changes_since(0)
        assert [r for r, _ in changes] == list(range(1, 91))
        assert sorted(d for _, d in changes) == sorted(f"{p}{i}" for p in "abc" for i in range(30))
        assert [s.write_retries for s in stores] == [0, 0, 0]
    finally:
        for s in stores:
            s.close()


def test_a_store_knows_the_revisions_its_own_commits_wrote(pg_stores):
    a, b = pg_stores
    a.put_deployment(manifest("a"), 1)
    b.put_deployment(manifest("b"), 1)
    with pytest.raises(IllegalTransition):  # a failed write's revision is not ours (another commit reuses it)
        a.apply_replica_changes(
            [ReplicaChange(ReplicaRecord("r", "a", 1, "m", "1.0.0", Phase.RUNNING, 1)), replica("a", "r")]
        )
    b.put_deployment(manifest("c"), 1)
    assert [a.written_by_me(r) for r in (1, 2, 3)] == [True, False, False]
    assert [b.written_by_me(r) for r in (1, 2, 3)] == [False, True, True]


def test_replicas_are_counted_per_deployment_generation_and_phase(tmp_path, store_url):
    store = SqlStore(tmp_path, store_url)
    try:
        for name in ("d1", "d2"):
            store.put_deployment(manifest(name), 1)

        def rep(dep: str, rid: str, generation: int, phase: Phase) -> ReplicaChange:
            return ReplicaChange(ReplicaRecord(rid, dep, generation, "m", "1.0.0", phase, 1))

        store.apply_replica_changes(
            [
                rep("d1", "a", 1, Phase.RUNNING),
                rep("d1", "b", 1, Phase.RUNNING),
                rep("d1", "c", 2, Phase.RUNNING),
                rep("d1", "d", 2, Phase.LOADING),
                rep("d2", "e", 1, Phase.FAILED),
                rep("d2", "f", 1, Phase.EVICTED),
            ]
        )
        d1 = {("d1", 1, Phase.RUNNING): 2, ("d1", 2, Phase.RUNNING): 1, ("d1", 2, Phase.LOADING): 1}
        d2 = {("d2", 1, Phase.FAILED): 1}  # evicted ones aside
        assert store.replica_counts() == d1 | d2
        assert store.replica_counts("d1") == d1
        assert store.replica_counts("d2") == d2
        assert store.replica_counts("nope") == {}
    finally:
        store.close()


def test_attestation_views_are_read_back_by_revision_and_node(tmp_path, store_url):
    """The leader's attestation results for the other replicas: each batch is the next revision; a
    node written again moves to the newest; a reader's (revision, node) cursor pages through every
    row once, in order, however the limit cuts a batch."""
    store = SqlStore(tmp_path, store_url)
    try:
        assert store.put_attestations([]) == 0  # nothing to write: no transaction, no revision
        assert store.attestations_since((0, "")) == []
        first = store.put_attestations(
            [AttestationRow("n2", b"v2"), AttestationRow("n1", b"v1"), AttestationRow("n3", b"v3")]
        )
        second = store.put_attestations(
            [AttestationRow("n1", b"v1b", "attestation.contraindicated", "pcr 7\x00 differs")]
        )
        assert (first, second) == (1, 2)
        rows = store.attestations_since((0, ""))
        assert [(rev, row.node_id, row.view) for rev, row in rows] == [
            (1, "n2", b"v2"),
            (1, "n3", b"v3"),
            (2, "n1", b"v1b"),
        ]
        assert rows[-1][1].quarantine_reason == "attestation.contraindicated"
        assert rows[-1][1].quarantine_message == "pcr 7\ufffd differs"  # stored as both engines can
        page = store.attestations_since((0, ""), limit=1)
        assert [(rev, row.node_id) for rev, row in page] == [(1, "n2")]
        rest = store.attestations_since((1, "n2"))
        assert [(rev, row.node_id) for rev, row in rest] == [(1, "n3"), (2, "n1")]
        assert store.attestations_since((2, "n1")) == []
    finally:
        store.close()


def test_an_ex_leaders_attestation_views_are_refused(pg_stores):
    """Only the leader of the current term writes the views the followers show."""
    a, b = pg_stores
    old, new = terms(a, b)
    with pytest.raises(NotLeader):
        a.fenced(old, a.put_attestations, [AttestationRow("n1", b"stale")])
    b.fenced(new, b.put_attestations, [AttestationRow("n1", b"fresh")])
    assert [row.view for _, row in a.attestations_since((0, ""))] == [b"fresh"]
