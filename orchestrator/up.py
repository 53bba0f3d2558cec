"""``edgeward up``: a whole edge fleet on one machine, end to end.

Starts the embedded MQTT broker and the orchestrator in this process, N node agents as child
processes on boards from the hardware-profile catalog (a CPU microserver, an FPGA board and an
ASIC board first, the latter two simulated and labelled so), publishes the use cases' models,
applies their deployments (the automotive multi-exit model as one deployment per stage, stage 1 on
the low-power board and stages 2-3 on the microserver when both are there), drives inference
traffic at the nodes over the Open Inference Protocol, and prints (and optionally writes as JSON)
a summary: each use case's inferences, latency and, for the multi-exit model, its exit
distribution; where each replica runs and why; each node's and the fleet's joules per inference
against round-robin on the same fleet (``fleet_energy``). Ctrl-C stops everything; agents also
die with us (see ``node_agent.cli``), so no process is left behind.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import yaml
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from attestation.tokens import TokenStore
from edgeward.oip import grpc_predict_v2_pb2 as oip
from edgeward.oip import grpc_predict_v2_pb2_grpc as oip_grpc
from edgeward.v1 import api_pb2, api_pb2_grpc, events_pb2, node_pb2

from .catalog import CatalogConfig, PublisherKey, sign_metadata
from .config import BrokerConfig, OrchestratorConfig
from .scheduler.settings import ReschedulingConfig, SchedulerConfig
from .server import Orchestrator
from .tables import deployments_table, phase_name, state_name

log = logging.getLogger(__name__)
console = Console(stderr=True)

# Demo boards from the hardware-profile catalog (accelerators/profiles/hardware.yaml), cycled over
# the agents: a CPU microserver, an FPGA board and an Edge-TPU-class ASIC board first, so that any
# fleet of three or more is heterogeneous. The FPGA and ASIC backends are simulated here (no board
# exists on this machine) and say so in their inventory; energy on every node is modelled from the
# catalog's power figures unless the platform measures it (RAPL on the CPU backend).
BOARDS: list[tuple[str, str]] = [  # (hardware profile, zone)
    ("x86-n100", "edge-a"),
    ("pynq-z2", "edge-b"),
    ("coral-devboard", "edge-c"),
    ("rpi4-4gb", "edge-b"),
    ("zcu104", "edge-a"),
]
#: Every agent of the demo shares this one machine: one interpreter thread each, whatever the board.
DEMO_THREADS = 1
#: Energy moves wait this long for a saving to hold (30 s by default): short, so that a 30 s run
#: shows them (docs/scheduler.md, "Energy moves").
DEMO_ENERGY_SUSTAIN_S = 5.0
#: At the end of the traffic, how long to wait for moves in flight to finish before the report.
SETTLE_WAIT_S = 20.0
#: The events of moved replicas (energy moves, SLO repairs, node loss) the report lists.
MOVES = events_pb2.EventFilter(kind_prefix="reschedule.")
NODE_WAIT_S = 60.0
RUNNING_WAIT_S = 90.0


@dataclass
class AgentFleet:
    """Node agents as child processes."""

    state_dir: Path
    broker_url: str
    heartbeat_s: float = 2.0
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    board_cpus: str = "modelled"

    def start(self, count: int) -> None:
        conf_dir = self.state_dir / "agents"
        conf_dir.mkdir(parents=True, exist_ok=True)
        # The demo's operator approves its own agents (attestation.enrollment, docs/security.md).
        tokens = TokenStore.in_state_dir(self.state_dir / "orchestrator")
        for i in range(1, count + 1):
            node_id = f"node-{i}"
            config = {
                "node_id": node_id,
                **board_settings(i - 1, self.board_cpus),
                "broker": {"url": self.broker_url},
                "heartbeat_s": self.heartbeat_s,
                "state_dir": str(self.state_dir / "agent-cache"),
                "enrollment_token": tokens.mint(node_id).token,
            }
            path = conf_dir / f"{node_id}.yaml"
            path.write_text(yaml.safe_dump(config))
            log_file = (conf_dir / f"{node_id}.log").open("ab")
            self.procs[node_id] = subprocess.Popen(
                [sys.executable, "-m", "edgeward", "agent", "-c", str(path)],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "EDGEWARD_DIE_WITH_PARENT": str(os.getpid())},
            )
            log_file.close()

    def stop(self, timeout: float = 10.0) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def dead(self) -> list[str]:
        return [n for n, p in self.procs.items() if p.poll() is not None]


@dataclass
class Traffic:
    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0
    by_workload: dict[str, list[float]] = field(default_factory=dict)
    #: use case -> answers per exit (index 0: exit 1), for multi-exit models
    exits: dict[str, list[int]] = field(default_factory=dict)
    started_ms: int = 0  # wall clock when the traffic started (unix ms)

    def line(self, case: str) -> str:
        """One use case's live figures: inferences, recent p50/p95, exit distribution."""
        ms = self.by_workload.get(case, [])
        recent = ms[-2000:]
        text = f"{case}: {len(ms)} inferences, p50 {_pct(recent, 50):.2f} ms, p95 {_pct(recent, 95):.2f} ms"
        counts = self.exits.get(case)
        if counts and sum(counts):
            text += ", exits " + " / ".join(f"{100 * n / sum(counts):.0f}%" for n in counts)
        return text


def board_settings(index: int, board_cpus: str = "modelled") -> dict[str, Any]:
    """The hardware part of the ``index``-th demo agent's config, from the catalog."""
    from accelerators.profiles import load_catalog

    name, zone = BOARDS[index % len(BOARDS)]
    profile = load_catalog()[name]
    settings = profile.agent_settings()
    settings["labels"] = {**settings["labels"], "zone": zone}
    for acc in settings["accelerators"]:
        acc["options"] = _demo_options(profile.labels, acc["kind"], acc["options"], board_cpus)
    return settings


def _demo_options(
    labels: dict[str, str], kind: str, options: dict[str, Any], board_cpus: str
) -> dict[str, Any]:
    """A catalog board's accelerator options as the demo runs them: one interpreter thread (every
    agent shares this machine), and the CPU of a board of another architecture than this machine's
    timed by its cost model (``board_cpus="modelled"``: the catalog's peak x the sustained share,
    labelled simulated, like the FPGA and ASIC) or by this machine's wall time at the board's power
    (``"host"``: a Cortex-A9 at this machine's speed, optimistic)."""
    options = dict(options)
    if "num_threads" in options:
        options["num_threads"] = DEMO_THREADS
    if kind == "cpu-litert" and labels.get("arch") != platform.machine() and board_cpus == "modelled":
        options["timing"] = "modelled"
    return options


def _fit_selectors(manifest: str, nodes: int) -> str:
    """Drop a selector no demo node can satisfy (``--nodes`` below the number of boards)."""
    zones = {BOARDS[i % len(BOARDS)][1] for i in range(nodes)}
    doc = yaml.safe_load(manifest)
    wanted = doc["spec"].get("selector", {}).get("matchLabels", {})
    if wanted.get("zone", next(iter(zones))) in zones:
        return manifest
    doc["spec"].pop("selector")
    return yaml.safe_dump(doc, sort_keys=False)


def run_up(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_main(args))
    except KeyboardInterrupt:
        console.print("[yellow]interrupted; everything stopped[/yellow]")
        return 130


async def _main(args: argparse.Namespace) -> int:
    main = asyncio.current_task()
    assert main is not None
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, main.cancel)
    loop.add_signal_handler(signal.SIGTERM, main.cancel)
    try:
        return await _up(args)
    except asyncio.CancelledError:
        console.print("[yellow]interrupted; everything stopped[/yellow]")
        return 130


async def _up(args: argparse.Namespace) -> int:
    from usecases.workloads import workloads

    state_dir = Path(args.state_dir) if args.state_dir else Path(tempfile.mkdtemp(prefix="edgeward-up-"))
    publisher, trusted = PublisherKey.load_or_create(state_dir / "publisher", "demo")
    config = OrchestratorConfig(
        state_dir=state_dir / "orchestrator",
        grpc_bind=f"127.0.0.1:{args.grpc_port}",
        node_timeout_s=10.0,
        reconcile_interval_s=0.5,
        broker=BrokerConfig(),
        metrics_bind="127.0.0.1:0",  # Prometheus /metrics on a free loopback port
        # The demo's own publisher key: generated here, trusted by this orchestrator only.
        catalog=CatalogConfig(trusted_publishers=[trusted]),
        scheduler=SchedulerConfig(rescheduling=ReschedulingConfig(energy_sustain_s=DEMO_ENERGY_SUSTAIN_S)),
    )
    work = workloads()
    board_cpus = getattr(args, "board_cpus", "modelled")
    console.print(
        f"[bold]edgeward up[/bold]: {args.nodes} nodes, {len(work)} use case(s), state in {state_dir}"
    )
    async with Orchestrator(config) as orch:
        console.print(f"orchestrator on {orch.address}, embedded broker on {orch.broker_url}")
        console.print(f"Prometheus metrics on http://127.0.0.1:{orch.metrics_port}/metrics")
        console.print(
            "[bold yellow]WARNING: plain-text MQTT and gRPC without authentication: "
            "for this local demo only, never for a real fleet[/bold yellow]"
        )
        agents = AgentFleet(state_dir, orch.broker_url, board_cpus=board_cpus)
        try:
            agents.start(args.nodes)
            run = await _run(orch, agents, args, work, publisher, state_dir)
        finally:
            # Off the event loop: the embedded broker lives in it, and a stopping agent waits for
            # the broker to acknowledge its OFFLINE status (else it is killed after the timeout).
            await asyncio.to_thread(agents.stop)
    if run is None:
        return 1
    nodes, deps, traffic, models = run
    moves = [_move(e, traffic.started_ms) for e in orch.events.recent(MOVES, limit=10_000)]
    report = _report(list(nodes), list(deps), traffic, work, moves)
    with console.status("energy: profiling models on accelerators the nodes did not load them on"):
        report["energy"] = await asyncio.to_thread(
            _energy, report, list(nodes), list(deps), work, models, board_cpus
        )
    _print_summary(report)
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=2) + "\n")  # noqa: ASYNC240 - after shutdown
        console.print(f"report written to {args.report}")
    ok = all(d["running"] == d["replicas"] for d in report["deployments"]) and report["inferences"] > 0
    return 0 if ok else 1


async def _run(
    orch: Orchestrator,
    agents: AgentFleet,
    args: argparse.Namespace,
    work: list,
    publisher: PublisherKey,
    state_dir: Path,
) -> tuple[Any, Any, Traffic, dict[str, api_pb2.Model]] | None:
    """Nodes up, models published, deployments applied and running, traffic driven, moves in
    flight finished: (nodes, deployments, traffic, models), or None if a step failed."""
    async with grpc.aio.insecure_channel(orch.address) as channel:
        nodes_api = api_pb2_grpc.NodeServiceStub(channel)
        deps_api = api_pb2_grpc.DeploymentServiceStub(channel)
        models_api = api_pb2_grpc.ModelServiceStub(channel)
        if not await _wait_nodes(nodes_api, agents, args.nodes, orch.verifier.tier):
            return None
        models = await _publish(models_api, work, publisher)
        for w in work:
            for part in w.parts:
                manifest = _fit_selectors(part.manifest, args.nodes)
                resp = await deps_api.Apply(api_pb2.ApplyRequest(manifest=manifest))
                console.print(
                    f"deployment/{resp.deployment.name} {'created' if resp.created else 'configured'}"
                )
        names = [d for w in work for d in w.deployments]
        if not await _wait_running(deps_api, names):
            deps = (await deps_api.List(api_pb2.ListDeploymentsRequest())).deployments
            console.print(deployments_table(list(deps)))
            return None
        if args.tui:
            traffic = await _console(
                orch.address, nodes_api, deps_api, work, models, args.concurrency, state_dir
            )
        else:
            traffic = await _drive(nodes_api, deps_api, work, models, args.duration, args.concurrency)
        await _wait_running(deps_api, names, settled=True)
        nodes = (await nodes_api.List(api_pb2.ListNodesRequest())).nodes
        deps = (await deps_api.List(api_pb2.ListDeploymentsRequest())).deployments
    return nodes, deps, traffic, models


def _move(event: Any, traffic_started_ms: int) -> dict[str, Any]:
    """A rescheduling event for the report, timed from the start of the traffic."""
    return {
        **dict(event.attributes),  # first: an attribute named like a field below does not hide it
        "kind": event.kind,
        "at_s": round((event.time_unix_ms - traffic_started_ms) / 1000, 1),
        "subject": event.subject,
        "message": event.message,
    }


async def _wait_nodes(nodes_api: Any, agents: AgentFleet, count: int, tier: Callable[[str], str]) -> bool:
    """Until ``count`` nodes are online and attested (software tier: the agents' default), so that
    the deployments spread over all of them."""
    deadline = time.monotonic() + NODE_WAIT_S
    with _progress() as progress:
        task = progress.add_task("nodes online and attested", total=count)
        while True:
            nodes = (await nodes_api.List(api_pb2.ListNodesRequest())).nodes
            online = sum(n.state == node_pb2.NODE_STATE_ONLINE and tier(n.id) != "none" for n in nodes)
            progress.update(task, completed=online)
            if online >= count:
                return True
            if agents.dead():
                console.print(
                    f"[red]agent process(es) exited: {agents.dead()}; see {agents.state_dir}/agents/*.log[/red]"
                )
                return False
            if time.monotonic() > deadline:
                console.print("[red]timed out waiting for nodes[/red]")
                return False
            await asyncio.sleep(0.2)


async def _publish(models_api: Any, work: list, publisher: PublisherKey) -> dict[str, api_pb2.Model]:
    import hashlib

    published = {}
    for case, part in [(w.case, part) for w in work for part in w.parts]:
        data = part.model_file.read_bytes()
        meta = api_pb2.ModelMetadata(
            name=part.model_name,
            version=part.model_version,
            sha256=hashlib.sha256(data).hexdigest(),
            size=len(data),
            use_case=case,
            description=f"{case} demo model ({part.model_file.name})",
        )
        sign_metadata(meta, publisher)

        async def parts(meta: api_pb2.ModelMetadata = meta, data: bytes = data) -> Any:
            yield api_pb2.PushModelRequest(metadata=meta)
            for off in range(0, len(data), 256 * 1024):
                yield api_pb2.PushModelRequest(chunk=data[off : off + 256 * 1024])

        try:
            model = await models_api.Push(parts())
            verb = "published"
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise
            # A re-run on the same --state-dir: the version is in the catalog already; use it if it
            # is the very same artifact, else say so rather than run the demo on something else.
            model = await models_api.Get(
                api_pb2.GetModelRequest(name=part.model_name, version=part.model_version)
            )
            if model.sha256 != meta.sha256:
                raise SystemExit(
                    f"model/{model.name}:{model.version} in {part.model_file} differs from the one in the "
                    "state dir's catalog; use a fresh --state-dir"
                ) from err
            verb = "already published"
        console.print(
            f"model/{model.name}:{model.version} {verb} ({model.size} bytes, {','.join(model.dtypes)})"
        )
        published[part.deployment] = model
    return published


async def _wait_running(deps_api: Any, names: list[str], *, settled: bool = False) -> bool:
    """Until every deployment runs its replicas; with ``settled``, until each runs exactly them and
    nothing else (no replacement of an energy move still starting), for at most SETTLE_WAIT_S."""
    deadline = time.monotonic() + (SETTLE_WAIT_S if settled else RUNNING_WAIT_S)
    with _progress(disable=settled) as progress:
        tasks = {n: progress.add_task(f"deployment/{n}", total=None) for n in names}
        while True:
            done = True
            for name in names:
                dep = await deps_api.Get(api_pb2.GetDeploymentRequest(name=name))
                progress.update(tasks[name], total=dep.spec.replicas, completed=dep.status.running)
                done &= dep.status.running >= dep.spec.replicas
                if settled:
                    done &= len(dep.status.replica_list) == dep.status.running == dep.spec.replicas
            if done:
                return True
            if time.monotonic() > deadline:
                what = "moves to finish" if settled else "replicas to run"
                console.print(f"[red]timed out waiting for {what}[/red]")
                return False
            await asyncio.sleep(0.2)


class _FiguresProgress(Progress):
    """A progress display with live text lines under the bars (per-use-case traffic figures)."""

    def __init__(self, *columns: Any, figures: Callable[[], list[str]], **kw: Any) -> None:
        self._figures = figures  # before the base class, which renders once while it initialises
        super().__init__(*columns, **kw)

    def get_renderables(self) -> Any:
        yield self.make_tasks_table(self.tasks)
        for line in self._figures():
            yield Text("  " + line)


def _progress(disable: bool = False, figures: Callable[[], list[str]] | None = None) -> Progress:
    if figures is not None:
        return _FiguresProgress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
            disable=disable,
            figures=figures,
        )
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
        disable=disable,
    )


def _encode(model: api_pb2.Model, x: np.ndarray) -> tuple[str, bytes, list[int]]:
    spec = model.inputs[0]
    shape = [int(d) for d in spec.shape]
    shape[0] = 1 if shape and shape[0] <= 0 else shape[0]
    x = x.reshape(shape)
    if spec.datatype == "INT8":
        q = np.clip(np.round(x / spec.scale) + spec.zero_point, -128, 127).astype(np.int8)
        return "INT8", q.tobytes(), shape
    if spec.datatype == "UINT8":
        q = np.clip(np.round(x / spec.scale) + spec.zero_point, 0, 255).astype(np.uint8)
        return "UINT8", q.tobytes(), shape
    return "FP32", x.astype(np.float32).tobytes(), shape


async def _console(
    address: str,
    nodes_api: Any,
    deps_api: Any,
    work: list,
    models: dict[str, api_pb2.Model],
    concurrency: int,
    state_dir: Path,
) -> Traffic:
    """``--tui``: the operator console on this orchestrator, with traffic flowing behind it until
    the operator quits. Log records go to a file meanwhile: they would tear the screen."""
    from .tui import ConsoleApp

    stop = asyncio.Event()
    traffic = asyncio.create_task(
        _drive(nodes_api, deps_api, work, models, math.inf, concurrency, stop=stop, progress=False)
    )
    log_file = state_dir / "edgeward-up.log"
    root = logging.getLogger()
    handlers = root.handlers[:]
    file_handler = logging.FileHandler(log_file)
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.handlers = [file_handler]
    try:
        await ConsoleApp(address).run_async()
    finally:
        root.handlers = handlers
        file_handler.close()
        stop.set()
        result = await traffic
    console.print(f"console closed; log records of that time are in {log_file}")
    return result


#: One traffic target: a running replica's use case, model, node endpoint and encoded inputs.
Target = tuple[Any, api_pb2.Model, str, list[tuple[str, bytes, list[int]]]]


#: Use case -> its entry model and the encoded inputs sent to it.
Inputs = dict[str, tuple[api_pb2.Model, list[tuple[str, bytes, list[int]]]]]


async def _targets(nodes_api: Any, deps_api: Any, work: list, inputs: Inputs) -> list[Target]:
    """One target per running replica of each use case's entry deployment, as they are now."""
    endpoints = {
        n.id: n.inventory.inference_endpoint for n in (await nodes_api.List(api_pb2.ListNodesRequest())).nodes
    }
    targets = []
    for w in work:
        dep = await deps_api.Get(api_pb2.GetDeploymentRequest(name=w.deployment))
        for rep in dep.status.replica_list:
            if rep.phase == node_pb2.REPLICA_PHASE_RUNNING and rep.node_id in endpoints:
                targets.append((w, inputs[w.case][0], endpoints[rep.node_id], inputs[w.case][1]))
    return targets


async def _drive(
    nodes_api: Any,
    deps_api: Any,
    work: list,
    models: dict[str, api_pb2.Model],
    duration: float,
    concurrency: int,
    *,
    stop: asyncio.Event | None = None,
    progress: bool = True,
) -> Traffic:
    """Send requests round-robin to every running replica's node until ``duration`` has passed
    (or ``stop`` is set); the replicas are looked up again every second, so the traffic follows
    a replica that moves (an energy move) to its new node or accelerator."""
    # A multi-exit model takes its first stage's input.
    inputs: Inputs = {
        w.case: (models[w.deployment], [_encode(models[w.deployment], x) for x in w.make_inputs(64, 7)])
        for w in work
    }
    targets = await _targets(nodes_api, deps_api, work, inputs)
    traffic = Traffic(exits={w.case: [0] * len(w.parts) for w in work if w.multi_exit})
    channels: dict[str, grpc.aio.Channel] = {}

    def stub(endpoint: str) -> Any:
        if endpoint not in channels:
            channels[endpoint] = grpc.aio.insecure_channel(endpoint)
        return oip_grpc.GRPCInferenceServiceStub(channels[endpoint])

    await _wait_served(
        {t[2]: stub(t[2]) for t in targets}, [(t[0].target, t[2]) for t in targets if t[0].multi_exit]
    )
    traffic.started_ms = int(time.time() * 1000)
    deadline = time.monotonic() + duration
    stop = stop or asyncio.Event()
    counter = itertools.count()

    async def worker() -> None:
        while time.monotonic() < deadline and not stop.is_set():
            i = next(counter)
            await _infer_once(stub, targets[i % len(targets)], i, traffic)

    async def follow() -> None:
        while time.monotonic() < deadline and not stop.is_set():
            await asyncio.sleep(1.0)
            with contextlib.suppress(grpc.aio.AioRpcError):
                targets[:] = await _targets(nodes_api, deps_api, work, inputs) or targets

    with _progress(disable=not progress, figures=lambda: [traffic.line(w.case) for w in work]) as bar:
        task = bar.add_task(f"traffic ({len(targets)} replicas)", total=int(duration) if progress else None)

        async def tick() -> None:
            while time.monotonic() < deadline and not stop.is_set():
                await asyncio.sleep(0.5)
                bar.update(task, completed=round(min(duration, duration - (deadline - time.monotonic())), 1))

        try:
            if targets:
                await asyncio.gather(tick(), follow(), *(worker() for _ in range(max(1, concurrency))))
        finally:
            for ch in channels.values():
                with contextlib.suppress(Exception):
                    await ch.close()
    return traffic


async def _infer_once(stub: Callable[[str], Any], target: Target, i: int, traffic: Traffic) -> None:
    """One request to ``target``, counted in ``traffic``."""
    w, model, endpoint, inputs = target
    datatype, raw, shape = inputs[i % len(inputs)]
    request = oip.ModelInferRequest(
        model_name=w.target,
        model_version=model.version,
        id=str(i),
        inputs=[
            oip.ModelInferRequest.InferInputTensor(name=model.inputs[0].name, datatype=datatype, shape=shape)
        ],
        raw_input_contents=[raw],
    )
    request.parameters["source"].string_param = "edgeward-up"
    started = time.perf_counter()
    try:
        response = await stub(endpoint).ModelInfer(request, timeout=5.0)
    except grpc.aio.AioRpcError as err:
        traffic.errors += 1
        log.debug("inference on %s failed: %s", endpoint, err.code())
        return
    ms = (time.perf_counter() - started) * 1000.0
    traffic.latencies_ms.append(ms)
    traffic.by_workload.setdefault(w.case, []).append(ms)
    if w.multi_exit:
        traffic.exits[w.case][response.parameters["exit"].int64_param - 1] += 1


async def _wait_served(stubs: dict[str, Any], targets: list[tuple[str, str]]) -> None:
    """Until each node taking multi-exit requests has been told how its stages are wired."""
    deadline = time.monotonic() + RUNNING_WAIT_S
    for name, endpoint in targets:
        while time.monotonic() < deadline:
            try:
                if (await stubs[endpoint].ModelReady(oip.ModelReadyRequest(name=name), timeout=2.0)).ready:
                    break
            except grpc.aio.AioRpcError:
                pass  # unreachable for a moment: the next try tells
            await asyncio.sleep(0.2)


def _pct(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)), 3) if values else 0.0


def _board_options(board_cpus: str) -> Callable[[api_pb2.Node, str], dict[str, Any] | None]:
    """The options a demo agent on a node's board runs an accelerator kind with (None: not a
    catalog board)."""
    from accelerators.profiles import load_catalog

    catalog = load_catalog()

    def options(node: api_pb2.Node, kind: str) -> dict[str, Any] | None:
        if node.inventory.hardware_profile not in catalog.profiles:
            return None
        profile = catalog[node.inventory.hardware_profile]
        for acc in profile.accelerator_configs():
            if acc["kind"] == kind:
                return _demo_options(profile.labels, kind, acc["options"], board_cpus)
        return None

    return options


def _energy(
    report: dict, nodes: list, deps: list, work: list, models: dict[str, api_pb2.Model], board_cpus: str
) -> dict:
    """Per-node joules per inference (added to ``report["nodes"]``) and the fleet's, as placed and
    as other policies would have placed it (orchestrator/fleet_energy.py says how)."""
    from . import fleet_energy

    artifacts = {
        f"{p.model_name}:{p.model_version}": p.model_file.read_bytes() for w in work for p in w.parts
    }
    table = fleet_energy.energy_table(nodes, artifacts, _board_options(board_cpus))
    counts = fleet_energy.served(nodes, deps)
    for row, node in zip(report["nodes"], nodes, strict=True):
        row.update(fleet_energy.node_energy(node, table, counts))
    total_j, served, _ = fleet_energy.joules(table, counts)
    catalog = {f"{m.name}:{m.version}": m for m in models.values()}
    policies = fleet_energy.compare_policies(nodes, deps, catalog, table, counts)
    aware, rr = policies["energy-aware"]["j_per_inference"], policies["round-robin"]["j_per_inference"]
    sources = {f.source for f in table.values()}
    return {
        "source": "measured" if sources == {"measured"} else "modelled",
        # The run: what the nodes served where the replicas ran (placed at a cold start by the cost
        # models, then moved where measurements showed a large, sustained saving).
        "j_per_inference": total_j / served if served else None,
        "inferences": served,
        # The same fleet and traffic, every deployment placed again from scratch.
        "energy_aware_j_per_inference": aware,
        "round_robin_j_per_inference": rr,
        "cold_start_j_per_inference": policies["energy-aware-cold-start"]["j_per_inference"],
        "round_robin_vs_energy_aware": rr / aware if rr and aware else None,
        "policies": policies,
        "board_cpus": board_cpus,
        "figures": [
            {
                "node": node,
                "accelerator": kind,
                "model": key,
                "mj_per_inference": round(f.energy_j * 1e3, 4),
                "p95_ms": round(f.latency_ms, 4),
                "source": f.source,
                "origin": f.origin,
            }
            for (node, kind, key), f in sorted(table.items())
        ],
        "method": "joules per inference of each model on each node's accelerator (the node's own profile, "
        "else profiled here with the same backend code and options), weighted by the inferences each "
        "node served of it on each accelerator (as placed) or each model served (policies: every "
        "deployment placed from scratch on this fleet by that scheduler profile, knowing every figure, "
        "or only the cost models for the cold start; the mean over its replicas, which clients load "
        "evenly)",
    }


def _report(
    nodes: list[api_pb2.Node], deps: list[api_pb2.Deployment], traffic: Traffic, work: list, moves: list[dict]
) -> dict:
    return {
        "nodes": [
            {
                "id": n.id,
                "status": state_name(n.state),
                "hardware_profile": n.inventory.hardware_profile,
                "replicas": len(n.replicas),
                "accelerators": [
                    {"kind": a.kind, "device": a.device, "simulated": a.simulated}
                    for a in n.inventory.accelerators
                    if a.availability in ("", "ok")
                ],
            }
            for n in nodes
        ],
        "deployments": [
            {
                "name": d.name,
                "replicas": d.spec.replicas,
                "running": d.status.running,
                "phases": _phases(d),
                "placements": [
                    {
                        "replica": r.id,
                        "node": r.node_id,
                        "accelerator": r.accelerator,
                        "phase": phase_name(r.phase),
                        "reason": r.reason,
                        "message": r.message,
                    }
                    for r in d.status.replica_list
                ],
            }
            for d in deps
        ],
        "accelerator_kinds": _kinds(deps),
        "moves": moves,
        "inferences": len(traffic.latencies_ms),
        "errors": traffic.errors,
        "latency_ms": {"p50": _pct(traffic.latencies_ms, 50), "p95": _pct(traffic.latencies_ms, 95)},
        "use_cases": {w.case: _use_case(w, traffic) for w in work},
    }


def _use_case(w: Any, traffic: Traffic) -> dict:
    ms = traffic.by_workload.get(w.case, [])
    out: dict[str, Any] = {
        "deployment": w.deployment,
        "deployments": w.deployments,
        "model": w.target,
        "inferences": len(ms),
        "latency_ms": {"p50": _pct(ms, 50), "p95": _pct(ms, 95)},
    }
    counts = traffic.exits.get(w.case)
    if counts is not None:
        total = sum(counts)
        out["exits"] = {str(k + 1): n for k, n in enumerate(counts)}
        out["exit_distribution"] = {
            str(k + 1): round(n / total, 4) if total else 0.0 for k, n in enumerate(counts)
        }
    return out


def _kinds(deps: list[api_pb2.Deployment]) -> dict[str, int]:
    """Accelerator kind -> running replicas on it."""
    out: dict[str, int] = {}
    for dep in deps:
        for rep in dep.status.replica_list:
            if rep.phase == node_pb2.REPLICA_PHASE_RUNNING and rep.accelerator:
                out[rep.accelerator] = out.get(rep.accelerator, 0) + 1
    return dict(sorted(out.items()))


def _phases(dep: api_pb2.Deployment) -> dict[str, int]:
    out: dict[str, int] = {}
    for rep in dep.status.replica_list:
        out[phase_name(rep.phase)] = out.get(phase_name(rep.phase), 0) + 1
    return out


def _print_summary(report: dict) -> None:
    out = Console()
    energy = report.get("energy", {})
    nodes = Table(title="nodes", title_justify="left")
    for col in ("NODE", "STATUS", "PROFILE", "ACCELERATORS", "REPLICAS", "mJ/INFERENCE"):
        nodes.add_column(col)
    for n in report["nodes"]:
        accs = ", ".join(a["kind"] + (" (simulated)" if a["simulated"] else "") for a in n["accelerators"])
        mj = n.get("j_per_inference")
        nodes.add_row(
            n["id"],
            n["status"],
            n["hardware_profile"],
            accs,
            str(n["replicas"]),
            "-" if mj is None else f"{mj * 1e3:.3f} ({n['energy_source']})",
        )
    deps = Table(title="deployments", title_justify="left")
    for col in ("DEPLOYMENT", "RUNNING", "PHASES", "INFERENCES", "P50 MS", "P95 MS"):
        deps.add_column(col)
    placements = Table(title="placements (edgeward explain)", title_justify="left")
    for col in ("DEPLOYMENT", "NODE", "ACCELERATOR", "WHY"):
        placements.add_column(col)
    # Per node: one kind may run for real on one node (node-1's CPU runs LiteRT) and be simulated on
    # another (the CPU of a simulated FPGA board).
    simulated = {(n["id"], a["kind"]) for n in report["nodes"] for a in n["accelerators"] if a["simulated"]}
    by_dep = {u["deployment"]: u for u in report["use_cases"].values()}
    later = {d: u for u in report["use_cases"].values() for d in u["deployments"][1:]}
    for d in report["deployments"]:
        u = by_dep.get(d["name"], {"inferences": 0, "latency_ms": {"p50": 0, "p95": 0}})
        figures = [str(u["inferences"]), f"{u['latency_ms']['p50']:.2f}", f"{u['latency_ms']['p95']:.2f}"]
        if d["name"] in later:
            figures = ["(stage)", "", ""]
        for p in d["placements"]:
            if p["node"]:
                kind = p["accelerator"] + (
                    " (simulated)" if (p["node"], p["accelerator"]) in simulated else ""
                )
                placements.add_row(d["name"], p["node"], kind, f"{p['reason']}: {p['message']}")
        deps.add_row(
            d["name"],
            f"{d['running']}/{d['replicas']}",
            " ".join(f"{k}={v}" for k, v in d["phases"].items()),
            *figures,
        )
    out.print(nodes)
    out.print(deps)
    out.print(placements)
    for case, u in report["use_cases"].items():
        if "exit_distribution" in u:
            dist = " / ".join(f"exit {k}: {100 * f:.1f} %" for k, f in u["exit_distribution"].items())
            out.print(f"{case} ({u['model']}, multi-exit): {dist}")
    out.print(
        "replicas per accelerator kind: "
        + ", ".join(f"{k} {n}" for k, n in report["accelerator_kinds"].items())
    )
    for move in report["moves"]:
        out.print(f"{move['kind']} at {move['at_s']:+.1f} s of traffic: {move['message']}")
    if not report["moves"]:
        out.print("moves: none (energy moves need a measured saving of at least energy_min_saving)")
    if energy.get("j_per_inference") is not None:
        line = f"fleet energy ({energy['source']}): {energy['j_per_inference'] * 1e3:.3f} mJ per inference as run"
        if energy["round_robin_vs_energy_aware"] is not None:
            cold = energy["cold_start_j_per_inference"]
            line += (
                f"; placed again knowing every profile: energy-aware "
                f"{energy['energy_aware_j_per_inference'] * 1e3:.3f} mJ, round-robin "
                f"{energy['round_robin_j_per_inference'] * 1e3:.3f} mJ "
                f"({energy['round_robin_vs_energy_aware']:.2f} x); energy-aware on cost models only "
                + ("-" if cold is None else f"{cold * 1e3:.3f} mJ")
            )
        out.print(line)
    lat = report["latency_ms"]
    out.print(
        f"inferences: {report['inferences']} (errors {report['errors']}), "
        f"latency p50 {lat['p50']:.2f} ms, p95 {lat['p95']:.2f} ms"
    )
