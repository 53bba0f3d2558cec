"""Baseline: the store exactly as the last hand-written migration (schema "3") left it.

A state dir written before Alembic is brought to schema "3" by the frozen legacy chain in
``orchestrator.sql.migrate`` and stamped with this revision; a new store is created by it.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# Frozen copies (a migration never follows later edits of orchestrator.sql.schema).
INT64 = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
EMPTY = sa.text("''")
ZERO = sa.text("0")


def upgrade() -> None:
    op.create_table(
        "meta", sa.Column("key", sa.Text, primary_key=True), sa.Column("value", sa.Text, nullable=False)
    )
    op.create_table(
        "models",
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("version", sa.Text, primary_key=True),
        sa.Column("sha256", sa.Text, nullable=False),
        sa.Column("size", INT64, nullable=False),
        sa.Column("info", sa.LargeBinary, nullable=False),
        sa.Column("created_ms", INT64, nullable=False),
        sa.Column("state", sa.Text, nullable=False, server_default=sa.text("'published'")),
        sa.Column("state_reason", sa.Text, nullable=False, server_default=EMPTY),
        sa.Column("updated_ms", INT64, nullable=False, server_default=ZERO),
    )
    op.create_table(
        "deployments",
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("generation", sa.Integer, nullable=False),
        sa.Column("manifest", sa.Text, nullable=False),
        sa.Column("created_ms", INT64, nullable=False),
        sa.Column("updated_ms", INT64, nullable=False),
    )
    op.create_table(
        "replicas",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("deployment", sa.Text, nullable=False),
        sa.Column("generation", sa.Integer, nullable=False),
        sa.Column("model_name", sa.Text, nullable=False),
        sa.Column("model_version", sa.Text, nullable=False),
        sa.Column("node_id", sa.Text),
        sa.Column("accelerator", sa.Text),
        sa.Column("phase", sa.Text, nullable=False),
        sa.Column("reason", sa.Text, nullable=False, server_default=EMPTY),
        sa.Column("message", sa.Text, nullable=False, server_default=EMPTY),
        sa.Column("updated_ms", INT64, nullable=False),
    )
    op.create_index("replicas_by_deployment", "replicas", ["deployment"])
    op.create_index("replicas_by_node", "replicas", ["node_id"])
    op.create_table(
        "nodes",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("cordoned", sa.Integer, nullable=False, server_default=ZERO),
        sa.Column("inventory", sa.LargeBinary),
        sa.Column("last_seen_ms", INT64, nullable=False, server_default=ZERO),
    )
    op.create_table(
        "model_keys",
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("version", sa.Text, primary_key=True),
        sa.Column("data_key", sa.LargeBinary, nullable=False),
        sa.Column("sealed_sha256", sa.Text, nullable=False),
        sa.Column("sealed_size", INT64, nullable=False),
        sa.Column("revoked_ms", INT64, nullable=False, server_default=ZERO),
    )
    op.create_table(
        "enrollments",
        sa.Column("node_id", sa.Text, primary_key=True),
        sa.Column("record", sa.LargeBinary, nullable=False),
        sa.Column("updated_ms", INT64, nullable=False),
    )
    op.create_table(
        "model_history",
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("version", sa.Text, nullable=False),
        sa.Column("at_ms", INT64, nullable=False),
        sa.Column("action", sa.Text, nullable=False),
        sa.Column("reason", sa.Text, nullable=False, server_default=EMPTY),
    )
    op.create_index("model_history_by_name", "model_history", ["name"])
    op.create_table(
        "wipes",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("versions", sa.Text, nullable=False),
        sa.Column("sha256s", sa.Text, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("created_ms", INT64, nullable=False),
        sa.Column("deadline_ms", INT64, nullable=False),
        sa.Column("replicas_evicted", sa.Integer, nullable=False, server_default=ZERO),
    )
    op.create_table(
        "wipe_nodes",
        sa.Column("wipe_id", sa.Text, sa.ForeignKey("wipes.id"), primary_key=True),
        sa.Column("node_id", sa.Text, primary_key=True),
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("updated_ms", INT64, nullable=False),
        sa.Column("message", sa.Text, nullable=False, server_default=EMPTY),
    )
    op.create_table(
        "rollouts",
        sa.Column("deployment", sa.Text, primary_key=True),
        sa.Column("record", sa.Text, nullable=False),
        sa.Column("updated_ms", INT64, nullable=False),
    )
    op.create_table(
        "deployment_templates",
        sa.Column("deployment", sa.Text, primary_key=True),
        sa.Column("generation", sa.Integer, primary_key=True),
        sa.Column("manifest", sa.Text, nullable=False),
    )
    op.execute("INSERT INTO meta (key, value) VALUES ('schema', '3')")


def downgrade() -> None:
    raise NotImplementedError("the store migrates forward only: restore a backup to go back")
