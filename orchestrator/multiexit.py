"""Multi-exit models across nodes: wiring the stage deployments into models nodes can serve.

Each stage of a multi-exit model is its own deployment (``spec.multiExit`` in its manifest), so
the scheduler places every stage by the usual rules: selectors put the first stage on a
low-power sensor-side node and later stages on stronger nodes. This module turns the running
stages into a ``ServePipelines`` command per node: every node running some stage learns the
whole chain, with an empty endpoint for the stages it runs itself and the inference endpoint of a
node running each stage it does not. A request entering at stage 1 thus continues locally as far
as it can and is handed off over the node inference API where the chain leaves the node.

A model is wired only when it is complete (stages 1..n, one deployment each, a threshold on every
stage but the last, at least one running replica of every stage); otherwise its nodes stop
serving it and the reason is logged once. The plan is a pure function of the store and the
fleet; a node is sent its set only when it changed (and again after ``resend_s``, in case a
command was lost).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from edgeward.security.authz import MODEL, team_of
from edgeward.v1 import node_pb2

from .fleet import Fleet
from .phases import Phase
from .reconciler import command
from .store import DeploymentRecord, ReplicaRecord

log = logging.getLogger(__name__)

Publish = Callable[[str, node_pb2.Command], Awaitable[None]]


@dataclass(frozen=True)
class _StageDep:
    deployment: str
    model_name: str
    model_version: str
    threshold: float | None


def plan(
    deployments: list[DeploymentRecord],
    replicas: list[ReplicaRecord],
    endpoints: dict[str, str],
    teams: Mapping[str, str] | None = None,
) -> tuple[dict[str, list[node_pb2.MultiExitPipeline]], dict[str, str]]:
    """The multi-exit models each node should serve, and why any model is not wired. ``teams``:
    the team owning each pipeline's name and each stage's model (absent or "": none): a team may
    call a pipeline on a node only if neither it nor a stage belongs to another team."""
    stages: dict[str, dict[int, list[_StageDep]]] = {}
    for dep in deployments:
        mx = dep.manifest.spec.multi_exit
        if mx is None:
            continue
        model = dep.manifest.spec.model
        stages.setdefault(mx.pipeline, {}).setdefault(mx.stage, []).append(
            _StageDep(dep.name, model.name, model.version, mx.threshold)
        )
    running: dict[str, list[str]] = {}
    for rep in replicas:
        if rep.phase == Phase.RUNNING and rep.node_id is not None and rep.node_id in endpoints:
            running.setdefault(rep.deployment, []).append(rep.node_id)
    out: dict[str, list[node_pb2.MultiExitPipeline]] = {}
    problems: dict[str, str] = {}
    for name, by_stage in sorted(stages.items()):
        problem = _why_incomplete(by_stage, running)
        if problem:
            problems[name] = problem
            continue
        chain = [by_stage[k][0] for k in range(1, len(by_stage) + 1)]
        nodes = sorted({n for s in chain for n in running[s.deployment]})
        for node in nodes:
            msg = node_pb2.MultiExitPipeline(
                name=name, version=chain[0].model_version, owner_team=(teams or {}).get(name, "")
            )
            for s in chain:
                hosts = sorted(set(running[s.deployment]))
                if node in hosts:
                    endpoint = target = ""
                else:  # spread the nodes of one stage over the nodes of the next, stably
                    pick = int(hashlib.sha256(node.encode()).hexdigest(), 16) % len(hosts)
                    target = hosts[pick]
                    endpoint = endpoints[target]
                msg.stages.add(
                    model_name=s.model_name,
                    model_version=s.model_version,
                    threshold=s.threshold or 0.0,
                    endpoint=endpoint,
                    node_id=target,
                    owner_team=(teams or {}).get(s.model_name, ""),
                )
            out.setdefault(node, []).append(msg)
    return out, problems


def _why_incomplete(by_stage: dict[int, list[_StageDep]], running: dict[str, list[str]]) -> str:
    n = len(by_stage)
    if sorted(by_stage) != list(range(1, n + 1)):
        return f"stages {sorted(by_stage)} are not 1..{n}"
    for k, deps in sorted(by_stage.items()):
        if len(deps) > 1:
            return (
                f"stage {k} is claimed by {len(deps)} deployments ({', '.join(d.deployment for d in deps)})"
            )
        if (deps[0].threshold is None) != (k == n):
            return f"stage {k} ({deps[0].deployment}) " + (
                "is the last stage and must not have a threshold" if k == n else "needs a threshold"
            )
        if not running.get(deps[0].deployment):
            return f"stage {k} ({deps[0].deployment}) has no running replica"
    return ""


class PipelineRouter:
    """Keeps every node's ``ServePipelines`` in step with the running stage replicas."""

    def __init__(
        self,
        store: Any,
        db: Callable[..., Awaitable[Any]],
        fleet: Fleet,
        publish: Publish,
        interval_s: float = 0.5,
        resend_s: float = 15.0,
    ) -> None:
        self._store = store
        self._db = db
        self._fleet = fleet
        self._publish = publish
        self._interval_s = interval_s
        self._resend_s = resend_s
        self._sent: dict[str, tuple[bytes, float, int]] = {}  # blob, when, node boot
        self._problems: dict[str, str] = {}
        self._wake = asyncio.Event()
        #: (node, pipeline name) of every pipeline a node was last told to serve: the nodes whose
        #: exit telemetry of that model is real traffic (the slowdown detector learns from them only)
        self.serving: frozenset[tuple[str, str]] = frozenset()

    def trigger(self) -> None:
        self._wake.set()

    def _read(self) -> tuple[list[DeploymentRecord], list[ReplicaRecord], dict[str, str]]:
        """On the store's thread: the multi-exit stage deployments and their replicas only (every
        replica of the fleet, read twice a second, took the store's thread and the interpreter
        for a tenth of a second each time at 10,000 replicas, mostly for deployments that are not
        multi-exit at all), and the team owning each pipeline's name (claimed as a model name) and
        each stage's model."""
        stages = [d for d in self._store.list_deployments() if d.manifest.spec.multi_exit is not None]
        names = {d.manifest.spec.multi_exit.pipeline for d in stages if d.manifest.spec.multi_exit}
        names |= {d.manifest.spec.model.name for d in stages}
        teams = {name: team_of(self._store.owner_of(MODEL, name)) for name in names}
        return stages, [rep for dep in stages for rep in self._store.list_replicas(dep.name)], teams

    async def run(self) -> None:
        while True:
            try:
                await self.sync()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bad pass must not stop the wiring for good
                log.exception("multi-exit wiring pass failed")
            try:
                async with asyncio.timeout(self._interval_s):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()

    async def sync(self) -> None:
        deployments, replicas, teams = await self._db(self._read)
        nodes = self._fleet.nodes
        endpoints = {}  # of the nodes running a stage (not every node of the fleet, twice a second)
        for node_id in {r.node_id for r in replicas if r.node_id}:
            view = nodes.get(node_id)
            if view is not None and view.hello is not None and view.hello.inference_endpoint:
                endpoints[node_id] = view.hello.inference_endpoint
        wanted, problems = plan(deployments, replicas, endpoints, teams)
        self.serving = frozenset((node, p.name) for node, pipelines in wanted.items() for p in pipelines)
        for name, why in problems.items():
            if self._problems.get(name) != why:
                log.info("multi-exit model %s not served: %s", name, why)
        self._problems = problems
        now = time.monotonic()
        for node in sorted(set(wanted) | set(self._sent)):
            body = node_pb2.ServePipelines(pipelines=wanted.get(node, []))
            blob = body.SerializeToString(deterministic=True)
            view = self._fleet.nodes.get(node)
            boot = view.boot_ms if view is not None else 0
            sent = self._sent.get(node)
            unchanged = sent is not None and sent[0] == blob and sent[2] == boot
            if unchanged and (not blob or now - sent[1] < self._resend_s):  # type: ignore[index]
                continue  # unchanged, or already told to serve nothing
            await self._publish(node, command(node, pipelines=body))
            self._sent[node] = (blob, now, boot)
