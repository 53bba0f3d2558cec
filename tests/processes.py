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
from pathlib import Path


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def listen_port() -> int:
    """A free loopback TCP port below the ephemeral range, for a child process to listen on later.
    ``free_port`` hands out ephemeral ports: on a busy machine an outgoing connection may take one
    before the child binds it; ports below the range are never handed to outgoing connections."""
    low = 32768
    with contextlib.suppress(OSError, ValueError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(200):
        port = random.randrange(max(1024, low - 12000), low)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    return free_port()


class Proc:
    """``python -m edgeward ARGS`` as a child process (optionally behind ``prefix``, e.g.
    ``ip netns exec NS``), logging to ``log_dir/NAME.log``; it ends with the test process even
    if that is killed (EDGEWARD_DIE_WITH_PARENT)."""

    def __init__(self, name: str, args: list[str], log_dir: Path, prefix: tuple[str, ...] = ()) -> None:
        self.name = name
        self.log = log_dir / f"{name}.log"
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

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()

    def kill9(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
        self.popen.wait()
