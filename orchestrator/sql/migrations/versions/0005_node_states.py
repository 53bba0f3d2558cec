"""Ingest shared by several replicas: each node's newest status and telemetry and when it was last
heard, written by whichever replica received them (docs/scale-out.md, "Ingest").

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

INT64 = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "node_states",
        sa.Column("node_id", sa.Text, primary_key=True),
        sa.Column("status", sa.LargeBinary),
        sa.Column("epoch", INT64, nullable=False, server_default=sa.text("-1")),
        sa.Column("seq", INT64, nullable=False, server_default=sa.text("-1")),
        sa.Column("digest", sa.LargeBinary),
        sa.Column("swriter", sa.Text, nullable=False, server_default=sa.text("''")),
        sa.Column("sseq", INT64, nullable=False, server_default=sa.text("0")),
        sa.Column("telemetry", sa.LargeBinary),
        sa.Column("telemetry_ms", INT64, nullable=False, server_default=sa.text("-1")),
        sa.Column("twriter", sa.Text, nullable=False, server_default=sa.text("''")),
        sa.Column("tseq", INT64, nullable=False, server_default=sa.text("0")),
        sa.Column("seen_ms", INT64, nullable=False, server_default=sa.text("0")),
    )
    op.create_index("node_states_by_status_writer", "node_states", ["swriter", "sseq"])
    op.create_index("node_states_by_telemetry_writer", "node_states", ["twriter", "tseq"])
    op.create_index("node_states_by_seen", "node_states", ["seen_ms"])
