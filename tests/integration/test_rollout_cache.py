"""The agent's encrypted model cache across restarts: a restarted agent re-attests, gets its keys
released again and serves from the sealed artifacts on its disk without downloading them; with
the cache wiped it downloads them again. Real agents, broker, orchestrator and LiteRT."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from conftest import MODEL_INT8, eventually, manifest

from attestation.tokens import TokenStore
from node_agent.agent import NodeAgent
from node_agent.config import AgentConfig
from node_agent.runtime import SEALED_SUFFIX
from usecases import model_path

pytestmark = [pytest.mark.broker]

MODELS = {"vib-cnn": MODEL_INT8, "occupancy-cnn": model_path("smart_home", "int8")}


async def _restart(old: NodeAgent | None, config: AgentConfig, orch, api) -> NodeAgent:
    if old is not None:
        await old.__aexit__(None, None, None)
    agent = NodeAgent(config)
    await agent.__aenter__()

    async def serving() -> bool:
        deps = [await api.deployment(name) for name in ("vib", "occ")]
        return all(d.status.running == 1 for d in deps) and len(agent.runtime.running("vib-cnn")) == 1

    await eventually(serving, what="both models serving again after the restart")
    assert orch.verifier.tier(agent.node_id) != "none", "keys are released to an attested node only"
    return agent


async def test_restarted_agent_serves_from_its_encrypted_cache(fleet, mqtt_url, topic_prefix, tmp_path):
    orch, _, api = await fleet(nodes=0)
    config = AgentConfig(
        node_id="n1",
        enrollment_token=TokenStore.in_state_dir(orch.config.state_dir).mint("n1").token,
        heartbeat_s=0.5,
        broker={"url": str(mqtt_url), "topic_prefix": topic_prefix},
        state_dir=tmp_path / "agents",
    )
    first = NodeAgent(config)
    await first.__aenter__()
    agent = first
    for name, path in MODELS.items():
        await api.push(path, name=name)
    await api.apply(manifest("vib", replicas=1))
    await api.apply(manifest("occ", replicas=1, model="occupancy-cnn"))

    async def running() -> bool:
        deps = [await api.deployment(n) for n in ("vib", "occ")]
        return all(d.status.running == 1 for d in deps)

    try:
        await eventually(running, what="both replicas running")
        assert (first.runtime.fetched, first.runtime.from_cache) == (2, 0)
        cache = first.runtime.cache_dir
        files = sorted(cache.glob("*" + SEALED_SUFFIX))
        digests = {hashlib.sha256(p.read_bytes()).hexdigest() for p in MODELS.values()}
        assert {f.name.removesuffix(SEALED_SUFFIX) for f in files} == digests, "named by the model digest"
        for f in files:
            sealed = f.read_bytes()
            assert all(p.read_bytes()[:4096] not in sealed for p in MODELS.values()), "stored sealed"
        assert not list(cache.glob(".tmp-*"))

        agent = await _restart(agent, config, orch, api)
        assert (agent.runtime.fetched, agent.runtime.from_cache) == (0, 2), "nothing downloaded"
        resolved = agent.runtime.resolve("vib-cnn")
        assert resolved is not None
        backend, handle = resolved
        x = {handle.inputs[0].name: np.zeros(handle.inputs[0].shape, "int8")}
        assert (await agent.runtime.infer(backend, handle, x)).outputs

        # A torn write left behind by a crash is cleaned up; a wiped cache means downloading again.
        (cache / ".tmp-torn").write_bytes(b"partial")
        for f in cache.glob("*" + SEALED_SUFFIX):
            f.unlink()
        agent = await _restart(agent, config, orch, api)
        assert (agent.runtime.fetched, agent.runtime.from_cache) == (2, 0)
        assert not (cache / ".tmp-torn").exists()
    finally:
        await agent.__aexit__(None, None, None)
