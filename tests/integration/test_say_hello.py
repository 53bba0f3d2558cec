"""A retained hello the broker lost (NATS's MQTT gateway can lose one): an orchestrator that hears a
node's statuses without its hello asks the node for it (a SayHello command), and the node says hello
again. A real agent, a real broker (Mosquitto and embedded), an orchestrator in this event loop."""

from __future__ import annotations

import asyncio

import pytest
from conftest import eventually, trust_publisher

import orchestrator.server as orchestrator_server
from attestation.tokens import TokenStore
from edgeward.mqtt.session import MqttSession
from edgeward.mqtt.topics import TopicKind, node_topic
from node_agent.agent import NodeAgent
from node_agent.config import AgentConfig
from orchestrator.config import BrokerConfig, OrchestratorConfig
from orchestrator.server import Orchestrator

pytestmark = [pytest.mark.broker]


async def test_a_node_heard_without_a_hello_is_asked_for_one(mqtt_url, topic_prefix, tmp_path, monkeypatch):
    monkeypatch.setattr(orchestrator_server, "HELLO_ASK_S", 0.5)
    config = OrchestratorConfig(
        state_dir=tmp_path / "orch",
        grpc_bind="127.0.0.1:0",
        broker=BrokerConfig(url=str(mqtt_url), topic_prefix=topic_prefix),
        catalog=trust_publisher(tmp_path / "publishers"),
    )
    agent_config = AgentConfig(
        node_id="n1",
        enrollment_token=TokenStore.in_state_dir(config.state_dir).mint("n1").token,
        heartbeat_s=0.5,
        broker={"url": str(mqtt_url), "topic_prefix": topic_prefix},
        state_dir=tmp_path / "agent",
    )
    async with NodeAgent(agent_config) as agent:
        hello_topic = node_topic("n1", TopicKind.HELLO, topic_prefix)
        async with MqttSession(mqtt_url, "observer") as observer:
            await observer.subscribe(hello_topic, qos=1)
            async for message in observer.messages():  # the agent's retained hello is there
                assert message.retain and message.payload
                break
            await observer.publish(hello_topic, b"", qos=1, retain=True)  # and now it is lost
        async with Orchestrator(config) as orch:

            async def heard_without_hello() -> bool:
                node = orch.fleet.nodes.get("n1")
                return node is not None and node.last_seen > 0

            await eventually(heard_without_hello, what="n1's statuses")

            async def hello_again() -> bool:
                node = orch.fleet.nodes["n1"]
                return node.hello is not None and node.hello.inference_endpoint == agent.inference_endpoint

            await eventually(hello_again, what="n1's hello, asked for")
            assert orch.hello_requests >= 1
            asked = orch.hello_requests
            await asyncio.sleep(3 * orchestrator_server.HELLO_ASK_S)  # statuses go on: 6 of them
            assert orch.hello_requests == asked, "a node with a hello is not asked again"
