"""The node's misuse defence against a hostile client of the fleet (docs/security.md): the slowdown
detector counts a multi-exit model's exits per request source, and the orchestrator rate-limits a
source whose early exits collapse (README, "multi-exit"). In a TLS fleet, a client must not be able
to slip past that accounting, nor to have its requests counted against another client. Real gRPC
servers with mutual TLS, the real LiteRT stages of the automotive model."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest
from test_side_doors import LOOPBACK, Stages, sign_request, tls_of

from accelerators.base import ModelArtifact
from accelerators.cpu_litert import CpuLitertBackend, CpuLitertConfig
from edgeward.oip import grpc_predict_v2_pb2 as pb
from edgeward.oip import grpc_predict_v2_pb2_grpc as pb_grpc
from edgeward.security.pki import FleetCA, parse_subject
from edgeward.security.tls import TlsFiles, grpc_aio_channel
from edgeward.v1 import node_pb2
from node_agent.inference_server import ModelTable, serve
from node_agent.multiexit import MAX_SOURCES, MultiExitHost
from usecases import model_path


@pytest.fixture
def one_node() -> AsyncIterator[Stages]:
    """The three stages of the automotive multi-exit model on one node."""
    backend = CpuLitertBackend(CpuLitertConfig(energy_counter=None))
    table = ModelTable()
    for k in (1, 2, 3):
        blob = model_path("automotive", "int8", stage=k).read_bytes()
        table.add(backend, backend.load(ModelArtifact.from_bytes(f"sign-s{k}", "1.0.0", blob)))
    yield Stages(backend, {"node-1": table})
    backend.close()


@pytest.fixture
async def node(fleet_ca: FleetCA, one_node: Stages) -> AsyncIterator[tuple[MultiExitHost, str]]:
    tls = tls_of(fleet_ca, fleet_ca.issue(parse_subject("node", "node-1")))
    wiring = node_pb2.MultiExitPipeline(name="sign", version="1.0.0")
    for k in (1, 2, 3):
        wiring.stages.add(model_name=f"sign-s{k}", model_version="1.0.0", threshold=1.0 if k < 3 else 0.0)
    host = MultiExitHost(one_node.tables["node-1"], "node-1", tls)
    host.configure([wiring])
    server, port = await serve(one_node.tables["node-1"], f"{LOOPBACK}:0", host, tls)
    yield host, f"{LOOPBACK}:{port}"
    await server.stop(None)
    await host.close()
    await asyncio.get_running_loop().shutdown_default_executor()  # the backend's threads
    gc.collect()  # grpc.aio objects sit in reference cycles; the poller thread ends with them


async def call(endpoint: str, tls: TlsFiles, request: pb.ModelInferRequest) -> grpc.StatusCode:
    async with grpc_aio_channel(endpoint, tls, server_name="node-1") as channel:
        try:
            await pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)
        except grpc.aio.AioRpcError as err:
            return err.code()
    return grpc.StatusCode.OK


def with_source(source: str) -> pb.ModelInferRequest:
    request = sign_request()
    request.parameters["source"].string_param = source
    return request


def team(ca: FleetCA, name: str, team_name: str) -> TlsFiles:
    return tls_of(ca, ca.issue(parse_subject("team", name, team_name)))


async def test_a_client_cannot_enter_a_multi_exit_model_past_its_first_stage(
    fleet_ca: FleetCA, one_node: Stages, node: tuple[MultiExitHost, str]
):
    """``parameters.stage`` is how a node hands a request on to the next stage. A client that sent it
    ran the expensive later stages directly: never rate-limited (limits apply at stage 1) and never
    counted, so the slowdown detector could not see the attack it exists for."""
    host, endpoint = node
    mallory = team(fleet_ca, "mallory", "automotive")
    spec = one_node.tables["node-1"].resolve("sign-s2")[1].inputs[0]  # type: ignore[index]
    features = np.zeros(spec.shape, np.dtype(spec.dtype.lower()))
    request = pb.ModelInferRequest(
        model_name="sign",
        inputs=[
            pb.ModelInferRequest.InferInputTensor(name="features", datatype=spec.dtype, shape=spec.shape)
        ],
        raw_input_contents=[features.tobytes()],
    )
    request.parameters["stage"].int64_param = 2
    request.parameters["scale"].string_param = repr(spec.quantization.scale)
    request.parameters["zero_point"].int64_param = spec.quantization.zero_point
    assert await call(endpoint, mallory, request) == grpc.StatusCode.PERMISSION_DENIED
    assert await call(endpoint, mallory, sign_request()) == grpc.StatusCode.OK  # from the start: served
    assert sum(s.requests for s in host.exit_stats()) == 1  # and counted


async def test_a_clients_requests_count_under_its_own_identity(
    fleet_ca: FleetCA, node: tuple[MultiExitHost, str]
):
    """The request source was whatever the caller wrote: a client could send its slowdown inputs
    under another client's source (so that the mitigation rate-limits the victim), or fill the
    bounded table of sources with junk so that every later client was counted as ``other``, beside
    it. In a TLS fleet a source is the caller's certificate, with the caller's label under it."""
    host, endpoint = node
    mallory, alice = team(fleet_ca, "mallory", "automotive"), team(fleet_ca, "alice", "smart-home")
    assert await call(endpoint, alice, with_source("cam-1")) == grpc.StatusCode.OK
    for k in range(MAX_SOURCES + 2):
        assert await call(endpoint, mallory, with_source(f"cam-{k}")) == grpc.StatusCode.OK
    assert await call(endpoint, alice, with_source("cam-2")) == grpc.StatusCode.OK
    counted = {s.source: s.requests for s in host.exit_stats()}
    assert counted["team:smart-home:alice/cam-1"] == 1
    assert counted["team:smart-home:alice"] == 1  # a label past the table's bound: still alice's own
    assert counted["team:automotive:mallory/cam-1"] == 1
    assert "cam-1" not in counted and "other" not in counted
    assert sum(n for s, n in counted.items() if s.startswith("team:automotive:mallory")) == MAX_SOURCES + 2

    # A mitigation on mallory's source leaves alice's requests under the same label alone.
    host.mitigate(
        [node_pb2.Mitigation(model_name="sign", source="team:automotive:mallory/cam-1", rate_limit_rps=1e-6)]
    )
    assert await call(endpoint, mallory, with_source("cam-1")) == grpc.StatusCode.OK  # the bucket's one token
    assert await call(endpoint, mallory, with_source("cam-1")) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert await call(endpoint, alice, with_source("cam-1")) == grpc.StatusCode.OK
