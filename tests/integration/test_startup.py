"""Startup order: once health says SERVING, every API call reaches a built orchestrator."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
from conftest import Api, manifest, trust_publisher
from grpc_health.v1 import health_pb2, health_pb2_grpc
from processes import listen_port

from orchestrator.config import BrokerConfig, OrchestratorConfig
from orchestrator.rollout import RolloutController
from orchestrator.server import Orchestrator


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
