"""The MQTT topic scheme shared by the orchestrator and the node agents.

Every node owns one subtree, ``{prefix}/nodes/{node_id}/{kind}``. The prefix defaults to
``edgeward/v1``; tests and multi-tenant deployments put something in front of it.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from enum import StrEnum

from edgeward.mqtt.session import MqttError

DEFAULT_PREFIX = "edgeward/v1"

# Lower case only, so a node id never differs from another by case alone; never a wildcard, a
# level separator or a leading '$' (reserved for broker topics).
NODE_ID_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")


class TopicKind(StrEnum):
    """The last level of a node topic: what the messages on it are."""

    HELLO = "hello"  # retained inventory
    STATUS = "status"  # retained; the last will sets it to offline
    TELEMETRY = "telemetry"
    EVENTS = "events"
    EVIDENCE = "evidence"
    CMD = "cmd"  # orchestrator to node, QoS 1


class TopicError(MqttError, ValueError):
    """A topic, prefix or node id that is not part of the scheme."""

    def __init__(self, value: str, reason: str) -> None:
        super().__init__(f"{reason}: {value!r}")
        self.value = value
        self.reason = reason


def validate_node_id(node_id: str) -> str:
    """Return ``node_id`` if it matches `NODE_ID_PATTERN`, else raise `TopicError`."""
    if not isinstance(node_id, str) or NODE_ID_PATTERN.fullmatch(node_id) is None:
        raise TopicError(str(node_id), f"node id must match {NODE_ID_PATTERN.pattern}")
    return node_id


def validate_prefix(prefix: str) -> str:
    """Return ``prefix`` if it is a usable topic prefix, else raise `TopicError`."""
    if not isinstance(prefix, str) or not prefix:
        raise TopicError(str(prefix), "prefix must be a non-empty string")
    if prefix.startswith("$"):
        raise TopicError(prefix, "prefix must not start with '$' (reserved for the broker)")
    if any(ch in prefix for ch in "+#\x00"):
        raise TopicError(prefix, "prefix must not contain wildcards or NUL")
    if "" in prefix.split("/"):
        raise TopicError(prefix, "prefix must not have empty levels")
    return prefix


@dataclass(frozen=True, slots=True)
class NodeTopic:
    """One node's topic of one kind; ``str()`` gives the wire form."""

    node_id: str
    kind: TopicKind
    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        validate_node_id(self.node_id)
        validate_prefix(self.prefix)
        try:
            object.__setattr__(self, "kind", TopicKind(self.kind))
        except ValueError as err:
            raise TopicError(str(self.kind), "unknown topic kind") from err

    def __str__(self) -> str:
        return f"{self.prefix}/nodes/{self.node_id}/{self.kind.value}"

    @classmethod
    def parse(cls, topic: str, prefix: str = DEFAULT_PREFIX) -> NodeTopic:
        """Parse the wire form; anything that is not exactly one node topic raises `TopicError`."""
        validate_prefix(prefix)
        head = f"{prefix}/nodes/"
        if not isinstance(topic, str) or not topic.startswith(head):
            raise TopicError(str(topic), f"topic is not under {head!r}")
        levels = topic[len(head) :].split("/")
        if len(levels) != 2:
            raise TopicError(topic, "topic must be {prefix}/nodes/{node_id}/{kind}")
        node_id, kind = levels
        return cls(node_id, kind, prefix)  # type: ignore[arg-type]  # validated in __post_init__


@functools.lru_cache(maxsize=1 << 17)
def node_topic(node_id: str, kind: TopicKind | str, prefix: str = DEFAULT_PREFIX) -> str:
    """The topic a node publishes (or, for ``cmd``, receives) messages of ``kind`` on (cached: an
    agent publishes on the same few topics every heartbeat, and 2,500 agents share a process)."""
    return str(NodeTopic(node_id, kind, prefix))  # type: ignore[arg-type]  # converted in __post_init__


_KINDS = {k.value: k for k in TopicKind}
_VALID_PREFIXES: set[str] = set()


#: Topics already parsed and found valid -> (node id, kind): a fleet's topics repeat (a few per
#: node), and a dict lookup costs a tenth of the checks. Bounded: cleared when full, so a flood of
#: invented topics costs the checks, never memory.
_PARSED: dict[tuple[str, str], tuple[str, TopicKind]] = {}
_PARSED_MAX = 200_000


def parse_node_topic(topic: str, prefix: str = DEFAULT_PREFIX) -> tuple[str, TopicKind]:
    """Split a node topic into ``(node_id, kind)``; raise `TopicError` on anything else.

    The ingest hot path: the same checks as `NodeTopic.parse`, without building the dataclass."""
    parsed = _PARSED.get((topic, prefix))
    if parsed is not None:
        return parsed
    parsed = _parse_node_topic(topic, prefix)
    if len(_PARSED) >= _PARSED_MAX:
        _PARSED.clear()
    _PARSED[(topic, prefix)] = parsed
    return parsed


def _parse_node_topic(topic: str, prefix: str) -> tuple[str, TopicKind]:
    if prefix not in _VALID_PREFIXES:
        _VALID_PREFIXES.add(validate_prefix(prefix))
    head = f"{prefix}/nodes/"
    if not isinstance(topic, str) or not topic.startswith(head):
        raise TopicError(str(topic), f"topic is not under {head!r}")
    node_id, sep, kind = topic[len(head) :].partition("/")
    kind_enum = _KINDS.get(kind)
    if not sep or kind_enum is None or NODE_ID_PATTERN.fullmatch(node_id) is None:
        return NodeTopic.parse(topic, prefix).node_id, kind_enum  # type: ignore[return-value]  # raises
    return node_id, kind_enum


def events_topic(kind: str, prefix: str = DEFAULT_PREFIX, levels: bool = False) -> str:
    """Where the orchestrator publishes notifications of ``kind`` (``model.published``...): one topic
    level, or with ``levels`` one level per dotted part (``events/model/published``), for brokers
    that refuse '.' in topics (NATS's MQTT gateway)."""
    if not kind or any(ch in kind for ch in "/+#\x00"):
        raise TopicError(kind, "event kind must be one topic level without wildcards")
    return f"{validate_prefix(prefix)}/events/{kind.replace('.', '/') if levels else kind}"


def nodes_filter(kind: TopicKind | str, prefix: str = DEFAULT_PREFIX) -> str:
    """The subscription filter matching ``kind`` messages of every node."""
    try:
        kind = TopicKind(kind)
    except ValueError as err:
        raise TopicError(str(kind), "unknown topic kind") from err
    return f"{validate_prefix(prefix)}/nodes/+/{kind.value}"
