"""Telemetry ingest rate of the orchestrator against a real Mosquitto, as a ratio to the raw paho
receive rate measured in the same run.

A publisher process floods a private Mosquitto (started here on a free loopback port) with valid
telemetry messages from many simulated nodes, every ``--qos1-every``-th at QoS 1 (the rest at
QoS 0, as agents send telemetry). Each round measures, one after the other: (1) a bare paho client
that only counts messages in ``on_message``; (2) the orchestrator's real ingest path (MQTT session,
topic parsing, payload validation, fleet view, batched time-series store), counting samples
stored. Rates are messages handled per second between the first and the last message; the figure
is the median ratio over the rounds. Per round it also reports the QoS 0 messages the orchestrator
shed (its inbox was full: counted in ``edgeward_mqtt_shed_total``) and the QoS 1 messages lost
(published minus taken in; QoS 1 must never be dropped).

    python bench/telemetry_ingest.py --messages 40000 --nodes 1000 --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import paho.mqtt.client as paho

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import command, machine, write_section

from edgeward.v1 import node_pb2
from edgeward.wire import node_message


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mosquitto(workdir: Path) -> tuple[subprocess.Popen, int]:
    binary = shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin:/usr/bin")
    if binary is None:
        raise SystemExit("mosquitto not installed: apt-get install mosquitto")
    port = free_port()
    conf = workdir / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        "max_queued_messages 0\nmax_inflight_messages 0\n"
    )
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), 0.1).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    raise SystemExit("mosquitto did not start")


def publish(
    port: int, prefix: str, messages: int, nodes: int, qos1_every: int, go: multiprocessing.Event
) -> None:
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4().hex[:6]}")
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", port)
    client.loop_start()
    payloads = []
    for i in range(nodes):
        node = f"sim-{i:05d}"
        msg = node_message(
            node, telemetry=node_pb2.Telemetry(power_w=3.0, energy_j=float(i), cpu_utilisation=0.2)
        )
        payloads.append((f"{prefix}/nodes/{node}/telemetry", msg.SerializeToString()))
    go.wait()
    acked = []
    for i in range(messages):
        topic, payload = payloads[i % nodes]
        qos = 1 if qos1_every and i % qos1_every == 0 else 0
        while (info := client.publish(topic, payload, qos=qos)).rc == paho.MQTT_ERR_QUEUE_SIZE:
            time.sleep(0.001)
        if qos:
            acked.append(info)
    for info in acked:  # every QoS 1 message acknowledged by the broker
        info.wait_for_publish(60)
    time.sleep(0.5)
    client.loop_stop()
    client.disconnect()


def qos1_count(messages: int, qos1_every: int) -> int:
    return len(range(0, messages, qos1_every)) if qos1_every else 0


def run_publisher(
    port: int, prefix: str, messages: int, nodes: int, qos1_every: int
) -> tuple[multiprocessing.Process, multiprocessing.Event]:
    ctx = multiprocessing.get_context("spawn")
    go = ctx.Event()
    proc = ctx.Process(target=publish, args=(port, prefix, messages, nodes, qos1_every, go))
    proc.start()
    time.sleep(1.0)  # let it connect and build its payloads
    return proc, go


def raw_rate(port: int, messages: int, nodes: int, qos1_every: int) -> float:
    prefix = f"b-{uuid.uuid4().hex[:8]}/edgeward/v1"
    stamps: list[float] = []
    done = threading.Event()

    def on_message(client, userdata, message) -> None:
        stamps.append(time.perf_counter())
        if len(stamps) >= messages:
            done.set()

    sub = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"raw-{uuid.uuid4().hex[:6]}")
    sub.on_message = on_message
    sub.connect("127.0.0.1", port)
    sub.subscribe(f"{prefix}/nodes/+/telemetry", qos=1)  # as the orchestrator subscribes
    sub.loop_start()
    time.sleep(0.5)
    pub, go = run_publisher(port, prefix, messages, nodes, qos1_every)
    go.set()
    done.wait(120)
    pub.join(60)
    sub.loop_stop()
    sub.disconnect()
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


async def ingest_rate(
    port: int, messages: int, nodes: int, qos1_every: int, state: Path
) -> tuple[float, int, int]:
    from orchestrator.config import BrokerConfig, OrchestratorConfig
    from orchestrator.server import Orchestrator

    prefix = f"b-{uuid.uuid4().hex[:8]}/edgeward/v1"
    config = OrchestratorConfig(
        state_dir=state / uuid.uuid4().hex,
        grpc_bind="127.0.0.1:0",
        broker=BrokerConfig(url=f"mqtt://127.0.0.1:{port}", topic_prefix=prefix),
    )
    async with Orchestrator(config) as orch:
        await asyncio.sleep(0.5)
        pub, go = run_publisher(port, prefix, messages, nodes, qos1_every)
        go.set()
        first = last = None
        seen = 0
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            orch.telemetry.flush()
            count = orch.telemetry.ingested
            if count and first is None:
                first = time.perf_counter()
            if count > seen:
                seen, last = count, time.perf_counter()
            elif count and time.perf_counter() - last > 2.0:
                break  # the flood is over (QoS 0: what the session dropped is gone)
            if count >= messages:
                break
            await asyncio.sleep(0.005)
        await asyncio.get_running_loop().run_in_executor(None, pub.join, 60)
        stats = orch._mqtt.stats if orch._mqtt else None
        shed = stats.dropped_overflow if stats else 0
        lost_qos1 = qos1_count(messages, qos1_every) - (stats.received_qos1 if stats else 0)
    return (seen - 1) / (last - first), shed, max(0, lost_qos1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=40000)
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--qos1-every", type=int, default=10, help="every N-th message at QoS 1 (0: none); default 10"
    )
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edgeward-bench-"))
    broker, port = start_mosquitto(work)
    rows = []
    try:
        for r in range(args.rounds):
            raw = raw_rate(port, args.messages, args.nodes, args.qos1_every)
            ours, shed, lost = asyncio.run(
                ingest_rate(port, args.messages, args.nodes, args.qos1_every, work)
            )
            rows.append((raw, ours, shed, lost))
            print(
                f"round {r + 1}: raw paho {raw:,.0f} msg/s, orchestrator {ours:,.0f} msg/s, "
                f"ratio {ours / raw:.2f}, QoS 0 shed {shed}, QoS 1 lost {lost}",
                flush=True,
            )
    finally:
        broker.terminate()
        broker.wait()
    ratio = statistics.median(o / r for r, o, _, _ in rows)
    shed_total = sum(d for _, _, d, _ in rows)
    lost_total = sum(q for _, _, _, q in rows)
    table = "\n".join(
        f"| {i + 1} | {r:,.0f} | {o:,.0f} | {o / r:.2f} | {d} | {q} |" for i, (r, o, d, q) in enumerate(rows)
    )
    met = "met" if ratio >= 0.8 and shed_total == 0 and lost_total == 0 else "not met"
    body = f"""## Telemetry ingest vs raw paho receive (real Mosquitto)

`{command()}` ({machine()})

{args.messages} telemetry messages from {args.nodes} simulated nodes per measurement, from a
publisher process, {qos1_count(args.messages, args.qos1_every)} of them at QoS 1 (every {args.qos1_every}th) and the rest at
QoS 0; raw = a paho client counting in `on_message`; orchestrator = the full ingest path (session,
topic and payload validation, fleet view, batched numpy time-series store). QoS 0 shed: dropped by
the orchestrator's session because its inbox was full; QoS 1 lost: published minus taken in.

| round | raw paho msg/s | orchestrator msg/s | ratio | QoS 0 shed | QoS 1 lost |
|---|---|---|---|---|---|
{table}

Median ratio: **{ratio:.2f}**, {shed_total} shed, {lost_total} lost (target ≥ 0.8 with 0 dropped: {met}).
"""
    print(body)
    if not args.no_write:
        write_section("telemetry-ingest", body)


if __name__ == "__main__":
    main()
