"""Recovery times under faults, on real processes: an orchestrator (`edgeward orchestrator`), node
agents (`edgeward agent`, real LiteRT and the committed int8 industrial model) and a private
Mosquitto, all on 127.0.0.1. Each round:

1. kill -9 one agent that runs a replica: node offline detection (until the API shows it offline)
   and rescheduling (until the deployment runs in full again without it); the agent is restarted;
2. restart the broker after a 2 s outage: until telemetry of every node flows again, and until a
   command is acknowledged again (a scale-up runs), then the scale-up is undone.

The processes and the waiting reuse tests/faults/fault_support.py (the fault-injection suite's).

    python bench/faults.py --nodes 3 --rounds 3
"""

from __future__ import annotations

import argparse
import getpass
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "tests" / "faults"))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))  # before tests/: its usecases/ test folder must not shadow the package
from _report import command, machine, write_section
from fault_support import MODEL, Probe, Proc, catalog_config, deployment_manifest, enrollment_token, wait_for

from edgeward.wire import now_ms

OUTAGE_S = 2.0
HEARTBEAT_S = 1.0
NODE_TIMEOUT_S = 15.0  # the default


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Broker:
    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin:/usr/bin")
        if binary is None:
            raise SystemExit("mosquitto is not installed (make test-deps installs it as root)")
        self.binary, self.workdir, self.port = binary, workdir, free_port()
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text(
            f"user {getpass.getuser()}\nallow_anonymous true\npersistence false\n"
            f"listener {self.port} 127.0.0.1\nlog_dest stderr\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with (self.workdir / "mosquitto.log").open("ab") as log:
            self.proc = subprocess.Popen([self.binary, "-c", str(self.conf)], stdout=log, stderr=log)
        wait_for(self._listening, 10, "mosquitto listening", interval=0.02)

    def _listening(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


def one_round(probe: Probe, agents: dict[str, Proc], start_agent, broker: Broker, replicas: int) -> dict:
    out: dict[str, float] = {}
    placement = probe.placement("vib")
    victim = sorted(set(placement.values()))[0]
    agents[victim].kill9()
    t0 = time.monotonic()
    wait_for(lambda: victim not in probe.online(), 60, "offline detection", interval=0.02)
    out["offline"] = time.monotonic() - t0

    def rescheduled() -> bool:
        return probe.converged({"vib": replicas}) and victim not in probe.placement("vib").values()

    wait_for(rescheduled, 60, "rescheduling", interval=0.02)
    out["reschedule"] = time.monotonic() - t0
    agents[victim] = start_agent(victim)
    wait_for(lambda: victim in probe.online() and victim in probe.attested(), 60, "the agent back")

    nodes = sorted(agents)
    broker.stop()
    time.sleep(OUTAGE_S)
    broker.start()
    restarted_ms, t0 = now_ms(), time.monotonic()
    wait_for(lambda: all(probe.telemetry(n, restarted_ms) for n in nodes), 60, "telemetry", interval=0.02)
    out["telemetry"] = time.monotonic() - t0
    probe.apply(deployment_manifest("vib", replicas + 1))
    wait_for(lambda: probe.converged({"vib": replicas + 1}), 60, "a command acknowledged", interval=0.02)
    out["command"] = time.monotonic() - t0
    probe.apply(deployment_manifest("vib", replicas))
    wait_for(lambda: probe.converged({"vib": replicas}), 60, "scaled back")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="do not update docs/benchmarks.md")
    args = parser.parse_args()
    replicas = args.nodes
    with tempfile.TemporaryDirectory(prefix="edgeward-faults-") as tmp:
        workdir = Path(tmp)
        broker = Broker(workdir)
        broker.start()
        grpc_port = free_port()
        orch_cfg = workdir / "orchestrator.yaml"
        orch_cfg.write_text(
            yaml.safe_dump(
                {
                    "state_dir": str(workdir / "state"),
                    "grpc_bind": f"127.0.0.1:{grpc_port}",
                    "broker": {"url": f"mqtt://127.0.0.1:{broker.port}"},
                    "node_timeout_s": NODE_TIMEOUT_S,
                    "catalog": catalog_config(workdir / "publishers"),
                }
            )
        )
        procs = [Proc("orchestrator", ["orchestrator", "-c", str(orch_cfg)], workdir)]

        def start_agent(node_id: str) -> Proc:
            cfg = workdir / f"{node_id}.yaml"
            cfg.write_text(
                yaml.safe_dump(
                    {
                        "node_id": node_id,
                        "enrollment_token": enrollment_token(workdir / "state", node_id),
                        "heartbeat_s": HEARTBEAT_S,
                        "broker": {"url": f"mqtt://127.0.0.1:{broker.port}"},
                        "state_dir": str(workdir / "agents"),
                    }
                )
            )
            proc = Proc(node_id, ["agent", "-c", str(cfg)], workdir)
            procs.append(proc)
            return proc

        agents = {f"node-{i}": start_agent(f"node-{i}") for i in range(1, args.nodes + 1)}
        results = []
        try:
            with Probe(f"127.0.0.1:{grpc_port}") as probe:
                wait_for(lambda: len(probe.attested()) == args.nodes, 120, "nodes attested")
                probe.push(MODEL)
                probe.apply(deployment_manifest("vib", replicas))
                wait_for(lambda: probe.converged({"vib": replicas}), 120, "replicas running")
                for r in range(args.rounds):
                    results.append(one_round(probe, agents, start_agent, broker, replicas))
                    print(
                        f"round {r + 1}: "
                        + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in results[-1].items()),
                        flush=True,
                    )
        except BaseException:
            for proc in procs:
                print(f"--- {proc.name} (last lines)\n{proc.log.read_text(errors='replace')[-1500:]}")
            raise
        finally:
            for proc in reversed(procs):
                proc.stop()
            broker.stop()

    def median_ms(key: str) -> str:
        return f"{statistics.median(r[key] for r in results) * 1000:.0f}"

    rows = "\n".join(
        f"| {i + 1} | {r['offline'] * 1000:.0f} | {r['reschedule'] * 1000:.0f} | "
        f"{r['telemetry'] * 1000:.0f} | {r['command'] * 1000:.0f} |"
        for i, r in enumerate(results)
    )
    body = f"""## Fault recovery, {args.nodes} nodes (real processes)

`{command()}` — {machine()}

An orchestrator, {args.nodes} node agents (heartbeat {HEARTBEAT_S:g} s) and a private Mosquitto as
separate processes on 127.0.0.1; `node_timeout_s` {NODE_TIMEOUT_S:g} (the default), {replicas} replicas.
Per round: kill -9 of an agent running a replica, then a broker restart after a {OUTAGE_S:g} s outage.
Times are from the kill, and from the broker's restart.

| round | node offline detected (ms) | replicas rescheduled and running (ms) | telemetry of every node flowing again (ms) | command acknowledged: scale-up running (ms) |
|---|---|---|---|---|
{rows}

Medians: offline detection **{median_ms("offline")} ms** (the broker publishes the killed agent's last
will at once; the orchestrator confirms it for 0.5 s, in case it is the broker itself going down),
rescheduling **{median_ms("reschedule")} ms**, broker-restart recovery **{median_ms("telemetry")} ms**
until telemetry flows and **{median_ms("command")} ms** until a command is acknowledged and its replica
runs. The reconnect backoff (0.5 s doubling to 8 s) dominates the broker-restart figures. The
samples taken during the outage are replayed (the gap is asserted, not timed, by
tests/faults/test_broker_restart.py); partition heal is exercised by tests/faults/test_partition.py
(network namespaces, root only) and not timed here.
"""
    print(body)
    if not args.no_write:
        write_section("fault-recovery", body)


if __name__ == "__main__":
    main()
