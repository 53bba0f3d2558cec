"""An in-process MQTT broker (amqtt 0.12.1) for development and ``edgeward up``.

Production points the same sessions at Mosquitto or EMQX; this broker exists so that one machine
can run the whole system without installing anything. It speaks MQTT 3.1.1 only.

amqtt 0.12.1 needs the following handled here (the version is pinned in pyproject.toml; re-check
each point before moving it):

- Its default listener binds 0.0.0.0:1883; we always pass an explicit bind address.
- Its default plugins include the ``$SYS`` publisher, which emits a DeprecationWarning when loaded
  (an error under our test settings) and publishes every 20 s, plus two packet/event loggers. Any
  ``plugins`` mapping replaces the defaults wholesale; one without an authentication plugin makes
  the broker refuse every CONNECT with "not authorized", and ``None`` falls back to deprecated
  entry-point loading. So the mapping below names one authentication plugin and nothing else.
- It has no maximum message size: ``max_payload`` is enforced by dropping larger PUBLISHes before
  they are routed or retained (the packet has been read into memory by then).
- Its anonymous-auth plugin flags sessions anonymous, and amqtt then drops a persistent
  (clean_start=False) session a second after it disconnects, with its subscriptions and queued
  QoS 1 messages. `_AcceptAll` admits everyone without that flag, so persistent sessions behave as
  on Mosquitto (kept until the client returns, no expiry).
- It replays the QoS 1 messages queued for a returning persistent session with the RETAIN flag
  set, although they reach the client through its subscription [MQTT-3.3.1-9]; `_Broker` clears it.
- Its stream adapter's ``close()`` skips closing the transport when the final drain fails because
  the client is already gone (e.g. a client that disconnects while a QoS 1 delivery to it is in
  flight), leaking the socket. `_Broker` closes every connection's writer when its handler ends.
- ``shutdown()`` does not wait for the per-connection handler tasks (asyncio's ``wait_closed`` does
  not either on Python 3.11); `EmbeddedBroker.stop` does, so nothing of the broker outlives it.
- On every CONNECT it sends the new client the retained messages matching *every* filter any
  client holds, subscribed or not (a loop over all subscriptions meant for the client's own,
  persistent ones). `_Broker` only lets that through for filters the client itself holds.

With ``tls`` (the fleet's `TlsFiles`), the client id of every connection is its certificate's CN
(whatever the CONNECT asked for, as Mosquitto's ``use_username_as_clientid``), so a connection can
only take over its own identity's session: amqtt deletes or takes over a session by client id
before it authenticates, so `_Broker` binds the id first. The listener speaks TLS only, requires a
client certificate from the fleet CA (checked against the CRL at the handshake, and again at CONNECT
against the CRL as it is now, so a revocation needs no restart; the connections of a certificate the
CRL revokes are closed within a second), and enforces `edgeward.security.mqtt_acl.TopicAcl`
on every publish, subscribe, delivery, queued replay and will topic. amqtt copies the identity of a
returning persistent session from the old connection; `_Broker` derives it from each new connection
(the peer certificate is passed from ``stream_connected`` to ``_authenticate`` in a context variable,
both run in the connection's task).

Left as they are: amqtt delivers at the subscription's QoS even when the message was published
with a lower one (a QoS 0 publish reaches a QoS 1 subscriber as QoS 1), and the queue it keeps for
an absent persistent session has no bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import ssl
from types import TracebackType
from typing import Any, Self

from amqtt.broker import Broker
from amqtt.contexts import Action, BrokerConfig, ListenerConfig, ListenerType
from amqtt.errors import AMQTTError, BrokerError, MQTTError, NoDataError
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.plugins.base import BaseAuthPlugin
from amqtt.session import Session
from amqtt.utils import gen_client_id
from cryptography import x509

from edgeward.mqtt.session import BrokerURL, MqttError
from edgeward.security.errors import SecurityError
from edgeward.security.identity import Identity
from edgeward.security.mqtt_acl import TopicAcl
from edgeward.security.tls import RevocationList, TlsFiles

log = logging.getLogger(__name__)

#: Nodes the embedded broker (amqtt 0.12.1) is measured to serve: the largest hollow fleet with no
#: node falsely marked offline and no message lost over a 60 s steady window, bisected with
#: ``bench/fleet_scale.py --broker embedded --nodes N --steady 60`` (docs/benchmarks.md: 300 and 350
#: held; at 400, 202 messages were lost; at 500, 156 nodes were falsely offline and 3,083 messages
#: lost). Above it, use an external broker.
EMBEDDED_MAX_NODES = 350

_QUIET_LOGGERS = ("amqtt", "transitions")
_STOP_TIMEOUT_S = 1.0
# The DER peer certificate of the connection whose task is running (set in stream_connected).
_PEER_CERT: contextvars.ContextVar[bytes | None] = contextvars.ContextVar("edgeward_peer_cert", default=None)


class _AcceptAll(BaseAuthPlugin):
    """Admits every client (the broker is for development, on loopback) as a regular session."""

    async def authenticate(self, *, session: Session) -> bool:
        return True


class _Broker(Broker):
    """amqtt's broker with the 0.12.1 workarounds described in the module docstring."""

    def __init__(
        self,
        config: BrokerConfig,
        max_payload: int,
        tls: TlsFiles | None = None,
        acl: TopicAcl | None = None,
    ) -> None:
        super().__init__(config)
        self.max_payload = max_payload
        self.dropped_oversize = 0
        self.refused_connects = 0
        self.refused_topics = 0
        self.connection_tasks: set[asyncio.Task[Any]] = set()
        # connection task -> (its writer, its certificate's serial): what a revocation closes
        self._serials: dict[asyncio.Task[Any], tuple[asyncio.StreamWriter, int]] = {}
        self.closed_revoked = 0
        self.tls = tls
        self.acl = acl
        self.revocations = (
            RevocationList(tls.crl_file, tls.ca_file)
            if tls is not None and tls.crl_file is not None
            else None
        )

    def _create_ssl_context(self, listener: ListenerConfig) -> ssl.SSLContext:
        assert self.tls is not None
        return self.tls.server_context()

    async def stream_connected(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, listener_name: str
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.connection_tasks.add(task)
        ssl_object = writer.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        _PEER_CERT.set(der)
        if der is not None:
            self._serials[task] = (writer, x509.load_der_x509_certificate(der).serial_number)
        try:
            await super().stream_connected(reader, writer, listener_name)
        except OSError as err:  # the client reset the connection, e.g. after a refused CONNECT
            log.debug("connection ended: %r", err)
        finally:
            self.connection_tasks.discard(task)
            self._serials.pop(task, None)
            writer.close()
            # The client may have reset the connection (OSError); a cancellation here comes from
            # stop() and must not escape: asyncio 3.11 logs a cancelled connection task as an error.
            with contextlib.suppress(OSError, asyncio.CancelledError):
                await writer.wait_closed()

    async def close_revoked(self, interval_s: float = 1.0) -> None:
        """Runs while the broker does: every ``interval_s`` the CRL is re-read (if it changed) and the
        connections of certificates it revokes are closed (their sessions end; they cannot return)."""
        assert self.revocations is not None
        while True:
            await asyncio.sleep(interval_s)
            revoked = self.revocations.refresh()
            for writer, serial in list(self._serials.values()):
                if serial in revoked and not writer.is_closing():
                    log.warning("closing the MQTT connection of revoked certificate %x", serial)
                    self.closed_revoked += 1
                    writer.close()

    # ---- identity and topic ACL (only with tls and acl) ---------------------------------------------

    async def _initialize_client_session(
        self, reader: Any, writer: Any, remote_address: str, remote_port: int
    ) -> tuple[BrokerProtocolHandler, Session]:
        """amqtt's session set-up, except that with TLS the session is the certificate's: the client
        id becomes the certificate CN (as Mosquitto's ``use_username_as_clientid``) before any
        session is looked up, taken over or deleted, so no connection touches another identity's
        session. A connection without a usable identity gets a throwaway id (and is refused)."""
        if self.tls is None:
            return await super()._initialize_client_session(reader, writer, remote_address, remote_port)
        try:
            handler, session = await BrokerProtocolHandler.init_from_connect(
                reader, writer, self.plugins_manager
            )
        except MQTTError as err:
            await writer.close()
            raise MQTTError(err) from err
        except (AMQTTError, NoDataError) as err:
            raise AMQTTError(err) from err
        requested, session.client_id = session.client_id, _bound_client_id()
        try:
            self._admitted(session)
        except (SecurityError, ValueError):
            # Refused (revoked, a will on a topic it may not publish): _authenticate says so. Until
            # then it must not touch the session of its client id: amqtt takes a live session over
            # (closing its connection, which publishes the will now on it) before it authenticates,
            # and a refused connection put a will of its own on another's session that way.
            session.client_id = f"{UNAUTHENTICATED}{gen_client_id()}"
        if requested != session.client_id:
            log.debug(
                "MQTT client id %r of %s:%s is %r", requested, remote_address, remote_port, session.client_id
            )
        if session.clean_session:
            await self._delete_session(session.client_id)
            session.parent = 0
        elif session.client_id in self._sessions:
            existing, _handler = self._sessions[session.client_id]
            for name in (
                "will_flag",
                "will_message",
                "will_topic",
                "will_qos",
                "keep_alive",
                "username",
                "password",
            ):
                setattr(existing, name, getattr(session, name))
            session = existing
            session.parent = 1
        else:
            session.parent = 0
        delay = self.config.get("timeout-disconnect-delay", 0)
        if session.keep_alive > 0 and isinstance(delay, int):
            session.keep_alive += delay
        return handler, session

    async def _handle_client_session(
        self,
        reader: Any,
        writer: Any,
        client_session: Session,
        handler: Any,
        server: Any,
        listener_name: str,
    ) -> None:
        """amqtt's (0.12.1, pinned), then a refused connection's throwaway session is forgotten:
        amqtt keeps every session it refused, one more for each refused CONNECT."""
        try:
            await super()._handle_client_session(
                reader, writer, client_session, handler, server, listener_name
            )
        finally:
            client_id = client_session.client_id or ""
            if self.tls is not None and client_id.startswith(UNAUTHENTICATED):
                self._sessions.pop(client_id, None)

    async def _authenticate(self, session: Session, listener: ListenerConfig) -> bool:
        if self.tls is None:
            return bool(await super()._authenticate(session, listener))
        session.edgeward_identity = None  # never the identity of an earlier connection of this session
        try:
            identity = self._admitted(session)
        except (SecurityError, ValueError) as err:
            self.refused_connects += 1
            log.warning("refused MQTT client %r: %s", session.client_id, err)
            return False
        session.edgeward_identity = identity
        return True

    def _admitted(self, session: Session) -> Identity:
        """The identity of the connection whose task is running, when its certificate is usable and
        not revoked and its will (if any) on a topic it may publish; else SecurityError/ValueError."""
        der = _PEER_CERT.get()
        if der is None:
            raise SecurityError("security.authn.no_certificate", "no client certificate")
        identity = Identity.from_certificate(x509.load_der_x509_certificate(der))
        if self.revocations is not None and self.revocations.is_revoked(identity.serial):
            raise SecurityError("security.authn.revoked", f"certificate {identity.serial:x} is revoked")
        if (
            self.acl is not None
            and session.will_flag
            and not self.acl.may_publish(identity, session.will_topic)
        ):
            raise SecurityError("security.acl.will", f"will topic {session.will_topic!r} not allowed")
        return identity

    async def _topic_filtering(self, session: Session, topic: str, action: Action) -> bool:
        if self.acl is None:
            return True
        identity = getattr(session, "edgeward_identity", None)
        if action == Action.PUBLISH:
            allowed = self.acl.may_publish(identity, topic)
        elif action == Action.SUBSCRIBE:
            allowed = self.acl.may_subscribe(identity, topic)
        else:
            allowed = self.acl.may_receive(identity, topic)
        if not allowed:
            self.refused_topics += 1
            if action != Action.RECEIVE:
                log.warning("refused %s of %r to %s", action.value, topic, identity or session.client_id)
        return allowed

    async def _handle_message_delivery(
        self, client_session: Session, handler: Any, wait_deliver: asyncio.Future[Any]
    ) -> bool:
        message = wait_deliver.result()
        if message is not None and message.data is not None and len(message.data) > self.max_payload:
            self.dropped_oversize += 1
            log.warning(
                "dropped a %d-byte message from %s on %r (max_payload %d)",
                len(message.data),
                client_session.client_id,
                message.topic,
                self.max_payload,
            )
            return True  # keep the connection: MQTT 3.1.1 itself sets no size limit to break
        return bool(await super()._handle_message_delivery(client_session, handler, wait_deliver))

    async def _publish_session_retained_messages(self, session: Session) -> None:
        # amqtt's name for the queue of messages that arrived while a persistent session was away.
        handler = self._get_handler(session)
        if handler is None:
            return
        replays = []
        while not session.retained_messages.empty():
            queued = session.retained_messages.get_nowait()
            if not await self._topic_filtering(session, queued.topic, Action.RECEIVE):
                continue
            replays.append(handler.mqtt_publish(queued.topic, queued.data, queued.qos, retain=False))
        for outcome in await asyncio.gather(*replays, return_exceptions=True):
            if isinstance(outcome, Exception):
                log.warning("could not replay a queued message to %s: %r", session.client_id, outcome)

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        topic_filter = subscription[0]
        holders = self._subscriptions.get(topic_filter, ())
        if any(holder.client_id == session.client_id for holder, _qos in holders):
            await super()._publish_retained_messages_for_subscription(subscription, session)


UNAUTHENTICATED = "unauthenticated-"  # the client ids of connections that are refused


def _bound_client_id() -> str:
    """The client id of the connection whose task is running: its certificate's CN."""
    der = _PEER_CERT.get()
    try:
        if der is None:
            raise SecurityError("security.authn.no_certificate", "no client certificate")
        return Identity.from_certificate(x509.load_der_x509_certificate(der)).common_name
    except (SecurityError, ValueError):
        return f"{UNAUTHENTICATED}{gen_client_id()}"


class EmbeddedBroker:
    """An amqtt broker running on the current event loop, as ``async with EmbeddedBroker() as b:``.

    ``port=0`` picks a free port; `url` tells which. Without ``tls`` anonymous clients are allowed
    (plaintext, the local demo only), so bind it to a loopback address (the default) unless the
    network around it is trusted. With ``tls`` every client needs a certificate of the fleet CA and
    the topic ACL of ``topic_prefix`` applies (`edgeward.security.mqtt_acl`).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        max_payload: int = 256 * 1024,
        tls: TlsFiles | None = None,
        topic_prefix: str = "edgeward/v1",
    ) -> None:
        if not host:
            raise ValueError("host must be an explicit address (amqtt's default is 0.0.0.0)")
        if not 0 <= port < 65536:
            raise ValueError(f"invalid port {port!r}")
        self.host = host
        self._requested_port = port
        self.max_payload = max_payload
        self.tls = tls
        self.acl = TopicAcl(topic_prefix) if tls is not None else None
        self._broker: _Broker | None = None
        self._revocation_task: asyncio.Task[None] | None = None
        self._port: int | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise MqttError("embedded broker is not running")
        return self._port

    @property
    def url(self) -> BrokerURL:
        """Where it listens (with TLS: ``mqtts://`` and the CA to verify it; clients add their own
        certificate)."""
        if self.tls is None:
            return BrokerURL(host=self.host, port=self.port)
        return BrokerURL(host=self.host, port=self.port, tls=True, ca_file=str(self.tls.ca_file))

    @property
    def refused(self) -> dict[str, int]:
        """Connections and topics the TLS/ACL checks refused."""
        if self._broker is None:
            return {"connect": 0, "topic": 0}
        return {"connect": self._broker.refused_connects, "topic": self._broker.refused_topics}

    @property
    def dropped_oversize(self) -> int:
        """Messages dropped because their payload exceeded ``max_payload``."""
        return 0 if self._broker is None else self._broker.dropped_oversize

    @property
    def session_ids(self) -> set[str]:
        """Client ids of the sessions the broker holds: connected, or kept for a client that
        disconnected with a persistent session (amqtt sweeps the others away once a second)."""
        return set() if self._broker is None else set(self._broker._sessions)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        if self._broker is not None:
            raise MqttError("embedded broker already started")
        for name in _QUIET_LOGGERS:
            # Both log every connection and state change at INFO; respect an explicit setting.
            logger = logging.getLogger(name)
            if logger.level == logging.NOTSET:
                logger.setLevel(logging.WARNING)
        listener = ListenerConfig(type=ListenerType.TCP, bind=f"{self.host}:{self._requested_port}")
        if self.tls is not None:
            listener = ListenerConfig(
                type=ListenerType.TCP,
                bind=f"{self.host}:{self._requested_port}",
                ssl=True,
                cafile=self.tls.ca_file,
                certfile=self.tls.cert_file,
                keyfile=self.tls.key_file,
            )
        config = BrokerConfig(
            listeners={"default": listener},
            plugins={f"{__name__}.{_AcceptAll.__name__}": {}},
        )
        try:
            broker = _Broker(config, self.max_payload, self.tls, self.acl)
            await broker.start()
        except SecurityError as err:  # unreadable CA or CRL
            raise MqttError(f"embedded broker TLS setup failed: {err}") from err
        except BrokerError as err:  # e.g. the port is taken
            raise MqttError(
                f"embedded broker cannot listen on {self.host}:{self._requested_port}: {err}"
            ) from err
        self._broker = broker
        if broker.revocations is not None:
            self._revocation_task = asyncio.get_running_loop().create_task(
                broker.close_revoked(), name="edgeward-broker-revocations"
            )
        # amqtt has no public accessor for the bound address, needed when port 0 picked one.
        server = broker._servers["default"].instance
        self._port = server.sockets[0].getsockname()[1]
        log.info("embedded MQTT broker listening on %s", self.url)

    async def stop(self) -> None:
        broker, self._broker = self._broker, None
        if broker is None:
            return
        task, self._revocation_task = self._revocation_task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await broker.shutdown()
        if broker.connection_tasks:
            _done, stuck = await asyncio.wait(broker.connection_tasks, timeout=_STOP_TIMEOUT_S)
            for task in stuck:
                task.cancel()
            await asyncio.gather(*stuck, return_exceptions=True)
        self._port = None
