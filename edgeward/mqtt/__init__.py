"""MQTT for edgeward: the topic scheme, an asyncio session over paho-mqtt, and an embedded broker.

The embedded broker lives in `edgeward.mqtt.broker` and is not imported here: it pulls in amqtt,
which node agents never need.
"""

from edgeward.mqtt.session import (
    BrokerURL,
    Message,
    MqttConnectError,
    MqttError,
    MqttPublishError,
    MqttSession,
    MqttSubscribeError,
    SessionStats,
    Will,
)
from edgeward.mqtt.topics import (
    DEFAULT_PREFIX,
    NodeTopic,
    TopicError,
    TopicKind,
    node_topic,
    nodes_filter,
    parse_node_topic,
    validate_node_id,
)

__all__ = [
    "DEFAULT_PREFIX",
    "BrokerURL",
    "Message",
    "MqttConnectError",
    "MqttError",
    "MqttPublishError",
    "MqttSession",
    "MqttSubscribeError",
    "NodeTopic",
    "SessionStats",
    "TopicError",
    "TopicKind",
    "Will",
    "node_topic",
    "nodes_filter",
    "parse_node_topic",
    "validate_node_id",
]
