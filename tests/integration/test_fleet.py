"""The control plane end to end in one event loop: real broker (Mosquitto and embedded), real gRPC,
real LiteRT interpreter, real .tflite model."""

from __future__ import annotations

import math

import grpc
import numpy as np
import pytest
from conftest import eventually, manifest

from edgeward.mqtt.session import MqttSession
from edgeward.mqtt.topics import node_topic
from edgeward.oip import grpc_predict_v2_pb2 as oip
from edgeward.oip import grpc_predict_v2_pb2_grpc as oip_grpc
from edgeward.v1 import api_pb2, node_pb2
from edgeward.wire import node_message
from usecases.industrial.generator import make_dataset

pytestmark = [pytest.mark.broker]


async def _infer(endpoint: str, model: api_pb2.Model) -> np.ndarray:
    x, _ = make_dataset(1, seed=3)
    spec = model.inputs[0]
    q = np.clip(np.round(x[:1] / spec.scale) + spec.zero_point, -128, 127).astype(np.int8)
    async with grpc.aio.insecure_channel(endpoint) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        resp = await stub.ModelInfer(
            oip.ModelInferRequest(
                model_name=model.name,
                model_version=model.version,
                inputs=[
                    oip.ModelInferRequest.InferInputTensor(
                        name=spec.name, datatype="INT8", shape=list(q.shape)
                    )
                ],
                raw_input_contents=[q.tobytes()],
            )
        )
    out = resp.outputs[0]
    return np.frombuffer(resp.raw_output_contents[0], dtype=np.int8 if out.datatype == "INT8" else np.float32)


async def test_apply_run_serve_delete(fleet):
    orch, agents, api = await fleet(nodes=3)
    model = await api.push()
    assert model.dtypes == ["INT8"] and model.inputs[0].datatype == "INT8"
    resp = await api.apply(manifest(replicas=3))
    assert resp.created

    async def all_running() -> bool:
        dep = await api.deployment("vib")
        return dep.status.running == 3

    await eventually(all_running, what="3 replicas running")
    dep = await api.deployment("vib")
    # The basic view: the same deployment and counts, no replica list (one count in the store).
    basic = await api.deployments.Get(
        api_pb2.GetDeploymentRequest(name="vib", view=api_pb2.DEPLOYMENT_VIEW_BASIC)
    )
    assert basic.status.running == 3 and not basic.status.replica_list
    full = api_pb2.Deployment()
    full.CopyFrom(dep)
    full.status.ClearField("replica_list")
    full.status.ClearField("slo_attainment")
    full.status.slo_replicas_measured = full.status.slo_replicas_met = 0
    assert basic == full
    listed = await api.deployments.List(api_pb2.ListDeploymentsRequest(view=api_pb2.DEPLOYMENT_VIEW_BASIC))
    assert list(listed.deployments) == [basic]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await api.deployments.Get(api_pb2.GetDeploymentRequest(name="vib", view=7))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "view" in info.value.details()
    nodes_used = {r.node_id for r in dep.status.replica_list}
    assert nodes_used == {"n1", "n2", "n3"}, "spread puts one replica on each node"
    endpoints = {n.id: n.inventory.inference_endpoint for n in await api.nodes_list()}
    for rep in dep.status.replica_list:
        scores = await _infer(endpoints[rep.node_id], model)
        assert scores.shape == (4,)

    deleted = await api.deployments.Delete(api_pb2.DeleteDeploymentRequest(name="vib"))
    assert deleted.replicas_evicted == 3

    async def gone() -> bool:
        return all(not a.runtime.replicas for a in agents) and not await orch.db(orch.store.list_replicas)

    await eventually(gone, what="replicas removed from nodes and store")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await api.deployment("vib")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_scale_and_drain(fleet):
    orch, agents, api = await fleet(nodes=2)
    await api.push()
    await api.apply(manifest(replicas=2))

    async def running(n: int) -> bool:
        dep = await api.deployment("vib")
        live = [r for r in dep.status.replica_list if r.phase != node_pb2.REPLICA_PHASE_EVICTED]
        return dep.status.running == n and len(live) == n

    await eventually(lambda: running(2), what="2 running")
    resp = await api.apply(manifest(replicas=1))
    assert resp.changed and resp.deployment.generation == 1
    await eventually(lambda: running(1), what="scaled down to 1")
    await api.apply(manifest(replicas=2))
    await eventually(lambda: running(2), what="scaled back to 2")

    drained = await api.nodes.Drain(api_pb2.DrainRequest(node_id="n1"))
    assert drained.node.cordoned and drained.replicas_evicted == 1

    async def all_on_n2() -> bool:
        dep = await api.deployment("vib")
        live = [r for r in dep.status.replica_list if r.phase != node_pb2.REPLICA_PHASE_EVICTED]
        return await running(2) and {r.node_id for r in live} == {"n2"} and not agents[0].runtime.replicas

    await eventually(all_on_n2, what="replicas moved off the drained node")


async def test_pending_replica_explains_why(fleet):
    orch, agents, api = await fleet(nodes=2)
    await api.push()
    await api.apply(manifest(replicas=1, extra="  selector: {matchLabels: {zone: mars}}\n"))

    async def explained() -> bool:
        dep = await api.deployment("vib")
        return any(r.reason == "scheduler.filter.selector" for r in dep.status.replica_list)

    await eventually(explained, what="pending reason")
    dep = await api.deployment("vib")
    assert dep.status.replica_list[0].message == "0/2 nodes are available: 2 scheduler.filter.selector"


async def test_grpc_refuses_bad_requests_with_field_paths(fleet):
    orch, agents, api = await fleet(nodes=1)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await api.apply(manifest(replicas=-1))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "spec.replicas" in info.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await api.apply(manifest(model="no-such-model"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await api.push(data=b"definitely not a tflite model" * 10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not_tflite" in info.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await api.push(sha256="0" * 64)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "sha256_mismatch" in info.value.details()
    await api.push()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await api.push()
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert not await orch.db(orch.store.list_deployments), "nothing was stored by refused requests"


async def test_garbage_on_every_topic_is_dropped_and_counted(fleet, mqtt_url, topic_prefix, request):
    orch, agents, api = await fleet(nodes=1)
    # The embedded broker refuses oversized payloads itself (and counts them); Mosquitto passes
    # them on and the receiving session drops them.
    broker = request.getfixturevalue("embedded_broker") if "embedded" in request.node.callspec.id else None
    agent = agents[0]
    before_orch, before_agent = sum(orch.drop_counts().values()), sum(agent.drop_counts().values())
    status_for_n1 = node_message("n1", status=node_pb2.Status(state=1)).SerializeToString()
    bad: list[tuple[str, bytes]] = []
    for kind in ("hello", "status", "telemetry", "events", "evidence"):
        bad.append((node_topic("n1", kind, topic_prefix), b"\x00\xffgarbage"))
        bad.append((node_topic("n1", kind, topic_prefix), b"\x08" * 300_000))  # over the payload cap
    bad.append((node_topic("n7", "status", topic_prefix), status_for_n1))  # names another node
    bad.append((node_topic("n1", "telemetry", topic_prefix), status_for_n1))  # wrong body for topic
    bad.append((f"{topic_prefix}/nodes/n1/hello/extra", b"x"))  # not a node topic
    nan_watts = node_pb2.Hello(accelerators=[node_pb2.Accelerator(kind="cpu-litert", active_w=math.nan)])
    bad.append(
        (node_topic("n1", "hello", topic_prefix), node_message("n1", hello=nan_watts).SerializeToString())
    )
    cmd_garbage = [
        b"\x00\xff",
        b"\x08" * 300_000,
        node_pb2.Command(
            schema=1, command_id="c", node_id="n2", undeploy=node_pb2.UndeployReplica(replica_id="r")
        ).SerializeToString(),
    ]
    async with MqttSession(mqtt_url, "attacker", max_payload=1 << 20) as s:
        for topic, payload in bad:
            await s.publish(topic, payload, qos=1)
        for payload in cmd_garbage:
            await s.publish(node_topic("n1", "cmd", topic_prefix), payload, qos=1)

    async def counted() -> bool:
        # the topic with an extra level does not match our subscriptions, so it never arrives
        at_broker = broker.dropped_oversize if broker else 0
        return sum(orch.drop_counts().values()) - before_orch + at_broker == len(bad) - 1 + (
            1 if broker else 0
        ) and sum(agent.drop_counts().values()) - before_agent + (1 if broker else 0) == len(cmd_garbage)

    await eventually(counted, what="drops counted")
    counts = orch.drop_counts()
    assert counts.get("wire.payload.too_large", 0) == (0 if broker else 5)
    assert broker is None or broker.dropped_oversize == 6
    assert counts["wire.payload.wrong_node"] == 1
    assert counts["wire.payload.wrong_body"] == 1
    assert counts["wire.hello.invalid_value"] == 1  # and the node keeps the hello it sent itself
    assert all(math.isfinite(acc.active_w) for acc in orch.fleet.nodes["n1"].hello.accelerators)
    assert counts["wire.payload.unparseable"] + counts.get("wire.payload.unknown_schema", 0) == 5
    assert agent.drop_counts()["wire.payload.wrong_node"] == 1
    # still alive and serving
    assert (await api.nodes_list())[0].state == node_pb2.NODE_STATE_ONLINE
    await api.push()


async def test_repeated_command_is_not_executed_twice(fleet, mqtt_url, topic_prefix):
    await fleet(nodes=1)
    cmd = node_pb2.Command(
        schema=1, command_id="once", node_id="n1", undeploy=node_pb2.UndeployReplica(replica_id="ghost")
    )
    acks: list[node_pb2.CommandAck] = []
    async with MqttSession(mqtt_url, "observer") as s:
        await s.subscribe(node_topic("n1", "events", topic_prefix), qos=1)
        for _ in range(2):
            await s.publish(node_topic("n1", "cmd", topic_prefix), cmd.SerializeToString(), qos=1)
        async for message in s.messages():
            msg = node_pb2.NodeMessage.FromString(message.payload)
            if msg.event.ack.command_id == "once":
                acks.append(msg.event.ack)
            if len(acks) == 2:
                break
    assert [a.duplicate for a in acks] == [False, True]
