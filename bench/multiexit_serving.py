"""Multi-exit serving over the node inference API: what early exits save per request, and what the
hand-off to another node costs.

Real LiteRT (cpu-litert) behind real grpc.aio inference servers on 127.0.0.1, the committed int8
automotive stages, fresh clean crops from the generator (not the build's splits). Three
configurations of the same model, requests sent one at a time by an OIP client:

* early exit, all stages on one node (the card's thresholds);
* no early exit, all stages on one node (thresholds above 1: every request runs all stages);
* early exit, partitioned: stage 1 on node A, stages 2-3 on node B (hand-off over B's OIP API).

    python bench/multiexit_serving.py --per-class 60
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import command, machine, write_section

from accelerators.base import ModelArtifact
from accelerators.cpu_litert import CpuLitertBackend, CpuLitertConfig
from edgeward.oip import grpc_predict_v2_pb2 as oip
from edgeward.oip import grpc_predict_v2_pb2_grpc as oip_grpc
from edgeward.v1 import node_pb2
from node_agent.inference_server import ModelTable, serve
from node_agent.multiexit import MultiExitHost
from usecases import model_card, model_path
from usecases.automotive.generator import make_dataset

NAME = "sign-classifier"


def _pipeline(thresholds: list[float], endpoints: list[str]) -> node_pb2.MultiExitPipeline:
    msg = node_pb2.MultiExitPipeline(name=NAME, version="1.0.0")
    for k, (t, ep) in enumerate(zip(thresholds, endpoints, strict=True), start=1):
        msg.stages.add(model_name=f"sign-stage{k}", model_version="1.0.0", threshold=t, endpoint=ep)
    return msg


async def _node(backend: CpuLitertBackend, stages: list[int]) -> tuple[grpc.aio.Server, str, MultiExitHost]:
    table = ModelTable()
    for k in stages:
        data = model_path("automotive", "int8", stage=k).read_bytes()
        table.add(backend, backend.load(ModelArtifact.from_bytes(f"sign-stage{k}", "1.0.0", data)))
    host = MultiExitHost(table, f"stages-{stages}")
    server, port = await serve(table, "127.0.0.1:0", host)
    return server, f"127.0.0.1:{port}", host


async def _run(endpoint: str, images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Per-request milliseconds, exits, accuracy."""
    ms, exits, correct = [], [], 0
    async with grpc.aio.insecure_channel(endpoint) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        for x, y in zip(images, labels, strict=True):
            request = oip.ModelInferRequest(
                model_name=NAME,
                inputs=[
                    oip.ModelInferRequest.InferInputTensor(
                        name="image", datatype="FP32", shape=[1, 32, 32, 3]
                    )
                ],
                raw_input_contents=[x.astype(np.float32).tobytes()],
            )
            t0 = time.perf_counter()
            response = await stub.ModelInfer(request, timeout=10)
            ms.append((time.perf_counter() - t0) * 1e3)
            exits.append(response.parameters["exit"].int64_param)
            probs = np.frombuffer(response.raw_output_contents[0], "<f4")
            correct += int(np.argmax(probs) == y)
    return np.array(ms), np.array(exits), correct / len(labels)


async def main_async(args: argparse.Namespace) -> str:
    card = model_card("automotive")
    thresholds = [e["threshold"] or 0.0 for e in card["exits"]]
    macs = np.array([e["cumulative_macs"] for e in card["exits"]], np.float64)
    images, labels = make_dataset(args.per_class, seed=args.seed)
    backend = CpuLitertBackend(CpuLitertConfig(energy_counter=None, num_threads=1))
    servers = []
    try:
        one, one_ep, one_host = await _node(backend, [1, 2, 3])
        b, b_ep, b_host = await _node(backend, [2, 3])
        a, a_ep, a_host = await _node(backend, [1])
        servers += [one, b, a]
        b_host.configure([_pipeline(thresholds, [a_ep, "", ""])])
        a_host.configure([_pipeline(thresholds, ["", b_ep, b_ep])])
        rows = {}
        warm = images[:20], labels[:20]
        for label, host, endpoint, th in (
            ("early exit, one node", one_host, one_ep, thresholds),
            ("all stages, one node", one_host, one_ep, [1.01, 1.01, 0.0]),
            ("early exit, partitioned A -> B", None, a_ep, thresholds),
        ):
            if host is not None:
                host.configure([_pipeline(th, ["", "", ""])])
            await _run(endpoint, *warm)
            rows[label] = await _run(endpoint, images, labels)
    finally:
        for server in servers:
            await server.stop(0)
        backend.close()
    early_ms, early_exits, early_acc = rows["early exit, one node"]
    full_ms, _, full_acc = rows["all stages, one node"]
    part_ms, part_exits, _ = rows["early exit, partitioned A -> B"]
    lines = []
    for label, (ms, exits, acc) in rows.items():
        dist = " / ".join(f"{np.mean(exits == k):.1%}" for k in (1, 2, 3))
        lines.append(
            f"| {label} | {np.median(ms):.3f} | {np.percentile(ms, 95):.3f} | {dist} | "
            f"{np.mean(macs[exits - 1]):,.0f} | {acc:.2%} |"
        )
    handed = part_exits > 1
    return f"""## Multi-exit serving over the node inference API (automotive)

`{command()}` ({machine()})

{len(labels)} fresh clean crops (generator seed {args.seed}), sent one at a time by an OIP gRPC
client to real inference servers on 127.0.0.1 running the committed int8 stages with cpu-litert (one
thread). Latency is per request at the client, including gRPC.

| configuration | median ms | p95 ms | exit 1 / 2 / 3 | mean MACs | accuracy |
|---|---:|---:|---|---:|---:|
{chr(10).join(lines)}

- Early exits against running every stage: median latency ratio {np.median(early_ms) / np.median(full_ms):.2f},
  MACs ratio {np.mean(macs[early_exits - 1]) / macs[-1]:.2f}, accuracy {100 * (early_acc - full_acc):+.2f} points.
- Partitioned: requests leaving at exit 1 stay on node A (median {np.median(part_ms[~handed]):.3f} ms); the
  {handed.mean():.1%} handed off to node B take a median {np.median(part_ms[handed]):.3f} ms end to end.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=60)
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    body = asyncio.run(main_async(args))
    print(body)
    if not args.no_write:
        write_section("multiexit-serving", body)


if __name__ == "__main__":
    main()
