"""A whole fleet with TLS everywhere: the orchestrator's embedded broker requires node certificates,
the agent downloads the sealed artifact over mutual TLS, a team deploys through the authorized API."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import grpc
import pytest
from security_support import Client, manifest

from attestation.tokens import TokenStore
from edgeward.oip import grpc_predict_v2_pb2 as oip
from edgeward.oip import grpc_predict_v2_pb2_grpc as oip_grpc
from edgeward.security.audit import read_audit
from edgeward.security.pki import FleetCA, parse_subject
from edgeward.security.tls import TlsFiles, grpc_aio_channel
from node_agent.agent import NodeAgent
from node_agent.config import AgentConfig
from orchestrator.server import Orchestrator

pytestmark = pytest.mark.broker


async def test_a_tls_fleet_deploys_a_model_end_to_end(
    connect: Callable[..., Client],
    fleet_ca: FleetCA,
    secure_orchestrator: Orchestrator,
    tmp_path,
    topic_prefix: str,
):
    assert secure_orchestrator.broker_url.startswith("mqtts://")
    node = fleet_ca.issue(parse_subject("node", "edge-1"))
    config = AgentConfig.model_validate(
        {
            "node_id": "edge-1",
            "heartbeat_s": 0.5,
            "state_dir": tmp_path / "agent",
            "broker": {"url": secure_orchestrator.broker_url, "topic_prefix": topic_prefix},
            "tls": {"ca_file": fleet_ca.ca_file, "cert_file": node.cert_file, "key_file": node.key_file},
            "enrollment_token": TokenStore.in_state_dir(secure_orchestrator.config.state_dir)
            .mint("edge-1")
            .token,
        }
    )
    assert config.broker.cert_file == node.cert_file  # the broker section defaults to the node's TLS files
    team = connect("team", "ci", team="industrial")
    async with NodeAgent(config) as agent:
        await team.push("vib-cnn")
        await team.apply(manifest("vib", "vib-cnn", replicas=1))
        deadline = time.monotonic() + 40
        while (await team.get("vib")).status.running != 1:
            assert time.monotonic() < deadline, await team.get("vib")
            await asyncio.sleep(0.2)
        # The node's inference API speaks mutual TLS with the node's certificate (issue #15, 6).
        files = fleet_ca.files("team:industrial:ci")
        team_tls = TlsFiles(fleet_ca.ca_file, files.cert_file, files.key_file)
        request = oip.ModelMetadataRequest(name="vib-cnn")
        async with grpc_aio_channel(agent.inference_endpoint, team_tls, server_name="edge-1") as channel:
            reply = await oip_grpc.GRPCInferenceServiceStub(channel).ModelMetadata(request, timeout=10)
            assert reply.name == "vib-cnn"
        async with grpc_aio_channel(agent.inference_endpoint, None) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await oip_grpc.GRPCInferenceServiceStub(channel).ModelMetadata(request, timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        # Another team's certificate: the node answers as if it did not hold the model.
        connect("team", "ci", team="smart-home")
        files = fleet_ca.files("team:smart-home:ci")
        other_tls = TlsFiles(fleet_ca.ca_file, files.cert_file, files.key_file)
        async with grpc_aio_channel(agent.inference_endpoint, other_tls, server_name="edge-1") as channel:
            stub = oip_grpc.GRPCInferenceServiceStub(channel)
            assert not (await stub.RepositoryIndex(oip.RepositoryIndexRequest(), timeout=10)).models
            assert not (await stub.ModelReady(oip.ModelReadyRequest(name="vib-cnn"), timeout=10)).ready
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.ModelMetadata(request, timeout=10)
            assert info.value.code() == grpc.StatusCode.NOT_FOUND, info.value.details()
            assert info.value.details() == "unknown model 'vib-cnn'"
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.ModelInfer(oip.ModelInferRequest(model_name="vib-cnn"), timeout=10)
            assert (info.value.code(), info.value.details()) == (
                grpc.StatusCode.NOT_FOUND,
                "unknown model 'vib-cnn'",
            )
        assert [r.spec.owner_team for r in agent.runtime.replicas.values()] == ["industrial"]
    methods = {
        (x["who"], x["method"].rsplit("/", 1)[-1], x["result"])
        for x in read_audit(secure_orchestrator.guard.audit.path)
    }
    assert methods == {("team:industrial:ci", "Push", "OK"), ("team:industrial:ci", "Apply", "OK")}
