"""Helpers shared by the console's tests: manifests, model pushes, waiting for a condition."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import numpy as np

from edgeward.oip import grpc_predict_v2_pb2 as oip
from edgeward.oip import grpc_predict_v2_pb2_grpc as oip_grpc
from edgeward.v1 import api_pb2, api_pb2_grpc
from orchestrator.catalog.signing import PublisherKey, sign_metadata
from orchestrator.tui import ConsoleApp
from orchestrator.tui.widgets import LiveTable
from usecases import model_path
from usecases.industrial.generator import make_dataset

#: The publisher that signs the console tests' pushes; their orchestrators trust it.
PUBLISHER = PublisherKey.generate()


def trusted_publishers(directory: Path) -> list[str]:
    """The ``catalog.trusted_publishers`` list of an orchestrator that trusts ``PUBLISHER``."""
    directory.mkdir(parents=True, exist_ok=True)
    public = directory / f"{PUBLISHER.key_id}.pub"
    public.write_bytes(PUBLISHER.public_pem())
    return [str(public)]


def vibration_model(precision: str = "int8") -> Path:
    """The industrial use case's committed model (looked up when needed, not at import)."""
    return model_path("industrial", precision)


def manifest(
    name: str,
    model: str,
    version: str = "1.0.0",
    replicas: int = 1,
    selector: dict[str, str] | None = None,
    max_latency_ms: float = 0.0,
    strategy: str = "",
) -> str:
    text = (
        "apiVersion: edgeward/v1\nkind: Deployment\n"
        f"metadata: {{name: {name}}}\n"
        f"spec:\n  model: {{name: {model}, version: {version}}}\n  replicas: {replicas}\n"
        f"  requirements: {{accelerators: [cpu-litert], maxLatencyMs: {max_latency_ms:g}}}\n"
    )
    if strategy:
        text += f"  strategy: {strategy}\n"
    if selector:
        labels = ", ".join(f"{k}: {v}" for k, v in selector.items())
        text += f"  selector: {{matchLabels: {{{labels}}}}}\n"
    return text


def push_parts(path: Path, name: str, version: str, use_case: str = "") -> list[api_pb2.PushModelRequest]:
    data = path.read_bytes()
    meta = api_pb2.ModelMetadata(
        name=name,
        version=version,
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        use_case=use_case,
    )
    meta = sign_metadata(meta, PUBLISHER)
    return [api_pb2.PushModelRequest(metadata=meta), api_pb2.PushModelRequest(chunk=data)]


async def push(channel, path: Path, name: str, version: str = "1.0.0", use_case: str = "") -> api_pb2.Model:
    stub = api_pb2_grpc.ModelServiceStub(channel)
    parts = push_parts(path, name, version, use_case)

    async def stream():
        for part in parts:
            yield part

    return await stub.Push(stream())


async def eventually(
    check: Callable[[], bool | Awaitable[bool]], timeout: float = 20.0, what: str = "condition"
) -> None:
    """Wait for ``check`` (sync or async) to hold, yielding to the event loop in between."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


async def infer(endpoint: str, model: api_pb2.Model, count: int) -> None:
    """``count`` real inferences of the industrial model on a node's inference API."""
    x, _ = make_dataset(1, seed=3)
    spec = model.inputs[0]
    q = np.clip(np.round(x[:1] / spec.scale) + spec.zero_point, -128, 127).astype(np.int8)
    request = oip.ModelInferRequest(
        model_name=model.name,
        model_version=model.version,
        inputs=[oip.ModelInferRequest.InferInputTensor(name=spec.name, datatype="INT8", shape=list(q.shape))],
        raw_input_contents=[q.tobytes()],
    )
    async with grpc.aio.insecure_channel(endpoint) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        for _ in range(count):
            await stub.ModelInfer(request)


def rows(app: ConsoleApp, table_id: str) -> dict[str, dict[str, str]]:
    """The table's rows as shown: row key -> column label -> text."""
    table = app.screen.query_one(f"#{table_id}", LiveTable)
    labels = [str(c.label) for c in table.columns.values()]
    return {
        str(key.value): dict(zip(labels, map(str, table.get_row(key)), strict=True)) for key in table.rows
    }


def event_ids(app: ConsoleApp) -> list[str]:
    return [e.id for e in app.state.events]
