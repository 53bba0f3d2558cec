"""The per-node topic ACL over mutual TLS, against Mosquitto (configured by `edgeward pki
mosquitto-conf`) and against the embedded broker: the same tests, the same expectations."""

from __future__ import annotations

import asyncio
import ssl
import time

import pytest
from security_support import LOOPBACK, SecureBroker, collect_until, session

from edgeward.mqtt.session import BrokerURL, MqttConnectError, MqttSession, MqttSubscribeError
from edgeward.security.pki import FleetCA, IssuedFiles, parse_subject

pytestmark = pytest.mark.broker


async def test_a_node_publishes_only_under_its_own_topics(secure_broker: SecureBroker, topic_prefix: str):
    nodes = f"{topic_prefix}/nodes"
    async with (
        session(secure_broker, "orchestrator:main") as orch,
        session(secure_broker, "node-1") as node1,
    ):
        await orch.subscribe(f"{nodes}/+/+", qos=1)
        await node1.publish(f"{nodes}/node-1/hello", b"mine", qos=1)
        await node1.publish(f"{nodes}/node-2/hello", b"forged", qos=1)  # another node's subtree
        await node1.publish(f"{nodes}/node-2/status", b"forged", qos=1)
        await node1.publish(f"{nodes}/node-1/cmd", b"self-command", qos=1)  # cmd is the orchestrator's
        await node1.publish(f"{topic_prefix}/events/deployment.applied", b"forged", qos=1)
        # Published last on the same connection: everything before it has been routed by then.
        await node1.publish(f"{nodes}/node-1/telemetry", b"sentinel", qos=1)
        got = await collect_until(orch, f"{nodes}/node-1/telemetry")
    assert [(m.topic, m.payload) for m in got] == [
        (f"{nodes}/node-1/hello", b"mine"),
        (f"{nodes}/node-1/telemetry", b"sentinel"),
    ]


async def test_a_node_reads_only_its_own_cmd(secure_broker: SecureBroker, topic_prefix: str):
    nodes = f"{topic_prefix}/nodes"
    async with (
        session(secure_broker, "orchestrator:main") as orch,
        session(secure_broker, "node-1") as node1,
        session(secure_broker, "node-2") as node2,
    ):
        await node1.subscribe(f"{nodes}/node-1/cmd")
        await node2.subscribe(f"{nodes}/node-2/cmd")
        refused = 0
        for foreign in (f"{nodes}/node-2/cmd", f"{nodes}/+/cmd", f"{nodes}/#", f"{nodes}/node-2/telemetry"):
            try:
                await node1.subscribe(foreign)
            except MqttSubscribeError:
                refused += 1
        await orch.publish(f"{nodes}/node-2/cmd", b"for node-2", qos=1)
        await orch.publish(f"{nodes}/node-1/cmd", b"for node-1", qos=1)
        await node2.publish(f"{nodes}/node-2/telemetry", b"node-2 data", qos=1)
        await orch.publish(f"{nodes}/node-1/cmd", b"sentinel", qos=1)
        node1_got: list[bytes] = []
        async with asyncio.timeout(5):
            async for message in node1.messages():
                node1_got.append(message.payload)
                if message.payload == b"sentinel":
                    break
        node2_got = await collect_until(node2, f"{nodes}/node-2/cmd")
    assert node1_got == [b"for node-1", b"sentinel"]
    assert [m.payload for m in node2_got] == [b"for node-2"]  # the positive control
    # The embedded broker answers a refused filter with SUBACK 0x80; Mosquitto 2.0 grants it and
    # then delivers nothing through it.
    assert refused == (4 if secure_broker.kind == "embedded" else 0)


async def test_unauthenticated_clients_are_refused(secure_broker: SecureBroker, tmp_path):
    other_ca = FleetCA.init(tmp_path / "other-pki")
    stranger = other_ca.issue(parse_subject("node", "node-1"))
    attempts = {
        "no client certificate": secure_broker.url(None),
        "certificate of another CA": BrokerURL(
            host=LOOPBACK,
            port=secure_broker.port,
            tls=True,
            ca_file=str(secure_broker.ca.ca_file),
            cert_file=str(stranger.cert_file),
            key_file=str(stranger.key_file),
        ),
        "plaintext": BrokerURL(host=LOOPBACK, port=secure_broker.port),
    }
    for what, url in attempts.items():
        with pytest.raises(MqttConnectError):
            async with MqttSession(url, f"intruder-{len(what)}", timeout=3.0):
                pytest.fail(f"{what}: connected")
    # The positive control: the fleet's own node gets in on the same port.
    async with session(secure_broker, "node-1"):
        pass


async def test_a_revoked_node_is_refused(secure_broker: SecureBroker):
    files = secure_broker.ca.files("node-1")
    async with MqttSession(secure_broker.url(files), "node-1"):
        pass
    secure_broker.ca.revoke("node-1")
    secure_broker.reload()
    # The broker takes up the new CRL when it gets to it (a busy machine delays that): try until
    # the revoked certificate is refused, within a bound.
    deadline = time.monotonic() + 15
    while True:
        try:
            async with MqttSession(secure_broker.url(files), "node-1", timeout=3.0):
                pass
        except MqttConnectError:
            break
        assert time.monotonic() < deadline, "the revoked certificate still connects after 15 s"
        await asyncio.sleep(0.2)
    async with session(secure_broker, "node-2"):  # the others are unaffected
        pass


async def test_a_team_certificate_has_no_topics(secure_broker: SecureBroker, topic_prefix: str):
    nodes = f"{topic_prefix}/nodes"
    async with (
        session(secure_broker, "orchestrator:main") as orch,
        session(secure_broker, "team:smart-home:ci") as team,
        session(secure_broker, "node-1") as node1,
    ):
        await orch.subscribe(f"{nodes}/+/+", qos=1)
        await team.publish(f"{nodes}/node-1/hello", b"forged", qos=1)
        await node1.publish(f"{nodes}/node-1/hello", b"sentinel", qos=1)
        got = await collect_until(orch, f"{nodes}/node-1/hello")
    assert [m.payload for m in got] == [b"sentinel"]


def _utf8(text: str) -> bytes:
    data = text.encode()
    return len(data).to_bytes(2, "big") + data


async def connect_and_vanish(
    broker: SecureBroker, files: IssuedFiles, client_id: str, will_topic: str, clean: bool = True
) -> int:
    """CONNECT with a retained QoS 1 will, then drop the TCP connection without DISCONNECT (as a
    crashed device would); the CONNACK return code."""
    context = ssl.create_default_context(cafile=str(broker.ca.ca_file))
    context.load_cert_chain(str(files.cert_file), str(files.key_file))
    reader, writer = await asyncio.open_connection(LOOPBACK, broker.port, ssl=context)
    try:
        flags = (0x02 if clean else 0) | 0x04 | 0x08 | 0x20  # clean session, will, will QoS 1, will retain
        body = _utf8("MQTT") + bytes([4, flags]) + (30).to_bytes(2, "big")
        body += _utf8(client_id) + _utf8(will_topic) + _utf8("OFFLINE")
        writer.write(bytes([0x10, len(body)]) + body)
        await writer.drain()
        async with asyncio.timeout(5):
            connack = await reader.read(4)
    finally:
        writer.transport.abort()
    return connack[3] if len(connack) == 4 else -1


async def test_a_will_on_another_nodes_topic_never_reaches_anyone(
    secure_broker: SecureBroker, topic_prefix: str
):
    nodes = f"{topic_prefix}/nodes"
    files = secure_broker.ca.files("node-1")
    async with session(secure_broker, "orchestrator:main") as orch:
        await orch.subscribe(f"{nodes}/+/status", qos=1)
        refused = await connect_and_vanish(secure_broker, files, "node-1-forger", f"{nodes}/node-2/status")
        # The positive control: a will on the node's own status is published when it vanishes.
        assert await connect_and_vanish(secure_broker, files, "node-1", f"{nodes}/node-1/status") == 0
        got = await collect_until(orch, f"{nodes}/node-1/status")
    assert [m.topic for m in got] == [f"{nodes}/node-1/status"]
    # The embedded broker refuses such a CONNECT (not authorized); Mosquitto accepts it and drops the will.
    assert refused == (5 if secure_broker.kind == "embedded" else 0)


async def test_a_team_certificate_cannot_publish_under_a_node_path_named_after_it(
    secure_broker: SecureBroker, topic_prefix: str
):
    """Issue #15, 4: Mosquitto's ``pattern`` lines gave every certificate the subtree named after its
    CN, so a team published a retained hello as node ``team:smart-home:ci``."""
    nodes = f"{topic_prefix}/nodes"
    own_path = f"{nodes}/team:smart-home:ci"
    async with session(secure_broker, "team:smart-home:ci") as team:
        for kind in ("hello", "status", "telemetry", "events", "evidence"):
            await team.publish(f"{own_path}/{kind}", b"forged", qos=1, retain=kind in ("hello", "status"))
    async with (
        session(secure_broker, "orchestrator:main") as orch,
        session(secure_broker, "node-1") as node1,
    ):
        await orch.subscribe(f"{nodes}/+/+", qos=1)  # retained messages arrive first
        await node1.publish(f"{nodes}/node-1/hello", b"sentinel", qos=1)
        got = await collect_until(orch, f"{nodes}/node-1/hello")
    assert [(m.topic, m.payload) for m in got] == [(f"{nodes}/node-1/hello", b"sentinel")]


async def test_a_connection_cannot_take_over_another_identitys_session(
    secure_broker: SecureBroker, topic_prefix: str
):
    """Issue #15, 4: client ids are bound to the certificate. node-1 connecting with node-2's client
    id (clean session) used to end node-2's connection and drop its session."""
    nodes = f"{topic_prefix}/nodes"
    victim_id = "edgeward-node-node-2"
    async with (
        session(secure_broker, "orchestrator:main") as orch,
        session(secure_broker, "node-2", client_id=victim_id) as node2,
    ):
        await node2.subscribe(f"{nodes}/node-2/cmd", qos=1)
        for attempt in range(3):
            async with session(secure_broker, "node-1", client_id=victim_id) as hijacker:
                await hijacker.publish(f"{nodes}/node-1/telemetry", f"hijack {attempt}".encode(), qos=1)
        await orch.publish(f"{nodes}/node-2/cmd", b"for node-2", qos=1)
        got = await collect_until(node2, f"{nodes}/node-2/cmd")
        assert [m.payload for m in got] == [b"for node-2"]
        assert node2.connected and node2.stats.reconnects == 0, "node-2's connection was taken over"


async def test_a_refused_connect_leaves_the_live_session_of_its_identity_alone(
    secure_broker: SecureBroker, topic_prefix: str
):
    """A CONNECT (persistent session) with the certificate of a live connection and a will on a node's
    command topic is refused by the embedded broker; it used to take the live session over first,
    closing its connection and leaving its own will on it, so the will went out: a forged command
    from a team certificate (the same with a revoked certificate of the live identity). Mosquitto
    accepts such a CONNECT from the same identity (a take-over is MQTT's) and drops the will."""
    nodes = f"{topic_prefix}/nodes"
    async with (
        session(secure_broker, "orchestrator:main") as orch,
        session(secure_broker, "node-2") as node2,
        session(secure_broker, "team:smart-home:ci") as team,
    ):
        await node2.subscribe(f"{nodes}/node-2/cmd", qos=1)
        files = secure_broker.ca.files("team:smart-home:ci")
        code = await connect_and_vanish(secure_broker, files, "x", f"{nodes}/node-2/cmd", clean=False)
        await asyncio.sleep(0.5)  # what the vanished connection would bring about, on its way
        await orch.publish(f"{nodes}/node-2/cmd", b"sentinel", qos=1)
        got = await collect_until(node2, f"{nodes}/node-2/cmd")
        assert [m.payload for m in got] == [b"sentinel"]
        if secure_broker.kind == "embedded":
            assert code == 5
            assert team.connected and team.stats.reconnects == 0, "the refused CONNECT took the session over"
