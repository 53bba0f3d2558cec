"""Apply -> Running latency for a fleet of simulated nodes.

The orchestrator (with the embedded broker) runs in this process; N real node agents
(`node_agent.NodeAgent`, the real cpu-litert backend and the committed int8 industrial model)
run together in one child process: "simulated" means many nodes on one machine, not fake agents.
Each round applies a deployment with one replica per node, records when every replica is first
seen Running through the public gRPC API, then deletes it and waits until the nodes are empty.

    python bench/apply_to_running.py --nodes 100 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _models import push_vib_cnn
from _report import command, machine, write_section

from edgeward.v1 import api_pb2, api_pb2_grpc, node_pb2

RUNNING = node_pb2.REPLICA_PHASE_RUNNING


def run_agents(
    broker_url: str,
    count: int,
    state_dir: str,
    tokens: list[str],
    ready: multiprocessing.Event,
    stop: multiprocessing.Event,
) -> None:
    from node_agent.agent import NodeAgent
    from node_agent.config import AgentConfig

    async def main() -> None:
        agents = [
            NodeAgent(
                AgentConfig(
                    node_id=f"sim-{i:04d}",
                    labels={"zone": f"z{i % 4}"},
                    heartbeat_s=2.0,
                    broker={"url": broker_url},
                    state_dir=Path(state_dir),
                    max_replicas=4,
                    enrollment_token=tokens[i],
                )
            )
            for i in range(count)
        ]
        for agent in agents:
            await agent.__aenter__()
        ready.set()
        while not stop.is_set():
            await asyncio.sleep(0.2)
        for agent in agents:
            await agent.__aexit__(None, None, None)

    asyncio.run(main())


async def bench(nodes: int, rounds: int) -> dict:
    from attestation.tokens import TokenStore
    from orchestrator.catalog.signing import PublisherKey
    from orchestrator.config import OrchestratorConfig
    from orchestrator.server import Orchestrator

    tmp = Path(tempfile.mkdtemp(prefix="edgeward-bench-"))
    publisher = PublisherKey.generate()
    _, public = publisher.write(tmp / "publisher")
    config = OrchestratorConfig(
        state_dir=tmp / "orch",
        grpc_bind="127.0.0.1:0",
        reconcile_interval_s=0.5,
        node_timeout_s=30.0,
        catalog={"trusted_publishers": [public]},
    )
    async with Orchestrator(config) as orch:
        store = TokenStore.in_state_dir(config.state_dir)
        tokens = [store.mint(f"sim-{i:04d}").token for i in range(nodes)]
        ctx = multiprocessing.get_context("spawn")
        ready, stop = ctx.Event(), ctx.Event()
        child = ctx.Process(
            target=run_agents, args=(orch.broker_url, nodes, str(tmp / "agents"), tokens, ready, stop)
        )
        child.start()
        try:
            async with grpc.aio.insecure_channel(orch.address) as channel:
                deps = api_pb2_grpc.DeploymentServiceStub(channel)
                nodes_api = api_pb2_grpc.NodeServiceStub(channel)
                models = api_pb2_grpc.ModelServiceStub(channel)
                t0 = time.monotonic()
                while (
                    sum(n.state == 1 for n in (await nodes_api.List(api_pb2.ListNodesRequest())).nodes)
                    < nodes
                ):
                    if time.monotonic() - t0 > 300:
                        raise SystemExit("agents did not come online")
                    await asyncio.sleep(0.5)
                print(f"{nodes} nodes online after {time.monotonic() - t0:.1f} s", flush=True)
                await push_vib_cnn(models, publisher)
                results = []
                for r in range(rounds):
                    results.append(await one_round(deps, nodes, f"bench-{r}"))
                    print(
                        f"round {r + 1}: p50 {results[-1]['p50']:.0f} ms, p99 {results[-1]['p99']:.0f} ms, "
                        f"all running after {results[-1]['all']:.0f} ms",
                        flush=True,
                    )
        finally:
            stop.set()
            child.join(60)
            if child.is_alive():
                child.kill()
    return {
        "p50": statistics.median(r["p50"] for r in results),
        "p99": statistics.median(r["p99"] for r in results),
        "all": statistics.median(r["all"] for r in results),
        "rounds": results,
    }


async def one_round(deps: api_pb2_grpc.DeploymentServiceStub, replicas: int, name: str) -> dict:
    manifest = (
        f"apiVersion: edgeward/v1\nkind: Deployment\nmetadata: {{name: {name}}}\n"
        f"spec: {{model: {{name: vib-cnn, version: 1.0.0}}, replicas: {replicas}}}\n"
    )
    started = time.monotonic()
    await deps.Apply(api_pb2.ApplyRequest(manifest=manifest))
    seen: dict[str, float] = {}
    while len(seen) < replicas:
        dep = await deps.Get(api_pb2.GetDeploymentRequest(name=name))
        now = time.monotonic()
        for rep in dep.status.replica_list:
            if rep.phase == RUNNING and rep.id not in seen:
                seen[rep.id] = (now - started) * 1000.0
        if now - started > 300:
            raise SystemExit(f"only {len(seen)}/{replicas} running after 300 s")
        await asyncio.sleep(0.02)
    latencies = np.array(sorted(seen.values()))
    await deps.Delete(api_pb2.DeleteDeploymentRequest(name=name))
    while True:  # wait until the nodes are empty before the next round
        dep_list = (await deps.List(api_pb2.ListDeploymentsRequest())).deployments
        if not dep_list:
            break
        await asyncio.sleep(0.1)
    await asyncio.sleep(3.0)
    return {
        "p50": float(np.percentile(latencies, 50)),
        "p99": float(np.percentile(latencies, 99)),
        "all": float(latencies[-1]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="do not update docs/benchmarks.md")
    args = parser.parse_args()
    result = asyncio.run(bench(args.nodes, args.rounds))
    rows = "\n".join(
        f"| {i + 1} | {r['p50']:.0f} | {r['p99']:.0f} | {r['all']:.0f} |"
        for i, r in enumerate(result["rounds"])
    )
    body = f"""## Apply -> Running, {args.nodes} simulated nodes

`{command()}` ({machine()})

{args.nodes} real node agents (real cpu-litert backend, the committed 28 KB int8 industrial model)
run in one child process against the embedded broker; the orchestrator runs in the benchmark
process. Each round applies one deployment of {args.nodes} replicas and times, per replica, the
moment it is first seen Running through the gRPC API (polled every 20 ms), from the Apply call.

| round | p50 ms | p99 ms | all running ms |
|---|---|---|---|
{rows}

Median over {args.rounds} rounds: **p50 {result["p50"]:.0f} ms, p99 {result["p99"]:.0f} ms**, all
replicas running after {result["all"]:.0f} ms.
"""
    print(body)
    if not args.no_write:
        write_section("apply-to-running", body)


if __name__ == "__main__":
    main()
