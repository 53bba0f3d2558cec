"""The store's tables as the newest migration leaves them (``HEAD``).

The migrations under ``migrations/versions`` are the history; these Table objects are what the store
code is written against. ``tests/orchestrator/test_store_migrations.py`` checks that both agree on
SQLite and on PostgreSQL.
"""

from __future__ import annotations

import sqlalchemy as sa

# The newest revision under migrations/versions (checked by the tests against Alembic's own view).
HEAD = "0009"

# Epoch milliseconds and byte sizes need 64 bits: BIGINT on PostgreSQL; on SQLite every INTEGER is
# already 64-bit, and the stores written before Alembic spell it INTEGER.
Int64 = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
EMPTY = sa.text("''")
ZERO = sa.text("0")

metadata = sa.MetaData()

meta = sa.Table(
    "meta",
    metadata,
    sa.Column("key", sa.Text, primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)

models = sa.Table(
    "models",
    metadata,
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("version", sa.Text, primary_key=True),
    sa.Column("sha256", sa.Text, nullable=False),
    sa.Column("size", Int64, nullable=False),
    sa.Column("info", sa.LargeBinary, nullable=False),
    sa.Column("created_ms", Int64, nullable=False),
    sa.Column("state", sa.Text, nullable=False, server_default=sa.text("'published'")),
    sa.Column("state_reason", sa.Text, nullable=False, server_default=EMPTY),
    sa.Column("updated_ms", Int64, nullable=False, server_default=ZERO),
)

deployments = sa.Table(
    "deployments",
    metadata,
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("generation", sa.Integer, nullable=False),
    sa.Column("manifest", sa.Text, nullable=False),
    sa.Column("created_ms", Int64, nullable=False),
    sa.Column("updated_ms", Int64, nullable=False),
)

replicas = sa.Table(
    "replicas",
    metadata,
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
    sa.Column("updated_ms", Int64, nullable=False),
    sa.Index("replicas_by_deployment", "deployment"),
    sa.Index("replicas_by_node", "node_id"),
)

nodes = sa.Table(
    "nodes",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("cordoned", sa.Integer, nullable=False, server_default=ZERO),
    sa.Column("inventory", sa.LargeBinary),
    sa.Column("last_seen_ms", Int64, nullable=False, server_default=ZERO),
)

model_keys = sa.Table(
    "model_keys",
    metadata,
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("version", sa.Text, primary_key=True),
    sa.Column("data_key", sa.LargeBinary, nullable=False),
    sa.Column("sealed_sha256", sa.Text, nullable=False),
    sa.Column("sealed_size", Int64, nullable=False),
    sa.Column("revoked_ms", Int64, nullable=False, server_default=ZERO),
)

enrollments = sa.Table(
    "enrollments",
    metadata,
    sa.Column("node_id", sa.Text, primary_key=True),
    sa.Column("record", sa.LargeBinary, nullable=False),
    sa.Column("updated_ms", Int64, nullable=False),
)

model_history = sa.Table(
    "model_history",
    metadata,
    # Entries of one millisecond keep their order by id (SQLite's rowid did that before 0002).
    sa.Column("id", Int64, primary_key=True, autoincrement=True),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("version", sa.Text, nullable=False),
    sa.Column("at_ms", Int64, nullable=False),
    sa.Column("action", sa.Text, nullable=False),
    sa.Column("reason", sa.Text, nullable=False, server_default=EMPTY),
    sa.Index("model_history_by_name", "name"),
)

wipes = sa.Table(
    "wipes",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("versions", sa.Text, nullable=False),
    sa.Column("sha256s", sa.Text, nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("created_ms", Int64, nullable=False),
    sa.Column("deadline_ms", Int64, nullable=False),
    sa.Column("replicas_evicted", sa.Integer, nullable=False, server_default=ZERO),
)

wipe_nodes = sa.Table(
    "wipe_nodes",
    metadata,
    sa.Column("wipe_id", sa.Text, sa.ForeignKey("wipes.id"), primary_key=True),
    sa.Column("node_id", sa.Text, primary_key=True),
    sa.Column("state", sa.Text, nullable=False),
    sa.Column("updated_ms", Int64, nullable=False),
    sa.Column("message", sa.Text, nullable=False, server_default=EMPTY),
)

rollouts = sa.Table(
    "rollouts",
    metadata,
    sa.Column("deployment", sa.Text, primary_key=True),
    sa.Column("record", sa.Text, nullable=False),
    sa.Column("updated_ms", Int64, nullable=False),
)

# Rollout actions (pause, resume, undo) asked of a replica that does not lead: the leader's rollout
# controller takes the pending ones in its next pass (woken by a notification on PostgreSQL) and
# writes the outcome back (the Rollout record's JSON, or the refusal's) for the asking replica.
rollout_actions = sa.Table(
    "rollout_actions",
    metadata,
    sa.Column("id", Int64, primary_key=True, autoincrement=True),
    sa.Column("deployment", sa.Text, nullable=False),
    sa.Column("kind", sa.Text, nullable=False),
    sa.Column("reason", sa.Text, nullable=False, server_default=EMPTY),
    sa.Column("requested_ms", Int64, nullable=False),
    sa.Column("state", sa.Text, nullable=False, server_default=sa.text("'pending'")),
    sa.Column("outcome", sa.Text),
    sa.Index("rollout_actions_by_state", "state", "id"),
)

# The leader's attestation results, for the replicas that do not lead (docs/scale-out.md): per node
# its NodeAttestation as the leader's verifier last had it, and its quarantine. Only the leader writes
# (fenced), one revision per batch; writes take turns, so revisions commit in order and a reader's
# cursor (revision, node id) misses nothing.
attestations = sa.Table(
    "attestations",
    metadata,
    sa.Column("node_id", sa.Text, primary_key=True),
    sa.Column("revision", Int64, nullable=False),
    sa.Column("view", sa.LargeBinary, nullable=False),
    sa.Column("quarantine_reason", sa.Text, nullable=False, server_default=EMPTY),
    sa.Column("quarantine_message", sa.Text, nullable=False, server_default=EMPTY),
    sa.Index("attestations_by_revision", "revision", "node_id"),
)

# Which nodes a model version's data key was ever released to (by any replica, in any term): a
# wipe's targets include them, whatever the node runs or reports now.
key_releases = sa.Table(
    "key_releases",
    metadata,
    sa.Column("model_name", sa.Text, primary_key=True),
    sa.Column("model_version", sa.Text, primary_key=True),
    sa.Column("node_id", sa.Text, primary_key=True),
    sa.Column("released_ms", Int64, nullable=False),
)

deployment_templates = sa.Table(
    "deployment_templates",
    metadata,
    sa.Column("deployment", sa.Text, primary_key=True),
    sa.Column("generation", sa.Integer, primary_key=True),
    sa.Column("manifest", sa.Text, nullable=False),
)

# Model artifacts (content-addressed by sha256) when the store is PostgreSQL, so that every replica
# sees them; on SQLite they are files beside the database and this table stays empty.
artifacts = sa.Table(
    "artifacts",
    metadata,
    sa.Column("sha256", sa.Text, primary_key=True),
    sa.Column("size", Int64, nullable=False),
    sa.Column("data", sa.LargeBinary, nullable=False),
)

# The leader lease of the replicas sharing one store (docs/scale-out.md): one row, 'leader'. The
# token grows by one with every new term; a singleton write checks it in its own transaction.
leases = sa.Table(
    "leases",
    metadata,
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("holder", sa.Text, nullable=False),
    sa.Column("token", Int64, nullable=False),
    sa.Column("expires_ms", Int64, nullable=False),  # the database's clock
)

# Named counters; 'deployment_revision' numbers the rows of deployment_changes. Bumping it takes
# the row's lock, so the change-writing transactions commit in revision order (no gap is ever
# seen by a reader and filled later).
counters = sa.Table(
    "counters",
    metadata,
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("value", Int64, nullable=False),
)

# The change feed of deployments (Watch streams on every replica, resumable from a revision).
deployment_changes = sa.Table(
    "deployment_changes",
    metadata,
    sa.Column("revision", Int64, primary_key=True, autoincrement=False),
    sa.Column("deployment", sa.Text, nullable=False),
)

# Who owns each deployment and model ('team/NAME' or 'operator'; docs/security.md), in the store so
# that every replica decides on the same record. A row is claimed by inserting it (one wins).
owners = sa.Table(
    "owners",
    metadata,
    sa.Column("kind", sa.Text, primary_key=True),
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("owner", sa.Text, nullable=False),
)

# Ingest shared by the replicas (docs/scale-out.md, "Ingest"): per node, the newest status (the
# NodeMessage as the node sent it, ordered by (epoch, seq); digest: of its content without the order)
# and telemetry (by the node's sent time), and when any replica last heard it (seen_ms, the
# database's clock). (swriter, sseq) says which replica's flush last changed the status's content,
# (twriter, tseq) the telemetry: each replica numbers its own flushes, which commit in that order, so
# a reader that keeps a cursor (flush, node id) per writer misses no change, however many nodes one
# flush changed (orchestrator/node_states.py).
node_states = sa.Table(
    "node_states",
    metadata,
    sa.Column("node_id", sa.Text, primary_key=True),
    sa.Column("status", sa.LargeBinary),
    sa.Column("epoch", Int64, nullable=False, server_default=sa.text("-1")),
    sa.Column("seq", Int64, nullable=False, server_default=sa.text("-1")),
    sa.Column("digest", sa.LargeBinary),
    sa.Column("swriter", sa.Text, nullable=False, server_default=EMPTY),
    sa.Column("sseq", Int64, nullable=False, server_default=ZERO),
    sa.Column("telemetry", sa.LargeBinary),
    sa.Column("telemetry_ms", Int64, nullable=False, server_default=sa.text("-1")),
    sa.Column("twriter", sa.Text, nullable=False, server_default=EMPTY),
    sa.Column("tseq", Int64, nullable=False, server_default=ZERO),
    sa.Column("seen_ms", Int64, nullable=False, server_default=ZERO),
    sa.Index("node_states_by_status_writer", "swriter", "sseq", "node_id"),
    sa.Index("node_states_by_telemetry_writer", "twriter", "tseq", "node_id"),
    sa.Index("node_states_by_seen", "seen_ms"),
)
