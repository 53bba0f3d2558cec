"""Boundary validation of MQTT payloads: bad ones raise a WireError with a reason id."""

import contextlib
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgeward.v1 import node_pb2
from edgeward.wire import WireError, decode_command, decode_node_message, node_message

STATUS = node_message("n1", status=node_pb2.Status(state=node_pb2.NODE_STATE_ONLINE)).SerializeToString()


def test_valid_status_decodes():
    msg = decode_node_message(STATUS, node_id="n1", kind="status")
    assert msg.status.state == node_pb2.NODE_STATE_ONLINE


@pytest.mark.parametrize(
    ("payload", "node_id", "kind", "reason"),
    [
        (STATUS, "n2", "status", "wire.payload.wrong_node"),
        (STATUS, "n1", "telemetry", "wire.payload.wrong_body"),
        (STATUS, "n1", "cmd", "wire.topic.unknown_kind"),
        (b"\xff\xff\xff\xff", "n1", "status", "wire.payload.unparseable"),
        (b"x" * 300_000, "n1", "status", "wire.payload.too_large"),
        (
            node_pb2.NodeMessage(schema=7, node_id="n1").SerializeToString(),
            "n1",
            "status",
            "wire.payload.unknown_schema",
        ),
        (b"", "n1", "status", "wire.payload.unknown_schema"),
    ],
)
def test_bad_node_payloads(payload, node_id, kind, reason):
    with pytest.raises(WireError) as info:
        decode_node_message(payload, node_id=node_id, kind=kind)
    assert info.value.reason == reason


def _hello(**figures) -> bytes:
    accelerators = [
        node_pb2.Accelerator(kind="cpu-litert", peak_gops=0.0, idle_w=0.0, active_w=0.0),
        node_pb2.Accelerator(kind="npu", **{"peak_gops": 4.0, "idle_w": 0.5, "active_w": 2.0, **figures}),
    ]
    return node_message("n1", hello=node_pb2.Hello(accelerators=accelerators)).SerializeToString()


def test_a_hello_with_finite_non_negative_figures_decodes():
    assert len(decode_node_message(_hello(), node_id="n1", kind="hello").hello.accelerators) == 2


@pytest.mark.parametrize("name", ["peak_gops", "idle_w", "active_w"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, -1.0, -1e308])
def test_a_hello_with_figures_the_scheduler_cannot_rank_with_is_refused(name, value):
    """One node's NaN watts made the energy score NaN for every node (every placement in the fleet
    unschedulable); negative watts made that node win every placement."""
    with pytest.raises(WireError) as info:
        decode_node_message(_hello(**{name: value}), node_id="n1", kind="hello")
    assert info.value.reason == "wire.hello.invalid_value"
    assert info.value.detail.startswith(f"hello.accelerators[1].{name}: ")


def test_commands_need_id_body_and_right_node():
    ok = node_pb2.Command(
        schema=1, command_id="c1", node_id="n1", undeploy=node_pb2.UndeployReplica(replica_id="r")
    )
    assert decode_command(ok.SerializeToString(), node_id="n1").command_id == "c1"
    for cmd, reason in [
        (
            node_pb2.Command(schema=1, command_id="c1", node_id="n2", undeploy=ok.undeploy),
            "wire.payload.wrong_node",
        ),
        (node_pb2.Command(schema=1, node_id="n1", undeploy=ok.undeploy), "wire.command.no_id"),
        (node_pb2.Command(schema=1, command_id="c", node_id="n1"), "wire.command.empty"),
    ]:
        with pytest.raises(WireError) as info:
            decode_command(cmd.SerializeToString(), node_id="n1")
        assert info.value.reason == reason


@given(st.binary(max_size=2048), st.sampled_from(["hello", "status", "telemetry", "events", "evidence"]))
def test_random_bytes_never_escape_as_another_error(payload, kind):
    with contextlib.suppress(WireError):
        decode_node_message(payload, node_id="n1", kind=kind)


@given(st.binary(max_size=2048))
def test_random_command_bytes_never_escape(payload):
    with contextlib.suppress(WireError):
        decode_command(payload, node_id="n1")


def test_event_topics_are_one_level_or_one_level_per_dotted_part():
    from edgeward.mqtt.topics import TopicError, events_topic

    assert events_topic("rollout.progress", "p/v1") == "p/v1/events/rollout.progress"
    assert events_topic("rollout.progress", "p/v1", levels=True) == "p/v1/events/rollout/progress"
    with pytest.raises(TopicError):
        events_topic("a/b", "p/v1", levels=True)


def _decode(**body):
    return decode_node_message(
        node_message("n1", **body).SerializeToString(), node_id="n1", kind=next(iter(body))
    )


def _refused(reason: str, field: str, **body) -> None:
    with pytest.raises(WireError) as info:
        _decode(**body)
    assert info.value.reason == reason
    assert field in str(info.value)


def test_lists_beyond_what_an_agent_sends_are_refused_with_their_field():
    from edgeward.wire import MAX_HELLO_ACCELERATORS, MAX_HELLO_PROFILES, MAX_MODEL_STATS, MAX_REPLICA_REPORTS

    accelerator = node_pb2.Accelerator(kind="cpu", peak_gops=1)
    profile = node_pb2.ModelProfile(model_name="m", accelerator="cpu", latency_p95_ms=1)
    _decode(hello=node_pb2.Hello(accelerators=[accelerator] * MAX_HELLO_ACCELERATORS))
    _decode(hello=node_pb2.Hello(profiles=[profile] * MAX_HELLO_PROFILES))
    _refused(
        "wire.payload.too_many",
        "hello.accelerators",
        hello=node_pb2.Hello(accelerators=[accelerator] * (MAX_HELLO_ACCELERATORS + 1)),
    )
    _refused(
        "wire.payload.too_many",
        "hello.profiles",
        hello=node_pb2.Hello(profiles=[profile] * (MAX_HELLO_PROFILES + 1)),
    )
    report = node_pb2.ReplicaReport(replica_id="r")
    _decode(status=node_pb2.Status(replicas=[report] * MAX_REPLICA_REPORTS))
    _refused(
        "wire.payload.too_many",
        "status.replicas",
        status=node_pb2.Status(replicas=[report] * (MAX_REPLICA_REPORTS + 1)),
    )
    stats = node_pb2.ModelStats(model_name="m", inferences=1)
    _decode(telemetry=node_pb2.Telemetry(models=[stats] * MAX_MODEL_STATS))
    _refused(
        "wire.payload.too_many",
        "telemetry.models",
        telemetry=node_pb2.Telemetry(models=[stats] * (MAX_MODEL_STATS + 1)),
    )


@pytest.mark.parametrize(
    ("telemetry", "field"),
    [
        (
            node_pb2.Telemetry(models=[node_pb2.ModelStats(inferences=2**64 - 1)]),
            "telemetry.models[0].inferences",
        ),
        (
            node_pb2.Telemetry(models=[node_pb2.ModelStats(), node_pb2.ModelStats(inferences=2**53 + 1)]),
            "telemetry.models[1].inferences",
        ),
        (
            node_pb2.Telemetry(exits=[node_pb2.ExitStats(requests=1, exits=[1], refused=2**64 - 1)]),
            "exits[0].refused",
        ),
        (node_pb2.Telemetry(exits=[node_pb2.ExitStats(requests=2**63, exits=[2**63])]), "exits[0].requests"),
        (node_pb2.Telemetry(exits=[node_pb2.ExitStats(exits=[0, 2**62])]), "telemetry.exits[0].exits"),
    ],
)
def test_a_counter_beyond_2_53_is_refused(telemetry, field):
    """2**64 - 1 in one exit counter broke the slowdown detector's int64 arrays on every later call
    (the leader gave its term up over and over); such a counter is no real count."""
    _refused("wire.telemetry.invalid_value", field, telemetry=telemetry)
    _decode(telemetry=node_pb2.Telemetry(models=[node_pb2.ModelStats(inferences=2**53)]))


def test_counters_only_added_up_in_python_are_not_checked():
    """Checking every counter made decoding a telemetry sample 8x slower; these reach no int64 array."""
    big = node_pb2.ModelStats(
        errors=2**63, scored=2**63, latency_buckets=[2**63], inferences_by_accelerator={"c": 2**63}
    )
    _decode(telemetry=node_pb2.Telemetry(models=[big]))
