"""Startup order: once health says SERVING, every API call reaches a built orchestrator."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest
from conftest import Api, manifest, trust_publisher
from grpc_health.v1 import health_pb2, health_pb2_grpc
from processes import listen_port

from edgeward.mqtt import MqttConnectError
from orchestrator.config import BrokerConfig, OrchestratorConfig
from orchestrator.rollout import RolloutController
from orchestrator.server import BROKER_RETRY_S, Orchestrator


def config(tmp_path, port: int) -> OrchestratorConfig:
    return OrchestratorConfig(
        state_dir=tmp_path / "orch",
        grpc_bind=f"127.0.0.1:{port}",
        broker=BrokerConfig(url=None, embedded_port=0),
        catalog=trust_publisher(tmp_path / "publishers"),
    )


async def test_the_api_works_as_soon_as_health_says_serving(tmp_path, monkeypatch) -> None:
    """The orchestrator is held inside its start (in the rollout controller's restore, a step
    every start takes) until a health probe that waits for the server has come back: an
    orchestrator that serves before it is built answers SERVING during the hold, and the Apply
    that follows fails (INTERNAL). Then Apply is called at the first SERVING."""
    port = listen_port()  # bound twice; probed while nothing listens on it
    async with (
        Orchestrator(config(tmp_path, port)) as first,  # leaves a catalog with a model in it
        grpc.aio.insecure_channel(first.address) as channel,
    ):
        await Api(channel).push()
    held, release = asyncio.Event(), asyncio.Event()
    load = RolloutController.load

    async def held_load(self: RolloutController) -> None:
        held.set()
        await release.wait()
        await load(self)

    monkeypatch.setattr(RolloutController, "load", held_load)
    orch = Orchestrator(config(tmp_path, port))
    starting = asyncio.create_task(orch.__aenter__())
    try:
        await held.wait()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                try:
                    reply = await health.Check(
                        health_pb2.HealthCheckRequest(), timeout=3, wait_for_ready=True
                    )
                except grpc.aio.AioRpcError as err:  # not serving yet
                    status = err.code()
                else:
                    status = reply.status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    break
                release.set()  # held long enough for a probe to reach a server that was serving
            applied = await Api(channel).apply(manifest(replicas=1))  # INTERNAL if half-built
            assert applied.created
        await starting
    finally:
        release.set()
        with contextlib.suppress(Exception):  # a failed start has stopped itself
            await starting
            await orch.__aexit__(None, None, None)


def external(tmp_path, broker_port: int) -> OrchestratorConfig:
    return OrchestratorConfig(
        state_dir=tmp_path / "orch",
        grpc_bind=f"127.0.0.1:{listen_port()}",
        broker=BrokerConfig(url=f"mqtt://127.0.0.1:{broker_port}"),
        catalog=trust_publisher(tmp_path / "publishers"),
    )


async def test_a_broker_that_comes_up_after_the_orchestrator_is_waited_for(
    tmp_path, caplog, mosquitto_factory
) -> None:
    """Started together, the broker may not listen yet (or, a NATS gateway, close connections until
    it can keep a session): the orchestrator tries its first connection again instead of exiting."""
    broker = mosquitto_factory()
    broker.stop()  # its port is known: it comes back on it below
    orch = Orchestrator(external(tmp_path, broker.port))
    starting = asyncio.create_task(orch.__aenter__())
    try:
        async with asyncio.timeout(20):  # the first try failed: nothing listens yet
            while not any("trying again" in r.getMessage() for r in caplog.records):
                await asyncio.sleep(0.05)
        assert not starting.done()
        broker.start()  # on its old port
        async with asyncio.timeout(60):
            await starting
        async with grpc.aio.insecure_channel(orch.address) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=10
            )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        if starting.done() and starting.exception() is None:
            await orch.__aexit__(None, None, None)
        else:
            starting.cancel()
            with contextlib.suppress(BaseException):
                await starting
        broker.stop()


async def test_a_broker_that_refuses_the_session_is_not_waited_for(tmp_path, mosquitto_factory) -> None:
    """A refusal (here: no anonymous sessions) is the broker's answer, not a broker still starting:
    the orchestrator stops at once with the reason."""
    broker = mosquitto_factory("allow_anonymous false")
    try:
        orch = Orchestrator(external(tmp_path, broker.port))
        with pytest.raises(MqttConnectError, match="refused by the broker") as refused:
            async with asyncio.timeout(BROKER_RETRY_S * 5):  # no waiting out BROKER_START_WAIT_S
                await orch.__aenter__()
        assert not refused.value.transient
    finally:
        broker.stop()
