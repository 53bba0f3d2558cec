"""Variants of the hostile-tenant breaks of issue #15 that the first fixes did not cover, against the
real orchestrator (mutual TLS, authorization, audit)."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable

import grpc
import pytest
from security_support import MODEL, Client, manifest

from edgeward.security.audit import read_audit
from edgeward.security.authz import MAX_WATCHES
from edgeward.v1 import api_pb2
from orchestrator.multiexit import plan
from orchestrator.server import Orchestrator

DENIED = grpc.StatusCode.PERMISSION_DENIED


async def refused(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


def stage(name: str, model: str, pipeline: str, k: int, threshold: float | None = None) -> str:
    """A multi-exit stage deployment (``threshold`` on every stage but the last)."""
    cut = f", threshold: {threshold}" if threshold is not None else ""
    return manifest(name, model) + f"  multiExit: {{pipeline: {pipeline}, stage: {k}{cut}}}\n"


def not_wired(orch: Orchestrator) -> dict[str, str]:
    """Why each multi-exit model is not served (no replica runs here, so each has a reason)."""
    return plan(orch.store.list_deployments(), [], {})[1]


async def test_a_team_cannot_join_or_shadow_another_teams_multi_exit_model(
    connect: Callable[..., Client], secure_orchestrator: Orchestrator
):
    """The orchestrator wires every deployment that names a pipeline into that multi-exit model, and a
    node serves the pipeline under its name ahead of a plain model of the same name. Another team's
    stage under the same pipeline name used to be accepted: a second stage 1 (or a stage 3 after a
    last stage) unwired the model on every node, a stage where one was missing spliced the other
    team's model into the chain, and a one-stage pipeline named like another team's model made nodes
    answer that model's callers with the other team's pipeline."""
    home = connect("team", "ci", team="smart-home")
    auto = connect("team", "ci", team="automotive")
    operator = connect("operator", "alice")
    for model in ("home-s1", "home-s2", "home-model"):
        await home.push(model)
    await home.apply(stage("home-st1", "home-s1", "home-pipe", 1, 0.9))
    await home.apply(stage("home-st2", "home-s2", "home-pipe", 2))
    await auto.push("auto-model")
    await operator.push("ops-model")
    await operator.apply(stage("ops-st1", "ops-model", "ops-pipe", 1, 0.9))
    before = not_wired(secure_orchestrator)
    assert before["home-pipe"] == "stage 1 (home-st1) has no running replica"

    attacks = {
        "a second stage 1": stage("auto-x", "auto-model", "home-pipe", 1, 0.5),
        "a stage after the last": stage("auto-x", "auto-model", "home-pipe", 3),
        "a stage of a name another team's model has": stage("auto-x", "auto-model", "home-model", 1),
        "a stage of the operator's pipeline": stage("auto-x", "auto-model", "ops-pipe", 2),
    }
    for what, text in attacks.items():
        for dry_run in (True, False):
            request = api_pb2.ApplyRequest(manifest=text, dry_run=dry_run)
            err = await refused(auto.deployments.Apply(request, timeout=10))
            assert err.code() == DENIED, (what, err.code(), err.details())
            assert "security.authz.pipeline_not_owned" in err.details(), (what, err.details())
    assert await auto.list() == []
    assert not_wired(secure_orchestrator) == before  # still complete but for its replicas
    lines = [x for x in read_audit(secure_orchestrator.guard.audit.path) if x["who"] == "team:automotive:ci"]
    refusals = [x for x in lines if x["method"].endswith("/Apply")]
    assert len(refusals) == 2 * len(attacks)
    assert all(x["result"] == "PERMISSION_DENIED" and "pipeline" in x["reason"] for x in refusals)

    # A pipeline's name is held like a model's: nobody else pushes a model under it.
    assert (await refused(auto.push("home-pipe"))).code() == DENIED
    # The owner keeps changing its own stages; a team claims a pipeline name nobody uses.
    await home.apply(stage("home-st2", "home-s2", "home-pipe", 2).replace("replicas: 0", "replicas: 1"))
    await auto.apply(stage("auto-st1", "auto-model", "auto-pipe", 1))
    err = await refused(home.apply(stage("home-x", "home-s1", "auto-pipe", 2)))
    assert err.code() == DENIED and "security.authz.pipeline_not_owned" in err.details()
    # A refused or dry-run call leaves no claim behind.
    dry = api_pb2.ApplyRequest(manifest=stage("auto-dry", "auto-model", "dry-pipe", 1), dry_run=True)
    await auto.deployments.Apply(dry, timeout=10)
    await home.apply(stage("home-dry", "home-s1", "dry-pipe", 1))


async def test_a_push_cannot_bloat_everyones_catalogue(connect: Callable[..., Client]):
    """Push metadata had no bound but the 4 MiB request: every version's description, labels and
    profiles are kept and come back in each List, the operator's whole catalogue included. Two
    versions with megabytes of metadata and the operator's `models list` outgrew what a client
    accepts (RESOURCE_EXHAUSTED), for good."""
    mallory = connect("team", "ci", team="automotive")
    operator = connect("operator", "alice")
    data = MODEL.read_bytes()

    def meta(version: str, **fields) -> api_pb2.ModelMetadata:
        m = api_pb2.ModelMetadata(
            name="big", version=version, size=len(data), sha256=hashlib.sha256(data).hexdigest()
        )
        for key, value in fields.items():
            if key == "labels":
                m.labels.update(value)
            else:
                setattr(m, key, value)
        return m

    async def push(m: api_pb2.ModelMetadata) -> api_pb2.Model:
        async def parts():
            yield api_pb2.PushModelRequest(metadata=m)
            yield api_pb2.PushModelRequest(chunk=data)

        return await mallory.models.Push(parts(), timeout=30)

    for k, bloated in enumerate(
        (
            meta("1.0.0", description="x" * 3_000_000),
            meta("1.0.1", labels={f"k{i}": "v" * 40 for i in range(40_000)}),
            meta("1.0.2", labels={"ok": "yes", "bad label": "x"}),
        )
    ):
        err = await refused(push(bloated))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (k, err.code(), err.details()[:200])
        assert "model.push.metadata_too_large" in err.details() or "model.push.bad_labels" in err.details()
    await push(meta("1.0.0", description="a small model", labels={"camera": "front"}))  # within bounds
    listed = await operator.models.List(api_pb2.ListModelsRequest(), timeout=10)
    assert [(m.name, m.version) for m in listed.models] == [("big", "1.0.0")]


async def test_pushes_under_way_are_bounded(
    connect: Callable[..., Client], secure_orchestrator: Orchestrator
):
    """A push is received whole into memory before it is sealed (up to 64 MiB each), and nothing
    bounded how many were under way: a team certificate holding pushes open held as much of the
    orchestrator's memory as it liked. Now at most two per caller and 256 MiB in all."""
    mallory = connect("team", "ci", team="automotive")
    alice = connect("team", "ci", team="smart-home")
    size = 64 * 1024 * 1024
    budget = secure_orchestrator.pushes

    def open_push(client: Client, name: str) -> tuple[asyncio.Queue, grpc.aio.StreamUnaryCall]:
        parts: asyncio.Queue[api_pb2.PushModelRequest | None] = asyncio.Queue()
        meta = api_pb2.ModelMetadata(name=name, version="1.0.0", size=size, sha256="0" * 64)
        parts.put_nowait(api_pb2.PushModelRequest(metadata=meta))
        parts.put_nowait(api_pb2.PushModelRequest(chunk=b"\0" * 1024))

        async def requests():
            while (part := await parts.get()) is not None:
                yield part

        return parts, client.models.Push(requests(), timeout=30)

    async def held(n: int) -> None:
        async with asyncio.timeout(10):
            while budget.held != n * size:
                await asyncio.sleep(0.01)

    first = open_push(mallory, "m1")
    await held(1)
    second = open_push(mallory, "m2")
    await held(2)
    third_parts, third = open_push(mallory, "m3")
    err = await refused(third)
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "model.push.busy" in err.details()
    third_parts.put_nowait(None)
    others = open_push(alice, "a1")  # another caller still gets in
    await held(3)
    for parts, call in (first, second, others):  # each ends short of its announced size
        parts.put_nowait(None)
        assert (await refused(call)).code() == grpc.StatusCode.INVALID_ARGUMENT
    assert budget.held == 0
    await mallory.push("m4")  # and mallory can push again


async def test_a_teams_watch_shows_its_own_deployments_even_as_a_name_changes_hands(
    connect: Callable[..., Client], secure_orchestrator: Orchestrator
):
    home = connect("team", "ci", team="smart-home")
    auto = connect("team", "ci", team="automotive")
    await home.push("home-model")
    await auto.push("auto-model")
    await auto.apply(manifest("auto-old", "auto-model"))
    watch = home.deployments.Watch(api_pb2.WatchDeploymentsRequest(), timeout=30)
    await home.apply(manifest("x", "home-model"))
    first = await watch.read()  # the stream is served (nothing of the snapshot is home's)
    assert (first.type, first.deployment.name) == (api_pb2.WATCH_EVENT_TYPE_ADDED, "x")
    await auto.apply(manifest("auto-new", "auto-model"))
    await home.delete("x")
    await auto.apply(manifest("x", "auto-model"))  # the name is the automotive team's now
    await auto.apply(manifest("x", "auto-model", replicas=1))
    await home.apply(manifest("home-last", "home-model"))
    seen = []
    async with asyncio.timeout(10):
        while (event := await watch.read()).deployment.name != "home-last":
            seen.append((api_pb2.WatchEventType.Name(event.type), event.deployment.name))
    watch.cancel()
    assert seen == [("WATCH_EVENT_TYPE_DELETED", "x")], seen


async def test_one_certificate_holds_a_bounded_number_of_watch_streams(
    connect: Callable[..., Client], secure_orchestrator: Orchestrator
):
    """Each Watch stream keeps a queue of up to a thousand deployment changes (every team's, before
    they are filtered) while its client does not read; one certificate could open as many as it
    liked, each holding its share of the orchestrator's memory."""
    mallory = connect("team", "ci", team="automotive")
    alice = connect("team", "ci", team="smart-home")
    interceptor = secure_orchestrator.guard.interceptor
    limit = MAX_WATCHES
    streams = [mallory.deployments.Watch(api_pb2.WatchDeploymentsRequest(), timeout=30) for _ in range(limit)]
    async with asyncio.timeout(10):
        while interceptor.watches.get("team:automotive:ci", 0) < limit:
            await asyncio.sleep(0.01)
    extra = mallory.deployments.Watch(api_pb2.WatchDeploymentsRequest(), timeout=30)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await extra.read()
    assert (
        info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "request.streams" in info.value.details()
    )
    other = alice.deployments.Watch(api_pb2.WatchDeploymentsRequest(), timeout=30)  # another certificate
    streams[0].cancel()
    async with asyncio.timeout(10):
        while (
            interceptor.watches.get("team:automotive:ci", 0) != limit - 1
            or "team:smart-home:ci" not in interceptor.watches
        ):
            await asyncio.sleep(0.01)
    streams[0] = mallory.deployments.Watch(api_pb2.WatchDeploymentsRequest(), timeout=30)
    async with asyncio.timeout(10):
        while interceptor.watches.get("team:automotive:ci", 0) < limit:
            await asyncio.sleep(0.01)
    for stream in (*streams, other):
        stream.cancel()
    lines = [x for x in read_audit(secure_orchestrator.guard.audit.path) if x["method"].endswith("/Watch")]
    assert [(x["who"], x["result"]) for x in lines] == [("team:automotive:ci", "RESOURCE_EXHAUSTED")]


async def test_a_refusal_writes_a_bounded_audit_line(
    connect: Callable[..., Client], secure_orchestrator: Orchestrator
):
    """Names a request gives for its target went into the audit line whole (twice: target and reason),
    fsync-ed: one refused Delete of a 3 MB name wrote 6 MB to the audit log, so a team certificate
    could fill the orchestrator's disk at the speed of its requests."""
    team = connect("team", "ci", team="smart-home")
    path = secure_orchestrator.guard.audit.path
    for call in (
        lambda: team.deployments.Delete(api_pb2.DeleteDeploymentRequest(name="a" * 3_000_000), timeout=10),
        lambda: team.models.Get(api_pb2.GetModelRequest(name="b" * 1_000_000), timeout=10),
    ):
        err = await refused(call())
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "request.name_too_long" in err.details()
    lines = read_audit(path)
    assert [x["result"] for x in lines] == ["INVALID_ARGUMENT"] * 2
    assert path.stat().st_size < 4096
    assert lines[0]["target"].startswith("deployment/aaa") and "3000011 characters" in lines[0]["target"]
