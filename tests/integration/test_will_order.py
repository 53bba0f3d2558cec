"""A node's last will counts even when its last telemetry is read after it.

The MQTT session hands ingest its QoS 1 messages (statuses, wills, events) before its QoS 0 ones
(telemetry) of the same batch, so a telemetry message the node sent before it died can be worked on
after its will. That must not read as "the node spoke after its will: it is back". Here the
orchestrator's event loop is held while a node publishes telemetry and then loses its connection
(the broker publishes its will), so both reach the orchestrator in one read - on a machine of any
speed. A real Mosquitto, the node a plain MQTT client, the orchestrator in this event loop (the
embedded broker would run in this loop too, and stop with it).
"""

from __future__ import annotations

import threading
import time

import paho.mqtt.client as paho
import pytest
from conftest import eventually
from paho.mqtt.enums import CallbackAPIVersion

from edgeward.mqtt.topics import node_topic
from edgeward.v1 import node_pb2
from edgeward.wire import FINAL_STATUS_SEQ
from orchestrator.config import BrokerConfig, OrchestratorConfig
from orchestrator.server import Orchestrator

pytestmark = [pytest.mark.broker]

EPOCH = 1_700_000_000_000
ONLINE, OFFLINE = node_pb2.NODE_STATE_ONLINE, node_pb2.NODE_STATE_OFFLINE


def _message(node: str, sent_ms: int, **body) -> bytes:
    return node_pb2.NodeMessage(schema=1, node_id=node, sent_unix_ms=sent_ms, **body).SerializeToString()


async def test_a_will_read_before_the_nodes_earlier_telemetry_still_counts(mosquitto, topic_prefix, tmp_path):
    config = OrchestratorConfig(
        state_dir=tmp_path / "orch",
        grpc_bind="127.0.0.1:0",
        broker=BrokerConfig(url=str(mosquitto), topic_prefix=topic_prefix),
        node_timeout_s=300.0,  # silence alone would not find the node gone within the test
    )
    status_topic = node_topic("n1", "status", topic_prefix)
    seen_will = threading.Event()

    def on_message(_client, _userdata, message) -> None:
        msg = node_pb2.NodeMessage.FromString(message.payload)
        if msg.status.state == OFFLINE:
            seen_will.set()

    observer = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="observer")
    observer.on_message = on_message
    observer.connect(mosquitto.host, mosquitto.port)
    observer.subscribe(status_topic, qos=1)
    observer.loop_start()
    node = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="n1")
    will = node_pb2.Status(state=OFFLINE, epoch=EPOCH, status_seq=FINAL_STATUS_SEQ)
    node.will_set(status_topic, _message("n1", EPOCH, status=will), qos=1, retain=True)
    node.connect(mosquitto.host, mosquitto.port)
    node.loop_start()
    try:
        async with Orchestrator(config) as orch:
            hello = node_pb2.Hello(agent_version="sim", hardware_profile="sim", boot_unix_ms=EPOCH)
            node.publish(
                node_topic("n1", "hello", topic_prefix), _message("n1", EPOCH + 1, hello=hello), 1, True
            )
            status = node_pb2.Status(state=ONLINE, epoch=EPOCH, status_seq=1)
            node.publish(status_topic, _message("n1", EPOCH + 2, status=status), 1, True)

            async def online() -> bool:
                view = orch.fleet.nodes.get("n1")
                return view is not None and view.online(time.monotonic(), config.node_timeout_s)

            await eventually(online, what="n1 online")
            # The orchestrator's loop is held (a blocking wait): the telemetry and the will wait in
            # its socket, to be read together.
            telemetry = node_pb2.Telemetry(models=[node_pb2.ModelStats(model_name="m", inferences=1)])
            node.publish(
                node_topic("n1", "telemetry", topic_prefix), _message("n1", EPOCH + 3, telemetry=telemetry), 0
            ).wait_for_publish(10)
            node.loop_stop()
            node.socket().close()  # no DISCONNECT: the broker publishes the will
            assert seen_will.wait(60), "the broker published n1's will"

            async def offline() -> bool:
                return orch.fleet.nodes["n1"].state == OFFLINE

            await eventually(offline, what="n1 offline by its will (OFFLINE_CONFIRM_S after it)")
    finally:
        observer.loop_stop()
        observer.disconnect()
