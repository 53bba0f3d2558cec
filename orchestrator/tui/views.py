"""The console's tabs: Fleet, Deployments, Models, Events and (where served) Attestation.

Each view renders :class:`~orchestrator.tui.model.ConsoleState` in :meth:`LiveView.show` and
asks the app for actions on its selected row; the app owns the confirmation and the gRPC call.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any, ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.widgets import DataTable, Input, Label, Static

from edgeward.v1 import node_pb2

from .model import (
    ConsoleState,
    Severity,
    accelerator_label,
    live_replicas,
    pending_reasons,
    phase_counts,
    phase_name,
)
from .widgets import Cell, LiveTable, OpenableTable

if TYPE_CHECKING:
    from .app import ConsoleApp

PHASE_STYLE = {
    "Running": "green",
    "Loading": "cyan",
    "Dispatched": "cyan",
    "Pending": "yellow",
    "Failed": "red",
    "Evicted": "dim",
}
TRUST_STYLE = {"affirming": "green", "enrolled": "", "warning": "yellow", "expired": "yellow"}
SEVERITY_STYLE = {Severity.INFO: "", Severity.WARNING: "yellow", Severity.ERROR: "bold red"}


def _phases_text(counts: list[tuple[str, int]]) -> Text:
    text = Text()
    for i, (name, count) in enumerate(counts):
        if i:
            text.append(" ")
        text.append(f"{count} {name.lower()}", PHASE_STYLE.get(name, ""))
    return text


def _status(node: Any) -> Text:
    """online / offline, and whether the scheduler may place replicas on it (cordoned)."""
    online = node.state == node_pb2.NODE_STATE_ONLINE
    if node.cordoned:
        return Text("cordoned" if online else "offline, cordoned", "yellow" if online else "bold red")
    return Text("online", "green") if online else Text("offline", "bold red")


class LiveView(Vertical):
    """A tab's content, re-rendered whenever the state it shows changes."""

    DEFAULT_CSS = """
    LiveView {
        height: 1fr;
    }
    LiveView > .caption {
        height: 1;
        padding: 0 1;
        color: $text-muted;
    }
    """

    @property
    def console_app(self) -> ConsoleApp:
        return self.app  # type: ignore[return-value]

    def show(self, state: ConsoleState) -> None:
        raise NotImplementedError


class FleetView(LiveView):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("c", "cordon", "Cordon/uncordon"),
        Binding("n", "drain", "Drain"),
    ]

    def compose(self) -> ComposeResult:
        yield OpenableTable(
            ["NODE", "STATUS", "TRUST", "POWER W", "REPL", "ACCELERATORS", "PROFILE"], id="nodes"
        )

    @property
    def selected(self) -> str | None:
        return self.query_one(LiveTable).current_key

    def show(self, state: ConsoleState) -> None:
        rows: dict[str, list[Cell]] = {}
        for node_id, node in state.nodes.items():
            power = state.power(node)
            trust = state.trust(node_id)
            trust_style = TRUST_STYLE.get(state.attestation_states.get(node_id, ""), "bold red")
            rows[node_id] = [
                node_id,
                _status(node),
                Text(trust, trust_style) if trust != "-" else "-",
                f"{power[0]:.1f} {power[1]}" if power else "-",
                str(len(node.replicas)),
                ", ".join(accelerator_label(a) for a in node.inventory.accelerators) or "-",
                node.inventory.hardware_profile or "-",
            ]
        self.query_one(LiveTable).show_rows(rows)

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        self.action_detail()

    def action_detail(self) -> None:
        if self.selected:
            self.console_app.open_node(self.selected)

    def action_cordon(self) -> None:
        if self.selected:
            self.console_app.request_cordon(self.selected)

    def action_drain(self) -> None:
        if self.selected:
            self.console_app.request_drain(self.selected)


class DeploymentsView(LiveView):
    """Deployments, and the replicas of the highlighted one with their reasons."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("x", "delete", "Delete")]

    def compose(self) -> ComposeResult:
        yield LiveTable(["NAME", "READY", "PHASES", "PENDING REASONS", "MODEL"], id="deployment-list")
        yield Label("", id="replicas-caption", classes="caption")
        yield LiveTable(["NODE", "PHASE", "ACCELERATOR", "VERSION", "REASON"], id="replicas")

    @property
    def selected(self) -> str | None:
        return self.query_one("#deployment-list", LiveTable).current_key

    def show(self, state: ConsoleState) -> None:
        rows: dict[str, list[Cell]] = {}
        for name, dep in state.deployments.items():
            running, desired = dep.status.running, dep.spec.replicas
            reasons = ", ".join(f"{reason} ({count})" for reason, count in pending_reasons(dep))
            rows[name] = [
                name,
                Text(f"{running}/{desired}", "green" if running >= desired else "yellow"),
                _phases_text(phase_counts(dep)),
                Text(reasons, "yellow") if reasons else "",
                f"{dep.spec.model.name}:{dep.spec.model.version}",
            ]
        self.query_one("#deployment-list", LiveTable).show_rows(rows)
        self._show_replicas(state)

    def _show_replicas(self, state: ConsoleState) -> None:
        dep = state.deployments.get(self.selected or "")
        caption = self.query_one("#replicas-caption", Label)
        rows: dict[str, list[Cell]] = {}
        if dep is None:
            caption.update("replicas: select a deployment")
        else:
            replicas = live_replicas(dep)
            message = next((r.message for r in replicas if r.message), "")
            caption.update(f"replicas of deployment/{dep.name}" + (f": {message}" if message else ""))
            for rep in replicas:
                phase = phase_name(rep.phase)
                rows[rep.id] = [
                    rep.node_id or "-",
                    Text(phase, PHASE_STYLE.get(phase, "")),
                    rep.accelerator or "-",
                    rep.model_version or "-",
                    rep.reason,
                ]
        self.query_one("#replicas", LiveTable).show_rows(rows)

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.data_table.id == "deployment-list":
            self._show_replicas(self.console_app.state)

    def action_delete(self) -> None:
        if self.selected:
            self.console_app.request_delete(self.selected)


class ModelsView(LiveView):
    DEFAULT_CSS = """
    ModelsView #model-detail {
        height: auto;
        max-height: 8;
        padding: 0 1;
        color: $text-muted;
    }
    """

    def compose(self) -> ComposeResult:
        yield LiveTable(["NAME", "VERSION", "DTYPES", "SIZE", "USE CASE", "RUNS ON"], id="model-list")
        yield Static("", id="model-detail")

    def show(self, state: ConsoleState) -> None:
        rows: dict[str, list[Cell]] = {}
        for model in sorted(state.models, key=lambda m: (m.name, m.version)):
            nodes = sorted({n for _, on in state.deployed_on(model) for n in on})
            rows[f"{model.name}:{model.version}"] = [
                model.name,
                model.version,
                ",".join(model.dtypes),
                f"{model.size / 1024:.1f} KiB",
                model.use_case or "-",
                ",".join(nodes) if nodes else Text("-", "dim"),
            ]
        self.query_one(LiveTable).show_rows(rows)
        self._show_detail(state)

    def _show_detail(self, state: ConsoleState) -> None:
        key = self.query_one(LiveTable).current_key
        model = next((m for m in state.models if f"{m.name}:{m.version}" == key), None)
        detail = self.query_one("#model-detail", Static)
        if model is None:
            detail.update("")
            return

        def tensors(specs: Any) -> str:
            return ", ".join(f"{t.name} {t.datatype}{list(t.shape)}" for t in specs)

        deployments = state.deployed_on(model)
        placed = "; ".join(
            f"deployment/{dep} on {', '.join(nodes) if nodes else 'no node yet'}"
            for dep, nodes in deployments
        )
        detail.update(
            f"{model.name}:{model.version}  sha256 {model.sha256[:16]}…  {len(model.ops)} ops\n"
            f"in  {tensors(model.inputs)}\nout {tensors(model.outputs)}\n"
            f"{placed or 'not deployed'}"
        )

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        self._show_detail(self.console_app.state)


class EventsView(LiveView):
    """Events derived from the watch streams and the operator's actions, newest first."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("slash", "filter", "Filter"),
        Binding("escape", "clear_filter", "Clear filter", show=False),
    ]
    DEFAULT_CSS = """
    EventsView #filter {
        height: 1;
        border: none;
        padding: 0 1;
    }
    EventsView #event-detail {
        height: auto;
        max-height: 3;
        padding: 0 1;
        color: $text-muted;
    }
    """

    def compose(self) -> ComposeResult:
        yield Input(
            placeholder="/ filter: words, node or reason id; 'alerts' = warnings and errors", id="filter"
        )
        yield LiveTable(["TIME", "SEV", "EVENT", "SUBJECT", "MESSAGE"], id="event-list")
        yield Static("", id="event-detail")

    def show(self, state: ConsoleState) -> None:
        text = self.query_one("#filter", Input).value
        rows: dict[str, list[Cell]] = {}
        for ev in reversed(state.events):
            if not ev.matches(text):
                continue
            style = SEVERITY_STYLE[ev.severity]
            rows[str(ev.seq)] = [
                ev.at.strftime("%H:%M:%S"),
                Text(ev.severity.label, style),
                Text(ev.id, style),
                ev.subject,
                ev.message,
            ]
        self.query_one("#event-list", LiveTable).show_rows(rows, follow_top=True)
        self._show_detail(state)

    def _show_detail(self, state: ConsoleState) -> None:
        key = self.query_one("#event-list", LiveTable).current_key
        detail = self.query_one("#event-detail", Static)
        ev = state.find_event(int(key)) if key else None
        detail.update(f"{ev.id} {ev.subject}: {ev.message}" if ev else "")

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        self._show_detail(self.console_app.state)

    def on_input_changed(self, event: Input.Changed) -> None:
        self.show(self.console_app.state)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.query_one("#event-list", LiveTable).focus()

    def action_filter(self) -> None:
        self.query_one("#filter", Input).focus()

    def action_clear_filter(self) -> None:
        self.query_one("#filter", Input).value = ""
        self.query_one("#event-list", LiveTable).focus()


def expiry(expires_ms: int, now: datetime) -> str:
    """``in 59m`` or ``expired 3m ago``: what an operator needs from an attestation's expiry."""
    if not expires_ms:
        return "-"
    left = int(expires_ms / 1000 - now.timestamp())
    span = abs(left)
    text = f"{span // 3600}h{span % 3600 // 60:02d}m" if span >= 3600 else f"{span // 60}m{span % 60:02d}s"
    return f"in {text}" if left >= 0 else f"expired {text} ago"


class AttestationView(LiveView):
    """Shown only where the orchestrator serves ``edgeward.v1.AttestationService``."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("t", "attest", "Re-attest now")]

    def compose(self) -> ComposeResult:
        yield LiveTable(["NODE", "STATE", "TIER", "EXPIRES", "REASONS"], id="attestations")

    def show(self, state: ConsoleState) -> None:
        pb = self.console_app.attestation_pb
        if pb is None:
            return
        now = state.clock()
        rows: dict[str, list[Cell]] = {}
        for node_id, view in sorted(state.attestations.items()):
            name = pb.AttestationState.Name(view.state).removeprefix("ATTESTATION_STATE_").lower()
            reasons = ", ".join(r.id for r in view.result.reasons) or view.last_rejection
            rows[node_id] = [
                node_id,
                Text(name, TRUST_STYLE.get(name, "bold red")),
                view.result.tier or "-",
                expiry(view.result.expires_unix_ms, now),
                reasons,
            ]
        self.query_one(LiveTable).show_rows(rows)

    def action_attest(self) -> None:
        key = self.query_one(LiveTable).current_key
        if key:
            self.console_app.request_attest(key)
