"""MQTT read path: the session's client (edgeward/mqtt/session.py) against paho's own, per packet.

Every message an orchestrator or agent receives goes through it: the orchestrator of a 10,000-node
fleet reads thousands of heartbeats, telemetry samples and PUBACKs a second, and an agent reads a
PUBACK for every QoS 1 message it sends. The bench writes a stream of MQTT 3.1.1 packets into one
end of a socket pair (topics and payload sizes as a fleet's: node topics, 100-600 byte payloads) and
times the client reading them from the other end, packet by packet as the session does, its
callbacks doing nothing. Three streams: QoS 0 PUBLISH (telemetry), QoS 1 PUBLISH (statuses; the
client writes a PUBACK back), PUBACK (the broker's acknowledgements of our QoS 1 publishes).
Both clients alternate within each round; the figures are medians over the rounds.

    python bench/mqtt_read.py --packets 20000 --rounds 7
"""

from __future__ import annotations

import argparse
import random
import socket
import statistics
import struct
import sys
import time
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import command, machine, write_section

from edgeward.mqtt.session import _Client

KINDS = ("QoS 0 PUBLISH", "QoS 1 PUBLISH", "PUBACK")


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def stream(kind: str, count: int, seed: int) -> bytes:
    rnd = random.Random(seed)
    if kind == "PUBACK":
        return b"".join(bytes([0x40, 2]) + struct.pack("!H", mid) for mid in range(1, count + 1))
    qos = 1 if kind == "QoS 1 PUBLISH" else 0
    packets = []
    for i in range(count):
        topic = b"edgeward/nodes/hollow-%05d/%s" % (rnd.randrange(10_000), b"status" if qos else b"telemetry")
        body = struct.pack("!H", len(topic)) + topic
        body += struct.pack("!H", i % 65535 + 1) if qos else b""
        body += rnd.randbytes(rnd.randrange(100, 600))
        packets.append(bytes([0x30 | qos << 1]) + _varint(len(body)) + body)
    return b"".join(packets)


def read_time(kind_of_client: type[paho.Client], kind: str, data: bytes, count: int) -> float:
    """Seconds per packet to read ``data`` (``count`` packets)."""
    client = kind_of_client(
        CallbackAPIVersion.VERSION2, client_id="bench", protocol=MQTTProtocolVersion.MQTTv311
    )
    client.on_message = lambda *_: None
    client.on_publish = lambda *_: None
    ours, theirs = socket.socketpair()
    for s in (ours, theirs):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
    ours.setblocking(False)
    client._sock = ours
    client._state = paho._ConnectionState.MQTT_CS_CONNECTED
    client._max_inflight_messages = 0
    if kind == "PUBACK":
        for mid in range(1, count + 1):
            sent = paho.MQTTMessage(mid=mid, topic=b"out")
            sent.qos = 1
            client._out_messages[mid] = sent
        client._inflight_messages = count
    sent_bytes, read = 0, 0
    start = time.perf_counter()
    while read < count:
        if sent_bytes < len(data):
            sent_bytes += theirs.send(data[sent_bytes : sent_bytes + (1 << 20)])
        client._packet_read()
        read += 1
        if not read % 1000:
            theirs.setblocking(False)
            try:
                while theirs.recv(1 << 20):  # the PUBACKs written back
                    pass
            except BlockingIOError:
                pass
            theirs.setblocking(True)
    elapsed = time.perf_counter() - start
    ours.close()
    theirs.close()
    return elapsed / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packets", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    times: dict[tuple[str, str], list[float]] = {}
    for r in range(args.rounds):
        for kind in KINDS:
            data = stream(kind, args.packets, seed=r)
            order = [("paho", paho.Client), ("session", _Client)]
            for name, cls in order if r % 2 else order[::-1]:  # alternate who goes first
                times.setdefault((kind, name), []).append(read_time(cls, kind, data, args.packets))
    rows = []
    for kind in KINDS:
        p = statistics.median(times[(kind, "paho")]) * 1e6
        s = statistics.median(times[(kind, "session")]) * 1e6
        ratios = [a / b for a, b in zip(times[(kind, "paho")], times[(kind, "session")], strict=True)]
        rows.append(f"| {kind} | {p:.1f} us | {s:.1f} us | x{statistics.median(ratios):.2f} |")
        print(rows[-1], flush=True)
    body = f"""## MQTT read path: the session's client against paho's, per packet

`{command()}` ({machine()})

{args.packets:,} packets a stream (MQTT 3.1.1, node topics, 100-600 byte payloads) through a socket
pair, read packet by packet; medians over {args.rounds} rounds, both clients in each round (who goes
first alternates). "Faster" is the median of the per-round ratios.

| stream | paho 2.x | session's client | faster |
|---|---|---|---|
{chr(10).join(rows)}

The session cuts a packet that is whole in its read buffer out in one step and parses 3.1.1
PUBLISH and PUBACK with slices (tests/edgeward/test_mqtt_read.py checks it against paho on
arbitrary streams cut into arbitrary reads); paho reads each packet's first byte, length bytes and
body one call each, builds two struct formats from every PUBLISH's lengths, and makes a reason code
and a property set for every PUBACK. A QoS 1 PUBLISH includes writing its PUBACK back.
"""
    print(body)
    if not args.no_write:
        write_section("mqtt-read", body)


if __name__ == "__main__":
    main()
