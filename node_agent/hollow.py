"""Hollow nodes: many real node agents in one process, for control-plane scale tests.

``edgeward sim-fleet --nodes N --broker-url URL`` runs N `NodeAgent`s on one event loop (after
kubemark's hollow nodes). Each has its own MQTT connection, client id, node identity, software
attester with its own keys, enrollment and attestation over the real protocol, runtime, heartbeats
and telemetry: the orchestrator cannot tell them from real agents. What they share is what a
process shares: the thread pool for blocking work, the ``agent.code`` measurement (computed once
per process), the inspected model signatures, and one gRPC channel per artifact endpoint. Their
backend, ``sim-hollow``, does no inference work (labelled simulated), and they serve no
inference endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from accelerators import hollow, registry
from attestation.tokens import TokenStore

from .agent import NodeAgent
from .config import AgentConfig

log = logging.getLogger(__name__)

ZONES = ("edge-a", "edge-b", "edge-c")
BLOCKING_THREADS = 8  # the process's pool for key generation, measurement, cache files
# Hollow agents share artifact channels, this many agents a connection: real agents each have a
# connection of their own, one per process (2,500 agents' downloads on one HTTP/2 connection) was
# further from that than a node would ever be.
AGENTS_PER_CHANNEL = 50


class _ChannelGroup(dict[str, grpc.aio.Channel]):
    """The artifact channels of one group of hollow agents, on a TCP connection of the group's own
    (gRPC shares one connection between channels of equal arguments: the group's number differs)."""

    def __init__(self, group: int) -> None:
        super().__init__()
        self.group = group

    def get(self, endpoint: str, default: Any = None) -> grpc.aio.Channel:
        channel = super().get(endpoint)
        if channel is None:
            options = [("edgeward.hollow_channel_group", self.group)]
            channel = self[endpoint] = grpc.aio.insecure_channel(endpoint, options=options)
        return channel


# Stopping: every agent at once (each says goodbye within node_agent.agent.GOODBYE_S); whatever
# has not stopped after this long is abandoned: the process is about to exit and its sockets with it.
STOP_BOUND_S = 10.0


@dataclass(frozen=True)
class HollowFleetSpec:
    """What hollow nodes to run: ids ``{id_prefix}{first + i:05d}`` for i < nodes."""

    nodes: int
    broker_url: str
    state_dir: Path
    id_prefix: str = "hollow-"
    first: int = 0
    topic_prefix: str = "edgeward/v1"
    heartbeat_s: float = 5.0
    concurrency: int = 100
    latency_ms: float = 1.0
    #: The orchestrator's state directory, to mint each node's one-time enrollment token the way
    #: an operator would (``edgeward pki token``); None: the nodes present none.
    token_state_dir: Path | None = None
    labels: dict[str, str] = field(default_factory=lambda: {"sim": "hollow"})

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.concurrency < 1 or self.first < 0:
            raise ValueError("nodes >= 1, concurrency >= 1 and first >= 0 required")

    def node_id(self, i: int) -> str:
        return f"{self.id_prefix}{self.first + i:05d}"


class _OncePerProcess(logging.Filter):
    """Lets the first of the agents' identical startup warnings (plaintext mode) through."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.getMessage().startswith("PLAINTEXT MODE"):
            return True
        seen, self.seen = self.seen, True
        return not seen


def ensure_registered() -> None:
    """Register the ``sim-hollow`` backend kind (once per process)."""
    with contextlib.suppress(ValueError):  # already registered
        registry.register(hollow.KIND, hollow.HollowBackend)


def _configs(spec: HollowFleetSpec) -> list[AgentConfig]:
    ids = [spec.node_id(i) for i in range(spec.nodes)]
    tokens: list[str | None] = [None] * spec.nodes
    if spec.token_state_dir is not None:  # one batch: one flush to disk for the whole fleet
        tokens = [t.token for t in TokenStore.in_state_dir(spec.token_state_dir).mint_many(ids)]
    configs = []
    for i, (node_id, token) in enumerate(zip(ids, tokens, strict=True)):
        configs.append(
            AgentConfig(
                node_id=node_id,
                labels={**spec.labels, "zone": ZONES[(spec.first + i) % len(ZONES)]},
                hardware_profile="sim-hollow",
                broker={"url": spec.broker_url, "topic_prefix": spec.topic_prefix},
                accelerators=[{"kind": hollow.KIND, "options": {"latency_ms": spec.latency_ms}}],
                heartbeat_s=spec.heartbeat_s,
                state_dir=spec.state_dir,
                enrollment_token=token,
            )
        )
    return configs


@contextlib.asynccontextmanager
async def hollow_fleet(
    spec: HollowFleetSpec, progress: Callable[[int, int], None] | None = None
) -> AsyncIterator[list[NodeAgent]]:
    """Start ``spec.nodes`` hollow agents (at most ``spec.concurrency`` starting at once), yield
    them once all are up, stop them all when the block is left. ``progress(started, total)`` is
    called as they come up."""
    ensure_registered()
    once = _OncePerProcess()
    agent_log = logging.getLogger("node_agent.agent")
    agent_log.addFilter(once)
    loop = asyncio.get_running_loop()
    pool = ThreadPoolExecutor(BLOCKING_THREADS, thread_name_prefix="hollow")
    groups = [_ChannelGroup(k) for k in range(-(-spec.nodes // AGENTS_PER_CHANNEL))]
    agents: list[NodeAgent] = []
    try:
        configs = await loop.run_in_executor(pool, _configs, spec)
        gate = asyncio.Semaphore(spec.concurrency)

        async def start(k: int, config: AgentConfig) -> None:
            channels = groups[k // AGENTS_PER_CHANNEL]
            agent = NodeAgent(config, pool=pool, channels=channels, serve_inference=False)
            async with gate:
                await agent.__aenter__()
            agents.append(agent)
            if progress is not None:
                progress(len(agents), spec.nodes)

        async with asyncio.TaskGroup() as group:  # one that cannot start stops the others
            for k, config in enumerate(configs):
                group.create_task(start(k, config))
        yield agents
    finally:
        await _stop_all(agents)
        for channel in (c for g in groups for c in g.values()):
            await channel.close()
        pool.shutdown(wait=True, cancel_futures=True)
        agent_log.removeFilter(once)


async def _stop_all(agents: list[NodeAgent]) -> None:
    """Stop every agent at once, bounded by ``STOP_BOUND_S`` in all."""
    if not agents:
        return
    t0 = time.monotonic()
    stops = [asyncio.ensure_future(a.__aexit__(None, None, None)) for a in agents]
    _, pending = await asyncio.wait(stops, timeout=STOP_BOUND_S)
    for stop in pending:
        stop.cancel()
    await asyncio.gather(*stops, return_exceptions=True)
    log.info(
        "%d hollow nodes stopped in %.1f s%s",
        len(agents),
        time.monotonic() - t0,
        f" ({len(pending)} abandoned after {STOP_BOUND_S:g} s)" if pending else "",
    )


class Progress:
    """Prints ``started/total`` with the rate, at most once per ``every_s`` and at the end."""

    def __init__(self, every_s: float = 2.0, out: Callable[[str], None] = print) -> None:
        self._every_s = every_s
        self._out = out
        self._t0 = time.monotonic()
        self._last = 0.0

    def __call__(self, started: int, total: int) -> None:
        now = time.monotonic()
        if started < total and now - self._last < self._every_s:
            return
        self._last = now
        elapsed = now - self._t0
        rate = started / elapsed if elapsed > 0 else 0.0
        self._out(f"sim-fleet: {started}/{total} hollow nodes up after {elapsed:.1f} s ({rate:.0f}/s)")
