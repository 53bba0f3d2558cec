"""A private NATS cluster for the tests and benches: Debian's ``nats-server`` (``make test``
installs it), three processes on random loopback ports, routed to each other, clustered JetStream,
and the MQTT gateway of each server enabled (MQTT 3.1.1; JetStream keeps the QoS 1 sessions and
retained messages, replicated over the three servers). An MQTT client may connect to any of them.

    cluster = NatsCluster(workdir); cluster.start(); ... cluster.mqtt_urls; cluster.stop()
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

from processes import listen_port

LOOPBACK = "127.0.0.1"


def find_nats_server() -> str | None:
    return shutil.which("nats-server", path="/usr/sbin:/usr/bin:/usr/local/bin:/usr/local/sbin")


class NatsCluster:
    def __init__(self, workdir: Path, size: int = 3) -> None:
        self.workdir = workdir
        self.size = size
        self.client_ports = [listen_port() for _ in range(size)]
        self.route_ports = [listen_port() for _ in range(size)]
        self.mqtt_ports = [listen_port() for _ in range(size)]
        self.procs: list[subprocess.Popen | None] = [None] * size

    @property
    def mqtt_urls(self) -> list[str]:
        return [f"mqtt://{LOOPBACK}:{p}" for p in self.mqtt_ports]

    @property
    def client_urls(self) -> list[str]:
        """The servers' NATS client ports (JetStream: broker.ingest 'jetstream')."""
        return [f"nats://{LOOPBACK}:{p}" for p in self.client_ports]

    def _config(self, i: int) -> Path:
        routes = ", ".join(f"nats-route://{LOOPBACK}:{p}" for p in self.route_ports)
        conf = self.workdir / f"nats-{i}.conf"
        conf.write_text(
            f"server_name: edgeward-{i}\n"
            f"listen: {LOOPBACK}:{self.client_ports[i]}\n"
            f"jetstream {{ store_dir: '{self.workdir / f'js-{i}'}', max_memory_store: 64MB, "
            "max_file_store: 1GB }\n"
            f"cluster {{ name: edgeward, listen: {LOOPBACK}:{self.route_ports[i]}, routes: [{routes}] }}\n"
            f"mqtt {{ listen: {LOOPBACK}:{self.mqtt_ports[i]} }}\n"
        )
        return conf

    def start(self) -> None:
        binary = find_nats_server()
        if binary is None:
            raise RuntimeError("nats-server not installed: apt-get install nats-server")
        for i in range(self.size):
            self.start_one(i, binary)
        for port in self.mqtt_ports:
            self._wait_port(port)
        for port in self.mqtt_ports:
            self._wait_mqtt(port)

    def start_one(self, i: int, binary: str | None = None) -> None:
        with (self.workdir / f"nats-{i}.log").open("ab") as log:
            self.procs[i] = subprocess.Popen(
                [binary or find_nats_server() or "nats-server", "-c", str(self._config(i))],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    def _wait_port(self, port: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(p is not None and p.poll() is not None for p in self.procs):
                raise RuntimeError(f"a nats-server exited; see {self.workdir}/nats-*.log")
            try:
                socket.create_connection((LOOPBACK, port), 0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"nats-server did not listen on {port}")

    def _wait_mqtt(self, port: int, timeout: float = 60.0) -> None:
        """Until the server's MQTT gateway accepts a session: it listens before the cluster's
        JetStream (where it keeps sessions) is ready, and closes the connections it gets meanwhile
        (a client started then fails with "connection closed before CONNACK")."""
        client_id = f"edgeward-ready-{port}".encode()
        variable = b"\x00\x04MQTT\x04\x02\x00\x3c"  # MQTT 3.1.1, clean session, keepalive 60 s
        payload = len(client_id).to_bytes(2, "big") + client_id
        connect = bytes([0x10, len(variable) + len(payload)]) + variable + payload
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            if any(p is not None and p.poll() is not None for p in self.procs):
                raise RuntimeError(f"a nats-server exited; see {self.workdir}/nats-*.log")
            try:
                with socket.create_connection((LOOPBACK, port), 2.0) as sock:
                    sock.settimeout(5.0)
                    sock.sendall(connect)
                    connack = sock.recv(4)
                    if connack == b"\x20\x02\x00\x00":  # CONNACK, accepted
                        sock.sendall(b"\xe0\x00")  # DISCONNECT
                        return
                    last = f"answered {connack!r}"
            except OSError as err:
                last = str(err)
            time.sleep(0.2)
        raise RuntimeError(f"nats-server's MQTT gateway on {port} accepted no session ({last})")

    def stop(self) -> None:
        for proc in self.procs:
            if proc is not None and proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            if proc is None:
                continue
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
