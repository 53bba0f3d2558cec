"""Which nodes a model version's data key was released to, by any replica in any term (a wipe's
targets; docs/lifecycle.md, "Remote wipe").

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

INT64 = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "key_releases",
        sa.Column("model_name", sa.Text, primary_key=True),
        sa.Column("model_version", sa.Text, primary_key=True),
        sa.Column("node_id", sa.Text, primary_key=True),
        sa.Column("released_ms", INT64, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("key_releases")
