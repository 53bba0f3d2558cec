"""A fleet's List is larger than gRPC's default message limit (4 MB) past about 7,000 nodes: the
edgeward clients take responses up to the size the orchestrator sends. Against a real gRPC server
on loopback that answers List with 10,000 nodes (found by bench/fleet_scale.py at 10,000 nodes,
where the plain channel failed with RESOURCE_EXHAUSTED)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from edgeward.security.tls import MAX_RESPONSE_BYTES
from edgeward.v1 import api_pb2, api_pb2_grpc
from orchestrator.client import AsyncEdgewardClient, EdgewardClient

NODES = 10_000


def fleet() -> api_pb2.ListNodesResponse:
    nodes = [
        api_pb2.Node(id=f"hollow-{i:05d}", quarantine_reason="x" * 500, attestation_tier="software")
        for i in range(NODES)
    ]
    return api_pb2.ListNodesResponse(nodes=nodes)


class Nodes(api_pb2_grpc.NodeServiceServicer):
    def __init__(self) -> None:
        self.response = fleet()

    def List(
        self, request: api_pb2.ListNodesRequest, context: grpc.ServicerContext
    ) -> api_pb2.ListNodesResponse:
        return self.response


@pytest.fixture
def server() -> Iterator[tuple[str, int]]:
    servicer = Nodes()
    pool = ThreadPoolExecutor(2)
    srv = grpc.server(pool, options=[("grpc.max_send_message_length", MAX_RESPONSE_BYTES)])
    api_pb2_grpc.add_NodeServiceServicer_to_server(servicer, srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    try:
        yield f"127.0.0.1:{port}", servicer.response.ByteSize()
    finally:
        srv.stop(None).wait()
        pool.shutdown(wait=True)


def test_the_list_is_past_grpcs_default_limit(server: tuple[str, int]) -> None:
    address, size = server
    assert size > 4 * 1024 * 1024
    with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as err:
        api_pb2_grpc.NodeServiceStub(channel).List(api_pb2.ListNodesRequest(), timeout=30)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_the_client_lists_the_whole_fleet(server: tuple[str, int]) -> None:
    with EdgewardClient(server[0], timeout=30) as client:
        assert len(client.list_nodes()) == NODES


def test_the_async_client_lists_the_whole_fleet(server: tuple[str, int]) -> None:
    async def main() -> int:
        client = AsyncEdgewardClient(server[0], timeout=30)
        try:
            return len(await client.list_nodes())
        finally:
            await client.close()

    assert asyncio.run(main()) == NODES
