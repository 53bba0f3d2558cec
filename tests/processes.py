"""Child processes of the test suite and the benches: ``python -m edgeward ...`` that die with us.

Shared by tests/integration (process tests, rollout restart), tests/faults and bench/faults.py.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

T = TypeVar("T")

#: Bound on a child's own start (imports, measuring its code, opening the store) before it is ready.
#: It only stops a hang: a wait returns as soon as the process is ready, and fails at once if it
#: exits. On a loaded machine an orchestrator took 28 s to start.
STARTUP_S = 180.0


#: Ports this process has handed out: free when asked is not enough, since two children given
#: ports before either binds would otherwise race for the same one (seen: a replica's metrics port
#: equal to another's gRPC port, and the second to bind failed to start).
_handed_out: set[int] = set()


def listen_port(count: int = 1) -> int:
    """A free loopback TCP port below the ephemeral range, for a child process to listen on later
    (the first of ``count`` consecutive free ones), never one handed out before by this process.
    An ephemeral port (``bind(0)``) is no good for that: on a busy machine an outgoing connection
    may take it before the child binds it (or a client retrying a connection to it may connect to
    itself); ports below the range are never handed to outgoing connections."""
    low = 32768
    with contextlib.suppress(OSError, ValueError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(200):
        port = random.randrange(max(1024, low - 12000), low - count + 1)
        ports = range(port, port + count)
        if not _handed_out.intersection(ports) and all(_bindable(p) for p in ports):
            _handed_out.update(ports)
            return port
    raise RuntimeError(f"no {count} consecutive free loopback ports below {low}")


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def wait_for(
    check: Callable[[], T],
    timeout: float,
    what: str,
    *,
    procs: Iterable[Proc] = (),
    retry: tuple[type[BaseException], ...] = (grpc.RpcError,),
    interval: float = 0.1,
) -> T:
    """Poll ``check`` until it returns something truthy (``retry`` errors count as 'not yet').
    Fails at once, with the tail of its log, when one of ``procs`` has exited: a dead process is no
    reason to wait out ``timeout``, which only bounds a hang."""
    watched = list(procs)
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        for proc in watched:
            proc.check_alive(f"waiting for {what}")
        try:
            value = check()
            if value:
                return value
        except retry as err:
            last = err
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what} (last error: {last})")
        time.sleep(interval)


def scrape(address: str) -> str:
    """The body of ``GET /metrics`` at ``address`` (``HOST:PORT``, or ``unix:PATH`` of a relay)."""
    if address.startswith("unix:"):
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(5)
        sock.connect(address.removeprefix("unix:"))
    else:
        host, port = address.rsplit(":", 1)
        sock = socket.create_connection((host, int(port)), timeout=5)
    with sock:
        sock.sendall(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise OSError(f"GET /metrics at {address}: {head[:80]!r}")
    return body.decode()


def metric(address: str, name: str) -> float:
    """The value of the unlabelled series ``name`` on the /metrics at ``address``."""
    for line in scrape(address).splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    raise AssertionError(f"no series {name} on the /metrics at {address}")


def wait_passes(
    metrics: str, count: int = 3, *, procs: Iterable[Proc] = (), timeout: float = STARTUP_S
) -> None:
    """Wait for ``count`` whole reconcile passes of the orchestrator whose /metrics is at ``metrics``
    (``edgeward_reconcile_passes_total``) that started after this call: a pass already running read
    the store before it, so the counter must move by ``count + 1``.

    For checks that something does *not* happen: a fixed sleep proves nothing on a machine so loaded
    that the control loop did not run meanwhile; counted passes do, on any machine."""
    name = "edgeward_reconcile_passes_total"
    target = metric(metrics, name) + count + 1
    wait_for(
        lambda: metric(metrics, name) >= target,
        timeout,
        f"{count} reconcile passes",
        procs=procs,
        retry=(OSError,),
    )


class Proc:
    """``python -m edgeward ARGS`` as a child process (optionally behind ``prefix``, e.g.
    ``ip netns exec NS``), logging to ``log_dir/NAME.log``; it ends with the test process even
    if that is killed (EDGEWARD_DIE_WITH_PARENT)."""

    def __init__(self, name: str, args: list[str], log_dir: Path, prefix: tuple[str, ...] = ()) -> None:
        self.name = name
        self.log = log_dir / f"{name}.log"
        self.stopped = False  # by the test (stop, kill9): an exit it expects
        with self.log.open("ab") as fh:
            self.popen = subprocess.Popen(
                [*prefix, sys.executable, "-m", "edgeward", *args],
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "EDGEWARD_DIE_WITH_PARENT": str(os.getpid())},
            )

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def check_alive(self, doing: str = "") -> None:
        """Fail, with the tail of its log, if the process has exited."""
        code = self.popen.poll()
        if code is not None:
            during = f" while {doing}" if doing else ""
            raise AssertionError(f"{self.name} exited with {code}{during}:\n{self.tail()}")

    def wait_logged(self, marker: str, offset: int = 0, timeout: float = STARTUP_S) -> Proc:
        """Wait until the process logs ``marker`` (after byte ``offset`` of its log: a restarted
        process appends to the same file); fail at once, with its log, if it exits first."""
        deadline = time.monotonic() + timeout
        while True:
            with self.log.open("rb") as fh:
                fh.seek(offset)
                if marker.encode() in fh.read():
                    return self
            self.check_alive(f"waiting for {marker!r}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} did not log {marker!r} in {timeout:g} s:\n{self.tail()}")
            time.sleep(0.1)

    def wait_serving(self, address: str, timeout: float = STARTUP_S) -> Proc:
        """Wait until the gRPC server of this process at ``address`` says SERVING (standard health
        service: every API call works from then on); fail at once, with its log, if it exits."""

        def serving() -> bool:
            with grpc.insecure_channel(address) as channel:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            return reply.status == health_pb2.HealthCheckResponse.SERVING

        wait_for(serving, timeout, f"{self.name} serving on {address}", procs=[self])
        return self

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s."""
        self.stopped = True
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()

    def pause(self) -> None:
        """SIGSTOP: the process stays, frozen (its sockets open, its timers stopped)."""
        self.popen.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.popen.send_signal(signal.SIGCONT)

    def kill9(self) -> None:
        self.stopped = True
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
        self.popen.wait()
