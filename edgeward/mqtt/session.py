"""An asyncio-facing MQTT session over paho-mqtt 2.x.

Design: paho runs its own network thread (``loop_start``) and every paho callback crosses into the
event loop with ``call_soon_threadsafe``, so futures, the inbox and the counters are only touched on
the event loop. The one structure both sides read, the subscription table that the network thread
re-issues after a reconnect, is guarded by a lock. Driving paho's socket callbacks from asyncio
instead would have meant rebuilding paho's reconnect, keepalive and TLS handshake handling, which
paho only runs inside ``loop_forever``; one thread per session is cheap at one session per process.

Blocking paho calls (the first TCP/TLS connect, joining the network thread) run on a short-lived
thread of their own rather than on the loop's default executor, whose workers outlive the call: a
closed session leaves no thread behind.

Protocol: MQTT 3.1.1, the only level amqtt 0.12.1 accepts (Mosquitto accepts both).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import os
import ssl
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self, TypeVar
from urllib.parse import urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, LogLevel, MQTTErrorCode, MQTTProtocolVersion

log = logging.getLogger(__name__)
_paho_log = logging.getLogger(f"{__name__}.paho")

T = TypeVar("T")

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}
# Bound on QoS 1 messages paho keeps for (re)sending while the broker is away.
_MAX_OUTBOUND_QOS1 = 1000
# paho's reconnect backoff: first and largest delay, seconds. The largest stays well below the
# orchestrator's default node_timeout_s (15 s), so that after a broker restart every live node is
# back, and heard, before it could be declared lost.
RECONNECT_DELAY_S = (0.5, 8.0)
# How long the loop lets received messages gather before it takes them (see _schedule_drain).
INBOUND_GATHER_S = 0.001


class MqttError(Exception):
    """Base of every error raised by `edgeward.mqtt`."""


class MqttConnectError(MqttError):
    """The broker could not be reached, refused the session, or did not answer in time."""

    def __init__(self, url: BrokerURL | str, reason: str) -> None:
        super().__init__(f"cannot connect to {url}: {reason}")
        self.url = str(url)
        self.reason = reason


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

    ``received`` counts messages accepted into the inbox (within ``max_payload``), including any
    later evicted as ``dropped_overflow`` because the application did not keep up;
    ``dropped_invalid`` counts messages whose topic is not valid UTF-8.
    """

    published: int = 0
    received: int = 0
    dropped_oversize: int = 0
    dropped_overflow: int = 0
    dropped_invalid: int = 0
    reconnects: int = 0


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


class _MessageIterator:
    def __init__(self, session: MqttSession) -> None:
        self._session = session

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Message:
        return await self._session._next_message()


class MqttSession:
    """One MQTT connection, used as ``async with MqttSession(url, client_id) as session:``.

    paho reconnects on its own after the connection drops (backoff ``RECONNECT_DELAY_S``), and the
    session re-issues its subscriptions each time. ``timeout`` bounds the connect, each PUBACK and
    each SUBACK. Closing sends DISCONNECT, so the broker discards the will.
    """

    def __init__(
        self,
        url: BrokerURL | str,
        client_id: str,
        *,
        will: Will | None = None,
        max_payload: int = 256 * 1024,
        clean_start: bool = True,
        keepalive: int = 15,
        max_queued: int = 1000,
        timeout: float = 10.0,
    ) -> None:
        if not isinstance(client_id, str) or not client_id:
            raise ValueError("client_id must be a non-empty string")
        if max_payload < 0 or max_queued < 1 or keepalive < 1 or timeout <= 0:
            raise ValueError("max_payload >= 0, max_queued >= 1, keepalive >= 1 and timeout > 0 required")
        self.url = url if isinstance(url, BrokerURL) else BrokerURL.parse(url)
        self.client_id = client_id
        self._will = will
        self._max_payload = max_payload
        self._clean_start = clean_start
        self._keepalive = keepalive
        self._max_queued = max_queued
        self._timeout = timeout

        self._state = _State.NEW
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: paho.Client | None = None
        self._connack: asyncio.Future[None] | None = None
        self._connected = False
        self._stats = SessionStats()
        self._inbox: deque[Message] = deque()
        self._inbox_ready = asyncio.Event()
        # Messages the network thread has received and the loop has not yet taken: one wake-up of
        # the loop per batch, not per message (a wake-up costs a self-pipe write and an epoll turn,
        # which at fleet telemetry rates cost more than the message itself).
        self._incoming: deque[Message] = deque()
        self._drain_posted = False
        self._puback_waiters: dict[int, asyncio.Future[None]] = {}
        self._suback_waiters: dict[int, asyncio.Future[bool]] = {}
        # filter -> qos; read by the network thread when it reconnects.
        self._subscriptions: dict[str, int] = {}
        self._subscriptions_lock = threading.Lock()

    # ---- public API -----------------------------------------------------------------------------

    @property
    def stats(self) -> SessionStats:
        """A snapshot of the session's counters."""
        return dataclasses.replace(self._stats)

    @property
    def connected(self) -> bool:
        """Whether the broker connection is up right now (it drops and returns on its own)."""
        return self._connected

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
        self._connack = loop.create_future()
        deadline = loop.time() + self._timeout
        try:
            self._client = client = self._make_client()
            try:
                await _run_in_thread(
                    lambda: client.connect(self.url.host, self.url.port, self._keepalive),
                    name=f"edgeward-mqtt-connect-{self.client_id}",
                )
            except OSError as err:  # refused, unreachable, TLS handshake, socket timeout
                raise MqttConnectError(self.url, f"{type(err).__name__}: {err}") from err
            client.loop_start()
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
        """Disconnect cleanly (no will is sent) and stop the network thread. Idempotent."""
        if self._state is _State.CLOSED:
            return
        self._state = _State.CLOSED
        self._connected = False
        client, self._client = self._client, None
        if client is not None:
            # DISCONNECT first: it tells the broker to discard the will, and it makes the
            # network thread leave loop_forever instead of reconnecting.
            client.disconnect()
            await _run_in_thread(client.loop_stop, name=f"edgeward-mqtt-stop-{self.client_id}")
        closed = MqttError("session closed")
        waiters: list[asyncio.Future[Any]] = [*self._puback_waiters.values(), *self._suback_waiters.values()]
        for waiter in waiters:
            if not waiter.done():
                waiter.set_exception(closed)
        self._inbox_ready.set()

    async def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        """Publish; with ``qos=1`` wait for the broker's PUBACK.

        A QoS 1 publish that times out while the broker is away stays queued in paho and may still
        be delivered after a reconnect (at least once).
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
        # Registered before the next await, so the PUBACK (posted to this loop) cannot be missed.
        waiter = self._puback_waiters[info.mid] = self._require_loop().create_future()
        try:
            async with asyncio.timeout(self._timeout):
                await waiter
        except TimeoutError as err:
            raise MqttPublishError(topic, f"no PUBACK within {self._timeout:g} s") from err
        finally:
            self._puback_waiters.pop(info.mid, None)
        self._stats.published += 1

    async def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        """Subscribe and wait for the SUBACK; the subscription is re-issued after every reconnect."""
        client = self._require_open()
        _check_qos(qos)
        with self._subscriptions_lock:
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
            with self._subscriptions_lock:
                if previous_qos is None:
                    self._subscriptions.pop(topic_filter, None)
                else:
                    self._subscriptions[topic_filter] = previous_qos
            raise

    def messages(self) -> AsyncIterator[Message]:
        """Iterate over received messages until the session is closed."""
        return _MessageIterator(self)

    # ---- internals (event loop side) ------------------------------------------------------------

    def _require_open(self) -> paho.Client:
        if self._state is not _State.OPEN or self._client is None:
            raise MqttError(f"session is {self._state.value}, not open")
        return self._client

    def _require_loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None
        return self._loop

    def _make_client(self) -> paho.Client:
        client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            clean_session=self._clean_start,
            protocol=MQTTProtocolVersion.MQTTv311,
            reconnect_on_failure=True,
        )
        client.on_log = self._on_log
        client.connect_timeout = self._timeout
        client.reconnect_delay_set(*RECONNECT_DELAY_S)  # type: ignore[arg-type]  # paho takes floats
        client.max_queued_messages_set(_MAX_OUTBOUND_QOS1)
        if self.url.username is not None:
            client.username_pw_set(self.url.username, self.url.password)
        if self.url.tls:
            client.tls_set_context(self._tls_context())
        if self._will is not None:
            client.will_set(self._will.topic, self._will.payload, self._will.qos, self._will.retain)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        return client

    def _tls_context(self) -> ssl.SSLContext:
        try:
            # Verifies the broker's certificate and host name; the system CAs when no ca_file.
            context = ssl.create_default_context(cafile=self.url.ca_file)
            if self.url.cert_file is not None:
                context.load_cert_chain(self.url.cert_file, self.url.key_file)
        except OSError as err:  # missing or unreadable files, bad PEM (ssl.SSLError)
            raise MqttConnectError(self.url, f"TLS setup failed: {err}") from err
        context.sslsocket_class = _ClosingSSLSocket
        return context

    def _connack_received(self, refused: bool, reason: str) -> None:
        connack = self._connack
        if connack is not None and not connack.done():
            if refused:
                connack.set_exception(MqttConnectError(self.url, f"refused by the broker: {reason}"))
            else:
                self._connected = True
                connack.set_result(None)
            return
        if refused:
            log.warning("reconnect to %s refused: %s", self.url, reason)
            return
        self._connected = True
        self._stats.reconnects += 1
        log.info("reconnected to %s as %s", self.url, self.client_id)

    def _connection_lost(self, reason: str) -> None:
        connack = self._connack
        if connack is not None and not connack.done():
            # e.g. TLS 1.3, where the broker rejects a client certificate after the handshake
            connack.set_exception(MqttConnectError(self.url, f"connection closed before CONNACK ({reason})"))
        elif self._state is _State.OPEN and self._connected:
            log.warning("connection to %s lost (%s); paho reconnects", self.url, reason)
        self._connected = False

    def _schedule_drain(self) -> None:
        # Gather for a millisecond: under a flood the loop then wakes ~1000 times a second instead
        # of once per message; a lone message waits at most 1 ms longer.
        assert self._loop is not None
        self._loop.call_later(INBOUND_GATHER_S, self._drain_incoming)

    def _drain_incoming(self) -> None:
        self._drain_posted = False  # before draining: a message appended from now on posts again
        incoming = self._incoming
        while incoming:
            self._deliver(incoming.popleft())

    def _deliver(self, message: Message) -> None:
        if self._state is not _State.OPEN:
            return
        if len(self._inbox) >= self._max_queued:
            self._inbox.popleft()
            self._stats.dropped_overflow += 1
        self._inbox.append(message)
        self._stats.received += 1
        self._inbox_ready.set()

    def _drop(self, counter: str) -> None:
        setattr(self._stats, counter, getattr(self._stats, counter) + 1)

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
        while not self._inbox:
            if self._state is _State.CLOSED:
                raise StopAsyncIteration
            self._inbox_ready.clear()
            await self._inbox_ready.wait()
        return self._inbox.popleft()

    # ---- paho callbacks (network thread): post to the loop, never raise --------------------------

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: the application is gone
            loop.call_soon_threadsafe(fn, *args)

    def _on_log(self, _client: paho.Client, _userdata: Any, level: int, buf: str) -> None:
        std_level = paho.LOGGING_LEVEL.get(LogLevel(level), logging.DEBUG)
        if buf.startswith("Client is not connected"):
            # paho 2.2 logs this as an error after every clean disconnect and on every reconnect
            # attempt; the session reports connection loss itself.
            std_level = logging.DEBUG
        _paho_log.log(std_level, "%s: %s", self.client_id, buf)

    def _on_connect(self, client: paho.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any) -> None:
        if not reason.is_failure:
            with self._subscriptions_lock:
                subscriptions = list(self._subscriptions.items())
            if subscriptions:
                client.subscribe(subscriptions)
        self._post(self._connack_received, bool(reason.is_failure), str(reason))

    def _on_disconnect(
        self, _client: paho.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any
    ) -> None:
        self._post(self._connection_lost, str(reason))

    def _on_message(self, _client: paho.Client, _userdata: Any, msg: paho.MQTTMessage) -> None:
        # Checked here, before the payload is copied towards the application.
        if len(msg.payload) > self._max_payload:
            self._post(self._drop, "dropped_oversize")
            return
        try:
            topic = msg.topic
        except UnicodeDecodeError:
            self._post(self._drop, "dropped_invalid")
            return
        self._incoming.append(Message(topic, bytes(msg.payload), msg.qos, bool(msg.retain)))
        if not self._drain_posted:
            self._drain_posted = True
            self._post(self._schedule_drain)

    def _on_publish(self, _client: paho.Client, _userdata: Any, mid: int, _reason: Any, _props: Any) -> None:
        self._post(self._published, mid)

    def _on_subscribe(
        self, _client: paho.Client, _userdata: Any, mid: int, reasons: list[Any], _props: Any
    ) -> None:
        self._post(self._subscribed, mid, not any(r.is_failure for r in reasons))
