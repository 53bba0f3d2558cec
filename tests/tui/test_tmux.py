"""The real ``edgeward tui`` and ``edgeward up --tui`` in a terminal (tmux): keys in, screen out."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edgeward.v1 import api_pb2, api_pb2_grpc

TMUX = shutil.which("tmux")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.broker,
    pytest.mark.skipif(TMUX is None, reason="tmux not installed: apt-get install tmux (make system-deps)"),
]


class Terminal:
    """One tmux session on a private server socket, 100x30."""

    def __init__(self, socket: Path) -> None:
        self.socket = socket

    def tmux(self, *args: str) -> str:
        assert TMUX is not None
        out = subprocess.run(
            [TMUX, "-S", str(self.socket), *args], capture_output=True, text=True, timeout=10, check=True
        )
        return out.stdout

    def start(self, argv: list[str], cwd: Path) -> None:
        # COLUMNS/LINES, where the session's environment has them, may still say the size the
        # window had before -x/-y applied, and Textual would believe them over the terminal. The
        # exit status stays on screen, so a test can tell a clean quit from a crash.
        command = f"env -u COLUMNS -u LINES {shlex.join(argv)}; echo EXIT=$?; sleep 60"
        self.tmux("new-session", "-d", "-s", "t", "-x", "100", "-y", "30", "-c", str(cwd), command)

    def keys(self, *keys: str) -> None:
        self.tmux("send-keys", "-t", "t", *keys)

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", "t")

    def wait_for(self, check: Callable[[str], bool], what: str, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen()
            if check(screen):
                return screen
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; the screen shows:\n{screen}")
            time.sleep(0.2)


@pytest.fixture
def terminal(tmp_path: Path) -> Iterator[Terminal]:
    term = Terminal(tmp_path / "tmux.sock")
    try:
        yield term
    finally:
        subprocess.run(
            [TMUX or "tmux", "-S", str(term.socket), "kill-server"], capture_output=True, check=False
        )


def test_edgeward_tui_against_a_running_orchestrator(terminal, demo_fleet, tmp_path):
    terminal.start([sys.executable, "-m", "edgeward", "tui", "--server", demo_fleet.address], tmp_path)
    screen = terminal.wait_for(lambda s: "edge-3" in s and "Cordon/uncordon" in s, "the fleet and the footer")
    assert "edge-1" in screen and "fpga-pynq (simulated)" in screen and "modelled" in screen, screen

    terminal.keys("c")
    terminal.wait_for(lambda s: "Cordon node edge-1?" in s, "the confirmation")
    terminal.keys("y")
    with demo_fleet.channel() as channel:
        nodes = api_pb2_grpc.NodeServiceStub(channel)
        try:
            deadline = time.monotonic() + 10
            while not nodes.Get(api_pb2.GetNodeRequest(node_id="edge-1"), timeout=5).cordoned:
                assert time.monotonic() < deadline, "edge-1 was not cordoned"
                time.sleep(0.1)
            terminal.wait_for(lambda s: "cordoned" in s, "the node's status")
        finally:  # the demo fleet is shared: leave it as found
            nodes.Cordon(api_pb2.CordonRequest(node_id="edge-1", cordon=False), timeout=5)

    terminal.keys("2")
    screen = terminal.wait_for(lambda s: "line-camera" in s, "the deployments tab")
    assert "vibration-monitor" in screen and "3/3" in screen and "scheduler.filter.selector" in screen
    terminal.keys("q")
    terminal.wait_for(lambda s: "EXIT=0" in s, "a clean exit")


def test_edgeward_up_with_the_console(terminal, tmp_path):
    argv = [
        sys.executable,
        "-m",
        "edgeward",
        "up",
        "--tui",
        "--nodes",
        "2",
        "--state-dir",
        str(tmp_path / "up"),
    ]
    terminal.start(argv, tmp_path)
    terminal.wait_for(lambda s: "node-1" in s and "modelled" in s, "the console on the demo", timeout=90)
    terminal.keys("2")
    terminal.wait_for(lambda s: "vibration-monitor" in s and "3/3" in s, "the demo's deployments")
    terminal.keys("q")
    screen = terminal.wait_for(lambda s: "EXIT=" in s, "edgeward up to finish", timeout=60)
    assert "EXIT=0" in screen and "inferences:" in screen, screen
