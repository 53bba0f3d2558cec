"""AttestationService over a real grpc.aio server on loopback: Get, List, Watch, AttestNow."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator

import grpc
import pytest
from conftest import attest, enroll, measure_platform

from attestation.grpc_api import AttestationServicer
from edgeward.v1 import attestation_pb2 as pb
from edgeward.v1 import attestation_pb2_grpc


@pytest.fixture
async def api(
    software_node, verifier
) -> AsyncIterator[tuple[attestation_pb2_grpc.AttestationServiceStub, object]]:
    node = software_node("node-a")
    measure_platform(node)
    enroll(verifier, node)

    async def attest_now(node_id: str) -> None:
        # What the orchestrator does: publish the challenge; here the "node" answers at once.
        verifier.receive(node_id, node.handle(verifier.challenge(node_id)))

    server = grpc.aio.server()
    attestation_pb2_grpc.add_AttestationServiceServicer_to_server(
        AttestationServicer(verifier, attest_now, attest_timeout_s=2.0), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield attestation_pb2_grpc.AttestationServiceStub(channel), node
    finally:
        await channel.close()
        await server.stop(None)
        del channel, server
        gc.collect()  # grpc.aio objects sit in reference cycles; let the poller thread go


async def test_get_list_and_unknown(api, verifier):
    stub, _ = api
    got = await stub.Get(pb.GetAttestationRequest(node_id="node-a"))
    assert got.state == pb.ATTESTATION_STATE_ENROLLED and got.kind == pb.ATTESTER_KIND_SOFTWARE
    listed = await stub.List(pb.ListAttestationsRequest())
    assert [n.node_id for n in listed.nodes] == ["node-a"]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Get(pb.GetAttestationRequest(node_id="nobody"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_attest_now_returns_the_new_result(api, verifier):
    stub, _ = api
    view = await stub.AttestNow(pb.AttestNowRequest(node_id="node-a"))
    assert view.state == pb.ATTESTATION_STATE_AFFIRMING
    assert view.result.tier == "software"
    assert view.signed_result.signature


async def test_watch_streams_current_state_then_changes(api, verifier, clock):
    stub, node = api
    stream = stub.Watch(pb.WatchAttestationsRequest(node_id="node-a"))
    first = await asyncio.wait_for(stream.read(), 5)
    assert first.state == pb.ATTESTATION_STATE_ENROLLED
    attest(verifier, node)
    assert (await asyncio.wait_for(stream.read(), 5)).state == pb.ATTESTATION_STATE_AFFIRMING
    clock.advance(verifier.config.result_ttl_s + 1)
    assert verifier.expire() == ["node-a"]
    assert (await asyncio.wait_for(stream.read(), 5)).state == pb.ATTESTATION_STATE_EXPIRED
    stream.cancel()
