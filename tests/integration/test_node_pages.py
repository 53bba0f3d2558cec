"""NodeService.List in pages (page_size, page_token) against a real orchestrator and real agents:
the pages, in node id order, make up the whole list; a bad size or token is refused with its field;
the clients page through by themselves."""

from __future__ import annotations

import grpc
import pytest

from edgeward.v1 import api_pb2, api_pb2_grpc
from orchestrator import api as api_module
from orchestrator import client as client_module
from orchestrator.client import AsyncEdgewardClient

pytestmark = [pytest.mark.broker]


async def test_pages_make_up_the_whole_list_in_id_order(fleet, monkeypatch) -> None:
    orch, _, _ = await fleet(nodes=5, attested=False)
    async with grpc.aio.insecure_channel(orch.address) as channel:
        nodes = api_pb2_grpc.NodeServiceStub(channel)
        whole = [n.id for n in (await nodes.List(api_pb2.ListNodesRequest())).nodes]
        assert whole == sorted(whole) and len(whole) == 5
        pages, token = [], ""
        while True:
            page = await nodes.List(api_pb2.ListNodesRequest(page_size=2, page_token=token))
            pages.append([n.id for n in page.nodes])
            token = page.next_page_token
            if not token:
                break
        assert pages == [whole[0:2], whole[2:4], whole[4:5]]
        monkeypatch.setattr(api_module, "MAX_NODES_PAGE", 3)  # a larger page_size gets the cap
        capped = await nodes.List(api_pb2.ListNodesRequest(page_size=100))
        assert [n.id for n in capped.nodes] == whole[0:3] and capped.next_page_token

        for request, field in (
            (api_pb2.ListNodesRequest(page_size=-1), "page_size"),
            (api_pb2.ListNodesRequest(page_size=2, page_token="not-a-token"), "page_token"),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await nodes.List(request)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert err.value.details().startswith(f"{field}: ")


async def test_the_client_pages_through_every_node(fleet, monkeypatch) -> None:
    orch, _, _ = await fleet(nodes=5, attested=False)
    monkeypatch.setattr(client_module, "NODES_PAGE", 2)
    client = AsyncEdgewardClient(orch.address)
    try:
        assert [n.id for n in await client.list_nodes()] == [f"n{i}" for i in range(1, 6)]
    finally:
        await client.close()
