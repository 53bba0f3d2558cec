"""The store's hot operations, timed on SQLite and on PostgreSQL (and on an earlier checkout's store).

What the reconciler and the API do to the store for one fleet: apply deployments, write replica
batches (Pending, then Dispatched), one status change per transaction (a node's report), read every
replica, read one deployment, record nodes. Each round runs every engine once, interleaved, in a
fresh child process on a fresh store (a fresh PostgreSQL database on a private server started on a
loopback port for the run); the figures are medians over the rounds.

    python bench/store_ops.py --replicas 1000 --rounds 5
    python bench/store_ops.py --baseline /path/to/earlier/checkout   # adds "SQLite, baseline"

``--baseline`` runs the same operations with the store of another checkout of this repository
(its orchestrator package first on the child's path), to compare a change against what it replaces.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _report import command, machine, write_section

BATCH = 100
OPS = {
    "put_deployment": "apply one deployment",
    "replicas_pending": f"write {BATCH} new replicas (one transaction)",
    "replicas_dispatched": f"move {BATCH} replicas to Dispatched (one transaction)",
    "replica_running": "one replica to Running (one transaction, a node's report)",
    "list_replicas": "read every replica",
    "get_deployment": "read one deployment",
    "put_node": "record one node",
}


def child(state_dir: str, url: str | None, replicas: int) -> dict[str, float]:
    """One round on a fresh store: median milliseconds per call of each operation."""
    from orchestrator import store as module
    from orchestrator.manifest import parse_manifest
    from orchestrator.phases import Phase

    opened = getattr(module, "SqlStore", None)
    store = opened(Path(state_dir), url) if opened else module.SqliteStore(Path(state_dir))  # type: ignore[attr-defined]
    times: dict[str, list[float]] = {op: [] for op in OPS}

    def timed(op: str, fn, *args):  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        result = fn(*args)
        times[op].append((time.perf_counter() - start) * 1000)
        return result

    deployments = max(1, replicas // BATCH)
    for d in range(deployments):
        manifest = parse_manifest(
            "apiVersion: edgeward/v1\nkind: Deployment\n"
            f"metadata: {{name: d{d}}}\nspec: {{model: {{name: m, version: 1.0.0}}, replicas: {BATCH}}}\n"
        )
        timed("put_deployment", store.put_deployment, manifest, 1)
        pending = [
            module.ReplicaRecord(f"d{d}-{i:04d}", f"d{d}", 1, "m", "1.0.0", Phase.PENDING, 2)
            for i in range(BATCH)
        ]
        timed("replicas_pending", store.apply_replica_changes, [module.ReplicaChange(r) for r in pending])
        dispatched = [
            replace(r, phase=Phase.DISPATCHED, node_id=f"n{i}", updated_ms=3) for i, r in enumerate(pending)
        ]
        timed(
            "replicas_dispatched", store.apply_replica_changes, [module.ReplicaChange(r) for r in dispatched]
        )
        for r in dispatched[:20]:
            running = replace(r, phase=Phase.RUNNING, updated_ms=4)
            timed("replica_running", store.apply_replica_changes, [module.ReplicaChange(running)])
    for _ in range(10):
        timed("list_replicas", store.list_replicas)
    for d in range(200):
        timed("get_deployment", store.get_deployment, f"d{d % deployments}")
    for n in range(200):
        timed("put_node", store.put_inventories, [module.NodeRecord(f"n{n}", False, b"x" * 200, n)])
    store.close()
    return {op: statistics.median(values) for op, values in times.items()}


def run_child(pythonpath: Path, url: str | None, replicas: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="edgeward-bench-store-") as state:
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(pythonpath), os.environ.get("PYTHONPATH", "")]),
        }
        args = [sys.executable, __file__, "--child", state, "--replicas", str(replicas)]
        out = subprocess.run(
            [*args, *(["--url", url] if url else [])], env=env, capture_output=True, text=True, check=False
        )
        if out.returncode != 0:
            raise SystemExit(f"store round failed:\n{out.stderr[-3000:]}")
        return json.loads(out.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--baseline", type=Path, help="another checkout whose store runs beside this one")
    parser.add_argument("--no-postgres", action="store_true", help="SQLite only")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.url, args.replicas)))
        return

    repo = HERE.parent
    engines: list[tuple[str, Path, bool]] = [("SQLite", repo, False)]
    if args.baseline:
        engines.append(("SQLite, baseline", args.baseline.resolve(), False))
    server = None
    if not args.no_postgres:
        sys.path.insert(0, str(repo / "tests"))
        from pg_server import PostgresServer, find_bindir

        bindir = find_bindir()
        if bindir is None:
            raise SystemExit(
                "PostgreSQL server not installed (apt-get install postgresql), or pass --no-postgres"
            )
        server = PostgresServer(bindir)
        server.start()
        engines.append(("PostgreSQL", repo, True))
    results: dict[str, list[dict[str, float]]] = {name: [] for name, _, _ in engines}
    try:
        for round_ in range(args.rounds):
            for name, path, postgres in engines:
                database = server.create_database() if postgres and server else None
                url = server.url(database) if server and database else None
                results[name].append(run_child(path, url, args.replicas))
                if server and database:
                    server.drop_database(database)
            print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr)
    finally:
        if server is not None:
            server.stop()

    medians = {
        name: {op: statistics.median(r[op] for r in rounds) for op in OPS} for name, rounds in results.items()
    }
    names = list(medians)
    header = "| operation | " + " | ".join(f"{n} ms" for n in names)
    ratio_names = [n for n in names if n != "SQLite"]
    header += "".join(f" | {n} / SQLite" for n in ratio_names) + " |"
    lines = [header, "|---" * (1 + len(names) + len(ratio_names)) + "|"]
    for op, what in OPS.items():
        cells = [f"{medians[n][op]:.3f}" for n in names]
        cells += [f"{medians[n][op] / medians['SQLite'][op]:.2f}" for n in ratio_names]
        lines.append(f"| {what} | " + " | ".join(cells) + " |")
    body = f"""## Store: hot operations on SQLite and PostgreSQL

Command: `{command()}` ({machine()})

{args.replicas} replicas in deployments of {BATCH}; each round runs every engine once, interleaved, in
a fresh process on a fresh store (PostgreSQL: a private server on a loopback port, fsync off, a fresh
database per round). Median milliseconds per call over {args.rounds} rounds; ratios against this
checkout's SQLite store.

{chr(10).join(lines)}
"""
    print(body)
    write_section("store-ops", body)


if __name__ == "__main__":
    main()
