"""The shared ingest's readers page through ``node_states`` by (writer, flush, node id): one flush
may change more nodes than one read returns, so the node id is part of the cursor and of the index
that serves it (orchestrator/node_states.py).

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

INDEXES = {
    "node_states_by_status_writer": ("swriter", "sseq"),
    "node_states_by_telemetry_writer": ("twriter", "tseq"),
}


def upgrade() -> None:
    for name, (writer, seq) in INDEXES.items():
        op.drop_index(name, table_name="node_states")
        op.create_index(name, "node_states", [writer, seq, "node_id"])
