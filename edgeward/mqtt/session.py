"""An asyncio-facing MQTT session over paho-mqtt 2.x, driven by the running event loop.

Design: no network thread. paho's socket callbacks (``on_socket_open``/``close``/
``register_write``/``unregister_write``) hand the socket to the event loop, whose reader and writer
callbacks call ``loop_read``/``loop_write``; a timer per session calls ``loop_misc`` (keepalive).
Thousands of sessions therefore share one loop and one thread (``edgeward sim-fleet``), and paho's
callbacks run on the loop, so futures, the inbox and the counters need no locks.

paho reconnects by itself only inside its own ``loop_forever``; here the session does it: after
an unexpected loss it reconnects with jittered exponential backoff (``RECONNECT_DELAY_S``) and
re-issues its subscriptions. The blocking parts of a connect (TCP connect, TLS handshake) run on a
short-lived thread of their own, so a closed session leaves no thread behind.

Backpressure (slow consumer): the inbox holds ``max_queued`` messages. Beyond that a QoS 0 message
is shed and counted (``dropped_overflow``); a QoS 1 message is never dropped: it is queued and the
session stops reading its socket until the application has taken half of the inbox, so the broker
holds the rest (TCP flow control) and the publishers' own QoS 1 flow slows down. The application
takes QoS 1 messages first (control traffic: hellos, statuses, attestation), QoS 0 ones (telemetry)
after them: under overload the control traffic keeps its latency and the telemetry is shed.

Protocol: MQTT 3.1.1 by default, the only level amqtt 0.12.1 accepts; ``protocol=5`` speaks
MQTT v5 (Mosquitto, EMQX), for example for ``$share/`` subscriptions.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import os
import random
import socket
import ssl
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from functools import partial
from types import TracebackType
from typing import Any, Self, TypeVar
from urllib.parse import urlsplit

import paho.mqtt.client as paho
from paho.mqtt.client import MalformedPacket
from paho.mqtt.enums import CallbackAPIVersion, LogLevel, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

log = logging.getLogger(__name__)
_paho_log = logging.getLogger(f"{__name__}.paho")

T = TypeVar("T")

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}
# Default bound on QoS 1 messages paho keeps for (re)sending while the broker is away, and on those
# sent and not yet acknowledged (paho's own default, 20 in flight, is the MQTT spec's example).
MAX_OUTBOUND_QOS1 = 1000
MAX_INFLIGHT_QOS1 = 20
# Reconnect backoff: first and largest delay, seconds; each wait is drawn from [delay/2, delay] so
# that a fleet that lost its broker does not come back in one wave. The largest stays well below
# the orchestrator's default node_timeout_s (15 s), so that after a broker restart every live node
# is back, and heard, before it could be declared lost.
RECONNECT_DELAY_S = (0.5, 8.0)
# Packets one readable event may take from a socket before the loop serves the other sessions.
READ_BATCH = 64
# Bytes one recv takes from a socket into the session's read buffer.
RECV_CHUNK = 64 * 1024
# How often paho's keepalive bookkeeping (PINGREQ, PINGRESP timeout) runs: a quarter of the
# keepalive, at least this often (seconds). A PINGREQ then leaves at most a quarter of the keepalive
# late, well inside the broker's 1.5 keepalives of grace; a process of 2,500 sessions ticking every
# second spent 5 % of its loop on it.
MISC_INTERVAL_S = 1.0
# How long close() waits for the DISCONNECT to leave before it closes the socket itself, seconds.
CLOSE_GRACE_S = 1.0
# How long a QoS 1 publish waits for its PUBACK, at most, while this session holds its socket back
# (inbox full): the PUBACK is behind the messages it has not read. Otherwise ``timeout`` applies.
HELD_PUBACK_S = 120.0
# How often the PUBACK deadlines are checked, at most (a quarter of ``timeout`` if that is shorter):
# a publish that gets no PUBACK fails up to this much after its ``timeout``.
PUBACK_SWEEP_S = 0.25
PROTOCOLS = {4: MQTTProtocolVersion.MQTTv311, 5: MQTTProtocolVersion.MQTTv5}


class MqttError(Exception):
    """Base of every error raised by `edgeward.mqtt`."""


class _NoPuback(Exception):
    """A QoS 1 publish's PUBACK did not come in time (the sweep's verdict; publish() raises)."""


@dataclass(slots=True)
class _PubackDeadline:
    """When a QoS 1 publish gives up waiting for its PUBACK. One sweep timer per session checks
    them in order: a timer and a shield per publish cost 57 us of CPU per publish against 48 us
    (20,000 publishes to a local Mosquitto), and showed in a hollow fleet's profile."""

    waiter: asyncio.Future[None]
    at: float  # loop time
    held_until: float  # the longest it waits while the session holds its socket back
    pauses: int  # the session's pause count when ``at`` was set


class MqttConnectError(MqttError):
    """The broker could not be reached, refused the session, or did not answer in time."""

    def __init__(self, url: BrokerURL | str, reason: str, *, transient: bool = True) -> None:
        """``transient``: trying again later may succeed (unreachable, closed before CONNACK, no
        CONNACK in time); False for a refusal (CONNACK's reason code) and for TLS failures."""
        super().__init__(f"cannot connect to {url}: {reason}")
        self.url = str(url)
        self.reason = reason
        self.transient = transient


class MqttPublishError(MqttError):
    """A publish was rejected locally or not acknowledged in time."""

    def __init__(self, topic: str, reason: str) -> None:
        super().__init__(f"publish to {topic!r} failed: {reason}")
        self.topic = topic
        self.reason = reason


class MqttSubscribeError(MqttError):
    """A subscription was rejected locally, refused by the broker, or not acknowledged in time."""

    def __init__(self, topic_filter: str, reason: str) -> None:
        super().__init__(f"subscribe to {topic_filter!r} failed: {reason}")
        self.topic_filter = topic_filter
        self.reason = reason


@dataclass(frozen=True, slots=True)
class BrokerURL:
    """Where a broker listens and how to authenticate to it.

    Credentials are fields, never part of the URL text, so a logged URL carries no secret; the
    password is left out of ``repr``.
    """

    host: str
    port: int
    tls: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host or any(c in self.host for c in " /@?#"):
            raise ValueError(f"invalid broker host {self.host!r}")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 < self.port < 65536:
            raise ValueError(f"invalid broker port {self.port!r}")
        for name in ("ca_file", "cert_file", "key_file"):
            value = getattr(self, name)
            if value is not None:
                if not self.tls:
                    raise ValueError(f"{name} is only meaningful for mqtts:// URLs")
                object.__setattr__(self, name, os.fspath(value))
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together (client certificate for mutual TLS)")
        if self.password is not None and self.username is None:
            raise ValueError("a password needs a username")

    @property
    def scheme(self) -> str:
        return "mqtts" if self.tls else "mqtt"

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    @classmethod
    def parse(
        cls,
        url: str,
        *,
        ca_file: str | os.PathLike[str] | None = None,
        cert_file: str | os.PathLike[str] | None = None,
        key_file: str | os.PathLike[str] | None = None,
        username: str | None = None,
        password: str | None = None,
    ) -> BrokerURL:
        """Parse ``mqtt://host[:port]`` or ``mqtts://host[:port]`` (default ports 1883 and 8883)."""
        if not isinstance(url, str):
            raise ValueError(f"broker URL must be a string, got {type(url).__name__}")
        parts = urlsplit(url)
        if parts.scheme not in DEFAULT_PORTS:
            raise ValueError(f"broker URL {url!r}: scheme must be mqtt:// or mqtts://")
        if "@" in parts.netloc:
            raise ValueError(f"broker URL {url!r}: pass username and password as fields, not in the URL")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError(f"broker URL {url!r}: no path, query or fragment allowed")
        try:
            port = parts.port
        except ValueError as err:
            raise ValueError(f"broker URL {url!r}: {err}") from err
        if not parts.hostname:
            raise ValueError(f"broker URL {url!r}: missing host")
        return cls(
            host=parts.hostname,
            port=DEFAULT_PORTS[parts.scheme] if port is None else port,
            tls=parts.scheme == "mqtts",
            ca_file=None if ca_file is None else os.fspath(ca_file),
            cert_file=None if cert_file is None else os.fspath(cert_file),
            key_file=None if key_file is None else os.fspath(key_file),
            username=username,
            password=password,
        )


def _check_qos(qos: int) -> int:
    if qos not in (0, 1) or isinstance(qos, bool):
        raise ValueError(f"qos must be 0 or 1, got {qos!r}")
    return qos


@dataclass(frozen=True, slots=True)
class Will:
    """The message the broker publishes for a session that dies without disconnecting."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.topic, str) or not self.topic or any(c in self.topic for c in "+#\x00"):
            raise ValueError(f"invalid will topic {self.topic!r}")
        if not isinstance(self.payload, bytes):
            raise TypeError("will payload must be bytes")
        _check_qos(self.qos)


@dataclass(frozen=True, slots=True)
class Message:
    """One application message received on a subscription."""

    topic: str
    payload: bytes
    qos: int
    retain: bool


@dataclass(slots=True)
class SessionStats:
    """Counters of a session; `MqttSession.stats` hands out copies.

    ``published`` counts messages handed to the broker (QoS 1 ones once acknowledged; of them
    ``published_qos1``); ``received`` counts messages accepted into the inbox (within
    ``max_payload``; of them ``received_qos1`` at QoS 1);
    ``dropped_overflow`` counts QoS 0 messages shed because the inbox was full (the application did
    not keep up; QoS 1 messages are never shed: ``paused`` counts the times the session stopped
    reading its socket instead); ``dropped_invalid`` counts messages whose topic is not valid UTF-8.
    """

    published: int = 0
    published_qos1: int = 0
    received: int = 0
    received_qos1: int = 0
    dropped_oversize: int = 0
    dropped_overflow: int = 0
    dropped_invalid: int = 0
    reconnects: int = 0
    paused: int = 0


class _State(enum.Enum):
    NEW = "new"
    OPEN = "open"
    CLOSED = "closed"


async def _run_in_thread(fn: Callable[[], T], name: str) -> T:
    """Run a blocking call on a thread of its own; the thread has ended when this returns."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if done.done():
            return
        if error is None:
            done.set_result(result)  # type: ignore[arg-type]
        else:
            done.set_exception(error)

    def run() -> None:
        try:
            result, error = fn(), None
        except BaseException as err:
            result, error = None, err
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is left to tell
            loop.call_soon_threadsafe(settle, result, error)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    try:
        return await asyncio.shield(done)
    except asyncio.CancelledError:
        # A blocking call cannot be interrupted; wait for it so that no thread outlives the caller.
        # paho bounds each of these calls (connect timeout, a 1 s network loop tick).
        await asyncio.wait([done])
        raise
    finally:
        if done.done():
            thread.join()


class _ClosingSSLSocket(ssl.SSLSocket):
    """paho 2.2 drops the socket unclosed when the TLS handshake fails (bad certificate, timeout),
    which surfaces later as a ResourceWarning; close it where the failure happens."""

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except BaseException:
            self.close()
            raise


_INFO_LOCK = threading.Lock()


class _MessageInfo(paho.MQTTMessageInfo):
    """paho's ``MQTTMessageInfo`` whose ``threading.Condition`` is made only when a thread waits on
    it (``wait_for_publish``). paho makes one for every message, sent or received; on one event loop
    nothing ever waits, and making the Condition (an RLock and a deque, and the collections their
    allocations bring on) was 8 % of a hollow fleet process's py-spy samples and 4 % of the
    orchestrator loop's at 10,000 nodes. Installed for every paho client of the process (paho looks
    the class up when it makes each message); the behaviour is paho's own."""

    __slots__ = ("_cond",)

    def __init__(self, mid: int) -> None:  # paho's, without the Condition
        self.mid = mid
        self._published = False
        self._cond: threading.Condition | None = None
        self.rc = MQTTErrorCode.MQTT_ERR_SUCCESS
        self._iterpos = 0

    @property
    def _condition(self) -> threading.Condition:
        with _INFO_LOCK:
            if self._cond is None:
                self._cond = threading.Condition()
            return self._cond

    @_condition.setter
    def _condition(self, value: threading.Condition) -> None:
        with _INFO_LOCK:
            self._cond = value

    def is_published(self) -> bool:
        if self._cond is not None:
            return super().is_published()
        published = self._published  # paho reads it under the Condition; no thread waits on it
        if self.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:  # paho's checks
            raise ValueError("Message is not queued due to ERR_QUEUE_SIZE")
        if self.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_AGAIN):
            raise RuntimeError(f"Message publish failed: {paho.error_string(self.rc)}")
        return published

    def _set_as_published(self) -> None:
        with _INFO_LOCK:  # no waiter yet: one that comes sees _published (it makes the Condition
            if self._cond is None:  # under this lock, then checks _published under the Condition)
                self._published = True
                return
            cond = self._cond
        with cond:
            self._published = True
            cond.notify()


paho.MQTTMessageInfo = _MessageInfo  # type: ignore[misc]


def _fresh_packet() -> Any:
    """paho's state of a packet being read, as paho resets it after each."""
    return {
        "command": 0,
        "have_remaining": 0,
        "remaining_count": [],
        "remaining_mult": 1,
        "remaining_length": 0,
        "packet": bytearray(b""),
        "to_process": 0,
        "pos": 0,
    }


# What an MQTT 3.1.1 PUBACK says besides its packet id: success, no properties (given to on_publish).
_PUBACK_SUCCESS = ReasonCode(PacketTypes.PUBACK)
_NO_PROPERTIES = Properties(PacketTypes.PUBACK)


class _Client(paho.Client):
    """paho's client, read the way one event loop serving thousands of sessions needs (paho 2.x).

    * Reads come from a buffer filled by one ``recv`` of up to ``RECV_CHUNK`` bytes: paho asks
      the socket for every packet's first byte, its length bytes and its body one call each. A
      packet whole in the buffer is cut out of it in one step, and MQTT 3.1.1 PUBLISH (QoS 0, 1)
      and PUBACK are parsed in place (paho builds struct formats from each PUBLISH's lengths and a
      reason code and property set for each PUBACK): 2-5 times as fast (bench/mqtt_read.py).
    * ``loop_read`` reads one packet (the session batches them, ``READ_BATCH``); paho reads as many
      as it holds messages in its queues, which held the loop for seconds under a large queue.
    * A received message goes straight to ``on_message``: paho matches every topic against the
      per-filter callbacks, which the session does not use.
    * paho's log lines are formatted only when the ``edgeward.mqtt.session.paho`` logger would
      emit them (paho formats one per packet).
    """

    _rbuf = b""
    _rpos = 0

    @property
    def buffered(self) -> int:
        """Bytes read from the socket and not yet parsed."""
        return len(self._rbuf) - self._rpos

    def drop_buffer(self) -> None:
        """Forget unparsed bytes (the socket they came from is gone)."""
        self._rbuf, self._rpos = b"", 0

    def _sock_recv(self, bufsize: int) -> bytes:
        buf, pos = self._rbuf, self._rpos
        if pos >= len(buf):
            buf, pos = super()._sock_recv(RECV_CHUNK), 0  # BlockingIOError, OSError: as paho's
            if not buf:
                self.drop_buffer()
                return buf
        end = pos + bufsize
        self._rbuf, self._rpos = buf, min(end, len(buf))
        return buf[pos:end]

    def loop_read(self, max_packets: int = 1) -> MQTTErrorCode:
        if self._sock is None:
            return MQTTErrorCode.MQTT_ERR_NO_CONN
        rc = self._packet_read()
        if rc > 0:
            return self._loop_rc_handle(rc)
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _packet_read(self) -> MQTTErrorCode:
        """A packet that is whole in the read buffer is cut out of it in one step; paho takes its
        first byte, each length byte and its body one call each, with a dict update and a lock
        round per step. Anything else (the buffer empty, a packet split between two reads, a
        packet half read the paho way) goes the paho way."""
        packet = self._in_packet
        buf, pos = self._rbuf, self._rpos
        end = len(buf)
        if packet["command"] or end - pos < 2:
            return super()._packet_read()
        length, shift, i = 0, 0, pos + 1
        while True:
            if i >= end or i - pos > 4:  # the length is not all here, or longer than MQTT's 4 bytes
                return super()._packet_read()
            byte = buf[i]
            i += 1
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        if i + length > end:
            return super()._packet_read()
        self._rpos = i + length
        packet["command"] = buf[pos]
        packet["remaining_length"] = length
        packet["packet"] = buf[i : i + length]  # type: ignore[typeddict-item] # paho's handlers slice it: bytes do
        packet["pos"] = 0
        try:
            rc = self._packet_handle()
        except MalformedPacket as err:
            self._easy_log(paho.MQTT_LOG_DEBUG, "Received malformed packet: %s", err)
            rc = MQTTErrorCode.MQTT_ERR_PROTOCOL
        finally:
            # Also when a callback raised: the packet is consumed, the next read starts at the next
            # one's first byte (left half-set, paho's path would read that byte as this one's length).
            self._in_packet = _fresh_packet()
        with self._msgtime_mutex:
            self._last_bytes_received = paho.time_func()
        return rc

    def _handle_publish(self) -> MQTTErrorCode:
        """MQTT 3.1.1, QoS 0 and 1: the packet parsed with slices (paho builds two struct formats
        from each packet's lengths, and formats a log line's topic whether or not it logs)."""
        header = self._in_packet["command"]
        qos = (header & 0x06) >> 1
        if self._protocol == MQTTProtocolVersion.MQTTv5 or qos > 1:
            return super()._handle_publish()
        data = self._in_packet["packet"]
        if len(data) < 2:
            raise MalformedPacket("PUBLISH without a topic length")
        start = 2 + ((data[0] << 8) | data[1])
        if start == 2 or len(data) < start + 2 * qos:
            raise MalformedPacket("PUBLISH shorter than its topic and packet id, or with an empty topic")
        mid = ((data[start] << 8) | data[start + 1]) if qos else 0
        message = paho.MQTTMessage(mid=mid, topic=bytes(data[2:start]))
        message.dup = bool(header & 0x08)
        message.qos = qos
        message.retain = bool(header & 0x01)
        message.payload = data[start + 2 * qos :]
        message.timestamp = paho.time_func()
        self._handle_on_message(message)
        if qos and not self._manual_ack:
            return self._send_puback(mid)
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _handle_pubackcomp(self, cmd: Any) -> MQTTErrorCode:
        """MQTT 3.1.1 PUBACK: the packet id read in place (paho makes a reason code and a property
        set for each, which 3.1.1 has not got: the callback is given the same two for every one)."""
        if cmd != "PUBACK" or self._protocol == MQTTProtocolVersion.MQTTv5:
            return super()._handle_pubackcomp(cmd)
        data = self._in_packet["packet"]
        if len(data) != 2:
            raise MalformedPacket("PUBACK of a length other than 2")
        mid = (data[0] << 8) | data[1]
        with self._out_message_mutex:
            if mid in self._out_messages:
                return self._do_on_publish(mid, _PUBACK_SUCCESS, _NO_PROPERTIES)
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _handle_on_message(self, message: paho.MQTTMessage) -> None:
        if self.on_message is not None:
            self.on_message(self, self._userdata, message)

    def _easy_log(self, level: LogLevel, fmt: str, *args: Any) -> None:
        # paho formats a debug line per packet for on_log: only when it would be logged.
        if _paho_log.isEnabledFor(paho.LOGGING_LEVEL.get(level, logging.DEBUG)):
            super()._easy_log(level, fmt, *args)


class _MessageIterator:
    def __init__(self, session: MqttSession) -> None:
        self._session = session

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Message:
        return await self._session._next_message()


class MqttSession:
    """One MQTT connection, used as ``async with MqttSession(url, client_id) as session:``.

    The session reconnects on its own after the connection drops (jittered backoff
    ``RECONNECT_DELAY_S``) and re-issues its subscriptions each time. ``timeout`` bounds the
    connect, each PUBACK and each SUBACK. Closing sends DISCONNECT, so the broker discards the will.
    ``protocol`` is the MQTT protocol level: 4 (3.1.1, default) or 5. ``reconnect_delay`` is the
    backoff's (first, largest) delay in seconds. ``max_inflight`` QoS 1 messages may await their
    PUBACK on the wire at once (0: no limit, each is sent at once), and ``max_outbound`` be kept in
    all (beyond it a publish fails at once): a control plane that commands thousands of nodes
    lifts the first and raises the second. ``read_batch`` packets are read from the socket per turn
    of the loop (``READ_BATCH``: fair among thousands of sessions on one loop); a control plane
    whose one session carries a whole fleet's traffic reads more. ``will`` may be a function returning the will:
    it is called before every connect and reconnect, so a will can name its connection.
    """

    def __init__(
        self,
        url: BrokerURL | str,
        client_id: str,
        *,
        will: Will | Callable[[], Will] | None = None,
        max_payload: int = 256 * 1024,
        clean_start: bool = True,
        keepalive: int = 15,
        max_queued: int = 1000,
        timeout: float = 10.0,
        protocol: int = 4,
        reconnect_delay: tuple[float, float] = RECONNECT_DELAY_S,
        max_inflight: int = MAX_INFLIGHT_QOS1,
        max_outbound: int = MAX_OUTBOUND_QOS1,
        read_batch: int = READ_BATCH,
    ) -> None:
        if not isinstance(client_id, str) or not client_id:
            raise ValueError("client_id must be a non-empty string")
        if max_payload < 0 or max_queued < 1 or keepalive < 1 or timeout <= 0:
            raise ValueError("max_payload >= 0, max_queued >= 1, keepalive >= 1 and timeout > 0 required")
        if not 0 < reconnect_delay[0] <= reconnect_delay[1]:
            raise ValueError(
                f"reconnect_delay must be (first, largest) with 0 < first <= largest, got {reconnect_delay}"
            )
        if read_batch < 1:
            raise ValueError(f"read_batch >= 1 required, got {read_batch}")
        if not 0 <= max_inflight <= max_outbound:
            raise ValueError(
                f"0 <= max_inflight <= max_outbound required, got {max_inflight}, {max_outbound}"
            )
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be 4 (MQTT 3.1.1) or 5 (MQTT v5), got {protocol!r}")
        self.url = url if isinstance(url, BrokerURL) else BrokerURL.parse(url)
        self.client_id = client_id
        self.protocol = protocol
        self._will = will
        self._max_payload = max_payload
        self._clean_start = clean_start
        self._keepalive = keepalive
        self._misc_interval = max(MISC_INTERVAL_S, keepalive / 4)
        self._max_queued = max_queued
        self._timeout = timeout
        self._reconnect_delay = reconnect_delay
        self._max_inflight = max_inflight
        self._max_outbound = max_outbound
        self._read_batch = read_batch
        self._connected_at = 0.0

        self._state = _State.NEW
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._client: _Client | None = None
        self._sock: socket.socket | None = None  # the socket paho handed to the loop, while open
        self._sock_closed: asyncio.Event | None = None
        self._reading = False
        self._writing = False  # a writer is registered: the socket did not take all paho queued
        self._flush_soon = False  # a write of what paho queued is due at the end of this loop turn
        self._misc_timer: asyncio.TimerHandle | None = None
        self._reconnect_task: asyncio.Task[None] | None = None
        self._link_changed = asyncio.Event()
        self._connack: asyncio.Future[None] | None = None
        self._connected = False
        self._progress = 0  # packets paho has handed to a callback: tells a read batch when to stop
        self._stats = SessionStats()
        self._inbox: deque[Message] = deque()  # QoS 1: taken first
        self._inbox0: deque[Message] = deque()  # QoS 0
        self._inbox_ready = asyncio.Event()
        self._puback_waiters: dict[int, asyncio.Future[None]] = {}
        self._puback_deadlines: deque[_PubackDeadline] = deque()  # in order of ``at``
        self._sweep_timer: asyncio.TimerHandle | None = None
        self._suback_waiters: dict[int, asyncio.Future[bool]] = {}
        self._subscriptions: dict[str, int] = {}  # filter -> qos, re-issued after every reconnect

    # ---- public API -----------------------------------------------------------------------------

    @property
    def stats(self) -> SessionStats:
        """A snapshot of the session's counters."""
        return dataclasses.replace(self._stats)

    @property
    def connected(self) -> bool:
        """Whether the broker connection is up right now (it drops and returns on its own)."""
        return self._connected

    @property
    def connected_for(self) -> float:
        """Seconds since the broker last accepted this session (0 while disconnected)."""
        return self._require_loop().time() - self._connected_at if self._connected else 0.0

    @property
    def queued(self) -> int:
        """Messages received and not yet taken by the application."""
        return len(self._inbox) + len(self._inbox0)

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def connect(self) -> None:
        """Connect once; raise `MqttConnectError` if the broker cannot be reached or refuses."""
        if self._state is not _State.NEW:
            raise MqttError("a session connects once; make a new MqttSession")
        self._state = _State.OPEN
        loop = self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._connack = loop.create_future()
        deadline = loop.time() + self._timeout
        try:
            self._client = client = self._make_client()
            try:
                await _run_in_thread(
                    partial(
                        client.connect,
                        self.url.host,
                        self.url.port,
                        self._keepalive,
                        **self._connect_options(),
                    ),
                    name=f"edgeward-mqtt-connect-{self.client_id}",
                )
            except OSError as err:  # refused, unreachable, TLS handshake, socket timeout
                transient = not isinstance(err, ssl.SSLError)
                raise MqttConnectError(self.url, f"{type(err).__name__}: {err}", transient=transient) from err
            try:
                async with asyncio.timeout_at(deadline):
                    await self._connack
            except TimeoutError as err:
                raise MqttConnectError(self.url, f"no CONNACK within {self._timeout:g} s") from err
        except BaseException:
            await self.close()
            raise
        log.info("connected to %s as %s", self.url, self.client_id)

    async def close(self) -> None:
        """Disconnect cleanly (no will is sent) and let go of the socket. Idempotent."""
        if self._state is _State.CLOSED:
            return
        self._state = _State.CLOSED
        self._connected = False
        if self._reconnect_task is not None:
            self._reconnect_task.cancel()
            await asyncio.wait([self._reconnect_task])  # a reconnect thread ends before we go on
            self._reconnect_task = None
        client = self._client
        if client is not None and self._sock is not None and self._sock_closed is not None:
            # DISCONNECT tells the broker to discard the will; paho closes the socket once it is out.
            client.disconnect()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLOSE_GRACE_S):
                    await self._sock_closed.wait()
        self._release_socket()
        if self._misc_timer is not None:
            self._misc_timer.cancel()
            self._misc_timer = None
        if self._sweep_timer is not None:
            self._sweep_timer.cancel()
            self._sweep_timer = None
        self._puback_deadlines.clear()
        self._client = None
        closed = MqttError("session closed")
        waiters: list[asyncio.Future[Any]] = [*self._puback_waiters.values(), *self._suback_waiters.values()]
        for waiter in waiters:
            if not waiter.done():
                waiter.set_exception(closed)
        self._inbox_ready.set()

    async def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        """Publish; with ``qos=1`` wait for the broker's PUBACK.

        A QoS 1 publish that times out while the broker is away stays queued in paho (bounded) and
        may still be delivered after a reconnect (at least once).
        """
        client = self._require_open()
        _check_qos(qos)
        if not isinstance(payload, bytes | bytearray):
            raise TypeError("payload must be bytes")
        try:
            info = client.publish(topic, bytes(payload), qos, retain)
        except ValueError as err:  # empty topic, wildcards, oversize for the protocol
            raise MqttPublishError(topic, str(err)) from err
        if qos == 0:
            if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                raise MqttPublishError(topic, paho.error_string(info.rc))
            self._stats.published += 1
            return
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            raise MqttPublishError(topic, paho.error_string(info.rc))
        if info.is_published():  # acknowledged already (paho wrote it and read the PUBACK)
            self._stats.published += 1
            self._stats.published_qos1 += 1
            return
        loop = self._require_loop()
        waiter = self._puback_waiters[info.mid] = loop.create_future()
        now = loop.time()
        self._puback_deadlines.append(
            _PubackDeadline(waiter, now + self._timeout, now + HELD_PUBACK_S, self._stats.paused)
        )
        if self._sweep_timer is None:
            self._sweep_timer = loop.call_later(self._sweep_interval, self._sweep_pubacks)
        try:
            await waiter
        except _NoPuback as err:
            raise MqttPublishError(topic, f"no PUBACK within {self._timeout:g} s") from err
        finally:
            if self._puback_waiters.get(info.mid) is waiter:
                del self._puback_waiters[info.mid]
        self._stats.published += 1
        self._stats.published_qos1 += 1

    @property
    def _sweep_interval(self) -> float:
        return min(PUBACK_SWEEP_S, self._timeout / 4)

    def _sweep_pubacks(self) -> None:
        """Fail the QoS 1 publishes whose PUBACK is past its deadline, oldest first."""
        self._sweep_timer = None
        loop = self._require_loop()
        now = loop.time()
        deadlines = self._puback_deadlines
        while deadlines and (deadlines[0].waiter.done() or deadlines[0].at <= now):
            due = deadlines.popleft()
            if due.waiter.done():
                continue
            # While the inbox is full the socket is not read, and the PUBACK waits behind the
            # messages not read yet: that is this session's backpressure, not a broker that does
            # not answer. (At 10,000 nodes every command failed so, though delivered.)
            held = not self._reading or self._stats.paused != due.pauses
            if held and now < due.held_until:
                due.at, due.pauses = now + self._timeout, self._stats.paused
                deadlines.append(due)  # the latest deadline yet: the order holds
            else:
                due.waiter.set_exception(_NoPuback())
        if deadlines:
            self._sweep_timer = loop.call_later(self._sweep_interval, self._sweep_pubacks)

    async def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        """Subscribe and wait for the SUBACK; the subscription is re-issued after every reconnect."""
        client = self._require_open()
        _check_qos(qos)
        previous_qos = self._subscriptions.get(topic_filter)
        self._subscriptions[topic_filter] = qos
        try:
            try:
                rc, mid = client.subscribe(topic_filter, qos)
            except ValueError as err:
                raise MqttSubscribeError(topic_filter, str(err)) from err
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
                raise MqttSubscribeError(topic_filter, paho.error_string(rc))
            waiter = self._suback_waiters[mid] = self._require_loop().create_future()
            try:
                async with asyncio.timeout(self._timeout):
                    granted = await waiter
            except TimeoutError as err:
                raise MqttSubscribeError(topic_filter, f"no SUBACK within {self._timeout:g} s") from err
            finally:
                self._suback_waiters.pop(mid, None)
            if not granted:
                raise MqttSubscribeError(topic_filter, "refused by the broker")
        except BaseException:
            if previous_qos is None:
                self._subscriptions.pop(topic_filter, None)
            else:
                self._subscriptions[topic_filter] = previous_qos
            raise

    def messages(self) -> AsyncIterator[Message]:
        """Iterate over received messages until the session is closed."""
        return _MessageIterator(self)

    async def next_batch(self, limit: int) -> list[Message]:
        """Wait for at least one message, then take up to ``limit``: the QoS 1 ones first, then the
        QoS 0 ones, each kind oldest first (a QoS 0 message can come after a QoS 1 one received
        later); an empty list once the session is closed and the inbox drained."""
        while not (self._inbox or self._inbox0):
            if self._state is _State.CLOSED:
                return []
            self._inbox_ready.clear()
            await self._inbox_ready.wait()
        inbox, inbox0 = self._inbox, self._inbox0
        batch = [inbox.popleft() for _ in range(min(limit, len(inbox)))]
        batch.extend(inbox0.popleft() for _ in range(min(limit - len(batch), len(inbox0))))
        self._taken()
        return batch

    # ---- internals ------------------------------------------------------------------------------

    def _require_open(self) -> paho.Client:
        if self._state is not _State.OPEN or self._client is None:
            raise MqttError(f"session is {self._state.value}, not open")
        return self._client

    def _require_loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None
        return self._loop

    def _connect_options(self) -> dict[str, Any]:
        return {"clean_start": self._clean_start} if self.protocol == 5 else {}

    def _set_will(self, client: paho.Client) -> None:
        """Give the broker the will for the next connection (a factory is asked anew each time)."""
        will = self._will() if callable(self._will) else self._will
        if will is not None:
            client.will_set(will.topic, will.payload, will.qos, will.retain)

    def _make_client(self) -> _Client:
        client = _Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            clean_session=None if self.protocol == 5 else self._clean_start,
            protocol=PROTOCOLS[self.protocol],
        )
        client.on_log = self._on_log
        client.connect_timeout = self._timeout
        client.max_queued_messages_set(self._max_outbound)
        client.max_inflight_messages_set(self._max_inflight)
        if self.url.username is not None:
            client.username_pw_set(self.url.username, self.url.password)
        if self.url.tls:
            client.tls_set_context(self._tls_context())
        self._set_will(client)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_socket_register_write
        client.on_socket_unregister_write = self._on_socket_unregister_write
        return client

    def _tls_context(self) -> ssl.SSLContext:
        try:
            # Verifies the broker's certificate and host name; the system CAs when no ca_file.
            context = ssl.create_default_context(cafile=self.url.ca_file)
            if self.url.cert_file is not None:
                context.load_cert_chain(self.url.cert_file, self.url.key_file)
        except OSError as err:  # missing or unreadable files, bad PEM (ssl.SSLError)
            raise MqttConnectError(self.url, f"TLS setup failed: {err}", transient=False) from err
        context.sslsocket_class = _ClosingSSLSocket
        return context

    # ---- the socket on the event loop -----------------------------------------------------------

    def _on_loop(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn`` on the session's loop: now when called there, else posted (paho runs a
        connect on a helper thread, and the socket callbacks of that connect with it)."""
        loop = self._loop
        if loop is None:
            return
        if threading.get_ident() == self._loop_thread:
            fn(*args)
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: the application is gone
            loop.call_soon_threadsafe(fn, *args)

    def _socket_opened(self, sock: socket.socket) -> None:
        if self._state is not _State.OPEN:  # closed while the connect thread ran
            sock.close()
            return
        loop = self._require_loop()
        self._sock = sock
        if self._client is not None:
            self._client.drop_buffer()  # bytes of an earlier connection
        self._sock_closed = asyncio.Event()
        self._reading = False
        self._writing = False
        self._resume_reading()
        if self._misc_timer is None:
            # Spread over the interval: thousands of sessions started together tick apart.
            self._misc_timer = loop.call_later(self._misc_interval * random.random(), self._misc)  # noqa: S311

    def _socket_closing(self, sock: socket.socket) -> None:
        if sock is not self._sock:
            return
        self._release_socket()

    def _release_socket(self) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            return
        loop = self._require_loop()
        loop.remove_reader(sock)
        loop.remove_writer(sock)
        self._reading = False
        self._writing = False
        if self._sock_closed is not None:
            self._sock_closed.set()
        if sock.fileno() != -1 and self._state is _State.CLOSED:
            sock.close()  # close() gave up waiting for the DISCONNECT to leave

    # paho asks for a writer whenever a packet is queued and drops it when its queue is empty: two
    # epoll changes per publish, which took half of a 2,500-node hollow fleet's CPU. Instead, what
    # was queued during one turn of the loop is written at the end of it, in one go, and a writer
    # is only registered while the socket does not take everything.
    def _want_write(self, sock: socket.socket) -> None:
        if sock is self._sock and not self._flush_soon:
            self._flush_soon = True
            self._require_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_soon = False
        client, sock = self._client, self._sock
        if client is None or sock is None:
            return
        client.loop_write()
        if sock is self._sock and client.want_write() and not self._writing:
            self._writing = True
            self._require_loop().add_writer(sock, self._writable)

    def _no_write(self, sock: socket.socket) -> None:
        if sock is self._sock and self._writing:
            self._writing = False
            self._require_loop().remove_writer(sock)

    def _readable(self) -> None:
        client = self._client
        if client is None or not self._reading:
            return
        for _ in range(self._read_batch):
            before = self._progress
            if client.loop_read() != MQTTErrorCode.MQTT_ERR_SUCCESS or not self._reading:
                return
            if self._progress == before and not client.buffered:  # the socket is drained
                break
        sock = self._sock
        if client.buffered or (isinstance(sock, ssl.SSLSocket) and sock.pending()):
            # Bytes wait in our read buffer or inside the TLS layer: the socket itself will not
            # turn readable for them.
            self._require_loop().call_soon(self._readable)

    def _writable(self) -> None:
        if self._client is not None:
            self._client.loop_write()

    def _misc(self) -> None:
        self._misc_timer = None
        if self._state is not _State.OPEN or self._client is None:
            return
        self._client.loop_misc()
        self._misc_timer = self._require_loop().call_later(self._misc_interval, self._misc)

    def _pause_reading(self) -> None:
        if self._reading and self._sock is not None:
            self._require_loop().remove_reader(self._sock)
            self._reading = False
            self._stats.paused += 1

    def _resume_reading(self) -> None:
        if not self._reading and self._sock is not None:
            loop = self._require_loop()
            loop.add_reader(self._sock, self._readable)
            self._reading = True
            loop.call_soon(self._readable)  # bytes may already wait (in the kernel or the TLS layer)

    def _taken(self) -> None:
        if not self._reading and self.queued <= self._max_queued // 2:
            self._resume_reading()

    # ---- connection state -----------------------------------------------------------------------

    def _connack_received(self, refused: bool, reason: str) -> None:
        connack = self._connack
        self._link_changed.set()
        if connack is not None and not connack.done():
            if refused:
                connack.set_exception(
                    MqttConnectError(self.url, f"refused by the broker: {reason}", transient=False)
                )
            else:
                self._connected = True
                self._connected_at = self._require_loop().time()
                connack.set_result(None)
            return
        if refused:
            log.warning("reconnect to %s refused: %s", self.url, reason)
            return
        self._connected = True
        self._connected_at = self._require_loop().time()
        self._stats.reconnects += 1
        log.info("reconnected to %s as %s", self.url, self.client_id)

    def _connection_lost(self, reason: str) -> None:
        connack = self._connack
        self._link_changed.set()
        was_connected, self._connected = self._connected, False
        if connack is not None and not connack.done():
            # e.g. TLS 1.3, where the broker rejects a client certificate after the handshake
            connack.set_exception(MqttConnectError(self.url, f"connection closed before CONNACK ({reason})"))
            return
        if self._state is not _State.OPEN:
            return
        if was_connected:
            log.warning("connection to %s lost (%s); reconnecting", self.url, reason)
        if self._reconnect_task is None or self._reconnect_task.done():
            self._reconnect_task = self._require_loop().create_task(
                self._reconnect(), name=f"edgeward-mqtt-reconnect-{self.client_id}"
            )

    async def _reconnect(self) -> None:
        """Reconnect with jittered exponential backoff until connected or closed."""
        client = self._require_open()
        delay, largest = self._reconnect_delay
        while self._state is _State.OPEN and not self._connected:
            await asyncio.sleep(random.uniform(delay / 2, delay))  # noqa: S311 -- jitter
            delay = min(delay * 2, largest)
            self._link_changed.clear()
            self._release_socket()  # a socket left from an attempt that got no CONNACK
            self._set_will(client)
            try:
                await _run_in_thread(client.reconnect, name=f"edgeward-mqtt-reconnect-{self.client_id}")
            except OSError as err:
                log.debug("reconnect to %s failed: %s", self.url, err)
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._timeout):
                    await self._link_changed.wait()  # CONNACK, refusal or loss

    def _deliver(self, message: Message) -> None:
        if self._state is not _State.OPEN:
            return
        if self.queued >= self._max_queued:
            if message.qos == 0:
                self._stats.dropped_overflow += 1
                return
            self._pause_reading()  # QoS 1 is kept; the broker holds the rest until we catch up
        (self._inbox if message.qos else self._inbox0).append(message)
        self._stats.received += 1
        self._stats.received_qos1 += message.qos
        self._inbox_ready.set()

    def _published(self, mid: int) -> None:
        waiter = self._puback_waiters.get(mid)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _subscribed(self, mid: int, granted: bool) -> None:
        waiter = self._suback_waiters.get(mid)
        if waiter is not None and not waiter.done():
            waiter.set_result(granted)
        elif not granted:
            log.warning("broker refused a re-issued subscription of %s", self.client_id)

    async def _next_message(self) -> Message:
        while not (self._inbox or self._inbox0):
            if self._state is _State.CLOSED:
                raise StopAsyncIteration
            self._inbox_ready.clear()
            await self._inbox_ready.wait()
        message = (self._inbox or self._inbox0).popleft()
        self._taken()
        return message

    # ---- paho callbacks: on the loop, except the socket ones of a connect (see _on_loop) ----------

    def _on_log(self, _client: paho.Client, _userdata: Any, level: int, buf: str) -> None:
        std_level = paho.LOGGING_LEVEL.get(LogLevel(level), logging.DEBUG)
        if buf.startswith("Client is not connected"):
            # paho 2.2 logs this as an error after every clean disconnect and on every reconnect
            # attempt; the session reports connection loss itself.
            std_level = logging.DEBUG
        _paho_log.log(std_level, "%s: %s", self.client_id, buf)

    def _on_socket_open(self, _client: paho.Client, _userdata: Any, sock: Any) -> None:
        self._on_loop(self._socket_opened, sock)

    def _on_socket_close(self, _client: paho.Client, _userdata: Any, sock: Any) -> None:
        self._on_loop(self._socket_closing, sock)

    def _on_socket_register_write(self, _client: paho.Client, _userdata: Any, sock: Any) -> None:
        self._on_loop(self._want_write, sock)

    def _on_socket_unregister_write(self, _client: paho.Client, _userdata: Any, sock: Any) -> None:
        self._on_loop(self._no_write, sock)

    def _on_connect(self, client: paho.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any) -> None:
        self._progress += 1
        if not reason.is_failure and self._subscriptions:
            client.subscribe(list(self._subscriptions.items()))
        self._connack_received(bool(reason.is_failure), str(reason))

    def _on_disconnect(
        self, _client: paho.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any
    ) -> None:
        self._on_loop(self._connection_lost, str(reason))

    def _on_message(self, _client: paho.Client, _userdata: Any, msg: paho.MQTTMessage) -> None:
        self._progress += 1
        # Checked here, before the payload is copied towards the application.
        if len(msg.payload) > self._max_payload:
            self._stats.dropped_oversize += 1
            return
        try:
            topic = msg.topic
        except UnicodeDecodeError:
            self._stats.dropped_invalid += 1
            return
        # paho types the payload bytes | bytearray; it is bytes, and bytes(b) is b itself (no copy).
        self._deliver(Message(topic, bytes(msg.payload), msg.qos, bool(msg.retain)))

    def _on_publish(self, _client: paho.Client, _userdata: Any, mid: int, _reason: Any, _props: Any) -> None:
        self._progress += 1
        self._published(mid)

    def _on_subscribe(
        self, _client: paho.Client, _userdata: Any, mid: int, reasons: list[Any], _props: Any
    ) -> None:
        self._progress += 1
        self._subscribed(mid, not any(r.is_failure for r in reasons))
