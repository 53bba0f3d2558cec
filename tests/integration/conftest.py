"""Fixtures that bring up real orchestrators and node agents (in-process or as subprocesses)."""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import pytest

from attestation.tokens import TokenStore
from edgeward.v1 import api_pb2, api_pb2_grpc
from node_agent.agent import NodeAgent
from node_agent.config import AgentConfig
from orchestrator.catalog import PublisherKey, sign_metadata
from orchestrator.config import BrokerConfig, OrchestratorConfig
from orchestrator.server import Orchestrator
from usecases import model_path

MODEL_F32 = model_path("industrial", "float32")
MODEL_INT8 = model_path("industrial", "int8")
#: The publisher that signs ``Api.push``; the ``fleet`` orchestrator trusts it (``trust_publisher``).
PUBLISHER = PublisherKey.generate()


def trust_publisher(directory: Path, key: PublisherKey = PUBLISHER) -> dict:
    """The ``catalog`` config section of an orchestrator that trusts ``key`` (written to ``directory``)."""
    directory.mkdir(parents=True, exist_ok=True)
    public = directory / f"{key.key_id}.pub"
    public.write_bytes(key.public_pem())
    return {"trusted_publishers": [public]}


def _attestation_fixtures():
    """The software TPM fixtures of tests/attestation (``manufactured``, ``swtpm_factory``), loaded
    by path: conftest modules cannot import each other."""
    spec = importlib.util.spec_from_file_location(
        "_attestation_fixtures", Path(__file__).parent.parent / "attestation" / "conftest.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module


_swtpm = _attestation_fixtures()
manufactured = _swtpm.manufactured
swtpm_factory = _swtpm.swtpm_factory


def manifest(
    name: str = "vib", replicas: int = 2, model: str = "vib-cnn", version: str = "1.0.0", extra: str = ""
) -> str:
    return (
        "apiVersion: edgeward/v1\nkind: Deployment\n"
        f"metadata: {{name: {name}}}\n"
        f"spec:\n  model: {{name: {model}, version: {version}}}\n  replicas: {replicas}\n{extra}"
    )


async def eventually(
    check: Callable[[], Awaitable[bool]], timeout: float = 120.0, what: str = "condition"
) -> None:
    """Poll ``check`` until it holds. ``timeout`` only stops a hang (the orchestrator and the agents
    of the ``fleet`` share this process and its event loop: on a loaded machine, seconds go by)."""
    deadline = time.monotonic() + timeout
    while True:
        if await check():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.1)


async def quiet_for(orch: Orchestrator, seconds: float = 0.0, passes: int = 3) -> None:
    """Let ``seconds`` of wall time go by, then ``passes`` more whole reconcile passes of ``orch``
    (passes that started after the call: one already running read the store before it).

    For checks that something does *not* happen: a fixed sleep proves nothing on a machine so
    loaded that the control loop did not run meanwhile; counted passes do, on any machine.
    """
    if seconds:
        await asyncio.sleep(seconds)  # the wall time under test (a pause, a lease)
    async with asyncio.timeout(60):
        await orch.reconciler.wait_passes(passes)


class Api:
    """Async stubs of the orchestrator's public API."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.deployments = api_pb2_grpc.DeploymentServiceStub(channel)
        self.nodes = api_pb2_grpc.NodeServiceStub(channel)
        self.models = api_pb2_grpc.ModelServiceStub(channel)

    async def push(
        self,
        path: Path = MODEL_INT8,
        name: str = "vib-cnn",
        version: str = "1.0.0",
        data: bytes | None = None,
        sha256: str | None = None,
        key: PublisherKey | None = PUBLISHER,
        parent_version: str = "",
    ) -> api_pb2.Model:
        """Push signed by ``key`` (None: unsigned)."""
        data = path.read_bytes() if data is None else data
        meta = api_pb2.ModelMetadata(
            name=name,
            version=version,
            size=len(data),
            sha256=sha256 or hashlib.sha256(data).hexdigest(),
            parent_version=parent_version,
        )
        if key is not None:
            sign_metadata(meta, key)

        async def parts():
            yield api_pb2.PushModelRequest(metadata=meta)
            yield api_pb2.PushModelRequest(chunk=data)

        return await self.models.Push(parts())

    async def apply(self, text: str) -> api_pb2.ApplyResponse:
        return await self.deployments.Apply(api_pb2.ApplyRequest(manifest=text))

    async def deployment(self, name: str) -> api_pb2.Deployment:
        return await self.deployments.Get(api_pb2.GetDeploymentRequest(name=name))

    async def nodes_list(self) -> list[api_pb2.Node]:
        return list((await self.nodes.List(api_pb2.ListNodesRequest())).nodes)


@pytest.fixture
async def fleet(mqtt_url, topic_prefix, tmp_path) -> AsyncIterator[Callable]:
    """``await fleet(nodes=2)`` -> (orchestrator, [agents], api), all in this event loop."""
    stack: list = []
    channels: list[grpc.aio.Channel] = []

    async def start(
        nodes: int = 2,
        *,
        attestation: dict | None = None,
        attesters: list[dict] | None = None,
        attested: bool = True,
        catalog: dict | None = None,
        slowdown: dict | None = None,
        **agent_kw,
    ) -> tuple[Orchestrator, list[NodeAgent], Api]:
        """``attestation``: the orchestrator's attestation config; ``attesters``: node i's attester
        config (default software); ``attested``: wait until every node holds an affirming result
        (else only until they are online); ``catalog``: the catalog config (default: trusts
        ``PUBLISHER``); ``slowdown``: the slowdown detector's config."""
        config = OrchestratorConfig(
            state_dir=tmp_path / "orch",
            grpc_bind="127.0.0.1:0",
            node_timeout_s=3.0,
            reconcile_interval_s=0.2,
            resend_interval_s=1.0,
            broker=BrokerConfig(url=str(mqtt_url), topic_prefix=topic_prefix),
            attestation=attestation or {},
            catalog=catalog if catalog is not None else trust_publisher(tmp_path / "publishers"),
            slowdown=slowdown or {},
        )
        orch = Orchestrator(config)
        await orch.__aenter__()
        stack.append(orch)
        agents = []
        tokens = TokenStore.in_state_dir(config.state_dir)  # the operator approves each node
        for i in range(nodes):
            agent = NodeAgent(
                AgentConfig(
                    node_id=f"n{i + 1}",
                    enrollment_token=tokens.mint(f"n{i + 1}").token,
                    labels={"zone": "a" if i % 2 == 0 else "b"},
                    heartbeat_s=0.5,
                    broker={"url": str(mqtt_url), "topic_prefix": topic_prefix},
                    state_dir=tmp_path / "agents",
                    attestation=(attesters or [])[i] if i < len(attesters or []) else None,
                    **agent_kw,
                )
            )
            await agent.__aenter__()
            stack.append(agent)
            agents.append(agent)
        channel = grpc.aio.insecure_channel(orch.address)
        channels.append(channel)
        api = Api(channel)

        async def online() -> bool:
            return sum(n.state == 1 for n in await api.nodes_list()) == nodes

        await eventually(online, what=f"{nodes} nodes online")
        if attested:

            async def affirming() -> bool:
                return all(orch.verifier.tier(a.node_id) != "none" for a in agents)

            await eventually(affirming, what=f"{nodes} nodes attested")
        return orch, agents, api

    try:
        yield start
    finally:
        for channel in channels:
            await channel.close()
        for item in reversed(stack):
            await item.__aexit__(None, None, None)
