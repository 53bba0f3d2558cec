"""``edgeward tui``: the operator console, a Textual app on the orchestrator's public gRPC API.

Live data comes from the Watch streams (deployments, telemetry and, where served, attestation),
each in a worker of the ``live`` group. NodeService and ModelService have no Watch: the node
list is re-read shortly after telemetry or replica changes arrive (debounced) and, like the
model catalog, every few seconds. When a call or stream finds the orchestrator gone,
every live worker is cancelled, the banner says so, and the app reconnects with a backoff (or
at once on ``r``); nothing blocks the UI meanwhile.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from datetime import datetime
from typing import Any, ClassVar, TypeVar

from textual import work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding, BindingType
from textual.screen import ModalScreen, Screen
from textual.timer import Timer
from textual.widgets import Footer, Header, TabbedContent, TabPane

from edgeward.v1 import api_pb2, node_pb2

from ..client import ATTESTATION_SERVICE, EVENT_SERVICE, AsyncEdgewardClient, ClientError, Unreachable
from .messages import Action, ActionRequested, BannerMounted, OpenNode, StateChanged
from .model import ConsoleEvent, ConsoleState, Severity, rollout_in_progress
from .screens import ApplyScreen, ConfirmScreen, NodeDetailScreen, WipeScreen
from .views import AttestationView, DeploymentsView, EventsView, FleetView, LiveView, ModelsView
from .widgets import ConnectionBanner, LiveTable

T = TypeVar("T")
REFRESH_S = 5.0  # nodes, catalog, placements, wipes (no Watch), deployments (SLO attainment)
NODES_DEBOUNCE_S = 0.5  # re-read nodes this long after telemetry or replica changes
RETRY_S = (1.0, 10.0)  # first and largest delay between reconnection attempts
TABS = ("fleet", "deployments", "models", "events", "attestation")


def _now() -> datetime:
    return datetime.now().astimezone()


class ConsoleApp(App[None]):
    """The operator console for the orchestrator at ``server`` (host:port)."""

    TITLE = "edgeward"
    CSS = """
    TabbedContent {
        height: 1fr;
    }
    TabPane {
        padding: 0;
    }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        *(
            Binding(str(i), f"show_tab('{tab}')", tab.capitalize(), show=False)
            for i, tab in enumerate(TABS, 1)
        ),
        Binding("a", "apply", "Apply"),
        Binding("r", "reconnect", "Reconnect"),
        Binding("q", "quit", "Quit"),
    ]

    def __init__(self, server: str, *, clock: Callable[[], datetime] = _now, apply_path: str = "") -> None:
        super().__init__()
        self.server = server
        self.state = ConsoleState(clock)
        self.client: AsyncEdgewardClient | None = None
        self.connected = False
        self.attestation_pb: Any = None
        self.apply_path = apply_path
        self._retry_s = RETRY_S[0]
        self._retry_timer: Timer | None = None
        self._nodes_timer: Timer | None = None
        self._views: list[LiveView] = []
        self._banner_update: Callable[[ConnectionBanner], None] = lambda b: b.connecting(server)

    # ------------------------------------------------------------ layout

    def compose(self) -> ComposeResult:
        yield Header(show_clock=False)
        yield ConnectionBanner()
        with TabbedContent(initial="fleet"):
            with TabPane("1 Fleet", id="fleet"):
                yield FleetView(self.state)
            with TabPane("2 Deployments", id="deployments"):
                yield DeploymentsView(self.state)
            with TabPane("3 Models", id="models"):
                yield ModelsView(self.state)
            with TabPane("4 Events", id="events"):
                yield EventsView(self.state)
        yield Footer()

    def on_mount(self) -> None:
        self._views = list(self.query(LiveView))
        self.sub_title = self.server
        self.query_one("#nodes", LiveTable).focus()
        self.connect()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        # a dialog is answered first: keys like `a` or `2` mean nothing behind it
        return not (action in ("apply", "show_tab", "reconnect") and isinstance(self.screen, ModalScreen))

    def on_tabbed_content_tab_activated(self, event: TabbedContent.TabActivated) -> None:
        tables = event.pane.query(LiveTable)
        if tables:
            tables.first().focus()

    def action_show_tab(self, tab: str) -> None:
        while isinstance(self.screen, NodeDetailScreen):
            self.pop_screen()
        tabs = self.query_one(TabbedContent)
        if tabs.query(f"TabPane#{tab}"):
            tabs.active = tab

    def open_node(self, node_id: str) -> None:
        self.push_screen(NodeDetailScreen(node_id, self.state))
        self._seed_history(node_id)

    # ------------------------------------------------------------ what views and screens ask

    def on_open_node(self, message: OpenNode) -> None:
        self.open_node(message.node_id)

    def on_action_requested(self, message: ActionRequested) -> None:
        target = message.target
        match message.action:
            case Action.CORDON:
                self.request_cordon(target)
            case Action.DRAIN:
                self.request_drain(target)
            case Action.ATTEST:
                self.request_attest(target)
            case Action.DELETE:
                self.request_delete(target)
            case Action.ROLLOUT_PAUSE | Action.ROLLOUT_RESUME | Action.ROLLOUT_UNDO:
                self.request_rollout(message.action.value, target)
            case Action.WIPE:
                self.request_wipe(target, message.version)

    def on_state_changed(self, message: StateChanged) -> None:
        self.refresh_views()

    def on_banner_mounted(self, message: BannerMounted) -> None:
        self.show_banner(message.banner)

    # ------------------------------------------------------------ connection

    @work(exclusive=True, group="connect", exit_on_error=False)
    async def connect(self) -> None:
        """(Re)connect: fresh channel, full lists, then the watch streams."""
        self.stop_live()
        if self.client is not None:
            await self.client.close()
        self.connected = False
        self._banners(lambda b: b.connecting(self.server))
        client = AsyncEdgewardClient(self.server)
        self.client = client
        try:
            services = await client.services()
            nodes = await client.list_nodes()
            deployments = await client.list_deployments()
            models = await client.list_models()
            notes = await client.list_events() if EVENT_SERVICE in services else []
        except ClientError as err:
            self._lost(client, err)
            return
        self.connected = True
        self._retry_s = RETRY_S[0]
        self.state.models = models
        events = [
            self.state.event(
                Severity.INFO,
                "console.connected",
                self.server,
                f"{len(nodes)} nodes, {len(deployments)} deployments, {len(models)} models",
            ),
            *self.state.set_deployments(deployments),
            *self.state.set_nodes(nodes, initial=True),
        ]
        if notes and notes[-1].seq < self.state.notification_seq:
            self.state.notification_seq = 0  # the orchestrator restarted: its sequence began again
        events.extend(self.state.apply_notifications(notes))
        self._banners(lambda b: b.connected())
        live = [self._watch_deployments(client), self._watch_telemetry(client), self._refresh_periodically()]
        if EVENT_SERVICE in services:
            live.append(self._watch_events(client))
        if ATTESTATION_SERVICE in services and client.enable_attestation():
            self.attestation_pb = client.attestation_pb
            await self._add_attestation_tab()
            live.append(self._watch_attestations(client))
        for coro in live:
            self.run_worker(coro, group="live", exit_on_error=False)
        self.refresh_views(events)
        self._refresh_models()

    def stop_live(self) -> None:
        """Stop every live update (streams, refreshes, a pending retry); the screens keep what
        they show. ``connect`` starts them again."""
        self.workers.cancel_group(self, "live")
        self.workers.cancel_group(self, "nodes")
        for timer in (self._retry_timer, self._nodes_timer):
            if timer is not None:
                timer.stop()
        self._retry_timer = self._nodes_timer = None

    def _lost(self, client: AsyncEdgewardClient, err: ClientError) -> None:
        """A call or stream of ``client`` failed so that live data stopped: banner, then retry."""
        if client is not self.client or self._retry_timer is not None:
            return  # an older connection, or already handled
        self.stop_live()
        self.connected = False
        delay = self._retry_s
        self._retry_s = min(self._retry_s * 2, RETRY_S[1])
        reason = err.code if not err.detail else f"{err.code}: {err.detail.splitlines()[0][:60]}"
        self.refresh_views([self.state.event(Severity.ERROR, "console.unreachable", self.server, reason)])
        self._banners(lambda b: b.down(self.server, reason, delay))
        self._retry_timer = self.set_timer(delay, self.connect)

    def action_reconnect(self) -> None:
        self._retry_s = RETRY_S[0]
        self.connect()

    def _banners(self, update: Callable[[ConnectionBanner], None]) -> None:
        self._banner_update = update
        for screen in self.screen_stack:
            for banner in screen.query(ConnectionBanner):
                update(banner)

    def show_banner(self, banner: ConnectionBanner) -> None:
        """Bring a newly composed screen's banner to the connection's current state."""
        self._banner_update(banner)

    async def _add_attestation_tab(self) -> None:
        tabs = self.query_one(TabbedContent)
        if tabs.query("TabPane#attestation"):
            return
        view = AttestationView(self.state, self.attestation_pb)
        await tabs.add_pane(TabPane("5 Attestation", view, id="attestation"))
        self._views.append(view)

    # ------------------------------------------------------------ live workers

    async def _watch_deployments(self, client: AsyncEdgewardClient) -> None:
        try:
            async for event in client.watch_deployments():
                self.refresh_views(self.state.apply_deployment_event(event))
                self._nodes_soon()
        except ClientError as err:
            self._lost(client, err)

    async def _watch_telemetry(self, client: AsyncEdgewardClient) -> None:
        try:
            async for sample in client.watch_telemetry():
                self.state.add_sample(sample)
                self._nodes_soon()
        except ClientError as err:
            self._lost(client, err)

    async def _watch_events(self, client: AsyncEdgewardClient) -> None:
        try:
            async for note in client.watch_events(after_seq=self.state.notification_seq):
                self.refresh_views(self.state.apply_notifications([note]))
        except ClientError as err:
            self._lost(client, err)

    async def _watch_attestations(self, client: AsyncEdgewardClient) -> None:
        pb = client.attestation_pb
        assert pb is not None

        def name(value: int) -> str:
            return pb.AttestationState.Name(value).removeprefix("ATTESTATION_STATE_").lower()

        try:
            async for view in client.watch_attestations():
                self.refresh_views(self.state.apply_attestation(view, name))
        except ClientError as err:
            self._lost(client, err)

    def _nodes_soon(self) -> None:
        if self._nodes_timer is None:
            self._nodes_timer = self.set_timer(NODES_DEBOUNCE_S, self._refresh_nodes)

    @work(exclusive=True, group="nodes", exit_on_error=False)
    async def _refresh_nodes(self) -> None:
        self._nodes_timer = None
        try:
            nodes = await self.call(lambda c: c.list_nodes())
        except ClientError:
            return
        self.refresh_views(self.state.set_nodes(nodes))

    @work(exclusive=True, group="models", exit_on_error=False)
    async def _refresh_models(self) -> None:
        """The catalog, where each model runs (one Placements call per model name) and the wipes."""
        try:
            models = await self.call(lambda c: c.list_models())
            placements = {}
            for name in sorted({m.name for m in models}):

                def placements_of(
                    c: AsyncEdgewardClient, name: str = name
                ) -> Awaitable[list[api_pb2.Placement]]:
                    return c.placements(name)

                placements[name] = await self.call(placements_of)
            wipes = await self.call(lambda c: c.list_wipes())
        except ClientError:
            return
        self.state.models, self.state.placements = models, placements
        self.state.wipes = {w.id: w for w in wipes}
        self.refresh_views()

    @work(exclusive=True, group="deployments", exit_on_error=False)
    async def _refresh_deployments(self) -> None:
        try:
            deployments = await self.call(lambda c: c.list_deployments())
        except ClientError:
            return
        self.refresh_views(self.state.refresh_deployments(deployments))

    async def _refresh_periodically(self) -> None:
        while True:
            await asyncio.sleep(REFRESH_S)
            self._refresh_nodes()
            self._refresh_models()
            self._refresh_deployments()

    @work(group="history", exit_on_error=False)
    async def _seed_history(self, node_id: str) -> None:
        try:
            samples = await self.call(lambda c: c.query_telemetry(node_id))
        except ClientError:
            return
        self.state.seed_history(node_id, samples)
        self.refresh_views()

    async def call(self, fn: Callable[[AsyncEdgewardClient], Awaitable[T]]) -> T:
        """One call on the current connection; an unreachable orchestrator starts the reconnect."""
        client = self.client
        if client is None or not self.connected:
            raise Unreachable("UNAVAILABLE", "not connected to the orchestrator")
        try:
            return await fn(client)
        except Unreachable as err:
            self._lost(client, err)
            raise

    def refresh_views(self, events: Iterable[ConsoleEvent] = ()) -> None:
        """Render the state on every view (the events view only when there are new events)."""
        events = list(events)
        for view in self._views:
            if events or not isinstance(view, EventsView):
                view.show(self.state)
        for screen in self.screen_stack:
            if isinstance(screen, NodeDetailScreen):
                screen.show(self.state)
        online = sum(n.state == node_pb2.NODE_STATE_ONLINE for n in self.state.nodes.values())
        alerts = self.state.alerts
        self.sub_title = (
            f"{self.server} · {online}/{len(self.state.nodes)} online · {alerts} alert{'s' * (alerts != 1)}"
        )
        for ev in events:
            if ev.severity is Severity.ERROR and ev.id != "console.unreachable":
                self.notify(f"{ev.subject}: {ev.message}", title=ev.id, severity="error", timeout=6)

    # ------------------------------------------------------------ actions

    def request_cordon(self, node_id: str) -> None:
        node = self.state.nodes.get(node_id)
        if node is None:
            return
        cordon = not node.cordoned
        question = f"{'Cordon' if cordon else 'Uncordon'} node {node_id}?"
        detail = (
            "The scheduler places no new replicas on it; replicas running there keep running."
            if cordon
            else "The scheduler may place replicas on it again."
        )
        self._confirm(
            question,
            detail,
            "node.cordon" if cordon else "node.uncordon",
            node_id,
            lambda c: c.cordon(node_id, cordon),
            lambda node: f"{'cordoned' if node.cordoned else 'uncordoned'}",
        )

    def request_drain(self, node_id: str) -> None:
        node = self.state.nodes.get(node_id)
        if node is None:
            return
        self._confirm(
            f"Drain node {node_id}?",
            f"It is cordoned and its {len(node.replicas)} replica(s) are evicted; "
            "the scheduler places them on other nodes.",
            "node.drain",
            node_id,
            lambda c: c.drain(node_id),
            lambda resp: f"drained: {resp.replicas_evicted} replica(s) evicted",
        )

    def request_delete(self, name: str) -> None:
        dep = self.state.deployments.get(name)
        if dep is None:
            return
        self._confirm(
            f"Delete deployment/{name}?",
            f"Its {dep.spec.replicas} replica(s) are stopped and removed from their nodes.",
            "deployment.delete",
            f"deployment/{name}",
            lambda c: c.delete_deployment(name),
            lambda resp: f"deleted: {resp.replicas_evicted} replica(s) evicted",
        )

    def request_attest(self, node_id: str) -> None:
        pb = self.attestation_pb

        def describe(view: Any) -> str:
            return pb.AttestationState.Name(view.state).removeprefix("ATTESTATION_STATE_").lower()

        self._confirm(
            f"Re-attest node {node_id} now?",
            "The verifier sends a fresh challenge and waits for the node's evidence.",
            "node.attest",
            node_id,
            lambda c: c.attest_now(node_id),
            describe,
        )

    def request_wipe(self, name: str, version: str) -> None:
        model = next((m for m in self.state.models if (m.name, m.version) == (name, version)), None)
        if model is None:
            return
        placed = self.state.placed(model)
        nodes = sorted({p.node_id for p in placed})
        replicas = sum(p.replicas for p in placed)
        where = f" ({', '.join(nodes[:6])}{', …' if len(nodes) > 6 else ''})" if nodes else ""
        self._confirm(
            f"Wipe {name}:{version} from the fleet?",
            f"Its key is revoked (destroyed: no node can load it again, final), its {replicas} replica(s) "
            f"are evicted, and {len(nodes)} node(s){where} are ordered to delete the artifact and its "
            "keys. A node that does not confirm by the deadline is quarantined.",
            "model.wipe",
            f"model/{name}:{version}",
            lambda c: c.wipe(name, version, "wiped from the operator console"),
            self._wiped,
        )

    def _wiped(self, status: Any) -> str:
        self.state.wipes[status.id] = status
        self.push_screen(WipeScreen(status.id, self.state, self.call))
        return f"wipe {status.id}: {len(status.nodes)} node(s) ordered, {status.replicas_evicted} replica(s) evicted"

    def request_rollout(self, action: str, name: str) -> None:
        """``action``: pause, resume or undo the rollout of deployment ``name`` (asks first)."""
        dep = self.state.deployments.get(name)
        if dep is None or not rollout_in_progress(dep):
            self.notify(f"deployment/{name} has no rollout in progress", title=f"rollout {action}", timeout=4)
            return
        ro = dep.status.rollout
        where = f"step {ro.step}/{ro.steps} ({ro.new_running} new running, {ro.old_live} old live)"
        question, detail = {
            "pause": (
                f"Pause the rollout of deployment/{name}?",
                f"It holds {where}; gates are not evaluated until it is resumed.",
            ),
            "resume": (
                f"Resume the rollout of deployment/{name}?",
                f"It continues at {where} and observes that step again through the gates.",
            ),
            "undo": (
                f"Undo the rollout of deployment/{name}?",
                f"It rolls back now from {ro.to_model} to the stable {ro.from_model} "
                f"(generation {ro.from_generation}); the new version's replicas are replaced.",
            ),
        }[action]

        def describe(status: Any) -> str:
            self.state.set_rollout(status)
            return f"rollout {status.strategy} {status.step}/{status.steps} " + (
                api_pb2.RolloutState.Name(status.state).removeprefix("ROLLOUT_STATE_").lower()
            )

        self._confirm(
            question,
            detail,
            f"rollout.{action}",
            f"deployment/{name}",
            lambda c: c.rollout(action.capitalize(), name, f"{action} from the operator console"),
            describe,
        )

    def action_apply(self) -> None:
        if not isinstance(self.screen, ApplyScreen):
            self.push_screen(ApplyScreen(self.state, self.call, self.apply_path), self._apply)

    def _apply(self, manifest: str | None) -> None:
        if manifest is None:
            return

        def result(resp: Any) -> str:
            verb = "created" if resp.created else "configured" if resp.changed else "unchanged"
            return f"deployment/{resp.deployment.name} {verb}"

        self._run_action("deployment.apply", "manifest", lambda c: c.apply(manifest), result)

    def _confirm(
        self,
        question: str,
        detail: str,
        action: str,
        subject: str,
        call: Callable[[AsyncEdgewardClient], Awaitable[Any]],
        describe: Callable[[Any], str],
    ) -> None:
        def answered(yes: bool | None) -> None:
            if yes:
                self._run_action(action, subject, call, describe)

        self.push_screen(ConfirmScreen(question, detail), answered)

    @work(group="actions", exit_on_error=False)
    async def _run_action(
        self,
        action: str,
        subject: str,
        call: Callable[[AsyncEdgewardClient], Awaitable[Any]],
        describe: Callable[[Any], str],
    ) -> None:
        try:
            result = await self.call(call)
        except ClientError as err:
            ev = self.state.event(Severity.ERROR, f"operator.{action}", subject, f"failed: {err}")
            self.notify(str(err), title=f"{action} failed", severity="error", timeout=8)
            self.refresh_views([ev])
            return
        message = describe(result)
        if action == "deployment.apply":
            subject = message.split(" ", 1)[0]
        self.notify(message, title=action, timeout=4)
        self.refresh_views([self.state.event(Severity.INFO, f"operator.{action}", subject, message)])
        self._refresh_nodes()

    # ------------------------------------------------------------ command palette

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        yield SystemCommand("Apply manifest", "Validate a manifest file, then apply it", self.action_apply)
        yield SystemCommand("Reconnect", "Reconnect to the orchestrator now", self.action_reconnect)
        for tab in TABS:
            if tab != "attestation" or self.attestation_pb is not None:
                yield SystemCommand(
                    f"Show {tab}", f"Switch to the {tab} tab", lambda tab=tab: self.action_show_tab(tab)
                )
        for node_id, node in self.state.nodes.items():
            verb = "Uncordon" if node.cordoned else "Cordon"
            yield SystemCommand(
                f"Open node {node_id}",
                "Node detail with live sparklines",
                lambda n=node_id: self.open_node(n),
                discover=False,
            )
            yield SystemCommand(
                f"{verb} node {node_id}",
                f"{verb} {node_id} (asks first)",
                lambda n=node_id: self.request_cordon(n),
                discover=False,
            )
            yield SystemCommand(
                f"Drain node {node_id}",
                f"Evict every replica of {node_id} (asks first)",
                lambda n=node_id: self.request_drain(n),
                discover=False,
            )
            if self.attestation_pb is not None:
                yield SystemCommand(
                    f"Re-attest node {node_id}",
                    "Challenge the node now (asks first)",
                    lambda n=node_id: self.request_attest(n),
                    discover=False,
                )
        for name, dep in self.state.deployments.items():
            yield SystemCommand(
                f"Delete deployment {name}",
                "Stop and remove its replicas (asks first)",
                lambda n=name: self.request_delete(n),
                discover=False,
            )
            if rollout_in_progress(dep):
                paused = dep.status.rollout.state == api_pb2.ROLLOUT_STATE_PAUSED
                verb = "resume" if paused else "pause"
                yield SystemCommand(
                    f"{verb.capitalize()} rollout {name}",
                    f"{verb.capitalize()} the rollout of {name} (asks first)",
                    lambda n=name, v=verb: self.request_rollout(v, n),
                    discover=False,
                )
                yield SystemCommand(
                    f"Undo rollout {name}",
                    f"Roll {name} back to its stable generation (asks first)",
                    lambda n=name: self.request_rollout("undo", n),
                    discover=False,
                )
        for model in self.state.models:
            yield SystemCommand(
                f"Wipe model {model.name}:{model.version}",
                "Revoke its key and order every node holding it to delete it (asks first)",
                lambda m=model: self.request_wipe(m.name, m.version),
                discover=False,
            )

    async def on_unmount(self) -> None:
        self.stop_live()
        if self.client is not None:
            await self.client.close()
            self.client = None
