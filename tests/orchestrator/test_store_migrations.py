"""The store's schema history: Alembic on SQLite and PostgreSQL, and state dirs from the releases that
migrated by hand (schema "1".."3" in the ``meta`` table) upgraded in place without losing data."""

from __future__ import annotations

import hashlib
import logging
import shutil
import sqlite3
import threading
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from orchestrator.config import ConfigError, load_config
from orchestrator.errors import StoreError
from orchestrator.manifest import parse_manifest
from orchestrator.phases import Phase
from orchestrator.sql.migrate import LEGACY_MIGRATIONS, LEGACY_SCHEMA, MIGRATIONS
from orchestrator.sql.schema import HEAD, metadata
from orchestrator.store import SqlStore, WipeNode

# Written by the last release that migrated by hand (its own SqliteStore, schema "3"): every table
# holds rows, one key is revoked, two history entries share a millisecond.
SCHEMA_3 = Path(__file__).parents[1] / "data" / "store" / "schema-3"


def _legacy_store(path: Path, version: str) -> None:
    """A state dir as a release at hand-written schema ``version`` left it, with one deployment."""
    db = sqlite3.connect(path / "edgeward.db")
    db.executescript(LEGACY_SCHEMA)
    db.execute("INSERT INTO meta VALUES ('schema', '1')")
    found = "1"
    while found != version:
        found, statements = LEGACY_MIGRATIONS[found]
        for statement in statements:
            db.execute(statement)
        db.execute("UPDATE meta SET value=? WHERE key='schema'", (found,))
    manifest = parse_manifest(
        "apiVersion: edgeward/v1\nkind: Deployment\nmetadata: {name: d1}\n"
        "spec: {model: {name: m, version: 1.0.0}, replicas: 1}\n"
    )
    db.execute(
        "INSERT INTO deployments VALUES ('d1', 1, ?, 5, 5)", (manifest.model_dump_json(by_alias=True),)
    )
    db.commit()
    db.close()


def _sqlite_rows(path: Path, sql: str) -> list[tuple]:
    db = sqlite3.connect(path / "edgeward.db")
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


def test_a_state_dir_of_the_last_hand_written_release_upgrades_in_place(tmp_path):
    state = tmp_path / "state"
    shutil.copytree(SCHEMA_3, state)
    store = SqlStore(state)
    try:
        assert [(m.name, m.version, m.state) for m in store.list_models()] == [
            ("kws", "0.1.0", "revoked"),
            ("vib-cnn", "1.0.0", "revoked"),
            ("vib-cnn", "1.1.0", "published"),
        ]
        assert store.get_model("vib-cnn", "1.1.0").info == b"info-2"
        sealed = store.get_sealed("vib-cnn", "1.1.0")
        assert (sealed.data_key, sealed.revoked_ms) == (b"K" * 32, 0)
        assert store.get_sealed("kws", "0.1.0").data_key == b""
        assert store.revoked_keys() == [("kws", "0.1.0")]  # 1.0.0 was published unsealed: no key
        assert store.read_artifact(sealed.sha256) == b"sealed-bytes-" * 5
        plain = store.get_model("vib-cnn", "1.0.0")
        assert hashlib.sha256(store.read_artifact(plain.sha256)).hexdigest() == plain.sha256
        _, entries = store.model_history("vib-cnn")
        # the two entries of 9600 ms keep their order (SQLite's rowid before, the id column now)
        assert [(e.version, e.at_ms, e.action) for e in entries] == [
            ("1.0.0", 1000, "published"),
            ("1.1.0", 2000, "published"),
            ("1.0.0", 4000, "deprecated"),
            ("1.0.0", 9600, "revoked"),
            ("1.0.0", 9600, "wiped"),
        ]
        vib = store.get_deployment("vib")
        assert (vib.generation, vib.manifest.spec.model.version) == (2, "1.1.0")
        assert store.get_template("vib", 1).spec.model.version == "1.0.0"
        assert [d.name for d in store.list_deployments()] == ["other", "vib"]
        replicas = {r.id: r for r in store.list_replicas()}
        assert (replicas["vib-a"].phase, replicas["vib-a"].node_id, replicas["vib-a"].accelerator) == (
            Phase.RUNNING,
            "n1",
            "cpu-litert",
        )
        assert (replicas["vib-b"].reason, replicas["vib-b"].message) == ("sched.no_node", "no node fits")
        assert replicas["vib-c"].phase == Phase.EVICTED
        assert store.list_rollouts() == {"vib": '{"deployment": "vib", "state": "progressing"}'}
        n1, n2 = store.list_nodes()
        assert (n1.cordoned, n1.inventory, n1.last_seen_ms) == (False, b"hello-n1", 8200)
        assert (n2.cordoned, n2.inventory) == (True, None)
        assert store.list_enrollments() == [b"enrollment-n1"]
        w1, w2 = store.list_wipes()
        assert (w1.name, w1.versions, w1.nodes["n2"]) == (
            "kws",
            ("0.1.0",),
            WipeNode("confirmed", 9100, "done"),
        )
        assert (w2.name, w2.deadline_ms, list(w2.nodes)) == ("vib-cnn", 9900, ["n2"])
        # it goes on working: a new entry of the same millisecond sorts after the old ones
        store.set_model_state("vib-cnn", "1.1.0", "deprecated", "", 9600)
        assert [e.action for e in store.model_history("vib-cnn")[1]][-3:] == [
            "revoked",
            "wiped",
            "deprecated",
        ]
    finally:
        store.close()
    assert _sqlite_rows(state, "PRAGMA integrity_check") == [("ok",)]
    assert _sqlite_rows(state, "SELECT value FROM meta") == [("alembic",)]
    assert _sqlite_rows(state, "SELECT version_num FROM alembic_version") == [(HEAD,)]
    SqlStore(state).close()  # opening again is a no-op


@pytest.mark.parametrize("version", ["1", "2"])
def test_older_hand_written_schemas_upgrade_too(tmp_path, version):
    _legacy_store(tmp_path, version)
    store = SqlStore(tmp_path)
    try:
        assert store.get_deployment("d1").generation == 1
        assert store.get_template("d1", 1).spec.model.version == "1.0.0"  # "2" -> "3" copied it
        assert store.list_rollouts() == {}
    finally:
        store.close()
    assert _sqlite_rows(tmp_path, "SELECT version_num FROM alembic_version") == [(HEAD,)]


def _schema_differences(engine: sa.Engine) -> list:
    with engine.connect() as conn:
        return compare_metadata(MigrationContext.configure(conn), metadata)


def test_the_migrations_build_exactly_the_schema_the_code_uses(tmp_path, store_url):
    store = SqlStore(tmp_path, store_url)
    try:
        assert _schema_differences(store.engine) == []
    finally:
        store.close()


def test_an_upgraded_hand_written_store_has_the_same_schema(tmp_path):
    shutil.copytree(SCHEMA_3, tmp_path / "state")
    store = SqlStore(tmp_path / "state")
    try:
        differences = _schema_differences(store.engine)
    finally:
        store.close()
    # The one difference SQLite allows: a hand-written "TEXT PRIMARY KEY" does not say NOT NULL (no
    # row ever had a null key); every other column, type, default and index is the same.
    for diff in differences:
        assert diff[0][0] == "modify_nullable", diff
        _, _schema, table, column, _info, was_nullable, nullable = diff[0]
        assert metadata.tables[table].c[column].primary_key and (was_nullable, nullable) == (True, False), (
            diff
        )


def test_head_is_the_newest_revision_shipped():
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    assert ScriptDirectory.from_config(config).get_heads() == [HEAD]


def test_a_store_from_a_newer_release_is_refused(tmp_path, store_url):
    SqlStore(tmp_path, store_url).close()
    store = SqlStore(tmp_path, store_url)
    with store.engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num='9999'"))
    store.close()
    with pytest.raises(StoreError, match=r"revision '9999'.*newer edgeward"):
        SqlStore(tmp_path, store_url)


def test_a_database_holding_something_else_is_not_touched(tmp_path, postgres_url):
    engine = sa.create_engine(postgres_url.replace("postgresql://", "postgresql+psycopg://"))
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE invoices (id int)"))
    with pytest.raises(StoreError, match="no edgeward store"):
        SqlStore(tmp_path, postgres_url)
    with engine.connect() as conn:
        assert sa.inspect(conn).get_table_names() == ["invoices"]
    engine.dispose()


def test_replicas_starting_together_migrate_once(tmp_path, postgres_url):
    """Every replica migrates at startup; the advisory lock lets one do it while the others wait, then
    find the store at head (without it, their CREATE TABLEs collide)."""
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []

    def open_store(replica: int) -> None:
        try:
            barrier.wait(timeout=30)
            SqlStore(tmp_path / f"replica-{replica}", postgres_url).close()  # each its own state dir
        except BaseException as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=open_store, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    store = SqlStore(tmp_path, postgres_url)
    try:
        with store.engine.connect() as conn:
            assert conn.execute(sa.text("SELECT version_num FROM alembic_version")).all() == [(HEAD,)]
    finally:
        store.close()


# ---------------------------------------------------------------- the URL at the config boundary


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("mysql://u:hunter2@db/edgeward", "scheme 'mysql' is not supported"),
        ("postgresql://u:hunter2@db", "no database name"),
        ("postgresql://u:hunter2@db:99999/edgeward", "port"),
        ("::not a url hunter2", "not a URL"),
    ],
)
def test_a_bad_store_url_is_refused_with_its_field_and_never_echoed(tmp_path, url, message):
    config_file = tmp_path / "orchestrator.yaml"
    config_file.write_text(f"state:\n  url: '{url}'\n")
    with pytest.raises(ConfigError, match=message) as info:
        load_config(config_file)
    assert "state.url" in str(info.value)
    assert "hunter2" not in str(info.value)


def test_the_password_is_never_logged_nor_shown(tmp_path, postgres_url, caplog):
    password = postgres_url.split(":")[2].split("@")[0]
    config_file = tmp_path / "orchestrator.yaml"
    config_file.write_text(f"state:\n  url: '{postgres_url}'\n")
    config = load_config(config_file)
    assert password not in repr(config) and password not in str(config.model_dump())
    caplog.set_level(logging.DEBUG)
    store = SqlStore(tmp_path, config.state.url.get_secret_value())
    store.close()
    assert store.where in caplog.text and "***" in store.where
    wrong = postgres_url.replace(password, "not-the-password")
    with pytest.raises(StoreError) as info:
        SqlStore(tmp_path, wrong)
    assert "password authentication failed" in str(info.value)
    assert "not-the-password" not in str(info.value)
    assert password not in caplog.text
