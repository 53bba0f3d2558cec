"""The nodes' statuses and telemetry from a NATS JetStream stream that the replicas share
(``broker.ingest: jetstream``; docs/scale-out.md, "Ingest").

NATS's MQTT gateway turns the nodes' MQTT topics into NATS subjects ('/' becomes '.'):
``edgeward/v1/nodes/n1/status`` is ``edgeward.v1.nodes.n1.status``. A work-queue stream captures the
subjects of statuses and telemetry, replicated over the cluster's servers; one durable pull
consumer, shared by every replica, hands each message to one of them. A replica acknowledges a batch
only once its merge into the store has committed: a message taken by a replica that dies before
that goes to another replica after ``ack_wait_s`` (at least once; the merge makes a repeat harmless).
The gateway itself keeps serving the agents' MQTT sessions, retained hellos and the orchestrator's
commands; only this stream is read with NATS's own client (nats-py).
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
import time
from typing import Any

from edgeward.mqtt.session import Message

from .errors import OrchestratorError

log = logging.getLogger(__name__)

FETCH_WAIT_S = 1.0  # a fetch returns what is there, or waits this long for the first message
SETUP_S = 60.0  # a cluster's JetStream elects its leaders first: creating the stream waits that long


class JetStreamError(OrchestratorError):
    """The JetStream source could not be set up (no server, JetStream off, a stream of another shape)."""


def subject_prefix(topic_prefix: str) -> str:
    """``edgeward/v1`` -> ``edgeward.v1``: how NATS's MQTT gateway names the topics' subjects."""
    return topic_prefix.replace("/", ".")


def names(topic_prefix: str) -> tuple[str, str]:
    """(stream, durable consumer) names for a topic prefix: one stream per installation."""
    slug = re.sub(r"[^A-Za-z0-9_-]", "_", topic_prefix)
    return f"edgeward-ingest-{slug}", "edgeward-ingest"


class JetStreamIngest:
    """``async with JetStreamIngest(...) as source:`` then ``await source.next_batch(n)`` and, once
    the batch is merged, ``await source.ack(batch)``."""

    def __init__(
        self,
        urls: list[str],
        topic_prefix: str,
        *,
        kinds: tuple[str, ...],
        tls: ssl.SSLContext | None = None,
        stream_replicas: int = 3,
        ack_wait_s: float = 5.0,
        max_age_s: float = 3600.0,
        name: str = "edgeward-orchestrator",
    ) -> None:
        self.urls = urls
        self.topic_prefix = topic_prefix
        self._subjects = [f"{subject_prefix(topic_prefix)}.nodes.*.{kind}" for kind in kinds]
        self.stream, self.durable = names(topic_prefix)
        self._tls = tls
        self._replicas = stream_replicas
        self._ack_wait_s = ack_wait_s
        self._max_age_s = max_age_s
        self._name = name
        self._nc: Any = None
        self._sub: Any = None
        self.received = 0
        self.redelivered = 0

    async def __aenter__(self) -> JetStreamIngest:
        import nats  # the 'nats' extra; only this source needs it

        try:
            self._nc = await nats.connect(
                servers=self.urls,
                name=self._name,
                tls=self._tls,
                allow_reconnect=True,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.5,
                connect_timeout=5,
                error_cb=self._error,
                disconnected_cb=self._disconnected,
            )
        except Exception as err:
            raise JetStreamError(f"cannot connect to NATS at {', '.join(self.urls)}: {err}") from err
        try:
            await self._subscribe()
        except BaseException:
            await self._nc.close()
            raise
        log.info("shared ingest: JetStream stream %s, durable consumer %s", self.stream, self.durable)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._nc is not None:
            await self._nc.close()
            self._nc = None

    async def _error(self, err: Exception) -> None:
        log.warning("NATS: %s", err)

    async def _disconnected(self) -> None:
        log.warning("NATS connection lost; reconnecting")

    async def _subscribe(self) -> None:
        from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StorageType, StreamConfig
        from nats.js.errors import NotFoundError

        js = self._nc.jetstream()
        config = StreamConfig(
            name=self.stream,
            subjects=self._subjects,
            retention=RetentionPolicy.WORK_QUEUE,  # a message goes once a replica acknowledged it
            storage=StorageType.FILE,
            num_replicas=self._replicas,
            max_age=self._max_age_s,
        )
        consumer = ConsumerConfig(
            durable_name=self.durable,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self._ack_wait_s,
            max_ack_pending=50_000,
        )
        deadline = time.monotonic() + SETUP_S
        while True:
            try:
                try:
                    await js.stream_info(self.stream)
                except NotFoundError:
                    await js.add_stream(config)
                try:
                    await js.consumer_info(self.stream, self.durable)
                except NotFoundError:
                    await js.add_consumer(self.stream, consumer)  # every subject of the stream
                self._sub = await js.pull_subscribe_bind(durable=self.durable, stream=self.stream)
                return
            except Exception as err:  # the cluster still electing; another replica creating it too
                if time.monotonic() > deadline:
                    raise JetStreamError(f"cannot set up JetStream stream {self.stream}: {err}") from err
                log.info("JetStream not ready (%s); retrying", err)
                await asyncio.sleep(0.5)

    async def next_batch(self, limit: int) -> list[tuple[Message, Any]]:
        """Up to ``limit`` messages (as MQTT messages: topic, payload, QoS 1), each with the handle to
        acknowledge it; an empty list when none came within ``FETCH_WAIT_S`` or NATS is away."""
        try:
            msgs = await self._sub.fetch(limit, timeout=FETCH_WAIT_S)
        except TimeoutError:  # nats.errors.TimeoutError, or asyncio's from inside the client
            return []
        except Exception as err:  # disconnected (the client reconnects by itself), a leader election
            log.warning("JetStream fetch failed: %r", err)
            await asyncio.sleep(FETCH_WAIT_S)
            return []
        out = []
        for msg in msgs:
            self.received += 1
            if msg.metadata.num_delivered > 1:
                self.redelivered += 1
            out.append((Message(msg.subject.replace(".", "/"), msg.data, 1, False), msg))
        return out

    async def ack(self, batch: list[tuple[Message, Any]]) -> None:
        for _, msg in batch:
            await msg.ack()
