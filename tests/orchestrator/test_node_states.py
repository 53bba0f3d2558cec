"""The store's side of the shared ingest (orchestrator/node_states.py): merges are ordered and
idempotent, a reader with a cursor per writer sees every change once, liveness is read on the
database's clock; on both engines, and with two writers at once on PostgreSQL."""

from __future__ import annotations

import threading

import pytest

from edgeward.v1 import node_pb2
from orchestrator.config import OrchestratorConfig
from orchestrator.node_states import Cursor, Merge, NodeStates
from orchestrator.shared_ingest import status_digest
from orchestrator.store import SqlStore

RUNNING = node_pb2.REPLICA_PHASE_RUNNING


def status(node: str, epoch: int, seq: int, phase: int = RUNNING) -> tuple[int, int, bytes, bytes]:
    st = node_pb2.Status(
        state=node_pb2.NODE_STATE_ONLINE,
        status_seq=seq,
        epoch=epoch,
        replicas=[node_pb2.ReplicaReport(replica_id="r1", phase=phase)],
    )
    msg = node_pb2.NodeMessage(schema=1, node_id=node, sent_unix_ms=epoch + seq, status=st)
    return epoch, seq, status_digest(st), msg.SerializeToString()


def telemetry(node: str, sent_ms: int, inferences: int) -> tuple[int, bytes]:
    t = node_pb2.Telemetry(models=[node_pb2.ModelStats(model_name="m", inferences=inferences)])
    return sent_ms, node_pb2.NodeMessage(
        schema=1, node_id=node, sent_unix_ms=sent_ms, telemetry=t
    ).SerializeToString()


def read(
    states: NodeStates, kind: str, cursors: dict[str, Cursor], me: str = "reader", limit: int = 5000
) -> list:
    rows = states.changed_since(kind, cursors, me, limit)
    for row in rows:
        cursors[row.writer] = max(cursors.get(row.writer, row.cursor), row.cursor)
    return rows


@pytest.fixture
def states(tmp_path, store_url):
    store = SqlStore(tmp_path, store_url)
    states = NodeStates(store.engine)
    yield states
    states.close()
    store.close()


def test_statuses_merge_newest_first_and_a_repeat_changes_nothing(states):
    cursors: dict[str, Cursor] = {}
    states.merge("a", 1, Merge({"n1": status("n1", 100, 5, node_pb2.REPLICA_PHASE_LOADING)}, {}, ["n1"]))
    assert [(r.node_id, r.writer, r.seq) for r in read(states, "status", cursors)] == [("n1", "a", 1)]
    # An older status (another replica got it late) and the same one again (redelivered): no change.
    states.merge("b", 1, Merge({"n1": status("n1", 100, 4)}, {}, ["n1"]))
    states.merge("b", 2, Merge({"n1": status("n1", 100, 5, node_pb2.REPLICA_PHASE_LOADING)}, {}, []))
    assert read(states, "status", cursors) == []
    # A heartbeat repeating the state moves the order on, and is not a change to read.
    states.merge("b", 3, Merge({"n1": status("n1", 100, 6, node_pb2.REPLICA_PHASE_LOADING)}, {}, ["n1"]))
    assert read(states, "status", cursors) == []
    # Seq 6 is stored: a status 5 saying something else now loses.
    states.merge("a", 2, Merge({"n1": status("n1", 100, 5)}, {}, []))
    assert read(states, "status", cursors) == []
    # A real change, and a newer connection (epoch) wins over any seq of the older one.
    states.merge("b", 4, Merge({"n1": status("n1", 100, 7)}, {}, []))
    states.merge("a", 3, Merge({"n1": status("n1", 200, 0, node_pb2.REPLICA_PHASE_FAILED)}, {}, []))
    rows = read(states, "status", cursors)
    assert [(r.writer, r.seq) for r in rows] == [("a", 3)], "one row per node, as it is now"
    latest = node_pb2.NodeMessage.FromString(rows[0].message).status
    assert (latest.epoch, latest.replicas[0].phase) == (200, node_pb2.REPLICA_PHASE_FAILED)


def test_telemetry_keeps_the_newest_sample_and_skips_the_writers_own(states):
    states.merge("a", 1, Merge({}, {"n1": telemetry("n1", 1000, 10), "n2": telemetry("n2", 1000, 1)}, []))
    states.merge("b", 1, Merge({}, {"n1": telemetry("n1", 900, 9)}, []))  # late: older than stored
    states.merge("b", 2, Merge({}, {"n1": telemetry("n1", 1000, 10)}, []))  # redelivered: the same
    assert read(states, "telemetry", {}, me="a") == [], "a's own rows, and nothing newer from b"
    states.merge("b", 3, Merge({}, {"n1": telemetry("n1", 2000, 25)}, []))
    rows = read(states, "telemetry", {"a": (1, "")}, me="a")
    assert [(r.node_id, r.writer) for r in rows] == [("n1", "b")]
    stats = node_pb2.NodeMessage.FromString(rows[0].message).telemetry.models[0]
    assert stats.inferences == 25


def test_a_reader_with_a_cursor_per_writer_sees_every_change_once(states):
    cursors: dict[str, Cursor] = {}
    seen = []
    for flush in range(1, 31):
        writer = "ab"[flush % 2]
        node = f"n{flush % 7}"
        states.merge(writer, flush, Merge({node: status(node, 100, flush, phase=flush % 5 + 1)}, {}, [node]))
        if flush % 4 == 0:
            seen += [(r.node_id, r.writer, r.seq) for r in read(states, "status", cursors)]
    seen += [(r.node_id, r.writer, r.seq) for r in read(states, "status", cursors)]
    assert len(seen) == len(set(seen)), "no change read twice"
    assert {n for n, _, _ in seen} == {f"n{i}" for i in range(7)}
    assert read(states, "status", cursors) == []


@pytest.mark.parametrize("kind", ["status", "telemetry"])
def test_a_flush_that_changed_more_nodes_than_one_read_returns_is_read_whole(states, kind):
    """Pages of 5 through flushes of 12 and 7 nodes (and a flush of nodes only heard, which has
    nothing to read): every change is read once, none is skipped where a page ends inside a flush."""
    nodes = [f"n{i:02d}" for i in range(12)]
    states.merge("a", 1, Merge({}, {}, [f"quiet{i}" for i in range(9)]))

    def change(flush: int, names: list[str]) -> Merge:
        if kind == "status":
            return Merge({n: status(n, 100, flush, phase=flush % 5 + 1) for n in names}, {}, names)
        return Merge({}, {n: telemetry(n, 1000 * flush, flush) for n in names}, names)

    states.merge("a", 2, change(2, nodes))
    others = [f"m{i}" for i in range(7)]
    states.merge("b", 1, change(3, others))
    cursors: dict[str, Cursor] = {}
    seen = []
    while page := read(states, kind, cursors, limit=5):
        assert len(page) <= 5
        seen += [(r.node_id, r.writer, r.seq) for r in page]
    assert len(seen) == len(set(seen)) == 19
    assert sorted(seen) == sorted([(n, "a", 2) for n in nodes] + [(n, "b", 1) for n in others])
    states.merge("a", 3, change(4, nodes[5:]))
    assert sorted(r.node_id for r in read(states, kind, cursors, limit=50)) == nodes[5:]


def test_liveness_is_read_on_the_databases_clock(states):
    states.merge("a", 1, Merge({}, {}, ["n1", "n2"]))
    now, ids, seen = states.seen_since(0)
    assert sorted(ids) == ["n1", "n2"]
    assert all(0 <= now - s < 60_000 for s in seen)
    states.merge("b", 1, Merge({}, {}, ["n2"]))
    _, later, _ = states.seen_since(max(seen))
    assert later == ["n2"]


def test_two_replicas_merging_the_same_nodes_at_once(tmp_path, postgres_url):
    """Row locks taken in node order: no deadlock, no serialization failure surfaces; the newest of
    either writer is kept for every node."""
    stores = [SqlStore(tmp_path / w, postgres_url) for w in "ab"]
    writers = [NodeStates(s.engine) for s in stores]
    nodes = [f"n{i:03d}" for i in range(200)]
    errors: list[BaseException] = []

    def write(k: int) -> None:
        try:
            for flush in range(1, 21):
                seq = 2 * flush + k
                merge = Merge({n: status(n, 100, seq, phase=seq % 5 + 1) for n in nodes}, {}, nodes)
                writers[k].merge("ab"[k], flush, merge)
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=write, args=(k,)) for k in (0, 1)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert errors == []
        rows = read(writers[0], "status", {}, me="x")
        newest = {r.node_id: node_pb2.NodeMessage.FromString(r.message).status.status_seq for r in rows}
        assert newest == dict.fromkeys(nodes, 41)
    finally:
        for w in writers:
            w.close()
        for s in stores:
            s.close()


PG = "postgresql://edgeward@127.0.0.1:5432/edgeward"


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"broker": {"url": "mqtt://127.0.0.1:1883", "ingest": "shared"}}, "needs state.url"),
        ({"state": {"url": PG}, "broker": {"ingest": "shared"}}, "embedded broker has none"),
        (
            {"state": {"url": PG}, "broker": {"url": "mqtt://127.0.0.1:1", "ingest": "jetstream"}},
            "broker.jetstream",
        ),
        (
            {
                "state": {"url": PG},
                "broker": {
                    "url": "mqtt://127.0.0.1:1",
                    "ingest": "jetstream",
                    "jetstream": {"urls": ["http://x"]},
                },
            },
            "nats://host:port",
        ),
        (
            {
                "state": {"url": PG},
                "broker": {
                    "url": "mqtt://127.0.0.1:1",
                    "topic_prefix": "acme.eu/edgeward",
                    "ingest": "jetstream",
                    "jetstream": {"urls": ["nats://127.0.0.1:4222"]},
                },
            },
            r"broker.topic_prefix: 'acme.eu/edgeward' has a '\.'",
        ),
        ({"broker": {"topic_prefix": "a.b", "event_topic_levels": True}}, "cannot carry in a topic"),
    ],
)
def test_shared_ingest_settings_are_checked_when_loaded(settings, message):
    with pytest.raises(ValueError, match=message):
        OrchestratorConfig.model_validate(settings)


def test_the_default_is_one_replica_hearing_everything():
    config = OrchestratorConfig()
    assert config.broker.ingest == "all"
    assert config.broker.jetstream is None


@pytest.mark.parametrize(
    ("node_id", "prefix", "field"),
    [("edge-01.site-a", "edgeward/v1", "node_id"), ("edge-01", "acme.eu/edgeward", "broker.topic_prefix")],
)
def test_an_agent_on_nats_refuses_a_dot_where_nats_cannot_carry_it(tmp_path, node_id, prefix, field):
    from node_agent.config import AgentConfig

    settings = {"node_id": node_id, "state_dir": str(tmp_path), "broker": {"topic_prefix": prefix}}
    AgentConfig.model_validate(settings)  # fine on an MQTT broker
    with pytest.raises(ValueError, match=f"{field}: .* has a '\\.'"):
        AgentConfig.model_validate({**settings, "broker": {"topic_prefix": prefix, "nats": True}})
