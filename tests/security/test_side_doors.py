"""Plaintext side doors (issue #15, 6): in a TLS fleet a node's inference API speaks mutual TLS with
the node's certificate and admits only fleet callers, multi-exit hand-offs use mutual TLS to the node
the orchestrator named, /metrics outside loopback is HTTPS for fleet certificates, and no plaintext
server binds outside loopback. Real gRPC and HTTP servers, real LiteRT models."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
from pydantic import ValidationError

from accelerators.base import ModelArtifact
from accelerators.cpu_litert import CpuLitertBackend, CpuLitertConfig
from edgeward.oip import grpc_predict_v2_pb2 as pb
from edgeward.oip import grpc_predict_v2_pb2_grpc as pb_grpc
from edgeward.security.pki import FleetCA, IssuedFiles, parse_subject
from edgeward.security.tls import TlsFiles, grpc_aio_channel
from edgeward.v1 import node_pb2
from node_agent.config import AgentConfig
from node_agent.inference_server import ModelTable, serve
from node_agent.multiexit import MultiExitHost
from orchestrator.config import OrchestratorConfig
from orchestrator.metrics import MetricsServer
from usecases import model_path
from usecases.automotive.generator import Sign, preprocess, synthesize

LOOPBACK = "127.0.0.1"


def test_plaintext_binds_outside_loopback_are_refused():
    for bind in ("0.0.0.0:9100", "10.0.0.5:9100", "[::]:9100"):
        with pytest.raises(ValidationError, match=r"metrics_bind: .* is not a loopback address"):
            OrchestratorConfig(metrics_bind=bind)
        with pytest.raises(ValidationError, match=r"inference_bind: .* is not a loopback address"):
            AgentConfig(node_id="n1", inference_bind=bind)
    # The demo's loopback binds stay as they are.
    assert OrchestratorConfig(metrics_bind="127.0.0.1:0").metrics_bind == "127.0.0.1:0"
    assert AgentConfig(node_id="n1", inference_bind="localhost:0").tls is None


def tls_of(ca: FleetCA, files: IssuedFiles) -> TlsFiles:
    return TlsFiles(ca.ca_file, files.cert_file, files.key_file, ca.crl_file)


@dataclass
class Stages:
    backend: CpuLitertBackend
    tables: dict[str, ModelTable]  # node id -> the stages it holds


@pytest.fixture
def stages() -> AsyncIterator[Stages]:
    """The automotive multi-exit model: stage 1 on node-1, stages 2 and 3 on node-2."""
    backend = CpuLitertBackend(CpuLitertConfig(energy_counter=None))
    tables = {"node-1": ModelTable(), "node-2": ModelTable()}
    for k in (1, 2, 3):
        blob = model_path("automotive", "int8", stage=k).read_bytes()
        handle = backend.load(ModelArtifact.from_bytes(f"sign-s{k}", "1.0.0", blob))
        tables["node-1" if k == 1 else "node-2"].add(backend, handle)
    yield Stages(backend, tables)
    backend.close()


@pytest.fixture
async def servers() -> AsyncIterator[list[grpc.aio.Server]]:
    started: list[grpc.aio.Server] = []
    yield started
    for server in started:
        await server.stop(None)
    await asyncio.get_running_loop().shutdown_default_executor()  # run_blocking's threads
    started.clear()
    gc.collect()  # grpc.aio objects sit in reference cycles; the poller thread ends with them


def pipeline(
    endpoint: str, node_id: str, owner_team: str = "", stage_team: str = ""
) -> node_pb2.MultiExitPipeline:
    """As the orchestrator wires it for node-1: stage 1 here, stages 2-3 on the node behind endpoint
    (``stage_team`` owns stage 2's model)."""
    msg = node_pb2.MultiExitPipeline(name="sign", version="1.0.0", owner_team=owner_team)
    msg.stages.add(model_name="sign-s1", model_version="1.0.0", threshold=1.0)  # never exits here
    for k in (2, 3):
        msg.stages.add(
            model_name=f"sign-s{k}",
            model_version="1.0.0",
            threshold=1.0,
            endpoint=endpoint,
            node_id=node_id,
            owner_team=stage_team if k == 2 else "",
        )
    return msg


def sign_request() -> pb.ModelInferRequest:
    image = preprocess(synthesize(Sign.STOP, 0.8, np.random.default_rng(3)))[None].astype(np.float32)
    return pb.ModelInferRequest(
        model_name="sign",
        inputs=[
            pb.ModelInferRequest.InferInputTensor(name="image", datatype="FP32", shape=list(image.shape))
        ],
        raw_input_contents=[image.tobytes()],
    )


async def start_node(
    stages: Stages, servers: list, node_id: str, tls: TlsFiles | None, wiring: node_pb2.MultiExitPipeline
) -> tuple[MultiExitHost, str]:
    host = MultiExitHost(stages.tables[node_id], node_id, tls)
    host.configure([wiring])
    server, port = await serve(stages.tables[node_id], f"{LOOPBACK}:0", host, tls)
    servers.append(server)
    return host, f"{LOOPBACK}:{port}"


async def infer(endpoint: str, tls: TlsFiles | None, server_name: str = "node-1") -> pb.ModelInferResponse:
    async with grpc_aio_channel(endpoint, tls, server_name=server_name) as channel:
        return await pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(sign_request(), timeout=10)


async def test_node_inference_needs_a_fleet_certificate(fleet_ca: FleetCA, stages: Stages, servers: list):
    node2 = fleet_ca.issue(parse_subject("node", "node-2"))
    _, endpoint = await start_node(stages, servers, "node-2", tls_of(fleet_ca, node2), pipeline("", ""))
    callers = {
        role: tls_of(fleet_ca, fleet_ca.issue(parse_subject(role, name, team)))
        for role, name, team in (
            ("team", "ci", "automotive"),
            ("operator", "alice", None),
            ("broker", "b", None),
        )
    }
    revoked = tls_of(fleet_ca, fleet_ca.issue(parse_subject("team", "old", "automotive")))
    fleet_ca.revoke("team:automotive:old")

    async def call(tls: TlsFiles | None, server_name: str | None = "node-2") -> grpc.StatusCode:
        async with grpc_aio_channel(endpoint, tls, server_name=server_name) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            try:
                await stub.ModelMetadata(pb.ModelMetadataRequest(name="sign-s2"), timeout=5)
            except grpc.aio.AioRpcError as err:
                return err.code()
            return grpc.StatusCode.OK

    assert await call(None) == grpc.StatusCode.UNAVAILABLE  # plaintext: no TLS handshake, no answer
    assert await call(callers["team"]) == grpc.StatusCode.OK
    assert await call(callers["operator"]) == grpc.StatusCode.OK
    assert await call(callers["broker"]) == grpc.StatusCode.PERMISSION_DENIED
    assert await call(revoked) == grpc.StatusCode.UNAUTHENTICATED
    # The node's certificate names the node: a client expecting another node refuses it.
    assert await call(callers["team"], server_name="node-3") == grpc.StatusCode.UNAVAILABLE
    # An undecodable request is refused as such, not as UNKNOWN.
    async with grpc_aio_channel(endpoint, callers["team"], server_name="node-2") as channel:
        raw = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer", request_serializer=None, response_deserializer=None
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await raw(b"\xff\xff\xff", timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_multi_exit_hand_offs_use_mutual_tls_to_the_named_node(
    fleet_ca: FleetCA, stages: Stages, servers: list
):
    node1, node2 = (fleet_ca.issue(parse_subject("node", n)) for n in ("node-1", "node-2"))
    team = tls_of(fleet_ca, fleet_ca.issue(parse_subject("team", "ci", "automotive")))
    _, endpoint2 = await start_node(stages, servers, "node-2", tls_of(fleet_ca, node2), pipeline("", ""))
    host1, endpoint1 = await start_node(
        stages, servers, "node-1", tls_of(fleet_ca, node1), pipeline(endpoint2, "node-2")
    )
    answer = await infer(endpoint1, team)
    assert answer.parameters["exit"].int64_param in (2, 3)  # stage 1 never exits: node-2 answered

    # Wired to the same endpoint under another node's name, node-1 refuses node-2's certificate.
    host1.configure([pipeline(endpoint2, "node-3")])
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await infer(endpoint1, team)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "node-3" not in endpoint2
    # A node without the fleet's TLS cannot hand off to (or pose as) a fleet node.
    _, plain1 = await start_node(stages, servers, "node-1", None, pipeline(endpoint2, "node-2"))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await infer(plain1, None)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "stage 2" in (info.value.details() or "")
    await host1.close()


async def test_a_teams_multi_exit_model_is_invisible_to_other_teams(
    fleet_ca: FleetCA, stages: Stages, servers: list
):
    """A node serves a team's model to that team (and operators and nodes) only: another team's
    certificate gets the answers of a node that does not hold it, for every method."""
    node1, node2 = (fleet_ca.issue(parse_subject("node", n)) for n in ("node-1", "node-2"))
    owner, other, operator = (
        tls_of(fleet_ca, fleet_ca.issue(parse_subject(role, name, team)))
        for role, name, team in (
            ("team", "ci", "automotive"),
            ("team", "ci", "smart-home"),
            ("operator", "alice", None),
        )
    )
    _, endpoint2 = await start_node(stages, servers, "node-2", tls_of(fleet_ca, node2), pipeline("", ""))
    host1, endpoint1 = await start_node(
        stages, servers, "node-1", tls_of(fleet_ca, node1), pipeline(endpoint2, "node-2", "automotive")
    )
    for allowed in (owner, operator):  # stage 2 and 3 are called with node-1's node certificate
        assert (await infer(endpoint1, allowed)).parameters["exit"].int64_param in (2, 3)

    async def as_other(name: str) -> tuple[list[str], bool, list[tuple[grpc.StatusCode, str]]]:
        """What the other team sees: the index, ModelReady, and how Metadata and Infer end."""
        async with grpc_aio_channel(endpoint1, other, server_name="node-1") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            index = await stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=5)
            ready = await stub.ModelReady(pb.ModelReadyRequest(name=name), timeout=5)
            request = sign_request()
            request.model_name = name
            ends = []
            for call in (stub.ModelMetadata(pb.ModelMetadataRequest(name=name)), stub.ModelInfer(request)):
                try:
                    await call
                    ends.append((grpc.StatusCode.OK, ""))
                except grpc.aio.AioRpcError as err:
                    ends.append((err.code(), (err.details() or "").replace(name, "<name>")))
        return [m.name for m in index.models], ready.ready, ends

    names, ready, ends = await as_other("sign")
    assert "sign" not in names and "sign-s1" in names and not ready  # stage 1 itself is nobody's here
    assert ends[0][0] == grpc.StatusCode.NOT_FOUND
    assert ends == (await as_other("no-such-model"))[2]  # word for word what a missing model gets
    host1.configure([pipeline(endpoint2, "node-2", "smart-home")])  # the other team's now
    names, ready, ends = await as_other("sign")
    assert "sign" in names and ready and [code for code, _ in ends] == [grpc.StatusCode.OK] * 2
    # An operator's pipeline (no owner) with a stage of the first team's: not the other team's either.
    host1.configure([pipeline(endpoint2, "node-2", "", "automotive")])
    names, ready, ends = await as_other("sign")
    assert "sign" not in names and not ready and ends[0][0] == grpc.StatusCode.NOT_FOUND
    assert (await infer(endpoint1, owner)).parameters["exit"].int64_param in (2, 3)
    await host1.close()


async def scrape(port: int, ca: FleetCA, client: IssuedFiles | None, tls: bool = True) -> bytes:
    """The answer to GET /metrics (empty if the connection was refused)."""
    context = None
    if tls:
        context = ssl.create_default_context(cafile=str(ca.ca_file))
        if client is not None:
            context.load_cert_chain(str(client.cert_file), str(client.key_file))
    try:
        reader, writer = await asyncio.open_connection(
            LOOPBACK, port, ssl=context, server_hostname=LOOPBACK if context else None
        )
    except (ssl.SSLError, ConnectionError):
        return b""
    try:
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        return await reader.read()
    except (ssl.SSLError, ConnectionError):
        return b""
    finally:
        writer.close()
        with contextlib.suppress(ssl.SSLError, ConnectionError):
            await writer.wait_closed()


@pytest.fixture
async def https_metrics(fleet_ca: FleetCA) -> AsyncIterator[MetricsServer]:
    """/metrics as the orchestrator serves it outside loopback in a TLS fleet (tested here on
    loopback, where tests must stay)."""
    orch = fleet_ca.files("orchestrator:main")
    server_tls = TlsFiles(fleet_ca.ca_file, orch.cert_file, orch.key_file, fleet_ca.crl_file)
    metrics = MetricsServer.https(lambda: b"edgeward_up 1\n", f"{LOOPBACK}:0", server_tls)
    await metrics.start()
    try:
        yield metrics
    finally:
        await metrics.stop()


async def test_metrics_outside_loopback_are_https_for_fleet_certificates(
    fleet_ca: FleetCA, https_metrics: MetricsServer
):
    operator = fleet_ca.issue(parse_subject("operator", "prometheus"))
    port = https_metrics.port
    assert (await scrape(port, fleet_ca, operator)).endswith(b"edgeward_up 1\n")
    assert b"edgeward_up" not in await scrape(port, fleet_ca, None)
    assert b"edgeward_up" not in await scrape(port, fleet_ca, None, tls=False)


async def test_metrics_are_for_operators_and_follow_the_crl(fleet_ca: FleetCA, https_metrics: MetricsServer):
    """/metrics names every node, model and version with its traffic. Any fleet certificate used to
    read it, so a team learnt the other teams' models and their use, and a node the whole fleet; and a
    certificate revoked after the server started kept reading it (its TLS context read the CRL once)."""
    port = https_metrics.port
    operator = fleet_ca.issue(parse_subject("operator", "prometheus"))
    leaving = fleet_ca.issue(parse_subject("operator", "leaving"))
    for subject in (("team", "ci", "smart-home"), ("node", "node-1"), ("broker", "mosquitto")):
        answer = await scrape(port, fleet_ca, fleet_ca.issue(parse_subject(*subject)))
        assert answer.startswith(b"HTTP/1.1 403 ") and b"security.authz.role" in answer, (subject, answer)
        assert b"edgeward_up" not in answer
    assert (await scrape(port, fleet_ca, leaving)).endswith(b"edgeward_up 1\n")
    fleet_ca.revoke("operator:leaving")
    async with asyncio.timeout(10):  # the CRL is re-read at most once a second
        while b"edgeward_up" in (answer := await scrape(port, fleet_ca, leaving)):
            await asyncio.sleep(0.1)
    assert answer.startswith(b"HTTP/1.1 403 ") and b"security.authn.revoked" in answer, answer
    assert (await scrape(port, fleet_ca, operator)).endswith(b"edgeward_up 1\n")
    assert https_metrics.refused == 4


async def test_a_team_calls_a_multi_exit_model_by_its_name_not_stage_by_stage(
    fleet_ca: FleetCA, stages: Stages, servers: list
):
    """Calling the stage models one by one went past the pipeline's rate limit and its exit counts
    (the slowdown defence): a team certificate is refused them; operators and nodes are not."""
    node1, node2 = (fleet_ca.issue(parse_subject("node", n)) for n in ("node-1", "node-2"))
    team, operator = (
        tls_of(fleet_ca, fleet_ca.issue(parse_subject(role, name, t)))
        for role, name, t in (("team", "ci", "automotive"), ("operator", "alice", None))
    )
    _, endpoint2 = await start_node(stages, servers, "node-2", tls_of(fleet_ca, node2), pipeline("", ""))
    _, endpoint1 = await start_node(
        stages, servers, "node-1", tls_of(fleet_ca, node1), pipeline(endpoint2, "node-2")
    )
    direct = sign_request()
    direct.model_name = "sign-s1"
    direct.inputs[0].name = stages.tables["node-1"].resolve("sign-s1")[1].inputs[0].name

    async def call(tls: TlsFiles) -> tuple[grpc.StatusCode, str]:
        async with grpc_aio_channel(endpoint1, tls, server_name="node-1") as channel:
            try:
                await pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(direct, timeout=10)
            except grpc.aio.AioRpcError as err:
                return err.code(), err.details() or ""
        return grpc.StatusCode.OK, ""

    code, details = await call(team)
    assert code == grpc.StatusCode.PERMISSION_DENIED and "multi-exit model 'sign'" in details
    assert await call(operator) == (grpc.StatusCode.OK, "")
    assert await call(tls_of(fleet_ca, node2)) == (grpc.StatusCode.OK, "")
    assert (await infer(endpoint1, team)).parameters["exit"].int64_param in (2, 3)  # by its name: served


async def test_a_node_the_pipeline_is_not_wired_to_is_counted_as_itself(
    fleet_ca: FleetCA, stages: Stages, servers: list
):
    """Any node certificate could enter at stage 1 under a client's source name and have that
    client's traffic counted (and rate-limited); the nodes the pipeline is wired to still hand
    requests on under their client's source."""
    node1, node2, node9 = (fleet_ca.issue(parse_subject("node", n)) for n in ("node-1", "node-2", "node-9"))
    _, endpoint2 = await start_node(stages, servers, "node-2", tls_of(fleet_ca, node2), pipeline("", ""))
    host1, endpoint1 = await start_node(
        stages, servers, "node-1", tls_of(fleet_ca, node1), pipeline(endpoint2, "node-2")
    )
    request = sign_request()
    request.parameters["source"].string_param = "team:smart-home:alice"
    for tls in (tls_of(fleet_ca, node9), tls_of(fleet_ca, node2)):
        async with grpc_aio_channel(endpoint1, tls, server_name="node-1") as channel:
            await pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)
    assert sorted(s.source for s in host1.exit_stats()) == ["node-9", "team:smart-home:alice"]
