"""The orchestrator's store under kill -9: a process writing deployments and replica batches as fast
as it can is killed at random points, over and over; every time, the store opens, holds every write
that was reported committed, and no transaction is half there. On SQLite the file also passes
SQLite's integrity check; on PostgreSQL the writer is the client that dies (the server's own crash
safety is PostgreSQL's), and its open transaction must vanish with it."""

from __future__ import annotations

import random
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.phases import Phase
from orchestrator.store import SqlStore

pytestmark = [pytest.mark.faults, pytest.mark.timeout(60)]

WRITER = Path(__file__).with_name("store_writer.py")
REPLICAS = 5
ROUNDS = 6


def test_kill9_at_random_points_leaves_a_consistent_store(tmp_path, store_url):
    rng = random.Random()
    seed = rng.randrange(2**32)
    rng.seed(seed)
    committed: set[str] = set()
    start = 0
    for _ in range(ROUNDS):
        writer = subprocess.Popen(
            [sys.executable, str(WRITER), str(tmp_path), str(start), *([store_url] if store_url else [])],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        # The kill lands at a random point after the first commit (however long the start took).
        assert writer.stdout is not None and writer.stderr is not None
        first = writer.stdout.readline()
        time.sleep(rng.uniform(0.0, 0.8))
        writer.kill()
        names = (first + writer.stdout.read()).split()  # the file's buffer, then the pipe's rest
        err = writer.stderr.read()
        writer.wait(timeout=10)
        writer.stdout.close()
        writer.stderr.close()
        assert names, f"the writer committed nothing before the kill (seed {seed}):\n{err[-2000:]}"
        committed.update(names)
        start += len(names) + 1  # the next writer starts past anything this one may have begun

        if store_url is None:
            db = sqlite3.connect(tmp_path / "edgeward.db")
            try:
                assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            finally:
                db.close()
        store = SqlStore(tmp_path, store_url)
        try:
            deployments = {d.name for d in store.list_deployments()}
            by_deployment: dict[str, list] = {}
            for rep in store.list_replicas():
                by_deployment.setdefault(rep.deployment, []).append(rep)
        finally:
            store.close()
        lost = committed - deployments
        assert not lost, f"committed deployments missing after kill -9 (seed {seed}): {sorted(lost)[:5]}"
        for name in deployments:
            reps = by_deployment.get(name, [])
            phases = {r.phase for r in reps}
            # Each batch is one transaction: none of it, or all of it.
            assert len(reps) in (0, REPLICAS), (seed, name, len(reps))
            assert len(phases) <= 1, (seed, name, phases)
            if name in committed:
                assert phases == {Phase.DISPATCHED}, (seed, name, phases)
        assert set(by_deployment) <= deployments, f"replicas of no deployment (seed {seed})"
