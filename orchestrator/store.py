"""Persistent state of the control plane behind a small repository interface.

``SqliteStore`` is the default (one file under the state dir, WAL journal, every write in one
transaction, so a kill -9 at any point leaves a consistent store). A PostgreSQL store implements
the same :class:`Store` protocol. Model artifacts live beside the database, content-addressed by
sha256 and written atomically. With attestation, an artifact is stored sealed (encrypted with its
model version's data key, see ``put_model``); the data keys and the nodes' attestation
enrollments are rows of the database, which therefore holds secrets: keep the state dir private.

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
SCHEMA_VERSION = "1"


@dataclass(frozen=True)
class ModelRecord:
    name: str
    version: str
    sha256: str
    size: int
    info: bytes  # serialized edgeward.v1.Model
    created_ms: int


@dataclass(frozen=True)
class SealedArtifact:
    """Where a model version's sealed artifact is, and its data key (a secret: never log it)."""

    sha256: str  # of the sealed blob, its name under artifacts/
    size: int
    data_key: bytes = field(repr=False)


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
    def close(self) -> None: ...


class SqliteStore:
    """The default store: SQLite in WAL mode under ``state_dir``."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self.artifact_dir = self.state_dir / "artifacts"
        self.artifact_dir.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(
            self.state_dir / "edgeward.db", isolation_level=None, check_same_thread=False
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        with self._tx() as cur:
            for statement in SCHEMA.strip().split(";"):
                if statement.strip():
                    cur.execute(statement)
            cur.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
        found = self._db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()[0]
        if found != SCHEMA_VERSION:
            raise RuntimeError(
                f"state dir {self.state_dir} has store schema {found}, expected {SCHEMA_VERSION}"
            )

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
                    "INSERT INTO models VALUES (?, ?, ?, ?, ?, ?)",
                    (record.name, record.version, record.sha256, record.size, record.info, record.created_ms),
                )
                if sealed is not None:
                    cur.execute(
                        "INSERT INTO model_keys VALUES (?, ?, ?, ?, ?)",
                        (record.name, record.version, sealed.data_key, sealed.sha256, sealed.size),
                    )
        except sqlite3.IntegrityError as err:
            raise AlreadyExists("model", f"{record.name}:{record.version}") from err

    def get_sealed(self, name: str, version: str) -> SealedArtifact:
        row = self._db.execute(
            "SELECT sealed_sha256, sealed_size, data_key FROM model_keys WHERE name=? AND version=?",
            (name, version),
        ).fetchone()
        if row is None:
            raise NotFound("sealed artifact", f"{name}:{version}")
        return SealedArtifact(row[0], row[1], bytes(row[2]))

    def get_model(self, name: str, version: str | None = None) -> ModelRecord:
        if version:
            row = self._db.execute(
                "SELECT * FROM models WHERE name=? AND version=?", (name, version)
            ).fetchone()
        else:
            rows = self._db.execute("SELECT * FROM models WHERE name=?", (name,)).fetchall()
            row = max(rows, key=lambda r: _semver_key(r[1])) if rows else None
        if row is None:
            raise NotFound("model", f"{name}:{version}" if version else name)
        return ModelRecord(*row)

    def list_models(self) -> list[ModelRecord]:
        rows = self._db.execute("SELECT * FROM models ORDER BY name, created_ms").fetchall()
        return [ModelRecord(*row) for row in rows]

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


def _semver_key(version: str) -> tuple[int, int, int, int, str]:
    core, _, pre = version.partition("-")
    major, minor, patch = (int(x) for x in core.split("."))
    # A release sorts after its pre-releases.
    return (major, minor, patch, 0 if pre else 1, pre)


def _same_template(old: DeploymentManifest, new: DeploymentManifest) -> bool:
    return old.spec.model_copy(update={"replicas": 0}) == new.spec.model_copy(update={"replicas": 0})


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
