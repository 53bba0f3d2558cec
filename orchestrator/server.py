"""The orchestrator process: store, MQTT ingest, verifier, reconciler and gRPC API in one asyncio loop.

``async with Orchestrator(config) as orch:`` starts everything (and the embedded broker when no
external one is configured); leaving the block stops it all and leaves no thread or task behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edgeward.grpc_standard import HealthServicer, enable_reflection
from edgeward.mqtt.broker import EmbeddedBroker
from edgeward.mqtt.session import (
    RECONNECT_DELAY_S,
    BrokerURL,
    Message,
    MqttConnectError,
    MqttSession,
    SessionStats,
)
from edgeward.mqtt.topics import (
    TopicError,
    TopicKind,
    events_topic,
    node_topic,
    nodes_filter,
    parse_node_topic,
)
from edgeward.security.authz import DEPLOYMENT, PIPELINE
from edgeward.security.boundary import RequestGuard
from edgeward.security.config import PLAINTEXT_WARNING, is_loopback
from edgeward.security.guard import ApiGuard
from edgeward.security.tls import MAX_RESPONSE_BYTES
from edgeward.v1 import (
    api_pb2,
    api_pb2_grpc,
    attestation_pb2,
    attestation_pb2_grpc,
    events_pb2,
    events_pb2_grpc,
    node_pb2,
)
from edgeward.wire import (
    INGEST_FAILED,
    LATENCY_BUCKETS_S,
    RATE_EXCEEDED,
    DropCounter,
    NodeRateLimiter,
    WireError,
    decode_node_message,
)

from .api import (
    Control,
    DeploymentService,
    DownloadGate,
    ModelService,
    NodeService,
    RolloutService,
    TelemetryService,
    WatchHub,
    request_checks,
)
from .artifact_server import READ_TIMEOUT_S as ARTIFACT_READ_TIMEOUT_S
from .artifact_server import Artifact, ArtifactCache, ArtifactServer, read_artifact
from .catalog.publish import ModelPublisher, PushBudget
from .catalog.service import Catalog
from .catalog.signing import PublisherTrust
from .config import OrchestratorConfig
from .detectors import SlowdownGuard
from .errors import NotFound
from .events import KIND_RE, EventBus, EventService
from .fleet import Fleet
from .jetstream import JetStreamIngest
from .leader import CURRENT_LEASE, LeaderElection
from .metrics import Family, LoopLag, MetricsServer, StatusLag, render
from .multiexit import PipelineRouter
from .node_states import NodeStates
from .owners import StoreOwners
from .periodic import every
from .reconciler import Reconciler, command
from .rollout import RolloutController
from .scheduler import Scheduler
from .shared_ingest import SharedIngest
from .sql.notify import ACTIONS, DEPLOYMENTS, STATES, Listener
from .store import Lease, NodeRecord, SqlStore, open_store
from .telemetry import TelemetryStore
from .trust_mirror import TrustMirror
from .verifier import FleetVerifier
from .views import ApiViews

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    *(
        api_pb2.DESCRIPTOR.services_by_name[name].full_name
        for name in ("DeploymentService", "NodeService", "ModelService", "TelemetryService", "RolloutService")
    ),
    attestation_pb2.DESCRIPTOR.services_by_name["AttestationService"].full_name,
    events_pb2.DESCRIPTOR.services_by_name["EventService"].full_name,
)
INGEST_KINDS = (TopicKind.HELLO, TopicKind.STATUS, TopicKind.TELEMETRY, TopicKind.EVENTS, TopicKind.EVIDENCE)
# The heartbeat stream, which replicas share with broker.ingest 'shared' or 'jetstream'; hellos,
# events and evidence (rare, retained or one-shot) reach every replica (docs/scale-out.md, "Ingest").
SHARED_KINDS = (TopicKind.STATUS, TopicKind.TELEMETRY)
# A message whose handling raised is logged with its traceback at most this often (all are counted).
INGEST_FAILURE_LOG_S = 60.0
SHARE_GROUP = "edgeward"
# An OFFLINE status (a last will, or a node's goodbye) takes effect after this long unless our own
# broker connection drops meanwhile: a broker that shuts down publishes every client's will first.
OFFLINE_CONFIRM_S = 0.5
# How long after a broker (re)starts a node may take to reconnect to it: the largest delay of the
# nodes' reconnect backoff. Their silence in that time says nothing about them.
FLEET_RECONNECT_S = RECONNECT_DELAY_S[1]
MAX_PENDING_CALLS = 20_000  # gRPC calls arrived and not yet taken by the loop (a whole fleet downloading)
LIVENESS_TICK_S = 0.1
INGEST_BATCH = 512  # MQTT messages taken from the inbox and worked on together
ORCHESTRATOR_RECONNECT_S = (0.1, 1.0)
# The first connection to an external broker: tried again this often, for this long, while the
# broker is not up yet (the orchestrator and its broker started together).
BROKER_RETRY_S = 1.0
BROKER_START_WAIT_S = 30.0
ENROLL_THREADS = 8  # first enrollments in progress at once (each ends with a directory sync)
ORCHESTRATOR_INFLIGHT = 0  # QoS 1 commands awaiting their PUBACK on the wire at once: no limit
ORCHESTRATOR_OUTBOUND = 50_000  # and kept in all (a few per node of a 10,000-node fleet)
# Packets read from the broker per turn of the loop. With the agents' 64, at 10,000 nodes (turns of
# up to a few seconds by the lag probe) the orchestrator read at most 64 a turn of the fleet's
# thousands a second: the broker's PUBACKs waited behind them in the stream, and commands failed
# after 10 s while the inbox stood empty.
ORCHESTRATOR_READ_BATCH = 2_048
CHANGE_POLL_S = 0.1  # how often a replica reads the store's change feed (Watch across replicas)
NOTIFIED_POLL_S = 1.0  # and while PostgreSQL notifies it of every change (orchestrator/sql/notify.py)
LEADER_REFRESH_S = 2.0  # how often the leader re-reads what other replicas' APIs changed
# A node heard this long without a hello (its retained hello lost on the way: NATS's MQTT gateway can
# lose one) is asked to say hello again (a SayHello command), and again after pauses that double up
# to HELLO_ASK_MAX_S while it stays missing (an agent of an earlier release ignores the command; a
# hello that fails validation keeps failing); a replica asks at most HELLO_ASKS_PER_S nodes a second
# (a fleet replaying its retained hellos slowly is not asked all at once).
HELLO_ASK_S = 10.0
HELLO_ASK_MAX_S = 600.0
HELLO_ASKS_PER_S = 50.0


@dataclass
class _BatchWork:
    """What one ingest batch leaves to do after its messages: store calls, wire steps, a pass."""

    inventories: list[NodeRecord] = field(default_factory=list)
    waits: dict[str, list[Callable[[], Awaitable[None]]]] = field(default_factory=dict)
    serial: list[Callable[[], Awaitable[None]]] = field(default_factory=list)  # shared records' updates
    changed: bool = False


@dataclass(frozen=True)
class ApiServices:
    deployments: DeploymentService
    nodes: NodeService
    models: ModelService
    telemetry: TelemetryService
    rollouts: RolloutService


class Orchestrator:
    def __init__(self, config: OrchestratorConfig) -> None:
        self.config = config
        self.fleet = Fleet()
        self.drops = DropCounter()
        self.rate_limit = NodeRateLimiter(config.broker.node_rate, config.broker.node_burst)
        self._pending_offline: dict[str, tuple[float, node_pb2.NodeMessage]] = {}
        self._ingest_failures = 0  # messages whose handling raised
        self._ingest_failure_logged = -INGEST_FAILURE_LOG_S
        self._hello_missing: dict[str, tuple[float, float]] = {}  # node -> (ask at, the pause after)
        self._hello_asks = NodeRateLimiter(HELLO_ASKS_PER_S, HELLO_ASKS_PER_S, max_nodes=1)
        self.hello_requests = 0
        self.watch = WatchHub()
        self.events = EventBus()
        self._event_outbox: asyncio.Queue[events_pb2.Notification] = asyncio.Queue(1024)
        self.scheduler = Scheduler.from_config(config.scheduler)
        self.telemetry = TelemetryStore()
        self.slowdown = SlowdownGuard(config.slowdown)
        self.metrics_port = 0
        self._metrics: MetricsServer | None = None
        self.broker_url: str = config.broker.url or ""
        self.grpc_port = 0
        self.artifact_port = 0
        self.loop_lag = LoopLag()
        self.status_lag = StatusLag()
        self._artifacts: ArtifactServer | None = None
        self._db_pool = ThreadPoolExecutor(1, thread_name_prefix="edgeward-store")
        self._blocking_pool = ThreadPoolExecutor(2, thread_name_prefix="edgeward-blocking")
        self._enroll_pool = ThreadPoolExecutor(ENROLL_THREADS, thread_name_prefix="edgeward-enroll")
        self._tasks: list[asyncio.Task] = []
        self._wire_work = WireWork()
        self._broker: EmbeddedBroker | None = None
        self._mqtt: MqttSession | None = None
        self._server: grpc.aio.Server | None = None
        self._health = HealthServicer()
        self.guard: ApiGuard | None = None
        self.pushes = PushBudget()  # model pushes being received (held in memory) at once
        self.downloads = DownloadGate()  # artifact downloads served at once
        self.store: SqlStore
        self.reconciler: Reconciler
        self.verifier: FleetVerifier
        self.trust: TrustMirror  # the verifier's answers on any replica
        self.catalog: Catalog
        self.rollouts: RolloutController
        # This process among the replicas sharing the store (the leader lease's holder name).
        self.replica_id = f"{uuid.uuid4().hex[:12]}"
        self.election: LeaderElection | None = None
        self.revision = 0  # the newest change of the store's feed this replica has handled
        self._feed_wake = asyncio.Event()
        self._relaying = False
        self.shared: SharedIngest | None = None  # broker.ingest 'shared' or 'jetstream'
        self._jetstream: JetStreamIngest | None = None
        self._listener: Listener | None = None  # PostgreSQL: the other replicas' notifications

    # ------------------------------------------------------------ executors

    async def db(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a store call on the store's single thread (the only committer). Called from the
        leader's singleton loops (``CURRENT_LEASE`` set), its writes are fenced by the lease."""
        lease = CURRENT_LEASE.get()
        call = partial(fn, *args) if lease is None else partial(self.store.fenced, lease, fn, *args)
        return await asyncio.get_running_loop().run_in_executor(self._db_pool, call)

    @property
    def leading(self) -> bool:
        """Whether this replica runs the singleton loops now (always, on SQLite)."""
        return self.election is not None and self.election.leading

    async def run_blocking(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._blocking_pool, partial(fn, *args))

    async def run_enrolling(self, fn: Callable[..., Any], *args: Any) -> Any:
        """A first enrollment's file IO (token redemption), on threads of its own: nodes that
        enroll together share a directory sync, and the store's thread stays free."""
        return await asyncio.get_running_loop().run_in_executor(self._enroll_pool, partial(fn, *args))

    # ------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Orchestrator:
        try:
            await self._start()
        except BaseException:
            await self._stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stop()

    async def _start(self) -> None:
        """Open the store, build every controller the API uses, then serve: health says SERVING
        only once a request can reach all of them."""
        for name in ("", *SERVICE_NAMES):  # the servicer starts out saying SERVING
            await self._health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self._open_store()
        await self._build_controllers()
        await self._connect()
        await self._serve()
        log.info(
            "orchestrator serving gRPC on %s, broker %s, state in %s",
            self.address,
            self.broker_url,
            self.config.state_dir,
        )

    async def _open_store(self) -> None:
        self.events.bind_loop(asyncio.get_running_loop())
        self.events.add_outlet(self._queue_event)
        cfg = self.config
        self.store = await self.db(open_store, cfg)

    async def _build_controllers(self) -> None:
        """The verifier, catalog, rollout controller, reconciler and multi-exit router, with the
        state they restore from the store; nothing runs yet."""
        cfg = self.config
        self.verifier = FleetVerifier(
            cfg.attestation,
            await self.run_blocking(FleetVerifier.load_service, cfg.attestation, cfg.state_dir),
            fleet=self.fleet,
            publish=self._publish_command,
            db=self.db,
            store=self.store,
            node_timeout_s=cfg.node_timeout_s,
            on_change=lambda: self.reconciler.trigger(),
            events=self.events,
            enroll=self.run_enrolling,
        )
        shared = self.store.dialect != "sqlite"
        self.trust = TrustMirror(
            self.verifier, self.store, self.db, leading=lambda: self.leading, shared=shared
        )
        self.verifier.restore(
            *await self.db(
                lambda: (
                    self.store.list_enrollments(),
                    [(m.name, m.sha256) for m in self.store.list_models()],
                    self.store.revoked_keys(),
                )
            )
        )
        self.catalog = Catalog(
            cfg.catalog,
            await self.run_blocking(PublisherTrust.load, cfg.catalog),
            store=self.store,
            db=self.db,
            fleet=self.fleet,
            telemetry=self.telemetry,
            events=self.events,
            send_wipe=lambda node_id, wipe: self._publish_command(node_id, command(node_id, wipe=wipe)),
            quarantine=self.verifier.quarantine,
            revoke_keys=self.verifier.revoke_model_keys,
            released_to=self.verifier.released_to,
            on_change=lambda: self.reconciler.trigger(),
        )
        self.rollouts = RolloutController(
            self.store,
            self.db,
            self.fleet,
            self.events,
            cfg.node_timeout_s,
            wake=lambda: self.reconciler.trigger(),
            leading=lambda: self.leading,
            shared=shared,
        )
        await self.rollouts.load()
        self.reconciler = Reconciler(
            self.store,
            self.db,
            self.fleet,
            self.scheduler,
            self._publish_command,
            cfg,
            artifact_endpoint=lambda: self.advertise,
            on_change=lambda _names: self._feed_wake.set(),
            trust=self.verifier,
            rollouts=self.rollouts,
            events=self.events,
        )
        nodes = await self.db(self.store.list_nodes)
        self.reconciler.set_cordoned(n.id for n in nodes if n.cordoned)
        self.pipelines = PipelineRouter(self.store, self.db, self.fleet, self._publish_command)
        self.views = ApiViews(
            store=self.store,
            db=self.db,
            fleet=self.fleet,
            telemetry=self.telemetry,
            rollouts=self.rollouts,
            trust=self.trust,
            node_timeout_s=cfg.node_timeout_s,
        )

    async def _connect(self) -> None:
        """The API guard, the MQTT broker (embedded unless one is configured) and our session, and
        the gRPC port (bound, not yet serving: deploy commands name it as the artifact endpoint)."""
        cfg = self.config
        sec = cfg.security
        if sec is None:
            log.warning(PLAINTEXT_WARNING, cfg.grpc_bind)
        else:
            owners = StoreOwners(self.store, self.db)
            await owners.import_legacy(cfg.state_dir)
            self.guard = await ApiGuard.open(
                sec,
                cfg.state_dir,
                owners,
                self._exists,
                request_checks(self.run_blocking, self._pipeline_stages),
            )
        if cfg.broker.url is None:
            self._broker = EmbeddedBroker(
                host=cfg.broker.embedded_bind,
                port=cfg.broker.embedded_port,
                max_payload=cfg.broker.max_payload,
                tls=None if sec is None else sec.tls,
                topic_prefix=cfg.broker.topic_prefix,
            )
            await self._broker.__aenter__()
            self.broker_url = str(self._broker.url)
        b = cfg.broker
        self._mqtt = await self._first_session(
            lambda: MqttSession(
                BrokerURL.parse(
                    self.broker_url,
                    ca_file=b.ca_file or (sec.ca_file if sec else None),
                    cert_file=b.cert_file or (sec.cert_file if sec else None),
                    key_file=b.key_file or (sec.key_file if sec else None),
                ),
                f"edgeward-orchestrator-{uuid.uuid4().hex[:8]}",
                max_payload=b.max_payload,
                max_queued=b.ingest_queue,
                # One control-plane client comes back fast after a broker restart (the fleet backs off
                # with jitter), so that it has re-subscribed before the nodes replay their backlog.
                reconnect_delay=ORCHESTRATOR_RECONNECT_S,
                # Commands to thousands of nodes: with paho's 20 in flight, each waiting behind the
                # inbound stream for its PUBACK, a 10,000-node start-up sent a few hundred a second and
                # the rest failed with a full queue; with a window, paho walks its whole queue on every
                # PUBACK. No window: each command is written at once, the queue bound still holds.
                max_inflight=ORCHESTRATOR_INFLIGHT,
                max_outbound=ORCHESTRATOR_OUTBOUND,
                read_batch=ORCHESTRATOR_READ_BATCH,
            )
        )
        await self._subscribe_ingest()
        self._server = self._grpc_server()
        if self.guard is None:
            self.grpc_port = self._server.add_insecure_port(cfg.grpc_bind)
        else:
            self.grpc_port = self.guard.add_port(self._server, cfg.grpc_bind)
        if self.grpc_port == 0:
            raise OSError(f"cannot bind the gRPC API to {cfg.grpc_bind}")
        self._artifacts = ArtifactServer(
            ArtifactCache(self._read_artifact),
            authn=None if self.guard is None else self.guard.authz,
            audit=None if self.guard is None else self.guard.audit,
            credentials=None if self.guard is None else self.guard.credentials,
        )
        self.artifact_port = await self.run_blocking(self._artifacts.start, self._artifact_bind)
        if cfg.metrics_bind:
            if is_loopback(cfg.metrics_bind) or cfg.security is None:
                self._metrics = MetricsServer(self.render_metrics, cfg.metrics_bind)
            else:
                self._metrics = MetricsServer.https(self.render_metrics, cfg.metrics_bind, cfg.security.tls)
            await self._metrics.start()
            self.metrics_port = self._metrics.port

    @staticmethod
    async def _first_session(make: Callable[[], MqttSession]) -> MqttSession:
        """The first session with the broker, tried again every ``BROKER_RETRY_S`` for up to
        ``BROKER_START_WAIT_S`` while the broker cannot be reached or closes the connection before
        its CONNACK: one started alongside (a NATS server's MQTT gateway accepts connections seconds
        before it can keep a session). A refusal (credentials, ACL) or a TLS failure ends it at once."""
        deadline = time.monotonic() + BROKER_START_WAIT_S
        while True:
            session = make()
            try:
                await session.__aenter__()
                return session
            except MqttConnectError as err:
                if not err.transient or time.monotonic() + BROKER_RETRY_S > deadline:
                    raise
                log.warning("%s; trying again in %g s", err, BROKER_RETRY_S)
            await asyncio.sleep(BROKER_RETRY_S)

    async def _subscribe_ingest(self) -> None:
        """Every kind a replica hears: all of them with ``broker.ingest: all``; else statuses and
        telemetry through a shared subscription or the JetStream stream, each message to one replica,
        merged into the store (:class:`SharedIngest`)."""
        b = self.config.broker
        assert self._mqtt is not None
        for kind in INGEST_KINDS:
            topic_filter = nodes_filter(kind, b.topic_prefix)
            if kind in SHARED_KINDS and b.ingest == "jetstream":
                continue
            if kind in SHARED_KINDS and b.ingest == "shared":
                topic_filter = f"$share/{SHARE_GROUP}/{topic_filter}"
            await self._mqtt.subscribe(topic_filter, qos=1)
        if b.ingest == "all":
            return
        self.shared = SharedIngest(
            NodeStates(self.store.engine),
            self.fleet,
            self.telemetry,
            self.replica_id,
            on_status=lambda: self.reconciler.trigger(),
            leading=lambda: self.leading,
            notified=self._notified,
            lag=self.status_lag,
        )
        if b.jetstream is not None:
            self._jetstream = JetStreamIngest(
                b.jetstream.urls,
                b.topic_prefix,
                kinds=tuple(k.value for k in SHARED_KINDS),
                tls=self._nats_tls(),
                stream_replicas=b.jetstream.stream_replicas,
                ack_wait_s=b.jetstream.ack_wait_s,
                max_age_s=b.jetstream.max_age_s,
                name=f"edgeward-orchestrator-{self.replica_id}",
            )
            await self._jetstream.__aenter__()

    def _nats_tls(self) -> ssl.SSLContext | None:
        """TLS for tls:// NATS URLs: the broker's (or the security section's) CA and client certificate."""
        b, sec = self.config.broker, self.config.security
        assert b.jetstream is not None
        if not any(u.startswith("tls://") for u in b.jetstream.urls):
            return None
        ca = b.ca_file or (sec.ca_file if sec else None)
        context = ssl.create_default_context(cafile=ca)
        cert, key = (
            b.cert_file or (sec.cert_file if sec else None),
            b.key_file or (sec.key_file if sec else None),
        )
        if cert is not None and key is not None:
            context.load_cert_chain(cert, key)
        return context

    def _grpc_server(self) -> grpc.aio.Server:
        server = grpc.aio.server(
            interceptors=[RequestGuard()] if self.guard is None else self.guard.interceptors,
            options=[
                ("grpc.max_receive_message_length", self.config.max_grpc_message),
                ("grpc.max_send_message_length", MAX_RESPONSE_BYTES),
                # Calls that arrived and wait for the server's loop to take them. gRPC's defaults
                # (1,000; 3,000 at most) cancel the rest: after an apply to 10,000 nodes, their
                # downloads came back CANCELLED for minutes. Each waiting call costs little memory;
                # past what is taken, the download gate refuses with RESOURCE_EXHAUSTED.
                ("grpc.server.max_pending_requests", MAX_PENDING_CALLS),
                ("grpc.server.max_pending_requests_hard_limit", 2 * MAX_PENDING_CALLS),
            ],
        )
        services = self.services()
        api_pb2_grpc.add_DeploymentServiceServicer_to_server(services.deployments, server)
        api_pb2_grpc.add_NodeServiceServicer_to_server(services.nodes, server)
        api_pb2_grpc.add_ModelServiceServicer_to_server(services.models, server)
        api_pb2_grpc.add_TelemetryServiceServicer_to_server(services.telemetry, server)
        api_pb2_grpc.add_RolloutServiceServicer_to_server(services.rollouts, server)
        events_pb2_grpc.add_EventServiceServicer_to_server(EventService(self.events), server)
        attestation_pb2_grpc.add_AttestationServiceServicer_to_server(
            self.verifier.servicer(lambda: self.leading, source=self.trust), server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        enable_reflection(SERVICE_NAMES, server)
        return server

    def services(self) -> ApiServices:
        """The edgeward.v1 servicers, each given the collaborators it uses."""
        control = Control(self.store, self.db, self.reconciler, self.events, self.changed)
        publisher = ModelPublisher(
            trust=self.catalog.trust,
            store=self.store,
            db=self.db,
            run_blocking=self.run_blocking,
            events=self.events,
            allow_model=self.verifier.allow_model,
            on_change=self.reconciler.trigger,
        )
        return ApiServices(
            deployments=DeploymentService(
                control, self.views, self.watch, self.run_blocking, self.config.team_quota
            ),
            nodes=NodeService(control, self.views),
            models=ModelService(
                control,
                publisher,
                self.catalog,
                self.verifier,
                self.fleet,
                self.pushes,
                self.downloads,
                trust=self.trust,
            ),
            telemetry=TelemetryService(self.telemetry),
            rollouts=RolloutService(self.store, self.db, self.rollouts),
        )

    async def _serve(self) -> None:
        """Start the control loops, then the gRPC API; health says SERVING last."""
        self.revision = await self.db(self.store.revision)
        self.election = LeaderElection(self.store, self.replica_id, self.config.state.lease_ttl_s, self._lead)
        self._tasks.append(asyncio.create_task(self.election.run(), name="edgeward-election"))
        if self.store.dialect == "sqlite":  # one replica: it leads from the start, as it always did
            await self.election.wait_leading()
        else:
            self.store.writer = self.replica_id
            self._listener = Listener(
                self.store.engine,
                {DEPLOYMENTS: self._changed_elsewhere, STATES: self._merged_elsewhere, ACTIONS: self._asked},
                self.config.state.connect_timeout_s,
            )
            self._tasks.append(asyncio.create_task(self._listener.run(), name="edgeward-listen"))
            await self.trust.load()  # the leader's attestation results, before the API answers
            self._tasks.append(asyncio.create_task(self.trust.follow(), name="edgeward-trust-mirror"))
        # The fleet can be heard from now on; an embedded broker started with us: every node has to
        # reconnect to it first, at its own backoff.
        self.reconciler.start_grace(FLEET_RECONNECT_S if self._broker is not None else 0.0)
        if self.shared is not None:  # what the other replicas merged before this one started
            await self.shared.load()
            self._tasks.append(asyncio.create_task(self.shared.run(), name="edgeward-shared-ingest"))
        if self._jetstream is not None:
            self._tasks.append(asyncio.create_task(self._ingest_jetstream(), name="edgeward-jetstream"))
        self._tasks.append(asyncio.create_task(self._ingest(), name="edgeward-ingest"))
        self._tasks.append(asyncio.create_task(self._flush_telemetry(), name="edgeward-telemetry"))
        self._tasks.append(asyncio.create_task(self._hold_liveness(), name="edgeward-liveness"))
        self._tasks.append(asyncio.create_task(self._follow_changes(), name="edgeward-changes"))
        self._tasks.append(asyncio.create_task(self._send_events(), name="edgeward-events"))
        self._tasks.append(asyncio.create_task(self.loop_lag.run(), name="edgeward-loop-lag"))
        assert self._server is not None
        await self._server.start()
        for name in ("", *SERVICE_NAMES):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def _stop(self) -> None:
        await self._health.enter_graceful_shutdown()  # NOT_SERVING while it stops
        for task in self._tasks:
            task.cancel()
        await _bounded("background tasks", asyncio.gather(*self._tasks, return_exceptions=True))
        self._tasks.clear()
        await _bounded("ingest's wire work", self._wire_work.cancel())
        if self._metrics is not None:
            await _bounded("metrics server", self._metrics.stop())
            self._metrics = None
        if self._server is not None:
            await _bounded("gRPC server", self._server.stop(grace=0.5))
            self._server = None
        if self._artifacts is not None:
            await _bounded("artifact server", self.run_blocking(self._artifacts.stop))
            self._artifacts = None
        if self._jetstream is not None:
            await _bounded("JetStream source", self._jetstream.__aexit__(None, None, None))
            self._jetstream = None
        if self.shared is not None:
            with contextlib.suppress(Exception):  # what is still unmerged: a last try
                await _bounded("shared ingest's last merge", self.shared.flush())
            await asyncio.get_running_loop().run_in_executor(None, self.shared.close)
            self.shared = None
        if self._mqtt is not None:
            await _bounded("MQTT session", self._mqtt.__aexit__(None, None, None))
            self._mqtt = None
        if self._broker is not None:
            await _bounded("embedded broker", self._broker.__aexit__(None, None, None))
            self._broker = None
        if self.guard is not None:
            self.guard.close()
            self.guard = None
        if hasattr(self, "store"):
            await self.db(self.store.close)
        self._db_pool.shutdown(wait=True)
        self._blocking_pool.shutdown(wait=True)
        self._enroll_pool.shutdown(wait=True)

    # ------------------------------------------------------------ leader and followers

    async def _lead(self, lease: Lease) -> None:
        """The singleton loops, while this replica holds the leader lease (cancelled when it ends).
        A new term starts from the store: another replica may have led, and the API of every replica
        may have changed what the in-memory controllers hold."""
        await self._refresh_from_store(first=True)
        for node_id in list(self.fleet.nodes):  # resend every node its full set: nothing assumed
            self.reconciler.node_connected(node_id)
        await self.catalog.wipes.restore()  # after the reconciler and MQTT: it may quarantine
        loops = [
            self.reconciler.run(),
            self.pipelines.run(),
            self.verifier.run(),
            self.catalog.run(),
            *([self.trust.publish()] if self.trust.shared else []),
            self._watch_exits_loop(),
        ]
        if self.store.dialect != "sqlite":
            loops.append(self._refresh_loop())
        async with asyncio.TaskGroup() as group:  # one loop failing ends the term with all the others
            for loop in loops:
                group.create_task(loop)

    async def _refresh_from_store(self, first: bool = False) -> None:
        """What other replicas' APIs may have changed behind this one's controllers: enrollments,
        models and revoked keys (verifier), cordons (reconciler), rollout records."""
        enrollments, models, revoked, cordoned = await self.db(
            lambda: (
                self.store.list_enrollments(),
                [(m.name, m.sha256) for m in self.store.list_models()],
                self.store.revoked_keys(),
                self.store.cordoned_nodes(),
            )
        )
        if first or self.store.dialect != "sqlite":
            self.verifier.restore(enrollments, models, revoked)
        self._set_cordons(cordoned)
        await self.rollouts.load(announce=first)
        if not first:  # the term's start restores them (catalog.wipes.restore)
            await self.catalog.wipes.adopt()

    def _set_cordons(self, cordoned: list[str]) -> None:
        """The cordons as the store has them (any replica's API may have changed them)."""
        if set(cordoned) != set(self.reconciler.cordoned):
            self.reconciler.set_cordoned(cordoned)

    async def _refresh_loop(self) -> None:
        await every(LEADER_REFRESH_S, self._refresh_from_store, "refresh from the store", log, trace=True)

    async def _follow_changes(self) -> None:
        """Every replica reads the store's change feed (the deployments changed by any replica, in
        revision order) and hands each change once to its Watch streams; the leader's reconciler
        wakes up for the changes other replicas' APIs made. On PostgreSQL the store notifies every
        change (orchestrator/sql/notify.py) and the feed is read then (at most every
        ``CHANGE_POLL_S``), and polled every ``NOTIFIED_POLL_S``; while notifications do not flow,
        every ``CHANGE_POLL_S``."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(NOTIFIED_POLL_S if self._notified() else CHANGE_POLL_S):
                    await self._feed_wake.wait()
            self._feed_wake.clear()
            try:
                await self._publish_changes()
            except asyncio.CancelledError:
                raise
            except Exception as err:  # the database away: the next poll retries from the same revision
                log.warning("cannot read the change feed: %s", err)
            if self._notified():
                # Woken by every commit of any replica: read at most every CHANGE_POLL_S, so that a
                # burst of Apply calls on the followers is one read and one reconcile pass on the
                # leader, as the poll made it (a pass per Apply held the store's write lock so
                # often that the followers' Apply calls waited for it: 3 replicas took Apply calls
                # x1.02 as fast as one, against x1.67 polling), and a quiet feed is read at once.
                await asyncio.sleep(CHANGE_POLL_S)

    async def _publish_changes(self) -> None:
        while changes := await self.db(self.store.changes_since, self.revision):
            if not all(self.store.written_by_me(revision) for revision, _ in changes):
                # Another replica's API changed something: the rollout records this replica answers
                # with (and, on the leader, acts on), the cordons (a drain through another replica
                # cordons, then evicts: the pass it wakes must not place the replacements back on
                # the drained node) and a pass of the leader's reconciler.
                await self.rollouts.load(announce=False)
                self._set_cordons(await self.db(self.store.cordoned_nodes))
                if self.leading:
                    self.reconciler.trigger()
            if self.watch.watchers:
                names = {name for _, name in changes}
                pbs = {name: await self.deployment_pb_or_none(name) for name in sorted(names)}
                for revision, name in changes:
                    self.watch.publish_change(revision, name, pbs[name])
            self.revision = changes[-1][0]
            self.watch.revision = self.revision

    def changed(self) -> None:
        """This replica changed a deployment: read the change feed now rather than at the next poll."""
        self._feed_wake.set()

    def _notified(self) -> bool:
        """Whether the other replicas' changes are notified now (else they are polled for fast)."""
        return self._listener is not None and self._listener.connected

    def _changed_elsewhere(self, _writer: str) -> None:
        # Its own changes too: not every local write wakes the feed itself (the rollout
        # controller's do not), and reads are at most every CHANGE_POLL_S however often woken.
        self._feed_wake.set()

    def _asked(self, _writer: str) -> None:
        """A replica that does not lead asked for a rollout action: the leader's next pass takes it."""
        self.rollouts.actions_asked()
        if self.leading:
            self.reconciler.trigger()

    def _merged_elsewhere(self, writer: str) -> None:
        if self.shared is not None:
            self.shared.merged_elsewhere(writer)

    async def deployment_pb_or_none(self, name: str) -> api_pb2.Deployment | None:
        return await self.views.deployment_or_none(name)

    @property
    def address(self) -> str:
        host = self.config.grpc_bind.rsplit(":", 1)[0]
        return f"{host}:{self.grpc_port}"

    @property
    def _artifact_bind(self) -> str:
        return self.config.artifact_bind or f"{self.config.grpc_bind.rsplit(':', 1)[0]}:0"

    @property
    def artifact_address(self) -> str:
        """Where the artifact server listens (host as configured, the port it bound)."""
        return f"{self._artifact_bind.rsplit(':', 1)[0]}:{self.artifact_port}"

    @property
    def advertise(self) -> str:
        """The artifact endpoint deploy commands name: the configured one, else the artifact server."""
        return self.config.advertise or self.artifact_address

    def _read_artifact(self, name: str, version: str) -> Artifact:
        """On an artifact server thread: one model version's record and sealed bytes, read on the
        store's thread (the artifact server caches them for a few seconds)."""

        read = self._db_pool.submit(read_artifact, self.store, name, version)
        return read.result(timeout=ARTIFACT_READ_TIMEOUT_S)

    # ------------------------------------------------------------ MQTT

    async def _ingest(self) -> None:
        """Take the MQTT inbox in batches (up to ``INGEST_BATCH``): parse and apply each message,
        write the batch's inventories in one store call, then hand the work that waits on the wire
        (challenges, replies) to :class:`WireWork`: concurrently across nodes and in order within a
        node; wipe confirmations, which update one record per wipe, one after the other. While a
        batch is worked on, the session holds further QoS 1 messages back (backpressure) and sheds
        QoS 0 telemetry beyond its inbox, counted in ``edgeward_mqtt_shed_total``."""
        assert self._mqtt is not None
        while batch := await self._mqtt.next_batch(INGEST_BATCH):
            await self._ingest_batch(batch)

    async def _ingest_jetstream(self) -> None:
        """Statuses and telemetry from the JetStream stream the replicas share: each batch is applied,
        merged into the store, and only then acknowledged (a replica that dies before that leaves its
        batch to another one, after ``ack_wait_s``)."""
        assert self._jetstream is not None
        assert self.shared is not None
        while True:
            batch = await self._jetstream.next_batch(INGEST_BATCH)
            if not batch:
                continue
            await self._ingest_batch([m for m, _ in batch])
            try:
                await self.shared.flush()
            except Exception as err:  # the database away: not acknowledged, redelivered
                log.warning(
                    "shared ingest: merge failed, %d messages left to redelivery: %s", len(batch), err
                )
                continue
            await self._jetstream.ack(batch)

    async def _ingest_batch(self, batch: list[Message]) -> None:
        work = _BatchWork()
        for message in batch:
            try:
                self._ingest_message(message, work)
            except Exception:  # a payload that passed validation and still broke its handling
                self.drops.drop(WireError(INGEST_FAILED))
                self._ingest_failures += 1
                now = time.monotonic()
                if now - self._ingest_failure_logged >= INGEST_FAILURE_LOG_S:  # at fleet scale: not each
                    self._ingest_failure_logged = now
                    log.error(
                        "a message on %s was dropped: its handling failed (%d such since start, "
                        "wire.ingest.failed; one logged every %g s)",
                        message.topic,
                        self._ingest_failures,
                        INGEST_FAILURE_LOG_S,
                        exc_info=True,
                    )
        if work.changed:
            self.reconciler.trigger()
        if work.inventories:
            await self.db(self.store.put_inventories, work.inventories)
        for node_id, steps in work.waits.items():
            self._wire_work.add(node_id, steps)
        if work.serial:
            self._wire_work.add("", work.serial)

    def _ingest_message(self, message: Message, work: _BatchWork) -> None:
        """Parse and apply one message of a batch; what waits on the wire or the store goes into
        ``work``. An exception here drops this message alone (:meth:`_ingest_batch`)."""
        prefix = self.config.broker.topic_prefix
        max_payload = self.config.broker.max_payload
        try:
            node_id, kind = parse_node_topic(message.topic, prefix)
            # Metered per node before the cost of decoding (a subscription's retained replay is
            # two messages per node: well within a burst).
            if not self.rate_limit.allow(node_id):
                self.drops.drop(WireError(RATE_EXCEEDED, node_id))
                return
            msg = decode_node_message(
                message.payload, node_id=node_id, kind=kind.value, max_payload=max_payload
            )
        except TopicError:
            self.drops.drop(WireError("wire.topic.invalid"))
            return
        except WireError as err:
            if kind == TopicKind.STATUS and not message.payload:
                return  # a cleared retained status
            self.drops.drop(err)
            log.debug("dropped payload on %s: %s", message.topic, err)
            return
        if msg.WhichOneof("body") == "status" and msg.status.state == node_pb2.NODE_STATE_OFFLINE:
            self._offline(node_id, msg, message.retain)
            return
        if self.shared is not None and self.shared.stale(msg):
            return  # telemetry older than what this replica applied: redelivered late
        if not message.retain and node_id in self._pending_offline and self._back(msg, message.qos):
            del self._pending_offline[node_id]  # it spoke after its will: it is back
        what = self.fleet.apply(msg, retained=message.retain)
        body = msg.WhichOneof("body")
        if body != "hello" and not message.retain and (step := self._without_hello(node_id)):
            work.waits.setdefault(node_id, []).append(step)
        if self.shared is not None and body == "status":
            self.shared.received(msg, message.payload)
        if what == "hello":
            self.reconciler.node_connected(node_id)
            if self.leading:
                self.verifier.hello(node_id)
            work.inventories.append(self._node_record(node_id, msg))
            if step := self._as_leader(self._node_connected, node_id):
                work.waits.setdefault(node_id, []).append(step)
        elif what == "status":
            work.changed = True
            if not message.retain:  # a retained one is as old as the node's last word
                self.status_lag.record("received", msg.sent_unix_ms, time.time())
        elif body == "evidence":
            if step := self._as_leader(self.verifier.evidence, node_id, msg.evidence.payload):
                work.waits.setdefault(node_id, []).append(step)
        elif body == "event" and msg.event.id == "agent.wipe.done":
            self.verifier.wipe_confirmed(node_id, msg.event)
            if step := self._as_leader(self.catalog.wipe_confirmed, node_id, msg.event):
                work.serial.append(step)
            self._node_event(node_id, msg.event)
        elif body == "telemetry" and not self.telemetry.add(node_id, msg.sent_unix_ms, msg.telemetry):
            self.drops.drop(WireError("wire.telemetry.invalid_value"))
        elif body == "telemetry" and self.shared is not None:
            self.shared.received(msg, message.payload)
        elif body == "event" and msg.event.ack.command_id and not msg.event.ack.ok:
            log.warning(
                "node %s refused command %s: %s", node_id, msg.event.ack.command_id, msg.event.ack.reason
            )
        elif body == "event" and not msg.event.ack.command_id:
            self._node_event(node_id, msg.event)

    def _without_hello(self, node_id: str) -> Callable[[], Awaitable[None]] | None:
        """A step asking ``node_id`` for its hello, when this replica has heard it for ``HELLO_ASK_S``
        without one (then after doubling pauses, within a budget: ``HELLO_ASKS_PER_S``); None
        otherwise. Any replica may ask: the hello is retained and reaches them all, and asking twice
        is harmless."""
        node = self.fleet.nodes.get(node_id)
        if node is None or node.hello is not None:
            self._hello_missing.pop(node_id, None)
            return None
        now = time.monotonic()
        ask_at, pause = self._hello_missing.setdefault(node_id, (now + HELLO_ASK_S, HELLO_ASK_S))
        if now < ask_at or not self._hello_asks.allow("", now):
            return None
        pause = min(2 * pause, HELLO_ASK_MAX_S)
        self._hello_missing[node_id] = (now + pause, pause)
        self.hello_requests += 1
        log.log(
            logging.INFO if self.hello_requests <= 100 else logging.DEBUG,  # not once per node of a fleet
            "node %s is heard without a hello: asking it for one",
            node_id,
        )
        return partial(self._publish_command, node_id, command(node_id, hello=node_pb2.SayHello()))

    def _back(self, msg: node_pb2.NodeMessage, qos: int) -> bool:
        """Whether ``msg``, from a node whose OFFLINE is pending, says the node is back: a newer status
        (by the node's own order), or, when this replica hears all of the node's messages from one
        broker connection (``ingest: all``), a QoS 1 message after the OFFLINE: those keep their
        order. QoS 0 ones (telemetry) do not: the session hands ingest a batch's QoS 1 messages
        first, so telemetry the node sent before it died can come after its will. A shared ingest
        may be handed an older message late (another replica died holding it)."""
        offline = self._pending_offline[msg.node_id][1].status
        if msg.HasField("status") and msg.status.epoch and offline.epoch:  # epoch 0: an older agent
            return (msg.status.epoch, msg.status.status_seq) > (offline.epoch, offline.status_seq)
        return self.shared is None and qos > 0

    def _as_leader(
        self, fn: Callable[..., Awaitable[None]], *args: Any
    ) -> Callable[[], Awaitable[None]] | None:
        """A step of ingest that acts on what a node said (answer its evidence, confirm its wipe):
        every replica hears every node, the leader alone acts, fenced by its lease. None on a
        follower."""
        lease = self.election.lease if self.election is not None else None
        if lease is None:
            return None

        async def step() -> None:
            token = CURRENT_LEASE.set(lease)
            try:
                await fn(*args)
            finally:
                CURRENT_LEASE.reset(token)

        return step

    async def _node_connected(self, node_id: str) -> None:
        await self.verifier.node_connected(node_id)
        if mitigations := self.slowdown.mitigations(node_id):  # a restarted agent forgot them
            await self._send_mitigations(node_id, mitigations)

    def _node_event(self, node_id: str, event: node_pb2.Event) -> None:
        """Relay a node's own event (``agent.model.load_failed``...) onto the notification bus."""
        kind = event.id if KIND_RE.fullmatch(event.id) else "agent.event.unnamed"
        self._relaying = True  # every replica hears the node; the leader alone relays it to MQTT
        try:
            self.events.publish(
                kind,
                f"node/{node_id}",
                event.message,
                event.severity or node_pb2.SEVERITY_INFO,
                **dict(event.attributes),
            )
        finally:
            self._relaying = False

    def _queue_event(self, event: events_pb2.Notification) -> None:
        if self._relaying and not self.leading:
            return
        if self._event_outbox.full():
            self._event_outbox.get_nowait()
            self.events.dropped += 1
        self._event_outbox.put_nowait(event)

    async def _send_events(self) -> None:
        """The MQTT outlet of the event bus: one QoS 1 message per event, in order."""
        prefix = self.config.broker.topic_prefix
        while True:
            event = await self._event_outbox.get()
            if self._mqtt is None:
                continue
            try:
                topic = events_topic(event.kind, prefix, self.config.broker.event_topic_levels)
                await self._mqtt.publish(topic, event.SerializeToString(), qos=1)
            except Exception as err:  # broker away: notifications are best effort on MQTT
                log.debug("cannot publish event %s: %s", event.kind, err)

    def _offline(self, node_id: str, msg: node_pb2.NodeMessage, retained: bool) -> None:
        view = self.fleet.nodes.get(node_id)
        if retained and view is not None and view.online(time.monotonic(), self.config.node_timeout_s):
            # A will the broker kept across its restart, older than what the node said since; if
            # the node really is gone, its silence says so within node_timeout_s.
            return
        if retained:
            self.fleet.apply(msg, retained=True)
            self.reconciler.trigger()
            return
        self._pending_offline[node_id] = (time.monotonic() + OFFLINE_CONFIRM_S, msg)

    async def _hold_liveness(self) -> None:
        """Apply OFFLINE statuses once confirmed (``OFFLINE_CONFIRM_S``). While our own broker
        connection is down, the nodes' silence and the wills of the broker's shutdown prove nothing
        about them: pending OFFLINEs are discarded and the last_seen of the online nodes kept fresh,
        and so for ``FLEET_RECONNECT_S`` after we are back (the nodes reconnect at their own
        backoff, which grew during the outage), so after that each has one node_timeout_s to speak
        before it is declared lost (a broker restart moves no replica)."""
        down_at: float | None = None  # when our connection was last seen down
        while True:
            await asyncio.sleep(LIVENESS_TICK_S)
            now = time.monotonic()
            connected = self._mqtt is None or self._mqtt.connected
            if connected:
                due = [n for n, (at, _) in self._pending_offline.items() if at <= now]
                for node_id in due:
                    offline = self._pending_offline.pop(node_id)[1]
                    self.fleet.apply(offline)
                    if self.shared is not None:
                        self.shared.status(offline, offline.SerializeToString())
                if due:
                    self.reconciler.trigger()
                if down_at is None or now - down_at > FLEET_RECONNECT_S:
                    down_at = None
                    continue
            else:
                down_at = now
                if self._pending_offline:
                    log.warning(
                        "broker connection lost just after %d nodes went offline: taken as the "
                        "broker's shutdown, not theirs",
                        len(self._pending_offline),
                    )
                    self._pending_offline.clear()
            timeout = self.config.node_timeout_s
            for node in self.fleet.nodes.values():
                if node.online(now, timeout):  # a node already lost stays lost
                    node.last_seen = now

    async def _flush_telemetry(self) -> None:
        async def flush() -> None:
            self.telemetry.flush()

        await every(0.2, flush, "telemetry flush", log, trace=True)

    async def _watch_exits_loop(self) -> None:
        await every(0.2, self._watch_exits, "slowdown watch", log, trace=True)

    async def _watch_exits(self) -> None:
        """Exit telemetry of multi-exit models -> slowdown detector -> events and mitigations."""
        windows = self.telemetry.exits.windows(self.config.slowdown.min_requests)
        serving = self.pipelines.serving
        decision = self.slowdown.observe(windows, lambda node, model: (node, model) in serving)
        for n in decision.notices:
            self.events.publish(n.kind, n.subject, n.message, n.severity, **n.attributes)
        for node_id, mitigations in decision.mitigations.items():
            await self._send_mitigations(node_id, mitigations)

    async def _send_mitigations(self, node_id: str, mitigations: list[node_pb2.Mitigation]) -> None:
        body = node_pb2.Mitigate(mitigations=mitigations)
        await self._publish_command(node_id, command(node_id, mitigate=body))

    def render_metrics(self) -> bytes:
        """The fleet for Prometheus. ``edgeward_node_up`` covers every node the fleet knows (0 once
        it is offline or silent); every other per-node series is dropped for such a node, so a
        node that left leaves no stale series behind."""
        now = time.monotonic()
        timeout = self.config.node_timeout_s
        power = self.telemetry.latest_power()
        source = {node_pb2.ENERGY_SOURCE_MEASURED: "measured"}
        present = sorted(
            n
            for n, v in self.fleet.nodes.items()
            if v.state != node_pb2.NODE_STATE_OFFLINE and now - v.last_seen <= timeout
        )
        up = Family("edgeward_node_up", "gauge", "1 if the node is online, 0 once it is offline or silent")
        for n, v in sorted(self.fleet.nodes.items()):
            up.add({"node": n}, 1.0 if v.online(now, timeout) else 0.0)
        watts = Family("edgeward_node_power_watts", "gauge", "Latest board power")
        joules = Family("edgeward_node_energy_joules_total", "counter", "Energy since the agent started")
        served = Family("edgeward_model_inferences_total", "counter", "Inferences served per node and model")
        latency = Family(
            "edgeward_model_inference_duration_seconds",
            "histogram",
            "Latency of the inferences served per node and model, as the node measures it",
        )
        for n in present:
            view = self.fleet.nodes[n]
            if n in power:
                watts.add(
                    {"node": n, "source": source.get(self.telemetry.energy_source(n), "modelled")}, power[n]
                )
            if view.telemetry is not None:
                label = {"node": n, "source": source.get(view.telemetry.energy_source, "modelled")}
                joules.add(label, view.telemetry.energy_j)
            for m in self.telemetry.models(n):
                labels = {"node": n, "model": m.model_name, "version": m.model_version}
                served.add(labels, float(m.inferences))
                buckets = list(m.latency_buckets)
                if len(buckets) == len(LATENCY_BUCKETS_S) and all(
                    a <= b for a, b in zip(buckets, [*buckets[1:], m.inferences], strict=True)
                ):  # a count list of another release's buckets, or not cumulative: not exposed
                    latency.histogram(labels, LATENCY_BUCKETS_S, buckets, m.inferences, m.latency_sum_s)
        leader = Family(
            "edgeward_leader",
            "gauge",
            "1 while this replica holds the leader lease and runs the singleton loops (always 1 on SQLite)",
        )
        leader.add({}, 1.0 if self.leading else 0.0)
        terms = Family("edgeward_leader_terms_total", "counter", "Leader terms this replica started")
        terms.add({}, float(self.election.terms if self.election is not None else 0))
        dropped = Family("edgeward_mqtt_dropped_total", "counter", "MQTT payloads refused at the boundary")
        for r, c in sorted(self.drop_counts().items()):
            dropped.add({"reason": r}, float(c))
        ingested = Family("edgeward_telemetry_samples_total", "counter", "Telemetry samples ingested")
        ingested.add({}, float(self.telemetry.ingested))
        ingest = [
            Family(n, k, h, [("", lb, v) for lb, v in samples]) for n, k, h, samples in self._ingest_metrics()
        ]
        families = [up, watts, joules, served, latency, leader, terms, *self._control_metrics()]
        families += [*self.loop_lag.families(), self.status_lag.family()]
        return render([*families, dropped, ingested, *ingest])

    def _control_metrics(self) -> list[Family]:
        """Reconcile passes, store write retries, artifact downloads."""
        passes = Family(
            "edgeward_reconcile_passes_total",
            "counter",
            "Reconcile passes this replica completed (failed ones too; only the leader reconciles)",
        )
        passes.add({}, float(self.reconciler.passes))
        retries = Family(
            "edgeward_store_write_retries_total",
            "counter",
            "Store write transactions run again after a serialization failure, a deadlock or a lost connection",
        )
        retries.add({}, float(self.store.write_retries))
        refused = Family(
            "edgeward_model_downloads_refused_total",
            "counter",
            "Artifact downloads refused because the most allowed were being served (agents try again)",
        )
        refused.add({}, float(self.downloads.refused))
        artifacts = Family(
            "edgeward_artifact_downloads_total",
            "counter",
            "Downloads from the artifact server by result: served; refused (not a node, revoked certificate "
            "or model, unknown model, bad name); failed (the store did not answer). Downloads past its "
            "limit are refused by gRPC with RESOURCE_EXHAUSTED and not counted here",
        )
        for result, count in sorted((self._artifacts.counts if self._artifacts else {}).items()):
            artifacts.add({"result": result}, float(count))
        return [passes, retries, refused, artifacts, *self._attestation_metrics()]

    def _attestation_metrics(self) -> list[Family]:
        """The attestation exchange window (orchestrator.attest_window), on the leader."""
        window = self.verifier.window
        size = Family(
            "edgeward_attestation_window",
            "gauge",
            "Attestation exchanges the leader lets be in flight at once (adapts to the answers' delay)",
        )
        size.add({}, float(int(window.size)))
        exchanges = Family(
            "edgeward_attestation_exchanges",
            "gauge",
            "Attestation exchanges in flight, and nodes queued for one",
        )
        exchanges.add({"state": "in_flight"}, float(window.in_flight))
        exchanges.add({"state": "queued"}, float(window.queued))
        signals = Family(
            "edgeward_attestation_congestion_total",
            "counter",
            "Answers later than the window's target round-trip time (late), exchanges unanswered by "
            "their deadline (lost), and times the window was halved for them (narrowed)",
        )
        for what in ("late", "lost", "narrowed"):
            signals.add({"signal": what}, float(getattr(window, what)))
        return [size, exchanges, signals]

    def _ingest_metrics(self) -> list:
        stats = self._mqtt.stats if self._mqtt is not None else SessionStats()
        queued = self._mqtt.queued if self._mqtt is not None else 0
        return [
            (
                "edgeward_mqtt_received_total",
                "counter",
                "MQTT messages taken into the ingest inbox, by the QoS they arrived at",
                [
                    ({"qos": "0"}, float(stats.received - stats.received_qos1)),
                    ({"qos": "1"}, float(stats.received_qos1)),
                ],
            ),
            (
                "edgeward_mqtt_shed_total",
                "counter",
                "QoS 0 messages (telemetry) shed because the ingest inbox was full; QoS 1 is never shed",
                [({"qos": "0"}, float(stats.dropped_overflow))],
            ),
            (
                "edgeward_mqtt_ingest_paused_total",
                "counter",
                "Times ingest stopped reading the broker to hold QoS 1 messages back (backpressure)",
                [({}, float(stats.paused))],
            ),
            (
                "edgeward_mqtt_ingest_queued",
                "gauge",
                "Messages waiting in the ingest inbox",
                [({}, float(queued))],
            ),
            (
                "edgeward_hello_requests_total",
                "counter",
                "SayHello commands sent to nodes this replica heard without a hello (a retained hello lost)",
                [({}, float(self.hello_requests))],
            ),
            *self._shared_metrics(),
        ]

    def _shared_metrics(self) -> list:
        listening = (
            []
            if self._listener is None
            else [
                (
                    "edgeward_store_notified",
                    "gauge",
                    "1 while this replica listens for the other replicas' changes (PostgreSQL LISTEN); 0: it "
                    "polls for them",
                    [({}, 1.0 if self._listener.connected else 0.0)],
                ),
                (
                    "edgeward_store_notifications_total",
                    "counter",
                    "Change notifications this replica received (its own changes' included: PostgreSQL "
                    "sends them to every listener), and times it (re)connected",
                    [({"what": k}, float(v)) for k, v in sorted(self._listener.counts.items())],
                ),
            ]
        )
        if self.shared is None:
            return listening
        counts = dict(self.shared.counts)
        if self._jetstream is not None:
            counts["jetstream_received"] = self._jetstream.received
            counts["jetstream_redelivered"] = self._jetstream.redelivered
        return [
            (
                "edgeward_shared_ingest_total",
                "counter",
                "Shared ingest (broker.ingest shared or jetstream): statuses and telemetry this replica received "
                "(received; of them from JetStream, and redelivered there), node rows it merged into the store "
                "(merged, in flushes), and rows other replicas merged that it read (read_status, read_telemetry)",
                [({"what": k}, float(v)) for k, v in sorted(counts.items())],
            ),
            *listening,
        ]

    def drop_counts(self) -> dict[str, int]:
        """Refused MQTT payloads (and refused parts of accepted ones: bad profiles or latencies) by
        reason, including those the session dropped for size."""
        counts = self.drops.with_oversize(self._mqtt.stats.dropped_oversize if self._mqtt is not None else 0)
        for reason, n in self.fleet.dropped.items():
            counts[reason] = counts.get(reason, 0) + n
        return counts

    def _node_record(self, node_id: str, msg: node_pb2.NodeMessage) -> NodeRecord:
        return NodeRecord(
            node_id, node_id in self.reconciler.cordoned, msg.hello.SerializeToString(), msg.sent_unix_ms
        )

    async def _publish_command(self, node_id: str, command: node_pb2.Command) -> None:
        if self._mqtt is None:
            return
        topic = node_topic(node_id, TopicKind.CMD, self.config.broker.topic_prefix)
        try:
            await self._mqtt.publish(topic, command.SerializeToString(), qos=1)
        except Exception as err:  # broker away: the reconciler re-sends
            log.warning("cannot send %s to %s: %s", command.WhichOneof("body"), node_id, err)

    # ------------------------------------------------------------ views for the API

    async def deployment_pb(self, name: str) -> api_pb2.Deployment:
        return await self.views.deployment(name)

    async def _pipeline_stages(self, pipeline: str) -> set[str]:
        """The deployments that are stages of the multi-exit model ``pipeline`` (asked before a team's
        stage joins it, docs/security.md)."""
        stages: set[str] = await self.db(self.store.pipeline_stages, pipeline)
        return stages

    async def _exists(self, kind: str, name: str) -> bool:
        """Whether a deployment, a model, or a multi-exit model served by deployments (PIPELINE)
        exists (asked before a team claims a name, docs/security.md)."""
        if kind == PIPELINE:
            return bool(await self._pipeline_stages(name))
        getter = self.store.get_deployment if kind == DEPLOYMENT else self.store.get_model
        try:
            await self.db(getter, name)
        except NotFound:
            return False
        return True


class WireWork:
    """The ingest steps that wait on the wire (a challenge's or a reply's PUBACK), off the ingest
    loop: in arrival order per node, concurrently across nodes.

    Ingest must never wait for a PUBACK itself: while its inbox is full the MQTT session stops
    reading its socket (backpressure), so the PUBACK could only arrive once ingest has taken
    messages from the inbox, which it would not do while waiting. At 10,000 nodes that stalled
    every challenge for the session's 10 s timeout and attestation stopped."""

    def __init__(self) -> None:
        self._chains: dict[str, asyncio.Task[None]] = {}  # node id ("" for the fleet) -> its last step

    def __len__(self) -> int:
        return len(self._chains)

    def add(self, node_id: str, steps: list[Callable[[], Awaitable[None]]]) -> None:
        """Run ``steps`` after the node's earlier ones."""
        task = asyncio.get_running_loop().create_task(
            self._after(self._chains.get(node_id), node_id, steps), name=f"edgeward-ingest-{node_id}"
        )
        self._chains[node_id] = task
        task.add_done_callback(partial(self._done, node_id))

    @staticmethod
    async def _after(
        previous: asyncio.Task[None] | None, node_id: str, steps: list[Callable[[], Awaitable[None]]]
    ) -> None:
        if previous is not None:
            await asyncio.wait([previous])
        await _in_order(node_id or "the fleet", steps)

    def _done(self, node_id: str, task: asyncio.Task[None]) -> None:
        if self._chains.get(node_id) is task:
            del self._chains[node_id]

    async def cancel(self) -> None:
        tasks = list(self._chains.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._chains.clear()


async def _in_order(node_id: str, steps: list[Callable[[], Awaitable[None]]]) -> None:
    """One node's waiting work of an ingest batch, in arrival order; a failure is logged, and
    neither stops the node's later steps nor the other nodes'."""
    for step in steps:
        try:
            await step()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("ingest of a message from %s failed", node_id)


async def _bounded(what: str, awaitable: Any, timeout: float = 10.0) -> None:  # noqa: ASYNC109
    """One shutdown step, bounded: a step that hangs is reported and left behind."""
    try:
        async with asyncio.timeout(timeout):
            await awaitable
    except TimeoutError:
        log.error("stopping the %s took longer than %.0f s; continuing shutdown", what, timeout)
