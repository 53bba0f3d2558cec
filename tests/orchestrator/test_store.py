"""The store on SQLite and on PostgreSQL: transactions, generations, transition checks, artifacts."""

import hashlib
import sqlite3

import pytest
import sqlalchemy as sa

from orchestrator.errors import AlreadyExists, IllegalTransition, NotFound, StoreError
from orchestrator.manifest import parse_manifest
from orchestrator.phases import Phase
from orchestrator.store import ModelRecord, NodeRecord, ReplicaChange, ReplicaRecord, SqlStore

MANIFEST = """
apiVersion: edgeward/v1
kind: Deployment
metadata: {name: d1}
spec: {model: {name: m, version: 1.0.0}, replicas: REPLICAS}
"""


@pytest.fixture
def store(tmp_path, store_url):
    s = SqlStore(tmp_path, store_url)
    yield s
    s.close()


def manifest(replicas=2, version="1.0.0"):
    return parse_manifest(MANIFEST.replace("REPLICAS", str(replicas)).replace("1.0.0", version))


def test_sqlite_runs_in_wal_mode(tmp_path):
    SqlStore(tmp_path).close()
    db = sqlite3.connect(tmp_path / "edgeward.db")
    try:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        db.close()


def test_generation_grows_on_template_change_not_on_scale(store):
    rec, created, changed = store.put_deployment(manifest(2), 1)
    assert (rec.generation, created, changed) == (1, True, False)
    rec, created, changed = store.put_deployment(manifest(2), 2)
    assert (rec.generation, created, changed) == (1, False, False)
    rec, _, changed = store.put_deployment(manifest(5), 3)
    assert (rec.generation, changed) == (1, True)
    rec, _, changed = store.put_deployment(manifest(5, "1.1.0"), 4)
    assert (rec.generation, changed) == (2, True)


def test_replica_transitions_are_checked_and_atomic(store):
    rep = ReplicaRecord("r1", "d1", 1, "m", "1.0.0", Phase.PENDING, 1)
    store.apply_replica_changes([ReplicaChange(rep)])
    running = ReplicaRecord("r1", "d1", 1, "m", "1.0.0", Phase.RUNNING, 2, node_id="n1")
    other = ReplicaRecord("r2", "d1", 1, "m", "1.0.0", Phase.PENDING, 2)
    with pytest.raises(IllegalTransition):
        store.apply_replica_changes([ReplicaChange(other), ReplicaChange(running)])
    # the whole batch was rolled back: r2 was not written
    assert [r.id for r in store.list_replicas()] == ["r1"]


def test_delete_deployment_evicts_bound_and_drops_unbound(store):
    store.put_deployment(manifest(), 1)
    store.apply_replica_changes(
        [
            ReplicaChange(ReplicaRecord("a", "d1", 1, "m", "1.0.0", Phase.DISPATCHED, 1, node_id="n1")),
            ReplicaChange(ReplicaRecord("b", "d1", 1, "m", "1.0.0", Phase.PENDING, 1)),
        ]
    )
    evicted = store.delete_deployment("d1", 5)
    assert [(r.id, r.phase, r.reason) for r in evicted] == [("a", Phase.EVICTED, "deployment.deleted")]
    assert [r.id for r in store.list_replicas()] == ["a"]
    with pytest.raises(NotFound):
        store.get_deployment("d1")


def test_models_are_content_addressed_and_versions_unique(store):
    data = b"TFL3-model-bytes"
    digest = hashlib.sha256(data).hexdigest()
    store.put_model(ModelRecord("m", "1.0.0", digest, len(data), b"", 1), data)
    store.put_model(ModelRecord("m", "1.10.0", digest, len(data), b"", 2), data)
    store.put_model(ModelRecord("m", "1.2.0", digest, len(data), b"", 3), data)
    assert store.get_model("m").version == "1.10.0"
    assert store.read_artifact(digest) == data
    with pytest.raises(AlreadyExists):
        store.put_model(ModelRecord("m", "1.0.0", digest, len(data), b"", 4), data)
    with pytest.raises(ValueError, match="sha256"):
        store.put_model(ModelRecord("m", "2.0.0", "0" * 64, 3, b"", 5), b"abc")
    with pytest.raises(NotFound):
        store.read_artifact("../../etc/passwd")


def test_store_survives_reopen(tmp_path, store_url):
    s = SqlStore(tmp_path, store_url)
    s.put_deployment(manifest(3), 1)
    s.close()
    s = SqlStore(tmp_path, store_url)
    assert s.get_deployment("d1").manifest.spec.replicas == 3
    s.close()


def test_refuses_a_pre_alembic_schema_it_does_not_know(tmp_path):
    db = sqlite3.connect(tmp_path / "edgeward.db")
    db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    db.execute("INSERT INTO meta VALUES ('schema', '99')")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="schema 99"):
        SqlStore(tmp_path)


def test_a_hello_never_undoes_a_cordon(store):
    """Replicas write the inventories their share of hellos brings, with the cordons as they last read
    them: only an operator's cordon call changes the stored flag (a follower's stale view once
    uncordoned a node the leader had just cordoned)."""
    store.put_inventories([NodeRecord("n1", inventory=b"x", last_seen_ms=1)])
    store.set_cordoned("n1", True)
    store.put_inventories([NodeRecord("n1", cordoned=False, inventory=b"y", last_seen_ms=2)])
    assert [(n.id, n.cordoned, n.inventory, n.last_seen_ms) for n in store.list_nodes()] == [
        ("n1", True, b"y", 2)
    ]
    store.set_cordoned("n1", False)
    assert store.cordoned_nodes() == []
    with pytest.raises(NotFound):
        store.set_cordoned("n2", True)
    assert [n.id for n in store.list_nodes()] == ["n1"], "no node made up"


def test_put_inventories_is_one_transaction(store):
    store.put_inventories([NodeRecord(f"n{i}", inventory=b"x", last_seen_ms=i) for i in range(3)])
    store.put_inventories([NodeRecord("n1", inventory=b"y", last_seen_ms=9)])
    assert [(n.id, n.inventory, n.last_seen_ms) for n in store.list_nodes()] == [
        ("n0", b"x", 0),
        ("n1", b"y", 9),
        ("n2", b"x", 2),
    ]
    # A batch with one bad record writes none of it.
    with pytest.raises((sa.exc.StatementError, TypeError)):  # the driver refuses the object
        store.put_inventories([NodeRecord("n3"), NodeRecord("n4", inventory=object())])  # type: ignore[arg-type]
    assert [n.id for n in store.list_nodes()] == ["n0", "n1", "n2"]


def test_key_releases_are_kept_once_and_read_by_model_and_versions(tmp_path, store_url):
    """Which nodes got a version's key: what a wipe orders besides the nodes that run or report it
    (a replica that led earlier, or another replica's process, released them)."""
    store = SqlStore(tmp_path, store_url)
    try:
        store.record_key_releases([("m", "1.0.0", "n1"), ("m", "1.0.0", "n2"), ("m", "1.0.0", "n1")], 5)
        store.record_key_releases([("m", "1.0.0", "n1"), ("m", "2.0.0", "n3"), ("other", "1.0.0", "n4")], 9)
        store.record_key_releases([], 10)
        assert store.key_holders("m", ["1.0.0"]) == {"n1", "n2"}
        assert store.key_holders("m", ["1.0.0", "2.0.0"]) == {"n1", "n2", "n3"}
        assert store.key_holders("m", ["3.0.0"]) == set()
        assert store.key_holders("other", []) == set()
    finally:
        store.close()
    reopened = SqlStore(tmp_path, store_url)  # kept across restarts (and by every replica)
    try:
        assert reopened.key_holders("m", ["2.0.0"]) == {"n3"}
    finally:
        reopened.close()


def test_the_stages_of_a_pipeline_are_found_by_the_name_in_their_manifests(store):
    stage = (
        "apiVersion: edgeward/v1\nkind: Deployment\nmetadata: {{name: {name}}}\n"
        "spec:\n  model: {{name: {model}, version: 1.0.0}}\n  replicas: 1\n"
        "  multiExit: {{pipeline: {pipeline}, stage: {k}, threshold: 0.9}}\n"
    )
    for name, model, pipeline, k in (
        ("a1", "sign-s1", "sign", 1),
        ("a2", "sign-s2", "sign", 2),
        ("b1", "sign", "other", 1),
    ):
        store.put_deployment(parse_manifest(stage.format(name=name, model=model, pipeline=pipeline, k=k)), 1)
    store.put_deployment(manifest(), 1)  # no pipeline at all
    assert store.pipeline_stages("sign") == {"a1", "a2"}  # b1's model is named sign: not a stage of it
    assert store.pipeline_stages("other") == {"b1"}
    assert store.pipeline_stages("nope") == set()


def test_what_an_owner_holds_is_read_with_one_join(store):
    for name, replicas in (("d1", 2), ("d2", 5)):
        store.put_deployment(
            parse_manifest(MANIFEST.replace("d1", name).replace("REPLICAS", str(replicas))), 7
        )
    store.claim_owner("deployment", "d1", "team/a")
    store.claim_owner("deployment", "d2", "team/b")
    store.claim_owner("deployment", "gone", "team/a")  # a claim without its deployment
    store.claim_owner("model", "d2", "team/a")  # a model of the same name
    assert store.owned_replicas("team/a") == {"d1": 2}
    assert store.owned_deployments("team/a") == {"d1": store.get_deployment("d1").created_ms}
    assert store.owned_deployments("team/c") == {}
