"""Ingest shared by three orchestrator replicas on one PostgreSQL (docs/scale-out.md, "Ingest"):
MQTT shared subscriptions on Mosquitto, a JetStream durable consumer on a three-server NATS cluster.

A publisher plays a fleet of nodes the way agents do (retained hello; statuses at QoS 1 with
(epoch, seq); telemetry at QoS 0 with cumulative counters), round after round. Mid-stream one
follower is killed with kill -9. Then every node's last word must be in the views of the leader and
of the surviving follower: its last status (half the nodes end with a goodbye, OFFLINE, sent once),
its telemetry with exactly the counts it sent (cumulative: more would be double counting, less a
loss), no telemetry sample applied twice; and each replica took only a share of the stream.

On NATS the test then plays a replica that dies holding messages: it takes every message of a last
round from the replicas' durable consumer and disconnects without acknowledging them; JetStream
hands them to the replicas after ack_wait_s, and the nodes' last statuses arrive all the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import paho.mqtt.client as paho
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion
from processes import Proc, listen_port, scrape, wait_for

from edgeward.mqtt.topics import node_topic
from edgeward.v1 import api_pb2, node_pb2
from orchestrator.client import EdgewardClient

pytestmark = [pytest.mark.slow, pytest.mark.broker]

NODES = 12
ROUNDS = 24
KILL_AT = 10
GOODBYE = {f"sim-{i:02d}" for i in range(0, NODES, 2)}  # these end with an OFFLINE status
ONLINE = node_pb2.NODE_STATE_ONLINE
OFFLINE = node_pb2.NODE_STATE_OFFLINE
EPOCH = 1_700_000_000_000
MISMATCH: dict[str, dict] = {}  # replica address -> nodes its view has wrong (for the failure message)


class Fleet:
    """One paho client per simulated node, publishing like an agent."""

    def __init__(self, host: str, ports: list[int], prefix: str) -> None:
        self.prefix = prefix
        self.ids = [f"sim-{i:02d}" for i in range(NODES)]
        self.clients: dict[str, paho.Client] = {}
        self.seq = dict.fromkeys(self.ids, 0)
        self.sent_ms = dict.fromkeys(self.ids, EPOCH)
        for i, node in enumerate(self.ids):
            client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=node)
            client.connect(host, ports[i % len(ports)])
            client.loop_start()
            self.clients[node] = client
        for node in self.ids:
            self.hello(node)

    def hello(self, node: str) -> None:
        hello = node_pb2.Hello(agent_version="sim", hardware_profile="sim", boot_unix_ms=EPOCH)
        self._publish(self.clients[node], node, "hello", qos=1, retain=True, hello=hello)

    def _publish(
        self, client: paho.Client, node: str, kind: str, qos: int, retain: bool = False, **body
    ) -> None:
        self.sent_ms[node] += 1
        msg = node_pb2.NodeMessage(schema=1, node_id=node, sent_unix_ms=self.sent_ms[node], **body)
        info = client.publish(node_topic(node, kind, self.prefix), msg.SerializeToString(), qos, retain)
        if qos:
            info.wait_for_publish(10)

    def status(self, node: str, state: int = ONLINE, phase: int = node_pb2.REPLICA_PHASE_LOADING) -> None:
        self.seq[node] += 1
        report = node_pb2.ReplicaReport(replica_id=f"{node}-r", deployment="d", phase=phase)
        status = node_pb2.Status(state=state, status_seq=self.seq[node], epoch=EPOCH, replicas=[report])
        self._publish(self.clients[node], node, "status", qos=1, retain=True, status=status)

    def telemetry(self, node: str, round_: int) -> None:
        stats = node_pb2.ModelStats(model_name="m", model_version="1", inferences=10 * round_)
        self._publish(
            self.clients[node], node, "telemetry", qos=0, telemetry=node_pb2.Telemetry(models=[stats])
        )

    def round(self, round_: int) -> None:
        phase = node_pb2.REPLICA_PHASE_RUNNING if round_ >= ROUNDS // 2 else node_pb2.REPLICA_PHASE_LOADING
        for node in self.ids:
            self.status(node, phase=phase)
            self.telemetry(node, round_)

    def close(self) -> None:
        for client in self.clients.values():
            client.disconnect()
            client.loop_stop()


class Replica:
    def __init__(self, index: int, tmp_path, postgres_url: str, broker: dict) -> None:
        self.index = index
        self.grpc_port, self.metrics_port = listen_port(), listen_port()
        self.address = f"127.0.0.1:{self.grpc_port}"
        self.metrics = f"127.0.0.1:{self.metrics_port}"
        config = tmp_path / f"orchestrator-{index}.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "state_dir": str(tmp_path / "state"),
                    "grpc_bind": self.address,
                    "metrics_bind": self.metrics,
                    "broker": broker,
                    # Long enough for the test to pause the replicas for a moment without a takeover.
                    "state": {"url": postgres_url, "lease_ttl_s": 8.0},
                    "node_timeout_s": 600.0,  # the simulated nodes fall silent at the end
                }
            )
        )
        self.proc = Proc(f"orchestrator-{index}", ["orchestrator", "-c", str(config)], tmp_path)

    def shared(self, what: str) -> float:
        return self.metric(f'edgeward_shared_ingest_total{{what="{what}"}}')

    def metric(self, name: str) -> float:
        for line in scrape(self.metrics).splitlines():
            if line.startswith(f"{name} "):
                return float(line.split()[1])
        return 0.0

    def leading(self) -> bool:
        with contextlib.suppress(OSError):
            return "\nedgeward_leader 1" in scrape(self.metrics)
        return False


def views_complete(address: str, expected: dict[str, tuple[int, int]]) -> bool:
    """The replica at ``address`` shows every node in its expected (state, inferences)."""
    MISMATCH[address] = {"(list)": "no answer"}
    with EdgewardClient(address, timeout=10) as client:
        nodes = {n.id: n for n in client.list_nodes()}
    seen = {
        n: (v.state, v.telemetry.models[0].inferences if v.telemetry.models else -1)
        for n, v in nodes.items()
        if n in expected
    }
    wrong = {
        n: (seen.get(n), want)
        for n, want in expected.items()
        if seen.get(n) is None or seen[n][0] != want[0] or (want[0] == ONLINE and seen[n] != want)
    }
    MISMATCH[address] = wrong
    return not wrong


def no_sample_twice(address: str, ids: list[str]) -> None:
    with EdgewardClient(address) as client:
        for node in ids:
            request = api_pb2.QueryTelemetryRequest(node_id=node)
            stamps = [s.unix_ms for s in client.telemetry.Query(request, timeout=30).samples]
            assert stamps, f"{node}: no telemetry"
            assert len(stamps) == len(set(stamps)), f"{node}: a telemetry sample applied twice"


def known_everywhere(replicas: list[Replica], fleet: Fleet) -> None:
    """Before the stream: every replica's view has every node's hello and a first status (online).
    A NATS MQTT gateway acknowledges a QoS 1 subscription before the cluster's consumer behind it is
    ready, and a retained hello published in between reaches that replica neither live nor as a
    retained message; a node whose hello a replica lacks says hello again, as an agent does when it
    reconnects (the states this test checks come from the shared stream, not from the hellos)."""
    for node in fleet.ids:
        fleet.status(node)
    online = dict.fromkeys(fleet.ids, (ONLINE, -1))
    for _ in range(12):
        try:
            wait_for(lambda: all(views_complete(r.address, online) for r in replicas), 5, "hellos")
            return
        except AssertionError:
            missing = {n for r in replicas for n in MISMATCH.get(r.address, {}) if n in online}
            for node in sorted(missing):
                fleet.hello(node)
    raise AssertionError(f"a replica lacks nodes after 60 s of hellos: {MISMATCH}")


def run_fleet(replicas: list[Replica], fleet: Fleet) -> tuple[Replica, Replica]:
    """The rounds, the kill -9 of a follower at KILL_AT; (leader, surviving follower)."""
    leader = wait_for(lambda: next((r for r in replicas if r.leading()), None), 60, "a leader")
    known_everywhere(replicas, fleet)
    followers = [r for r in replicas if r is not leader]
    for round_ in range(1, ROUNDS + 1):
        fleet.round(round_)
        if round_ == KILL_AT:
            wait_for(
                lambda: all(r.shared("received") for r in replicas),
                60,
                "every replica taking a share of the stream",
                retry=(OSError,),
            )
            followers[0].proc.kill9()
        time.sleep(0.05)
    for node in sorted(GOODBYE):  # the last word of these nodes, sent once
        fleet.status(node, state=OFFLINE)
    return leader, followers[1]


def expected(fleet: Fleet) -> dict[str, tuple[int, int]]:
    return {n: (OFFLINE if n in GOODBYE else ONLINE, 10 * ROUNDS) for n in fleet.ids}


def start(tmp_path, postgres_url: str, brokers: list[dict]) -> list[Replica]:
    replicas = [Replica(0, tmp_path, postgres_url, brokers[0])]
    replicas[0].proc.wait_serving(replicas[0].address)
    replicas += [Replica(i, tmp_path, postgres_url, brokers[i % len(brokers)]) for i in (1, 2)]
    for r in replicas[1:]:
        r.proc.wait_serving(r.address)
    return replicas


def check_views(leader: Replica, follower: Replica, fleet: Fleet) -> None:
    for r in (leader, follower):
        try:
            wait_for(lambda r=r: views_complete(r.address, expected(fleet)), 60, f"replica {r.index}'s view")
        except AssertionError as err:
            raise AssertionError(f"{err}; (seen, expected) {MISMATCH.get(r.address)}") from None
    no_sample_twice(leader.address, [n for n in fleet.ids if n not in GOODBYE])
    total = ROUNDS * NODES * 2
    for r in (leader, follower):
        assert 0 < r.shared("received") < total, "a replica hears a share of the stream, not all of it"
        # The replicas listen for each other's changes (PostgreSQL LISTEN/NOTIFY) rather than poll:
        assert r.metric("edgeward_store_notified") == 1
    # and the followers' merges of the statuses they received were notified to the leader.
    assert leader.metric('edgeward_store_notifications_total{what="notifications"}') > 0
    # The replicas time the statuses they received and those they read back from the others' merges
    # (a change one of the two received, the other read back: which one is the broker's choice).
    lag = 'edgeward_status_lag_seconds_count{path="%s"}'
    assert leader.metric(lag % "received") > 0
    assert leader.metric(lag % "merged") + follower.metric(lag % "merged") > 0


def test_shared_subscriptions_on_mosquitto(tmp_path, postgres_url, mosquitto, topic_prefix):
    broker = {
        "url": f"mqtt://{mosquitto.host}:{mosquitto.port}",
        "topic_prefix": topic_prefix,
        "ingest": "shared",
    }
    replicas = start(tmp_path, postgres_url, [broker])
    fleet = Fleet(mosquitto.host, [mosquitto.port], topic_prefix)
    try:
        leader, follower = run_fleet(replicas, fleet)
        check_views(leader, follower, fleet)
    finally:
        fleet.close()
        for r in replicas:
            r.proc.stop()


def test_jetstream_on_a_nats_cluster_redelivers_what_a_dead_replica_held(
    tmp_path, postgres_url, nats_cluster
):
    prefix = "edgeward/v1"  # NATS: no '.' anywhere in a topic
    brokers = [
        {
            "url": url,
            "topic_prefix": prefix,
            "event_topic_levels": True,
            "ingest": "jetstream",
            "jetstream": {"urls": nats_cluster.client_urls, "ack_wait_s": 2.0},
        }
        for url in nats_cluster.mqtt_urls
    ]
    replicas = start(tmp_path, postgres_url, brokers)
    fleet = Fleet("127.0.0.1", nats_cluster.mqtt_ports, prefix)
    try:
        leader, follower = run_fleet(replicas, fleet)
        check_views(leader, follower, fleet)
        # A replica that takes a last round of statuses and dies before acknowledging it: the
        # replicas are paused until their pull requests have run out, so that it alone is asking.
        for r in (leader, follower):
            r.proc.pause()
        try:
            taken = asyncio.run(die_holding(nats_cluster.client_urls, fleet))
        finally:
            for r in (leader, follower):
                r.proc.resume()
        assert taken == len(GOODBYE), "the dying consumer took the whole round"
        back = {n: (ONLINE, 10 * ROUNDS) for n in fleet.ids}
        for r in (leader, follower):
            try:
                wait_for(
                    lambda r=r: views_complete(r.address, back), 60, f"replica {r.index}: the redelivered"
                )
            except AssertionError as err:
                wrong = MISMATCH.get(r.address) or {}
                raise AssertionError(
                    f"{err}; (seen, expected) {wrong}; {shares(leader, follower)}; "
                    f"stored: {stored_statuses(postgres_url, list(wrong))}"
                ) from None
        assert sum(r.shared("jetstream_redelivered") for r in (leader, follower)) >= taken
    finally:
        fleet.close()
        for r in replicas:
            r.proc.stop()


def shares(*replicas: Replica) -> dict[int, dict[str, float]]:
    """What each replica took of the stream, for a failure message."""
    whats = ("received", "jetstream_redelivered", "read_status", "merged")
    return {r.index: {w: r.shared(w) for w in whats} for r in replicas}


def stored_statuses(postgres_url: str, ids: list[str]) -> dict[str, tuple]:
    """Each node's merged status as the store holds it: (state, seq, writer, flush), for a failure
    message."""
    import psycopg

    out: dict[str, tuple] = {}
    with psycopg.connect(
        postgres_url.replace("postgresql+psycopg", "postgresql"), connect_timeout=10
    ) as conn:
        for node_id, status, seq, swriter, sseq in conn.execute(
            "SELECT node_id, status, seq, swriter, sseq FROM node_states WHERE node_id = ANY(%s)", (ids,)
        ):
            state = node_pb2.NodeMessage.FromString(status).status.state if status else None
            out[node_id] = (state, seq, swriter, sseq)
    return out


async def die_holding(urls: list[str], fleet: Fleet) -> int:
    """Publish ONLINE statuses for the nodes that said goodbye (they come back) while no replica asks
    for messages, bind to the replicas' durable consumer, take them, and disconnect without
    acknowledging them."""
    import nats

    from orchestrator.jetstream import FETCH_WAIT_S, names

    await asyncio.sleep(FETCH_WAIT_S + 1.0)  # the paused replicas' pull requests run out
    await asyncio.to_thread(lambda: [fleet.status(n) for n in sorted(GOODBYE)])
    stream, durable = names(fleet.prefix)
    nc = await nats.connect(servers=urls)
    try:
        sub = await nc.jetstream().pull_subscribe_bind(durable=durable, stream=stream)
        held = []
        with contextlib.suppress(nats.errors.TimeoutError):
            while len(held) < len(GOODBYE):
                held += await sub.fetch(len(GOODBYE) - len(held), timeout=10)
        return len(held)
    finally:
        await nc.close()
