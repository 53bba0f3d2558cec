"""The session's read path (edgeward/mqtt/session.py, ``_Client``) against paho's own, on real sockets.

The session cuts whole packets out of its read buffer and parses MQTT 3.1.1 PUBLISH and PUBACK in
place; paho reads each packet a byte at a time and parses with struct formats. The same byte stream,
cut into arbitrary reads, must come out of both as the same messages, the same acknowledgements
written back and the same publishes completed; and a malformed packet must end both connections."""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, field

import paho.mqtt.client as paho
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion

from edgeward.mqtt.session import _Client

OUT_MIDS = range(1, 41)  # publishes of ours awaiting their PUBACK when the stream starts


def remaining_length(n: int) -> bytes:
    out = b""
    while n >= 128:  # seven bits a byte, the high bit says another follows
        out, n = out + bytes([n % 128 | 0x80]), n // 128
    return out + bytes([n])


def publish(topic: bytes, payload: bytes, qos: int, mid: int, retain: bool, dup: bool) -> bytes:
    body = struct.pack("!H", len(topic)) + topic + (struct.pack("!H", mid) if qos else b"") + payload
    header = 0x30 | (0x08 if dup else 0) | (qos << 1) | (0x01 if retain else 0)
    return bytes([header]) + remaining_length(len(body)) + body


def puback(mid: int) -> bytes:
    return bytes([0x40, 2]) + struct.pack("!H", mid)


@dataclass
class Reader:
    """A client of one kind reading from one end of a socket pair, and what it made of it."""

    client: paho.Client
    ours: socket.socket
    theirs: socket.socket
    messages: list[tuple] = field(default_factory=list)
    completed: list[int] = field(default_factory=list)

    @classmethod
    def of(cls, kind: type[paho.Client]) -> Reader:
        client = kind(CallbackAPIVersion.VERSION2, client_id="reader", protocol=MQTTProtocolVersion.MQTTv311)
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        theirs.settimeout(5)
        reader = cls(client, ours, theirs)
        client.on_message = lambda _c, _u, m: reader.messages.append(
            (m.topic, bytes(m.payload), m.qos, bool(m.retain), bool(m.dup), m.mid)
        )
        client.on_publish = lambda _c, _u, mid, _rc, _props: reader.completed.append(mid)
        client._sock = ours
        client._state = paho._ConnectionState.MQTT_CS_CONNECTED
        client._max_inflight_messages = 0
        for mid in OUT_MIDS:
            sent = paho.MQTTMessage(mid=mid, topic=b"out")
            sent.qos = 1
            client._out_messages[mid] = sent
            client._inflight_messages += 1
        return reader

    def feed(self, chunks: list[bytes]) -> MQTTErrorCode:
        """Send the chunks one by one, reading after each until the socket is drained; the first
        error, else success."""
        for chunk in chunks:
            self.theirs.sendall(chunk)
            while True:
                rc = self.client._packet_read()
                if rc == MQTTErrorCode.MQTT_ERR_AGAIN:  # the socket is drained, a packet may be half read
                    break
                if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    return rc
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def written(self) -> bytes:
        self.theirs.setblocking(False)
        out = b""
        while True:
            try:
                data = self.theirs.recv(1 << 16)
            except BlockingIOError:
                return out
            if not data:
                return out
            out += data

    def close(self) -> None:
        self.ours.close()
        self.theirs.close()


topics = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=40).map(
    lambda t: t.encode()
)
publishes = st.builds(
    publish,
    topics,
    st.one_of(st.binary(max_size=300), st.integers(0, 20_000).map(lambda n: b"p" * n)),
    st.sampled_from([0, 1]),
    st.integers(1, 65535),
    st.booleans(),
    st.booleans(),
)
packets = st.lists(st.one_of(publishes, st.sampled_from(OUT_MIDS).map(puback)), min_size=1, max_size=30)


@settings(max_examples=60, deadline=None)
@given(packets, st.lists(st.integers(1, 4096), min_size=1, max_size=40))
def test_the_session_reads_a_stream_as_paho_does(stream: list[bytes], cuts: list[int]) -> None:
    data = b"".join(stream)
    chunks, at = [], 0
    for n in cuts * (len(data) // max(1, sum(cuts)) + 1):
        if at >= len(data):
            break
        chunks.append(data[at : at + n])
        at += n
    ours, paho_s = Reader.of(_Client), Reader.of(paho.Client)
    try:
        assert ours.feed(chunks) == paho_s.feed(chunks) == MQTTErrorCode.MQTT_ERR_SUCCESS
        assert ours.messages == paho_s.messages and len(ours.messages) == sum(p[0] >> 4 == 3 for p in stream)
        assert ours.completed == paho_s.completed
        assert ours.written() == paho_s.written()  # the PUBACKs of the QoS 1 messages, in order
        assert ours.client.buffered == 0
    finally:
        ours.close()
        paho_s.close()


@pytest.mark.parametrize(
    "packet",
    [
        publish(b"", b"x", 0, 0, False, False),  # MQTT 3.1.1 has no empty topic
        bytes([0x30, 3, 0, 9, ord("t")]),  # a topic longer than the packet
        bytes([0x32, 4, 0, 1, ord("t"), 0]),  # QoS 1 without its whole packet id
        bytes([0x40, 3, 0, 1, 0]),  # a PUBACK of three bytes
        bytes([0x30, 0x80, 0x80, 0x80, 0x80, 0x01]),  # a length of five bytes
    ],
)
def test_a_malformed_packet_ends_the_connection_as_with_paho(packet: bytes) -> None:
    ours, paho_s = Reader.of(_Client), Reader.of(paho.Client)
    try:
        # Behind a well-formed message, in one read: the fast path takes both.
        chunk = publish(b"t", b"ok", 0, 0, False, False) + packet
        assert ours.feed([chunk]) == paho_s.feed([chunk]) == MQTTErrorCode.MQTT_ERR_PROTOCOL
        assert ours.messages == paho_s.messages == [("t", b"ok", 0, False, False, 0)]
    finally:
        ours.close()
        paho_s.close()


def test_a_callback_that_raises_leaves_the_stream_in_step() -> None:
    """The packet is consumed whatever its callback does: the next one is read from its first byte."""
    ours = Reader.of(_Client)
    calls = []

    def broken_on_a(_c, _u, m) -> None:
        calls.append(m.topic)
        if m.topic == "a":
            raise RuntimeError("a broken consumer")

    ours.client.on_message = broken_on_a
    try:
        # The first read fills the buffer (paho's way, for the first packet); the next two are
        # whole in it.
        ours.theirs.sendall(b"".join(publish(t, b"1", 0, 0, False, False) for t in (b"z", b"a", b"b")))
        assert ours.client._packet_read() == MQTTErrorCode.MQTT_ERR_SUCCESS
        with pytest.raises(RuntimeError):
            ours.client._packet_read()
        assert ours.client._packet_read() == MQTTErrorCode.MQTT_ERR_SUCCESS
        assert calls == ["z", "a", "b"]
    finally:
        ours.close()
