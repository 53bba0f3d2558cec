"""Persistent state of the control plane behind a small repository interface.

:class:`SqlStore` implements the :class:`Store` protocol on one schema (SQLAlchemy Core, migrated by
Alembic, ``orchestrator/sql``) and two engines:

- SQLite, the default: one file under the state dir, WAL journal, every write one transaction, so a
  kill -9 at any point leaves a consistent store. Model artifacts are files beside the database,
  content-addressed by sha256 and written atomically (write, fsync, rename).
- PostgreSQL (``state.url``), for several orchestrator replicas: writes are SERIALIZABLE, take turns
  across replicas (a table lock, their first statement) and are retried on a serialization failure; artifacts are rows of the ``artifacts`` table, in the same transaction as
  their model, so every replica sees them (docs/scale-out.md).

With attestation, an artifact is stored sealed (encrypted with its model version's data key, see
``put_model``). A data key is stored wrapped under a key-encryption key kept outside the database
(`edgeward.security.keywrap`); the state dir is 0700 and its files 0600 all the same (the nodes'
enrollments are rows too), and a PostgreSQL database deserves the same care.

The store is synchronous; the orchestrator calls it through one single-thread executor, which
also makes that thread the only committer of its process.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import random
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from edgeward.security.files import private_dir, private_file, tighten
from edgeward.security.keywrap import DataKeys, FileKeyring, wrap_legacy_keys

from .errors import AlreadyExists, NotFound, NotLeader, RevisionGone, StoreError
from .manifest import DeploymentManifest
from .phases import Phase, check_transition
from .sql import schema as t
from .sql.engine import (
    PURPOSE,
    READ,
    WRITE,
    parse_postgres_url,
    postgres_engine,
    redacted,
    retryable,
    sqlite_engine,
)
from .sql.migrate import migrate
from .sql.notify import NOTIFY_ACTIONS, NOTIFY_DEPLOYMENTS

if TYPE_CHECKING:
    from .config import OrchestratorConfig

log = logging.getLogger(__name__)

_T = TypeVar("_T")
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
    state: str  # WIPE_PENDING | confirmed | quarantined
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

    sha256: str  # of the sealed blob, the artifact's name
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
class AttestationRow:
    """A node's attestation as the leader's verifier has it, for the other replicas."""

    node_id: str
    view: bytes  # serialized edgeward.v1.NodeAttestation (its state as of the write)
    quarantine_reason: str = ""  # the reason id while the node is quarantined
    quarantine_message: str = ""


@dataclass(frozen=True)
class Lease:
    """A term of the leader lease: ``token`` grows by one per term; ``expires_ms`` is on the
    database's clock (a replica never compares it with its own)."""

    holder: str
    token: int
    expires_ms: int


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
    def owned_replicas(self, owner: str) -> dict[str, int]: ...
    def owned_deployments(self, owner: str) -> dict[str, int]: ...
    def pipeline_stages(self, pipeline: str) -> set[str]: ...
    def delete_deployment(self, name: str, now_ms: int) -> list[ReplicaRecord]: ...
    def list_replicas(self, deployment: str | None = None) -> list[ReplicaRecord]: ...
    def replica_counts(self, deployment: str | None = None) -> dict[tuple[str, int, Phase], int]: ...
    def apply_replica_changes(self, changes: Iterable[ReplicaChange]) -> None: ...
    def get_node(self, node_id: str) -> NodeRecord | None: ...
    def list_nodes(self) -> list[NodeRecord]: ...
    def cordoned_nodes(self) -> list[str]: ...
    def put_inventories(self, records: Iterable[NodeRecord]) -> None: ...
    def set_cordoned(self, node_id: str, cordoned: bool) -> None: ...
    def put_enrollment(self, node_id: str, record: bytes, now_ms: int) -> None: ...
    def list_enrollments(self) -> list[bytes]: ...
    def put_attestations(self, rows: list[AttestationRow]) -> int: ...
    def attestations_since(
        self, after: tuple[int, str], limit: int = ...
    ) -> list[tuple[int, AttestationRow]]: ...
    def record_key_releases(
        self,
        releases: Iterable[tuple[str, str, str]],
        now_ms: int,
        carried: Iterable[tuple[str, str]] = ...,
    ) -> set[tuple[str, str]]: ...
    def key_holders(self, name: str, versions: Iterable[str]) -> set[str]: ...
    def get_template(self, name: str, generation: int) -> DeploymentManifest: ...
    def list_rollouts(self) -> dict[str, str]: ...
    def put_rollout(self, deployment: str, record: str, now_ms: int) -> None: ...
    def request_rollout_action(self, deployment: str, kind: str, reason: str, now_ms: int) -> int: ...
    def pending_rollout_actions(self) -> list[tuple[int, str, str, str]]: ...
    def finish_rollout_action(self, action_id: int, ok: bool, outcome: str, now_ms: int) -> None: ...
    def rollout_action(self, action_id: int) -> tuple[str, str | None] | None: ...
    def withdraw_rollout_action(self, action_id: int) -> bool: ...
    def forget_rollout_action(self, action_id: int) -> None: ...
    def roll_back(
        self, name: str, from_generation: int, to_generation: int, record: str, now_ms: int
    ) -> DeploymentRecord: ...
    def set_model_state(
        self, name: str, version: str, state: str, reason: str, now_ms: int
    ) -> ModelRecord: ...
    def model_history(self, name: str) -> tuple[list[ModelRecord], list[HistoryEntry]]: ...
    def revoked_keys(self) -> list[tuple[str, str]]: ...
    def start_wipe(
        self,
        wipe: WipeRecord,
        replicas: Iterable[ReplicaChange],
        revoke_reason: str,
        *,
        key_holders: bool = False,
        evict: Callable[[ReplicaRecord, set[str]], ReplicaChange | None] | None = None,
    ) -> WipeRecord: ...
    def set_wipe_node(self, wipe_id: str, node_id: str, node: WipeNode) -> None: ...
    def get_wipe(self, wipe_id: str) -> WipeRecord: ...
    def list_wipes(self) -> list[WipeRecord]: ...
    def unconfirmed_wipes(self) -> list[WipeRecord]: ...
    def acquire_lease(self, holder: str, ttl_ms: int) -> Lease | None: ...
    def release_lease(self, lease: Lease) -> None: ...
    def fenced(self, lease: Lease, fn: Callable[..., _T], *args: Any) -> _T: ...
    def revision(self) -> int: ...
    def written_by_me(self, revision: int) -> bool: ...
    def changes_since(self, revision: int, limit: int = ...) -> list[tuple[int, str]]: ...
    def owner_of(self, kind: str, name: str) -> str | None: ...
    def owned_by(self, kind: str, owner: str) -> set[str]: ...
    def claim_owner(self, kind: str, name: str, owner: str) -> str: ...
    def forget_owner(self, kind: str, name: str, owner: str | None = None) -> None: ...
    def close(self) -> None: ...


DB_FILE = "edgeward.db"
# Rollout actions asked of the leader (rollout_actions.state); an outcome nobody read is kept this long.
ACTION_PENDING, ACTION_DONE, ACTION_REFUSED = "pending", "done", "refused"
WIPE_PENDING = "pending"  # a node ordered to wipe that has not confirmed yet
ACTIONS_KEPT_MS = 600_000
# A write that keeps losing serialization races (PostgreSQL) is retried for this long before it fails:
# a count of attempts ran out under load (8 attempts, half a second of back-off, while another
# replica's transactions, stretched by a busy CPU, kept taking the change feed's counter row first).
WRITE_RETRY_S = 30.0
WRITE_BACKOFF_S = 0.25  # the largest pause between two attempts (jittered, doubling from 2 ms)
_IN_CHUNK = 1000  # ids per IN (...) list
LEADER = "leader"  # the lease row of the replicas' singleton loops
CHANGES_KEPT = 100_000  # revisions of the deployments' change feed kept for Watch resumption
DEPLOYMENT_REVISION = "deployment_revision"
# The database's clock in epoch milliseconds: lease expiry never depends on a replica's clock.
_PG_NOW_MS = "(extract(epoch from clock_timestamp()) * 1000)::bigint"
#: The lease row if another holder's lease still runs (a plain read: no row lock).
_LEASE_HELD_BY_ANOTHER = sa.text(
    f"SELECT 1 FROM leases WHERE name = :name AND holder <> :holder AND expires_ms > {_PG_NOW_MS}"  # noqa: S608 - a constant expression, no input
)
# The first statement of every write on PostgreSQL. The mode conflicts with itself and with row
# writes, not with reads: the store's write transactions (each replica's) run one at a time, in the
# order their locks were granted. A write's snapshot is taken at its first query, after the lock, so
# it sees every write before it and no two writes can fail each other as serialization conflicts on
# the change feed's counter row (which nearly every write bumps). What that costs and what it does
# when a replica freezes mid-write: docs/scale-out.md.
_WRITE_LOCK = sa.text("LOCK TABLE counters IN SHARE ROW EXCLUSIVE MODE")
_FENCE_CHECK = sa.text(  # constant SQL, the values are bound
    "SELECT 1 FROM leases WHERE name = :name AND holder = :holder AND token = :token "  # noqa: S608
    f"AND expires_ms > {_PG_NOW_MS} FOR SHARE"
)


class SqlStore:
    """The store on SQLite under ``state_dir`` (``url`` unset, the default) or on PostgreSQL at ``url``
    (``postgresql://user@host:port/dbname``). Opening it migrates the schema to this release's."""

    def __init__(
        self,
        state_dir: Path,
        url: str | None = None,
        *,
        keys: DataKeys | None = None,
        pool_size: int = 5,
        connect_timeout_s: float = 10.0,
        idle_in_transaction_s: float = 3.0,
    ) -> None:
        """``keys`` wraps the data keys (default: the file keyring ``<state_dir>/kek``)."""
        self.state_dir = private_dir(state_dir)
        self._keys = keys or DataKeys(FileKeyring.open(self.state_dir / "kek"))
        self.artifact_dir: Path | None
        if url is None:
            self.artifact_dir = private_dir(self.state_dir / "artifacts")
            for artifact in self.artifact_dir.iterdir():  # an older release may have left them readable
                tighten(artifact)
            db_file = private_file(self.state_dir / DB_FILE)  # SQLite gives -wal/-shm its mode
            for suffix in ("-wal", "-shm"):
                tighten(f"{db_file}{suffix}")
            self.where = str(db_file)
            self.engine = sqlite_engine(db_file)
        else:
            parsed = parse_postgres_url(url)
            self.artifact_dir = None  # artifacts are rows of the database
            self.where = redacted(parsed)
            self.engine = postgres_engine(parsed, pool_size, connect_timeout_s, idle_in_transaction_s)
        self.dialect = self.engine.dialect.name
        # One connection for the store's life (the store is called from one thread at a time; the
        # lock makes that so): no pool round per call. It reconnects after a dropped connection.
        self._lock = threading.Lock()
        self._conn: sa.Connection | None = None
        # On SQLite this process is the only writer: every replica as last read is kept until its
        # next write. The reconciler reads them all once a second, and at 10,000 replicas building
        # the records from rows cost more than the rest of a pass. PostgreSQL may have other writers.
        self._replicas: list[ReplicaRecord] | None = None
        self._statements = _Statements(sqlite.insert if self.dialect == "sqlite" else postgresql.insert)
        self._fence = threading.local()  # .lease: the lease the current thread's writes are fenced by
        self._own: deque[tuple[int, int]] = deque(maxlen=4096)  # revisions our own commits wrote
        self.write_retries = 0  # write transactions run again (PostgreSQL asked for it, or a lost link)
        self.writer = ""  # who this process is to the other replicas (their notifications' payload)
        try:
            migrate(self.engine, self.where)
        except sa.exc.OperationalError as err:
            self.engine.dispose()
            raise StoreError(f"store {self.where}: {err.orig}") from err
        except BaseException:
            self.engine.dispose()
            raise
        try:
            wrap_legacy_keys(self, self._keys)
        except BaseException:
            self.close()
            raise
        log.info("store: %s (%s)", self.where, self.dialect)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
        self.engine.dispose()

    # ---------------------------------------------------------------- transactions

    def _connection(self, what: str) -> sa.Connection:
        if self._conn is None or self._conn.closed:
            self._conn = self.engine.connect()
        self._conn.info[PURPOSE] = what
        return self._conn

    def _write(self, work: Callable[[sa.Connection], _T]) -> _T:
        """Run ``work`` in one write transaction; again, from the start, when PostgreSQL reports a
        serialization failure or a deadlock, or the connection dropped before COMMIT was sent
        (``work`` must only touch the database). A connection lost during COMMIT is not retried:
        the transaction may have committed."""
        deadline = time.monotonic() + WRITE_RETRY_S
        for attempt in itertools.count():
            last = time.monotonic() >= deadline
            with self._lock:
                self._replicas = None  # any write may change them
                conn = self._connection(WRITE)
                tx = conn.begin()
                self._fence.written = None
                try:
                    if self.dialect == "postgresql":
                        conn.execute(_WRITE_LOCK)
                    self._check_fence(conn)
                    result = work(conn)
                except sa.exc.DBAPIError as err:
                    _rollback(tx)
                    if last or not (retryable(err) or err.connection_invalidated):
                        raise
                except BaseException:
                    _rollback(tx)
                    raise
                else:
                    try:
                        tx.commit()
                        self._note_written()
                        return result
                    except sa.exc.DBAPIError as err:
                        _rollback(tx)
                        if last or not retryable(err):
                            raise
            self.write_retries += 1
            pause = min(WRITE_BACKOFF_S, 0.002 * 2 ** min(attempt, 16))
            time.sleep(random.uniform(0, pause))  # noqa: S311 - jitter, not a secret
        raise AssertionError("unreachable")

    # ---------------------------------------------------------------- leader lease and fencing

    def acquire_lease(self, holder: str, ttl_ms: int) -> Lease | None:
        """Take or renew the leader lease for ``ttl_ms`` (on the database's clock); None while
        another holder's lease runs. A new term (a takeover, or our own lease having run out) gets
        the next token. On SQLite, a single replica's store, the lease is always ours.

        Runs on its own pooled connection, not the store thread's, so a long store call never
        delays a renewal; ``lock_timeout`` bounds the wait for singleton writes in flight (their
        fencing check holds the lease row FOR SHARE until they commit).

        A follower first reads the row, without a lock, and tries no further while another holder's
        lease runs: ``INSERT ... ON CONFLICT DO UPDATE`` locks the conflicting row even when its
        ``WHERE`` leaves it unchanged, so every follower's try (twice a second) waited behind the
        leader's fenced write in flight (failing at its lock timeout behind a long one) and could
        hold up the leader's next write."""
        if self.dialect == "sqlite":
            return Lease(holder, 1, 2**62)
        with self.engine.connect() as conn:
            held = conn.execute(_LEASE_HELD_BY_ANOTHER, {"name": LEADER, "holder": holder}).first()
        if held is not None:
            return None
        sql = sa.text(
            f"""
            INSERT INTO leases (name, holder, token, expires_ms) VALUES (:name, :holder, 1, {_PG_NOW_MS} + :ttl)
            ON CONFLICT (name) DO UPDATE SET
                holder = :holder,
                token = CASE WHEN leases.holder = :holder AND leases.expires_ms > {_PG_NOW_MS}
                             THEN leases.token ELSE leases.token + 1 END,
                expires_ms = {_PG_NOW_MS} + :ttl
            WHERE leases.holder = :holder OR leases.expires_ms <= {_PG_NOW_MS}
            RETURNING token, expires_ms
            """  # noqa: S608 - a constant expression, no input
        )
        with self.engine.connect() as conn, conn.begin():
            conn.execute(sa.text("SET LOCAL lock_timeout = 1000"))
            row = conn.execute(sql, {"name": LEADER, "holder": holder, "ttl": ttl_ms}).first()
        return None if row is None else Lease(holder, int(row[0]), int(row[1]))

    def release_lease(self, lease: Lease) -> None:
        """End our term at once (a clean shutdown): another replica need not wait for the expiry."""
        if self.dialect == "sqlite":
            return
        lc = t.leases.c
        with self.engine.connect() as conn, conn.begin():
            conn.execute(sa.text("SET LOCAL lock_timeout = 1000"))
            conn.execute(
                t.leases.update()
                .where(lc.name == LEADER, lc.holder == lease.holder, lc.token == lease.token)
                .values(expires_ms=0)
            )

    def fenced(self, lease: Lease, fn: Callable[..., _T], *args: Any) -> _T:
        """Call ``fn`` with every write it makes fenced by ``lease``: each write transaction first
        checks, FOR SHARE, that the lease row still has this holder and token and has not expired;
        otherwise the write is refused (NotLeader) and nothing of it is kept. A takeover's update
        of the row waits for the fenced writes in flight, so none can commit after it."""
        previous = getattr(self._fence, "lease", None)
        self._fence.lease = lease
        try:
            return fn(*args)
        finally:
            self._fence.lease = previous

    def _check_fence(self, conn: sa.Connection) -> None:
        lease: Lease | None = getattr(self._fence, "lease", None)
        if lease is None or self.dialect == "sqlite":
            return
        held = conn.execute(
            _FENCE_CHECK,
            {"name": LEADER, "holder": lease.holder, "token": lease.token},
        ).first()
        if held is None:
            raise NotLeader(lease.holder, lease.token)

    # ---------------------------------------------------------------- change feed

    def _record_changes(self, conn: sa.Connection, deployments: Iterable[str]) -> None:
        """Give each changed deployment the next revision of the feed, in this transaction."""
        names = sorted(set(deployments))
        if not names:
            return
        c = t.counters.c
        last = conn.execute(
            t.counters.update()
            .where(c.name == DEPLOYMENT_REVISION)
            .values(value=c.value + len(names))
            .returning(c.value)
        ).scalar_one()
        first = last - len(names) + 1
        self._fence.written = (first, last)  # this process's, once the transaction commits
        conn.execute(
            t.deployment_changes.insert(),
            [{"revision": first + i, "deployment": name} for i, name in enumerate(names)],
        )
        if self.dialect == "postgresql":  # the other replicas read the feed at once (sql/notify.py)
            conn.execute(NOTIFY_DEPLOYMENTS, {"writer": self.writer})
        if first // 1000 != (last + 1) // 1000:  # now and then, forget the oldest revisions
            conn.execute(
                t.deployment_changes.delete().where(t.deployment_changes.c.revision <= last - CHANGES_KEPT)
            )

    def _note_written(self) -> None:
        written = getattr(self._fence, "written", None)
        if written is not None:
            self._own.append(written)
            self._fence.written = None

    def written_by_me(self, revision: int) -> bool:
        """Whether this process's own (committed) transaction wrote ``revision`` of the feed."""
        own = list(self._own)  # one C-level copy: the store thread may append meanwhile
        return any(first <= revision <= last for first, last in own)

    def revision(self) -> int:
        """The newest revision of the deployments' change feed."""
        c = t.counters.c
        with self._read() as conn:
            return int(conn.execute(sa.select(c.value).where(c.name == DEPLOYMENT_REVISION)).scalar_one())

    def changes_since(self, revision: int, limit: int = 1000) -> list[tuple[int, str]]:
        """(revision, deployment) of the changes after ``revision``, oldest first, at most ``limit``.
        RevisionGone when the feed no longer holds the one right after ``revision``."""
        ch = t.deployment_changes.c
        with self._read() as conn:
            rows = conn.execute(
                sa.select(ch.revision, ch.deployment)
                .where(ch.revision > revision)
                .order_by(ch.revision)
                .limit(limit)
            ).all()
        if rows and rows[0][0] != revision + 1:
            raise RevisionGone(revision, rows[0][0])
        return [(int(r), d) for r, d in rows]

    # ---------------------------------------------------------------- ownership (docs/security.md)

    def owner_of(self, kind: str, name: str) -> str | None:
        """Who owns deployment or model ``name`` (``team/NAME``, ``operator``), None if nobody."""
        o = t.owners.c
        with self._read() as conn:
            return conn.execute(sa.select(o.owner).where(o.kind == kind, o.name == name)).scalar()

    def owned_by(self, kind: str, owner: str) -> set[str]:
        o = t.owners.c
        with self._read() as conn:
            return set(conn.execute(sa.select(o.name).where(o.kind == kind, o.owner == owner)).scalars())

    def claim_owner(self, kind: str, name: str, owner: str) -> str:
        """Record ``owner`` for a name nobody holds yet; the owner it has now (one claim wins, whichever
        replica makes it)."""
        o = t.owners.c

        def claim(conn: sa.Connection) -> str:
            conn.execute(self._statements.claim_owner, {"kind": kind, "name": name, "owner": owner})
            held: str = conn.execute(sa.select(o.owner).where(o.kind == kind, o.name == name)).scalar_one()
            return held

        return self._write(claim)

    def forget_owner(self, kind: str, name: str, owner: str | None = None) -> None:
        """Drop the owner of ``name`` (only if it is ``owner``, when given)."""
        o = t.owners.c
        where = [o.kind == kind, o.name == name] + ([o.owner == owner] if owner is not None else [])
        self._write(lambda conn: conn.execute(t.owners.delete().where(*where)))

    @contextmanager
    def _read(self) -> Iterator[sa.Connection]:
        """One read transaction: every query in it sees the same snapshot."""
        with self._lock:
            conn = self._connection(READ)
            with conn.begin():
                yield conn

    def _scrub(self) -> None:
        """After a data key was destroyed: on SQLite, checkpoint and truncate the WAL so no copy of the
        key stays in the journal (secure_delete zeroes it in the database file). PostgreSQL keeps old
        row versions until vacuum and in its WAL: see docs/scale-out.md."""
        if self.dialect == "sqlite":
            with self.engine.connect() as conn:
                conn.connection.driver_connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # type: ignore[union-attr]

    # ---------------------------------------------------------------- models

    def put_model(self, record: ModelRecord, artifact: bytes, sealed: SealedArtifact | None = None) -> None:
        """Store a model version: ``artifact`` is the model itself, or, with ``sealed``, the sealed
        blob that ``sealed`` describes (the model's own digest is then ``record.sha256``)."""
        digest = sealed.sha256 if sealed is not None else record.sha256
        wrapped = self._keys.wrap(sealed.data_key, record.name, record.version) if sealed else b""
        if hashlib.sha256(artifact).hexdigest() != digest:
            raise ValueError("artifact does not match its sha256")
        if self.artifact_dir is not None:
            _write_file(self.artifact_dir, digest, artifact)

        def tx(conn: sa.Connection) -> None:
            if self.artifact_dir is None:
                conn.execute(
                    self._statements.put_artifact, {"sha256": digest, "size": len(artifact), "data": artifact}
                )
            conn.execute(
                t.models.insert(),
                {
                    "name": record.name,
                    "version": record.version,
                    "sha256": record.sha256,
                    "size": record.size,
                    "info": record.info,
                    "created_ms": record.created_ms,
                    "state": record.state,
                    "state_reason": _text(record.state_reason),
                    "updated_ms": record.updated_ms or record.created_ms,
                },
            )
            if sealed is not None:
                conn.execute(
                    t.model_keys.insert(),
                    {
                        "name": record.name,
                        "version": record.version,
                        "data_key": wrapped,
                        "sealed_sha256": sealed.sha256,
                        "sealed_size": sealed.size,
                    },
                )
            _history(conn, record.name, record.version, record.created_ms, "published")

        try:
            self._write(tx)
        except sa.exc.IntegrityError as err:
            raise AlreadyExists("model", f"{record.name}:{record.version}") from err

    def get_sealed(self, name: str, version: str) -> SealedArtifact:
        k = t.model_keys.c
        with self._read() as conn:
            row = conn.execute(
                sa.select(k.sealed_sha256, k.sealed_size, k.data_key, k.revoked_ms).where(
                    k.name == name, k.version == version
                )
            ).first()
        if row is None:
            raise NotFound("sealed artifact", f"{name}:{version}")
        return SealedArtifact(row[0], row[1], self._keys.unwrap(bytes(row[2]), name, version), row[3])

    def data_keys(self) -> list[tuple[str, str, bytes]]:
        """Every stored (wrapped) data key: (name, version, stored value) for key rotation."""
        k = t.model_keys.c
        with self._read() as conn:
            rows = conn.execute(sa.select(k.name, k.version, k.data_key).order_by(k.name, k.version)).all()
        return [(name, version, bytes(stored)) for name, version, stored in rows]

    def replace_data_keys(self, rows: Iterable[tuple[str, str, bytes, bytes]]) -> int:
        """Replace stored data keys (name, version, old value, new value) in one transaction; a row
        whose value changed meanwhile (a revocation destroyed the key) is left alone."""
        k = t.model_keys.c
        batch = list(rows)

        def tx(conn: sa.Connection) -> int:
            changed = 0
            for name, version, old, new in batch:
                changed += conn.execute(
                    t.model_keys.update()
                    .where(k.name == name, k.version == version, k.data_key == old)
                    .values(data_key=new)
                ).rowcount
            return changed

        return self._write(tx)

    def get_model(self, name: str, version: str | None = None) -> ModelRecord:
        query = _MODELS.where(t.models.c.name == name)
        with self._read() as conn:
            if version:
                row = conn.execute(query.where(t.models.c.version == version)).first()
            else:
                rows = conn.execute(query).all()
                row = max(rows, key=lambda r: _semver_key(r[1])) if rows else None
        if row is None:
            raise NotFound("model", f"{name}:{version}" if version else name)
        return _model(row)

    def list_models(self) -> list[ModelRecord]:
        with self._read() as conn:
            rows = conn.execute(_MODELS.order_by(t.models.c.name, t.models.c.created_ms)).all()
        return [_model(row) for row in rows]

    def set_model_state(self, name: str, version: str, state: str, reason: str, now_ms: int) -> ModelRecord:
        """Move a version along its lifecycle (catalog.lifecycle) and record it in the history. To
        ``revoked``: the version's data key is destroyed in the same transaction, then the journal is
        scrubbed (see ``_scrub``)."""
        from .catalog.lifecycle import ModelState, check_transition

        m = t.models.c

        def tx(conn: sa.Connection) -> None:
            row = conn.execute(sa.select(m.state).where(m.name == name, m.version == version)).first()
            if row is None:
                raise NotFound("model", f"{name}:{version}")
            check_transition(f"{name}:{version}", ModelState(row[0]), ModelState(state))
            conn.execute(
                t.models.update()
                .where(m.name == name, m.version == version)
                .values(state=state, state_reason=_text(reason), updated_ms=now_ms)
            )
            _history(conn, name, version, now_ms, state, reason)
            if state == ModelState.REVOKED:
                _destroy_key(conn, name, version, now_ms)

        self._write(tx)
        if state == ModelState.REVOKED:
            self._scrub()
        return self.get_model(name, version)

    def model_history(self, name: str) -> tuple[list[ModelRecord], list[HistoryEntry]]:
        """Every version of ``name`` (semantic version order) and its lifecycle entries (oldest first)."""
        h = t.model_history.c
        with self._read() as conn:
            rows = conn.execute(_MODELS.where(t.models.c.name == name)).all()
            entries = conn.execute(
                sa.select(h.version, h.at_ms, h.action, h.reason)
                .where(h.name == name)
                .order_by(h.at_ms, h.id)
            ).all()
        if not rows:
            raise NotFound("model", name)
        versions = sorted((_model(r) for r in rows), key=lambda m: _semver_key(m.version))
        return versions, [HistoryEntry(*r) for r in entries]

    def revoked_keys(self) -> list[tuple[str, str]]:
        k = t.model_keys.c
        with self._read() as conn:
            rows = conn.execute(
                sa.select(k.name, k.version).where(k.revoked_ms > 0).order_by(k.name, k.version)
            ).all()
        return [(r[0], r[1]) for r in rows]

    def read_artifact(self, sha256: str) -> bytes:
        if len(sha256) != 64 or not all(c in "0123456789abcdef" for c in sha256):
            raise NotFound("artifact", sha256)
        if self.artifact_dir is not None:
            try:
                return (self.artifact_dir / sha256).read_bytes()
            except FileNotFoundError as err:
                raise NotFound("artifact", sha256) from err
        with self._read() as conn:
            data = conn.execute(sa.select(t.artifacts.c.data).where(t.artifacts.c.sha256 == sha256)).scalar()
        if data is None:
            raise NotFound("artifact", sha256)
        return bytes(data)

    # ---------------------------------------------------------------- wipes

    def start_wipe(
        self,
        wipe: WipeRecord,
        replicas: Iterable[ReplicaChange],
        revoke_reason: str,
        *,
        key_holders: bool = False,
        evict: Callable[[ReplicaRecord, set[str]], ReplicaChange | None] | None = None,
    ) -> WipeRecord:
        """One transaction: revoke every version of the wipe that is not revoked yet (destroying its
        key), evict ``replicas`` and, with ``evict``, the change it gives for each stored replica and
        the wipe's final nodes, record the wipe and its nodes as pending. With ``key_holders``,
        every node a key of these versions was released to is among them too, read after the keys
        are destroyed: a release recorded before this transaction is found here, one after it is
        refused (``record_key_releases``)."""
        given = list(replicas)

        def tx(conn: sa.Connection) -> None:
            _revoke_wiped(conn, wipe, revoke_reason)
            nodes = dict(wipe.nodes)
            if key_holders:
                for node_id in sorted(_key_holders(conn, wipe.name, wipe.versions) - set(nodes)):
                    nodes[node_id] = WipeNode(WIPE_PENDING, wipe.created_ms)
            changes = list(given)
            if evict is not None:
                on = set(nodes)
                stored = (_replica(row) for row in conn.execute(_LIST_REPLICAS))
                changes += [c for rep in stored if (c := evict(rep, on)) is not None]
            self._apply_changes(conn, changes)
            conn.execute(
                t.wipes.insert(),
                {
                    "id": wipe.id,
                    "name": wipe.name,
                    "versions": ",".join(wipe.versions),
                    "sha256s": ",".join(wipe.sha256s),
                    "reason": _text(wipe.reason),
                    "created_ms": wipe.created_ms,
                    "deadline_ms": wipe.deadline_ms,
                    "replicas_evicted": len(changes),
                },
            )
            if nodes:
                conn.execute(
                    t.wipe_nodes.insert(),
                    [
                        {
                            "wipe_id": wipe.id,
                            "node_id": node_id,
                            "state": node.state,
                            "updated_ms": node.updated_ms,
                            "message": _text(node.message),
                        }
                        for node_id, node in nodes.items()
                    ],
                )

        self._write(tx)
        self._scrub()
        return self.get_wipe(wipe.id)

    def set_wipe_node(self, wipe_id: str, node_id: str, node: WipeNode) -> None:
        w = t.wipe_nodes.c
        self._write(
            lambda conn: conn.execute(
                t.wipe_nodes.update()
                .where(w.wipe_id == wipe_id, w.node_id == node_id)
                .values(state=node.state, updated_ms=node.updated_ms, message=_text(node.message))
            )
        )

    def get_wipe(self, wipe_id: str) -> WipeRecord:
        with self._read() as conn:
            wipes = self._wipes(conn, t.wipes.c.id == wipe_id)
        if not wipes:
            raise NotFound("wipe", wipe_id)
        return wipes[0]

    def list_wipes(self) -> list[WipeRecord]:
        with self._read() as conn:
            return self._wipes(conn, sa.true())

    def unconfirmed_wipes(self) -> list[WipeRecord]:
        """The wipes with a node that has not confirmed (pending, or quarantined for it)."""
        n = t.wipe_nodes.c
        open_ = sa.select(n.wipe_id).where(n.state != "confirmed")
        with self._read() as conn:
            return self._wipes(conn, t.wipes.c.id.in_(open_))

    @staticmethod
    def _wipes(conn: sa.Connection, where: sa.ColumnElement[bool]) -> list[WipeRecord]:
        w, n = t.wipes.c, t.wipe_nodes.c
        rows = conn.execute(
            sa.select(
                w.id, w.name, w.versions, w.sha256s, w.reason, w.created_ms, w.deadline_ms, w.replicas_evicted
            )
            .where(where)
            .order_by(w.created_ms, w.id)
        ).all()
        nodes: dict[str, dict[str, WipeNode]] = {row[0]: {} for row in rows}
        node_rows = conn.execute(
            sa.select(n.wipe_id, n.node_id, n.state, n.updated_ms, n.message)
            .join(t.wipes, t.wipes.c.id == n.wipe_id)
            .where(where)
            .order_by(n.wipe_id, n.node_id)
        )
        for wid, node_id, state, updated, message in node_rows:
            nodes[wid][node_id] = WipeNode(state, updated, message)
        return [
            WipeRecord(
                wid,
                name,
                tuple(versions.split(",")),
                tuple(sha256s.split(",")),
                reason,
                created,
                deadline,
                evicted,
                nodes[wid],
            )
            for wid, name, versions, sha256s, reason, created, deadline, evicted in rows
        ]

    # ---------------------------------------------------------------- deployments

    def put_deployment(
        self, manifest: DeploymentManifest, now_ms: int
    ) -> tuple[DeploymentRecord, bool, bool]:
        """Create or update; returns (record, created, changed). The generation grows on change."""
        text = manifest.model_dump_json(by_alias=True)
        name = manifest.metadata.name
        d = t.deployments.c

        def tx(conn: sa.Connection) -> tuple[DeploymentRecord, bool, bool]:
            row = conn.execute(
                sa.select(d.generation, d.manifest, d.created_ms, d.updated_ms).where(d.name == name)
            ).first()
            if row is None:
                conn.execute(
                    t.deployments.insert(),
                    {
                        "name": name,
                        "generation": 1,
                        "manifest": text,
                        "created_ms": now_ms,
                        "updated_ms": now_ms,
                    },
                )
                self._keep_template(conn, name, 1, text)
                self._record_changes(conn, [name])
                return DeploymentRecord(name, 1, manifest, now_ms, now_ms), True, False
            generation, old_text, created, updated = row
            old = DeploymentManifest.model_validate_json(old_text)
            if old_text == text:
                return DeploymentRecord(name, generation, old, created, updated), False, False
            # Scaling alone does not make a new generation: existing replicas stay valid.
            new_generation = generation if _same_template(old, manifest) else generation + 1
            conn.execute(
                t.deployments.update()
                .where(d.name == name)
                .values(generation=new_generation, manifest=text, updated_ms=now_ms)
            )
            self._keep_template(conn, name, new_generation, text)
            self._record_changes(conn, [name])
            return DeploymentRecord(name, new_generation, manifest, created, now_ms), False, True

        return self._write(tx)

    def get_deployment(self, name: str) -> DeploymentRecord:
        with self._read() as conn:
            row = conn.execute(_GET_DEPLOYMENT, {"name": name}).first()
        if row is None:
            raise NotFound("deployment", name)
        return _deployment(row)

    def list_deployments(self) -> list[DeploymentRecord]:
        with self._read() as conn:
            rows = conn.execute(_LIST_DEPLOYMENTS).all()
        return [_deployment(row) for row in rows]

    def pipeline_stages(self, pipeline: str) -> set[str]:
        """The deployments that are stages of the multi-exit model ``pipeline``: the rows whose stored
        JSON names it are found by the database (every manifest validated took 0.5 s at 10,000
        deployments, on each team push of a new name), then checked."""
        text = f"%{json.dumps(pipeline)}%"  # the quoted name (a DNS label: no LIKE wildcards), anywhere
        with self._read() as conn:
            rows = conn.execute(_DEPLOYMENTS.where(t.deployments.c.manifest.like(text))).all()
        return {
            d.name
            for d in map(_deployment, rows)
            if d.manifest.spec.multi_exit is not None and d.manifest.spec.multi_exit.pipeline == pipeline
        }

    def owned_deployments(self, owner: str) -> dict[str, int]:
        """The deployments ``owner`` holds, each with its creation time (one query)."""
        return {name: int(created) for name, created in self._owned(owner, t.deployments.c.created_ms)}

    def owned_replicas(self, owner: str) -> dict[str, int]:
        """The deployments ``owner`` holds and the replicas each asks for (a quota's reading: one
        query for the owner's rows, the count read from the stored JSON without validating all of
        every tenant's manifests, which took 0.5 s at 10,000 deployments)."""
        rows = self._owned(owner, t.deployments.c.manifest)
        return {name: int(json.loads(text)["spec"]["replicas"]) for name, text in rows}

    def _owned(self, owner: str, column: sa.ColumnElement[Any]) -> list[tuple[str, Any]]:
        """(name, ``column``) of each deployment ``owner`` holds: the owners joined in the database."""
        d, o = t.deployments.c, t.owners.c
        query = (
            sa.select(d.name, column)
            .join_from(t.deployments, t.owners, sa.and_(o.kind == "deployment", o.name == d.name))
            .where(o.owner == owner)
        )
        with self._read() as conn:
            return [(name, value) for name, value in conn.execute(query).all()]

    def delete_deployment(self, name: str, now_ms: int) -> list[ReplicaRecord]:
        """Remove the deployment and mark its replicas Evicted, in one transaction."""

        def tx(conn: sa.Connection) -> list[ReplicaRecord]:
            if conn.execute(t.deployments.delete().where(t.deployments.c.name == name)).rowcount == 0:
                raise NotFound("deployment", name)
            conn.execute(t.deployment_templates.delete().where(t.deployment_templates.c.deployment == name))
            conn.execute(t.rollouts.delete().where(t.rollouts.c.deployment == name))
            evicted, dropped = [], []
            for row in conn.execute(_LIST_REPLICAS_OF, {"deployment": name}):
                rep = _replica(row)
                if rep.phase == Phase.EVICTED:
                    continue
                if rep.node_id is None:
                    dropped.append(rep.id)
                    continue
                evicted.append(
                    replace(
                        rep, phase=Phase.EVICTED, reason="deployment.deleted", message="", updated_ms=now_ms
                    )
                )
            for ids in _chunks(dropped):
                conn.execute(_DELETE_REPLICAS, {"ids": ids})
            if evicted:
                conn.execute(self._statements.upsert_replica, [_replica_row(rep) for rep in evicted])
            self._record_changes(conn, [name])
            return evicted

        return self._write(tx)

    # ---------------------------------------------------------------- replicas

    def list_replicas(self, deployment: str | None = None) -> list[ReplicaRecord]:
        if deployment is None and self._replicas is not None:
            return list(self._replicas)
        with self._read() as conn:
            if deployment is None:
                rows = conn.execute(_LIST_REPLICAS).all()
            else:
                rows = conn.execute(_LIST_REPLICAS_OF, {"deployment": deployment}).all()
            replicas = [_replica(row) for row in rows]
            if deployment is None and self.dialect == "sqlite":
                self._replicas = replicas  # read under the lock: no write came in between
        return list(replicas)

    def replica_counts(self, deployment: str | None = None) -> dict[tuple[str, int, Phase], int]:
        """(deployment, generation, phase) -> how many of its replicas are in that phase, evicted ones
        aside, counted by the store (of one deployment, or of all): what a view of counts needs (the
        running replicas, a rollout's live counts), without reading every replica."""
        query = _COUNTS if deployment is None else _COUNTS.where(t.replicas.c.deployment == deployment)
        with self._read() as conn:
            return {
                (name, int(gen), Phase(phase)): int(count)
                for name, gen, phase, count in conn.execute(query).all()
            }

    def apply_replica_changes(self, changes: Iterable[ReplicaChange]) -> None:
        """Insert, update or delete replicas in one transaction, checking every phase transition."""
        batch = list(changes)
        self._write(lambda conn: self._apply_changes(conn, batch))

    def _apply_changes(self, conn: sa.Connection, changes: Sequence[ReplicaChange]) -> None:
        """Check every transition against the stored phase (or the batch's own earlier change of the
        same replica), then write the batch with one statement per kind of change."""
        if not changes:
            return
        ids = list({c.replica.id for c in changes})
        phases: dict[str, Phase | None] = {}
        for chunk in _chunks(ids):
            phases.update((rid, Phase(phase)) for rid, phase in conn.execute(_REPLICA_PHASES, {"ids": chunk}))
        pending: dict[str, dict[str, Any] | None] = {}  # id -> the row to write, None: deleted
        deleted: set[str] = set()
        for change in changes:
            rep = change.replica
            if change.delete:
                phases[rep.id] = pending[rep.id] = None
                deleted.add(rep.id)
                continue
            stored = phases.get(rep.id)
            if stored is not None:
                check_transition(stored, rep.phase)
            phases[rep.id] = rep.phase
            row, earlier = _replica_row(rep), pending.get(rep.id)
            if earlier is None:
                pending[rep.id] = row
            else:  # a second change of the same replica updates what an upsert would update
                earlier.update((c, row[c]) for c in _REPLICA_MUTABLE)
        for chunk in _chunks(sorted(deleted)):
            conn.execute(_DELETE_REPLICAS, {"ids": chunk})
        written = [row for row in pending.values() if row is not None]
        if written:
            conn.execute(self._statements.upsert_replica, written)
        self._record_changes(conn, {c.replica.deployment for c in changes})

    # ---------------------------------------------------------------- nodes

    def get_node(self, node_id: str) -> NodeRecord | None:
        with self._read() as conn:
            row = conn.execute(_GET_NODE, {"id": node_id}).first()
        return None if row is None else _node(row)

    def list_nodes(self) -> list[NodeRecord]:
        with self._read() as conn:
            rows = conn.execute(_LIST_NODES).all()
        return [_node(row) for row in rows]

    def cordoned_nodes(self) -> list[str]:
        n = t.nodes.c
        with self._read() as conn:
            return [r[0] for r in conn.execute(sa.select(n.id).where(n.cordoned != 0).order_by(n.id))]

    def put_inventories(self, records: Iterable[NodeRecord]) -> None:
        """Insert or update nodes in one transaction (an ingest batch's hellos): a known node's
        inventory and when it was heard, never its cordon (which only :meth:`set_cordoned` writes:
        a replica's view of the cordons may be older than another replica's cordon call); a new
        node is stored as ``records`` say."""
        rows = [
            {
                "id": r.id,
                "cordoned": int(r.cordoned),
                "inventory": r.inventory,
                "last_seen_ms": r.last_seen_ms,
            }
            for r in records
        ]
        if rows:
            self._write(lambda conn: conn.execute(self._statements.upsert_inventory, rows))

    def set_cordoned(self, node_id: str, cordoned: bool) -> None:
        """Cordon or uncordon a known node (NotFound otherwise), touching nothing else of it."""
        n = t.nodes

        def tx(conn: sa.Connection) -> None:
            if conn.execute(n.update().where(n.c.id == node_id).values(cordoned=int(cordoned))).rowcount != 1:
                raise NotFound("node", node_id)

        self._write(tx)

    # ---------------------------------------------------------------- attestation enrollments

    def put_enrollment(self, node_id: str, record: bytes, now_ms: int) -> None:
        """Keep a node's enrollment (a serialized edgeward.v1.Enrollment) across restarts."""
        row = {"node_id": node_id, "record": record, "updated_ms": now_ms}
        self._write(lambda conn: conn.execute(self._statements.upsert_enrollment, row))

    def list_enrollments(self) -> list[bytes]:
        e = t.enrollments.c
        with self._read() as conn:
            rows = conn.execute(sa.select(e.record).order_by(e.node_id)).all()
        return [bytes(r[0]) for r in rows]

    # ---------------------------------------------------------------- attestation results

    def put_attestations(self, rows: list[AttestationRow]) -> int:
        """The leader's latest attestation view of these nodes, for the replicas that do not lead
        (docs/scale-out.md): one revision, the next, for the whole batch; returns it. Writes take
        turns, so the revisions commit in order."""
        a = t.attestations

        def tx(conn: sa.Connection) -> int:
            last = conn.execute(sa.select(sa.func.coalesce(sa.func.max(a.c.revision), 0))).scalar_one()
            revision = int(last) + 1
            conn.execute(
                self._statements.upsert_attestation,
                [
                    {
                        "node_id": row.node_id,
                        "revision": revision,
                        "view": row.view,
                        "quarantine_reason": row.quarantine_reason,
                        "quarantine_message": _text(row.quarantine_message),
                    }
                    for row in sorted(rows, key=lambda r: r.node_id)  # rows locked in one order
                ],
            )
            return revision

        return self._write(tx) if rows else 0

    def attestations_since(
        self, after: tuple[int, str], limit: int = 5000
    ) -> list[tuple[int, AttestationRow]]:
        """The nodes whose attestation view was written after ``after`` (revision, node id: the cursor
        of the last row read), in that order, at most ``limit``."""
        a = t.attestations.c
        revision, node_id = after
        query = (
            sa.select(a.revision, a.node_id, a.view, a.quarantine_reason, a.quarantine_message)
            .where(sa.or_(a.revision > revision, sa.and_(a.revision == revision, a.node_id > node_id)))
            .order_by(a.revision, a.node_id)
            .limit(limit)
        )
        with self._read() as conn:
            rows = conn.execute(query).all()
        return [(int(r[0]), AttestationRow(r[1], bytes(r[2]), r[3], r[4])) for r in rows]

    # ---------------------------------------------------------------- key releases

    def record_key_releases(
        self,
        releases: Iterable[tuple[str, str, str]],
        now_ms: int,
        carried: Iterable[tuple[str, str]] = (),
    ) -> set[tuple[str, str]]:
        """Keep that each (model name, version, node) had the version's data key released to it; a
        release recorded before is kept as it was (the first time). Returns the (name, version),
        of these releases and of the ``carried`` ones (keys about to be sent again, released
        before), whose key is destroyed (revoked, through any replica): their releases are not
        recorded and the caller must not send the keys it wrapped from an older read. Writes run
        one at a time, so a wipe's transaction either finds a release among its key holders or
        makes it refused."""
        wanted = sorted(set(releases))  # rows locked in one order
        versions = {(name, version) for name, version, _ in wanted} | set(carried)
        if not wanted:
            if not versions:
                return set()
            with self._read() as conn:
                return _revoked(conn, versions)

        def tx(conn: sa.Connection) -> set[tuple[str, str]]:
            refused = _revoked(conn, versions, lock={(name, version) for name, version, _ in wanted})
            rows = [
                {"model_name": name, "model_version": version, "node_id": node_id, "released_ms": now_ms}
                for name, version, node_id in wanted
                if (name, version) not in refused
            ]
            if rows:
                conn.execute(self._statements.record_release, rows)
            return refused

        return self._write(tx)

    def key_holders(self, name: str, versions: Iterable[str]) -> set[str]:
        """The nodes a key of these versions of model ``name`` was ever released to."""
        with self._read() as conn:
            return _key_holders(conn, name, versions)

    # ---------------------------------------------------------------- rollouts

    def get_template(self, name: str, generation: int) -> DeploymentManifest:
        """The manifest a deployment had at ``generation`` (the last TEMPLATES_KEPT are kept)."""
        with self._read() as conn:
            text = _template(conn, name, generation)
        if text is None:
            raise NotFound("deployment template", f"{name}@{generation}")
        return DeploymentManifest.model_validate_json(text)

    def list_rollouts(self) -> dict[str, str]:
        """The current rollout record (JSON, orchestrator.rollout.Rollout) of each deployment."""
        r = t.rollouts.c
        with self._read() as conn:
            rows = conn.execute(sa.select(r.deployment, r.record).order_by(r.deployment)).all()
        return {row[0]: row[1] for row in rows}

    def request_rollout_action(self, deployment: str, kind: str, reason: str, now_ms: int) -> int:
        """Ask the leader for a rollout action (this replica does not lead); its id. On PostgreSQL
        the leader is notified at commit."""

        def tx(conn: sa.Connection) -> int:
            a = t.rollout_actions
            row = {"deployment": deployment, "kind": kind, "reason": reason, "requested_ms": now_ms}
            action_id = conn.execute(a.insert().values(**row).returning(a.c.id)).scalar_one()
            if self.dialect == "postgresql":
                conn.execute(NOTIFY_ACTIONS, {"writer": self.writer})
            return int(action_id)

        return self._write(tx)

    def pending_rollout_actions(self) -> list[tuple[int, str, str, str]]:
        """(id, deployment, kind, reason) of the actions no leader has taken yet, oldest first."""
        a = t.rollout_actions.c
        query = (
            sa.select(a.id, a.deployment, a.kind, a.reason).where(a.state == ACTION_PENDING).order_by(a.id)
        )
        with self._read() as conn:
            return [(int(i), d, k, r) for i, d, k, r in conn.execute(query).all()]

    def finish_rollout_action(self, action_id: int, ok: bool, outcome: str, now_ms: int) -> None:
        """The leader took the action: its ``outcome`` (done or refused) for the asking replica. The
        outcomes nobody came back for (the asking replica died) go after ACTIONS_KEPT_MS."""
        a = t.rollout_actions

        def tx(conn: sa.Connection) -> None:
            conn.execute(
                a.update()
                .where(a.c.id == action_id, a.c.state == ACTION_PENDING)
                .values(state=ACTION_DONE if ok else ACTION_REFUSED, outcome=outcome)
            )
            conn.execute(
                a.delete().where(a.c.state != ACTION_PENDING, a.c.requested_ms < now_ms - ACTIONS_KEPT_MS)
            )

        self._write(tx)

    def rollout_action(self, action_id: int) -> tuple[str, str | None] | None:
        """(state, outcome) of an action asked of the leader; None if it is gone."""
        a = t.rollout_actions.c
        with self._read() as conn:
            row = conn.execute(sa.select(a.state, a.outcome).where(a.id == action_id)).first()
        return None if row is None else (row[0], row[1])

    def withdraw_rollout_action(self, action_id: int) -> bool:
        """Take back an action no leader has taken yet; False if one has (its outcome is coming)."""
        a = t.rollout_actions

        def tx(conn: sa.Connection) -> bool:
            gone = conn.execute(a.delete().where(a.c.id == action_id, a.c.state == ACTION_PENDING))
            return gone.rowcount == 1

        return self._write(tx)

    def forget_rollout_action(self, action_id: int) -> None:
        a = t.rollout_actions
        self._write(lambda conn: conn.execute(a.delete().where(a.c.id == action_id)))

    def put_rollout(self, deployment: str, record: str, now_ms: int) -> None:
        def tx(conn: sa.Connection) -> None:
            d = t.deployments.c
            if conn.execute(sa.select(d.name).where(d.name == deployment)).first() is None:
                raise NotFound("deployment", deployment)
            conn.execute(
                self._statements.upsert_rollout,
                {"deployment": deployment, "record": record, "updated_ms": now_ms},
            )
            self._record_changes(conn, [deployment])

        self._write(tx)

    def roll_back(
        self, name: str, from_generation: int, to_generation: int, record: str, now_ms: int
    ) -> DeploymentRecord:
        """One transaction: the deployment at ``from_generation`` gets the template of the earlier
        ``to_generation`` as a new generation, the live replicas of ``to_generation`` are relabelled
        to it (same template: they stay where they run), and the rollout ``record`` is written.
        Refused (NotFound) when the deployment moved past ``from_generation`` meanwhile."""
        d, r = t.deployments.c, t.replicas.c

        def tx(conn: sa.Connection) -> DeploymentRecord:
            row = conn.execute(sa.select(d.generation, d.created_ms).where(d.name == name)).first()
            if row is None or row[0] != from_generation:
                raise NotFound("deployment", f"{name}@{from_generation}")
            text = _template(conn, name, to_generation)
            if text is None:
                raise NotFound("deployment template", f"{name}@{to_generation}")
            new_generation = from_generation + 1
            conn.execute(
                t.deployments.update()
                .where(d.name == name)
                .values(generation=new_generation, manifest=text, updated_ms=now_ms)
            )
            self._keep_template(conn, name, new_generation, text)
            conn.execute(
                t.replicas.update()
                .where(r.deployment == name, r.generation == to_generation, r.phase != Phase.EVICTED.value)
                .values(generation=new_generation)
            )
            conn.execute(
                self._statements.upsert_rollout, {"deployment": name, "record": record, "updated_ms": now_ms}
            )
            self._record_changes(conn, [name])
            return DeploymentRecord(
                name, new_generation, DeploymentManifest.model_validate_json(text), row[1], now_ms
            )

        return self._write(tx)

    def _keep_template(self, conn: sa.Connection, name: str, generation: int, text: str) -> None:
        tpl = t.deployment_templates.c
        conn.execute(
            self._statements.upsert_template, {"deployment": name, "generation": generation, "manifest": text}
        )
        conn.execute(
            t.deployment_templates.delete().where(
                tpl.deployment == name, tpl.generation <= generation - TEMPLATES_KEPT
            )
        )


class _Statements:
    """The statements whose SQL differs by engine (upserts), built once per store."""

    def __init__(self, insert: Callable[[sa.Table], Any]) -> None:
        def upsert(table: sa.Table, keys: tuple[str, ...], update: tuple[str, ...]) -> sa.Executable:
            stmt = insert(table)
            return stmt.on_conflict_do_update(
                index_elements=list(keys), set_={c: stmt.excluded[c] for c in update}
            )

        self.upsert_replica = upsert(t.replicas, ("id",), _REPLICA_MUTABLE)
        self.upsert_inventory = upsert(t.nodes, ("id",), ("inventory", "last_seen_ms"))
        self.upsert_enrollment = upsert(t.enrollments, ("node_id",), ("record", "updated_ms"))
        self.upsert_attestation = upsert(
            t.attestations, ("node_id",), ("revision", "view", "quarantine_reason", "quarantine_message")
        )
        self.upsert_rollout = upsert(t.rollouts, ("deployment",), ("record", "updated_ms"))
        self.upsert_template = upsert(t.deployment_templates, ("deployment", "generation"), ("manifest",))
        self.put_artifact = insert(t.artifacts).on_conflict_do_nothing(index_elements=["sha256"])
        self.claim_owner = insert(t.owners).on_conflict_do_nothing(index_elements=["kind", "name"])
        self.record_release = insert(t.key_releases).on_conflict_do_nothing(
            index_elements=["model_name", "model_version", "node_id"]
        )


_MODELS = sa.select(
    *(
        t.models.c[c]
        for c in (
            "name",
            "version",
            "sha256",
            "size",
            "info",
            "created_ms",
            "state",
            "state_reason",
            "updated_ms",
        )
    )
)
_DEPLOYMENTS = sa.select(
    t.deployments.c.name,
    t.deployments.c.generation,
    t.deployments.c.manifest,
    t.deployments.c.created_ms,
    t.deployments.c.updated_ms,
)
_REPLICA_COLUMNS = (
    "id",
    "deployment",
    "generation",
    "model_name",
    "model_version",
    "node_id",
    "accelerator",
    "phase",
    "reason",
    "message",
    "updated_ms",
)
# What writing an existing replica changes (its deployment, generation and model never change).
_REPLICA_MUTABLE = ("node_id", "accelerator", "phase", "reason", "message", "updated_ms")
_NODES = sa.select(t.nodes.c.id, t.nodes.c.cordoned, t.nodes.c.inventory, t.nodes.c.last_seen_ms)
# Statements of the hot paths (reconcile, apply, node reports), built once: SQLAlchemy then finds their
# compiled form without rebuilding and re-keying a statement per call.
_REPLICAS = sa.select(*(t.replicas.c[c] for c in _REPLICA_COLUMNS))
_LIST_REPLICAS = _REPLICAS.order_by(t.replicas.c.id)
_LIST_REPLICAS_OF = _REPLICAS.where(t.replicas.c.deployment == sa.bindparam("deployment")).order_by(
    t.replicas.c.id
)
_REPLICA_PHASES = sa.select(t.replicas.c.id, t.replicas.c.phase).where(
    t.replicas.c.id.in_(sa.bindparam("ids", expanding=True))
)
_COUNTS = (
    sa.select(t.replicas.c.deployment, t.replicas.c.generation, t.replicas.c.phase, sa.func.count())
    .where(t.replicas.c.phase != Phase.EVICTED.value)
    .group_by(t.replicas.c.deployment, t.replicas.c.generation, t.replicas.c.phase)
)
_DELETE_REPLICAS = t.replicas.delete().where(t.replicas.c.id.in_(sa.bindparam("ids", expanding=True)))
_GET_DEPLOYMENT = _DEPLOYMENTS.where(t.deployments.c.name == sa.bindparam("name"))
_LIST_DEPLOYMENTS = _DEPLOYMENTS.order_by(t.deployments.c.name)
_GET_NODE = _NODES.where(t.nodes.c.id == sa.bindparam("id"))
_LIST_NODES = _NODES.order_by(t.nodes.c.id)


def _rollback(tx: sa.RootTransaction) -> None:
    if tx.is_active:
        tx.rollback()


def _text(value: str) -> str:
    """Free text as PostgreSQL can store it (no NUL), the same on every engine."""
    return value.replace("\x00", "\ufffd") if "\x00" in value else value


def _chunks(items: Sequence[str]) -> Iterator[Sequence[str]]:
    for i in range(0, len(items), _IN_CHUNK):
        yield items[i : i + _IN_CHUNK]


def _write_file(directory: Path, digest: str, data: bytes) -> None:
    path = directory / digest
    if path.exists():
        return
    # Write-then-rename, so a crash never leaves a truncated artifact under its digest.
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _history(conn: sa.Connection, name: str, version: str, at_ms: int, action: str, reason: str = "") -> None:
    conn.execute(
        t.model_history.insert(),
        {"name": name, "version": version, "at_ms": at_ms, "action": action, "reason": _text(reason)},
    )


def _revoke_wiped(conn: sa.Connection, wipe: WipeRecord, revoke_reason: str) -> None:
    """Revoke every version of ``wipe`` not revoked yet, destroy its key, and note both."""
    from .catalog.lifecycle import ModelState

    m = t.models.c
    for version in wipe.versions:
        row = conn.execute(sa.select(m.state).where(m.name == wipe.name, m.version == version)).first()
        if row is None:
            raise NotFound("model", f"{wipe.name}:{version}")
        if row[0] != ModelState.REVOKED:
            conn.execute(
                t.models.update()
                .where(m.name == wipe.name, m.version == version)
                .values(
                    state=ModelState.REVOKED.value,
                    state_reason=_text(revoke_reason),
                    updated_ms=wipe.created_ms,
                )
            )
            _history(conn, wipe.name, version, wipe.created_ms, "revoked", revoke_reason)
        _destroy_key(conn, wipe.name, version, wipe.created_ms)
        _history(conn, wipe.name, version, wipe.created_ms, "wiped", f"wipe {wipe.id}: {wipe.reason}")


def _key_holders(conn: sa.Connection, name: str, versions: Iterable[str]) -> set[str]:
    k = t.key_releases.c
    query = sa.select(k.node_id).where(k.model_name == name, k.model_version.in_(list(versions)))
    return {r[0] for r in conn.execute(query)}


def _revoked(
    conn: sa.Connection, versions: set[tuple[str, str]], *, lock: set[tuple[str, str]] | None = None
) -> set[tuple[str, str]]:
    """Which of these (model name, version) have their data key destroyed, in one query. The key
    rows of ``lock`` are share-locked first, until the transaction ends (PostgreSQL), so no
    revocation commits between this read and the releases written after it (besides the store's
    write lock)."""
    k = t.model_keys.c
    pair = sa.tuple_(k.name, k.version)
    if lock:
        conn.execute(
            sa.select(k.name)
            .where(pair.in_(sorted(lock)))
            .order_by(k.name, k.version)
            .with_for_update(read=True)
        ).all()
    query = sa.select(k.name, k.version).where(pair.in_(sorted(versions)), k.revoked_ms > 0)
    return {(name, version) for name, version in conn.execute(query)}


def _destroy_key(conn: sa.Connection, name: str, version: str, now_ms: int) -> None:
    k = t.model_keys.c
    conn.execute(
        t.model_keys.update()
        .where(k.name == name, k.version == version, k.revoked_ms == 0)
        .values(data_key=b"", revoked_ms=now_ms)
    )


def _template(conn: sa.Connection, name: str, generation: int) -> str | None:
    tpl = t.deployment_templates.c
    return conn.execute(
        sa.select(tpl.manifest).where(tpl.deployment == name, tpl.generation == generation)
    ).scalar()


def _semver_key(version: str) -> tuple[int, int, int, int, str]:
    core, _, pre = version.partition("-")
    major, minor, patch = (int(x) for x in core.split("."))
    # A release sorts after its pre-releases.
    return (major, minor, patch, 0 if pre else 1, pre)


def _same_template(old: DeploymentManifest, new: DeploymentManifest) -> bool:
    # How to roll out (strategy) is not part of what runs: changing it alone replaces nothing.
    ignored = {"replicas": 0, "strategy": None}
    return old.spec.model_copy(update=ignored) == new.spec.model_copy(update=ignored)


def _model(row: Sequence[Any]) -> ModelRecord:
    name, version, sha256, size, info, created, state, state_reason, updated = row
    return ModelRecord(name, version, sha256, size, bytes(info), created, state, state_reason, updated)


def _deployment(row: Sequence[Any]) -> DeploymentRecord:
    name, generation, text, created, updated = row
    return DeploymentRecord(name, generation, DeploymentManifest.model_validate_json(text), created, updated)


def _node(row: Sequence[Any]) -> NodeRecord:
    node_id, cordoned, inventory, last_seen = row
    return NodeRecord(node_id, bool(cordoned), None if inventory is None else bytes(inventory), last_seen)


_PHASES = {p.value: p for p in Phase}


def _replica(row: Sequence[Any]) -> ReplicaRecord:
    (rid, dep, gen, mname, mver, node, acc, phase, reason, message, updated) = row
    return ReplicaRecord(
        id=rid,
        deployment=dep,
        generation=gen,
        model_name=mname,
        model_version=mver,
        phase=_PHASES.get(phase) or Phase(phase),  # a dict lookup: Phase(...) costs a microsecond a row
        updated_ms=updated,
        node_id=node,
        accelerator=acc,
        reason=reason,
        message=message,
    )


def _replica_row(rep: ReplicaRecord) -> dict[str, Any]:
    return {
        "id": rep.id,
        "deployment": rep.deployment,
        "generation": rep.generation,
        "model_name": rep.model_name,
        "model_version": rep.model_version,
        "node_id": rep.node_id,
        "accelerator": rep.accelerator,
        "phase": rep.phase.value,
        "reason": _text(rep.reason),
        "message": _text(rep.message),
        "updated_ms": rep.updated_ms,
    }


def open_store(config: OrchestratorConfig, keys: DataKeys | None = None) -> SqlStore:
    """The store ``config`` names (IO: opens, creates or migrates it; reads or creates the KEK)."""
    url = config.state.url.get_secret_value() if config.state.url is not None else None
    return SqlStore(
        config.state_dir,
        url,
        keys=keys or config.key_encryption.open(config.state_dir),
        pool_size=config.state.pool_size,
        connect_timeout_s=config.state.connect_timeout_s,
        idle_in_transaction_s=config.state.lease_ttl_s,
    )
