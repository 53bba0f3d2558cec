"""Run as a process by test_store_kill9.py: writes to a store (SQLite under the state dir, or the
PostgreSQL database at the optional URL) as fast as it can, printing the name of every deployment once
all three of its transactions have committed, until it is killed."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

from edgeward.wire import now_ms
from orchestrator.manifest import parse_manifest
from orchestrator.phases import Phase
from orchestrator.store import ReplicaChange, ReplicaRecord, SqlStore

REPLICAS = 5


def main(state_dir: str, start: int, url: str | None) -> None:
    store = SqlStore(Path(state_dir), url)
    i = start
    while True:
        name = f"d{i}"
        manifest = parse_manifest(
            "apiVersion: edgeward/v1\nkind: Deployment\n"
            f"metadata: {{name: {name}}}\nspec:\n  model: {{name: m, version: 1.0.0}}\n  replicas: {REPLICAS}\n"
        )
        record, _, _ = store.put_deployment(manifest, now_ms())
        pending = [
            ReplicaRecord(f"{name}-{k}", name, record.generation, "m", "1.0.0", Phase.PENDING, now_ms())
            for k in range(REPLICAS)
        ]
        store.apply_replica_changes(ReplicaChange(r) for r in pending)
        store.apply_replica_changes(
            ReplicaChange(replace(r, phase=Phase.DISPATCHED, node_id=f"n{k}", updated_ms=now_ms()))
            for k, r in enumerate(pending)
        )
        print(name, flush=True)
        i += 1


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else None)
