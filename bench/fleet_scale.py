"""Fleet scale: N hollow nodes through one orchestrator on stock Mosquitto, on this machine.

Starts a private Mosquitto on a free loopback port (max_connections unlimited, QoS 1 queue per
client unlimited, so the broker holds what the orchestrator's backpressure holds back), the
orchestrator as its own process (SQLite store, /metrics), then ``edgeward sim-fleet`` processes
that split the N hollow nodes between them (real agents on one event loop per process, simulated
backend; docs/benchmarks.md). It measures, through the public gRPC API and /metrics:

* time until all N nodes are online (from the start of the fleet processes) and attested;
* apply -> Running of one deployment with N replicas: p50 / p99 over the replicas, as polling the
  deployment's Running count saw them, and as the orchestrator recorded each replica's move;
* nodes falsely marked offline during a steady window (no node is stopped: every offline sighting
  is false);
* the orchestrator's RSS (largest seen);
* ingest: messages the agents published vs messages the orchestrator took in plus QoS 0 shed
  (QoS 1 loss = the difference, when nothing was shed) and the QoS 0 shed count.

    nice -n 10 python bench/fleet_scale.py --nodes 2000 --steady 300
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _models import push_vib_cnn
from _report import command, machine, write_section
from _sched import CpuClock, ThreadClock

from edgeward.security.tls import MAX_RESPONSE_BYTES, grpc_aio_channel
from edgeward.v1 import api_pb2, api_pb2_grpc, node_pb2

ONLINE = node_pb2.NODE_STATE_ONLINE
RUNNING = node_pb2.REPLICA_PHASE_RUNNING
PER_PROCESS = 2500  # hollow nodes per sim-fleet process by default (one event loop each)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raise_fd_limit() -> int:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # inherited by the broker and the fleet
    return hard


def wait_port(port: int, what: str, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"{what} did not listen on {port}")


def start_mosquitto(work: Path) -> tuple[subprocess.Popen, int]:
    binary = shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin:/usr/bin")
    if binary is None:
        raise SystemExit("mosquitto not installed: apt-get install mosquitto")
    port = free_port()
    conf = work / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_connections -1\n"
        "max_queued_messages 0\nmax_inflight_messages 0\n"
    )
    log = (work / "mosquitto.log").open("wb")
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT)
    wait_port(port, "mosquitto", proc)
    return proc, port


def start_orchestrator(
    work: Path, broker_port: int, public_key: Path, node_timeout_s: float, embedded: bool
) -> tuple:
    grpc_port, metrics_port = free_port(), free_port()
    conf = work / "orchestrator.yaml"
    broker = f"{{embedded_port: {broker_port}}}" if embedded else f"{{url: 'mqtt://127.0.0.1:{broker_port}'}}"
    conf.write_text(
        f"state_dir: {work / 'orch'}\ngrpc_bind: 127.0.0.1:{grpc_port}\nmetrics_bind: 127.0.0.1:{metrics_port}\n"
        f"node_timeout_s: {node_timeout_s}\n"
        f"broker: {broker}\n"
        f"catalog: {{trusted_publishers: ['{public_key}']}}\n"
    )
    log = (work / "orchestrator.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgeward", "orchestrator", "-c", str(conf)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    wait_port(grpc_port, "the orchestrator", proc)
    return proc, grpc_port, metrics_port


def start_fleet(work: Path, broker_port: int, nodes: int, processes: int, heartbeat: float) -> list:
    procs = []
    share = -(-nodes // processes)
    for k in range(processes):
        first, count = k * share, min(share, nodes - k * share)
        if count <= 0:
            break
        out = (work / f"fleet-{k}.log").open("wb")
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "edgeward",
                    "sim-fleet",
                    "--nodes",
                    str(count),
                    "--first",
                    str(first),
                    "--broker-url",
                    f"mqtt://127.0.0.1:{broker_port}",
                    "--heartbeat",
                    str(heartbeat),
                    "--state-dir",
                    str(work / "hollow"),
                    "--enroll-from",
                    str(work / "orch"),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        )
    return procs


async def metrics(port: int) -> dict[str, float]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    body = (await reader.read()).decode()
    writer.close()
    out = {}
    for name in (
        'edgeward_mqtt_received_total{qos="0"}',
        'edgeward_mqtt_received_total{qos="1"}',
        'edgeward_mqtt_shed_total{qos="0"}',
        "edgeward_mqtt_ingest_paused_total",
        "edgeward_telemetry_samples_total",
    ):
        m = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", body, re.M)
        out[name] = float(m.group(1)) if m else float("nan")
    return out


class Rss:
    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.peak = 0

    def sample(self) -> int:
        rss = self.proc.memory_info().rss
        self.peak = max(self.peak, rss)
        return rss


async def bench(args: argparse.Namespace, work: Path) -> dict:
    from orchestrator.catalog.signing import PublisherKey

    publisher = PublisherKey.generate()
    _, public = publisher.write(work / "publisher")
    embedded = args.broker == "embedded"
    broker, broker_port = (None, free_port()) if embedded else start_mosquitto(work)
    orch, grpc_port, metrics_port = start_orchestrator(work, broker_port, public, args.node_timeout, embedded)
    rss = Rss(orch.pid)
    fleet: list[subprocess.Popen] = []
    result: dict = {"nodes": args.nodes, "processes": args.processes, "load_start": os.getloadavg()}
    try:
        async with grpc_aio_channel(
            f"127.0.0.1:{grpc_port}", None, max_receive=MAX_RESPONSE_BYTES
        ) as channel:
            nodes_api = api_pb2_grpc.NodeServiceStub(channel)
            deps = api_pb2_grpc.DeploymentServiceStub(channel)
            models = api_pb2_grpc.ModelServiceStub(channel)

            async def node_list() -> list[api_pb2.Node]:
                return list((await nodes_api.List(api_pb2.ListNodesRequest(), timeout=60)).nodes)

            # Listing the whole fleet costs the orchestrator about 50 us a node: at 10,000 nodes a
            # poll every 2 s would take a quarter of its CPU. Poll less often for larger fleets.
            poll = max(2.0, args.nodes / 2000)
            result["poll_s"] = poll
            t0 = time.monotonic()
            fleet = start_fleet(work, broker_port, args.nodes, args.processes, args.heartbeat)
            online = attested = 0
            last_print = 0.0
            while attested < args.nodes:
                await asyncio.sleep(poll)
                listed = await node_list()
                online = sum(n.state == ONLINE for n in listed)
                attested = sum(n.state == ONLINE and n.attestation_tier == "software" for n in listed)
                rss.sample()
                elapsed = time.monotonic() - t0
                if online == args.nodes and "online_s" not in result:
                    result["online_s"] = elapsed
                if elapsed - last_print >= 10:
                    last_print = elapsed
                    print(f"{elapsed:6.0f} s: {online} online, {attested} attested", flush=True)
                if elapsed > args.startup_timeout:
                    result["online_s"] = result.get("online_s", float("nan"))
                    result["stalled"] = f"{online} online, {attested} attested after {elapsed:.0f} s"
                    print(result["stalled"], flush=True)
                    return result
            result["attested_s"] = time.monotonic() - t0
            print(f"all {args.nodes} online after {result['online_s']:.1f} s, attested after "
                  f"{result['attested_s']:.1f} s", flush=True)  # fmt: skip

            if not args.no_apply:
                machine_share = MachineShare(orch.pid, [p.pid for p in fleet])
                await apply_and_wait(args, models, deps, publisher, rss, result, machine_share)

            falsely_offline: set[str] = set()
            steady_cpu = {
                "orch": CpuClock([orch.pid]),
                "fleet": CpuClock([p.pid for p in fleet]),
                "broker": CpuClock([] if broker is None else [broker.pid]),
            }
            for clock in steady_cpu.values():
                clock.start()
            steady_end = time.monotonic() + args.steady
            while time.monotonic() < steady_end:
                await asyncio.sleep(poll)
                falsely_offline |= {n.id for n in await node_list() if n.state != ONLINE}
                rss.sample()
            result["steady_cores"] = {n: c.stop() if c.pids else None for n, c in steady_cpu.items()}
            result["falsely_offline"] = len(falsely_offline)
            result["rss_mb"] = rss.peak / 2**20
            result["rss_steady_mb"] = rss.sample() / 2**20
            print(f"steady {args.steady:.0f} s: {len(falsely_offline)} nodes falsely offline; "
                  f"orchestrator RSS peak {result['rss_mb']:.0f} MB", flush=True)  # fmt: skip
    finally:
        try:
            await stop_fleet(fleet, work, orch, metrics_port, result)
        finally:  # whatever failed above, no process of the bench outlives it
            for proc in fleet:
                if proc.poll() is None:
                    proc.kill()
            orch.send_signal(signal.SIGTERM)
            try:
                orch.wait(60)
            except subprocess.TimeoutExpired:
                orch.kill()
            if broker is not None:
                broker.terminate()
                broker.wait()
    return result


async def stop_fleet(
    fleet: list, work: Path, orch: subprocess.Popen, metrics_port: int, result: dict
) -> None:
    """Stop the fleet processes and total what they published; the orchestrator's ingest figures."""
    published = published_qos1 = 0
    for proc in fleet:
        proc.send_signal(signal.SIGTERM)
    for k, proc in enumerate(fleet):
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
        text = (work / f"fleet-{k}.log").read_text(errors="replace")
        for total, qos1 in re.findall(r"^sim-fleet: published (\d+) messages, (\d+) of them", text, re.M):
            published += int(total)
            published_qos1 += int(qos1)
    await asyncio.sleep(3.0)  # the last offline statuses reach the orchestrator
    if orch.poll() is None:
        result["ingest"] = await metrics(metrics_port)
    result["published"] = published
    result["published_qos1"] = published_qos1
    result["load_end"] = os.getloadavg()


class MachineShare:
    """Over the apply: how much of the time the orchestrator's event loop ran, and how much it was
    runnable but waiting for a core; the CPU the orchestrator and the fleet processes used."""

    def __init__(self, orch_pid: int, fleet_pids: list[int]) -> None:
        self.loop = ThreadClock(orch_pid)
        self.orch = CpuClock([orch_pid])
        self.fleet = CpuClock(fleet_pids)

    def start(self) -> None:
        for clock in (self.loop, self.orch, self.fleet):
            clock.start()

    def stop(self, result: dict) -> None:
        result["loop_share"] = self.loop.stop()
        result["orch_cores"] = self.orch.stop()
        result["fleet_cores"] = self.fleet.stop()


async def apply_and_wait(args, models, deps, publisher, rss, result: dict, share: MachineShare) -> None:
    """Push the model, apply one deployment with a replica per node, and time the replicas' Running
    (p50 / p99: the polls at which half and 99 % ran; and each replica's recorded time) into
    ``result``, with where the orchestrator's time went meanwhile (``share``)."""
    poll = result["poll_s"]
    await push_vib_cnn(models, publisher)
    manifest = (
        "apiVersion: edgeward/v1\nkind: Deployment\nmetadata: {name: scale}\n"
        f"spec:\n  model: {{name: vib-cnn, version: 1.0.0}}\n  replicas: {args.nodes}\n"
        "  requirements: {accelerators: [sim-hollow], memory: 1Mi}\n"
    )
    applied, applied_wall = time.monotonic(), time.time()
    share.start()
    await deps.Apply(api_pb2.ApplyRequest(manifest=manifest), timeout=120)
    # Polled in the basic view (counts, no replica list: listing 10,000 replicas took the orchestrator
    # about 250 ms a time); each replica's recorded time is read once, at the end.
    basic = api_pb2.GetDeploymentRequest(name="scale", view=api_pb2.DEPLOYMENT_VIEW_BASIC)
    counts: list[tuple[float, int]] = []  # (seconds since the apply, replicas Running) at each poll
    while not counts or counts[-1][1] < args.nodes:
        await asyncio.sleep(poll / 2)
        dep = await deps.Get(basic, timeout=60)
        counts.append((time.monotonic() - applied, dep.status.running))
        rss.sample()
        if counts[-1][0] > args.running_timeout:
            break
    share.stop(result)
    full = await deps.Get(api_pb2.GetDeploymentRequest(name="scale"), timeout=60)
    result["running"] = counts[-1][1]
    result["p50_s"] = _first(counts, -(-args.nodes // 2))
    result["p99_s"] = _first(counts, int(args.nodes * 0.99))
    result["all_running_s"] = _first(counts, args.nodes)
    stamped = sorted(
        r.updated_unix_ms / 1000 - applied_wall for r in full.status.replica_list if r.phase == RUNNING
    )
    result["recorded_p50_s"] = statistics.median(stamped) if stamped else float("nan")
    result["recorded_p99_s"] = _p99(stamped, args.nodes)
    print(f"{result['running']}/{args.nodes} running; p50 {result['p50_s']:.1f} s, p99 {result['p99_s']:.1f} s "
          f"(recorded: p50 {result['recorded_p50_s']:.1f} s, p99 {result['recorded_p99_s']:.1f} s)",
          flush=True)  # fmt: skip


def _first(counts: list[tuple[float, int]], at_least: int) -> float:
    """The time of the first poll that saw at least ``at_least`` replicas Running."""
    return next((t for t, running in counts if running >= at_least), float("nan"))


def _p99(ordered: list[float], want: int) -> float:
    """The p99 of ``ordered`` (sorted), once all ``want`` replicas are in it."""
    return ordered[max(0, int(len(ordered) * 0.99) - 1)] if len(ordered) == want else float("nan")


def _cores(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} cores"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=2000)
    parser.add_argument(
        "--processes", type=int, default=0, help="sim-fleet processes (default: 1 per 2,500 nodes)"
    )
    parser.add_argument("--steady", type=float, default=300.0, help="steady window, seconds (default 300)")
    parser.add_argument("--heartbeat", type=float, default=5.0)
    parser.add_argument("--node-timeout", type=float, default=15.0)
    parser.add_argument("--startup-timeout", type=float, default=900.0)
    parser.add_argument("--running-timeout", type=float, default=600.0)
    parser.add_argument(
        "--broker",
        choices=["mosquitto", "embedded"],
        default="mosquitto",
        help="embedded: measure amqtt's limit",
    )
    parser.add_argument(
        "--no-apply",
        action="store_true",
        help="no deployment: the steady window follows the fleet's attestation (online, liveness, RSS, ingest)",
    )
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the work directory (the processes' logs); default: delete it",
    )
    args = parser.parse_args()
    args.processes = args.processes or max(1, -(-args.nodes // PER_PROCESS))
    fd_limit = raise_fd_limit()
    work = Path(tempfile.mkdtemp(prefix="edgeward-scale-"))
    try:
        r = asyncio.run(bench(args, work))
    finally:
        if args.keep:
            print(f"work directory kept: {work}", flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)  # 10,000 nodes' keys and caches
    ingest = r.get("ingest", {})
    received0 = ingest.get('edgeward_mqtt_received_total{qos="0"}', float("nan"))
    received1 = ingest.get('edgeward_mqtt_received_total{qos="1"}', float("nan"))
    shed = ingest.get('edgeward_mqtt_shed_total{qos="0"}', float("nan"))
    published0 = r["published"] - r["published_qos1"]
    lost1 = max(0.0, r["published_qos1"] - received1)
    lost0 = max(0.0, published0 - received0 - shed)
    lost_all = max(0.0, r["published"] - received0 - received1 - shed)
    broker_name = "the embedded amqtt broker" if args.broker == "embedded" else "stock Mosquitto"
    body = f"""## Fleet scale: {r["nodes"]:,} hollow nodes, one orchestrator, {broker_name}

`{command()}` ({machine()}; load average {r["load_start"][0]:.1f} at the start, {r["load_end"][0]:.1f}
at the end, on the shared 2-core machine; open-file limit {fd_limit})

{r["nodes"]:,} hollow nodes (`edgeward sim-fleet`: real agents, simulated backend) in {r["processes"]}
process(es), heartbeat {args.heartbeat:g} s, node timeout {args.node_timeout:g} s; the orchestrator (SQLite)
and Mosquitto each in their own process, all on this machine. The fleet is listed every
{r.get("poll_s", 2.0):g} s (the deployment every {r.get("poll_s", 2.0) / 2:g} s): times are to that resolution,
but for the "recorded" row: each replica's update time as stored, read once all ran. The
deployment is polled in its basic view (the Running count, no replica list).
The steady window's CPU of the orchestrator includes answering the bench's listing of the fleet.
The enrollment tokens are minted by the fleet processes at their start, in one batch each (one
flush to disk), inside the time to online.

| figure | value |
|---|---|
| all nodes online | {r.get("online_s", float("nan")):.1f} s after the fleet processes started |
| all nodes attested (software tier) | {r.get("attested_s", float("nan")):.1f} s |
| apply -> Running, {r["nodes"]:,} replicas | {"not measured (--no-apply)" if args.no_apply else f"{r.get('running', 0):,} running; p50 {r.get('p50_s', float('nan')):.1f} s, p99 {r.get('p99_s', float('nan')):.1f} s, all {r.get('all_running_s', float('nan')):.1f} s"} |
| apply -> Running as the orchestrator recorded it (no poll in it) | {"not measured" if args.no_apply else f"p50 {r.get('recorded_p50_s', float('nan')):.1f} s, p99 {r.get('recorded_p99_s', float('nan')):.1f} s"} |
| during the apply: the orchestrator's event loop | {r.get("loop_share") or "not measured"} |
| during the apply: CPU of the orchestrator / of the fleet processes | {_cores(r.get("orch_cores"))} / {_cores(r.get("fleet_cores"))} of the machine's 2 |
| nodes falsely marked offline, {args.steady:g} s steady window | {r.get("falsely_offline", "n/a")} |
| steady window: CPU of the orchestrator / of the fleet processes / of Mosquitto | {" / ".join(_cores(r.get("steady_cores", {}).get(k)) for k in ("orch", "fleet", "broker"))} |
| orchestrator RSS | peak {r.get("rss_mb", float("nan")):.0f} MB, {r.get("rss_steady_mb", float("nan")):.0f} MB at the end of the window |
| QoS 1 (hello, status, events, evidence): acknowledged to the agents / taken in | {r["published_qos1"]:,} / {received1:,.0f} |
| QoS 1 lost (acknowledged - taken in, at least 0) | {lost1:,.0f} |
| QoS 0 (telemetry): published / taken in / shed by the orchestrator | {published0:,} / {received0:,.0f} / {shed:,.0f} |
| QoS 0 lost elsewhere (published - taken in - shed, at least 0) | {lost0:,.0f} |
| all messages lost (published - taken in - shed, at least 0) | {lost_all:,.0f} |
| ingest paused for backpressure | {ingest.get("edgeward_mqtt_ingest_paused_total", float("nan")):,.0f} times |
"""
    body += (
        "\nTaken in counts duplicates of QoS 1's at-least-once delivery, and messages whose PUBACK the "
        "agents had not read when they stopped: a figure above the acknowledged one is not a gain.\n"
    )
    if args.broker == "embedded":
        body += (
            "amqtt 0.12.1 delivers a QoS 0 publish at the subscription's QoS 1: the orchestrator takes the "
            "telemetry in as QoS 1, so only the last row compares like with like.\n"
        )
    if "stalled" in r:
        body += f"\nStartup stalled: {r['stalled']}.\n"
    print(body)
    if not args.no_write:
        suffix = "-no-apply" if args.no_apply else ""
        write_section(f"fleet-scale-{args.broker}-{r['nodes']}{suffix}", body)


if __name__ == "__main__":
    main()
