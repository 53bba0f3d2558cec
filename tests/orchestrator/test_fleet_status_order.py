"""Status ordering by (epoch, status_seq): a node's last will OFFLINE is fixed when it connects, so
its timestamp is older than the statuses it replaces; the epoch and the final sequence number say
where it belongs (edgeward.wire.status_key, docs/wire.md)."""

from __future__ import annotations

from edgeward.v1 import node_pb2
from edgeward.wire import FINAL_STATUS_SEQ, node_message, status_key
from orchestrator.fleet import Fleet

ONLINE, OFFLINE = node_pb2.NODE_STATE_ONLINE, node_pb2.NODE_STATE_OFFLINE


def status(state: int, epoch: int, seq: int, sent_ms: int) -> node_pb2.NodeMessage:
    msg = node_message("n1", status=node_pb2.Status(state=state, epoch=epoch, status_seq=seq))
    msg.sent_unix_ms = sent_ms
    return msg


def will(epoch: int) -> node_pb2.NodeMessage:
    """What the agent gives the broker at connect time: sent_unix_ms is the connection's start."""
    return status(OFFLINE, epoch, FINAL_STATUS_SEQ, sent_ms=epoch)


def test_a_consumer_keeping_the_newest_by_key_takes_the_will_and_a_timestamp_one_would_not():
    statuses = [status(ONLINE, 1000, 1, 1000), status(ONLINE, 1000, 2, 6000), will(1000)]
    by_time = max(statuses, key=lambda m: m.sent_unix_ms)
    by_key = max(statuses, key=lambda m: status_key(m.status))
    assert by_time.status.state == ONLINE, "the bug this ordering fixes"
    assert by_key.status.state == OFFLINE
    # The next connection's statuses are newer than the will of the one before.
    assert status_key(status(ONLINE, 7000, 3, 7000).status) > status_key(will(1000).status)


def test_the_fleet_applies_the_will_of_the_current_connection_and_ignores_an_older_one():
    fleet = Fleet()
    fleet.apply(status(ONLINE, 1000, 1, 1000))
    fleet.apply(status(ONLINE, 1000, 2, 6000))
    assert fleet.apply(will(1000)) == "status"
    assert fleet.nodes["n1"].state == OFFLINE
    # A status of that connection delivered late (QoS 1 redelivery) does not bring it back.
    assert fleet.apply(status(ONLINE, 1000, 2, 6000)) is None
    assert fleet.nodes["n1"].state == OFFLINE
    # The node reconnects: a new epoch; then the broker publishes the old connection's will
    # (client-id takeover) after the new connection's first status. It is stale: ignored.
    assert fleet.apply(status(ONLINE, 7000, 3, 7000)) == "status"
    assert fleet.apply(will(1000)) is None
    assert fleet.nodes["n1"].state == ONLINE
    # The will of the current connection still applies, whatever its timestamp.
    assert fleet.apply(will(7000)) == "status"
    assert fleet.nodes["n1"].state == OFFLINE


def test_statuses_without_an_epoch_keep_the_old_rules():
    fleet = Fleet()
    fleet.apply(status(ONLINE, 0, 5, 1000))
    assert fleet.apply(status(ONLINE, 0, 4, 2000)) is None  # older sequence number
    assert fleet.apply(status(OFFLINE, 0, 0, 500)) == "status"  # a will without epoch: applies


def test_a_node_naming_new_models_in_every_report_keeps_at_most_its_bound_of_latency_windows():
    from edgeward.wire import MAX_MODEL_STATS

    fleet = Fleet()
    fleet.apply(status(ONLINE, 1000, 1, 1000))
    for rnd in range(3):
        stats = [
            node_pb2.ModelStats(model_name=f"m{rnd}-{i}", inferences=1, latency_p95_ms=1.0)
            for i in range(MAX_MODEL_STATS)
        ]
        fleet.apply(node_message("n1", telemetry=node_pb2.Telemetry(models=stats)))
    latency = fleet.nodes["n1"].latency
    assert len(latency) == MAX_MODEL_STATS
    assert next(iter(latency)).startswith("m2-")  # the newest kept, the oldest gone
