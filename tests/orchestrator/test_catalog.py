"""The catalog's parts on their own: signing and trust, lifecycle, store migration and key
destruction, the compliance view, and the misuse monitor."""

from __future__ import annotations

import hashlib
import sqlite3

import pytest

from attestation.keyrelease import new_data_key
from edgeward.v1 import api_pb2, node_pb2
from orchestrator.catalog import CatalogConfig, MisuseConfig, PublisherKey, PublisherTrust, sign_metadata
from orchestrator.catalog.errors import CatalogError, SignatureRefused
from orchestrator.catalog.misuse import InvocationMonitor
from orchestrator.catalog.views import NodeTrust, compliance, placements
from orchestrator.phases import Phase
from orchestrator.sql.migrate import LEGACY_SCHEMA
from orchestrator.store import (
    ModelRecord,
    ReplicaChange,
    ReplicaRecord,
    SealedArtifact,
    SqlStore,
    WipeNode,
    WipeRecord,
)


def _meta(**kw) -> api_pb2.ModelMetadata:
    base = {"name": "vib-cnn", "version": "1.0.0", "sha256": "ab" * 32, "size": 10, "labels": {"a": "1"}}
    return api_pb2.ModelMetadata(**(base | kw))


# ---------------------------------------------------------------- signing


def test_a_signature_covers_every_signed_field_and_only_verifies_with_its_key():
    key = PublisherKey.generate()
    trust = PublisherTrust([key.public])
    assert trust.verify(sign_metadata(_meta(), key)) == key.key_id
    for field, value in [
        ("name", "other"),
        ("version", "1.0.1"),
        ("sha256", "cd" * 32),
        ("size", 11),
        ("use_case", "x"),
        ("description", "x"),
        ("parent_version", "0.1.0"),
        ("owner_team", "x"),
    ]:
        meta = sign_metadata(_meta(), key)
        setattr(meta, field, value)
        with pytest.raises(SignatureRefused) as info:
            trust.verify(meta)
        assert info.value.reason == "model.push.signature_invalid", field
    meta = sign_metadata(_meta(), key)
    meta.labels["a"] = "2"
    with pytest.raises(SignatureRefused):
        trust.verify(meta)
    # Profiles are filled after publication: not signed.
    meta = sign_metadata(_meta(), key)
    meta.profiles["cpu-litert"].latency_p95_ms = 3.0
    assert trust.verify(meta) == key.key_id


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda m, k: None, "model.push.unsigned"),
        (lambda m, k: sign_metadata(m, PublisherKey.generate()), "model.push.publisher_untrusted"),
        (lambda m, k: m.signature.CopyFrom(api_pb2.PublisherSignature(key_id=k.key_id, signature=b"x" * 10)),
         "model.push.signature_malformed"),
    ],
)  # fmt: skip
def test_refusals_carry_their_reason(mutate, reason):
    key = PublisherKey.generate()
    meta = _meta()
    mutate(meta, key)
    with pytest.raises(SignatureRefused) as info:
        PublisherTrust([key.public]).verify(meta)
    assert info.value.reason == reason
    assert str(info.value).startswith(reason + ": ")


def test_unsigned_is_accepted_only_when_signatures_are_optional():
    key = PublisherKey.generate()
    assert PublisherTrust([], require_signatures=False).verify(_meta()) == ""
    # a signature that is present is checked all the same
    with pytest.raises(SignatureRefused):
        PublisherTrust([], require_signatures=False).verify(sign_metadata(_meta(), key))


def test_keys_are_written_private_and_loaded_from_files_and_a_directory(tmp_path):
    key = PublisherKey.generate()
    private, public = key.write(tmp_path / "keys", "alice")
    assert private.stat().st_mode & 0o777 == 0o600
    with pytest.raises(CatalogError) as info:
        key.write(tmp_path / "keys", "alice")
    assert info.value.reason == "catalog.key.exists"
    assert PublisherKey.load(private).key_id == key.key_id
    again, pub = PublisherKey.load_or_create(tmp_path / "keys", "alice")
    assert (again.key_id, pub) == (key.key_id, public)
    other, _ = PublisherKey.load_or_create(tmp_path / "other", "bob")
    trust = PublisherTrust.load(
        CatalogConfig(trusted_publishers=[public], trusted_publishers_dir=tmp_path / "other")
    )
    assert set(trust.keys) == {key.key_id, other.key_id}
    (tmp_path / "bad.pem").write_text("not a key")
    with pytest.raises(CatalogError) as info:
        PublisherTrust.load(CatalogConfig(trusted_publishers=[tmp_path / "bad.pem"]))
    assert info.value.reason == "catalog.trust.unreadable"
    with pytest.raises(CatalogError) as info:
        PublisherKey.load(public)  # a public key is not a private one
    assert info.value.reason == "catalog.key.unreadable"


# ---------------------------------------------------------------- store


def _record(version: str = "1.0.0", signed: bool = True) -> ModelRecord:
    model = api_pb2.Model(name="vib-cnn", version=version, sha256="ab" * 32, size=4)
    if signed:
        model.signature.key_id = "k" * 16
    return ModelRecord("vib-cnn", version, "ab" * 32, 4, model.SerializeToString(), 1000)


def _put(store: SqlStore, version: str = "1.0.0", signed: bool = True) -> bytes:
    key = new_data_key()
    blob = version.encode() * 8
    store.put_model(
        _record(version, signed), blob, SealedArtifact(hashlib.sha256(blob).hexdigest(), len(blob), key)
    )
    return key


def test_a_version_1_state_dir_is_migrated_in_place(tmp_path):
    db = sqlite3.connect(tmp_path / "edgeward.db")
    db.executescript(LEGACY_SCHEMA)
    db.execute("INSERT INTO meta VALUES ('schema', '1')")
    db.execute("INSERT INTO models VALUES ('old', '0.1.0', ?, 4, x'', 500)", ("ef" * 32,))
    db.commit()
    db.close()
    store = SqlStore(tmp_path)
    try:
        old = store.get_model("old", "0.1.0")
        assert (old.state, old.updated_ms, old.created_ms) == ("published", 500, 500)
        versions, entries = store.model_history("old")
        assert [(e.version, e.action, e.at_ms) for e in entries] == [("0.1.0", "published", 500)]
        _put(store)
        assert [m.name for m in store.list_models()] == ["old", "vib-cnn"]
    finally:
        store.close()
    SqlStore(tmp_path).close()  # opening again is a no-op


def test_revoking_destroys_the_key(tmp_path, store_url):
    """On SQLite, everywhere in the state dir (database and WAL); on PostgreSQL, in the row (old row
    versions are the server's to vacuum: docs/scale-out.md)."""
    sqlite = store_url is None
    store = SqlStore(tmp_path, store_url)
    try:
        key = _put(store)
        _put(store, "1.1.0")
        # The database holds the key wrapped under the KEK (never raw): that value must go too.
        wrapped = next(v for n, ver, v in store.data_keys() if (n, ver) == ("vib-cnn", "1.0.0"))
        assert any(wrapped in p.read_bytes() for p in tmp_path.iterdir() if p.is_file()) == sqlite
        assert not any(key in p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
        store.set_model_state("vib-cnn", "1.0.0", "deprecated", "old", 2000)
        assert store.get_sealed("vib-cnn", "1.0.0").data_key == key
        revoked = store.set_model_state("vib-cnn", "1.0.0", "revoked", "leaked", 3000)
        assert (revoked.state, revoked.state_reason, revoked.updated_ms) == ("revoked", "leaked", 3000)
        sealed = store.get_sealed("vib-cnn", "1.0.0")
        assert (sealed.data_key, sealed.revoked_ms) == (b"", 3000)
        assert store.get_sealed("vib-cnn", "1.1.0").data_key != b""
        assert store.revoked_keys() == [("vib-cnn", "1.0.0")]
        for path in tmp_path.iterdir() if sqlite else ():
            if path.is_file():
                assert wrapped not in path.read_bytes(), path
        with pytest.raises(CatalogError) as info:
            store.set_model_state("vib-cnn", "1.0.0", "published", "", 4000)
        assert info.value.reason == "model.state.revoked"
        _, entries = store.model_history("vib-cnn")
        assert [(e.version, e.action) for e in entries] == [
            ("1.0.0", "published"),
            ("1.1.0", "published"),
            ("1.0.0", "deprecated"),
            ("1.0.0", "revoked"),
        ]
    finally:
        store.close()


def test_a_release_is_either_found_by_a_wipe_or_refused(tmp_path, store_url):
    """A leader that wrapped a key from an earlier read, and a wipe through another replica: the
    leader's release is written only while the key is not destroyed, and the wipe reads the
    releases again after destroying the keys, in its own transaction (store writes run one at a
    time). A release is therefore among the wipe's nodes or refused, never neither."""
    store = SqlStore(tmp_path, store_url)
    try:
        _put(store)
        _put(store, "1.1.0")
        assert store.record_key_releases([("vib-cnn", "1.0.0", "n1")], 10) == set()
        # The wipe read its holders ({n1}) here; then the leader's release to n2 is written.
        assert store.record_key_releases([("vib-cnn", "1.0.0", "n2")], 11) == set()
        wipe = WipeRecord(
            "wipe-1",
            "vib-cnn",
            ("1.0.0",),
            ("ab" * 32,),
            "leaked",
            20,
            9_000,
            0,
            {"n1": WipeNode("pending", 20)},
        )
        on = [_replica("r1", "n1", "1.0.0"), _replica("r2", "n2", "1.0.0"), _replica("r3", "n3", "1.0.0")]
        store.apply_replica_changes([ReplicaChange(r) for r in [*on, _replica("r4", "n2", "1.1.0")]])

        def evict(r: ReplicaRecord, nodes: set[str]) -> ReplicaChange | None:
            if r.model_version != "1.0.0" or r.node_id not in nodes:
                return None
            return ReplicaChange(
                ReplicaRecord(
                    r.id,
                    r.deployment,
                    r.generation,
                    r.model_name,
                    r.model_version,
                    Phase.EVICTED,
                    20,
                    node_id=r.node_id,
                )
            )

        started = store.start_wipe(wipe, [], "wiped: leaked", key_holders=True, evict=evict)
        assert {n: w.state for n, w in started.nodes.items()} == {"n1": "pending", "n2": "pending"}
        # The replicas on every node the wipe orders, n2's (found by its own read) included, in it.
        phases = {r.id: r.phase for r in store.list_replicas()}
        assert phases == {"r1": Phase.EVICTED, "r2": Phase.EVICTED, "r3": Phase.RUNNING, "r4": Phase.RUNNING}
        assert started.replicas_evicted == 2
        assert wipe.nodes.keys() == {"n1"}  # the caller's record is left as it was
        # A release written after the wipe: refused for the wiped version, kept for the other.
        late = [("vib-cnn", "1.0.0", "n3"), ("vib-cnn", "1.1.0", "n3")]
        assert store.record_key_releases(late, 30) == {("vib-cnn", "1.0.0")}
        assert store.key_holders("vib-cnn", ["1.0.0"]) == {"n1", "n2"}
        assert store.key_holders("vib-cnn", ["1.1.0"]) == {"n3"}
        # A revocation without a wipe refuses releases the same way.
        store.set_model_state("vib-cnn", "1.1.0", "revoked", "leaked", 40)
        assert store.record_key_releases([("vib-cnn", "1.1.0", "n4")], 41) == {("vib-cnn", "1.1.0")}
        assert store.key_holders("vib-cnn", ["1.1.0"]) == {"n3"}
        # Nodes named by the operator: exactly those.
        named = WipeRecord(
            "wipe-2", "vib-cnn", ("1.1.0",), ("ab" * 32,), "x", 50, 9_000, 0, {"n9": WipeNode("pending", 50)}
        )
        assert store.start_wipe(named, [], "wiped: x").nodes.keys() == {"n9"}
    finally:
        store.close()


# ---------------------------------------------------------------- views


def _replica(rid: str, node: str, version: str, phase: Phase = Phase.RUNNING, at: int = 100) -> ReplicaRecord:
    return ReplicaRecord(rid, "vib", 1, "vib-cnn", version, phase, at, node_id=node)


def test_placements_and_compliance_name_each_node_and_issue():
    catalog = [
        ModelRecord(**{**_record("1.0.0").__dict__, "state": "deprecated", "state_reason": "cve"}),
        ModelRecord(**{**_record("1.1.0", signed=False).__dict__}),
        _record("2.0.0"),
    ]
    replicas = [
        _replica("a", "n1", "1.0.0", at=300),
        _replica("b", "n1", "1.0.0", Phase.LOADING, at=200),
        _replica("c", "n2", "1.1.0"),
        _replica("d", "n3", "2.0.0"),
        _replica("e", "n4", "1.0.0", Phase.EVICTED),
    ]
    trust = lambda n: NodeTrust("software", "affirming", 9999)  # noqa: E731
    placed = placements(catalog, replicas, trust, lambda n: {("vib-cnn", "1.0.0"): 7} if n == "n1" else {})
    assert [(p.node_id, p.version, p.replicas, p.running, p.since_unix_ms, p.inferences) for p in placed] == [
        ("n1", "1.0.0", 2, 1, 300, 7),
        ("n2", "1.1.0", 1, 1, 100, 0),
        ("n3", "2.0.0", 1, 1, 100, 0),
    ]
    report = compliance(catalog, placed, 4, 5000)
    assert not report.compliant
    assert [(f.node_id, f.issue, f.detail) for f in report.findings] == [
        ("n1", "model.deprecated", "cve"),
        ("n2", "model.unsigned", "published without a publisher signature"),
    ]
    assert (report.nodes_checked, report.placements_checked) == (4, 3)
    assert compliance(catalog, placed[2:], 4, 5000).compliant


# ---------------------------------------------------------------- misuse


def _stats(count: int, version: str = "1.0.0") -> list[node_pb2.ModelStats]:
    return [node_pb2.ModelStats(model_name="vib-cnn", model_version=version, inferences=count)]


def test_a_rate_far_above_its_baseline_alerts_once_and_does_not_become_the_baseline():
    published = []
    monitor = InvocationMonitor(
        MisuseConfig(window_s=1.0, rate_factor=5.0, min_rate_per_s=5.0, warmup_windows=3),
        lambda *a, **kw: published.append((a, kw)),
    )
    count, t = 0, 0.0
    for _ in range(6):  # 10/s steadily
        monitor.tick(t, {"n1": _stats(count)})
        count += 10
        t += 1.0
    assert not published
    for _ in range(3):  # 100/s: ten times the baseline, three windows long
        monitor.tick(t, {"n1": _stats(count)})
        count += 100
        t += 1.0
    monitor.tick(t, {"n1": _stats(count)})
    assert [a[0] for a, _ in published] == ["alert.misuse.rate"]
    assert published[0][1]["model"] == "vib-cnn:1.0.0"
    assert float(published[0][1]["baseline_per_s"]) == pytest.approx(10.0)
    # an agent restart (count back to a small number) is new work, not a negative rate
    monitor.tick(t + 1.0, {"n1": _stats(5)})
    assert len(published) == 1


def test_a_wiped_series_alerts_when_it_counts_up_after_settling():
    published = []
    monitor = InvocationMonitor(MisuseConfig(window_s=1.0), lambda *a, **kw: published.append((a, kw)))
    monitor.tick(0.0, {"n1": _stats(40), "n2": _stats(40)})
    monitor.wiped("n1", "vib-cnn", "1.0.0", after=2.5)
    monitor.tick(1.0, {"n1": _stats(45), "n2": _stats(41)})  # in flight when the wipe was ordered
    monitor.tick(2.0, {"n1": _stats(46), "n2": _stats(42)})
    assert not published
    monitor.tick(3.0, {"n1": _stats(46), "n2": _stats(50)})  # quiet after settling; n2 not wiped
    assert not published
    monitor.tick(4.0, {"n1": _stats(49), "n2": _stats(60)})
    monitor.tick(5.0, {"n1": _stats(60), "n2": _stats(70)})
    assert [(a[0], a[1], kw["invocations"]) for a, kw in published] == [
        ("alert.misuse.wiped_model", "node/n1", 3)
    ]
    assert monitor.counts("n1") == {("vib-cnn", "1.0.0"): 60}


def test_a_node_naming_new_models_in_every_report_opens_at_most_its_bound_of_series():
    """Series are never forgotten: a node inventing model names report after report grew the
    monitor without end. A wipe's series and every other node's still open."""
    from orchestrator.catalog.misuse import MAX_SERIES_PER_NODE

    monitor = InvocationMonitor(MisuseConfig(window_s=1.0), lambda *a, **kw: None)
    for rnd in range(3):
        invented = [
            node_pb2.ModelStats(model_name=f"m{rnd}-{i}", model_version="1", inferences=1)
            for i in range(MAX_SERIES_PER_NODE // 2 + 1)
        ]
        monitor.tick(float(rnd), {"hostile": invented, "n1": _stats(rnd)})
    assert sum(1 for node, _, _ in monitor._index if node == "hostile") == MAX_SERIES_PER_NODE
    assert monitor.untracked == 3 * (MAX_SERIES_PER_NODE // 2 + 1) - MAX_SERIES_PER_NODE
    assert monitor.counts("n1") == {("vib-cnn", "1.0.0"): 2}
    monitor.wiped("hostile", "vib-cnn", "1.0.0", after=10.0)
    assert ("hostile", "vib-cnn", "1.0.0") in monitor._index
