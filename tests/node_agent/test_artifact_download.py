"""An agent's artifact download against a real gRPC server that fails on purpose: transient failures
(the server busy, restarting, or cutting streams) are tried again, other refusals fail at once."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from edgeward.v1 import api_pb2, api_pb2_grpc, node_pb2
from node_agent.agent import download_artifact

SEALED = bytes(range(256)) * 40  # 10 KiB: three chunks below
SPEC = node_pb2.DeployReplica(replica_id="r1", model_name="m", model_version="1.0.0", size=len(SEALED) - 28)


class FlakyModels(api_pb2_grpc.ModelServiceServicer):
    """Fails the first downloads with the given codes, then serves ``SEALED`` in 4 KiB chunks."""

    def __init__(self, failures: list[grpc.StatusCode]) -> None:
        self.failures = list(failures)
        self.calls = 0

    async def Download(
        self, request: api_pb2.DownloadModelRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[api_pb2.ModelChunk]:
        self.calls += 1
        if self.failures:
            await context.abort(self.failures.pop(0), "on purpose")
        for offset in range(0, len(SEALED), 4096):
            yield api_pb2.ModelChunk(data=SEALED[offset : offset + 4096], offset=offset, size=len(SEALED))


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
        return api_pb2_grpc.ModelServiceStub(channel)

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
