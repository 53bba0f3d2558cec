"""The orchestrator's live view of the fleet, fed by the nodes' MQTT messages.

Node liveness comes from two signals: the retained ``status`` (with the broker-published last will
``OFFLINE`` when a node dies) and message recency (a node silent for ``node_timeout_s`` is lost).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from edgeward.v1 import node_pb2


@dataclass
class NodeView:
    id: str
    hello: node_pb2.Hello | None = None
    state: int = node_pb2.NODE_STATE_UNSPECIFIED
    last_seen: float = 0.0  # time.monotonic() of the last message
    last_seen_ms: int = 0
    reports: dict[str, node_pb2.ReplicaReport] = field(default_factory=dict)
    status_seq: int = -1
    boot_ms: int = 0
    telemetry: node_pb2.Telemetry | None = None

    def online(self, now: float, timeout_s: float) -> bool:
        return (
            self.state == node_pb2.NODE_STATE_ONLINE
            and self.hello is not None
            and now - self.last_seen <= timeout_s
        )


class Fleet:
    """Applies node messages to :class:`NodeView` objects; reports what changed."""

    def __init__(self) -> None:
        self.nodes: dict[str, NodeView] = {}

    def view(self, node_id: str) -> NodeView:
        node = self.nodes.get(node_id)
        if node is None:
            node = self.nodes[node_id] = NodeView(node_id)
        return node

    def apply(self, msg: node_pb2.NodeMessage, *, retained: bool = False) -> str | None:
        """Update the view; return 'hello', 'status' or None (nothing the reconciler cares about)."""
        node = self.view(msg.node_id)
        if not retained:
            node.last_seen = time.monotonic()
            node.last_seen_ms = msg.sent_unix_ms
        body = msg.WhichOneof("body")
        if body == "hello":
            rebooted = msg.hello.boot_unix_ms != node.boot_ms
            node.hello = msg.hello
            node.boot_ms = msg.hello.boot_unix_ms
            if rebooted:
                node.status_seq = -1
            if retained and not node.last_seen:
                node.last_seen = time.monotonic()
            return "hello"
        if body == "status":
            status = msg.status
            if status.state == node_pb2.NODE_STATE_OFFLINE:
                node.state = status.state
                node.reports = {}
                return "status"
            if status.status_seq <= node.status_seq and status.state == node.state:
                return None  # a late or repeated status: keep the newer one
            node.state = status.state
            node.status_seq = status.status_seq
            node.reports = {r.replica_id: r for r in status.replicas}
            if retained and not node.last_seen:
                # A retained status read at start-up proves nothing about now; give the node one
                # timeout to speak before it is declared lost.
                node.last_seen = time.monotonic()
            return "status"
        if body == "telemetry":
            node.telemetry = msg.telemetry
            return None
        return None
