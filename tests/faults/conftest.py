"""Fixtures of the fault-injection suite: an orchestrator and node agents as real processes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from fault_support import MODEL, Probe, Proc, catalog_config, enrollment_token, wait_for
from processes import listen_port


def _log_size(tmp_path: Path, name: str) -> int:
    log = tmp_path / f"{name}.log"
    return log.stat().st_size if log.exists() else 0


class Cluster:
    """Writes the configs and starts/stops the processes; everything stops at the end of the test."""

    def __init__(self, tmp_path: Path, topic_prefix: str) -> None:
        self.tmp_path = tmp_path
        self.topic_prefix = topic_prefix
        self.procs: list[Proc] = []
        # Below the ephemeral range: a restart rebinds them.
        self.grpc_port, self.metrics_port = listen_port(), listen_port()
        self.server = f"127.0.0.1:{self.grpc_port}"
        self.metrics = f"127.0.0.1:{self.metrics_port}"  # /metrics: reconcile passes (wait_passes)
        self.broker_url = ""
        self.orchestrator_overrides: dict[str, Any] = {}
        self.agent_overrides: dict[str, Any] = {}
        self._log_offsets: dict[str, int] = {}  # process name -> its log's size when it was started

    def orchestrator(self) -> Proc:
        cfg = self.tmp_path / "orchestrator.yaml"
        cfg.write_text(
            yaml.safe_dump(
                {
                    "state_dir": str(self.tmp_path / "state"),
                    "grpc_bind": self.server,
                    "metrics_bind": self.metrics,
                    "broker": {"url": self.broker_url, "topic_prefix": self.topic_prefix},
                    "node_timeout_s": 4.0,
                    "reconcile_interval_s": 0.3,
                    "resend_interval_s": 1.0,
                    "catalog": catalog_config(self.tmp_path / "publishers"),
                    **self.orchestrator_overrides,
                }
            )
        )
        offset = _log_size(self.tmp_path, "orchestrator")
        proc = Proc("orchestrator", ["orchestrator", "-c", str(cfg)], self.tmp_path)
        self.procs.append(proc)
        return proc.wait_logged("orchestrator ready", offset)

    def agent(self, i: int) -> Proc:
        cfg = self.tmp_path / f"node-{i}.yaml"
        cfg.write_text(
            yaml.safe_dump(
                {
                    "node_id": f"node-{i}",
                    "enrollment_token": enrollment_token(self.tmp_path / "state", f"node-{i}"),
                    "heartbeat_s": 0.5,
                    "broker": {"url": self.broker_url, "topic_prefix": self.topic_prefix},
                    "state_dir": str(self.tmp_path / "agents"),
                    **self.agent_overrides,
                }
            )
        )
        self._log_offsets[f"node-{i}"] = _log_size(self.tmp_path, f"node-{i}")
        proc = Proc(f"node-{i}", ["agent", "-c", str(cfg)], self.tmp_path)
        self.procs.append(proc)
        return proc

    def agents_started(self, agents: dict[str, Proc]) -> None:
        """Wait until every agent of ``agents`` (just started) says it is ready."""
        for node_id, proc in agents.items():
            proc.wait_logged(f"node {node_id} ready", self._log_offsets[node_id])

    def probe(self) -> Probe:
        return Probe(self.server)

    def start_fleet(self, nodes: int) -> dict[str, Proc]:
        """The orchestrator and ``nodes`` agents, all online and attested, the model pushed."""
        orchestrator = self.orchestrator()
        agents = {f"node-{i}": self.agent(i) for i in range(1, nodes + 1)}
        self.agents_started(agents)
        alive = [orchestrator, *agents.values()]
        with self.probe() as probe:  # the bounds only stop a hang: each wait ends when it holds
            wait_for(lambda: len(probe.online()) == nodes, 120, f"{nodes} nodes online", procs=alive)
            wait_for(lambda: len(probe.attested()) == nodes, 120, f"{nodes} nodes attested", procs=alive)
            probe.push(MODEL)
        return agents

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.log.read_text(errors='replace')[-3000:]}" for p in self.procs)


@pytest.fixture
def cluster(tmp_path: Path, topic_prefix: str) -> Iterator[Cluster]:
    c = Cluster(tmp_path, topic_prefix)
    try:
        yield c
    finally:
        for proc in reversed(c.procs):
            proc.stop()
