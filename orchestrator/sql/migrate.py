"""Bring a store to the newest schema at startup: Alembic, run from code, in one transaction.

- a new (empty) database is created by the whole history;
- a SQLite state dir written before Alembic (schema "1".."3" in its ``meta`` table) is first brought
  to "3" by the frozen hand-written chain below, then stamped with the baseline (0001) and upgraded;
- on PostgreSQL the migration holds a transaction-scoped advisory lock, so replicas starting together
  migrate once, one after the other (the others find the store at head).

The scripts ship inside the package (``migrations/``): no alembic.ini is needed at run time.
"""

from __future__ import annotations

import logging
from pathlib import Path

import sqlalchemy as sa

from ..errors import StoreError
from .engine import PURPOSE, WRITE
from .schema import HEAD

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).with_name("migrations")
BASELINE = "0001"
# pg_advisory_xact_lock key of the migration: "edgeward" in ASCII, as a signed 64-bit integer.
MIGRATION_LOCK = int.from_bytes(b"edgeward", "big", signed=True)

# The store as the first release created it (schema "1") and the hand-written migrations to "3",
# frozen: they only ever run on SQLite state dirs from before Alembic.
LEGACY_SCHEMA = """
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
LEGACY_MIGRATIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "1": (
        "2",
        (
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
            "CREATE TABLE rollouts (deployment TEXT PRIMARY KEY, record TEXT NOT NULL, updated_ms INTEGER NOT NULL)",
            "CREATE TABLE deployment_templates (deployment TEXT NOT NULL, generation INTEGER NOT NULL, "
            "manifest TEXT NOT NULL, PRIMARY KEY (deployment, generation))",
            "INSERT INTO deployment_templates SELECT name, generation, manifest FROM deployments",
        ),
    ),
}
LEGACY_LAST = "3"


def migrate(engine: sa.Engine, where: str) -> None:
    """Upgrade the store to ``HEAD`` in one transaction. ``where`` names the store in errors (a path,
    or a URL without password)."""
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            # READ COMMITTED: a replica that waited for the lock must see what the one before it
            # created (a SERIALIZABLE snapshot would be taken by the lock statement, before the wait).
            conn.execution_options(isolation_level="READ COMMITTED")
        else:
            conn.info[PURPOSE] = WRITE
        try:
            _migrate(conn, where)
        finally:
            conn.info.pop(PURPOSE, None)


def _migrate(conn: sa.Connection, where: str) -> None:
    with conn.begin():
        if conn.dialect.name == "postgresql":
            conn.execute(sa.select(sa.func.pg_advisory_xact_lock(MIGRATION_LOCK)))
        tables = set(sa.inspect(conn).get_table_names())
        current = (
            conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()
            if "alembic_version" in tables
            else None
        )
        if current == HEAD:
            return
        # Alembic is imported only when there is something to do: most starts find the store at head.
        from alembic import command
        from alembic.config import Config
        from alembic.script import ScriptDirectory
        from alembic.util import CommandError

        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        config.attributes["connection"] = conn
        if current is not None:
            try:
                ScriptDirectory.from_config(config).get_revision(current)
            except CommandError as err:
                raise StoreError(
                    f"{where}: store is at revision {current!r}, which this release does not know "
                    "(written by a newer edgeward?)"
                ) from err
        elif "meta" in tables:
            _legacy_to_baseline(conn, where)
            command.stamp(config, BASELINE)
        elif tables:
            raise StoreError(
                f"{where}: the database holds tables but no edgeward store: refusing to touch it"
            )
        log.info("store %s: migrating from %s to %s", where, current or "nothing", HEAD)
        command.upgrade(config, "head")


def _legacy_to_baseline(conn: sa.Connection, where: str) -> None:
    found = conn.execute(sa.text("SELECT value FROM meta WHERE key='schema'")).scalar()
    known = [*LEGACY_MIGRATIONS, LEGACY_LAST]
    if conn.dialect.name != "sqlite" or found not in known:
        raise StoreError(
            f"{where}: store schema {found}, expected one of {', '.join(known)} or an Alembic revision"
        )
    while found != LEGACY_LAST:
        target, statements = LEGACY_MIGRATIONS[found]
        for statement in statements:
            conn.exec_driver_sql(statement)
        conn.exec_driver_sql("UPDATE meta SET value=? WHERE key='schema'", (target,))
        found = target
