"""Rollout actions asked of a replica that does not lead, for the leader to take (docs/scale-out.md,
"Active-active API").

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

INT64 = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "rollout_actions",
        sa.Column("id", INT64, primary_key=True, autoincrement=True),
        sa.Column("deployment", sa.Text, nullable=False),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("reason", sa.Text, nullable=False, server_default=sa.text("''")),
        sa.Column("requested_ms", INT64, nullable=False),
        sa.Column("state", sa.Text, nullable=False, server_default=sa.text("'pending'")),
        sa.Column("outcome", sa.Text),
    )
    op.create_index("rollout_actions_by_state", "rollout_actions", ["state", "id"])
