"""Pilot tests of the console's catalog and rollout actions, and of SLO attainment, against a real
orchestrator and real agents: the console acts, the orchestrator's own API shows the result."""

from __future__ import annotations

import grpc
import pytest
from tui_support import event_ids, eventually, infer, manifest, push, rows, vibration_model

from edgeward.v1 import api_pb2, api_pb2_grpc
from orchestrator.tui import ConsoleApp
from orchestrator.tui.screens import ConfirmScreen, WipeScreen

pytestmark = [pytest.mark.broker]
SIZE = (120, 40)
# A canary that stays on its first step: the step is observed for an hour.
CANARY = "{type: canary, steps: [50, 100], pause: 1h}"


async def _running(fleet, name: str, count: int) -> None:
    async def check() -> bool:
        dep = await fleet.deployments.Get(api_pb2.GetDeploymentRequest(name=name))
        return dep.status.running == count

    await eventually(check, timeout=30, what=f"{name}: {count} running")


async def test_wipe_a_model_version_from_the_console(console_fleet):
    models = api_pb2_grpc.ModelServiceStub(console_fleet.channel)
    await push(console_fleet.channel, vibration_model(), "vib-cnn")
    for name, zone in (("vib-a", "a"), ("vib-b", "b")):  # one replica on each node
        text = manifest(name, "vib-cnn", replicas=1, selector={"zone": zone})
        await console_fleet.deployments.Apply(api_pb2.ApplyRequest(manifest=text))
        await _running(console_fleet, name, 1)
    app = ConsoleApp(console_fleet.address)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("3")
        await eventually(
            lambda: rows(app, "model-list").get("vib-cnn:1.0.0", {}).get("RUNS ON") == "n1,n2",
            what="placements shown",
        )
        row = rows(app, "model-list")["vib-cnn:1.0.0"]
        assert (row["STATE"], row["SIGNED"], row["FROM"]) == ("published", "yes", "-")

        await pilot.press("w")
        assert isinstance(app.screen, ConfirmScreen)
        assert "its 2 replica(s) are evicted, and 2 node(s) (n1, n2) are ordered" in app.screen.detail
        assert "key is revoked" in app.screen.detail
        await pilot.press("n")  # declined: nothing happens
        model = await models.Get(api_pb2.GetModelRequest(name="vib-cnn", version="1.0.0"))
        assert model.state == api_pb2.MODEL_STATE_PUBLISHED
        assert not (await models.ListWipes(api_pb2.ListWipesRequest())).wipes

        await pilot.press("w", "y")
        await eventually(lambda: isinstance(app.screen, WipeScreen), what="wipe progress screen")
        model = await models.Get(api_pb2.GetModelRequest(name="vib-cnn", version="1.0.0"))
        assert model.state == api_pb2.MODEL_STATE_REVOKED

        async def confirmed() -> bool:
            [wipe] = (await models.ListWipes(api_pb2.ListWipesRequest())).wipes
            return wipe.done and wipe.confirmed == 2 and wipe.quarantined == 0

        await eventually(confirmed, what="both nodes confirmed the wipe in the orchestrator")
        await eventually(
            lambda: (
                {r["NODE"]: r["STATE"] for r in rows(app, "wipe-nodes").values()}
                == {"n1": "confirmed", "n2": "confirmed"}
            ),
            what="the console shows both confirmations",
        )
        assert "done" in str(app.screen.query_one("#question").render())
        await pilot.press("escape")
        await eventually(
            lambda: rows(app, "model-list")["vib-cnn:1.0.0"]["STATE"] == "revoked", what="state revoked"
        )
        assert rows(app, "model-list")["vib-cnn:1.0.0"]["RUNS ON"] == "-"
        assert "operator.model.wipe" in event_ids(app)


async def test_pause_resume_and_undo_a_rollout_from_the_console(console_fleet):
    rollouts = api_pb2_grpc.RolloutServiceStub(console_fleet.channel)
    await push(console_fleet.channel, vibration_model(), "vib-cnn", "1.0.0")
    await push(console_fleet.channel, vibration_model("float32"), "vib-cnn", "1.1.0")
    await console_fleet.deployments.Apply(
        api_pb2.ApplyRequest(manifest=manifest("vib", "vib-cnn", replicas=2, strategy=CANARY))
    )
    await _running(console_fleet, "vib", 2)
    await console_fleet.deployments.Apply(
        api_pb2.ApplyRequest(manifest=manifest("vib", "vib-cnn", "1.1.0", replicas=2, strategy=CANARY))
    )

    async def state() -> int:
        try:
            return (await rollouts.Status(api_pb2.RolloutRequest(deployment="vib"))).state
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.FAILED_PRECONDITION:
                raise
            return api_pb2.ROLLOUT_STATE_UNSPECIFIED  # rollout.none: the reconciler has not started it yet

    async def is_state(expected: int) -> bool:
        return await state() == expected

    await eventually(lambda: is_state(api_pb2.ROLLOUT_STATE_PROGRESSING), what="rollout progressing")
    app = ConsoleApp(console_fleet.address)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("2")
        await eventually(
            lambda: rows(app, "deployment-list").get("vib", {}).get("ROLLOUT") == "canary 1/2 progressing",
            what="rollout shown",
        )
        panel = str(app.screen.query_one("#rollout").render())
        assert "vib-cnn:1.0.0 → vib-cnn:1.1.0" in panel and "step 1/2 wants 1 new" in panel

        await pilot.press("p")
        assert isinstance(app.screen, ConfirmScreen) and "Pause" in app.screen.question
        await pilot.press("y")
        await eventually(lambda: is_state(api_pb2.ROLLOUT_STATE_PAUSED), what="paused in the orchestrator")
        await eventually(
            lambda: rows(app, "deployment-list")["vib"]["ROLLOUT"] == "canary 1/2 paused", what="paused shown"
        )

        await pilot.press("p")  # on a paused rollout, p resumes
        assert isinstance(app.screen, ConfirmScreen) and "Resume" in app.screen.question
        await pilot.press("y")
        await eventually(lambda: is_state(api_pb2.ROLLOUT_STATE_PROGRESSING), what="resumed")

        # undo through the command palette
        await pilot.press("ctrl+p", *"undo rollout vib")
        await eventually(lambda: _palette_ready(app), what="palette hit")
        await pilot.press("enter")
        await eventually(lambda: isinstance(app.screen, ConfirmScreen), what="confirmation")
        assert "to the stable vib-cnn:1.0.0" in app.screen.detail
        await pilot.press("y")
        await eventually(lambda: is_state(api_pb2.ROLLOUT_STATE_ROLLED_BACK), what="rolled back")
        await eventually(
            lambda: rows(app, "deployment-list")["vib"]["ROLLOUT"].endswith("rolled back"),
            what="rolled back shown",
        )
        assert {"operator.rollout.pause", "operator.rollout.resume", "operator.rollout.undo"} <= set(
            event_ids(app)
        )


def _palette_ready(app: ConsoleApp) -> bool:
    from textual.command import CommandList

    lists = app.screen.query(CommandList)
    return bool(lists) and lists.first().option_count > 0


async def test_slo_attainment_from_the_nodes_reported_latency(console_fleet):
    model = await push(console_fleet.channel, vibration_model(), "vib-cnn")
    # the same replicas measured against an SLO nobody can meet and one everybody meets
    await console_fleet.deployments.Apply(
        api_pb2.ApplyRequest(
            manifest=manifest(
                "strict", "vib-cnn", replicas=1, selector={"zone": "a"}, max_latency_ms=0.000001
            )
        )
    )
    await console_fleet.deployments.Apply(
        api_pb2.ApplyRequest(
            manifest=manifest("loose", "vib-cnn", replicas=1, selector={"zone": "a"}, max_latency_ms=60_000)
        )
    )
    await console_fleet.deployments.Apply(
        api_pb2.ApplyRequest(manifest=manifest("none", "vib-cnn", replicas=1, selector={"zone": "b"}))
    )
    for name in ("strict", "loose", "none"):
        await _running(console_fleet, name, 1)
    app = ConsoleApp(console_fleet.address)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("2")
        await eventually(lambda: len(rows(app, "deployment-list")) == 3, what="deployments listed")
        if not console_fleet.agents[0].inference_endpoint:
            pytest.fail("n1 serves no inference endpoint")
        shown = rows(app, "deployment-list")
        assert shown["none"]["SLO"] == "-"
        await infer(console_fleet.agents[0].inference_endpoint, model, 10)
        # the console re-reads deployments every few seconds: the attainment changes with telemetry
        await eventually(
            lambda: rows(app, "deployment-list")["loose"]["SLO"] == "100% 1/1", what="loose met", timeout=30
        )
        assert rows(app, "deployment-list")["strict"]["SLO"] == "0% 0/1"
        dep = await console_fleet.deployments.Get(api_pb2.GetDeploymentRequest(name="strict"))
        assert dep.status.HasField("slo_attainment") and dep.status.slo_attainment == 0.0
        assert (dep.status.slo_replicas_measured, dep.status.slo_replicas_met) == (1, 0)
        none = await console_fleet.deployments.Get(api_pb2.GetDeploymentRequest(name="none"))
        assert not none.status.HasField("slo_attainment")
