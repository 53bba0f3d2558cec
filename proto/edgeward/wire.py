"""Encoding and boundary validation of the MQTT payloads defined in ``edgeward/v1/node.proto``.

A payload that is too large, does not parse, has an unknown schema version, carries a body that
does not belong on its topic, or names another node than its topic is refused with a
:class:`WireError` whose ``reason`` is a short machine-readable id. Receivers count the reasons
(:class:`DropCounter`) and carry on: bad input never crashes a process.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

from google.protobuf.message import DecodeError

from edgeward.v1 import node_pb2

SCHEMA_VERSION = 1
DEFAULT_MAX_PAYLOAD = 256 * 1024

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
    return msg


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


def node_message(node_id: str, **body: object) -> node_pb2.NodeMessage:
    """Build a NodeMessage with exactly one body, e.g. ``node_message(nid, status=st)``."""
    return node_pb2.NodeMessage(schema=SCHEMA_VERSION, node_id=node_id, sent_unix_ms=now_ms(), **body)
