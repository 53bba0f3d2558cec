"""Downloads of one model version that arrive together share one read of the store (a fleet's nodes
download together after an apply); a later download reads afresh. Past a limit, downloads are
refused at once. Both on the gRPC API and on the artifact server."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import pytest

from edgeward.v1 import api_pb2, api_pb2_grpc
from orchestrator.api import Control, DownloadGate, ModelService
from orchestrator.artifact_server import Artifact, ArtifactCache, ArtifactServer
from orchestrator.store import ModelRecord, SealedArtifact, SqlStore

BLOB = b"sealed model bytes" * 100


class CountingStore(SqlStore):
    reads = 0

    def read_artifact(self, sha256: str) -> bytes:
        self.reads += 1
        return super().read_artifact(sha256)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[CountingStore]:
    store = CountingStore(tmp_path / "orch")
    info = api_pb2.Model(name="vib-cnn", version="1.0.0", sha256="0" * 64, size=5, dtypes=["INT8"])
    sealed = SealedArtifact(hashlib.sha256(BLOB).hexdigest(), len(BLOB), b"k" * 32)
    store.put_model(ModelRecord("vib-cnn", "1.0.0", "0" * 64, 5, info.SerializeToString(), 1), BLOB, sealed)
    yield store
    store.close()


async def test_downloads_arriving_together_share_one_read(store: CountingStore) -> None:
    pool = ThreadPoolExecutor(1)  # the store's one thread, as in the orchestrator
    held = threading.Event()

    async def db(fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(pool, partial(fn, *args))

    control = Control(store, db, None, None, lambda: None)  # type: ignore[arg-type]
    service = ModelService(control, None, None, None, None, None)  # type: ignore[arg-type]
    request = api_pb2.DownloadModelRequest(name="vib-cnn", version="1.0.0")

    async def download() -> bytes:
        return b"".join([chunk.data async for chunk in service.Download(request, None)])  # type: ignore[arg-type]

    try:
        blocker = asyncio.get_running_loop().run_in_executor(pool, held.wait)  # the store thread is busy
        downloads = [asyncio.create_task(download()) for _ in range(20)]
        for _ in range(3):  # each download runs to its first wait: the read, behind the busy thread
            await asyncio.sleep(0)
        assert not any(t.done() for t in downloads)
        held.set()
        await blocker
        assert await asyncio.gather(*downloads) == [BLOB] * 20
        assert store.reads == 1
        assert await download() == BLOB  # the next one reads again (a revocation would be seen)
        assert store.reads == 2
    finally:
        held.set()
        pool.shutdown()


async def test_downloads_past_the_limit_are_refused_at_once_and_counted(store: CountingStore) -> None:
    """Over a real gRPC server: with two downloads being served (the store's thread busy), a third is
    refused with RESOURCE_EXHAUSTED (agents try again later); the two complete, and the gate is empty."""
    pool = ThreadPoolExecutor(1)
    held = threading.Event()

    async def db(fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(pool, partial(fn, *args))

    gate = DownloadGate(limit=2)
    control = Control(store, db, None, None, lambda: None)  # type: ignore[arg-type]
    service = ModelService(control, None, None, None, None, None, gate)  # type: ignore[arg-type]
    server = grpc.aio.server()
    api_pb2_grpc.add_ModelServiceServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub = api_pb2_grpc.ModelServiceStub(channel)
    request = api_pb2.DownloadModelRequest(name="vib-cnn", version="1.0.0")

    async def download() -> bytes:
        return b"".join([chunk.data async for chunk in stub.Download(request, timeout=30)])

    try:
        blocker = asyncio.get_running_loop().run_in_executor(pool, held.wait)
        served = [asyncio.create_task(download()) for _ in range(2)]
        while gate.active < 2:  # both reached the server and wait for the store
            await asyncio.sleep(0.01)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await download()
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "model.download.busy" in (refused.value.details() or "")
        held.set()
        await blocker
        assert await asyncio.gather(*served) == [BLOB, BLOB]
        assert (gate.active, gate.refused) == (0, 1)
    finally:
        held.set()
        await channel.close()
        await server.stop(None)
        pool.shutdown()


def test_the_artifact_server_reads_a_version_once_per_ttl_and_refuses_past_its_limit(
    store: CountingStore,
) -> None:
    """The artifact server (its own threads, no event loop): with two downloads held in a slow read,
    a third is refused with RESOURCE_EXHAUSTED; a version read is served to every download for
    ``ttl_s``, then read again; a revoked version and an unreadable store are refused clearly."""
    now = [0.0]
    started: list[str] = []
    held = threading.Event()
    revoked: set[str] = set()
    record = store.get_model("vib-cnn", "1.0.0")
    sealed = store.get_sealed("vib-cnn", "1.0.0")

    def read(name: str, version: str) -> Artifact:
        started.append(name)
        if name == "broken":
            raise RuntimeError("store unreachable")
        held.wait(30)
        mark = 1 if name in revoked else None
        return Artifact(record, replace(sealed, revoked_ms=mark), store.read_artifact(sealed.sha256))

    cache = ArtifactCache(read, ttl_s=2.0, clock=lambda: now[0])
    server = ArtifactServer(cache, limit=2, threads=2)
    port = server.start("127.0.0.1:0")
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = api_pb2_grpc.ModelServiceStub(channel)

    def download(name: str) -> bytes:
        request = api_pb2.DownloadModelRequest(name=name, version="1.0.0")
        return b"".join(chunk.data for chunk in stub.Download(request, timeout=30))

    def refusal(name: str) -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as info:
            download(name)
        return info.value

    pool = ThreadPoolExecutor(2)
    try:
        served = [pool.submit(download, name) for name in ("a", "b")]
        while len(started) < 2:  # both downloads are in their read
            threading.Event().wait(0.01)
        assert refusal("c").code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        held.set()
        assert [f.result(30) for f in served] == [BLOB, BLOB]

        assert [download("a") for _ in range(3)] == [BLOB] * 3  # within the ttl: no read
        assert cache.reads == 2
        now[0] += 2.0
        revoked.add("a")
        err = refusal("a")  # read again, and now refused
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "model.revoked" in err.details()
        assert cache.reads == 3
        err = refusal("broken")
        assert err.code() == grpc.StatusCode.UNAVAILABLE and "RuntimeError" in err.details()
        assert server.counts == {"served": 5, "refused": 1, "failed": 1}
    finally:
        held.set()
        channel.close()
        server.stop()
        pool.shutdown()


async def test_a_fleet_downloading_at_once_waits_its_turn_on_the_artifact_server(
    store: CountingStore,
) -> None:
    """2,500 downloads at once (a fleet after an apply), over 50 connections: each is served on its
    first try. gRPC's core cancelled the calls it held past 1,000 (CANCELLED), and the server
    refused past 256 at once (RESOURCE_EXHAUSTED): after an apply to 10,000 nodes 13,000 downloads
    were tried again after pauses of up to 15 s."""
    record = store.get_model("vib-cnn", "1.0.0")
    sealed = store.get_sealed("vib-cnn", "1.0.0")
    artifact = Artifact(record, sealed, store.read_artifact(sealed.sha256))
    server = ArtifactServer(ArtifactCache(lambda name, version: artifact))
    port = server.start("127.0.0.1:0")
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for _ in range(50)]
    failures: list[grpc.StatusCode] = []

    async def download(i: int) -> bytes:
        stub = api_pb2_grpc.ModelServiceStub(channels[i % len(channels)])
        request = api_pb2.DownloadModelRequest(name="vib-cnn", version="1.0.0")
        try:
            return b"".join([chunk.data async for chunk in stub.Download(request, timeout=120)])
        except grpc.aio.AioRpcError as err:
            failures.append(err.code())
            return b""

    try:
        got = await asyncio.gather(*(download(i) for i in range(2500)))
        assert failures == [] and got == [BLOB] * 2500
        assert server.counts["served"] == 2500
    finally:
        for channel in channels:
            await channel.close()
        server.stop()
