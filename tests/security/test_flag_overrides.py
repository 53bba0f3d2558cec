"""A command-line flag passes every check the config file's value would: ``--broker-url`` with a
plaintext ``mqtt://`` URL is refused when TLS is configured, for the orchestrator and the agent
(both once took the flag over the validated file without checking it again)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from node_agent.config import load_agent_config
from orchestrator.config import load_config

PLAIN = "mqtt://127.0.0.1:1883"
TLS_URL = "mqtts://127.0.0.1:8883"


def edgeward(*args: str) -> subprocess.CompletedProcess[str]:
    """The CLI in a process of its own (``edgeward agent`` marks its process as the agent's alone)."""
    return subprocess.run(
        [sys.executable, "-m", "edgeward", *args], capture_output=True, text=True, timeout=120, check=False
    )


def _orchestrator_config(tmp_path: Path) -> Path:
    path = tmp_path / "orchestrator.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "state_dir": str(tmp_path / "state"),
                "security": {"pki_dir": str(tmp_path / "pki"), "identity": "orchestrator"},
                "broker": {"url": TLS_URL, "topic_prefix": "site-a/edgeward/v1"},
            }
        )
    )
    return path


def _agent_config(tmp_path: Path) -> Path:
    path = tmp_path / "agent.yaml"
    tls = {name: str(tmp_path / name) for name in ("ca_file", "cert_file", "key_file")}
    path.write_text(
        yaml.safe_dump(
            {
                "node_id": "n1",
                "state_dir": str(tmp_path / "agent"),
                "tls": tls,
                "broker": {"url": TLS_URL, "topic_prefix": "site-a/edgeward/v1"},
            }
        )
    )
    return path


def test_the_orchestrator_refuses_a_plaintext_broker_flag_with_tls(tmp_path):
    config = _orchestrator_config(tmp_path)
    done = edgeward("orchestrator", "-c", str(config), "--broker-url", PLAIN)
    assert done.returncode == 1
    err = " ".join(done.stderr.split())  # the console wraps long lines
    assert (
        "invalid orchestrator config: broker.url: plaintext mqtt:// is refused when TLS is configured" in err
    )
    assert not (tmp_path / "state").exists()  # refused before anything started
    # A flag that passes keeps the rest of the file's broker section.
    loaded = load_config(config, broker={"url": "mqtts://broker.example:8883", "embedded_port": None})
    assert (loaded.broker.url, loaded.broker.topic_prefix) == (
        "mqtts://broker.example:8883",
        "site-a/edgeward/v1",
    )


def test_the_agent_refuses_a_plaintext_broker_flag_with_tls(tmp_path):
    config = _agent_config(tmp_path)
    done = edgeward("agent", "-c", str(config), "--broker-url", PLAIN)
    assert done.returncode == 2
    err = done.stderr
    assert f"{config}: broker.url: plaintext mqtt:// is refused when TLS is configured" in err
    loaded = load_agent_config(config, broker_url="mqtts://broker.example:8883")
    assert (loaded.broker.url, loaded.broker.topic_prefix) == (
        "mqtts://broker.example:8883",
        "site-a/edgeward/v1",
    )
