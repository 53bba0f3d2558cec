"""Fuzzing the MQTT payload parsers and the handlers behind them: only WireError may escape the
decoders, and nothing the decoders accept may crash the orchestrator's fleet view or telemetry store."""

from __future__ import annotations

import math

import pytest
from fuzz_budget import FUZZ, mutated
from hypothesis import given
from hypothesis import strategies as st

from edgeward.v1 import node_pb2
from edgeward.wire import BODY_FOR_KIND, WireError, decode_command, decode_node_message, node_message
from orchestrator.fleet import Fleet
from orchestrator.telemetry import TelemetryStore

KINDS = [*BODY_FOR_KIND, "cmd", "bogus"]
names = st.text(min_size=0, max_size=12)
# NaN, infinities, negatives and extremes, within float32 range: the telemetry rings are float32
# (values beyond it: test_finite_values_beyond_float32_are_refused below).
floats = st.floats(allow_nan=True, allow_infinity=True)
counts = st.integers(min_value=0, max_value=2**63)

model_stats = st.builds(
    node_pb2.ModelStats,
    model_name=names,
    model_version=names,
    inferences=counts,
    errors=counts,
    latency_p50_ms=floats,
    latency_p95_ms=floats,
    latency_p99_ms=floats,
)
exit_stats = st.lists(st.integers(0, 2**62), min_size=1, max_size=3).flatmap(
    lambda exits: st.builds(
        node_pb2.ExitStats,
        model_name=names,
        source=names,
        requests=st.sampled_from([sum(exits), sum(exits) + 1]),  # consistent, or not
        exits=st.just(exits),
        refused=counts,
    )
)
telemetry = st.builds(
    node_pb2.Telemetry,
    exits=st.lists(exit_stats, max_size=3),
    power_w=floats,
    energy_j=floats,
    cpu_utilisation=floats,
    queue_depth=st.integers(0, 2**32 - 1),
    models=st.lists(model_stats, max_size=4),
    temperature_c=floats,
    interval_s=floats,
)
reports = st.builds(
    node_pb2.ReplicaReport,
    replica_id=names,
    deployment=names,
    model_name=names,
    model_version=names,
    phase=st.integers(0, 9),
    reason=names,
)
status = st.builds(
    node_pb2.Status,
    state=st.integers(0, 5),
    status_seq=st.integers(0, 2**63),
    replicas=st.lists(reports, max_size=4),
)
profiles = st.builds(
    node_pb2.ModelProfile,
    model_name=names,
    model_version=names,
    accelerator=names,
    runs=st.integers(0, 2**32 - 1),
    latency_p50_ms=floats,
    latency_p95_ms=floats,
    energy_j=floats,
)
hello = st.builds(
    node_pb2.Hello,
    agent_version=names,
    labels=st.dictionaries(names, names, max_size=3),
    hardware_profile=names,
    memory_bytes=st.integers(0, 2**63),
    inference_endpoint=names,
    max_replicas=st.integers(0, 2**32 - 1),
    boot_unix_ms=st.integers(-(2**63), 2**63 - 1),
    profiles=st.lists(profiles, max_size=3),
)
bodies = st.one_of(
    telemetry.map(lambda t: {"telemetry": t}),
    status.map(lambda s: {"status": s}),
    hello.map(lambda h: {"hello": h}),
)
VALID = node_message(
    "n1", telemetry=node_pb2.Telemetry(power_w=1.0, models=[node_pb2.ModelStats(model_name="m")])
)


@FUZZ
@given(
    payload=st.one_of(st.binary(max_size=512), mutated(VALID.SerializeToString())),
    kind=st.sampled_from(KINDS),
)
def test_decode_node_message_raises_only_wire_errors(payload, kind):
    try:
        msg = decode_node_message(payload, node_id="n1", kind=kind)
    except WireError as err:
        reason = err.reason
    else:
        reason = msg.node_id
    assert reason.startswith("wire.") or reason == "n1"


@FUZZ
@given(payload=st.one_of(st.binary(max_size=512), mutated(b"\x08\x01\x12\x02n1\x1a\x03cid\x5a\x00")))
def test_decode_command_raises_only_wire_errors(payload):
    try:
        cmd = decode_command(payload, node_id="n1")
    except WireError as err:
        reason = err.reason
    else:
        reason = "ok" if cmd.command_id and cmd.WhichOneof("body") is not None else "bad"
    assert reason.startswith("wire.") or reason == "ok"


@FUZZ
@given(
    messages=st.lists(
        st.tuples(bodies, st.integers(-(2**63), 2**63 - 1), st.booleans(), st.sampled_from(["n1", "n2"])),
        min_size=1,
        max_size=12,
    )
)
def test_orchestrator_handlers_survive_whatever_decodes(messages):
    """Decoded messages with hostile values (NaN, huge counters, odd ids) go through the fleet view
    and the telemetry store: refused at the boundary (a WireError with its reason) or, an invalid
    sample, by the store (False); nothing else raises, the exit counters' windows included."""
    fleet, store = Fleet(), TelemetryStore(flush_every=4)
    refused: list[str] = []
    for body, sent_ms, retained, node_id in messages:
        msg = node_pb2.NodeMessage(schema=1, node_id=node_id, sent_unix_ms=sent_ms, **body)
        kind = {"telemetry": "telemetry", "status": "status", "hello": "hello"}[msg.WhichOneof("body")]
        try:
            decoded = decode_node_message(msg.SerializeToString(), node_id=node_id, kind=kind)
        except WireError as err:
            refused.append(err.reason)
            continue
        fleet.apply(decoded, retained=retained)
        if kind == "telemetry":
            accepted = store.add(node_id, decoded.sent_unix_ms, decoded.telemetry)
            values = (msg.telemetry.power_w, msg.telemetry.energy_j, msg.telemetry.cpu_utilisation)
            if not all(math.isfinite(v) and v >= 0 for v in values):
                assert not accepted
    assert set(refused) <= {
        "wire.telemetry.invalid_value",
        "wire.hello.invalid_value",
        "wire.payload.too_many",
    }
    store.flush()
    store.exits.windows()
    for node_id in ("n1", "n2"):
        store.query(node_id, 0, False)
        store.query(node_id, 0, True)


@pytest.mark.parametrize("kind", ["hello", "status", "telemetry"])
def test_every_fuzzed_kind_accepts_its_own_body(kind):
    """The harness above reaches the handlers: well-formed bodies decode on their own topic kind."""
    body = {"hello": node_pb2.Hello(), "status": node_pb2.Status(), "telemetry": node_pb2.Telemetry()}
    msg = node_message("n1", **{kind: body[kind]})
    assert decode_node_message(msg.SerializeToString(), node_id="n1", kind=kind).WhichOneof("body") == kind


# Findings of test_orchestrator_handlers_survive_whatever_decodes, fixed in orchestrator/telemetry.py.


def test_finite_values_beyond_float32_are_refused():
    store = TelemetryStore()
    accepted = store.add("n1", 1, node_pb2.Telemetry(cpu_utilisation=3.5e38))
    store.flush()
    assert not accepted


def test_queue_depth_beyond_float32_precision_is_refused_and_the_node_stays_queryable():
    store = TelemetryStore()
    assert store.add("n1", 1, node_pb2.Telemetry(queue_depth=3))
    assert not store.add("n1", 2, node_pb2.Telemetry(queue_depth=4294967168))
    store.flush()
    assert [s.queue_depth for s in store.query("n1", 0, False)] == [3]
