"""One reconcile pass and the deployment/node views at fleet scale, on a real SQLite store.

N nodes in the orchestrator's fleet view (each with a hello and an ONLINE status, as ingest leaves
them) and one deployment of N replicas, in a real ``SqlStore`` reached through one store thread
as in the orchestrator. The trust seam releases each model key with the real wrap (X25519 + AES-GCM
to the node's own binding key); commands are collected, not sent (the MQTT side is measured by
bench/fleet_scale.py). Timed, in order:

* ``place``: the pass after the apply (N pending replicas bound, N deploy commands);
* ``follow``: the pass after every node reports its replica Running;
* ``steady``: a pass with nothing to change (the reconcile loop runs one per second and on events);
* the views: ``Get`` of the deployment, ``List`` of the deployments and of the nodes (the protobuf
  responses the API builds).

    python bench/reconcile_pass.py --nodes 10000 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import command, machine, write_section

from attestation.artifacts import key_context
from attestation.keyrelease import wrap_key
from edgeward.v1 import api_pb2, attestation_pb2, node_pb2
from edgeward.wire import node_message
from orchestrator.api import deployment_to_pb, node_to_pb
from orchestrator.config import OrchestratorConfig
from orchestrator.fleet import Fleet
from orchestrator.manifest import parse_manifest
from orchestrator.phases import Phase
from orchestrator.reconciler import Reconciler
from orchestrator.scheduler import Scheduler
from orchestrator.store import ModelRecord, SealedArtifact, SqlStore
from orchestrator.telemetry import SloQuestion, TelemetryStore

KIND = "sim-hollow"


class WrappingTrust:
    """Every node affirmed at the software tier; keys wrapped for real to each node's binding key."""

    def __init__(self, node_ids: list[str]) -> None:
        self.binding = {
            n: x25519.X25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
            for n in node_ids
        }

    def tier(self, node_id: str) -> str:
        return "software"

    def tiers(self, node_ids: Iterable[str]) -> dict[str, str]:
        return dict.fromkeys(node_ids, "software")

    def why_not_trusted(self, node_id: str) -> tuple[str, str] | None:
        return None

    def release_key(self, node_id: str, name: str, version: str, data_key: bytes) -> bytes:
        kind = attestation_pb2.ATTESTER_KIND_SOFTWARE
        return wrap_key(
            data_key, kind, self.binding[node_id], key_context(node_id, name, version)
        ).SerializeToString()

    def revoke_model_keys(self, name: str, versions: list[str]) -> None:
        pass  # nothing is revoked in this bench


def hello(i: int) -> node_pb2.Hello:
    return node_pb2.Hello(
        agent_version="bench",
        labels={"zone": ("edge-a", "edge-b", "edge-c")[i % 3]},
        hardware_profile="sim-hollow",
        accelerators=[
            node_pb2.Accelerator(
                kind=KIND,
                device="hollow",
                simulated=True,
                dtypes=["INT8", "FP32"],
                peak_gops=10.0,
                active_w=2.0,
            )
        ],
        memory_bytes=1 << 30,
        max_replicas=8,
        boot_unix_ms=1,
    )


class Setup:
    def __init__(self, nodes: int, work: Path) -> None:
        self.ids = [f"hollow-{i:05d}" for i in range(nodes)]
        self.store = SqlStore(work / "orch")
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="store")
        self.fleet = Fleet()
        self.sent = 0
        for i, node_id in enumerate(self.ids):
            self.fleet.apply(node_message(node_id, hello=hello(i)))
            self.fleet.apply(
                node_message(node_id, status=node_pb2.Status(state=node_pb2.NODE_STATE_ONLINE, status_seq=1))
            )
        self.seq = 1
        blob = os.urandom(28_000)
        digest = hashlib.sha256(b"plain").hexdigest()
        info = api_pb2.Model(name="vib-cnn", version="1.0.0", sha256=digest, size=5, dtypes=["INT8"])
        sealed = SealedArtifact(hashlib.sha256(blob).hexdigest(), len(blob), os.urandom(32))
        self.store.put_model(
            ModelRecord("vib-cnn", "1.0.0", digest, 5, info.SerializeToString(), 1), blob, sealed
        )
        manifest = (
            "apiVersion: edgeward/v1\nkind: Deployment\nmetadata: {name: scale}\n"
            f"spec:\n  model: {{name: vib-cnn, version: 1.0.0}}\n  replicas: {nodes}\n"
            f"  requirements: {{accelerators: [{KIND}], memory: 1Mi}}\n"
        )
        self.store.put_deployment(parse_manifest(manifest), 1)
        self.reconciler = Reconciler(
            self.store,
            self.db,
            self.fleet,
            Scheduler(),
            self.publish,
            OrchestratorConfig(state_dir=work / "orch"),
            artifact_endpoint=lambda: "127.0.0.1:1",
            on_change=lambda _: None,
            trust=WrappingTrust(self.ids),
        )
        self.reconciler._grace_ends = 0.0  # past the start-up grace period

    async def db(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.pool, partial(fn, *args))

    async def publish(self, node_id: str, cmd: node_pb2.Command) -> None:
        self.sent += 1

    def heartbeat(self, running: bool) -> None:
        """Every node's status, as ingest applies it (a heartbeat: all alive, reports as they are)."""
        self.seq += 1
        by_node: dict[str, list[node_pb2.ReplicaReport]] = {n: [] for n in self.ids}
        if running:
            for rep in self.store.list_replicas("scale"):
                if rep.node_id and rep.phase != Phase.EVICTED:
                    by_node[rep.node_id].append(
                        node_pb2.ReplicaReport(replica_id=rep.id, phase=node_pb2.REPLICA_PHASE_RUNNING)
                    )
        for node_id, reports in by_node.items():
            status = node_pb2.Status(state=node_pb2.NODE_STATE_ONLINE, status_seq=self.seq, replicas=reports)
            self.fleet.apply(node_message(node_id, status=status))

    async def timed_pass(self) -> tuple[float, int]:
        sent = self.sent
        t = time.perf_counter()
        await self.reconciler.reconcile_once()
        return time.perf_counter() - t, self.sent - sent

    async def views(self) -> dict[str, float]:
        out = {}
        t = time.perf_counter()
        record, replicas = await self.db(
            lambda: (self.store.get_deployment("scale"), self.store.list_replicas("scale"))
        )
        pb = deployment_to_pb(record, replicas)
        running = [(r.node_id, r.model_name, r.model_version) for r in replicas if r.phase == Phase.RUNNING]
        TelemetryStore().slo_attainment(
            [SloQuestion(record.manifest.spec.requirements.max_latency_ms, running)]
        )
        out["get_deployment"] = time.perf_counter() - t
        assert pb.status.running == len(self.ids), pb.status.running
        t = time.perf_counter()
        _, replicas = await self.db(lambda: (self.store.list_nodes(), self.store.list_replicas()))
        on_node: dict[str, list] = {}
        for rep in replicas:
            if rep.node_id:
                on_node.setdefault(rep.node_id, []).append(rep)
        now = time.monotonic()
        nodes = [
            node_to_pb(
                n, None, self.fleet.nodes[n], self.fleet.nodes[n].online(now, 15.0), on_node.get(n, ())
            )
            for n in self.ids
        ]
        api_pb2.ListNodesResponse(nodes=nodes).SerializeToString()
        out["list_nodes"] = time.perf_counter() - t
        return out


async def run(nodes: int, rounds: int, work: Path) -> dict[str, list[float]]:
    setup = Setup(nodes, work)
    figures: dict[str, list[float]] = {}
    try:
        for _ in range(rounds):
            setup.heartbeat(running=False)
            took, sent = await setup.timed_pass()
            assert sent >= nodes, f"place sent {sent} commands"
            figures.setdefault("place", []).append(took)
            setup.heartbeat(running=True)
            took, _ = await setup.timed_pass()
            figures.setdefault("follow", []).append(took)
            setup.heartbeat(running=True)
            steady = []
            for _ in range(3):
                took, _ = await setup.timed_pass()
                steady.append(took)
            figures.setdefault("steady", []).append(statistics.median(steady))
            for name, took in (await setup.views()).items():
                figures.setdefault(name, []).append(took)
            # Start the next round from scratch: delete, let the pass forget, apply again.
            record = setup.store.get_deployment("scale")
            setup.store.delete_deployment("scale", 2)
            setup.heartbeat(running=False)
            await setup.timed_pass()
            assert not [r for r in setup.store.list_replicas() if r.phase != Phase.EVICTED]
            await setup.timed_pass()
            setup.store.put_deployment(record.manifest, 3)
            print(
                "round: " + ", ".join(f"{k} {v[-1] * 1000:,.0f} ms" for k, v in figures.items()), flush=True
            )
    finally:
        setup.pool.shutdown()
        setup.store.close()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--label", default="", help="a name for this measurement (e.g. the change it shows)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    figures = asyncio.run(run(args.nodes, args.rounds, Path(tempfile.mkdtemp(prefix="edgeward-reconcile-"))))
    what = {
        "place": f"pass after the apply: {args.nodes:,} replicas bound, key released, deploy command built",
        "follow": f"pass after every node reports Running: {args.nodes:,} replicas Dispatched -> Running",
        "steady": "pass with nothing to change (median of 3)",
        "get_deployment": f"Get of the deployment ({args.nodes:,} replicas)",
        "list_nodes": f"List of the nodes ({args.nodes:,}, each with its replica)",
    }
    rows = "\n".join(
        f"| {what[k]} | {statistics.median(v) * 1000:,.0f} | {' / '.join(f'{x * 1000:,.0f}' for x in v)} |"
        for k, v in figures.items()
    )
    body = f"""## Reconcile pass and views: {args.nodes:,} nodes, {args.nodes:,} replicas{args.label}

`{command()}` ({machine()}; load average {os.getloadavg()[0]:.1f} at the end, shared 2-core machine)

A real SQLite store behind one store thread, {args.nodes:,} nodes in the fleet view, one deployment of
{args.nodes:,} replicas; keys wrapped for real (X25519 + AES-GCM) to each node; commands collected,
not sent.

| what | median ms | rounds ms |
|---|---|---|
{rows}
"""
    print(body)
    if not args.no_write:
        write_section(f"reconcile-pass-{args.nodes}", body)


if __name__ == "__main__":
    main()
