"""Encoding and boundary validation of the MQTT payloads defined in ``edgeward/v1/node.proto``.

A payload that is too large, does not parse, has an unknown schema version, carries a body that
does not belong on its topic, names another node than its topic, or (a hello) advertises
accelerator figures the scheduler cannot rank with, is refused with a
:class:`WireError` whose ``reason`` is a short machine-readable id. Receivers count the reasons
(:class:`DropCounter`) and carry on: bad input never crashes a process.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from google.protobuf.message import DecodeError

from edgeward.v1 import node_pb2

SCHEMA_VERSION = 1
DEFAULT_MAX_PAYLOAD = 256 * 1024
#: ``Status.status_seq`` of an OFFLINE last will: after every status of its connection (``epoch``).
FINAL_STATUS_SEQ = 2**64 - 1


def status_key(status: node_pb2.Status) -> tuple[int, int]:
    """The order of a node's statuses: (epoch, status_seq); the greater one is the newer."""
    return (status.epoch, status.status_seq)


#: Upper bounds (seconds) of the latency histogram each node reports per model
#: (``ModelStats.latency_buckets``) and the orchestrator exposes to Prometheus. Fixed: a node and
#: an orchestrator of one release agree on it; a count list of another length is not exposed.
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

# Which NodeMessage body may travel on which topic kind.
BODY_FOR_KIND = {
    "hello": "hello",
    "status": "status",
    "telemetry": "telemetry",
    "events": "event",
    "evidence": "evidence",
}


class WireError(ValueError):
    """A payload refused at the boundary; ``reason`` is one of the ``wire.*`` ids."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class DropCounter:
    """Counts refused payloads by reason; cheap enough to call on every message."""

    counts: Counter[str] = field(default_factory=Counter)

    def drop(self, err: WireError) -> None:
        self.counts[err.reason] += 1

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def with_oversize(self, dropped_oversize: int) -> dict[str, int]:
        """The counts plus payloads the MQTT session refused for size before decoding."""
        counts = dict(self.counts)
        if dropped_oversize:
            counts["wire.payload.too_large"] = counts.get("wire.payload.too_large", 0) + dropped_oversize
        return counts


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def _parse(message_type: type, payload: bytes, max_payload: int):
    if len(payload) > max_payload:
        raise WireError("wire.payload.too_large", f"{len(payload)} bytes > {max_payload}")
    msg = message_type()
    try:
        msg.ParseFromString(payload)
    except (DecodeError, RuntimeError, ValueError) as err:
        raise WireError("wire.payload.unparseable", str(err)[:200]) from err
    if msg.schema != SCHEMA_VERSION:
        raise WireError("wire.payload.unknown_schema", f"schema {msg.schema}")
    return msg


def decode_node_message(
    payload: bytes, *, node_id: str, kind: str, max_payload: int = DEFAULT_MAX_PAYLOAD
) -> node_pb2.NodeMessage:
    """Parse a node -> orchestrator payload received on ``.../nodes/{node_id}/{kind}``."""
    expected = BODY_FOR_KIND.get(kind)
    if expected is None:
        raise WireError("wire.topic.unknown_kind", kind)
    msg: node_pb2.NodeMessage = _parse(node_pb2.NodeMessage, payload, max_payload)
    if msg.node_id != node_id:
        raise WireError("wire.payload.wrong_node", f"payload names {msg.node_id!r}, topic {node_id!r}")
    body = msg.WhichOneof("body")
    if body != expected:
        raise WireError("wire.payload.wrong_body", f"{body!r} on topic kind {kind!r}")
    if body == "hello":
        _check_hello(msg.hello)
    elif body == "status":
        _check_count("status", "replicas", len(msg.status.replicas), MAX_REPLICA_REPORTS)
    elif body == "telemetry":
        _check_telemetry(msg.telemetry)
    return msg


#: Bounds of the lists a node sends, far above what an agent sends (it runs at most 1,024 replicas,
#: keeps its newest 64 profiles; exit streams are bounded per node where they are kept): every list the
#: orchestrator keeps per node, or multiplies across the fleet (the scheduler's arrays are classes x
#: accelerator kinds x models), stays bounded by the node's own share.
MAX_HELLO_ACCELERATORS = 16
MAX_HELLO_PROFILES = 64
MAX_REPLICA_REPORTS = 1024
MAX_MODEL_STATS = 1024
#: The largest cumulative counter a node may report: exact in a float64 and an int64, where the
#: orchestrator takes differences of them (2**64 - 1 broke the int64 arrays of every detector).
MAX_COUNTER = 2**53


def _check_count(body: str, field: str, count: int, limit: int) -> None:
    if count > limit:
        raise WireError("wire.payload.too_many", f"{body}.{field}: {count} entries, at most {limit}")


_EXIT_COUNTERS = ("requests", "forced", "refused")


def _check_telemetry(t: node_pb2.Telemetry) -> None:
    """Refuse telemetry with more entries than any agent sends, or a counter beyond ``MAX_COUNTER``
    among those the orchestrator puts in int64 arrays (inferences: the misuse monitor; exit stats:
    the slowdown detector). The other counters are only added up as Python integers. On the
    ingest's path for every sample: a few reads an entry (all of them made decoding 8x slower)."""
    _check_count("telemetry", "models", len(t.models), MAX_MODEL_STATS)
    if t.models and max(m.inferences for m in t.models) > MAX_COUNTER:
        i, value = next((i, m.inferences) for i, m in enumerate(t.models) if m.inferences > MAX_COUNTER)
        raise WireError(
            "wire.telemetry.invalid_value", f"telemetry.models[{i}].inferences: {value}, above 2**53"
        )
    for i, e in enumerate(t.exits):
        if max(e.requests, e.forced, e.refused, max(e.exits, default=0)) > MAX_COUNTER:
            fields = {name: getattr(e, name) for name in _EXIT_COUNTERS} | {"exits": max(e.exits, default=0)}
            name, value = next((n, v) for n, v in fields.items() if v > MAX_COUNTER)
            raise WireError(
                "wire.telemetry.invalid_value", f"telemetry.exits[{i}].{name}: {value}, above 2**53"
            )


#: An accelerator's figures the scheduler computes with (watts, peak rate): finite and not negative.
_ACCELERATOR_FIGURES = ("peak_gops", "idle_w", "active_w")


def _check_hello(hello: node_pb2.Hello) -> None:
    """Refuse a hello whose accelerator figures are not finite and non-negative. The scheduler ranks
    nodes with them: one node's NaN watts made the energy score NaN for every node, and every
    placement in the fleet unschedulable; a negative one made that node win every placement. (Cost
    models are checked where they are read: a bad one is dropped on its own, the hello kept.) Also
    refuse more accelerators or profiles than an agent offers: each new kind and model name widens
    the scheduler's arrays for every node (3,000 of each took one snapshot 11 s and 3 GB)."""
    _check_count("hello", "accelerators", len(hello.accelerators), MAX_HELLO_ACCELERATORS)
    _check_count("hello", "profiles", len(hello.profiles), MAX_HELLO_PROFILES)
    for i, acc in enumerate(hello.accelerators):
        for name in _ACCELERATOR_FIGURES:
            value = getattr(acc, name)
            if not (math.isfinite(value) and value >= 0):
                raise WireError(
                    "wire.hello.invalid_value",
                    f"hello.accelerators[{i}].{name}: {value!r}, not a finite number >= 0",
                )


def decode_command(
    payload: bytes, *, node_id: str, max_payload: int = DEFAULT_MAX_PAYLOAD
) -> node_pb2.Command:
    """Parse an orchestrator -> node command received on ``.../nodes/{node_id}/cmd``."""
    cmd: node_pb2.Command = _parse(node_pb2.Command, payload, max_payload)
    if cmd.node_id != node_id:
        raise WireError("wire.payload.wrong_node", f"command for {cmd.node_id!r}, we are {node_id!r}")
    if not cmd.command_id:
        raise WireError("wire.command.no_id")
    if cmd.WhichOneof("body") is None:
        raise WireError("wire.command.empty")
    return cmd


def node_message(node_id: str, **body: Any) -> node_pb2.NodeMessage:
    """Build a NodeMessage with exactly one body, e.g. ``node_message(nid, status=st)``."""
    return node_pb2.NodeMessage(schema=SCHEMA_VERSION, node_id=node_id, sent_unix_ms=now_ms(), **body)


RATE_EXCEEDED = "wire.rate.exceeded"
# A payload that passed validation and still broke its handling: dropped alone, the ingest goes on.
INGEST_FAILED = "wire.ingest.failed"


class NodeRateLimiter:
    """A token bucket per node: ``rate`` messages per second on average, bursts of ``burst``.

    ``allow`` is O(1) per message (a dict lookup and a few float operations). The table of buckets
    is bounded by ``max_nodes``: a flood of invented node ids cannot grow it without limit. When it
    is full, buckets that have refilled completely (idle nodes: forgetting them changes nothing) are
    pruned in one vectorised pass; if none has, the message is refused.
    """

    def __init__(self, rate: float, burst: float, *, max_nodes: int = 100_000) -> None:
        if not rate > 0 or not burst >= 1 or max_nodes < 1:
            raise ValueError("rate > 0, burst >= 1 and max_nodes >= 1 required")
        self.rate = float(rate)
        self.burst = float(burst)
        self.max_nodes = max_nodes
        self._index: dict[str, int] = {}
        # Plain lists: a scalar read or write on them is several times cheaper than on numpy arrays.
        self._tokens: list[float] = []
        self._stamp: list[float] = []
        self._free: list[int] = []

    def __len__(self) -> int:
        return len(self._index)

    def allow(self, node_id: str, now: float | None = None) -> bool:
        """Take one token from the node's bucket; False (and nothing taken) when it is empty."""
        now = time.monotonic() if now is None else now
        i = self._index.get(node_id)
        if i is None:
            i = self._slot(now)
            if i is None:
                return False
            self._index[node_id] = i
            self._tokens[i], self._stamp[i] = self.burst, now
        tokens = self._tokens[i] + (now - self._stamp[i]) * self.rate
        if tokens > self.burst:
            tokens = self.burst
        self._stamp[i] = now
        if tokens < 1.0:
            self._tokens[i] = tokens
            return False
        self._tokens[i] = tokens - 1.0
        return True

    def _slot(self, now: float) -> int | None:
        if self._free:
            return self._free.pop()
        if len(self._tokens) < self.max_nodes:
            self._tokens.append(0.0)
            self._stamp.append(0.0)
            return len(self._tokens) - 1
        refilled = np.asarray(self._tokens) + (now - np.asarray(self._stamp)) * self.rate
        full = refilled >= self.burst
        if not full.any():
            return None
        for node_id in [n for n, j in self._index.items() if full[j]]:
            self._free.append(self._index.pop(node_id))
        return self._free.pop()
