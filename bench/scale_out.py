"""Scale-out: orchestrator replicas on one PostgreSQL, on this machine (docs/scale-out.md).

Starts a private PostgreSQL (Debian's server binaries, random loopback port, as in the tests) and
a private Mosquitto, then measures through the public gRPC API and /metrics:

* leader takeover: three replicas, no nodes; ``--kills`` times, kill -9 the leader and time until
  another replica's /metrics says ``edgeward_leader 1`` (then the killed one is started again, so
  there are always three); p50 / p99 over the kills;
* apply throughput and apply -> Running with 1 and with 3 replicas, ``--nodes`` hollow nodes
  (``edgeward sim-fleet``, attested), a fresh database each; one replica hears every node
  (``broker.ingest: all``, the default), three share the ingest (``--ingest``, default ``shared``:
  Mosquitto's ``$share``; ``all`` measures the fan-out instead): ``--deployments`` deployments that
  together ask for one replica per node, applied concurrently (8 calls in flight, spread over the
  replicas round-robin); throughput = deployments / time of the Apply calls; apply -> Running per
  replica from the return of its deployment's Apply to its first Running, seen by polling List on a
  replica every 0.25 s from the first Apply on; p50 / p99. The ratio 3 / 1 replicas compares the two runs of one invocation.
  The CPU seconds each replica process and the hollow fleet used from the first Apply to the last
  replica Running are reported too (where the machine's two cores went).

    nice -n 10 python bench/scale_out.py --nodes 1000 --kills 10
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from types import ModuleType

import grpc

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _models import push_vib_cnn
from _report import command, machine, write_section
from _sched import Share, ThreadClock, cpu_seconds, pin, renice, tree_cpu_seconds
from fleet_scale import raise_fd_limit, start_fleet, start_mosquitto, wait_port

POLL_S = 0.25  # how often the bench lists the deployments to see replicas Running
FLEET_CPUS = {0}  # --pin-fleet: the hollow fleet's CPU


def _test_helper(name: str) -> ModuleType:
    """A helper module of tests/ (the private PostgreSQL, ports), loaded from its file: tests/ is not
    put on sys.path, where its folders would shadow the packages of the same names."""
    spec = importlib.util.spec_from_file_location(name, HERE.parent / "tests" / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


pg_server = _test_helper("pg_server")
listen_port = _test_helper("processes").listen_port

from edgeward.v1 import api_pb2, api_pb2_grpc, node_pb2

RUNNING = node_pb2.REPLICA_PHASE_RUNNING
DISPATCHED = node_pb2.REPLICA_PHASE_DISPATCHED
ONLINE = node_pb2.NODE_STATE_ONLINE


class Replica:
    def __init__(
        self, work: Path, index: int, url: str, broker_port: int, public_key: Path, ttl: float, ingest: str
    ) -> None:
        self.grpc_port, self.metrics_port = listen_port(), listen_port()
        self.address = f"127.0.0.1:{self.grpc_port}"
        self.conf = work / f"orchestrator-{index}.yaml"
        self.log = work / f"orchestrator-{index}.log"
        self.conf.write_text(
            f"state_dir: {work / 'orch'}\ngrpc_bind: {self.address}\n"
            f"metrics_bind: 127.0.0.1:{self.metrics_port}\nnode_timeout_s: 15\n"
            f"broker: {{url: 'mqtt://127.0.0.1:{broker_port}', ingest: {ingest}}}\n"
            f"state: {{url: '{url}', lease_ttl_s: {ttl}}}\n"
            f"catalog: {{trusted_publishers: ['{public_key}']}}\n"
        )
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edgeward", "orchestrator", "-c", str(self.conf)],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        wait_port(self.metrics_port, "an orchestrator replica", self.proc, timeout=120)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def leading(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2) as r:
                return "\nedgeward_leader 1" in r.read().decode()
        except OSError:
            return False

    def kill9(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.alive:
            assert self.proc is not None
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def status_lag(replica: Replica) -> dict[tuple[str, str], float]:
    """``edgeward_status_lag_seconds`` of a replica: (path, "count" or "sum") -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{replica.metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        for path in ("received", "merged"):
            for part in ("count", "sum"):
                prefix = f'edgeward_status_lag_seconds_{part}{{path="{path}"}} '
                if line.startswith(prefix):
                    out[(path, part)] = float(line[len(prefix) :])
    return out


def lag_means(before: dict, after: dict) -> dict[str, float]:
    """Mean status lag per path between two scrapes (nan where nothing was timed)."""
    means = {}
    for path in ("received", "merged"):
        n = after.get((path, "count"), 0.0) - before.get((path, "count"), 0.0)
        total = after.get((path, "sum"), 0.0) - before.get((path, "sum"), 0.0)
        means[path] = total / n if n else float("nan")
    return means


def wait(check, timeout: float, what: str, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}")


def start_replicas(
    work: Path, count: int, url: str, broker_port: int, public: Path, ttl: float, ingest: str = "all"
) -> list[Replica]:
    replicas = [Replica(work, i, url, broker_port, public, ttl, ingest) for i in range(count)]
    replicas[0].start()  # first alone: it creates the shared keys and migrates the database
    wait(replicas[0].leading, 60, "the first replica leading")
    for r in replicas[1:]:
        r.start()
    return replicas


def leader_of(replicas: list[Replica]) -> Replica:
    return wait(lambda: next((r for r in replicas if r.alive and r.leading()), None), 60, "a leader")


def takeover(work: Path, url: str, broker_port: int, public: Path, kills: int, ttl: float) -> list[float]:
    replicas = start_replicas(work, 3, url, broker_port, public, ttl)
    times = []
    try:
        for k in range(kills):
            old = leader_of(replicas)
            old.kill9()
            killed = time.monotonic()
            wait(lambda: any(r.alive and r.leading() for r in replicas), 60, "a new leader")
            times.append(time.monotonic() - killed)
            print(f"kill {k + 1}/{kills}: takeover after {times[-1]:.2f} s", flush=True)
            old.start()
    finally:
        for r in replicas:
            r.stop()
    return times


def cpu_used(replicas: list[Replica], fleet: list[subprocess.Popen], postgres: int = 0) -> list[float]:
    """CPU seconds (user + system) used so far by each replica process, then by the whole fleet,
    then by PostgreSQL (the postmaster ``postgres`` and every backend, ended or not)."""
    per_replica = [cpu_seconds(r.proc.pid) if r.proc is not None else 0.0 for r in replicas]
    return [
        *per_replica,
        sum(cpu_seconds(p.pid) for p in fleet),
        tree_cpu_seconds(postgres) if postgres else 0.0,
    ]


async def steady_cost(url: str, replicas: list[Replica], seconds: float) -> dict:
    """Over ``seconds`` of the attested fleet's steady heartbeats, before any Apply: the database's
    transactions a second (every replica's reads, writes and merges) and each replica's share of a
    core (its polls, its ingest)."""
    import psycopg

    def transactions() -> int:
        with psycopg.connect(url) as conn:
            row = conn.execute(
                "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = current_database()"
            ).fetchone()
            assert row is not None
            return int(row[0])

    # PostgreSQL's statistics reach pg_stat_database within a second of a transaction's end, at both
    # ends of the window alike.
    before_tx, before_cpu, t0 = transactions(), cpu_used(replicas, []), time.monotonic()
    await asyncio.sleep(seconds)
    after_tx, after_cpu, elapsed = transactions(), cpu_used(replicas, []), time.monotonic() - t0
    return {
        "tx_per_s": (after_tx - before_tx) / elapsed,
        "cpu_share": [(b - a) / elapsed for a, b in zip(before_cpu[:-2], after_cpu[:-2], strict=True)],
    }


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


async def apply_run(
    args: argparse.Namespace, work: Path, url: str, broker_port: int, count: int, postgres: int
) -> dict:
    from orchestrator.catalog.signing import PublisherKey

    publisher = PublisherKey.generate()
    _, public = publisher.write(work / "publisher")
    ingest = args.ingest if count > 1 else "all"
    replicas = start_replicas(work, count, url, broker_port, public, args.ttl, ingest)
    fleet: list[subprocess.Popen] = []
    result: dict = {"replicas": count, "ingest": ingest}
    channels = [grpc.aio.insecure_channel(r.address) for r in replicas]
    try:
        leader = replicas.index(leader_of(replicas))
        for follower in (r for i, r in enumerate(replicas) if i != leader and r.proc is not None):
            if args.follower_nice:
                renice(follower.proc.pid, args.follower_nice)
        nodes_api = api_pb2_grpc.NodeServiceStub(channels[leader])
        fleet = start_fleet(work, broker_port, args.nodes, max(1, -(-args.nodes // 2500)), args.heartbeat)
        if args.pin_fleet:  # before the fleet's threads start: they inherit it
            for proc in fleet:
                pin(proc.pid, FLEET_CPUS)
        t0 = time.monotonic()
        while True:  # attestation results live in the leader's verifier
            await asyncio.sleep(2.0)
            listed = (await nodes_api.List(api_pb2.ListNodesRequest(), timeout=60)).nodes
            attested = sum(n.state == ONLINE and n.attestation_tier == "software" for n in listed)
            if attested == args.nodes:
                break
            if time.monotonic() - t0 > args.startup_timeout:
                raise SystemExit(f"{attested}/{args.nodes} attested after {args.startup_timeout:.0f} s")
        result["attested_s"] = time.monotonic() - t0
        result["steady"] = await steady_cost(url, replicas, args.steady)
        await push_vib_cnn(api_pb2_grpc.ModelServiceStub(channels[0]), publisher)
        per = args.nodes // args.deployments
        deps = [api_pb2_grpc.DeploymentServiceStub(c) for c in channels]
        applied: dict[str, float] = {}
        applied_wall: dict[str, float] = {}
        slots = asyncio.Semaphore(8)

        async def apply(i: int) -> None:
            name = f"scale-{i:04d}"
            manifest = (
                f"apiVersion: edgeward/v1\nkind: Deployment\nmetadata: {{name: {name}}}\n"
                f"spec:\n  model: {{name: vib-cnn, version: 1.0.0}}\n  replicas: {per}\n"
                "  requirements: {accelerators: [sim-hollow], memory: 1Mi}\n"
            )
            if args.apply_rate:  # open loop: the i-th call starts at i / rate, however fast the others went
                await asyncio.sleep(max(0.0, start + i / args.apply_rate - time.monotonic()))
            async with slots:
                await deps[i % len(deps)].Apply(api_pb2.ApplyRequest(manifest=manifest), timeout=120)
            applied[name] = time.monotonic()
            applied_wall[name] = time.time()

        first_running: dict[str, float] = {}
        # By the orchestrator: the replica's update time when first seen Running, and Dispatched (not
        # every replica is seen Dispatched: the phase may last less than a poll).
        recorded: dict[str, float] = {}
        dispatched: dict[str, float] = {}
        want = per * args.deployments

        async def watch() -> None:
            """Poll from the first Apply on, alongside the calls: a replica of an early deployment is
            seen Running when it runs, not when the last deployment has been applied."""
            deadline = time.monotonic() + args.running_timeout
            while len(first_running) < want and time.monotonic() < deadline:
                await asyncio.sleep(POLL_S)
                listed = (await deps[0].List(api_pb2.ListDeploymentsRequest(), timeout=60)).deployments
                now = time.monotonic()
                for d in listed:
                    if d.name not in applied:  # stored, but its Apply has not returned yet: next poll
                        continue
                    for r in d.status.replica_list:
                        if r.phase == DISPATCHED and r.id not in dispatched:
                            dispatched[r.id] = r.updated_unix_ms / 1000 - applied_wall[d.name]
                        if r.phase == RUNNING and r.id not in first_running:
                            first_running[r.id] = now - applied[d.name]
                            recorded[r.id] = r.updated_unix_ms / 1000 - applied_wall[d.name]

        lag_before = status_lag(replicas[leader])
        cpu_before = cpu_used(replicas, fleet, postgres)
        leader_proc = replicas[leader].proc
        assert leader_proc is not None  # started above
        loop_clock = ThreadClock(leader_proc.pid)
        loop_clock.start()
        start = time.monotonic()
        watcher = asyncio.create_task(watch())
        await asyncio.gather(*(apply(i) for i in range(args.deployments)))
        result["apply_s"] = time.monotonic() - start
        result["applies_per_s"] = args.deployments / result["apply_s"]
        await watcher
        cpu_after = cpu_used(replicas, fleet, postgres)
        result["status_lag"] = lag_means(lag_before, status_lag(replicas[leader]))
        result["loop_share"] = loop_clock.stop()
        result["cpu_s"] = [round(b - a, 1) for a, b in zip(cpu_before, cpu_after, strict=True)]
        times = list(first_running.values())
        result["running"] = len(times)
        result["p50_s"] = statistics.median(times) if times else float("nan")
        result["p99_s"] = pct(times, 0.99) if len(times) == want else float("nan")
        stamped = list(recorded.values())
        both = [k for k in recorded if k in dispatched]
        result["dispatched_p50_s"] = statistics.median(dispatched[k] for k in both) if both else float("nan")
        result["to_running_p50_s"] = (
            statistics.median(recorded[k] - dispatched[k] for k in both) if both else float("nan")
        )
        result["recorded_p50_s"] = statistics.median(stamped) if stamped else float("nan")
        result["recorded_p99_s"] = pct(stamped, 0.99) if len(stamped) == want else float("nan")
        print(f"{count} replica(s): {result['applies_per_s']:.1f} applies/s; {len(times)}/{want} running, "
              f"p50 {result['p50_s']:.2f} s, p99 {result['p99_s']:.2f} s (recorded Running: p50 "
              f"{result['recorded_p50_s']:.2f} s, p99 {result['recorded_p99_s']:.2f} s)", flush=True)  # fmt: skip
        if count > 1 and args.after_takeover:
            result["after_takeover"] = await after_takeover(args, replicas, replicas[leader])
    finally:
        for c in channels:
            await c.close()
        for proc in fleet:
            proc.terminate()
        for proc in fleet:
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()
        for r in replicas:
            r.stop()
    return result


async def after_takeover(
    args: argparse.Namespace, replicas: list[Replica], leader: Replica
) -> tuple[float, float]:
    """Kill -9 the leader of the attested fleet, wait for another replica to lead, apply one more
    deployment (``--after-takeover`` replicas) through it, and time it until every replica of it
    runs: (takeover s, Apply -> all Running s). The new leader releases a node its model key only
    once it has attested the node in its own term."""
    leader.kill9()
    killed = time.monotonic()
    new = await asyncio.to_thread(leader_of, [r for r in replicas if r.alive])
    took = time.monotonic() - killed
    want = args.after_takeover
    manifest = (
        "apiVersion: edgeward/v1\nkind: Deployment\nmetadata: {name: after-takeover}\n"
        f"spec:\n  model: {{name: vib-cnn, version: 1.0.0}}\n  replicas: {want}\n"
        "  requirements: {accelerators: [sim-hollow], memory: 1Mi}\n"
    )
    async with grpc.aio.insecure_channel(new.address) as channel:
        api = api_pb2_grpc.DeploymentServiceStub(channel)
        start = time.monotonic()
        await api.Apply(api_pb2.ApplyRequest(manifest=manifest), timeout=120)
        deadline = start + args.running_timeout
        running = 0
        while running < want and time.monotonic() < deadline:
            await asyncio.sleep(POLL_S)
            got = await api.Get(api_pb2.GetDeploymentRequest(name="after-takeover"), timeout=60)
            running = sum(r.phase == RUNNING for r in got.status.replica_list)
        ran = time.monotonic() - start if running == want else float("nan")
    print(
        f"after a kill -9 of the leader: takeover {took:.2f} s, {want} more replicas Running after {ran:.2f} s"
    )
    return took, ran


def _lags(means: dict[str, float] | None) -> str:
    if means is None:
        return "n/a"
    return " / ".join("-" if math.isnan(v) else f"{v * 1000:.0f} ms" for v in means.values())


def _loop(share: Share | None) -> str:
    return "n/a" if share is None else f"{share.on_cpu:.0%} / {share.waiting:.0%}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument(
        "--deployments", type=int, default=50, help="the nodes' replicas in this many deployments"
    )
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2, help="apply runs per replica count (order 1,3,3,1)")
    parser.add_argument("--ttl", type=float, default=3.0, help="state.lease_ttl_s (default 3, the default)")
    parser.add_argument("--heartbeat", type=float, default=5.0)
    parser.add_argument("--startup-timeout", type=float, default=900.0)
    parser.add_argument("--running-timeout", type=float, default=600.0)
    parser.add_argument(
        "--ingest", choices=("shared", "all"), default="shared", help="broker.ingest of the 3-replica runs"
    )
    parser.add_argument(
        "--apply-rate",
        type=float,
        default=0.0,
        help="Apply calls started per second, the same for every replica count (default 0: as fast as "
        "8 calls in flight go, so more replicas also take more deployments at once)",
    )
    parser.add_argument(
        "--steady", type=float, default=10.0, help="seconds of steady heartbeats measured before the apply"
    )
    parser.add_argument(
        "--pin-fleet",
        action="store_true",
        help="run the hollow fleet on the first CPU and everything else (PostgreSQL, Mosquitto, the "
        "replicas) on the others: the nodes stand in for devices with CPUs of their own",
    )
    parser.add_argument(
        "--after-takeover",
        type=int,
        default=0,
        help="in each run of 3 replicas, after the apply: kill -9 the leader and time one more deployment "
        "of this many replicas applied through the new one until all run (default 0: not done)",
    )
    parser.add_argument(
        "--follower-nice",
        type=int,
        default=0,
        help="added to the niceness of the followers' processes (default 0): on one machine they take CPU from the leader "
        "and the fleet that replicas on machines of their own would not",
    )
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    bindir = pg_server.find_bindir()
    if bindir is None:
        raise SystemExit("PostgreSQL server not installed: apt-get install postgresql")
    raise_fd_limit()
    if args.pin_fleet:  # this script and what it starts from here on (not the fleet) on the other CPUs
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            raise SystemExit("--pin-fleet needs at least 2 CPUs")
        os.sched_setaffinity(0, set(cpus) - FLEET_CPUS)
    pg = pg_server.PostgresServer(bindir)
    pg.start()
    postmaster = int((pg.datadir / "postmaster.pid").read_text().split()[0])
    root = Path(tempfile.mkdtemp(prefix="edgeward-scale-out-"))
    broker, broker_port = start_mosquitto(root)
    load_start = os.getloadavg()[0]
    try:
        work = root / "takeover"
        work.mkdir()
        from orchestrator.catalog.signing import PublisherKey

        _, public = PublisherKey.generate().write(work / "publisher")
        kills = takeover(work, pg.url(pg.create_database()), broker_port, public, args.kills, args.ttl)
        runs = []
        order = [1, 3, 3, 1] * (args.rounds // 2) + [1, 3] * (args.rounds % 2)  # ABBA: drift cancels
        for k, count in enumerate(order):
            work = root / f"apply-{k}-{count}"
            work.mkdir()
            url = pg.url(pg.create_database())
            runs.append(asyncio.run(apply_run(args, work, url, broker_port, count, postmaster)))
    finally:
        broker.terminate()
        broker.wait()
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)  # each run's PostgreSQL data and logs: ~100 MB

    def median(count: int, key: str) -> float:
        return statistics.median(r[key] for r in runs if r["replicas"] == count)

    ratio_tp = median(3, "applies_per_s") / median(1, "applies_per_s")
    ratio_p99 = median(3, "p99_s") / median(1, "p99_s")
    ratio_recorded = median(3, "recorded_p99_s") / median(1, "recorded_p99_s")
    paced = (
        f"started at {args.apply_rate:g} a second whatever the replica count (`--apply-rate`), at most 8 in flight"
        if args.apply_rate
        else "8 in flight: more replicas also take more deployments at once (`--apply-rate` compares at one rate)"
    )
    rows = "\n".join(
        f"| {k + 1} | {r['replicas']} (`{r['ingest']}`) | {r['attested_s']:.0f} s | {r['steady']['tx_per_s']:.0f} | "
        f"{' / '.join(f'{c:.0%}' for c in r['steady']['cpu_share'])} | {r['applies_per_s']:.1f} | "
        f"{r['p50_s']:.2f} s | {r['p99_s']:.2f} s | {r['recorded_p50_s']:.2f} s | {r['recorded_p99_s']:.2f} s | "
        f"{r['dispatched_p50_s']:.2f} s / {r['to_running_p50_s']:.2f} s | "
        f"{r['running']} | {_lags(r.get('status_lag'))} | {_loop(r.get('loop_share'))} | "
        f"{' / '.join(f'{c:.1f}' for c in r['cpu_s'][:-2])} | {r['cpu_s'][-2]:.1f} | {r['cpu_s'][-1]:.1f} |"
        for k, r in enumerate(runs)
    )
    takeover_text = (
        f"""**Leader takeover** (3 replicas, kill -9 of the leader, {len(kills)} times; until another replica's
`/metrics` says `edgeward_leader 1`): p50 **{statistics.median(kills):.2f} s**, p99
**{pct(kills, 0.99):.2f} s** (goal p99 <= 5 s), min {min(kills):.2f} s. A takeover waits for the
dead leader's lease to run out ({args.ttl:g} s after its last renewal, itself up to {args.ttl / 4:g} s old) and
for a follower's next try (every {args.ttl / 6:.2f} s)."""
        if kills
        else "**Leader takeover**: not measured (`--kills 0`)."
    )
    rate_title = f", {args.apply_rate:g} Apply calls a second" if args.apply_rate else ""
    afters = [r["after_takeover"] for r in runs if "after_takeover" in r]
    after_text = (
        f"""
**After a takeover** (`--after-takeover {args.after_takeover}`: in each run of 3 replicas, once every
replica ran, kill -9 of the leader, then one more deployment of {args.after_takeover} replicas applied through the
new leader): takeover after {", ".join(f"{t:.2f}" for t, _ in afters)} s; all of its replicas Running
{", ".join(f"{x:.2f}" for _, x in afters)} s after its Apply. The new leader releases a node its model key
only once it has attested the node in its own term (docs/scale-out.md, "Attestation results on every
replica").
"""
        if afters
        else ""
    )
    rate_title += ", fleet on a core of its own" if args.pin_fleet else ""
    rate_title += f", followers at nice +{args.follower_nice}" if args.follower_nice else ""
    cores = (
        "the hollow fleet on one core, every replica, PostgreSQL and Mosquitto on the other (`--pin-fleet`)"
        if args.pin_fleet
        else "every replica, PostgreSQL, Mosquitto and the hollow fleet share its 2 cores"
    )
    if args.follower_nice:
        cores += (
            f"; the followers run at {args.follower_nice} nice levels below the rest (`--follower-nice`), so that they take the "
            "CPU only when the leader, the fleet, PostgreSQL and Mosquitto leave it"
        )
    body = f"""## Scale-out: leader takeover, 1 vs 3 replicas on PostgreSQL, {args.nodes:,} hollow nodes{rate_title}

`{command()}` ({machine()}; load average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the
end, on the shared 2-core machine: {cores})

A private PostgreSQL and Mosquitto; orchestrator replicas as processes sharing one database and one
state dir (`state.lease_ttl_s: {args.ttl:g}`).

{takeover_text}

**Apply** ({args.deployments} deployments x {args.nodes // args.deployments} replicas = one replica per
hollow node, Apply calls spread over the replicas, {paced}):

Runs in the order {", ".join(str(c) for c in order)} replicas (so that a drift of the machine's load cancels out):

| run | replicas (ingest) | nodes attested after | steady: database transactions/s | steady: share of a core per replica | applies/s | apply -> Running p50 | p99 | recorded p50 | recorded p99 | recorded: dispatched after / then Running after (p50) | running | leader's status lag, mean: received / merged | leader's loop: on a CPU / waiting for one | CPU s per replica (leader first if it was the first) | CPU s hollow fleet | CPU s PostgreSQL |
|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|
{rows}
{after_text}
Medians, 3 / 1 replicas: apply throughput **x{ratio_tp:.2f}**, apply -> Running p99 **x{ratio_p99:.2f}**
(recorded p99 x{ratio_recorded:.2f}; below 1 is faster). "apply -> Running" is when the bench's poll (every {POLL_S} s, from the first Apply on) first saw the replica
Running; "recorded" is the replica's update time as the orchestrator stored it (no poll in it), split,
for the replicas a poll saw Dispatched, into Apply -> dispatched (the leader placed it and sent the
command) and dispatched -> Running (the node fetched and loaded the model and its report reached
the leader). "Steady" is {args.steady:g} s of the attested fleet's heartbeats before the first Apply.
"Leader's status lag" is the mean of `edgeward_status_lag_seconds` on the leader over the apply, from a node's send
time to the leader applying its status: received from the broker, or merged (read back from a follower's share of the
ingest; "-": none).
"Leader's loop" is the share of the apply (from the first Apply until every replica ran) that the
leader's event loop spent on a CPU, and runnable but waiting for one (bench/_sched.py); the CPU
seconds are over the same window, PostgreSQL's its postmaster's and every backend's (ended or not).
One replica hears every node (`broker.ingest: all`); three share the ingest
(`{args.ingest}`: {"Mosquitto's `$share`, each message to one replica, merged into the store" if args.ingest == "shared" else "every replica hears every node"}; docs/scale-out.md, "Ingest"). Apply calls are spread over
the replicas; the leader alone places replicas and acts on the nodes' reports.
"""
    print(body)
    if not args.no_write:
        name = "scale-out-rate" if args.apply_rate else "scale-out"
        write_section(
            name + ("-pinned" if args.pin_fleet else "") + ("-nice" if args.follower_nice else ""), body
        )


if __name__ == "__main__":
    main()
