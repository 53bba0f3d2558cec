"""Orchestrator-wide notifications: one bus, three outlets.

Every component that has something an operator or a team should hear about (a model version was
published, a rollout advanced or rolled back, a wipe was confirmed, a node failed attestation, the
slowdown detector raised an alert) calls :meth:`EventBus.publish`. The bus

* keeps the last ``history`` events in memory (``EventService.List`` and Watch replay),
* fans each event out to the live ``EventService.Watch`` streams (a watcher that falls more than
  ``depth`` events behind loses its oldest ones, counted in ``dropped``),
* hands each event to the MQTT outlet, which publishes it on ``{prefix}/events/{kind}``.

Events are notifications, not the record of truth: rollout history, wipe confirmations and
attestation results live in the store. The bus is used from the orchestrator's event loop only;
``publish_threadsafe`` is the door for code running on the store or blocking pools.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Iterable

import grpc

from edgeward.v1 import events_pb2, events_pb2_grpc, node_pb2

log = logging.getLogger(__name__)

KIND_RE = re.compile(r"[a-z][a-z0-9_]*(\.[a-z0-9_]+)+")
MAX_ATTRIBUTE_LEN = 512
INFO, WARNING, ERROR = node_pb2.SEVERITY_INFO, node_pb2.SEVERITY_WARNING, node_pb2.SEVERITY_ERROR


def matches(event: events_pb2.Notification, flt: events_pb2.EventFilter | None) -> bool:
    if flt is None:
        return True
    return (
        event.kind.startswith(flt.kind_prefix)
        and event.subject.startswith(flt.subject_prefix)
        and event.severity >= flt.min_severity
    )


class EventBus:
    def __init__(self, history: int = 10_000, depth: int = 1024) -> None:
        self._history: deque[events_pb2.Notification] = deque(maxlen=history)
        self._subscribers: set[asyncio.Queue[events_pb2.Notification]] = set()
        self._outlets: list[Callable[[events_pb2.Notification], None]] = []
        self._depth = depth
        self._seq = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self.dropped = 0
        self.published: Counter[str] = Counter()

    # ------------------------------------------------------------ producing

    def publish(
        self,
        kind: str,
        subject: str,
        message: str,
        severity: node_pb2.Severity = INFO,
        /,
        **attributes: object,
    ) -> events_pb2.Notification:
        """Record and fan out one event. ``kind`` is dotted lower case (``rollout.rollback``). The
        fixed parameters are positional-only, so an attribute may have any name (a node's own event
        relays attributes it chose: ``kind`` or ``subject`` among them)."""
        if not KIND_RE.fullmatch(kind):
            raise ValueError(f"event kind {kind!r} must be dotted lower case, e.g. 'model.published'")
        self._seq += 1
        event = events_pb2.Notification(
            seq=self._seq,
            time_unix_ms=int(time.time() * 1000),
            kind=kind,
            severity=severity,
            subject=subject,
            message=message,
            attributes={k: str(v)[:MAX_ATTRIBUTE_LEN] for k, v in attributes.items() if v is not None},
        )
        self._history.append(event)
        self.published[kind] += 1
        for queue in self._subscribers:
            if queue.full():
                queue.get_nowait()
                self.dropped += 1
            queue.put_nowait(event)
        for outlet in self._outlets:
            try:
                outlet(event)
            except Exception:  # an outlet must never take the producer down
                log.exception("event outlet failed on %s", kind)
        if severity >= WARNING:
            log.warning("%s %s: %s", kind, subject, message)
        return event

    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def publish_threadsafe(
        self, kind: str, subject: str, message: str, severity: node_pb2.Severity = INFO, /, **attrs: object
    ) -> None:
        if self._loop is None:
            raise RuntimeError("EventBus.bind_loop was not called")
        self._loop.call_soon_threadsafe(lambda: self.publish(kind, subject, message, severity, **attrs))

    def add_outlet(self, outlet: Callable[[events_pb2.Notification], None]) -> None:
        self._outlets.append(outlet)

    # ------------------------------------------------------------ consuming

    def recent(
        self, flt: events_pb2.EventFilter | None = None, limit: int = 100
    ) -> list[events_pb2.Notification]:
        """The newest ``limit`` matching events, oldest first."""
        out: list[events_pb2.Notification] = []
        for event in reversed(self._history):
            if matches(event, flt):
                out.append(event)
                if len(out) >= limit:
                    break
        out.reverse()
        return out

    def since(self, seq: int, flt: events_pb2.EventFilter | None = None) -> Iterable[events_pb2.Notification]:
        return [e for e in self._history if e.seq > seq and matches(e, flt)]

    async def watch(
        self, flt: events_pb2.EventFilter | None = None, after_seq: int = 0
    ) -> AsyncIterator[events_pb2.Notification]:
        queue: asyncio.Queue[events_pb2.Notification] = asyncio.Queue(self._depth)
        self._subscribers.add(queue)  # before the replay, so nothing falls between the two
        try:
            last = 0
            if after_seq:
                for event in self.since(after_seq, flt):
                    last = event.seq
                    yield event
            while True:
                event = await queue.get()
                if event.seq > last and matches(event, flt):
                    yield event
        finally:
            self._subscribers.discard(queue)

    @property
    def watchers(self) -> int:
        return len(self._subscribers)

    @property
    def last_seq(self) -> int:
        return self._seq


class EventService(events_pb2_grpc.EventServiceServicer):
    """``edgeward.v1.EventService``: the bus's history and live stream over gRPC."""

    def __init__(self, bus: EventBus) -> None:
        self._bus = bus

    async def List(
        self, request: events_pb2.ListEventsRequest, context: grpc.aio.ServicerContext
    ) -> events_pb2.ListEventsResponse:
        flt = request.filter if request.HasField("filter") else None
        return events_pb2.ListEventsResponse(events=self._bus.recent(flt, min(request.limit or 100, 10_000)))

    async def Watch(
        self, request: events_pb2.WatchEventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[events_pb2.Notification]:
        flt = request.filter if request.HasField("filter") else None
        async for event in self._bus.watch(flt, request.after_seq):
            yield event
