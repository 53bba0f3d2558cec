"""An agent's artifact download against a real gRPC server that fails on purpose: transient failures
(the server busy, restarting, or cutting streams) are tried again, other refusals fail at once; a
download retrying an endpoint that is gone starts again at the one a newer command names."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from processes import listen_port

from accelerators.cpu_litert import CpuLitertBackend
from edgeward.v1 import api_pb2, api_pb2_grpc, node_pb2
from node_agent.agent import NodeAgent, download_artifact
from node_agent.config import AgentConfig
from node_agent.runtime import Runtime
from usecases import model_path

SEALED = bytes(range(256)) * 40  # 10 KiB: three chunks below
SPEC = node_pb2.DeployReplica(replica_id="r1", model_name="m", model_version="1.0.0", size=len(SEALED) - 28)


class FlakyModels(api_pb2_grpc.ModelServiceServicer):
    """Fails the first downloads with the given codes, then serves ``SEALED`` in 4 KiB chunks."""

    def __init__(self, failures: list[grpc.StatusCode], sealed: bytes = SEALED) -> None:
        self.failures = list(failures)
        self.sealed = sealed
        self.calls = 0

    async def Download(
        self, request: api_pb2.DownloadModelRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[api_pb2.ModelChunk]:
        self.calls += 1
        if self.failures:
            await context.abort(self.failures.pop(0), "on purpose")
        sealed = self.sealed
        for offset in range(0, len(sealed), 4096):
            yield api_pb2.ModelChunk(data=sealed[offset : offset + 4096], offset=offset, size=len(sealed))


@pytest.fixture
async def serve() -> AsyncIterator:
    """Start real gRPC servers on loopback serving the given ModelService; all stop at the end."""
    started: list[tuple[grpc.aio.Server, grpc.aio.Channel]] = []

    async def start(models: FlakyModels) -> api_pb2_grpc.ModelServiceStub:
        server = grpc.aio.server()
        api_pb2_grpc.add_ModelServiceServicer_to_server(models, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        started.append((server, channel))
        stub = api_pb2_grpc.ModelServiceStub(channel)
        stub.endpoint = f"127.0.0.1:{port}"  # type: ignore[attr-defined]
        return stub

    yield start
    for server, channel in started:
        await channel.close()
        await server.stop(None)


@pytest.mark.parametrize(
    "code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.RESOURCE_EXHAUSTED]
)
async def test_a_transient_failure_is_tried_again_until_the_download_succeeds(serve, code) -> None:
    models = FlakyModels([code, code])
    stub = await serve(models)
    assert await download_artifact(stub, SPEC, retry_s=30, backoff_s=(0.01, 0.02)) == SEALED
    assert models.calls == 3


async def test_a_refusal_is_not_tried_again(serve) -> None:
    models = FlakyModels([grpc.StatusCode.FAILED_PRECONDITION])  # a revoked model
    stub = await serve(models)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await download_artifact(stub, SPEC, retry_s=30, backoff_s=(0.01, 0.02))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert models.calls == 1


async def test_retrying_is_bounded_in_time(serve) -> None:
    models = FlakyModels([grpc.StatusCode.UNAVAILABLE] * 1000)
    stub = await serve(models)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await download_artifact(stub, SPEC, retry_s=5.0, backoff_s=(0.05, 0.1))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert 2 <= models.calls < 1000  # until a pause would end past the time given: then it raises


PAD = b"\0" * 28  # the "seal" of the test below: the model and 28 bytes, as AES-GCM adds


def _runtime(tmp_path: Path, run_blocking) -> Runtime:
    """A runtime on the real LiteRT backend whose "unseal" strips ``PAD``."""
    return Runtime(
        {"cpu-litert": CpuLitertBackend()},
        tmp_path / "models",
        run_blocking,
        lambda: None,
        lambda spec, sealed: sealed[: -len(PAD)],
    )


def _spec(model: bytes, endpoint: str, **changes) -> node_pb2.DeployReplica:
    spec = node_pb2.DeployReplica(
        replica_id="r1",
        deployment="d",
        model_name="m",
        model_version="1.0.0",
        sha256=hashlib.sha256(model).hexdigest(),
        size=len(model),
        accelerator="cpu-litert",
        artifact_endpoint=endpoint,
    )
    for field, value in changes.items():
        setattr(spec, field, value)
    return spec


async def test_a_download_from_an_endpoint_gone_starts_again_at_the_one_a_newer_command_names(
    serve, tmp_path: Path
) -> None:
    """With several orchestrator replicas each names its own artifact endpoint. A leader killed after
    dispatching leaves the node retrying its endpoint (connection refused: transient, for minutes);
    the next leader's sync names its own, and the load starts again there. A command naming the same
    endpoint, or one for a replica already loaded, changes nothing."""
    model = model_path("industrial", "int8").read_bytes()
    live = await serve(FlakyModels([], sealed=model + PAD))
    gone_endpoint = f"127.0.0.1:{listen_port()}"  # nothing listens there
    gone_channel = grpc.aio.insecure_channel(gone_endpoint)
    stubs = {live.endpoint: live, gone_endpoint: api_pb2_grpc.ModelServiceStub(gone_channel)}
    asked: list[str] = []

    async def fetch(spec: node_pb2.DeployReplica) -> bytes:
        asked.append(spec.artifact_endpoint)
        return await download_artifact(
            stubs[spec.artifact_endpoint], spec, retry_s=600, backoff_s=(0.05, 0.2)
        )

    async def run_blocking(fn, *args):
        return fn(*args)

    runtime = _runtime(tmp_path, run_blocking)
    spec = _spec(model, gone_endpoint)
    try:
        assert runtime.deploy(spec, fetch)
        async with asyncio.timeout(30):
            while not asked:  # the download has started (and retries: nothing listens)
                await asyncio.sleep(0.01)
        assert not runtime.deploy(spec, fetch), "the same endpoint again: the download goes on"
        await asyncio.sleep(0.3)
        assert runtime.replicas["r1"].phase == node_pb2.REPLICA_PHASE_LOADING  # still retrying
        newer = _spec(model, live.endpoint)
        assert runtime.deploy(newer, fetch), "another endpoint while downloading: start again there"
        async with asyncio.timeout(30):
            while runtime.replicas["r1"].phase != node_pb2.REPLICA_PHASE_RUNNING:
                await asyncio.sleep(0.01)
        assert asked == [gone_endpoint, live.endpoint]
        assert not runtime.deploy(spec, fetch), "loaded: a command naming another endpoint is a no-op"
        assert runtime.replicas["r1"].phase == node_pb2.REPLICA_PHASE_RUNNING
        assert runtime.teams("m") == {""}  # no team owns it: open to every caller
        owned = _spec(model, gone_endpoint, owner_team="industrial")
        assert not runtime.deploy(owned, fetch), "a new owner is taken without a reload"
        assert runtime.teams("m") == runtime.teams("m", "1.0.0") == {"industrial"}
        assert runtime.teams("m", "2.0.0") == runtime.teams("other") == set()
        assert not runtime.deploy(spec, fetch)  # a command without an owner (an earlier release's)
        assert runtime.teams("m") == {"industrial"}, "does not open the replica to every team"
    finally:
        await runtime.close()
        await gone_channel.close()


async def test_a_load_still_reading_its_cache_downloads_from_the_newer_endpoint(
    serve, tmp_path: Path
) -> None:
    """A command naming another endpoint while the load reads the node's cache (before any download)
    does not start the load again, and the download that follows asks the newer endpoint."""
    model = model_path("industrial", "int8").read_bytes()
    live = await serve(FlakyModels([], sealed=model + PAD))
    asked: list[str] = []
    reading, go_on = asyncio.Event(), asyncio.Event()
    runtime: Runtime

    async def fetch(spec: node_pb2.DeployReplica) -> bytes:
        asked.append(spec.artifact_endpoint)
        return await download_artifact(live, spec, retry_s=5)

    async def run_blocking(fn, *args):
        if fn == runtime._read_cache:
            reading.set()
            await go_on.wait()
        return fn(*args)

    runtime = _runtime(tmp_path, run_blocking)
    gone = f"127.0.0.1:{listen_port()}"
    spec = _spec(model, gone)
    try:
        assert runtime.deploy(spec, fetch)
        await asyncio.wait_for(reading.wait(), 30)
        assert not runtime.deploy(_spec(model, live.endpoint), fetch), "not downloading yet: no new load"
        go_on.set()
        async with asyncio.timeout(30):
            while runtime.replicas["r1"].phase != node_pb2.REPLICA_PHASE_RUNNING:
                await asyncio.sleep(0.01)
        assert asked == [live.endpoint]
    finally:
        await runtime.close()


async def test_an_agent_closes_the_channels_of_endpoints_it_no_longer_downloads_from(
    serve, tmp_path: Path
) -> None:
    """Each orchestrator replica that leads names its own artifact endpoint: once a download from a
    new one is done, the agent's channels to the others (a dead leader's) are closed."""
    first, second = await serve(FlakyModels([])), await serve(FlakyModels([]))
    agent = NodeAgent(AgentConfig(node_id="n1", state_dir=tmp_path / "agent"))
    try:
        for stub in (first, first, second):
            spec = node_pb2.DeployReplica()
            spec.CopyFrom(SPEC)
            spec.artifact_endpoint = stub.endpoint
            assert await agent._fetch(spec) == SEALED
            assert list(agent._channels) == [stub.endpoint]
        # Downloads from several endpoints at once: none loses its channel to another's clean-up.
        third = await serve(FlakyModels([]))
        specs = []
        for stub in (first, second, third) * 3:
            spec = node_pb2.DeployReplica()
            spec.CopyFrom(SPEC)
            spec.artifact_endpoint = stub.endpoint
            specs.append(spec)
        assert await asyncio.gather(*(agent._fetch(s) for s in specs)) == [SEALED] * len(specs)
        assert len(agent._channels) == 1
    finally:
        for channel in agent._channels.values():
            await channel.close()
