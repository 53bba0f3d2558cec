"""Child processes of the test suite and the benches: ``python -m edgeward ...`` that die with us.

Shared by tests/integration (process tests, rollout restart), tests/faults and bench/faults.py.
"""

from __future__ import annotations

import os
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
