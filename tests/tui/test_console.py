"""Pilot tests of the operator console against a real orchestrator and real agents."""

from __future__ import annotations

import pytest
from processes import listen_port
from textual.widgets import Input, Sparkline
from tui_support import event_ids, eventually, infer, manifest, push, rows, vibration_model

from edgeward.v1 import api_pb2
from orchestrator.client import ATTESTATION_SERVICE, AsyncEdgewardClient
from orchestrator.config import BrokerConfig, OrchestratorConfig
from orchestrator.server import Orchestrator
from orchestrator.tui import ConsoleApp
from orchestrator.tui.screens import ApplyScreen, ConfirmScreen, NodeDetailScreen
from orchestrator.tui.widgets import ConnectionBanner

pytestmark = [pytest.mark.broker]
SIZE = (120, 40)


async def test_fleet_shows_the_real_nodes(console_fleet):
    app = ConsoleApp(console_fleet.address)
    async with app.run_test(size=SIZE):
        await eventually(lambda: set(rows(app, "nodes")) == {"n1", "n2"}, what="both nodes listed")
        await eventually(
            lambda: all("modelled" in r["POWER W"] for r in rows(app, "nodes").values()), what="power"
        )
        n1 = rows(app, "nodes")["n1"]
        assert n1 == {
            "NODE": "n1",
            "STATUS": "online",
            "TRUST": n1["TRUST"],  # the attestation tier where attestation is served, else "-"
            "POWER W": n1["POWER W"],
            "REPL": "0",
            "ACCELERATORS": "cpu-litert",
            "PROFILE": "arm-sbc",
        }
        assert not app.screen.query_one(ConnectionBanner).has_class("-shown")
        # the Attestation tab and its palette entries exist exactly where the service is served
        client = AsyncEdgewardClient(console_fleet.address)
        try:
            served = ATTESTATION_SERVICE in await client.services()
        finally:
            await client.close()
        assert bool(app.screen.query("TabPane#attestation")) is served
        titles = [c.title for c in app.get_system_commands(app.screen)]
        assert ("Show attestation" in titles) is served and "Cordon node n1" in titles


async def test_cordon_and_uncordon_change_the_orchestrator(console_fleet):
    app = ConsoleApp(console_fleet.address)
    async with app.run_test(size=SIZE) as pilot:
        await eventually(lambda: "n1" in rows(app, "nodes"), what="n1 listed")
        await pilot.press("c")
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("n")  # declined: nothing happens
        assert not (await console_fleet.nodes.Get(api_pb2.GetNodeRequest(node_id="n1"))).cordoned

        await pilot.press("c")
        await pilot.press("y")

        async def cordoned(expected: bool) -> bool:
            node = await console_fleet.nodes.Get(api_pb2.GetNodeRequest(node_id="n1"))
            return node.cordoned is expected

        await eventually(lambda: cordoned(True), what="n1 cordoned in the orchestrator")
        await eventually(lambda: rows(app, "nodes")["n1"]["STATUS"] == "cordoned", what="status cordoned")
        assert {"operator.node.cordon", "node.cordoned"} <= set(event_ids(app))

        # the same through the command palette
        await pilot.press("ctrl+p")
        await pilot.press(*"uncordon node n1")
        await eventually(lambda: _palette_ready(app), what="palette hit")
        await pilot.press("enter")
        await eventually(lambda: isinstance(app.screen, ConfirmScreen), what="confirmation")
        await pilot.press("y")
        await eventually(lambda: cordoned(False), what="n1 uncordoned in the orchestrator")
        await eventually(lambda: rows(app, "nodes")["n1"]["STATUS"] == "online", what="status online again")


def _palette_ready(app: ConsoleApp) -> bool:
    from textual.command import CommandList

    lists = app.screen.query(CommandList)
    return bool(lists) and lists.first().option_count > 0


async def test_deployment_applied_elsewhere_appears_live(console_fleet):
    app = ConsoleApp(console_fleet.address)
    async with app.run_test(size=SIZE) as pilot:
        await eventually(lambda: app.connected, what="connected")
        await pilot.press("2")
        assert rows(app, "deployment-list") == {}
        await push(console_fleet.channel, vibration_model(), "vib-cnn")
        await console_fleet.deployments.Apply(
            api_pb2.ApplyRequest(manifest=manifest("vib", "vib-cnn", replicas=2))
        )
        await eventually(lambda: "vib" in rows(app, "deployment-list"), what="deployment listed")
        await eventually(
            lambda: rows(app, "deployment-list")["vib"]["READY"] == "2/2", what="2/2 running", timeout=30
        )
        assert rows(app, "deployment-list")["vib"]["PHASES"] == "2 running"
        assert sorted(r["NODE"] for r in rows(app, "replicas").values()) == ["n1", "n2"]
        assert {"deployment.created", "replica.running"} <= set(event_ids(app))
        # the orchestrator's own notification arrives through EventService.Watch
        await eventually(
            lambda: "deployment.applied" in event_ids(app), what="deployment.applied notification"
        )

        # a selector nobody matches: the pending reason id is shown as the orchestrator gives it
        await console_fleet.deployments.Apply(
            api_pb2.ApplyRequest(manifest=manifest("vib", "vib-cnn", replicas=2, selector={"zone": "z"}))
        )
        await eventually(
            lambda: "scheduler.filter.selector" in rows(app, "deployment-list")["vib"]["PENDING REASONS"],
            what="pending reason",
        )
        await pilot.press("4")
        await pilot.press("slash", *"alerts selector", "enter")
        shown = rows(app, "event-list")
        assert shown and all(
            r["SEV"] in ("warning", "error") and "selector" in r["MESSAGE"] for r in shown.values()
        )

        # delete it from the console
        await pilot.press("2", "x")
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("y")

        async def gone() -> bool:
            resp = await console_fleet.deployments.List(api_pb2.ListDeploymentsRequest())
            return not resp.deployments

        await eventually(gone, what="deployment deleted in the orchestrator")
        await eventually(lambda: rows(app, "deployment-list") == {}, what="row removed")


async def test_apply_a_manifest_file_and_drain(console_fleet, tmp_path):
    await push(console_fleet.channel, vibration_model(), "vib-cnn")
    bad = tmp_path / "bad.yaml"
    bad.write_text(manifest("vib", "vib-cnn", replicas=-1))
    good = tmp_path / "vib.yaml"
    good.write_text(manifest("vib", "vib-cnn", replicas=2))
    app = ConsoleApp(console_fleet.address, apply_path=str(bad))
    async with app.run_test(size=SIZE) as pilot:
        await eventually(lambda: app.connected, what="connected")
        await pilot.press("a")
        assert isinstance(app.screen, ApplyScreen)
        await pilot.press("enter")
        await eventually(lambda: "spec.replicas" in _detail(app), what="field error shown")
        assert "INVALID_ARGUMENT" in _detail(app)

        app.screen.query_one("#path", Input).value = str(good)
        await pilot.press("enter")
        await eventually(lambda: "will create deployment/vib" in _detail(app), what="dry-run summary")
        resp = await console_fleet.deployments.List(api_pb2.ListDeploymentsRequest())
        assert not resp.deployments, "a dry run changes nothing"
        await pilot.press("enter")  # the Apply button has the focus
        await eventually(lambda: "vib" in rows(app, "deployment-list"), what="applied")
        await eventually(
            lambda: rows(app, "deployment-list")["vib"]["READY"] == "2/2", what="running", timeout=30
        )

        # drain n1: it is cordoned and its replica evicted (the scheduler places it on n2)
        await pilot.press("1")
        await eventually(lambda: rows(app, "nodes")["n1"]["REPL"] == "1", what="n1 runs one replica")
        await pilot.press("n")
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("y")

        async def drained() -> bool:
            node = await console_fleet.nodes.Get(api_pb2.GetNodeRequest(node_id="n1"))
            return node.cordoned and not node.replicas

        await eventually(drained, what="n1 drained")
        await eventually(lambda: rows(app, "nodes")["n1"]["REPL"] == "0", what="table shows no replicas")
        assert "replica.evicted" in event_ids(app)


def _detail(app: ConsoleApp) -> str:
    return str(app.screen.query_one("#detail").render())


async def test_node_detail_has_live_sparklines(console_fleet):
    model = await push(console_fleet.channel, vibration_model(), "vib-cnn")
    await console_fleet.deployments.Apply(
        api_pb2.ApplyRequest(manifest=manifest("vib", "vib-cnn", replicas=1, selector={"zone": "a"}))
    )
    app = ConsoleApp(console_fleet.address)
    async with app.run_test(size=SIZE) as pilot:
        await eventually(lambda: rows(app, "nodes").get("n1", {}).get("REPL") == "1", what="replica on n1")
        await pilot.press("enter")  # n1 is the first row
        assert isinstance(app.screen, NodeDetailScreen) and app.screen.node_id == "n1"
        power = app.screen.query_one("#power Sparkline", Sparkline)
        await eventually(lambda: len(power.data or []) >= 2, what="power history")
        before = len(power.data or [])
        await eventually(lambda: len(power.data or []) > before, what="a live power point")

        await infer(console_fleet.agents[0].inference_endpoint, model, 20)
        throughput = app.screen.query_one("#throughput Sparkline", Sparkline)
        await eventually(lambda: max(throughput.data or [0]) > 0, what="throughput point")
        [replica] = rows(app, "node-replicas").values()
        assert (replica["DEPLOYMENT"], replica["MODEL"], replica["PHASE"]) == (
            "vib",
            "vib-cnn:1.0.0",
            "Running",
        )
        await eventually(
            lambda: next(iter(rows(app, "node-replicas").values()))["INFERENCES"] == "20", what="count"
        )
        await pilot.press("escape")
        assert not isinstance(app.screen, NodeDetailScreen)


async def test_banner_when_unreachable_then_reconnects(tmp_path):
    # Below the ephemeral range: the console keeps connecting to the port while nothing listens on it,
    # and a client connecting to an ephemeral port nobody listens on can connect to itself.
    port = listen_port()
    config = OrchestratorConfig(
        state_dir=tmp_path / "orch", grpc_bind=f"127.0.0.1:{port}", broker=BrokerConfig()
    )
    app = ConsoleApp(f"127.0.0.1:{port}")
    async with app.run_test(size=(80, 24)) as pilot:
        banner = app.screen.query_one(ConnectionBanner)
        await eventually(lambda: banner.has_class("-down"), what="unreachable banner")
        assert "unreachable" in str(banner.render())
        assert "console.unreachable" in event_ids(app)

        async with Orchestrator(config):
            await pilot.press("r")  # retry now rather than after the backoff
            await eventually(lambda: app.connected, what="reconnected")
            assert not banner.has_class("-shown")
        # the orchestrator went away under a connected console
        await eventually(lambda: banner.has_class("-down"), what="banner after the orchestrator stopped")
        assert not app.connected
        async with Orchestrator(config):
            await eventually(lambda: app.connected, timeout=15, what="reconnected by the backoff timer")
            assert not banner.has_class("-shown")
        assert event_ids(app).count("console.connected") == 2
