"""The Open Inference Protocol server end to end: a real grpc.aio server on 127.0.0.1 over real
cpu-litert backends running the committed industrial models."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from accelerators.base import InvalidInput, ModelArtifact, ModelHandle
from accelerators.cpu_litert import CpuLitertBackend, CpuLitertConfig
from accelerators.tflite_model import interpreter_runtime
from edgeward import __version__
from edgeward.oip import grpc_predict_v2_pb2 as pb
from edgeward.oip import grpc_predict_v2_pb2_grpc as pb_grpc
from node_agent.inference_server import (
    SERVICE_NAME,
    InferenceServerError,
    LatencyStats,
    ModelNotFound,
    ModelNotReady,
    ModelTable,
    infer,
    serve,
)

MODELS = Path(__file__).resolve().parents[2] / "usecases" / "industrial" / "models"
F32 = "vibration"
INT8 = "vibration-int8"
SHAPE = (1, 1024, 1)


@dataclass
class Node:
    table: ModelTable
    backend: CpuLitertBackend
    stub: pb_grpc.GRPCInferenceServiceStub
    channel: grpc.aio.Channel
    port: int
    f32: ModelHandle
    int8: ModelHandle
    data: dict[str, bytes]


@pytest.fixture
async def node() -> AsyncIterator[Node]:
    backend = CpuLitertBackend(CpuLitertConfig(energy_counter=None))
    table = ModelTable()
    data = {
        F32: (MODELS / "vibration_cnn_f32.tflite").read_bytes(),
        INT8: (MODELS / "vibration_cnn_int8.tflite").read_bytes(),
    }
    handles = {}
    for name, blob in data.items():
        handles[name] = backend.load(ModelArtifact.from_bytes(name, "1", blob))
        table.add(backend, handles[name])
    server, port = await serve(table)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    node = Node(
        table,
        backend,
        pb_grpc.GRPCInferenceServiceStub(channel),
        channel,
        port,
        handles[F32],
        handles[INT8],
        data,
    )
    try:
        yield node
    finally:
        await channel.close()
        await server.stop(None)
        backend.close()
        await asyncio.get_running_loop().shutdown_default_executor()  # run_blocking's threads
        # grpc.aio's poller thread is process-wide and ends only once every aio channel and
        # server object is gone; they sit in reference cycles, so collect them now.
        del node.stub, node.channel, channel, server
        gc.collect()


def bare_invoke(data: bytes, x: np.ndarray) -> np.ndarray:
    interpreter = interpreter_runtime().interpreter(model_content=data)
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])


def signal(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, 1.0, SHAPE).astype(np.float32)


def raw_request(
    handle: ModelHandle, x: np.ndarray, datatype: str = "FP32", **kw: Any
) -> pb.ModelInferRequest:
    return pb.ModelInferRequest(
        model_name=handle.name,
        inputs=[
            pb.ModelInferRequest.InferInputTensor(
                name=handle.inputs[0].name, datatype=datatype, shape=x.shape
            )
        ],
        raw_input_contents=[x.tobytes()],
        **kw,
    )


def output_of(response: pb.ModelInferResponse, index: int = 0) -> np.ndarray:
    tensor = response.outputs[index]
    dtype = {"FP32": np.float32, "INT8": np.int8}[tensor.datatype]
    return np.frombuffer(response.raw_output_contents[index], dtype).reshape(tuple(tensor.shape))


# ----------------------------------------------------------------------------- server and models


async def test_server_live_ready_metadata(node: Node) -> None:
    assert (await node.stub.ServerLive(pb.ServerLiveRequest())).live
    assert (await node.stub.ServerReady(pb.ServerReadyRequest())).ready
    meta = await node.stub.ServerMetadata(pb.ServerMetadataRequest())
    assert (meta.name, meta.version) == ("edgeward", __version__)


async def test_model_ready(node: Node) -> None:
    assert (await node.stub.ModelReady(pb.ModelReadyRequest(name=F32))).ready
    assert (await node.stub.ModelReady(pb.ModelReadyRequest(name=INT8, version="1"))).ready
    node.table.mark_loading("warming-up", "3")
    assert not (await node.stub.ModelReady(pb.ModelReadyRequest(name="warming-up"))).ready
    # Unknown model or version: not ready, and no error (Triton's behaviour; clients rely on it).
    assert not (await node.stub.ModelReady(pb.ModelReadyRequest(name=F32, version="2"))).ready
    assert not (await node.stub.ModelReady(pb.ModelReadyRequest(name="no-such-model"))).ready


async def test_repository_index(node: Node) -> None:
    node.table.mark_loading("warming-up", "3")
    index = await node.stub.RepositoryIndex(pb.RepositoryIndexRequest())
    rows = {(m.name, m.version): m.state for m in index.models}
    assert rows == {(F32, "1"): "READY", (INT8, "1"): "READY", ("warming-up", "3"): "LOADING"}
    ready = await node.stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True))
    assert {m.name for m in ready.models} == {F32, INT8}
    meta = await node.stub.ServerMetadata(pb.ServerMetadataRequest())
    assert "model_repository" in meta.extensions


async def test_model_metadata(node: Node) -> None:
    meta = await node.stub.ModelMetadata(pb.ModelMetadataRequest(name=INT8))
    assert (meta.name, list(meta.versions), meta.platform) == (INT8, ["1"], "cpu-litert")
    [inp] = meta.inputs
    [out] = meta.outputs
    assert (inp.name, inp.datatype, list(inp.shape)) == (node.int8.inputs[0].name, "INT8", list(SHAPE))
    assert (out.datatype, list(out.shape)) == ("INT8", [1, 4])
    node.table.mark_loading("warming-up", "3")
    for name, code in (("nope", grpc.StatusCode.NOT_FOUND), ("warming-up", grpc.StatusCode.UNAVAILABLE)):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await node.stub.ModelMetadata(pb.ModelMetadataRequest(name=name))
        assert caught.value.code() == code
        assert name in caught.value.details()


# ------------------------------------------------------------------------------------ inference


async def test_infer_raw_f32_equals_bare_interpreter(node: Node) -> None:
    x = signal(1)
    response = await node.stub.ModelInfer(raw_request(node.f32, x, id="req-7"))
    assert (response.model_name, response.model_version, response.id) == (F32, "1", "req-7")
    [out] = response.outputs
    assert (out.name, out.datatype, list(out.shape)) == (node.f32.outputs[0].name, "FP32", [1, 4])
    np.testing.assert_array_equal(output_of(response), bare_invoke(node.data[F32], x))


async def test_infer_typed_fp32_contents(node: Node) -> None:
    x = signal(2)
    tensor = pb.ModelInferRequest.InferInputTensor(
        name=node.f32.inputs[0].name,
        datatype="FP32",
        shape=SHAPE,
        contents=pb.InferTensorContents(fp32_contents=x.ravel().tolist()),
    )
    response = await node.stub.ModelInfer(
        pb.ModelInferRequest(model_name=F32, model_version="1", inputs=[tensor])
    )
    np.testing.assert_array_equal(output_of(response), bare_invoke(node.data[F32], x))


async def test_infer_int8_raw_typed_and_float(node: Node) -> None:
    q = np.random.default_rng(3).integers(-128, 127, SHAPE, dtype=np.int8, endpoint=True)
    expected = bare_invoke(node.data[INT8], q)
    raw = await node.stub.ModelInfer(raw_request(node.int8, q, datatype="INT8"))
    np.testing.assert_array_equal(output_of(raw), expected)
    tensor = pb.ModelInferRequest.InferInputTensor(
        name=node.int8.inputs[0].name,
        datatype="INT8",
        shape=SHAPE,
        contents=pb.InferTensorContents(int_contents=q.ravel().tolist()),
    )
    typed = await node.stub.ModelInfer(pb.ModelInferRequest(model_name=INT8, inputs=[tensor]))
    np.testing.assert_array_equal(output_of(typed), expected)
    # FP32 data for a quantized input is quantized by the backend, as in-process
    x = signal(4)
    from_float = await node.stub.ModelInfer(raw_request(node.int8, x))
    direct = node.backend.infer(node.int8, [x]).outputs[node.int8.outputs[0].name]
    np.testing.assert_array_equal(output_of(from_float), direct)


async def test_requested_outputs(node: Node) -> None:
    name = node.f32.outputs[0].name
    request = raw_request(
        node.f32, signal(), outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name=name)]
    )
    response = await node.stub.ModelInfer(request)
    assert [o.name for o in response.outputs] == [name]
    request = raw_request(
        node.f32, signal(), outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="logits")]
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await node.stub.ModelInfer(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "output 'logits'" in caught.value.details()


async def test_infer_unknown_and_loading_models(node: Node) -> None:
    request = raw_request(node.f32, signal())
    request.model_name = "nope"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await node.stub.ModelInfer(request)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    request.model_name, request.model_version = F32, "9"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await node.stub.ModelInfer(request)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    node.table.mark_loading(F32, "9")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await node.stub.ModelInfer(request)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def _tensor(name: str, datatype: str, shape: tuple[int, ...], **contents: Any) -> Any:
    kwargs: dict[str, Any] = {"name": name, "datatype": datatype, "shape": shape}
    if contents:
        kwargs["contents"] = pb.InferTensorContents(**contents)
    return pb.ModelInferRequest.InferInputTensor(**kwargs)


INPUT = "serving_default_vibration:0"
ZEROS = np.zeros(SHAPE, np.float32)


ONE = [ZEROS.tobytes()]
TWO = ONE * 2


@pytest.mark.parametrize(
    ("model", "inputs", "raw", "tensor", "fragment"),
    [
        (F32, [_tensor(INPUT, "FP32", (1, 1024))], [bytes(4096)], INPUT, "shape [1, 1024]"),
        (F32, [_tensor(INPUT, "INT32", SHAPE)], ONE, INPUT, "dtype int32"),
        (F32, [_tensor(INPUT, "FP32", SHAPE)], [bytes(4092)], INPUT, "raw content has 4092 bytes"),
        (F32, [_tensor(INPUT, "FP32", SHAPE)], TWO, "raw_input_contents", "2 entries for 1 inputs"),
        (F32, [], [], INPUT, "missing"),
        (F32, [_tensor(INPUT, "FP32", SHAPE), _tensor("extra", "FP32", SHAPE)], TWO, "extra", "not an input"),
        (F32, [_tensor(INPUT, "FP32", SHAPE)] * 2, TWO, INPUT, "given twice"),
        (F32, [_tensor(INPUT, "FP8", SHAPE)], ONE, INPUT, "unsupported datatype 'FP8'"),
        (F32, [_tensor(INPUT, "FP32", (1, -1, 1))], ONE, INPUT, "negative dimension"),
        (F32, [_tensor(INPUT, "FP32", SHAPE, fp32_contents=[0.0] * 10)], [], INPUT, "has 10 elements"),
        (F32, [_tensor(INPUT, "FP32", SHAPE, fp32_contents=[0.0] * 1024)], ONE, INPUT, "both raw"),
        (F32, [_tensor(INPUT, "FP16", SHAPE)], [], INPUT, "FP16 must be sent as raw"),
        (INT8, [_tensor(INPUT, "INT8", SHAPE, int_contents=[300] * 1024)], [], INPUT, "outside the INT8"),
    ],
    ids=[
        "shape", "dtype", "raw-size", "raw-count", "no-inputs", "unexpected", "duplicate", "datatype",
        "negative-dim", "typed-count", "raw-and-typed", "fp16-typed", "int8-range",
    ],
)  # fmt: skip
async def test_invalid_argument_names_the_tensor(
    node: Node, model: str, inputs: list[Any], raw: list[bytes], tensor: str, fragment: str
) -> None:
    request = pb.ModelInferRequest(model_name=model, inputs=inputs, raw_input_contents=raw)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await node.stub.ModelInfer(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert tensor in caught.value.details()
    assert fragment in caught.value.details()


async def test_concurrent_requests(node: Node) -> None:
    xs = [signal(seed) for seed in range(12)]
    responses = await asyncio.gather(*(node.stub.ModelInfer(raw_request(node.f32, x)) for x in xs))
    for x, response in zip(xs, responses, strict=True):
        np.testing.assert_array_equal(output_of(response), bare_invoke(node.data[F32], x))


# -------------------------------------------------------------------------- in-process and stats


async def test_in_process_infer_and_stats(node: Node) -> None:
    x = signal(5)
    result = await infer(node.table, F32, {node.f32.inputs[0].name: x})
    np.testing.assert_array_equal(result.outputs[node.f32.outputs[0].name], bare_invoke(node.data[F32], x))
    await node.stub.ModelInfer(raw_request(node.f32, x))
    with pytest.raises(InvalidInput):
        await infer(node.table, F32, {node.f32.inputs[0].name: x[:, :10]}, version="1")
    with pytest.raises(ModelNotFound):
        await infer(node.table, "nope", {})
    node.table.mark_loading("warming-up", "1")
    with pytest.raises(ModelNotReady):
        await infer(node.table, "warming-up", {})
    snapshot = node.table.stats[(F32, "1")].snapshot()
    assert (snapshot.count, snapshot.errors) == (2, 1)
    assert 0 < snapshot.p50_ms <= snapshot.p95_ms <= snapshot.p99_ms
    assert snapshot.energy_j > 0
    assert snapshot.energy_source == "modelled"
    assert node.table.stats[(F32, "1")].by_kind == {"cpu-litert": 2}  # served, per accelerator
    assert node.table.in_flight == 0


def test_latency_stats_window() -> None:
    stats = LatencyStats(window=100)
    assert stats.snapshot().p99_ms == 0.0
    for ms in range(1, 1001):
        stats.record(ms / 1e3, 0.5, "measured")
    snapshot = stats.snapshot()
    assert snapshot.count == 1000
    assert snapshot.energy_j == pytest.approx(500.0)
    assert snapshot.energy_source == "measured"
    # only the last 100 samples (901..1000 ms) count
    assert snapshot.p50_ms == pytest.approx(950.5)
    assert snapshot.p99_ms == pytest.approx(999.01)


async def test_model_table_resolution(node: Node) -> None:
    second = node.backend.load(ModelArtifact.from_bytes(F32, "2", node.data[F32]))
    node.table.add(node.backend, second)
    assert node.table.resolve(F32) == (node.backend, second)
    assert node.table.resolve(F32, "1") == (node.backend, node.f32)
    meta = await node.stub.ModelMetadata(pb.ModelMetadataRequest(name=F32))
    assert list(meta.versions) == ["2"]
    assert node.table.remove(F32, "2") == (node.backend, second)
    assert node.table.resolve(F32) == (node.backend, node.f32)
    assert node.table.remove(F32, "2") is None


# ---------------------------------------------------------------------------- health, reflection


async def test_health_and_reflection(node: Node) -> None:
    health = health_pb2_grpc.HealthStub(node.channel)
    for service in ("", SERVICE_NAME):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING

    stub = reflection_pb2_grpc.ServerReflectionStub(node.channel)
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="inference.GRPCInferenceService"),
    ]
    replies = [reply async for reply in stub.ServerReflectionInfo(iter(requests))]
    names = {s.name for s in replies[0].list_services_response.service}
    assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= names
    assert replies[1].file_descriptor_response.file_descriptor_proto  # stock tools can decode requests


async def test_health_list_and_reflection_v1(node: Node, caplog: pytest.LogCaptureFixture) -> None:
    # health List, with the stock stub: every service's status, and nothing in the log
    listed = await health_pb2_grpc.HealthStub(node.channel).List(health_pb2.HealthListRequest())
    assert {name: s.status for name, s in listed.statuses.items()} == {
        "": health_pb2.HealthCheckResponse.SERVING,
        SERVICE_NAME: health_pb2.HealthCheckResponse.SERVING,
    }
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    # reflection v1 (what grpcurl and grpcui ask first): the same messages under grpc.reflection.v1
    v1 = node.channel.stream_stream(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="inference.GRPCInferenceService"),
    ]
    replies = [reply async for reply in v1(iter(requests))]
    names = {s.name for s in replies[0].list_services_response.service}
    assert {
        "inference.GRPCInferenceService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= names
    assert replies[1].file_descriptor_response.file_descriptor_proto


async def test_bind_conflict_is_reported(node: Node) -> None:
    with pytest.raises(InferenceServerError, match="cannot bind"):
        await serve(node.table, f"127.0.0.1:{node.port}")
