"""The leader's attestation results for every replica (docs/scale-out.md, "Attestation results on
every replica").

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

INT64 = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "attestations",
        sa.Column("node_id", sa.Text, primary_key=True),
        sa.Column("revision", INT64, nullable=False),
        sa.Column("view", sa.LargeBinary, nullable=False),
        sa.Column("quarantine_reason", sa.Text, nullable=False, server_default=sa.text("''")),
        sa.Column("quarantine_message", sa.Text, nullable=False, server_default=sa.text("''")),
    )
    op.create_index("attestations_by_revision", "attestations", ["revision", "node_id"])
