"""Revocation ends what is already open (issue #15, 7): gRPC streams of a revoked certificate on the
orchestrator (DeploymentService/Watch, EventService/Watch) and on a node's inference API, and MQTT
sessions of a revoked identity (the embedded broker closes them; Mosquitto, once its ACL is
regenerated and reloaded, gives them no topic any more)."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable

import grpc
import pytest
from security_support import CALL_S, MODEL, Client, SecureBroker, manifest, session

from edgeward.security.audit import read_audit
from edgeward.security.pki import FleetCA
from edgeward.v1 import api_pb2, events_pb2, events_pb2_grpc
from orchestrator.server import Orchestrator

STREAM_END_S = 60.0  # the CRL is re-read once a second; this only bounds a broken implementation
# A watch stream's deadline: past everything the test does before it ends the stream (a deadline of
# 60 s ended it with DEADLINE_EXCEEDED, not UNAUTHENTICATED, in a full run on a loaded machine).
WATCH_S = 280.0


async def ended_with(stream: grpc.aio.UnaryStreamCall) -> grpc.StatusCode:
    """Read a stream until it ends; the status it ended with."""
    try:
        async with asyncio.timeout(STREAM_END_S):
            while await stream.read() is not grpc.aio.EOF:
                pass
    except grpc.aio.AioRpcError as err:
        return err.code()
    return await stream.code()


async def test_revoking_a_certificate_ends_its_open_watch_streams(
    connect: Callable[..., Client], fleet_ca: FleetCA, secure_orchestrator: Orchestrator
):
    mallory = connect("operator", "mallory")
    alice = connect("operator", "alice")
    await alice.push("m")
    watches = {
        "deployments": mallory.deployments.Watch(api_pb2.WatchDeploymentsRequest(), timeout=WATCH_S),
        "events": events_pb2_grpc.EventServiceStub(mallory.channel).Watch(
            events_pb2.WatchEventsRequest(), timeout=WATCH_S
        ),
    }
    control = alice.deployments.Watch(api_pb2.WatchDeploymentsRequest(), timeout=WATCH_S)
    await asyncio.sleep(0)  # the calls start
    await alice.apply(manifest("d1", "m"))  # one event on every stream: they are open and served
    for stream in (*watches.values(), control):
        await stream.read()
    fleet_ca.revoke("operator:mallory")
    ends = await asyncio.gather(*(ended_with(s) for s in watches.values()))
    assert ends == [grpc.StatusCode.UNAUTHENTICATED] * len(watches)
    assert control.done() is False  # another identity's stream stays open
    control.cancel()
    lines = [x for x in read_audit(secure_orchestrator.guard.audit.path) if x["who"] == "operator:mallory"]
    assert sorted(x["method"].rsplit(".", 1)[-1] for x in lines) == [
        "DeploymentService/Watch",
        "EventService/Watch",
    ]
    assert all(x["result"] == "UNAUTHENTICATED" and "security.authn.revoked" in x["reason"] for x in lines)


async def test_revoking_a_node_cuts_its_open_mqtt_session(secure_broker: SecureBroker, topic_prefix: str):
    nodes = f"{topic_prefix}/nodes"
    async with (
        session(secure_broker, "orchestrator:main") as orch,
        session(secure_broker, "node-1") as node1,
        session(secure_broker, "node-2") as node2,
    ):
        await orch.subscribe(f"{nodes}/+/telemetry", qos=1)
        await node1.subscribe(f"{nodes}/node-1/cmd", qos=1)
        await node2.subscribe(f"{nodes}/node-2/cmd", qos=1)
        secure_broker.ca.revoke("node-1")
        secure_broker.reload()
        if secure_broker.kind == "embedded":
            # It closes the session within a CRL re-read (1 s) and refuses it from then on.
            async with asyncio.timeout(STREAM_END_S):
                while node1.connected:
                    await asyncio.sleep(0.05)
        else:
            # Mosquitto keeps the connection but, once its reloaded ACL has no section for node-1, routes
            # nothing from or to it. Its reload happens between two network loop turns: probe until then.
            async with asyncio.timeout(STREAM_END_S):
                while True:
                    await node1.publish(f"{nodes}/node-1/telemetry", b"probe", qos=1)
                    await node2.publish(f"{nodes}/node-2/telemetry", b"sentinel", qos=1)
                    got = await next_payloads(orch, b"sentinel")
                    if got == [b"sentinel"]:
                        break
        # From now on, nothing from node-1 reaches the orchestrator, and node-2 is unaffected. (One
        # broker thread/loop: node-1's acknowledged publish is routed before node-2's.)
        if node1.connected:
            await node1.publish(f"{nodes}/node-1/telemetry", b"from a revoked node", qos=1)
        await node2.publish(f"{nodes}/node-2/telemetry", b"sentinel", qos=1)
        assert await next_payloads(orch, b"sentinel") == [b"sentinel"]
        await orch.publish(f"{nodes}/node-1/cmd", b"for a revoked node", qos=1)
        await orch.publish(f"{nodes}/node-2/cmd", b"for node-2", qos=1)
        assert await next_payloads(node2, b"for node-2") == [b"for node-2"]
    assert node1.queued == 0 or (secure_broker.kind == "embedded" and node1.stats.reconnects == 0)


async def next_payloads(sess, sentinel: bytes) -> list[bytes]:
    got = []
    async with asyncio.timeout(STREAM_END_S):
        async for message in sess.messages():
            got.append(message.payload)
            if message.payload == sentinel:
                return got
    raise AssertionError("session closed")


async def test_a_push_under_way_when_its_certificate_is_revoked_publishes_nothing(
    connect: Callable[..., Client], fleet_ca: FleetCA, secure_orchestrator: Orchestrator
):
    """A model push is a request stream, open as long as its client keeps sending: one started before
    the certificate was revoked used to run to its end and publish the model under the revoked
    identity (only response streams were ended)."""
    mallory = connect("team", "mallory", team="smart-home")
    data = MODEL.read_bytes()
    meta = api_pb2.ModelMetadata(
        name="late-model", version="1.0.0", size=len(data), sha256=hashlib.sha256(data).hexdigest()
    )
    parts: asyncio.Queue[api_pb2.PushModelRequest | None] = asyncio.Queue()

    async def requests():
        while (part := await parts.get()) is not None:
            yield part

    push = mallory.models.Push(requests(), timeout=CALL_S)
    await parts.put(api_pb2.PushModelRequest(metadata=meta))
    await parts.put(api_pb2.PushModelRequest(chunk=data[:1024]))
    authz = secure_orchestrator.guard.authz
    async with asyncio.timeout(STREAM_END_S):  # the push is admitted (identified, checked unrevoked)
        while not any(i.name == "mallory" for i in authz._identities.values()):
            await asyncio.sleep(0.01)
    fleet_ca.revoke("team:smart-home:mallory")
    async with asyncio.timeout(STREAM_END_S):  # until the orchestrator has read the new CRL
        while True:
            try:
                await mallory.list()
            except grpc.aio.AioRpcError as err:
                refused = err.code()
                break
    assert refused == grpc.StatusCode.UNAUTHENTICATED
    await parts.put(api_pb2.PushModelRequest(chunk=data[1024:]))
    await parts.put(None)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await push
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, info.value.details()
    assert "security.authn.revoked" in (info.value.details() or "")
    operator = connect("operator", "alice")
    listed = await operator.models.List(api_pb2.ListModelsRequest(), timeout=CALL_S)
    assert [m.name for m in listed.models] == []
    lines = [x for x in read_audit(secure_orchestrator.guard.audit.path) if x["method"].endswith("/Push")]
    assert [(x["who"], x["result"]) for x in lines] == [("team:smart-home:mallory", "UNAUTHENTICATED")]
