"""Cut an agent off the network and heal it, with real network namespaces: the test creates two
namespaces joined by a veth pair (and removes them): "core" holds Mosquitto, the orchestrator and
two agents; "edge" holds the third agent. Nothing binds an address in the host's namespace: the
test reaches the gRPC API through a Unix socket relayed inside "core" (where the orchestrator binds
loopback only; the edge node downloads artifacts through a relay on the core's veth address).

While the link is down, the orchestrator loses the edge node and reschedules its replica in the
core; the edge node keeps serving (edge autonomy). After the heal, its stale replica is undeployed:
no replica doubled, nothing lost, telemetry gap bounded, state converged."""

from __future__ import annotations

import getpass
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from fault_support import (
    MODEL,
    WAIT_S,
    Probe,
    Proc,
    catalog_config,
    deployment_manifest,
    enrollment_token,
    max_gap_ms,
    wait_for,
    wait_passes,
)

from edgeward.wire import now_ms

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.timeout(600)]
# The timeout only stops a hang: each wait below returns as soon as its condition holds.

IP = shutil.which("ip", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))
MOSQUITTO = shutil.which("mosquitto", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin"]))
PARTITION_S = 8.0
HEARTBEAT_S = 0.5


def _ip(*args: str) -> None:
    subprocess.run([IP, *args], check=True, capture_output=True, timeout=10)


def _wait_listening(proc: subprocess.Popen, log: Path) -> None:
    """Wait until Mosquitto (in a namespace the test cannot connect into) says it listens."""
    deadline = time.monotonic() + WAIT_S
    while b"Opening ipv4 listen socket" not in log.read_bytes():
        assert proc.poll() is None, f"mosquitto exited:\n{log.read_text(errors='replace')}"
        assert time.monotonic() < deadline, f"mosquitto not listening:\n{log.read_text(errors='replace')}"
        time.sleep(0.05)


@pytest.fixture
def namespaces():
    """Two fresh namespaces, core and edge, joined by veth (core 10.213.N.1/30, edge .2/30)."""
    if IP is None:
        pytest.skip("the `ip` command (iproute2) is missing")
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if MOSQUITTO is None:
        pytest.skip("mosquitto not installed")
    tag = secrets.token_hex(3)
    core, edge = f"ew-core-{tag}", f"ew-edge-{tag}"
    net = f"10.213.{secrets.randbelow(250) + 1}"
    created: list[str] = []
    try:
        for ns in (core, edge):
            _ip("netns", "add", ns)
            created.append(ns)
        _ip("link", "add", f"ewc{tag}", "type", "veth", "peer", "name", f"ewe{tag}")
        _ip("link", "set", f"ewc{tag}", "netns", core)  # out of the host's namespace at once
        _ip("link", "set", f"ewe{tag}", "netns", edge)
        for ns, dev, addr in ((core, f"ewc{tag}", f"{net}.1/30"), (edge, f"ewe{tag}", f"{net}.2/30")):
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "addr", "add", addr, "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
    except subprocess.CalledProcessError as err:
        for ns in created:
            subprocess.run([IP, "netns", "del", ns], check=False, capture_output=True)
        pytest.skip(f"cannot create network namespaces here: {err.stderr.decode(errors='replace').strip()}")
    try:
        yield {"core": core, "edge": edge, "core_ip": f"{net}.1", "edge_link": f"ewe{tag}"}
    finally:
        for ns in created:
            subprocess.run([IP, "netns", "del", ns], check=False, capture_output=True)


def test_partitioned_agent_is_replaced_and_its_return_doubles_nothing(namespaces, tmp_path, topic_prefix):
    core, edge, core_ip = namespaces["core"], namespaces["edge"], namespaces["core_ip"]
    in_core, in_edge = (IP, "netns", "exec", core), (IP, "netns", "exec", edge)
    procs: list[Proc] = []
    others: list[subprocess.Popen] = []
    try:
        conf = tmp_path / "mosquitto.conf"
        conf.write_text(
            f"user {getpass.getuser()}\nallow_anonymous true\npersistence false\nlistener 1883 {core_ip}\n"
        )
        with (tmp_path / "mosquitto.log").open("ab") as log:
            others.append(subprocess.Popen([*in_core, MOSQUITTO, "-c", str(conf)], stdout=log, stderr=log))
        broker = f"mqtt://{core_ip}:1883"
        _wait_listening(others[-1], tmp_path / "mosquitto.log")
        state = tmp_path / "state"
        orch_cfg = tmp_path / "orchestrator.yaml"
        orch_cfg.write_text(
            yaml.safe_dump(
                {
                    "state_dir": str(state),
                    "grpc_bind": "127.0.0.1:50051",  # the core namespace's loopback
                    "metrics_bind": "127.0.0.1:9090",
                    "advertise": f"{core_ip}:50051",  # relayed to it, for the edge node's downloads
                    "broker": {"url": broker, "topic_prefix": topic_prefix},
                    "node_timeout_s": 4.0,
                    "reconcile_interval_s": 0.3,
                    "resend_interval_s": 1.0,
                    "catalog": catalog_config(tmp_path / "publishers"),
                }
            )
        )
        procs.append(Proc("orchestrator", ["orchestrator", "-c", str(orch_cfg)], tmp_path, prefix=in_core))
        procs[0].wait_logged("orchestrator ready")
        for i, prefix in ((1, in_core), (2, in_core), (3, in_edge)):
            cfg = tmp_path / f"node-{i}.yaml"
            cfg.write_text(
                yaml.safe_dump(
                    {
                        "node_id": f"node-{i}",
                        "enrollment_token": enrollment_token(state, f"node-{i}"),
                        "heartbeat_s": HEARTBEAT_S,
                        "broker": {"url": broker, "topic_prefix": topic_prefix},
                        "state_dir": str(tmp_path / f"agents-{i}"),
                    }
                )
            )
            procs.append(Proc(f"node-{i}", ["agent", "-c", str(cfg)], tmp_path, prefix=prefix))
        sock, metrics = tmp_path / "grpc.sock", f"unix:{tmp_path / 'metrics.sock'}"
        relay = Path(__file__).with_name("netns_relay.py")
        for listen, upstream in (
            (f"unix:{sock}", "127.0.0.1:50051"),
            (f"{core_ip}:50051", "127.0.0.1:50051"),
            (metrics, "127.0.0.1:9090"),
        ):
            others.append(
                subprocess.Popen(
                    [*in_core, sys.executable, str(relay), listen, upstream],
                    stdout=subprocess.DEVNULL,
                )
            )
        with Probe(f"unix:{sock}") as probe:
            wait_for(lambda: len(probe.online()) == 3, WAIT_S, "3 nodes online", procs=procs)
            wait_for(lambda: len(probe.attested()) == 3, WAIT_S, "3 nodes attested", procs=procs)
            probe.push(MODEL)
            probe.apply(deployment_manifest("vib", 3))
            wait_for(lambda: probe.converged({"vib": 3}), WAIT_S, "3 replicas running")
            before = probe.placement("vib")
            assert "node-3" in before.values(), "one replica runs on the edge node"

            _ip("-n", edge, "link", "set", namespaces["edge_link"], "down")  # the partition
            cut_ms = now_ms()
            wait_for(lambda: "node-3" not in probe.online(), WAIT_S, "the edge node lost")
            wait_for(
                lambda: probe.converged({"vib": 3}) and "node-3" not in probe.placement("vib").values(),
                WAIT_S,
                "its replica rescheduled in the core",
            )
            time.sleep(max(0.0, PARTITION_S - (now_ms() - cut_ms) / 1000))
            _ip("-n", edge, "link", "set", namespaces["edge_link"], "up")  # the heal
            healed_ms = now_ms()

            wait_for(lambda: "node-3" in probe.online(), WAIT_S, "the edge node back")
            moved = probe.placement("vib")
            wait_for(lambda: probe.converged({"vib": 3}), WAIT_S, "convergence after the heal")
            wait_passes(metrics, 3)  # passes that saw the healed node's reports
            assert probe.converged({"vib": 3})
            assert probe.placement("vib") == moved, "nothing doubled or moved back after the heal"
            edge_node = next(n for n in probe.nodes() if n.id == "node-3")
            assert not edge_node.replicas, "the stale replica on the healed node is gone"
            # What the edge node measured while cut off reached the orchestrator afterwards.
            stamps = probe.telemetry("node-3", cut_ms - 2000)
            gap = max_gap_ms(stamps, cut_ms, healed_ms)
            assert gap <= 4 * HEARTBEAT_S * 1000, f"telemetry gap of {gap} ms across the partition"
    finally:
        for proc in reversed(procs):
            proc.stop()
        for other in others:
            other.terminate()
            other.wait(10)
