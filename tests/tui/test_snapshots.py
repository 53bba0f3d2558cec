"""SVG snapshots of every console screen at 80x24 and 120x40: the Attestation tab against
``attested_fleet``, every other screen against the session's demo fleet.

The fleet is real (orchestrator and agents as processes) and converged, with fixed node ids and
idle nodes, so what the screens show is the same on every run except for a few things, frozen
here: the clock (the app takes it as a parameter), the loopback ports and the test publisher's
key id (replaced in the SVG by fixed ones of the same length), how long a model version has run,
and a node's sparklines (their length and first points depend on
when the console started; the node-detail snapshot replaces them with an idle node's steady
series after stopping live updates). Update with ``pytest tests/tui --snapshot-update``.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from datetime import datetime

import pytest
from tui_support import PUBLISHER

from edgeward.v1 import api_pb2, api_pb2_grpc
from orchestrator.tui import ConsoleApp
from orchestrator.tui.model import HISTORY, NodeHistory
from orchestrator.tui.screens import NodeDetailScreen

pytest.importorskip("pytest_textual_snapshot", reason="pip install pytest-textual-snapshot")
from pytest_textual_snapshot import SVGImageExtension

pytestmark = [pytest.mark.broker, pytest.mark.slow]

SIZES = [pytest.param((80, 24), id="80x24"), pytest.param((120, 40), id="120x40")]
FIXED_TIME = datetime(2026, 1, 1, 9, 30, 0)
ORCHESTRATOR_PORT = "50051"


@pytest.fixture
def snap(snapshot, demo_fleet, tmp_path):
    """``snap(size, steps)``: run the console on the demo fleet, run ``steps`` with its pilot once
    it shows the whole fleet, and compare the masked SVG with the committed snapshot."""
    masks = {demo_fleet.address.rsplit(":", 1)[1]: ORCHESTRATOR_PORT}
    with demo_fleet.channel() as channel:
        nodes = api_pb2_grpc.NodeServiceStub(channel).List(api_pb2.ListNodesRequest(), timeout=5).nodes
    for i, node in enumerate(sorted(nodes, key=lambda n: n.id), 1):
        masks[node.inventory.inference_endpoint.rsplit(":", 1)[1]] = f"5010{i}"
    assert all(len(k) == len(v) for k, v in masks.items()), "masks must keep the layout"
    key_id = PUBLISHER.key_id  # the tests' publisher key is made afresh on every run
    fixed_key_id = "0123456789abcdef"[: len(key_id)]

    def compare(size: tuple[int, int], steps: Callable[..., Awaitable[None]] | None = None) -> bool:
        app = ConsoleApp(demo_fleet.address, clock=lambda: FIXED_TIME)

        async def pilot_run(pilot) -> None:
            await _until(lambda: _settled(app))
            if steps is not None:
                await steps(pilot)
            # tables measure their columns when idle: let them, and any animation, finish
            await pilot.pause(0.3)
            await pilot.wait_for_scheduled_animations()
            await pilot.pause()
            app.exit(app.export_screenshot())

        svg = app.run(headless=True, size=size, auto_pilot=pilot_run)
        assert svg is not None
        for port, fixed in masks.items():
            svg = svg.replace(f"127.0.0.1:{port}", f"127.0.0.1:{fixed}")
        svg = svg.replace(key_id, fixed_key_id)
        (tmp_path / "actual.svg").write_text(svg)  # to look at when the comparison fails
        return snapshot.use_extension(SVGImageExtension) == svg

    return compare


def _settled(app: ConsoleApp) -> bool:
    s = app.state
    return (
        app.connected
        and not any(w.group == "connect" and w.is_running for w in app.workers)
        and len(s.nodes) == 3
        and len(s.deployments) == 3
        and len(s.models) == 3
        and len(s.placements) == 1  # where the versions of vibration-cnn run
        and all(n.HasField("telemetry") for n in s.nodes.values())
    )


async def _until(check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "the console did not show the demo fleet in time"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("size", SIZES)
def test_fleet(snap, size):
    assert snap(size)


@pytest.mark.parametrize("size", SIZES)
def test_deployments(snap, size):
    async def steps(pilot):
        await pilot.press("2", "down")  # line-camera: its replicas cannot be placed

    assert snap(size, steps)


@pytest.mark.parametrize("size", SIZES)
def test_models(snap, size):
    async def steps(pilot):
        app: ConsoleApp = pilot.app
        app.stop_live()
        await _until(lambda: not any(w.is_running for w in app.workers))
        # how long a version has run depends on when the fleet started: five minutes, frozen
        since = int(FIXED_TIME.timestamp() * 1000) - 300_000
        for placed in app.state.placements.values():
            for p in placed:
                p.since_unix_ms = since
        app.refresh_views()
        await pilot.press("3", "down", "down")  # vibration-cnn:1.1.0

    assert snap(size, steps)


@pytest.mark.parametrize("size", SIZES)
def test_events(snap, size):
    async def steps(pilot):
        await pilot.press("4")

    assert snap(size, steps)


@pytest.mark.parametrize("size", SIZES)
def test_node_detail(snap, size):
    async def steps(pilot):
        app: ConsoleApp = pilot.app
        await pilot.press("down", "enter")  # edge-2, with a simulated FPGA
        assert isinstance(app.screen, NodeDetailScreen)
        app.stop_live()
        await _until(lambda: not any(w.is_running for w in app.workers))
        node = app.state.nodes["edge-2"]
        steady = NodeHistory()
        steady.power_w = deque([round(node.telemetry.power_w, 1)] * HISTORY, maxlen=HISTORY)
        steady.latency_p95_ms = deque([0.0] * HISTORY, maxlen=HISTORY)
        steady.throughput = deque([0.0] * HISTORY, maxlen=HISTORY)
        app.state.history["edge-2"] = steady
        app.refresh_views()

    assert snap(size, steps)


@pytest.mark.parametrize("size", SIZES)
async def test_attestation(attested_fleet, snapshot, size):
    """The tab exists only where AttestationService is served (see test_attestation.py)."""
    app = ConsoleApp(attested_fleet.address, clock=lambda: FIXED_TIME)
    async with app.run_test(size=size) as pilot:
        await _until(lambda: app.connected and len(app.state.attestations) == 2 and len(app.state.nodes) == 2)
        await pilot.press("5")
        await pilot.pause(0.3)
        app.clear_notifications()  # the alert's toast would be timing-dependent
        await pilot.pause()
        svg = app.export_screenshot().replace(attested_fleet.address, f"127.0.0.1:{ORCHESTRATOR_PORT}")
        assert snapshot.use_extension(SVGImageExtension) == svg
