"""Persistent state of the control plane behind a small repository interface.

``SqliteStore`` is the default (one file under the state dir, WAL journal, every write in one
transaction, so a kill -9 at any point leaves a consistent store). A PostgreSQL store implements
the same :class:`Store` protocol. Model artifacts live beside the database, content-addressed by
sha256 and written atomically. With attestation, an artifact is stored sealed (encrypted with its
model version's data key, see ``put_model``). A data key is stored wrapped under a key-encryption
key kept outside the database (`edgeward.security.keywrap`); the state dir is 0700 and its files
0600 all the same (the nodes' enrollments are rows too).

The store is synchronous; the orchestrator calls it through one single-thread executor, which
also makes that thread the only committer.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

from edgeward.security.files import private_dir, private_file, tighten
from edgeward.security.keywrap import DataKeys, FileKeyring, wrap_legacy_keys

from .errors import AlreadyExists, NotFound
from .manifest import DeploymentManifest
from .phases import Phase, check_transition

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS models (
    name TEXT NOT NULL, version TEXT NOT NULL, sha256 TEXT NOT NULL, size INTEGER NOT NULL,
    info BLOB NOT NULL, created_ms INTEGER NOT NULL, PRIMARY KEY (name, version));
CREATE TABLE IF NOT EXISTS deployments (
    name TEXT PRIMARY KEY, generation INTEGER NOT NULL, manifest TEXT NOT NULL,
    created_ms INTEGER NOT NULL, updated_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS replicas (
    id TEXT PRIMARY KEY, deployment TEXT NOT NULL, generation INTEGER NOT NULL,
    model_name TEXT NOT NULL, model_version TEXT NOT NULL, node_id TEXT, accelerator TEXT,
    phase TEXT NOT NULL, reason TEXT NOT NULL DEFAULT '', message TEXT NOT NULL DEFAULT '',
    updated_ms INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS replicas_by_deployment ON replicas (deployment);
CREATE INDEX IF NOT EXISTS replicas_by_node ON replicas (node_id);
CREATE TABLE IF NOT EXISTS nodes (
    id TEXT PRIMARY KEY, cordoned INTEGER NOT NULL DEFAULT 0, inventory BLOB,
    last_seen_ms INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS model_keys (
    name TEXT NOT NULL, version TEXT NOT NULL, data_key BLOB NOT NULL, sealed_sha256 TEXT NOT NULL,
    sealed_size INTEGER NOT NULL, PRIMARY KEY (name, version));
CREATE TABLE IF NOT EXISTS enrollments (
    node_id TEXT PRIMARY KEY, record BLOB NOT NULL, updated_ms INTEGER NOT NULL);
"""
# The schema above is version 1, as the first release wrote it; every later change is a migration,
# run in order, each in one transaction, on new and existing state dirs alike.
MIGRATIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "1": (
        "2",
        (
            # The model catalog (orchestrator/catalog): lifecycle state, history, wipes.
            "ALTER TABLE models ADD COLUMN state TEXT NOT NULL DEFAULT 'published'",
            "ALTER TABLE models ADD COLUMN state_reason TEXT NOT NULL DEFAULT ''",
            "ALTER TABLE models ADD COLUMN updated_ms INTEGER NOT NULL DEFAULT 0",
            "UPDATE models SET updated_ms = created_ms",
            "ALTER TABLE model_keys ADD COLUMN revoked_ms INTEGER NOT NULL DEFAULT 0",
            "CREATE TABLE model_history (name TEXT NOT NULL, version TEXT NOT NULL, at_ms INTEGER NOT NULL, "
            "action TEXT NOT NULL, reason TEXT NOT NULL DEFAULT '')",
            "CREATE INDEX model_history_by_name ON model_history (name)",
            "INSERT INTO model_history SELECT name, version, created_ms, 'published', '' FROM models",
            "CREATE TABLE wipes (id TEXT PRIMARY KEY, name TEXT NOT NULL, versions TEXT NOT NULL, "
            "sha256s TEXT NOT NULL, reason TEXT NOT NULL, created_ms INTEGER NOT NULL, "
            "deadline_ms INTEGER NOT NULL, replicas_evicted INTEGER NOT NULL DEFAULT 0)",
            "CREATE TABLE wipe_nodes (wipe_id TEXT NOT NULL REFERENCES wipes(id), node_id TEXT NOT NULL, "
            "state TEXT NOT NULL, updated_ms INTEGER NOT NULL, message TEXT NOT NULL DEFAULT '', "
            "PRIMARY KEY (wipe_id, node_id))",
        ),
    ),
    "2": (
        "3",
        (
            # Rollouts (orchestrator/rollout.py): the current rollout of each deployment, and the
            # template of each generation, so a rollback can return to the last good one.
            "CREATE TABLE rollouts (deployment TEXT PRIMARY KEY, record TEXT NOT NULL, updated_ms INTEGER NOT NULL)",
            "CREATE TABLE deployment_templates (deployment TEXT NOT NULL, generation INTEGER NOT NULL, "
            "manifest TEXT NOT NULL, PRIMARY KEY (deployment, generation))",
            "INSERT INTO deployment_templates SELECT name, generation, manifest FROM deployments",
        ),
    ),
}
SCHEMA_VERSION = "3"
TEMPLATES_KEPT = 20  # generations of a deployment whose template is kept for rollbacks


@dataclass(frozen=True)
class ModelRecord:
    name: str
    version: str
    sha256: str  # of the plaintext model
    size: int
    info: bytes  # serialized edgeward.v1.Model, as published (state fields below are authoritative)
    created_ms: int
    state: str = "published"  # catalog.lifecycle.ModelState
    state_reason: str = ""
    updated_ms: int = 0


@dataclass(frozen=True)
class HistoryEntry:
    version: str
    at_ms: int
    action: str  # published | deprecated | revoked | wiped
    reason: str = ""


@dataclass(frozen=True)
class WipeNode:
    state: str  # pending | confirmed | quarantined
    updated_ms: int
    message: str = ""


@dataclass(frozen=True)
class WipeRecord:
    """A remote wipe of some versions of one model, and where each ordered node stands."""

    id: str
    name: str
    versions: tuple[str, ...]
    sha256s: tuple[str, ...]  # plaintext digests of those versions (the nodes' cache names)
    reason: str
    created_ms: int
    deadline_ms: int
    replicas_evicted: int = 0
    nodes: dict[str, WipeNode] = field(default_factory=dict)


@dataclass(frozen=True)
class SealedArtifact:
    """Where a model version's sealed artifact is, and its data key (a secret: never log it)."""

    sha256: str  # of the sealed blob, its name under artifacts/
    size: int
    data_key: bytes = field(repr=False)  # empty once revoked: the key is destroyed
    revoked_ms: int = 0


@dataclass(frozen=True)
class DeploymentRecord:
    name: str
    generation: int
    manifest: DeploymentManifest
    created_ms: int
    updated_ms: int


@dataclass(frozen=True)
class ReplicaRecord:
    id: str
    deployment: str
    generation: int
    model_name: str
    model_version: str
    phase: Phase
    updated_ms: int
    node_id: str | None = None
    accelerator: str | None = None
    reason: str = ""
    message: str = ""


@dataclass(frozen=True)
class NodeRecord:
    id: str
    cordoned: bool = False
    inventory: bytes | None = None  # serialized edgeward.v1.Hello
    last_seen_ms: int = 0


@dataclass(frozen=True)
class ReplicaChange:
    """One replica update for :meth:`Store.apply_replica_changes`."""

    replica: ReplicaRecord
    delete: bool = False


class Store(Protocol):
    def put_model(
        self, record: ModelRecord, artifact: bytes, sealed: SealedArtifact | None = None
    ) -> None: ...
    def get_model(self, name: str, version: str | None = None) -> ModelRecord: ...
    def get_sealed(self, name: str, version: str) -> SealedArtifact: ...
    def list_models(self) -> list[ModelRecord]: ...
    def read_artifact(self, sha256: str) -> bytes: ...
    def put_deployment(
        self, manifest: DeploymentManifest, now_ms: int
    ) -> tuple[DeploymentRecord, bool, bool]: ...
    def get_deployment(self, name: str) -> DeploymentRecord: ...
    def list_deployments(self) -> list[DeploymentRecord]: ...
    def delete_deployment(self, name: str, now_ms: int) -> list[ReplicaRecord]: ...
    def list_replicas(self, deployment: str | None = None) -> list[ReplicaRecord]: ...
    def apply_replica_changes(self, changes: Iterable[ReplicaChange]) -> None: ...
    def get_node(self, node_id: str) -> NodeRecord | None: ...
    def list_nodes(self) -> list[NodeRecord]: ...
    def put_node(self, record: NodeRecord) -> None: ...
    def put_enrollment(self, node_id: str, record: bytes, now_ms: int) -> None: ...
    def list_enrollments(self) -> list[bytes]: ...
    def get_template(self, name: str, generation: int) -> DeploymentManifest: ...
    def list_rollouts(self) -> dict[str, str]: ...
    def put_rollout(self, deployment: str, record: str, now_ms: int) -> None: ...
    def roll_back(
        self, name: str, from_generation: int, to_generation: int, record: str, now_ms: int
    ) -> DeploymentRecord: ...
    def set_model_state(
        self, name: str, version: str, state: str, reason: str, now_ms: int
    ) -> ModelRecord: ...
    def model_history(self, name: str) -> tuple[list[ModelRecord], list[HistoryEntry]]: ...
    def revoked_keys(self) -> list[tuple[str, str]]: ...
    def start_wipe(
        self, wipe: WipeRecord, replicas: Iterable[ReplicaChange], revoke_reason: str
    ) -> WipeRecord: ...
    def set_wipe_node(self, wipe_id: str, node_id: str, node: WipeNode) -> None: ...
    def get_wipe(self, wipe_id: str) -> WipeRecord: ...
    def list_wipes(self) -> list[WipeRecord]: ...
    def close(self) -> None: ...


class SqliteStore:
    """The default store: SQLite in WAL mode under ``state_dir``."""

    def __init__(self, state_dir: Path, keys: DataKeys | None = None) -> None:
        """``keys`` wraps the data keys (default: the file keyring ``<state_dir>/kek``)."""
        self.state_dir = private_dir(state_dir)
        self.artifact_dir = private_dir(self.state_dir / "artifacts")
        for artifact in self.artifact_dir.iterdir():  # an older release may have left them readable
            tighten(artifact)
        self._keys = keys or DataKeys(FileKeyring.open(self.state_dir / "kek"))
        db_file = private_file(self.state_dir / "edgeward.db")  # SQLite gives -wal/-shm its mode
        for suffix in ("-wal", "-shm"):
            tighten(f"{db_file}{suffix}")
        self._db = sqlite3.connect(db_file, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        # Deleted or overwritten content (a revoked model's data key) is zeroed in the file, not
        # left in a free page; the WAL is checkpointed after a revocation (see set_model_state).
        self._db.execute("PRAGMA secure_delete=ON")
        with self._tx() as cur:
            for statement in SCHEMA.strip().split(";"):
                if statement.strip():
                    cur.execute(statement)
            cur.execute("INSERT OR IGNORE INTO meta VALUES ('schema', '1')")
        self._migrate()
        wrap_legacy_keys(self, self._keys)

    def _migrate(self) -> None:
        while True:
            found = self._db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()[0]
            if found == SCHEMA_VERSION:
                return
            if found not in MIGRATIONS:
                raise RuntimeError(
                    f"state dir {self.state_dir} has store schema {found}, expected {SCHEMA_VERSION}"
                )
            target, statements = MIGRATIONS[found]
            with self._tx() as cur:
                for statement in statements:
                    cur.execute(statement)
                cur.execute("UPDATE meta SET value=? WHERE key='schema'", (target,))

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Cursor]:
        cur = self._db.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            yield cur
        except BaseException:
            cur.execute("ROLLBACK")
            raise
        else:
            cur.execute("COMMIT")
        finally:
            cur.close()

    def close(self) -> None:
        self._db.close()

    # ---------------------------------------------------------------- models

    def put_model(self, record: ModelRecord, artifact: bytes, sealed: SealedArtifact | None = None) -> None:
        """Store a model version: ``artifact`` is the model itself, or, with ``sealed``, the sealed
        blob that ``sealed`` describes (the model's own digest is then ``record.sha256``)."""
        digest = sealed.sha256 if sealed is not None else record.sha256
        wrapped = self._keys.wrap(sealed.data_key, record.name, record.version) if sealed else b""
        if hashlib.sha256(artifact).hexdigest() != digest:
            raise ValueError("artifact does not match its sha256")
        path = self.artifact_dir / digest
        if not path.exists():
            # Write-then-rename, so a crash never leaves a truncated artifact under its digest.
            fd, tmp = tempfile.mkstemp(dir=self.artifact_dir, prefix=".tmp-")
            with os.fdopen(fd, "wb") as fh:
                fh.write(artifact)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        try:
            with self._tx() as cur:
                cur.execute(
                    f"INSERT INTO models ({_MODEL_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",  # noqa: S608
                    (
                        record.name,
                        record.version,
                        record.sha256,
                        record.size,
                        record.info,
                        record.created_ms,
                        record.state,
                        record.state_reason,
                        record.updated_ms or record.created_ms,
                    ),
                )
                if sealed is not None:
                    cur.execute(
                        "INSERT INTO model_keys (name, version, data_key, sealed_sha256, sealed_size) "
                        "VALUES (?, ?, ?, ?, ?)",
                        (record.name, record.version, wrapped, sealed.sha256, sealed.size),
                    )
                cur.execute(
                    "INSERT INTO model_history VALUES (?, ?, ?, 'published', '')",
                    (record.name, record.version, record.created_ms),
                )
        except sqlite3.IntegrityError as err:
            raise AlreadyExists("model", f"{record.name}:{record.version}") from err

    def get_sealed(self, name: str, version: str) -> SealedArtifact:
        row = self._db.execute(
            "SELECT sealed_sha256, sealed_size, data_key, revoked_ms FROM model_keys WHERE name=? AND version=?",
            (name, version),
        ).fetchone()
        if row is None:
            raise NotFound("sealed artifact", f"{name}:{version}")
        return SealedArtifact(row[0], row[1], self._keys.unwrap(bytes(row[2]), name, version), row[3])

    def data_keys(self) -> list[tuple[str, str, bytes]]:
        """Every stored (wrapped) data key: (name, version, stored value) for key rotation."""
        rows = self._db.execute("SELECT name, version, data_key FROM model_keys").fetchall()
        return [(name, version, bytes(stored)) for name, version, stored in rows]

    def replace_data_keys(self, rows: Iterable[tuple[str, str, bytes, bytes]]) -> int:
        """Replace stored data keys (name, version, old value, new value) in one transaction; a row
        whose value changed meanwhile (a revocation destroyed the key) is left alone."""
        changed = 0
        with self._tx() as cur:
            for name, version, old, new in rows:
                cur.execute(
                    "UPDATE model_keys SET data_key=? WHERE name=? AND version=? AND data_key=?",
                    (new, name, version, old),
                )
                changed += cur.rowcount
        return changed

    def get_model(self, name: str, version: str | None = None) -> ModelRecord:
        if version:
            row = self._db.execute(
                f"SELECT {_MODEL_COLUMNS} FROM models WHERE name=? AND version=?",  # noqa: S608
                (name, version),
            ).fetchone()
        else:
            rows = self._db.execute(
                f"SELECT {_MODEL_COLUMNS} FROM models WHERE name=?",  # noqa: S608
                (name,),
            ).fetchall()
            row = max(rows, key=lambda r: _semver_key(r[1])) if rows else None
        if row is None:
            raise NotFound("model", f"{name}:{version}" if version else name)
        return ModelRecord(*row)

    def list_models(self) -> list[ModelRecord]:
        rows = self._db.execute(
            f"SELECT {_MODEL_COLUMNS} FROM models ORDER BY name, created_ms"  # noqa: S608
        ).fetchall()
        return [ModelRecord(*row) for row in rows]

    def set_model_state(self, name: str, version: str, state: str, reason: str, now_ms: int) -> ModelRecord:
        """Move a version along its lifecycle (catalog.lifecycle) and record it in the history. To
        ``revoked``: the version's data key is destroyed in the same transaction, then the WAL is
        checkpointed so no copy of it stays in the journal."""
        from .catalog.lifecycle import ModelState, check_transition

        with self._tx() as cur:
            row = cur.execute(
                "SELECT state FROM models WHERE name=? AND version=?", (name, version)
            ).fetchone()
            if row is None:
                raise NotFound("model", f"{name}:{version}")
            check_transition(f"{name}:{version}", ModelState(row[0]), ModelState(state))
            cur.execute(
                "UPDATE models SET state=?, state_reason=?, updated_ms=? WHERE name=? AND version=?",
                (state, reason, now_ms, name, version),
            )
            cur.execute(
                "INSERT INTO model_history VALUES (?, ?, ?, ?, ?)", (name, version, now_ms, state, reason)
            )
            if state == ModelState.REVOKED:
                _destroy_key(cur, name, version, now_ms)
        if state == ModelState.REVOKED:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return self.get_model(name, version)

    def model_history(self, name: str) -> tuple[list[ModelRecord], list[HistoryEntry]]:
        """Every version of ``name`` (semantic version order) and its lifecycle entries (oldest first)."""
        rows = self._db.execute(
            f"SELECT {_MODEL_COLUMNS} FROM models WHERE name=?",  # noqa: S608
            (name,),
        ).fetchall()
        if not rows:
            raise NotFound("model", name)
        versions = sorted((ModelRecord(*r) for r in rows), key=lambda m: _semver_key(m.version))
        entries = [
            HistoryEntry(*r)
            for r in self._db.execute(
                "SELECT version, at_ms, action, reason FROM model_history WHERE name=? ORDER BY at_ms, rowid",
                (name,),
            )
        ]
        return versions, entries

    def revoked_keys(self) -> list[tuple[str, str]]:
        return [
            (r[0], r[1])
            for r in self._db.execute("SELECT name, version FROM model_keys WHERE revoked_ms > 0")
        ]

    # ---------------------------------------------------------------- wipes

    def start_wipe(
        self, wipe: WipeRecord, replicas: Iterable[ReplicaChange], revoke_reason: str
    ) -> WipeRecord:
        """One transaction: revoke every version of the wipe that is not revoked yet (destroying its
        key), evict ``replicas``, record the wipe and its nodes as pending."""
        from .catalog.lifecycle import ModelState

        changes = list(replicas)
        with self._tx() as cur:
            for version in wipe.versions:
                row = cur.execute(
                    "SELECT state FROM models WHERE name=? AND version=?", (wipe.name, version)
                ).fetchone()
                if row is None:
                    raise NotFound("model", f"{wipe.name}:{version}")
                if row[0] != ModelState.REVOKED:
                    cur.execute(
                        "UPDATE models SET state=?, state_reason=?, updated_ms=? WHERE name=? AND version=?",
                        (ModelState.REVOKED.value, revoke_reason, wipe.created_ms, wipe.name, version),
                    )
                    cur.execute(
                        "INSERT INTO model_history VALUES (?, ?, ?, 'revoked', ?)",
                        (wipe.name, version, wipe.created_ms, revoke_reason),
                    )
                _destroy_key(cur, wipe.name, version, wipe.created_ms)
                cur.execute(
                    "INSERT INTO model_history VALUES (?, ?, ?, 'wiped', ?)",
                    (wipe.name, version, wipe.created_ms, f"wipe {wipe.id}: {wipe.reason}"),
                )
            for change in changes:
                row = cur.execute("SELECT phase FROM replicas WHERE id=?", (change.replica.id,)).fetchone()
                if row is not None:
                    check_transition(Phase(row[0]), change.replica.phase)
                _write_replica(cur, change.replica)
            cur.execute(
                "INSERT INTO wipes VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    wipe.id,
                    wipe.name,
                    ",".join(wipe.versions),
                    ",".join(wipe.sha256s),
                    wipe.reason,
                    wipe.created_ms,
                    wipe.deadline_ms,
                    len(changes),
                ),
            )
            for node_id, node in wipe.nodes.items():
                cur.execute(
                    "INSERT INTO wipe_nodes VALUES (?, ?, ?, ?, ?)",
                    (wipe.id, node_id, node.state, node.updated_ms, node.message),
                )
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return self.get_wipe(wipe.id)

    def set_wipe_node(self, wipe_id: str, node_id: str, node: WipeNode) -> None:
        with self._tx() as cur:
            cur.execute(
                "UPDATE wipe_nodes SET state=?, updated_ms=?, message=? WHERE wipe_id=? AND node_id=?",
                (node.state, node.updated_ms, node.message, wipe_id, node_id),
            )

    def get_wipe(self, wipe_id: str) -> WipeRecord:
        row = self._db.execute("SELECT * FROM wipes WHERE id=?", (wipe_id,)).fetchone()
        if row is None:
            raise NotFound("wipe", wipe_id)
        return self._wipe(row)

    def list_wipes(self) -> list[WipeRecord]:
        return [
            self._wipe(r) for r in self._db.execute("SELECT * FROM wipes ORDER BY created_ms, id").fetchall()
        ]

    def _wipe(self, row: tuple) -> WipeRecord:
        wid, name, versions, sha256s, reason, created, deadline, evicted = row
        nodes = {
            r[0]: WipeNode(r[1], r[2], r[3])
            for r in self._db.execute(
                "SELECT node_id, state, updated_ms, message FROM wipe_nodes WHERE wipe_id=? ORDER BY node_id",
                (wid,),
            )
        }
        return WipeRecord(
            wid,
            name,
            tuple(versions.split(",")),
            tuple(sha256s.split(",")),
            reason,
            created,
            deadline,
            evicted,
            nodes,
        )

    def read_artifact(self, sha256: str) -> bytes:
        if len(sha256) != 64 or not all(c in "0123456789abcdef" for c in sha256):
            raise NotFound("artifact", sha256)
        try:
            return (self.artifact_dir / sha256).read_bytes()
        except FileNotFoundError as err:
            raise NotFound("artifact", sha256) from err

    # ---------------------------------------------------------------- deployments

    def put_deployment(
        self, manifest: DeploymentManifest, now_ms: int
    ) -> tuple[DeploymentRecord, bool, bool]:
        """Create or update; returns (record, created, changed). The generation grows on change."""
        text = manifest.model_dump_json(by_alias=True)
        with self._tx() as cur:
            row = cur.execute(
                "SELECT generation, manifest, created_ms FROM deployments WHERE name=?",
                (manifest.metadata.name,),
            ).fetchone()
            if row is None:
                cur.execute(
                    "INSERT INTO deployments VALUES (?, 1, ?, ?, ?)",
                    (manifest.metadata.name, text, now_ms, now_ms),
                )
                _keep_template(cur, manifest.metadata.name, 1, text)
                return DeploymentRecord(manifest.metadata.name, 1, manifest, now_ms, now_ms), True, False
            generation, old_text, created = row
            if old_text == text:
                old = DeploymentManifest.model_validate_json(old_text)
                updated = cur.execute(
                    "SELECT updated_ms FROM deployments WHERE name=?", (manifest.metadata.name,)
                ).fetchone()[0]
                return (
                    DeploymentRecord(manifest.metadata.name, generation, old, created, updated),
                    False,
                    False,
                )
            old = DeploymentManifest.model_validate_json(old_text)
            # Scaling alone does not make a new generation: existing replicas stay valid.
            new_generation = generation if _same_template(old, manifest) else generation + 1
            cur.execute(
                "UPDATE deployments SET generation=?, manifest=?, updated_ms=? WHERE name=?",
                (new_generation, text, now_ms, manifest.metadata.name),
            )
            _keep_template(cur, manifest.metadata.name, new_generation, text)
            return (
                DeploymentRecord(manifest.metadata.name, new_generation, manifest, created, now_ms),
                False,
                True,
            )

    def get_deployment(self, name: str) -> DeploymentRecord:
        row = self._db.execute("SELECT * FROM deployments WHERE name=?", (name,)).fetchone()
        if row is None:
            raise NotFound("deployment", name)
        return _deployment(row)

    def list_deployments(self) -> list[DeploymentRecord]:
        return [_deployment(row) for row in self._db.execute("SELECT * FROM deployments ORDER BY name")]

    def delete_deployment(self, name: str, now_ms: int) -> list[ReplicaRecord]:
        """Remove the deployment and mark its replicas Evicted, in one transaction."""
        with self._tx() as cur:
            if cur.execute("DELETE FROM deployments WHERE name=?", (name,)).rowcount == 0:
                raise NotFound("deployment", name)
            cur.execute("DELETE FROM deployment_templates WHERE deployment=?", (name,))
            cur.execute("DELETE FROM rollouts WHERE deployment=?", (name,))
            rows = cur.execute("SELECT * FROM replicas WHERE deployment=?", (name,)).fetchall()
            evicted = []
            for row in rows:
                rep = _replica(row)
                if rep.phase == Phase.EVICTED:
                    continue
                if rep.node_id is None:
                    cur.execute("DELETE FROM replicas WHERE id=?", (rep.id,))
                    continue
                new = replace(
                    rep, phase=Phase.EVICTED, reason="deployment.deleted", message="", updated_ms=now_ms
                )
                _write_replica(cur, new)
                evicted.append(new)
            return evicted

    # ---------------------------------------------------------------- replicas

    def list_replicas(self, deployment: str | None = None) -> list[ReplicaRecord]:
        if deployment is None:
            rows = self._db.execute("SELECT * FROM replicas ORDER BY id").fetchall()
        else:
            rows = self._db.execute(
                "SELECT * FROM replicas WHERE deployment=? ORDER BY id", (deployment,)
            ).fetchall()
        return [_replica(row) for row in rows]

    def apply_replica_changes(self, changes: Iterable[ReplicaChange]) -> None:
        """Insert, update or delete replicas in one transaction, checking every phase transition."""
        with self._tx() as cur:
            for change in changes:
                rep = change.replica
                if change.delete:
                    cur.execute("DELETE FROM replicas WHERE id=?", (rep.id,))
                    continue
                row = cur.execute("SELECT phase FROM replicas WHERE id=?", (rep.id,)).fetchone()
                if row is not None:
                    check_transition(Phase(row[0]), rep.phase)
                _write_replica(cur, rep)

    # ---------------------------------------------------------------- nodes

    def get_node(self, node_id: str) -> NodeRecord | None:
        row = self._db.execute("SELECT * FROM nodes WHERE id=?", (node_id,)).fetchone()
        return None if row is None else NodeRecord(row[0], bool(row[1]), row[2], row[3])

    def list_nodes(self) -> list[NodeRecord]:
        return [
            NodeRecord(r[0], bool(r[1]), r[2], r[3])
            for r in self._db.execute("SELECT * FROM nodes ORDER BY id")
        ]

    def put_node(self, record: NodeRecord) -> None:
        with self._tx() as cur:
            cur.execute(
                "INSERT INTO nodes VALUES (?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET "
                "cordoned=excluded.cordoned, inventory=excluded.inventory, last_seen_ms=excluded.last_seen_ms",
                (record.id, int(record.cordoned), record.inventory, record.last_seen_ms),
            )

    # ---------------------------------------------------------------- attestation enrollments

    def put_enrollment(self, node_id: str, record: bytes, now_ms: int) -> None:
        """Keep a node's enrollment (a serialized edgeward.v1.Enrollment) across restarts."""
        with self._tx() as cur:
            cur.execute(
                "INSERT INTO enrollments VALUES (?, ?, ?) ON CONFLICT(node_id) DO UPDATE SET "
                "record=excluded.record, updated_ms=excluded.updated_ms",
                (node_id, record, now_ms),
            )

    def list_enrollments(self) -> list[bytes]:
        return [bytes(r[0]) for r in self._db.execute("SELECT record FROM enrollments ORDER BY node_id")]

    # ---------------------------------------------------------------- rollouts

    def get_template(self, name: str, generation: int) -> DeploymentManifest:
        """The manifest a deployment had at ``generation`` (the last TEMPLATES_KEPT are kept)."""
        row = self._db.execute(
            "SELECT manifest FROM deployment_templates WHERE deployment=? AND generation=?",
            (name, generation),
        ).fetchone()
        if row is None:
            raise NotFound("deployment template", f"{name}@{generation}")
        return DeploymentManifest.model_validate_json(row[0])

    def list_rollouts(self) -> dict[str, str]:
        """The current rollout record (JSON, orchestrator.rollout.Rollout) of each deployment."""
        return dict(
            self._db.execute("SELECT deployment, record FROM rollouts ORDER BY deployment").fetchall()
        )

    def put_rollout(self, deployment: str, record: str, now_ms: int) -> None:
        with self._tx() as cur:
            if cur.execute("SELECT 1 FROM deployments WHERE name=?", (deployment,)).fetchone() is None:
                raise NotFound("deployment", deployment)
            cur.execute(
                "INSERT INTO rollouts VALUES (?, ?, ?) ON CONFLICT(deployment) DO UPDATE SET "
                "record=excluded.record, updated_ms=excluded.updated_ms",
                (deployment, record, now_ms),
            )

    def roll_back(
        self, name: str, from_generation: int, to_generation: int, record: str, now_ms: int
    ) -> DeploymentRecord:
        """One transaction: the deployment at ``from_generation`` gets the template of the earlier
        ``to_generation`` as a new generation, the live replicas of ``to_generation`` are relabelled
        to it (same template: they stay where they run), and the rollout ``record`` is written.
        Refused (NotFound) when the deployment moved past ``from_generation`` meanwhile."""
        with self._tx() as cur:
            row = cur.execute(
                "SELECT generation, created_ms FROM deployments WHERE name=?", (name,)
            ).fetchone()
            if row is None or row[0] != from_generation:
                raise NotFound("deployment", f"{name}@{from_generation}")
            tpl = cur.execute(
                "SELECT manifest FROM deployment_templates WHERE deployment=? AND generation=?",
                (name, to_generation),
            ).fetchone()
            if tpl is None:
                raise NotFound("deployment template", f"{name}@{to_generation}")
            new_generation = from_generation + 1
            cur.execute(
                "UPDATE deployments SET generation=?, manifest=?, updated_ms=? WHERE name=?",
                (new_generation, tpl[0], now_ms, name),
            )
            _keep_template(cur, name, new_generation, tpl[0])
            cur.execute(
                "UPDATE replicas SET generation=? WHERE deployment=? AND generation=? AND phase!=?",
                (new_generation, name, to_generation, Phase.EVICTED.value),
            )
            cur.execute(
                "INSERT INTO rollouts VALUES (?, ?, ?) ON CONFLICT(deployment) DO UPDATE SET "
                "record=excluded.record, updated_ms=excluded.updated_ms",
                (name, record, now_ms),
            )
            manifest = DeploymentManifest.model_validate_json(tpl[0])
            return DeploymentRecord(name, new_generation, manifest, row[1], now_ms)


_MODEL_COLUMNS = "name, version, sha256, size, info, created_ms, state, state_reason, updated_ms"


def _destroy_key(cur: sqlite3.Cursor, name: str, version: str, now_ms: int) -> None:
    cur.execute(
        "UPDATE model_keys SET data_key=x'', revoked_ms=? WHERE name=? AND version=? AND revoked_ms=0",
        (now_ms, name, version),
    )


def _semver_key(version: str) -> tuple[int, int, int, int, str]:
    core, _, pre = version.partition("-")
    major, minor, patch = (int(x) for x in core.split("."))
    # A release sorts after its pre-releases.
    return (major, minor, patch, 0 if pre else 1, pre)


def _same_template(old: DeploymentManifest, new: DeploymentManifest) -> bool:
    # How to roll out (strategy) is not part of what runs: changing it alone replaces nothing.
    ignored = {"replicas": 0, "strategy": None}
    return old.spec.model_copy(update=ignored) == new.spec.model_copy(update=ignored)


def _keep_template(cur: sqlite3.Cursor, name: str, generation: int, text: str) -> None:
    cur.execute("INSERT OR REPLACE INTO deployment_templates VALUES (?, ?, ?)", (name, generation, text))
    cur.execute(
        "DELETE FROM deployment_templates WHERE deployment=? AND generation<=?",
        (name, generation - TEMPLATES_KEPT),
    )


def _deployment(row: tuple) -> DeploymentRecord:
    name, generation, text, created, updated = row
    return DeploymentRecord(name, generation, DeploymentManifest.model_validate_json(text), created, updated)


_REPLICA_COLUMNS = "id, deployment, generation, model_name, model_version, node_id, accelerator, phase, reason, message, updated_ms"


def _replica(row: tuple) -> ReplicaRecord:
    (rid, dep, gen, mname, mver, node, acc, phase, reason, message, updated) = row
    return ReplicaRecord(
        id=rid,
        deployment=dep,
        generation=gen,
        model_name=mname,
        model_version=mver,
        phase=Phase(phase),
        updated_ms=updated,
        node_id=node,
        accelerator=acc,
        reason=reason,
        message=message,
    )


def _write_replica(cur: sqlite3.Cursor, rep: ReplicaRecord) -> None:
    cur.execute(
        f"INSERT INTO replicas ({_REPLICA_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT(id) DO UPDATE SET "  # noqa: S608
        "node_id=excluded.node_id, accelerator=excluded.accelerator, phase=excluded.phase, "
        "reason=excluded.reason, message=excluded.message, updated_ms=excluded.updated_ms",
        (
            rep.id,
            rep.deployment,
            rep.generation,
            rep.model_name,
            rep.model_version,
            rep.node_id,
            rep.accelerator,
            rep.phase.value,
            rep.reason,
            rep.message,
            rep.updated_ms,
        ),
    )
