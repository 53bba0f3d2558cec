"""Engines of the store: SQLite under the state dir (the default) or PostgreSQL at a URL.

SQLite: WAL journal, ``synchronous=NORMAL``, foreign keys on, ``secure_delete`` on; sqlite3's own
transaction handling is switched off and every transaction starts with our BEGIN (IMMEDIATE for a
write, so a writer holds the lock from its first read and never has to upgrade it).

PostgreSQL: psycopg 3 through SQLAlchemy's pool; writes run SERIALIZABLE (and are retried on a
serialization failure by the store), reads REPEATABLE READ READ ONLY (one snapshot per read), the
shared ingest's merges READ COMMITTED (``MERGE``).

Which kind a transaction is, the store says in ``Connection.info[PURPOSE]`` before it begins; the
"begin" hook below turns that into the engine's BEGIN without a round of SQLAlchemy statement
execution (the store's transactions are small and many).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

# Execution option that says what a transaction is for (see _sqlite_begin).
PURPOSE = "edgeward_tx"
WRITE = "write"
READ = "read"
# A write of the shared ingest (orchestrator/node_states.py): one upsert per row whose conditions
# decide on the row's newest version, so READ COMMITTED suffices and replicas writing rows of the
# same nodes wait for each other's row locks instead of failing as serialization conflicts.
MERGE = "merge"

_POSTGRES_SCHEMES = {"postgresql", "postgres", "postgresql+psycopg"}
# SQLSTATEs after which PostgreSQL asks the client to run the transaction again.
RETRYABLE_SQLSTATES = frozenset({"40001", "40P01"})  # serialization_failure, deadlock_detected


class StoreURLError(ValueError):
    """A store URL that cannot be used; the message never contains the password."""


def parse_postgres_url(text: str) -> URL:
    """``postgresql://user[:password]@host[:port]/dbname[?options]`` as SQLAlchemy's psycopg URL.
    The password may also come from libpq's own places (PGPASSWORD, a passfile)."""
    try:
        url = make_url(text)
    except (ArgumentError, ValueError) as err:
        # SQLAlchemy's message repeats the whole string, password included: never pass it on.
        raise StoreURLError("not a URL; expected postgresql://user@host:port/dbname") from err
    if url.drivername not in _POSTGRES_SCHEMES:
        raise StoreURLError(
            f"scheme {url.drivername!r} is not supported; expected postgresql://user@host:port/dbname "
            "(unset: SQLite under state_dir)"
        )
    if not url.database:
        raise StoreURLError("no database name; expected postgresql://user@host:port/dbname")
    if url.port is not None and not 0 < url.port < 65536:
        raise StoreURLError(f"port {url.port} is out of range")
    return url.set(drivername="postgresql+psycopg")


def redacted(url: URL) -> str:
    return url.render_as_string(hide_password=True)


def sqlite_engine(path: Path) -> sa.Engine:
    engine = sa.create_engine(
        URL.create("sqlite", database=str(path)),
        # The store is called from one thread at a time (the orchestrator's store executor), but
        # not always the one that opened it.
        connect_args={"check_same_thread": False},
        pool_size=2,
        hide_parameters=True,  # a failed statement's message never carries data keys or records
    )
    event.listen(engine, "connect", _sqlite_connect)
    event.listen(engine, "begin", _sqlite_begin)
    return engine


def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.isolation_level = None  # we emit BEGIN ourselves (_sqlite_begin)
    cur = dbapi_connection.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    # Deleted or overwritten content (a revoked model's data key) is zeroed in the file, not left in
    # a free page; the WAL is checkpointed after a revocation (see the store's _scrub).
    cur.execute("PRAGMA secure_delete=ON")
    cur.close()


def _sqlite_begin(conn: sa.Connection) -> None:
    # IMMEDIATE: a writer takes the lock at BEGIN, so it never fails to upgrade a read lock mid-way.
    statement = "BEGIN IMMEDIATE" if conn.info.get(PURPOSE) in (WRITE, MERGE) else "BEGIN"
    conn.connection.driver_connection.execute(statement)  # type: ignore[union-attr]


def postgres_engine(
    url: URL, pool_size: int, connect_timeout_s: float, idle_in_transaction_s: float = 3.0
) -> sa.Engine:
    """``idle_in_transaction_s`` (at least 5 s): PostgreSQL ends a session that sits in a transaction
    for longer (a replica paused mid-write): its locks, such as a fencing check's hold on the lease
    row, cannot hold a takeover back for longer than that."""
    engine = sa.create_engine(
        url,
        pool_size=pool_size,
        max_overflow=0,
        pool_pre_ping=True,  # a connection PostgreSQL dropped (restart, failover) is replaced
        pool_timeout=connect_timeout_s,
        connect_args={
            "connect_timeout": max(1, round(connect_timeout_s)),
            "application_name": "edgeward",
            "options": f"-c idle_in_transaction_session_timeout={max(5000, int(idle_in_transaction_s * 1000))}",
        },
        hide_parameters=True,  # a failed statement's message never carries data keys or records
    )
    event.listen(engine, "begin", _postgres_begin)
    return engine


def _postgres_begin(conn: sa.Connection) -> None:
    import psycopg

    what = conn.info.get(PURPOSE)
    if what is None:  # not one of the store's own transactions (migrations choose their own level)
        return
    driver = conn.connection.driver_connection
    # psycopg sends these with the BEGIN it issues before the transaction's first statement.
    driver.isolation_level = {  # type: ignore[union-attr]
        WRITE: psycopg.IsolationLevel.SERIALIZABLE,
        MERGE: psycopg.IsolationLevel.READ_COMMITTED,
    }.get(what, psycopg.IsolationLevel.REPEATABLE_READ)
    driver.read_only = what == READ  # type: ignore[union-attr]


def retryable(err: sa.exc.DBAPIError) -> bool:
    return getattr(err.orig, "sqlstate", None) in RETRYABLE_SQLSTATES
