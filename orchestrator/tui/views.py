"""The console's tabs: Fleet, Deployments, Models, Events and (where served) Attestation.

Each view renders :class:`~orchestrator.tui.model.ConsoleState` in :meth:`LiveView.show` and
posts a message (:mod:`.messages`) for an action on its selected row; the app owns the
confirmation and the gRPC call.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.widgets import DataTable, Input, Label, Static

from edgeward.v1 import api_pb2, node_pb2

from .messages import Action, ActionRequested, OpenNode
from .model import (
    ConsoleState,
    Severity,
    accelerator_label,
    has_rollout,
    last_gate,
    live_replicas,
    model_state_name,
    pending_reasons,
    phase_counts,
    phase_name,
    rollout_in_progress,
    rollout_state_name,
    rollout_summary,
    slo_summary,
)
from .widgets import Cell, LiveTable, OpenableTable

PHASE_STYLE = {
    "Running": "green",
    "Loading": "cyan",
    "Dispatched": "cyan",
    "Pending": "yellow",
    "Failed": "red",
    "Evicted": "dim",
}
TRUST_STYLE = {"affirming": "green", "enrolled": "", "warning": "yellow", "expired": "yellow"}
MODEL_STATE_STYLE = {"published": "green", "deprecated": "yellow", "revoked": "bold red"}
ROLLOUT_STYLE = {"progressing": "cyan", "paused": "yellow", "rolled back": "bold red", "completed": ""}
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

    def __init__(self, state: ConsoleState) -> None:
        super().__init__()
        self.state = state

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
            self.post_message(OpenNode(self.selected))

    def action_cordon(self) -> None:
        if self.selected:
            self.post_message(ActionRequested(Action.CORDON, self.selected))

    def action_drain(self) -> None:
        if self.selected:
            self.post_message(ActionRequested(Action.DRAIN, self.selected))


class DeploymentsView(LiveView):
    """Deployments, and the replicas of the highlighted one with their reasons."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("x", "delete", "Delete"),
        Binding("p", "pause", "Pause/resume"),
        Binding("u", "undo", "Undo"),
    ]
    DEFAULT_CSS = """
    DeploymentsView #rollout {
        height: auto;
        max-height: 3;
        padding: 0 1;
    }
    """

    def compose(self) -> ComposeResult:
        yield LiveTable(
            ["NAME", "READY", "SLO", "ROLLOUT", "PHASES", "PENDING REASONS", "MODEL"], id="deployment-list"
        )
        yield Static("", id="rollout")
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
            slo = slo_summary(dep)
            met = dep.status.slo_replicas_met >= dep.status.slo_replicas_measured
            rollout = rollout_summary(dep)
            rows[name] = [
                name,
                Text(f"{running}/{desired}", "green" if running >= desired else "yellow"),
                Text(slo, "green" if met else "yellow") if "%" in slo else Text(slo, "dim"),
                Text(rollout, ROLLOUT_STYLE.get(rollout_state_name(dep.status.rollout.state), "dim")),
                _phases_text(phase_counts(dep)),
                Text(reasons, "yellow") if reasons else "",
                f"{dep.spec.model.name}:{dep.spec.model.version}",
            ]
        self.query_one("#deployment-list", LiveTable).show_rows(rows)
        self._show_replicas(state)

    def _show_rollout(self, dep: api_pb2.Deployment | None) -> None:
        """The highlighted deployment's rollout: strategy, step, new/old replicas, state, last gate."""
        panel = self.query_one("#rollout", Static)
        if dep is None or not has_rollout(dep):
            panel.update(Text("rollout: none (a changed template with a strategy starts one)", "dim"))
            return
        ro = dep.status.rollout
        state = rollout_state_name(ro.state)
        text = Text("rollout ", "bold")
        text.append(f"{ro.strategy} {ro.from_model} → {ro.to_model} ")
        text.append(state, ROLLOUT_STYLE.get(state, ""))
        text.append(
            f" · step {ro.step}/{ro.steps} wants {ro.step_replicas} new · "
            f"{ro.new_running} new running, {ro.old_live} old live · last gate: {last_gate(ro)}"
        )
        if ro.reason or ro.message:
            text.append(f"\n{ro.reason}" + (f": {ro.message}" if ro.message else ""), "yellow")
        panel.update(text)

    def _show_replicas(self, state: ConsoleState) -> None:
        dep = state.deployments.get(self.selected or "")
        self._show_rollout(dep)
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
            self._show_replicas(self.state)

    def action_delete(self) -> None:
        if self.selected:
            self.post_message(ActionRequested(Action.DELETE, self.selected))

    def action_pause(self) -> None:
        dep = self.state.deployments.get(self.selected or "")
        if dep is not None:
            paused = rollout_in_progress(dep) and dep.status.rollout.state == api_pb2.ROLLOUT_STATE_PAUSED
            action = Action.ROLLOUT_RESUME if paused else Action.ROLLOUT_PAUSE
            self.post_message(ActionRequested(action, dep.name))

    def action_undo(self) -> None:
        if self.selected:
            self.post_message(ActionRequested(Action.ROLLOUT_UNDO, self.selected))


class ModelsView(LiveView):
    """The catalog, one row per version: state, signature, lineage, where it runs; ``w`` wipes."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("w", "wipe", "Wipe version")]
    DEFAULT_CSS = """
    ModelsView #model-detail {
        height: auto;
        max-height: 9;
        padding: 0 1;
        color: $text-muted;
    }
    """

    def compose(self) -> ComposeResult:
        yield LiveTable(
            ["NAME", "VERSION", "STATE", "SIGNED", "FROM", "RUNS ON", "DTYPES", "SIZE", "USE CASE"],
            id="model-list",
        )
        yield Static("", id="model-detail")

    @property
    def selected(self) -> api_pb2.Model | None:
        key = self.query_one(LiveTable).current_key
        return next((m for m in self.state.models if f"{m.name}:{m.version}" == key), None)

    def show(self, state: ConsoleState) -> None:
        rows: dict[str, list[Cell]] = {}
        for model in sorted(state.models, key=lambda m: (m.name, _semver(m.version))):
            nodes = sorted({p.node_id for p in state.placed(model)})
            name = model_state_name(model.state)
            rows[f"{model.name}:{model.version}"] = [
                model.name,
                model.version,
                Text(name, MODEL_STATE_STYLE.get(name, "")),
                Text("yes", "green") if model.signature.key_id else Text("no", "yellow"),
                model.parent_version or "-",
                ",".join(nodes) if nodes else Text("-", "dim"),
                ",".join(model.dtypes),
                f"{model.size / 1024:.1f} KiB",
                model.use_case or "-",
            ]
        self.query_one(LiveTable).show_rows(rows)
        self._show_detail(state)

    def _show_detail(self, state: ConsoleState) -> None:
        model = self.selected
        detail = self.query_one("#model-detail", Static)
        if model is None:
            detail.update("")
            return
        name = model_state_name(model.state)
        text = Text(f"{model.name}:{model.version} ", "bold")
        text.append(name, MODEL_STATE_STYLE.get(name, ""))
        if model.state_reason:
            text.append(f" ({model.state_reason})")
        signed = f"signed by {model.signature.key_id}" if model.signature.key_id else "unsigned"
        lineage = _lineage(state.models, model)
        text.append(
            f"\nsha256 {model.sha256[:16]}… · {len(model.ops)} ops · {signed}"
            f" · team {model.owner_team or '-'} · lineage {lineage}"
        )
        placed = state.placed(model)
        if not placed:
            text.append("\nnot deployed on any node")
        for p in placed:
            since = _span(int(state.clock().timestamp() - p.since_unix_ms / 1000))
            text.append(
                f"\n{p.node_id}: {p.running}/{p.replicas} running, for {since} · "
                f"{p.attestation_tier} {p.attestation_status} · {', '.join(p.deployments)}"
            )
        for wipe in state.wipes_of(model):
            text.append(
                f"\nwipe {wipe.id}: {wipe.confirmed} confirmed, {wipe.pending} pending, "
                f"{wipe.quarantined} quarantined" + (" (done)" if wipe.done else ""),
                "yellow" if wipe.pending or wipe.quarantined else "",
            )
        detail.update(text)

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        self._show_detail(self.state)

    def action_wipe(self) -> None:
        model = self.selected
        if model is not None:
            self.post_message(ActionRequested(Action.WIPE, model.name, model.version))


def _semver(version: str) -> tuple[int, ...]:
    core = version.split("-", 1)[0].split("+", 1)[0]
    return tuple(
        int(p) if p.isdigit() and len(p) <= 9 else 0 for p in core.split(".")
    )  # the catalog refuses longer


def _lineage(models: list[api_pb2.Model], model: api_pb2.Model) -> str:
    """``0.9.0 → 1.0.0``: the chain of parent versions down to this one (cycles cut)."""
    by_version = {m.version: m for m in models if m.name == model.name}
    chain = [model.version]
    current = model
    while current.parent_version and current.parent_version not in chain and len(chain) < 8:
        chain.append(current.parent_version)
        parent = by_version.get(current.parent_version)
        if parent is None:
            break
        current = parent
    return " → ".join(reversed(chain)) if len(chain) > 1 else "no parent"


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
        self._show_detail(self.state)

    def on_input_changed(self, event: Input.Changed) -> None:
        self.show(self.state)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.query_one("#event-list", LiveTable).focus()

    def action_filter(self) -> None:
        self.query_one("#filter", Input).focus()

    def action_clear_filter(self) -> None:
        self.query_one("#filter", Input).value = ""
        self.query_one("#event-list", LiveTable).focus()


def _span(seconds: int) -> str:
    span = abs(seconds)
    return f"{span // 3600}h{span % 3600 // 60:02d}m" if span >= 3600 else f"{span // 60}m{span % 60:02d}s"


def expiry(expires_ms: int, now: datetime) -> str:
    """``in 59m`` or ``expired 3m ago``: what an operator needs from an attestation's expiry."""
    if not expires_ms:
        return "-"
    left = int(expires_ms / 1000 - now.timestamp())
    text = _span(left)
    return f"in {text}" if left >= 0 else f"expired {text} ago"


class AttestationView(LiveView):
    """Shown only where the orchestrator serves ``edgeward.v1.AttestationService``."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("t", "attest", "Re-attest now")]

    def __init__(self, state: ConsoleState, attestation_pb: Any) -> None:
        super().__init__(state)
        self.attestation_pb = attestation_pb

    def compose(self) -> ComposeResult:
        yield LiveTable(["NODE", "STATE", "TIER", "EXPIRES", "REASONS"], id="attestations")

    def show(self, state: ConsoleState) -> None:
        pb = self.attestation_pb
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
            self.post_message(ActionRequested(Action.ATTEST, key))
