"""The same store on SQLite and PostgreSQL.

- model_history gets an id, so entries of one millisecond keep their order without SQLite's rowid;
- artifacts: model artifacts in the database, for PostgreSQL (on SQLite they stay files);
- meta 'schema' becomes 'alembic', so a release from before Alembic refuses this store with a clear
  error instead of misreading it.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

INT64 = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"
    op.drop_index("model_history_by_name", "model_history")
    op.rename_table("model_history", "model_history_v1")
    op.create_table(
        "model_history",
        sa.Column("id", INT64, primary_key=True, autoincrement=True),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("version", sa.Text, nullable=False),
        sa.Column("at_ms", INT64, nullable=False),
        sa.Column("action", sa.Text, nullable=False),
        sa.Column("reason", sa.Text, nullable=False, server_default=sa.text("''")),
    )
    columns = "name, version, at_ms, action, reason"
    order = "at_ms, rowid" if sqlite else "at_ms"  # rowid: SQLite's insertion order
    copy = f"INSERT INTO model_history ({columns}) SELECT {columns} FROM model_history_v1 ORDER BY {order}"  # noqa: S608
    op.execute(copy)
    op.drop_table("model_history_v1")
    op.create_index("model_history_by_name", "model_history", ["name"])
    op.create_table(
        "artifacts",
        sa.Column("sha256", sa.Text, primary_key=True),
        sa.Column("size", INT64, nullable=False),
        sa.Column("data", sa.LargeBinary, nullable=False),
    )
    op.execute("UPDATE meta SET value='alembic' WHERE key='schema'")


def downgrade() -> None:
    raise NotImplementedError("the store migrates forward only: restore a backup to go back")
