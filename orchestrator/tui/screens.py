"""Pushed screens: confirmation, apply-a-manifest, a wipe's progress, and a node's detail with live
sparklines and early-exit distribution."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, ClassVar

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen, Screen
from textual.widgets import Button, Footer, Header, Input, Label, Sparkline, Static

from edgeward.v1 import api_pb2, node_pb2

from ..client import AsyncEdgewardClient, ClientError
from .messages import Action, ActionRequested, BannerMounted, StateChanged
from .model import (
    ConsoleState,
    accelerator_label,
    exit_distributions,
    phase_name,
    source_name,
    state_name,
)
from .views import PHASE_STYLE
from .widgets import Cell, ConnectionBanner, LiveTable

#: One call on the console's current connection (``ConsoleApp.call``): it starts the reconnect
#: when the orchestrator is unreachable.
Call = Callable[[Callable[[AsyncEdgewardClient], Awaitable[Any]]], Awaitable[Any]]

MODAL_CSS = """
{name} {{
    align: center middle;
}}
{name} > Vertical {{
    width: 72;
    max-width: 100%;
    height: auto;
    max-height: 100%;
    border: thick $primary;
    background: $surface;
    padding: 0 1;
}}
{name} .buttons {{
    height: auto;
    align-horizontal: right;
}}
{name} Button {{
    margin-left: 1;
}}
{name} #detail {{
    color: $text-muted;
}}
"""


class ConfirmScreen(ModalScreen[bool]):
    """Ask before an action that changes the fleet; y / n / escape."""

    DEFAULT_CSS = MODAL_CSS.format(name="ConfirmScreen")
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("y", "answer(True)", "Yes"),
        Binding("n,escape", "answer(False)", "No"),
    ]

    def __init__(self, question: str, detail: str = "") -> None:
        super().__init__()
        self.question = question
        self.detail = detail

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(Text(self.question, "bold"), id="question")
            yield Static(self.detail, id="detail")
            with Horizontal(classes="buttons"):
                yield Button("Yes (y)", variant="warning", id="yes")
                yield Button("No (n)", id="no")

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)


class ApplyScreen(ModalScreen[str | None]):
    """Read a manifest file, let the orchestrator validate it (dry run), then confirm.

    Dismisses with the manifest text to apply, or None."""

    DEFAULT_CSS = MODAL_CSS.format(name="ApplyScreen")
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, state: ConsoleState, call: Call, path: str = "") -> None:
        super().__init__()
        self._state = state
        self._call = call
        self._initial = path
        self._manifest: str | None = None

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(Text("Apply a deployment manifest", "bold"))
            yield Input(self._initial, placeholder="path to a manifest (YAML/JSON)", id="path")
            yield Static("enter: validate (dry run) · escape: cancel", id="detail")
            with Horizontal(classes="buttons"):
                yield Button("Apply", variant="warning", id="apply", disabled=True)
                yield Button("Cancel", id="cancel")

    @on(Input.Submitted, "#path")
    def _validate(self, event: Input.Submitted) -> None:
        self._manifest = None
        self.query_one("#apply", Button).disabled = True
        path = Path(event.value.strip()).expanduser()
        try:
            text = path.read_text()
        except OSError as err:
            self._say(Text(f"cannot read {path}: {err.strerror or err}", "red"))
            return
        self._dry_run(text)

    @on(Input.Changed, "#path")
    def _edited(self) -> None:
        self._manifest = None
        self.query_one("#apply", Button).disabled = True

    @work(exclusive=True, group="dry-run")
    async def _dry_run(self, text: str) -> None:
        self._say("validating…")
        try:
            resp = await self._call(lambda c: c.apply(text, dry_run=True))
        except ClientError as err:
            lines = Text(f"refused ({err.code}):\n", "red")
            for part in err.detail.split("; "):
                lines.append(f"  {part}\n", "red")
            self._say(lines)
            return
        dep = resp.deployment
        self._manifest = text
        verb = "update" if dep.name in self._state.deployments else "create"
        self._say(
            f"will {verb} deployment/{dep.name}: model {dep.spec.model.name}:{dep.spec.model.version}, "
            f"{dep.spec.replicas} replica(s). Apply?"
        )
        button = self.query_one("#apply", Button)
        button.disabled = False
        button.focus()

    def _say(self, message: str | Text) -> None:
        self.query_one("#detail", Static).update(message)

    @on(Button.Pressed, "#apply")
    def _apply(self) -> None:
        self.dismiss(self._manifest)

    @on(Button.Pressed, "#cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)


WIPE_POLL_S = 0.5
WIPE_STYLE = {"pending": "yellow", "confirmed": "green", "quarantined": "bold red"}


class WipeScreen(ModalScreen[None]):
    """A wipe's confirmations as they arrive (ModelService.GetWipe), until no node is pending.

    Closing it does not stop the wipe: the orchestrator tracks it, and the Models tab shows it."""

    DEFAULT_CSS = (
        MODAL_CSS.format(name="WipeScreen")
        + """
    WipeScreen LiveTable {
        height: auto;
        max-height: 12;
    }
    """
    )
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,enter", "close", "Close")]

    def __init__(self, wipe_id: str, state: ConsoleState, call: Call) -> None:
        super().__init__()
        self.wipe_id = wipe_id
        self._state = state
        self._call = call

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label("", id="question")
            yield Static("", id="detail")
            yield LiveTable(["NODE", "STATE", "MESSAGE"], id="wipe-nodes")
            with Horizontal(classes="buttons"):
                yield Button("Close", id="close")

    def on_mount(self) -> None:
        self.show()
        self._poll()

    @work(exclusive=True, group="wipe")
    async def _poll(self) -> None:
        while True:
            try:
                status = await self._call(lambda c: c.get_wipe(self.wipe_id))
            except ClientError as err:
                self.query_one("#detail", Static).update(Text(f"cannot read the wipe: {err}", "red"))
                return
            self._state.wipes[status.id] = status
            self.show()
            self.post_message(StateChanged())
            if status.done:
                return
            await asyncio.sleep(WIPE_POLL_S)

    def show(self) -> None:
        status = self._state.wipes.get(self.wipe_id)
        if status is None:
            return
        versions = ", ".join(status.versions) or "every version"
        title = Text(f"Wipe {status.id}: {status.name} {versions}", "bold")
        title.append("  done" if status.done else "  in progress", "green" if status.done else "yellow")
        self.query_one("#question", Label).update(title)
        left = int(status.deadline_unix_ms / 1000 - self._state.clock().timestamp())
        deadline = "" if status.done else f"; deadline in {max(left, 0)} s"
        self.query_one("#detail", Static).update(
            f"key revoked; {status.replicas_evicted} replica(s) evicted; {status.confirmed} confirmed, "
            f"{status.pending} pending, {status.quarantined} quarantined (no confirmation by the deadline)"
            f"{deadline}"
        )
        rows: dict[str, list[Cell]] = {}
        for node in status.nodes:
            name = api_pb2.WipeNodeState.Name(node.state).removeprefix("WIPE_NODE_STATE_").lower()
            rows[node.node_id] = [node.node_id, Text(name, WIPE_STYLE.get(name, "")), node.message]
        self.query_one(LiveTable).show_rows(rows)

    @on(Button.Pressed, "#close")
    def action_close(self) -> None:
        self.dismiss(None)


class Metric(Horizontal):
    """A labelled sparkline with its latest value."""

    DEFAULT_CSS = """
    Metric {
        height: 1;
    }
    Metric > .name {
        width: 26;
        padding: 0 1;
    }
    Metric > Sparkline {
        width: 1fr;
    }
    Metric > .value {
        width: 10;
        text-align: right;
        padding: 0 1;
    }
    """

    def __init__(self, name: str, *, id: str) -> None:
        super().__init__(id=id)
        self._label = name

    def compose(self) -> ComposeResult:
        yield Label(self._label, classes="name")
        yield Sparkline([])
        yield Label("-", classes="value")

    def show(self, name: str, values: list[float]) -> None:
        self.query_one(".name", Label).update(name)
        self.query_one(Sparkline).data = values
        self.query_one(".value", Label).update(f"{values[-1]:.1f}" if values else "-")


class NodeDetailScreen(Screen[None]):
    """One node: inventory, live sparklines of power, latency and throughput, its replicas."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,backspace", "app.pop_screen", "Back"),
        Binding("c", "cordon", "Cordon/uncordon"),
        Binding("n", "drain", "Drain"),
    ]
    DEFAULT_CSS = """
    NodeDetailScreen #title {
        padding: 0 1;
        text-style: bold;
    }
    NodeDetailScreen #facts {
        padding: 0 1;
        height: auto;
        color: $text-muted;
    }
    NodeDetailScreen #metrics {
        height: auto;
        margin: 1 0 0 0;
    }
    NodeDetailScreen #exits {
        padding: 0 1;
        height: auto;
        margin: 1 0 0 0;
        display: none;
    }
    NodeDetailScreen #exits.-shown {
        display: block;
    }
    NodeDetailScreen #node-replicas {
        margin: 1 0 0 0;
    }
    """

    def __init__(self, node_id: str, state: ConsoleState) -> None:
        super().__init__()
        self.node_id = node_id
        self._state = state

    def compose(self) -> ComposeResult:
        yield Header(show_clock=False)
        yield ConnectionBanner()
        yield Label(self.node_id, id="title")
        yield Static("", id="facts")
        with Vertical(id="metrics"):
            yield Metric("power W", id="power")
            yield Metric("latency p95 ms", id="latency")
            yield Metric("throughput inf/s", id="throughput")
        yield Static("", id="exits")
        yield LiveTable(["DEPLOYMENT", "MODEL", "PHASE", "INFERENCES", "P95 MS"], id="node-replicas")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = f"node {self.node_id}"
        self.post_message(BannerMounted(self.query_one(ConnectionBanner)))
        self.show(self._state)
        self.query_one(LiveTable).focus()

    def show(self, state: ConsoleState) -> None:
        node = state.nodes.get(self.node_id)
        if node is None:
            self.query_one("#title", Label).update(Text(f"{self.node_id}: not listed", "red"))
            return
        inv = node.inventory
        online = node.state == node_pb2.NODE_STATE_ONLINE
        title = Text(self.node_id, "bold")
        title.append("  ")
        title.append(state_name(node.state), "green" if online else "bold red")
        if node.cordoned:
            title.append("  cordoned", "yellow")
        title.append(f"  {inv.hardware_profile}")
        self.query_one("#title", Label).update(title)
        labels = ", ".join(f"{k}={v}" for k, v in sorted(inv.labels.items())) or "-"
        accs = "; ".join(
            f"{accelerator_label(a)} {','.join(a.dtypes)} {a.idle_w:g}-{a.active_w:g} W"
            for a in inv.accelerators
        )
        trust = ""
        if self.node_id in state.attestations:
            view = state.attestations[self.node_id]
            reasons = ", ".join(r.id for r in view.result.reasons) or view.last_rejection
            trust = f"\nattest   {state.attestation_states[self.node_id]} · tier {view.result.tier or '-'}"
            trust += f" · {reasons}" if reasons else ""
        self.query_one("#facts", Static).update(
            f"labels   {labels}\n"
            f"accel    {accs or '-'}\n"
            f"memory   {inv.memory_bytes // 2**20} MiB · max replicas {inv.max_replicas} · agent {inv.agent_version}\n"
            f"serves   {inv.inference_endpoint or '-'}{trust}"
        )
        history = state.history.get(self.node_id)
        source = source_name(node.telemetry.energy_source) if node.HasField("telemetry") else "modelled"
        self.query_one("#power", Metric).show(f"power W ({source})", list(history.power_w) if history else [])
        self.query_one("#latency", Metric).show(
            "latency p95 ms (worst)", list(history.latency_p95_ms) if history else []
        )
        self.query_one("#throughput", Metric).show(
            "throughput inf/s", list(history.throughput) if history else []
        )
        self._show_exits(node)
        stats = {(m.model_name, m.model_version): m for m in node.telemetry.models}
        owners = {r.id: dep for dep in state.deployments.values() for r in dep.status.replica_list}
        rows: dict[str, list[Cell]] = {}
        for rep in sorted(node.replicas, key=lambda r: (owners[r.id].name if r.id in owners else "", r.id)):
            dep = owners.get(rep.id)
            model = dep.spec.model.name if dep else "?"
            version = rep.model_version or (dep.spec.model.version if dep else "")
            m = stats.get((model, version))
            phase = phase_name(rep.phase)
            rows[rep.id] = [
                dep.name if dep else rep.id,
                f"{model}:{version}",
                Text(phase, PHASE_STYLE.get(phase, "")),
                str(m.inferences) if m else "0",
                f"{m.latency_p95_ms:.2f}" if m and m.inferences else "-",
            ]
        self.query_one(LiveTable).show_rows(rows)

    def _show_exits(self, node: api_pb2.Node) -> None:
        """Per multi-exit model entering here: where its requests left the model (``exits``)."""
        exits = self.query_one("#exits", Static)
        dists = exit_distributions(node.telemetry)
        exits.set_class(bool(dists), "-shown")
        text = Text()
        for d in dists:
            if text:
                text.append("\n")
            text.append(f"exits    {d.model}:{d.version}", "bold")
            text.append(f"  {d.requests} req · ")
            for k, share in enumerate(d.shares, 1):
                text.append(f"exit {k} {share:.0%}", "green" if k < len(d.shares) else "")
                text.append(" · ")
            text.append(f"forced {d.forced:.0%}", "yellow" if d.forced else "")
            if d.refused:
                text.append(f" · refused {d.refused}", "yellow")
        exits.update(text)

    def action_cordon(self) -> None:
        self.post_message(ActionRequested(Action.CORDON, self.node_id))

    def action_drain(self) -> None:
        self.post_message(ActionRequested(Action.DRAIN, self.node_id))
