"""The notification bus on its own: ordering, filters, replay, slow watchers, bad kinds."""

from __future__ import annotations

import asyncio

import pytest

from edgeward.v1 import events_pb2, node_pb2
from orchestrator.events import EventBus, matches


def test_publish_orders_filters_and_bounds_history():
    bus = EventBus(history=3)
    for i in range(5):
        bus.publish("model.published", f"model/m{i}:1.0.0", f"m{i}")
    bus.publish("rollout.rollback", "deployment/d", "bad gate", node_pb2.SEVERITY_ERROR, gate="latency")
    recent = bus.recent()
    assert [e.seq for e in recent] == [4, 5, 6], "history keeps only the newest 3"
    assert recent[-1].attributes == {"gate": "latency"}
    flt = events_pb2.EventFilter(kind_prefix="rollout.")
    assert [e.kind for e in bus.recent(flt)] == ["rollout.rollback"]
    assert bus.recent(events_pb2.EventFilter(subject_prefix="model/m4"))[0].message == "m4"
    assert not matches(recent[0], events_pb2.EventFilter(min_severity=node_pb2.SEVERITY_WARNING))
    assert bus.recent(limit=1)[0].seq == 6
    assert bus.published["model.published"] == 5


@pytest.mark.parametrize("kind", ["", "Model.published", "model", "model/published", "model.+", ".x"])
def test_bad_kind_is_refused(kind):
    with pytest.raises(ValueError, match="dotted lower case"):
        EventBus().publish(kind, "s", "m")


async def test_watch_replays_then_follows_and_slow_watcher_loses_oldest():
    bus = EventBus(depth=2)
    bus.publish("a.one", "s", "1")
    bus.publish("a.two", "s", "2")
    stream = bus.watch(after_seq=1)
    assert (await anext(stream)).seq == 2  # replayed
    bus.publish("a.three", "s", "3")
    assert (await anext(stream)).seq == 3  # live
    for i in range(4):  # the watcher is not reading: its queue of 2 keeps the newest two
        bus.publish("a.more", "s", str(i))
    got = [(await anext(stream)).message for _ in range(2)]
    assert got == ["2", "3"] and bus.dropped == 2
    await stream.aclose()
    assert bus.watchers == 0


async def test_outlet_failure_does_not_break_publish():
    bus = EventBus()
    seen = []
    bus.add_outlet(lambda e: (_ for _ in ()).throw(RuntimeError("outlet down")))
    bus.add_outlet(seen.append)
    bus.publish("x.y", "s", "m")
    assert [e.kind for e in seen] == ["x.y"]
    await asyncio.sleep(0)
