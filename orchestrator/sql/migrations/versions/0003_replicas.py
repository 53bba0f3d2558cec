"""Several orchestrator replicas on one store: the leader lease and the deployments' change feed.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

INT64 = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "leases",
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("holder", sa.Text, nullable=False),
        sa.Column("token", INT64, nullable=False),
        sa.Column("expires_ms", INT64, nullable=False),
    )
    counters = op.create_table(
        "counters",
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("value", INT64, nullable=False),
    )
    op.bulk_insert(counters, [{"name": "deployment_revision", "value": 0}])
    op.create_table(
        "deployment_changes",
        sa.Column("revision", INT64, primary_key=True, autoincrement=False),
        sa.Column("deployment", sa.Text, nullable=False),
    )
