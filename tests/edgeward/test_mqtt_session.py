"""Topic scheme, value objects, and `MqttSession` against real brokers (Mosquitto and amqtt)."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import signal
import ssl
import sys
import textwrap
import threading
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given
from hypothesis import strategies as st
from processes import listen_port

import edgeward
from edgeward.mqtt import (
    DEFAULT_PREFIX,
    BrokerURL,
    Message,
    MqttConnectError,
    MqttError,
    MqttPublishError,
    MqttSession,
    MqttSubscribeError,
    NodeTopic,
    TopicError,
    TopicKind,
    Will,
    node_topic,
    nodes_filter,
    parse_node_topic,
)
from edgeward.mqtt.topics import NODE_ID_PATTERN

LOOPBACK = "127.0.0.1"
RECEIVE_TIMEOUT_S = 5.0
# So that a child interpreter imports the same edgeward, installed or not.
EDGEWARD_IMPORT_ROOT = str(Path(edgeward.__file__).resolve().parents[1])


def client_id(role: str) -> str:
    return f"{role}-{uuid.uuid4().hex[:8]}"


async def receive(session: MqttSession, within: float = RECEIVE_TIMEOUT_S) -> Message:
    return await asyncio.wait_for(anext(session.messages()), within)


async def nothing_received(session: MqttSession, within: float = 0.5) -> bool:
    try:
        await asyncio.wait_for(anext(session.messages()), within)
    except TimeoutError:
        return True
    return False


async def wait_until(condition: Callable[[], bool], within: float = 10.0) -> None:
    async with asyncio.timeout(within):
        while not condition():
            await asyncio.sleep(0.05)


# ---- topics ---------------------------------------------------------------------------------------

node_ids = st.from_regex(NODE_ID_PATTERN, fullmatch=True)


@given(node_id=node_ids, kind=st.sampled_from(TopicKind))
def test_node_topic_round_trips(node_id: str, kind: TopicKind) -> None:
    topic = node_topic(node_id, kind)
    assert topic == f"edgeward/v1/nodes/{node_id}/{kind.value}"
    assert parse_node_topic(topic) == (node_id, kind)


@given(topic=st.text(max_size=80))
def test_parse_node_topic_accepts_only_exact_node_topics(topic: str) -> None:
    try:
        node_id, kind = parse_node_topic(topic)
    except TopicError:
        return
    assert node_topic(node_id, kind) == topic


@pytest.mark.parametrize(
    "topic",
    [
        "",
        "edgeward/v1/nodes",
        "edgeward/v1/nodes/",
        "edgeward/v1/nodes/n1",
        "edgeward/v1/nodes/n1/",
        "edgeward/v1/nodes//status",
        "edgeward/v1/nodes/n1/status/extra",
        "edgeward/v1/nodes/n1/reboot",
        "edgeward/v1/nodes/N1/status",
        "edgeward/v1/nodes/+/status",
        "edgeward/v1/nodes/n1/#",
        "edgeward/v1/nodes/#",
        "edgeward/v1/nodes/-n1/status",
        "edgeward/v1/nodes/n 1/status",
        "edgeward/v1/nodes/n\x001/status",
        "edgeward/v1/nodes/" + "n" * 64 + "/status",
        "edgeward/v2/nodes/n1/status",
        "/edgeward/v1/nodes/n1/status",
        "t-other/edgeward/v1/nodes/n1/status",
        "$SYS/edgeward/v1/nodes/n1/status",
    ],
)
def test_parse_node_topic_rejects_garbage(topic: str) -> None:
    with pytest.raises(TopicError) as info:
        parse_node_topic(topic)
    assert isinstance(info.value, MqttError)
    assert isinstance(info.value, ValueError)


def test_topics_under_a_custom_prefix(topic_prefix: str) -> None:
    topic = node_topic("edge-01.lab_2", "telemetry", prefix=topic_prefix)
    assert topic == f"{topic_prefix}/nodes/edge-01.lab_2/telemetry"
    assert parse_node_topic(topic, prefix=topic_prefix) == ("edge-01.lab_2", TopicKind.TELEMETRY)
    with pytest.raises(TopicError):
        parse_node_topic(topic)  # the default prefix does not match
    assert NodeTopic.parse(topic, topic_prefix) == NodeTopic(
        "edge-01.lab_2", TopicKind.TELEMETRY, topic_prefix
    )
    assert nodes_filter("status", prefix=topic_prefix) == f"{topic_prefix}/nodes/+/status"
    assert DEFAULT_PREFIX == "edgeward/v1"


@pytest.mark.parametrize("node_id", ["", "A", "-a", "_a", ".a", "a/b", "a+", "a#", "a b", "n" * 64, "é"])
def test_invalid_node_ids_are_rejected(node_id: str) -> None:
    with pytest.raises(TopicError):
        node_topic(node_id, TopicKind.STATUS)


@pytest.mark.parametrize("prefix", ["", "$SYS", "a/+/b", "a/#", "a//b", "/a", "a/", "a\x00"])
def test_invalid_prefixes_are_rejected(prefix: str) -> None:
    with pytest.raises(TopicError):
        node_topic("n1", TopicKind.STATUS, prefix=prefix)


def test_unknown_kind_is_rejected() -> None:
    with pytest.raises(TopicError):
        node_topic("n1", "reboot")
    with pytest.raises(TopicError):
        nodes_filter("reboot")


# ---- value objects --------------------------------------------------------------------------------


def test_broker_url_parses_and_defaults_ports() -> None:
    assert BrokerURL.parse("mqtt://broker.local") == BrokerURL(host="broker.local", port=1883)
    tls = BrokerURL.parse("mqtts://broker.local", ca_file=Path("ca.pem"))
    assert (tls.port, tls.tls, tls.ca_file, tls.scheme) == (8883, True, "ca.pem", "mqtts")
    assert str(BrokerURL.parse("mqtt://127.0.0.1:1999/")) == "mqtt://127.0.0.1:1999"
    assert str(BrokerURL.parse("mqtts://[::1]:8884")) == "mqtts://[::1]:8884"


def test_broker_url_keeps_the_password_out_of_repr_and_str() -> None:
    secret = uuid.uuid4().hex
    url = BrokerURL.parse("mqtt://h:1884", username="node", password=secret)
    assert secret not in repr(url)
    assert secret not in str(url)
    assert url.password == secret


@pytest.mark.parametrize(
    ("url", "fields", "complaint"),
    [
        ("http://h:1883", {}, "scheme"),
        ("h:1883", {}, "scheme"),
        ("mqtt://", {}, "missing host"),
        ("mqtt://:1883", {}, "missing host"),
        ("mqtt://h:0", {}, "invalid broker port"),
        ("mqtt://h:70000", {}, "out of range"),
        ("mqtt://h:abc", {}, "Port could not be cast"),
        ("mqtt://user:pw@h:1883", {}, "not in the URL"),
        ("mqtt://h:1883/path", {}, "no path"),
        ("mqtt://h:1883?x=1", {}, "no path, query"),
        ("mqtt://h:1883", {"ca_file": "ca.pem"}, "only meaningful for mqtts"),
        ("mqtts://h", {"cert_file": "c.pem"}, "go together"),
        ("mqtt://h", {"password": "pw"}, "needs a username"),
    ],
)
def test_broker_url_rejects_bad_input(url: str, fields: dict[str, str], complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        BrokerURL.parse(url, **fields)


def test_will_validates_itself() -> None:
    will = Will("edgeward/v1/nodes/n1/status", b"offline")
    assert (will.qos, will.retain) == (1, True)
    with pytest.raises(ValueError, match="invalid will topic"):
        Will("edgeward/v1/nodes/+/status", b"offline")
    with pytest.raises(ValueError, match="qos must be 0 or 1"):
        Will("t", b"x", qos=2)
    with pytest.raises(TypeError):
        Will("t", "offline")  # type: ignore[arg-type]


# ---- sessions against both brokers -----------------------------------------------------------------


@pytest.mark.broker
@pytest.mark.parametrize("qos", [0, 1])
async def test_publish_subscribe_round_trip(mqtt_url: BrokerURL, topic_prefix: str, qos: int) -> None:
    topic = node_topic("n1", TopicKind.TELEMETRY, topic_prefix)
    async with MqttSession(mqtt_url, client_id("sub")) as sub, MqttSession(mqtt_url, client_id("pub")) as pub:
        await sub.subscribe(nodes_filter(TopicKind.TELEMETRY, topic_prefix), qos=qos)
        await pub.publish(topic, b"\x00\x01payload", qos=qos)
        message = await receive(sub)
        assert message == Message(topic=topic, payload=b"\x00\x01payload", qos=qos, retain=False)
        assert parse_node_topic(message.topic, topic_prefix) == ("n1", TopicKind.TELEMETRY)
        assert pub.stats.published == 1
        assert sub.stats.received == 1
        assert pub.connected
        assert sub.connected


@pytest.mark.broker
async def test_retained_message_reaches_a_late_subscriber(mqtt_url: BrokerURL, topic_prefix: str) -> None:
    topic = node_topic("n1", TopicKind.HELLO, topic_prefix)
    async with MqttSession(mqtt_url, client_id("pub")) as pub:
        await pub.publish(topic, b"inventory", qos=1, retain=True)
    async with MqttSession(mqtt_url, client_id("late")) as late:
        await late.subscribe(topic)
        message = await receive(late)
        assert (message.topic, message.payload, message.retain) == (topic, b"inventory", True)
        async with MqttSession(mqtt_url, client_id("clear")) as pub:
            await pub.publish(topic, b"", qos=1, retain=True)  # empty retained payload clears it


_DYING_NODE = textwrap.dedent(
    """
    import asyncio, sys
    from edgeward.mqtt import MqttSession, Will

    async def main():
        url, client_id, status = sys.argv[1:4]
        will = Will(status, b"offline", qos=1, retain=True)
        async with MqttSession(url, client_id, will=will) as session:
            await session.publish(status, b"online", qos=1, retain=True)
            print("ready", flush=True)
            await asyncio.sleep(60)

    asyncio.run(main())
    """
)


async def _node_process(script: str, url: BrokerURL, status: str) -> asyncio.subprocess.Process:
    """``script`` (a node's MQTT session) in a process of its own, once it printed ``ready``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [EDGEWARD_IMPORT_ROOT, env.get("PYTHONPATH")]))
    node = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, str(url), client_id("node"), status,
        stdout=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    try:
        assert await asyncio.wait_for(node.stdout.readline(), 20) == b"ready\n"  # type: ignore[union-attr]
    except BaseException:
        node.kill()
        await node.wait()
        raise
    return node


@pytest.mark.broker
async def test_last_will_is_published_and_retained_when_a_node_dies(
    mqtt_url: BrokerURL, topic_prefix: str
) -> None:
    status = node_topic("n1", TopicKind.STATUS, topic_prefix)
    async with MqttSession(mqtt_url, client_id("watcher")) as watcher:
        await watcher.subscribe(status)
        node = await _node_process(_DYING_NODE, mqtt_url, status)
        try:
            assert (await receive(watcher)).payload == b"online"
            node.send_signal(signal.SIGKILL)  # no DISCONNECT: the broker must fire the will
            await node.wait()
        finally:
            if node.returncode is None:
                node.kill()
                await node.wait()
        will = await receive(watcher)
        assert (will.topic, will.payload) == (status, b"offline")
    async with MqttSession(mqtt_url, client_id("late")) as late:
        await late.subscribe(status)
        retained = await receive(late)
        assert (retained.payload, retained.retain) == (b"offline", True)


_RECONNECTING_NODE = textwrap.dedent(
    """
    import asyncio, itertools, socket, sys
    from edgeward.mqtt import MqttSession, Will

    async def main():
        url, client_id, status = sys.argv[1:4]
        epochs = itertools.count(1)
        will = lambda: Will(status, b"offline-%d" % next(epochs), qos=1, retain=True)
        async with MqttSession(url, client_id, will=will, reconnect_delay=(0.05, 0.2)) as session:
            await session.publish(status, b"online-1", qos=1, retain=True)
            session._client.socket().shutdown(socket.SHUT_RDWR)  # the link drops: no DISCONNECT
            while session.stats.reconnects < 1:
                await asyncio.sleep(0.05)
            await session.publish(status, b"online-2", qos=1, retain=True)
            print("ready", flush=True)
            await asyncio.sleep(60)

    asyncio.run(main())
    """
)


@pytest.mark.broker
async def test_a_will_factory_names_each_connection(mqtt_url: BrokerURL, topic_prefix: str) -> None:
    """The will is asked anew at every reconnect, so each connection's will can say which
    connection it closes (the node agent puts its epoch there)."""
    status = node_topic("n1", TopicKind.STATUS, topic_prefix)
    async with MqttSession(mqtt_url, client_id("watcher")) as watcher:
        await watcher.subscribe(status, qos=1)
        node = await _node_process(_RECONNECTING_NODE, mqtt_url, status)
        try:
            seen = [(await receive(watcher)).payload for _ in range(3)]
            node.send_signal(signal.SIGKILL)
            await node.wait()
        finally:
            if node.returncode is None:
                node.kill()
                await node.wait()
        seen.append((await receive(watcher)).payload)
    assert seen == [b"online-1", b"offline-1", b"online-2", b"offline-2"]


@pytest.mark.broker
async def test_clean_close_does_not_fire_the_will(mqtt_url: BrokerURL, topic_prefix: str) -> None:
    status = node_topic("n1", TopicKind.STATUS, topic_prefix)
    async with MqttSession(mqtt_url, client_id("watcher")) as watcher:
        await watcher.subscribe(status)
        async with MqttSession(mqtt_url, client_id("node"), will=Will(status, b"offline")):
            pass
        assert await nothing_received(watcher)


@pytest.mark.broker
async def test_oversized_messages_are_dropped_and_counted(mqtt_url: BrokerURL, topic_prefix: str) -> None:
    topic = node_topic("n1", TopicKind.EVIDENCE, topic_prefix)
    async with (
        MqttSession(mqtt_url, client_id("sub"), max_payload=1024) as sub,
        MqttSession(mqtt_url, client_id("pub")) as pub,
    ):
        await sub.subscribe(topic)
        await pub.publish(topic, b"x" * 1025, qos=1)
        await pub.publish(topic, b"x" * 1024, qos=1)
        assert (await receive(sub)).payload == b"x" * 1024
        assert sub.stats.dropped_oversize == 1
        assert sub.stats.received == 1


@pytest.mark.broker
async def test_a_slow_consumer_sheds_qos0_messages_and_counts_them(
    mqtt_url: BrokerURL, topic_prefix: str
) -> None:
    topic = node_topic("n1", TopicKind.TELEMETRY, topic_prefix)
    async with (
        MqttSession(mqtt_url, client_id("sub"), max_queued=3) as sub,
        MqttSession(mqtt_url, client_id("pub")) as pub,
    ):
        await sub.subscribe(topic, qos=0)
        for i in range(8):
            await pub.publish(topic, str(i).encode(), qos=0)
        await pub.publish(topic, b"end", qos=0)
        await wait_until(lambda: sub.stats.received + sub.stats.dropped_overflow == 9, within=5)
        assert sub.stats.received == 3
        assert sub.stats.dropped_overflow == 6
        assert [(await receive(sub)).payload for _ in range(3)] == [b"0", b"1", b"2"]


@pytest.mark.broker
async def test_a_slow_consumer_never_loses_qos1_messages(mqtt_url: BrokerURL, topic_prefix: str) -> None:
    """Past max_queued the session stops reading its socket (backpressure) instead of dropping."""
    topic = node_topic("n1", TopicKind.EVENTS, topic_prefix)
    count = 40
    async with (
        MqttSession(mqtt_url, client_id("sub"), max_queued=4) as sub,
        MqttSession(mqtt_url, client_id("pub")) as pub,
    ):
        await sub.subscribe(topic, qos=1)
        sent = asyncio.gather(*(pub.publish(topic, str(i).encode(), qos=1) for i in range(count)))
        await wait_until(lambda: sub.stats.paused >= 1, within=10)
        assert sub.queued <= 5  # one over the bound at most: the QoS 1 message that paused reading
        got = [(await receive(sub)).payload for _ in range(count)]
        await sent
        assert got == [str(i).encode() for i in range(count)]
        assert sub.stats.dropped_overflow == 0
        assert sub.stats.received == count


@pytest.mark.broker
async def test_a_publish_waits_for_its_puback_while_the_session_holds_its_socket_back(
    mqtt_url: BrokerURL, topic_prefix: str
) -> None:
    """With its inbox full the session stops reading its socket, and the PUBACK of its own QoS 1
    publish waits behind what it has not read: the publish waits past ``timeout`` for it (the broker
    is there; the hold is ours) and completes once the inbox is taken."""
    inbound = node_topic("n1", TopicKind.EVENTS, topic_prefix)
    outbound = node_topic("n2", TopicKind.EVENTS, topic_prefix)
    count = 40
    async with (
        MqttSession(mqtt_url, client_id("sub"), max_queued=4) as sub,
        MqttSession(mqtt_url, client_id("pub")) as pub,
    ):
        sub._timeout = 0.5  # after connecting: a short CONNACK deadline would depend on the machine
        await sub.subscribe(inbound, qos=1)
        sent = asyncio.gather(*(pub.publish(inbound, str(i).encode(), qos=1) for i in range(count)))
        await wait_until(lambda: sub.stats.paused >= 1 and not sub._reading, within=10)
        mine = asyncio.create_task(sub.publish(outbound, b"command", qos=1))
        await asyncio.sleep(1.5)  # three timeouts: without the hold taken into account, it had failed
        assert not mine.done()
        got = [(await receive(sub)).payload for _ in range(count)]
        await mine  # its PUBACK was read once the inbox was taken
        await sent
        assert got == [str(i).encode() for i in range(count)]


@pytest.mark.broker
async def test_a_burst_is_read_in_order_whatever_the_read_batch(
    mqtt_url: BrokerURL, topic_prefix: str
) -> None:
    """``read_batch`` packets per turn of the loop (one, or the orchestrator's thousands): what
    arrives in one burst is read to the end, in order (the reads chain from turn to turn)."""
    topic = node_topic("n1", TopicKind.EVENTS, topic_prefix)
    count = 50
    with pytest.raises(ValueError, match="read_batch"):
        MqttSession(mqtt_url, client_id("bad"), read_batch=0)
    for batch in (1, 2048):
        async with (
            MqttSession(mqtt_url, client_id("sub"), read_batch=batch) as sub,
            MqttSession(mqtt_url, client_id("pub")) as pub,
        ):
            await sub.subscribe(topic, qos=1)
            await asyncio.gather(*(pub.publish(topic, str(i).encode(), qos=1) for i in range(count)))
            got = [(await receive(sub)).payload for _ in range(count)]
            assert got == [str(i).encode() for i in range(count)], batch


@pytest.mark.broker
async def test_qos1_messages_are_taken_before_waiting_qos0_ones(
    mqtt_url: BrokerURL, topic_prefix: str
) -> None:
    """Control traffic (QoS 1) is not queued behind telemetry (QoS 0); each keeps its own order."""
    telemetry = node_topic("n1", TopicKind.TELEMETRY, topic_prefix)
    status = node_topic("n1", TopicKind.STATUS, topic_prefix)
    async with (
        MqttSession(mqtt_url, client_id("sub")) as sub,
        MqttSession(mqtt_url, client_id("pub")) as pub,
    ):
        await sub.subscribe(telemetry, qos=1)
        await sub.subscribe(status, qos=1)
        for i in range(3):
            await pub.publish(telemetry, f"t{i}".encode(), qos=0)
        for i in range(3):
            await pub.publish(status, f"s{i}".encode(), qos=1)
        await wait_until(lambda: sub.queued == 6, within=10)
        got = [(m.qos, m.payload) for m in [*await sub.next_batch(4), *await sub.next_batch(10)]]
        # amqtt 0.12.1 delivers at the subscription's QoS 1 what was published at QoS 0: then
        # everything is QoS 1, in arrival order.
        assert got == sorted(got, key=lambda m: -m[0])  # QoS 1 first
        assert [p for _, p in got if p[:1] == b"s"] == [b"s0", b"s1", b"s2"]
        assert [p for _, p in got if p[:1] == b"t"] == [b"t0", b"t1", b"t2"]
        if {q for q, _ in got} == {0, 1}:  # Mosquitto: the telemetry waited behind the statuses
            assert [p for _, p in got] == [b"s0", b"s1", b"s2", b"t0", b"t1", b"t2"]


@pytest.mark.broker
async def test_local_errors_are_typed(mqtt_url: BrokerURL) -> None:
    async with MqttSession(mqtt_url, client_id("s")) as session:
        with pytest.raises(MqttPublishError):
            await session.publish("a/#", b"x")
        with pytest.raises(MqttSubscribeError):
            await session.subscribe("a/#/b")
        with pytest.raises(ValueError, match="qos must be 0 or 1"):
            await session.publish("a", b"x", qos=2)
        with pytest.raises(TypeError):
            await session.publish("a", "text")  # type: ignore[arg-type]
    with pytest.raises(MqttError, match="closed"):
        await session.publish("a", b"x")
    with pytest.raises(MqttError, match="once"):
        await session.connect()


@pytest.mark.broker
async def test_close_ends_iteration_and_leaves_no_thread(mqtt_url: BrokerURL, topic_prefix: str) -> None:
    topic = f"{topic_prefix}/iter"
    session = MqttSession(mqtt_url, client_id("iter"))
    threads = set(threading.enumerate())
    async with session:
        assert set(threading.enumerate()) == threads  # no network thread: the event loop drives it
        await session.subscribe(topic)
        await session.publish(topic, b"last", qos=1)
        await wait_until(lambda: session.stats.received == 1, within=5)
    assert [m.payload async for m in session.messages()] == [b"last"]
    assert set(threading.enumerate()) == threads


# ---- connection failures --------------------------------------------------------------------------


async def test_connect_refused_raises_connect_error() -> None:
    url = BrokerURL(host=LOOPBACK, port=listen_port())  # nobody listens; never our own source port
    with pytest.raises(MqttConnectError) as info:
        async with MqttSession(url, client_id("nobody")):
            pass
    assert info.value.url == str(url)
    assert isinstance(info.value.__cause__, ConnectionRefusedError)


async def test_connect_times_out_when_the_broker_never_answers() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # swallow CONNECT, never send CONNACK; return when the client hangs up
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(silent, LOOPBACK, 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(MqttConnectError, match="no CONNACK") as info:
            async with MqttSession(BrokerURL(host=LOOPBACK, port=port), client_id("c"), timeout=0.5):
                pass
        assert isinstance(info.value.__cause__, TimeoutError)
    finally:
        server.close()
        await server.wait_closed()
        await asyncio.sleep(0.05)  # let the handler see EOF and finish


# ---- reconnect ------------------------------------------------------------------------------------


@pytest.mark.broker
async def test_session_resubscribes_after_the_broker_restarts(
    mosquitto_factory: Callable[..., Any], topic_prefix: str
) -> None:
    broker = mosquitto_factory()
    topic = node_topic("n1", TopicKind.CMD, topic_prefix)
    async with MqttSession(broker.url, client_id("node")) as node:
        await node.subscribe(topic, qos=1)
        broker.restart()
        await wait_until(lambda: node.stats.reconnects == 1, within=15)
        async with MqttSession(broker.url, client_id("orch")) as orchestrator:
            # The re-issued SUBSCRIBE and this PUBLISH travel on different connections.
            for _ in range(50):
                await orchestrator.publish(topic, b"drain", qos=1)
                if not await nothing_received(node, within=0.1):
                    break
            else:
                pytest.fail("no message after the broker restart")
        assert node.connected


# ---- TLS ------------------------------------------------------------------------------------------


def _write_pki(directory: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files."""
    now = datetime.now(UTC)

    def name(common_name: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])

    def certificate(
        common_name: str,
        key: ec.EllipticCurvePrivateKey,
        issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey],
    ) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(name(common_name))
            .issuer_name(issuer[0])
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(hours=1))
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer[1].public_key()), critical=False
            )
        )

    def leaf(common_name: str, ca: tuple[x509.Name, ec.EllipticCurvePrivateKey]) -> x509.CertificateBuilder:
        key = keys[common_name] = ec.generate_private_key(ec.SECP256R1())
        return certificate(common_name, key, ca).add_extension(
            x509.BasicConstraints(ca=False, path_length=None), critical=True
        )

    keys: dict[str, ec.EllipticCurvePrivateKey] = {}
    ca_key = keys["ca"] = ec.generate_private_key(ec.SECP256R1())
    ca = (name("edgeward test CA"), ca_key)
    ca_usage = x509.KeyUsage(
        digital_signature=True,
        key_cert_sign=True,
        crl_sign=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        encipher_only=False,
        decipher_only=False,
    )
    loopback_san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(LOOPBACK))])
    certs = {
        "ca": certificate("edgeward test CA", ca_key, ca)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(ca_usage, critical=True)
        .sign(ca_key, hashes.SHA256()),
        "server": leaf("server", ca)
        .add_extension(loopback_san, critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256()),
        "client": leaf("client", ca)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256()),
    }
    paths: dict[str, Path] = {}
    for role, cert in certs.items():
        paths[f"{role}_cert"] = directory / f"{role}.crt"
        paths[f"{role}_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        paths[f"{role}_key"] = directory / f"{role}.key"
        paths[f"{role}_key"].write_bytes(
            keys[role].private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    return paths


@pytest.mark.broker
async def test_mutual_tls_with_mosquitto(
    mosquitto_factory: Callable[..., Any], tmp_path: Path, topic_prefix: str
) -> None:
    pki = _write_pki(tmp_path)
    broker = mosquitto_factory(
        f"cafile {pki['ca_cert']}\ncertfile {pki['server_cert']}\nkeyfile {pki['server_key']}\n"
        "require_certificate true\n"
    )
    url = BrokerURL.parse(
        f"mqtts://{LOOPBACK}:{broker.port}",
        ca_file=pki["ca_cert"],
        cert_file=pki["client_cert"],
        key_file=pki["client_key"],
    )
    topic = node_topic("n1", TopicKind.EVIDENCE, topic_prefix)
    async with MqttSession(url, client_id("tls")) as session:
        await session.subscribe(topic)
        await session.publish(topic, b"quote", qos=1)
        assert (await receive(session)).payload == b"quote"

    without_client_cert = BrokerURL.parse(f"mqtts://{LOOPBACK}:{broker.port}", ca_file=pki["ca_cert"])
    with pytest.raises(MqttConnectError):
        async with MqttSession(without_client_cert, client_id("anon")):
            pass

    (tmp_path / "other").mkdir()
    other_ca = _write_pki(tmp_path / "other")
    untrusting = BrokerURL.parse(
        f"mqtts://{LOOPBACK}:{broker.port}",
        ca_file=other_ca["ca_cert"],
        cert_file=pki["client_cert"],
        key_file=pki["client_key"],
    )
    with pytest.raises(MqttConnectError) as info:
        async with MqttSession(untrusting, client_id("mitm")):
            pass
    assert isinstance(info.value.__cause__, ssl.SSLCertVerificationError)


@pytest.mark.broker
async def test_a_publish_without_a_puback_fails_after_its_timeout_the_others_go_on(
    mosquitto_factory: Callable[..., Any],
) -> None:
    """A broker that stops answering (frozen): each QoS 1 publish fails with "no PUBACK" after its
    ``timeout`` (the session's one sweep timer, up to a sweep late), in the order they were sent, and
    a publish acknowledged before the freeze is unaffected. The session is reading its socket, so
    no hold applies."""
    broker = mosquitto_factory()
    topic = node_topic("n1", TopicKind.EVENTS, "edgeward")
    async with MqttSession(broker.url, client_id("pub")) as pub:
        await pub.publish(topic, b"before", qos=1)
        pub._timeout = 0.5  # after connecting: a short CONNACK deadline would depend on the machine
        os.kill(broker.proc.pid, signal.SIGSTOP)
        try:
            loop = asyncio.get_running_loop()
            started = loop.time()
            failed_at: list[float] = []

            async def publish(i: int) -> None:
                with pytest.raises(MqttPublishError, match=r"no PUBACK within 0\.5 s"):
                    await pub.publish(topic, str(i).encode(), qos=1)
                failed_at.append(loop.time() - started)

            await asyncio.gather(*(publish(i) for i in range(5)))
        finally:
            os.kill(broker.proc.pid, signal.SIGCONT)
        assert len(failed_at) == 5
        assert min(failed_at) >= 0.5  # never before its timeout
        assert not pub._puback_waiters and not pub._puback_deadlines
        assert pub.stats.published_qos1 == 1


@pytest.mark.broker
async def test_no_condition_per_message_yet_a_thread_can_still_wait_on_one(
    mqtt_url: BrokerURL, topic_prefix: str, monkeypatch
) -> None:
    """paho makes a threading.Condition per message; the session's message info makes one only when a
    thread waits (wait_for_publish). A QoS 1 round trip on the loop makes none; a threaded paho
    client in the same process still waits for its PUBACK."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    made = 0
    real = threading.Condition

    def counted(*args: Any) -> threading.Condition:
        nonlocal made
        made += 1
        return real(*args)

    monkeypatch.setattr(threading, "Condition", counted)
    topic = node_topic("n1", TopicKind.STATUS, topic_prefix)
    async with MqttSession(mqtt_url, client_id("sub")) as sub, MqttSession(mqtt_url, client_id("pub")) as pub:
        await sub.subscribe(nodes_filter(TopicKind.STATUS, topic_prefix), qos=1)
        made = 0
        for _ in range(20):
            await pub.publish(topic, b"status", qos=1)  # returns once its PUBACK came
        for _ in range(20):
            await receive(sub)
        assert made == 0

    threaded = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id("thread"))
    threaded.connect(mqtt_url.host, mqtt_url.port)
    threaded.loop_start()
    try:
        info = threaded.publish(topic, b"status", qos=1)
        waiter = threading.Thread(target=info.wait_for_publish, args=(10,))
        waiter.start()
        while waiter.is_alive():
            await asyncio.sleep(0.01)
        assert info.is_published()
        assert info._cond is not None  # made by the waiter
    finally:
        threaded.disconnect()
        threaded.loop_stop()
