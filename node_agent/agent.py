"""The node agent: announces the node, attests it, executes the orchestrator's commands, serves
inference and reports status and telemetry over MQTT.

Topics (under ``{prefix}/nodes/{node_id}/``): ``hello`` and ``status`` are retained; the broker
publishes the last will ``status = OFFLINE`` if the agent dies. Commands arrive on ``cmd`` with
QoS 1; each carries a ``command_id``, and a repeated id is acknowledged without being executed
again. They run in lanes (``LANES``): in order within a lane, the lanes side by side.

Attestation (docs/attestation.md): before connecting, the agent opens its attester (``software``
or ``tpm2``) and measures its code (``agent.code``), its config (``agent.config``) and its
accelerators' bitstreams/firmware. ``attest`` commands carry the verifier's messages (an empty one
asks the node to enroll); the answers go out on ``evidence``. A model arrives sealed, with its
data key wrapped to this node's attested binding key: the agent unwraps it, decrypts the model,
checks its digest and measures it (``model.<name>``) before loading it. ``wipe`` (quarantine)
unloads every model, deletes the cache and confirms with the event ``agent.wipe.done``; a model
wipe (``edgeward models wipe``) does so for that model only, journalled (docs/lifecycle.md).
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import logging
import os
import random
import re
import tempfile
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Awaitable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import grpc

from accelerators import registry
from accelerators.base import Backend, Capabilities, CostModel, ModelArtifact, ModelHandle, ModelRefused
from attestation import attesters, keyrelease
from attestation.artifacts import (
    AGENT_CODE,
    AGENT_CODE_PACKAGES,
    AGENT_CONFIG,
    AGENT_DEPENDENCIES,
    AGENT_DEPS,
    code_digest,
    deps_digest,
    key_context,
    measured_digest,
    model_aad,
    model_component,
)
from attestation.errors import AttestationError
from attestation.responder import AttestationResponder
from edgeward import __version__
from edgeward.bytecode import isolate
from edgeward.mqtt.session import BrokerURL, MqttConnectError, MqttError, MqttSession, Will
from edgeward.mqtt.topics import TopicKind, node_topic
from edgeward.security.tls import grpc_aio_channel
from edgeward.v1 import api_pb2, api_pb2_grpc, attestation_pb2, node_pb2
from edgeward.wire import (
    FINAL_STATUS_SEQ,
    MAX_HELLO_PROFILES,
    DropCounter,
    WireError,
    decode_command,
    node_message,
    now_ms,
)

from .config import AgentConfig, FaultInjection
from .multiexit import MultiExitHost
from .runtime import ArtifactError, Runtime

log = logging.getLogger(__name__)
T = TypeVar("T")

SEEN_COMMANDS = 4096
# Commands run in lanes: in order within a lane, the lanes side by side. Attestation has its own, so
# a challenge never waits behind a replica change (an unload, a wipe); every command that changes the
# replicas shares the default lane, so their order on the node is the order they were sent in.
LANES = {"attest": "attestation"}
DEFAULT_LANE = "replicas"
DOWNLOAD_TIMEOUT_S = 60.0
# A download that ends with one of these codes is tried again after a jittered, doubling pause: the
# artifact server was busy, restarting or out of reach for a moment (after an apply to a 10,000-node
# fleet, thousands of downloads start together). Other codes (NOT_FOUND, a revoked model's
# FAILED_PRECONDITION, PERMISSION_DENIED) and a stream of the wrong shape fail the replica at once.
TRANSIENT_DOWNLOAD_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.ABORTED,
    }
)
DOWNLOAD_RETRY_S = 180.0  # transient failures are tried again for this long, then the replica fails
DOWNLOAD_BACKOFF_S = (1.0, 15.0)  # the pauses' first and largest bound (full jitter: 0 up to the bound)
# At stop, the OFFLINE status is written before the DISCONNECT (so the broker has it either way);
# its PUBACK is awaited this long at most: a slow broker must not hold a shutdown for its timeout.
GOODBYE_S = 2.0
CONNECT_BACKOFF_S = (0.5, 15.0)  # first and largest delay between broker connection attempts
# After a reconnect, buffered telemetry waits this long before it is replayed: the orchestrator
# (which reconnects within a second, ORCHESTRATOR_RECONNECT_S) must have re-subscribed first, or a
# broker without persistence would have no one to deliver the replay to.
REPLAY_SETTLE_S = 1.5
LEASE_EXPIRED = "agent.attestation.expired"
PROFILE_RUNS = 30  # inferences per model profile, after PROFILE_WARMUP
PROFILE_WARMUP = 3
MAX_PROFILES = MAX_HELLO_PROFILES  # newest kept in the hello: the orchestrator refuses more
_ENERGY_SOURCE = {"measured": node_pb2.ENERGY_SOURCE_MEASURED, "modelled": node_pb2.ENERGY_SOURCE_MODELLED}


_SHA256_RE = re.compile(r"[0-9a-f]{64}")


def _cost_pb(cost: CostModel) -> node_pb2.CostModel:
    return node_pb2.CostModel(
        invoke_overhead_s=cost.invoke_overhead_s,
        macs_per_s=cost.macs_per_s,
        elements_per_s=cost.elements_per_s,
        layer_overhead_s=cost.layer_overhead_s,
        link_bytes_per_s=cost.link_bytes_per_s,
        weight_cache_bytes=cost.weight_cache_bytes,
    )


def _is_sha256(text: str) -> bool:
    return bool(_SHA256_RE.fullmatch(text))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_durably(path: Path) -> None:
    path.unlink(missing_ok=True)
    _fsync_dir(path.parent)


class NodeAgent:
    """``async with NodeAgent(config) as agent:`` runs the node until the block is left.

    Hollow nodes (``edgeward sim-fleet``: many agents in one process) pass a shared ``pool`` for
    blocking work and profiles, shared gRPC ``channels`` for artifact downloads, and
    ``serve_inference=False`` (their backend does no inference work); each still has its own MQTT
    session, identity, attester and runtime.
    """

    def __init__(
        self,
        config: AgentConfig,
        *,
        pool: ThreadPoolExecutor | None = None,
        channels: dict[str, grpc.aio.Channel] | None = None,
        serve_inference: bool = True,
    ) -> None:
        self.config = config
        self.node_id = config.node_id
        self.drops = DropCounter()
        self.boot_ms = now_ms()
        self.inference_port = 0
        self._serve_inference = serve_inference
        self._own_pool = pool is None
        self._pool = pool or ThreadPoolExecutor(2, thread_name_prefix=f"agent-{self.node_id}")
        # Inference on threads of its own: a flood of requests must not hold up the node's control
        # work (attestation answers, unlocks, wipes) until its attestation result expires.
        self._infer_pool = pool or ThreadPoolExecutor(2, thread_name_prefix=f"agent-{self.node_id}-infer")
        self._backends: dict[str, Backend] = {}
        self._availability: dict[str, str] = {}
        self._seen: OrderedDict[str, asyncio.Future[node_pb2.CommandAck]] = OrderedDict()
        self._status_seq = 0
        self._epoch = 0  # the current broker connection's (Status.epoch): its start, unix ms
        self._status_dirty = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._background: set[asyncio.Task[Any]] = set()  # _spawn's: acknowledgements, answers in flight
        self._answer_ack_delay_s = config.fault_injection.answer_ack_delay_ms / 1e3
        self._mqtt: MqttSession | None = None
        self._server: grpc.aio.Server | None = None
        self._own_channels = channels is None
        self._channels: dict[str, grpc.aio.Channel] = {} if channels is None else channels
        self._downloading: Counter[str] = Counter()  # downloads in progress per artifact endpoint
        self._started = time.monotonic()
        # Telemetry taken while the broker is away: serialized NodeMessages (stamped when taken),
        # oldest first, bounded by telemetry_buffer; _replay sends them once the broker is back.
        self._backlog: deque[bytes] = deque()
        self._backlog_wake = asyncio.Event()
        self.telemetry_dropped = 0  # evicted from a full backlog, since start
        self.telemetry_replayed = 0
        self._dropped_unreported = 0
        # Edge autonomy: when the node last answered an attestation challenge (monotonic).
        self._attested_at: float | None = None
        # Model profiles: measured once per (model, version, accelerator), on their own thread so
        # serving never waits for them; the plaintext is held only until its model is profiled.
        self._profile_pool = pool or ThreadPoolExecutor(1, thread_name_prefix=f"agent-{self.node_id}-profile")
        self._profile_wake = asyncio.Event()
        self._profiles: OrderedDict[tuple[str, str, str], node_pb2.ModelProfile] = OrderedDict()
        self._profile_failed: set[tuple[str, str, str]] = set()
        self._unprofiled: dict[str, tuple[str, str, bytes]] = {}  # sha256 -> (name, version, model)
        self.runtime: Runtime
        self.pipelines: MultiExitHost | None = None
        self.responder: AttestationResponder | None = None

    async def run_blocking(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, partial(fn, *args))

    async def run_inference(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._infer_pool, partial(fn, *args))

    def _topic(self, kind: TopicKind) -> str:
        return node_topic(self.node_id, kind, self.config.broker.topic_prefix)

    # ------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> NodeAgent:
        try:
            await self._start()
        except BaseException:
            await self._stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stop()

    async def _start(self) -> None:
        cfg = self.config
        isolate()  # modules imported from now on: compiled from their measured sources (in-process agents)
        for acc in cfg.accelerators:
            options = {"power": {"idle_w": cfg.power.idle_w, "active_w": cfg.power.active_w}, **acc.options}
            try:
                self._backends[acc.kind] = await self.run_blocking(registry.create, acc.kind, options)
                self._availability[acc.kind] = "ok"
            except Exception as err:  # a missing vendor library disables that backend only
                reason = getattr(err, "reason", None) or str(err)
                self._availability[acc.kind] = f"unavailable: {reason}"
                log.warning("accelerator %s unavailable: %s", acc.kind, err)
        token = cfg.enrollment_token.get_secret_value() if cfg.enrollment_token else ""
        responder = AttestationResponder(
            self.node_id, attesters.create(cfg.attestation), enrollment_token=token
        )
        await self.run_blocking(responder.open)
        self.responder = responder
        await self.run_blocking(self._measure_platform)
        faults = cfg.fault_injection
        serving: dict[str, Backend] = dict(self._backends)
        if faults != FaultInjection():
            log.warning("fault injection on: %s", faults.model_dump())
        if faults.inference_delay_ms or faults.inference_jitter_ms:
            serving = {kind: FaultInjectedBackend(b, faults) for kind, b in serving.items()}
        self.runtime = Runtime(
            serving,
            cfg.state_dir / self.node_id / "models",
            self.run_blocking,
            self._status_changed,
            self._unlock,
            run_inference=self.run_inference,
        )
        tls = cfg.tls.tls if cfg.tls is not None else None
        self.pipelines = MultiExitHost(self.runtime, self.node_id, tls)
        if self._serve_inference:
            from .inference_server import serve

            self._server, self.inference_port = await serve(
                self.runtime, cfg.inference_bind, self.pipelines, tls
            )
        await self.run_blocking(self._finish_wipes)  # a wipe cut short by a crash ends before any load
        self.runtime.wiped |= await self.run_blocking(self._read_wiped)
        await self._connect()
        await self._announce()
        self._tasks += [
            asyncio.create_task(self._commands(), name=f"{self.node_id}-commands"),
            asyncio.create_task(self._heartbeat(), name=f"{self.node_id}-heartbeat"),
            asyncio.create_task(self._replay(), name=f"{self.node_id}-replay"),
            asyncio.create_task(self._autonomy(), name=f"{self.node_id}-autonomy"),
            asyncio.create_task(self._status_writer(), name=f"{self.node_id}-status"),
            asyncio.create_task(self._profiler(), name=f"{self.node_id}-profiler"),
        ]
        log.info(
            "node %s up: inference on %s, broker %s", self.node_id, self.inference_endpoint, cfg.broker.url
        )
        if cfg.tls is None:
            log.warning(
                "PLAINTEXT MODE: node %s talks to the broker and the orchestrator unauthenticated and "
                "unencrypted; for the local demo only (set 'tls', docs/security.md)",
                self.node_id,
            )

    async def _connect(self) -> None:
        """Connect to the broker, retrying with backoff: a device may boot before its broker.
        Once connected, the session reconnects by itself and ``_heartbeat`` re-announces."""
        b = self.config.broker
        url = BrokerURL.parse(b.url, ca_file=b.ca_file, cert_file=b.cert_file, key_file=b.key_file)
        delay = CONNECT_BACKOFF_S[0]
        while True:
            session = MqttSession(
                url,
                f"edgeward-node-{self.node_id}",
                will=self._next_will,  # asked anew at every (re)connect: each will names its connection
                max_payload=b.max_payload,
            )
            try:
                await session.__aenter__()
            except MqttConnectError as err:
                log.warning("broker not reachable (%s); retrying in %.1f s", err, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, CONNECT_BACKOFF_S[1])
                continue
            self._mqtt = session
            await session.subscribe(self._topic(TopicKind.CMD), qos=1)
            return

    def _offline(self) -> bytes:
        """The OFFLINE status closing the current connection: its epoch, the final sequence number."""
        status = node_pb2.Status(
            state=node_pb2.NODE_STATE_OFFLINE, epoch=self._epoch, status_seq=FINAL_STATUS_SEQ
        )
        return node_message(self.node_id, status=status).SerializeToString()

    def _next_will(self) -> Will:
        """The last will of the connection about to be made, which starts a new epoch. Its
        sent_unix_ms is this moment, older than the statuses it will replace: consumers order
        statuses by (epoch, status_seq) instead (edgeward.wire.status_key)."""
        self._epoch = max(self._epoch + 1, now_ms())
        return Will(self._topic(TopicKind.STATUS), self._offline(), qos=1, retain=True)

    async def _stop(self) -> None:
        for task in [*self._tasks, *self._background]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._background, return_exceptions=True)
        self._tasks.clear()
        if self._own_pool:
            self._profile_pool.shutdown(wait=True)  # a profile still running must not outlive its backend
        self._unprofiled.clear()
        if self._mqtt is not None:
            try:
                if not self._mqtt.connected:  # no broker to say goodbye to (nor to wait for)
                    raise MqttError("not connected")
                async with asyncio.timeout(GOODBYE_S):
                    await self._mqtt.publish(
                        self._topic(TopicKind.STATUS), self._offline(), qos=1, retain=True
                    )
            except Exception as err:
                log.debug("could not publish offline status: %s", err)
            await self._mqtt.__aexit__(None, None, None)
            self._mqtt = None
        if self._server is not None:
            await self._server.stop(grace=0.5)
            self._server = None
        if self.pipelines is not None:
            await self.pipelines.close()
        if hasattr(self, "runtime"):
            await self.runtime.close()
        if self._own_channels:
            for channel in self._channels.values():
                await channel.close()
            self._channels.clear()
        for backend in self._backends.values():
            await self.run_blocking(backend.close)
        if self.responder is not None:
            await self.run_blocking(self.responder.close)
            self.responder = None
        if self._own_pool:
            self._infer_pool.shutdown(wait=True)
            self._pool.shutdown(wait=True)

    def drop_counts(self) -> dict[str, int]:
        """Refused commands by reason, including those the session dropped for size."""
        return self.drops.with_oversize(self._mqtt.stats.dropped_oversize if self._mqtt is not None else 0)

    @property
    def inference_endpoint(self) -> str:
        if not self._serve_inference:
            return ""
        host = self.config.inference_bind.rsplit(":", 1)[0]
        return f"{host}:{self.inference_port}"

    # ------------------------------------------------------------ publishing

    def hello(self) -> node_pb2.Hello:
        cfg = self.config
        accelerators = []
        for acc in cfg.accelerators:
            backend = self._backends.get(acc.kind)
            pb = node_pb2.Accelerator(kind=acc.kind, availability=self._availability.get(acc.kind, ""))
            if backend is not None:
                caps = backend.capabilities
                pb.device, pb.simulated, pb.memory_bytes, pb.peak_gops = (
                    caps.device,
                    caps.simulated,
                    caps.memory_bytes,
                    caps.peak_gops,
                )
                pb.dtypes.extend(sorted(caps.dtypes))
                pb.idle_w, pb.active_w = caps.power.idle_w, caps.power.active_w
                if caps.cost is not None:
                    pb.cost.CopyFrom(_cost_pb(caps.cost))
            accelerators.append(pb)
        return node_pb2.Hello(
            agent_version=__version__,
            labels=cfg.labels,
            hardware_profile=cfg.hardware_profile,
            accelerators=accelerators,
            memory_bytes=cfg.memory_bytes,
            inference_endpoint=self.inference_endpoint,
            max_replicas=cfg.max_replicas,
            boot_unix_ms=self.boot_ms,
            profiles=list(self._profiles.values()),
        )

    def status(self) -> node_pb2.Status:
        self._status_seq += 1
        return node_pb2.Status(
            state=node_pb2.NODE_STATE_ONLINE,
            status_seq=self._status_seq,
            epoch=self._epoch,
            replicas=[s.report() for s in self.runtime.replicas.values()],
        )

    async def _publish(self, kind: TopicKind, *, qos: int = 0, retain: bool = False, **body: Any) -> None:
        assert self._mqtt is not None
        payload = node_message(self.node_id, **body).SerializeToString()
        await self._mqtt.publish(self._topic(kind), payload, qos=qos, retain=retain)
        if qos and self._answer_ack_delay_s and kind in (TopicKind.EVENTS, TopicKind.EVIDENCE):
            await asyncio.sleep(self._answer_ack_delay_s)  # fault injection: a broker that acknowledges late

    async def _announce(self) -> None:
        await self._publish(TopicKind.HELLO, qos=1, retain=True, hello=self.hello())
        await self._publish(TopicKind.STATUS, qos=1, retain=True, status=self.status())

    def _status_changed(self) -> None:
        self._status_dirty.set()
        self._profile_wake.set()

    # ------------------------------------------------------------ model profiles

    @property
    def profiles(self) -> list[node_pb2.ModelProfile]:
        return list(self._profiles.values())

    async def _profiler(self) -> None:
        """Profile each model once it runs here: on the accelerator it runs on and, with
        ``profile_alternatives``, on every other accelerator of this node that can run it (what the
        scheduler compares an energy move with); re-publish the hello after each profile."""
        while True:
            await self._profile_wake.wait()
            self._profile_wake.clear()
            for state in list(self.runtime.replicas.values()):
                spec, backend = state.spec, state.backend
                held = self._unprofiled.get(spec.sha256)
                if state.phase != node_pb2.REPLICA_PHASE_RUNNING or backend is None or held is None:
                    continue
                for kind in self._profile_kinds(backend.kind):
                    key = (spec.model_name, spec.model_version, kind)
                    if key in self._profiles or key in self._profile_failed:
                        continue
                    if self._loading():  # serving first: profiles wait for the last load (it wakes us)
                        break
                    await self._profile(
                        key, ModelArtifact(*held, spec.sha256), alternative=kind != backend.kind
                    )
            # Keep a plaintext model only while a replica of it still waits for a profile.
            done = self._profiles.keys() | self._profile_failed
            waiting = {
                s.spec.sha256
                for s in self.runtime.replicas.values()
                if s.backend is None
                or any(
                    (s.spec.model_name, s.spec.model_version, k) not in done
                    for k in self._profile_kinds(s.backend.kind)
                )
            }
            for digest in [d for d in self._unprofiled if d not in waiting]:
                del self._unprofiled[digest]

    def _profile_kinds(self, kind: str) -> list[str]:
        """The accelerators a model running on ``kind`` is profiled on, ``kind`` first."""
        if not self.config.profile_alternatives:
            return [kind]
        return [kind, *(k for k in sorted(self._backends) if k != kind)]

    async def _profile(
        self, key: tuple[str, str, str], artifact: ModelArtifact, *, alternative: bool
    ) -> None:
        """One profile (the artifact is checked when unlocked, and as it is read); publish it."""
        run = partial(self._backends[key[2]].profile, artifact, PROFILE_RUNS, warmup=PROFILE_WARMUP)
        try:
            profile = await asyncio.get_running_loop().run_in_executor(self._profile_pool, run)
        except ModelRefused as err:  # an alternative that cannot run the model: nothing to compare
            self._profile_failed.add(key)
            log.log(
                logging.INFO if alternative else logging.WARNING, "%s:%s not profiled on %s: %s", *key, err
            )
            return
        except Exception as err:  # a model that serves but cannot be profiled keeps serving
            self._profile_failed.add(key)
            log.warning("profiling %s:%s on %s failed: %s", *key, err)
            return
        self._profiles[key] = node_pb2.ModelProfile(
            model_name=key[0],
            model_version=key[1],
            accelerator=key[2],
            runs=profile.runs,
            latency_p50_ms=profile.p50_ms,
            latency_p95_ms=profile.p95_ms,
            energy_j=profile.joules_per_inference,
            energy_source=_ENERGY_SOURCE.get(profile.energy_source, node_pb2.ENERGY_SOURCE_MODELLED),
            profiled_unix_ms=now_ms(),
        )
        while len(self._profiles) > MAX_PROFILES:
            self._profiles.popitem(last=False)
        log.info("profiled %s:%s on %s: p95 %.3f ms", *key, profile.p95_ms)
        try:
            await self._publish(TopicKind.HELLO, qos=1, retain=True, hello=self.hello())
        except Exception as err:  # broker away: the next profile or reconnect re-announces
            log.warning("hello with profiles not published: %s", err)

    def _loading(self) -> bool:
        return any(s.phase == node_pb2.REPLICA_PHASE_LOADING for s in self.runtime.replicas.values())

    async def _status_writer(self) -> None:
        while True:
            await self._status_dirty.wait()
            self._status_dirty.clear()
            try:
                await self._publish(TopicKind.STATUS, qos=1, retain=True, status=self.status())
            except Exception as err:  # broker away: the heartbeat publishes it again later
                log.warning("status not published: %s", err)
            await asyncio.sleep(0.05)  # coalesce bursts of changes into one message

    async def _heartbeat(self) -> None:
        assert self._mqtt is not None
        reconnects = self._mqtt.stats.reconnects
        last = time.monotonic()
        last_energy = 0.0
        cfg = self.config
        while True:
            await asyncio.sleep(cfg.heartbeat_s)
            try:
                if self._mqtt.stats.reconnects != reconnects:
                    await self._announce()  # the broker may have lost our retained messages
                    reconnects = self._mqtt.stats.reconnects  # only once announced: else next beat
                else:
                    self._status_dirty.set()
            except asyncio.CancelledError:
                raise
            except Exception as err:  # broker away again: the telemetry below is buffered
                log.warning("announce after reconnect failed: %s", err)
            try:
                now = time.monotonic()
                interval = now - last
                last = now
                rt = self.runtime
                # Modelled board energy: idle power all the time, plus what the backends report
                # for the inference work above idle.
                energy = cfg.power.idle_w * (now - self._started) + rt.energy_j
                power = (energy - last_energy) / interval if interval > 0 else 0.0
                last_energy = energy
                telemetry = node_pb2.Telemetry(
                    power_w=power,
                    energy_j=energy,
                    energy_source=node_pb2.ENERGY_SOURCE_MEASURED
                    if rt.energy_source == "measured"
                    else node_pb2.ENERGY_SOURCE_MODELLED,
                    cpu_utilisation=min(1.0, rt.busy_s / max(now - self._started, 1e-9)),
                    queue_depth=rt.in_flight,
                    models=rt.model_stats(),
                    temperature_c=float("nan"),
                    interval_s=interval,
                    exits=self.pipelines.exit_stats() if self.pipelines is not None else [],
                )
                await self._send_telemetry(telemetry)
            except asyncio.CancelledError:
                raise
            except Exception as err:
                log.warning("heartbeat failed: %s", err)

    # ------------------------------------------------------------ telemetry while the broker is away

    async def _send_telemetry(self, telemetry: node_pb2.Telemetry) -> None:
        """Publish a sample now (QoS 0) or, while the broker is away or a backlog is being
        replayed (order is kept), buffer it."""
        assert self._mqtt is not None
        payload = node_message(self.node_id, telemetry=telemetry).SerializeToString()
        if self._mqtt.connected and not self._backlog:
            try:
                await self._mqtt.publish(self._topic(TopicKind.TELEMETRY), payload)
                return
            except MqttError as err:  # the connection dropped under us
                log.debug("telemetry buffered: %s", err)
        if len(self._backlog) >= self.config.telemetry_buffer:
            self._backlog.popleft()  # the oldest sample goes first
            self.telemetry_dropped += 1
            self._dropped_unreported += 1
        self._backlog.append(payload)
        self._backlog_wake.set()

    @property
    def telemetry_buffered(self) -> int:
        return len(self._backlog)

    async def _replay(self) -> None:
        """Send buffered samples, oldest first, at telemetry_replay_rate once the broker is back.
        QoS 1: a sample leaves the buffer only when the broker has acknowledged it. Then report what
        was replayed and dropped (event ``agent.telemetry.replayed``)."""
        assert self._mqtt is not None
        topic = self._topic(TopicKind.TELEMETRY)
        gap = 1.0 / self.config.telemetry_replay_rate
        while True:
            await self._backlog_wake.wait()
            self._backlog_wake.clear()
            replayed = 0
            while self._backlog:
                if not self._mqtt.connected:
                    await asyncio.sleep(0.1)
                    continue
                if (settle := REPLAY_SETTLE_S - self._mqtt.connected_for) > 0:
                    await asyncio.sleep(settle)
                    continue
                payload = self._backlog[0]
                try:
                    await self._mqtt.publish(topic, payload, qos=1)
                except MqttError as err:
                    log.debug("telemetry replay paused: %s", err)
                    await asyncio.sleep(0.5)
                    continue
                if self._backlog and self._backlog[0] is payload:  # not evicted meanwhile
                    self._backlog.popleft()
                replayed += 1
                self.telemetry_replayed += 1
                await asyncio.sleep(gap)
            if not replayed and not self._dropped_unreported:
                continue
            dropped = self._dropped_unreported
            event = node_pb2.Event(
                id="agent.telemetry.replayed",
                severity=node_pb2.SEVERITY_WARNING if dropped else node_pb2.SEVERITY_INFO,
                message=f"{replayed} telemetry samples buffered while the broker was away were replayed; "
                f"{dropped} dropped (buffer of {self.config.telemetry_buffer})",
                attributes={
                    "replayed": str(replayed),
                    "dropped": str(dropped),
                    "dropped_total": str(self.telemetry_dropped),
                },
            )
            try:
                await self._publish(TopicKind.EVENTS, qos=1, event=event)
                self._dropped_unreported -= dropped
            except MqttError as err:
                log.warning("telemetry replay report not published: %s", err)
            log.info("replayed %d buffered telemetry samples, %d dropped", replayed, dropped)

    # ------------------------------------------------------------ edge autonomy

    async def _autonomy(self) -> None:
        """Keep serving while the orchestrator is away, until the attestation lease runs out: then
        stop every running replica (unloaded, reported Failed with reason agent.attestation.expired;
        Failed is final: the orchestrator replaces them once the node is attested again)."""
        lease = self.config.attestation_lease_s
        while True:
            since = self._started if self._attested_at is None else self._attested_at
            left = since + lease - time.monotonic()
            if left > 0:
                # Until the lease would run out, not a poll (2,500 hollow nodes polling every second
                # took 6 % of their process's loop); a quote answered meanwhile moved its end.
                await asyncio.sleep(left)
            else:
                await self._expire_replicas(lease - left, lease)
                # While it stays expired, a replica started since (from the cache) stops as well.
                await asyncio.sleep(min(1.0, lease / 4))

    async def _expire_replicas(self, idle: float, lease: float) -> None:
        running = [s for s in self.runtime.replicas.values() if s.phase == node_pb2.REPLICA_PHASE_RUNNING]
        if not running:
            return
        message = (
            f"no attestation for {idle:.1f} s (lease {lease:g} s): serving stopped until the node is "
            "attested again"
        )
        for state in running:
            backend, handle = state.backend, state.handle
            # Failed first: from here on the inference server no longer resolves the replica.
            state.phase, state.reason, state.message = node_pb2.REPLICA_PHASE_FAILED, LEASE_EXPIRED, message
            state.backend = state.handle = None
            if backend is not None and handle is not None:
                await self.run_blocking(backend.unload, handle)
        log.warning("%d replicas stopped: %s", len(running), message)
        self._status_changed()
        event = node_pb2.Event(
            id=LEASE_EXPIRED,
            severity=node_pb2.SEVERITY_WARNING,
            message=message,
            attributes={"replicas": str(len(running)), "lease_s": f"{lease:g}", "idle_s": f"{idle:.1f}"},
        )
        try:
            await self._publish(TopicKind.EVENTS, qos=1, event=event)
        except MqttError as err:
            log.debug("lease expiry event not published: %s", err)

    # ------------------------------------------------------------ commands

    async def _commands(self) -> None:
        """Take commands off the wire and hand each to its lane (``LANES``): a lane executes its
        commands one at a time, in arrival order, and the lanes run side by side, so a challenge never
        waits behind a replica change. No lane waits for an acknowledgement's PUBACK."""
        assert self._mqtt is not None
        lanes: dict[str, asyncio.Queue[tuple[node_pb2.Command, asyncio.Future[node_pb2.CommandAck]]]] = {
            lane: asyncio.Queue() for lane in {*LANES.values(), DEFAULT_LANE}
        }
        workers = [
            asyncio.create_task(self._lane(queue), name=f"{self.node_id}-lane-{lane}")
            for lane, queue in lanes.items()
        ]
        try:
            async for message in self._mqtt.messages():
                try:
                    cmd = decode_command(
                        message.payload, node_id=self.node_id, max_payload=self.config.broker.max_payload
                    )
                except WireError as err:
                    self.drops.drop(err)
                    log.debug("dropped command: %s", err)
                    continue
                outcome = self._seen.get(cmd.command_id)
                if outcome is not None:  # redelivered: acknowledged (once it is done), not run again
                    self._spawn(self._ack_duplicate(outcome))
                    continue
                outcome = self._seen[cmd.command_id] = asyncio.get_running_loop().create_future()
                while len(self._seen) > SEEN_COMMANDS:
                    self._seen.popitem(last=False)
                lanes[LANES.get(cmd.WhichOneof("body"), DEFAULT_LANE)].put_nowait((cmd, outcome))
        finally:
            for worker in workers:
                worker.cancel()
            await asyncio.gather(*workers, return_exceptions=True)

    async def _lane(
        self, queue: asyncio.Queue[tuple[node_pb2.Command, asyncio.Future[node_pb2.CommandAck]]]
    ) -> None:
        while True:
            cmd, outcome = await queue.get()
            done = await self._execute(cmd)
            self._spawn(self._settle(done, outcome))

    async def _settle(
        self,
        done: node_pb2.CommandAck | asyncio.Task[node_pb2.CommandAck],
        outcome: asyncio.Future[node_pb2.CommandAck],
    ) -> None:
        ack = done if isinstance(done, node_pb2.CommandAck) else await done
        outcome.set_result(ack)
        await self._ack(ack)

    async def _ack_duplicate(self, outcome: asyncio.Future[node_pb2.CommandAck]) -> None:
        ack = await asyncio.shield(outcome)
        await self._ack(
            node_pb2.CommandAck(command_id=ack.command_id, ok=ack.ok, reason=ack.reason, duplicate=True)
        )

    def _spawn(self, work: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """Run ``work`` beside the lanes; cancelled when the agent stops."""
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _execute(
        self, cmd: node_pb2.Command
    ) -> node_pb2.CommandAck | asyncio.Task[node_pb2.CommandAck]:
        """Execute ``cmd`` on its lane: its acknowledgement, or, when what is left of the command is
        only waiting for the broker (a published answer's PUBACK), a task that ends with it."""
        body = cmd.WhichOneof("body")
        try:
            follow_up = await self._run(cmd, body)
        except Exception as err:
            return self._refusal(cmd, body, err)
        if follow_up is None:
            return node_pb2.CommandAck(command_id=cmd.command_id, ok=True)
        return self._spawn(self._conclude(cmd, body, follow_up))

    async def _conclude(
        self, cmd: node_pb2.Command, body: str | None, follow_up: Awaitable[None]
    ) -> node_pb2.CommandAck:
        try:
            await follow_up
        except Exception as err:
            return self._refusal(cmd, body, err)
        return node_pb2.CommandAck(command_id=cmd.command_id, ok=True)

    def _refusal(self, cmd: node_pb2.Command, body: str | None, err: Exception) -> node_pb2.CommandAck:
        if isinstance(err, AttestationError):
            log.warning("command %s (%s) refused: %s", cmd.command_id, body, err)
            return node_pb2.CommandAck(command_id=cmd.command_id, ok=False, reason=err.reason)
        log.error("command %s (%s) failed", cmd.command_id, body, exc_info=err)
        return node_pb2.CommandAck(command_id=cmd.command_id, ok=False, reason=f"agent.command.failed: {err}")

    async def _run(self, cmd: node_pb2.Command, body: str | None) -> Awaitable[None] | None:
        if body == "deploy":
            self.runtime.deploy(cmd.deploy, self._fetch)
        elif body == "undeploy":
            await self.runtime.undeploy(cmd.undeploy.replica_id)
        elif body == "sync":
            await self.runtime.sync(list(cmd.sync.replicas), self._fetch)
        elif body == "attest":
            return await self._attest(cmd.attest.message)
        elif body == "wipe":
            return await self._wipe(cmd.wipe)
        elif body == "pipelines" and self.pipelines is not None:
            self.pipelines.configure(cmd.pipelines.pipelines)
        elif body == "mitigate" and self.pipelines is not None:
            self.pipelines.mitigate(cmd.mitigate.mitigations)
        elif body == "hello":  # an orchestrator lacks it: published again, acknowledged at its PUBACK
            return self._say_hello()
        return None

    async def _say_hello(self) -> None:
        # Built when it is sent, not when the command was read: a hello published in between (new
        # profiles) is not overwritten by an older one.
        await self._publish(TopicKind.HELLO, qos=1, retain=True, hello=self.hello())

    async def _ack(self, ack: node_pb2.CommandAck) -> None:
        event = node_pb2.Event(id="agent.command.ack", severity=node_pb2.SEVERITY_INFO, ack=ack)
        try:
            await self._publish(TopicKind.EVENTS, qos=1, event=event)
        except Exception as err:
            log.warning("ack %s not published: %s", ack.command_id, err)

    # ------------------------------------------------------------ attestation

    def _measure_platform(self) -> None:
        """Blocking: measure what makes this node what it is, in a fixed order, before it connects."""
        assert self.responder is not None
        self.responder.measure_digest(
            AGENT_CODE, measured_digest(code_digest(), AGENT_CODE_PACKAGES), ",".join(AGENT_CODE_PACKAGES)
        )
        self.responder.measure_digest(
            AGENT_DEPS, measured_digest(deps_digest(), AGENT_DEPENDENCIES), ",".join(AGENT_DEPENDENCIES)
        )
        self.responder.measure(AGENT_CONFIG, self.config.model_dump_json().encode(), "AgentConfig")
        for kind in sorted(self._backends):
            measurements = getattr(self._backends[kind], "measurements", None)
            for component, digest in sorted((measurements() if measurements else {}).items()):
                self.responder.measure_digest(component, bytes.fromhex(digest), kind)

    async def _attest(self, message: bytes) -> Awaitable[None]:
        """Answer the verifier: enroll when asked with an empty message, else answer its challenge.
        The answer is on its way (queued in order) when this returns; the returned task waits for the
        broker's acknowledgement."""
        assert self.responder is not None
        if message:
            payload = await self.run_blocking(self.responder.handle, message)
        else:
            payload = await self.run_blocking(self.responder.enrollment_request)
        quote = attestation_pb2.AttesterMessage.FromString(payload).WhichOneof("body") == "evidence"
        return self._spawn(self._send_evidence(payload, quote=quote))

    async def _send_evidence(self, payload: bytes, *, quote: bool) -> None:
        await self._publish(TopicKind.EVIDENCE, qos=1, evidence=node_pb2.Evidence(payload=payload))
        if quote:
            # A fresh quote is with the verifier: the result it issues outlives the lease from now.
            self._attested_at = time.monotonic()

    async def _wipe(self, wipe: node_pb2.Wipe) -> Awaitable[None]:
        """Quarantine (no model named): unload everything, delete the cache. Model wipe: only that
        model's replicas (and with them its released keys) and its cached artifacts, crash-consistently
        (``_wipe_model``). Confirmed with ``agent.wipe.done``, which names the wipe; the returned task
        waits for the broker's acknowledgement of it."""
        if wipe.model_name:
            replicas, files = await self._wipe_model(wipe)
        else:
            replicas, files = await self.runtime.wipe()
        log.warning(
            "wiped on the orchestrator's order (%s%s): %d replicas, %d cached artifacts",
            wipe.reason,
            f" {wipe.model_name}:{wipe.model_version or '*'}" if wipe.model_name else "",
            replicas,
            files,
        )
        attributes = {"reason": wipe.reason, "replicas": str(replicas), "files": str(files)}
        if wipe.model_name:
            attributes |= {"wipe_id": wipe.wipe_id, "model": wipe.model_name, "version": wipe.model_version}
        event = node_pb2.Event(
            id="agent.wipe.done",
            severity=node_pb2.SEVERITY_WARNING,
            message=f"{replicas} replicas unloaded, {files} cached artifacts deleted",
            attributes=attributes,
        )
        return self._spawn(self._publish(TopicKind.EVENTS, qos=1, event=event))

    async def _wipe_model(self, wipe: node_pb2.Wipe) -> tuple[int, int]:
        """Record the intent durably, unload the model's replicas (their specs hold the wrapped keys),
        delete every cache file named by the wiped digests, then drop the record. A crash in
        between is finished by ``_finish_wipes`` at the next start, before anything loads."""
        digests = [d for d in wipe.sha256 if _is_sha256(d)]
        wiped = {(d, wipe.model_name, wipe.model_version or "*") for d in digests}
        self.runtime.wiped |= wiped  # no load of them starts from here on
        await self.run_blocking(self._remember_wiped, wiped)
        journal = await self.run_blocking(self._journal_wipe, wipe.wipe_id or "unnamed", digests)
        doomed = [
            rid
            for rid, state in self.runtime.replicas.items()
            if state.spec.sha256 in digests
            or (
                state.spec.model_name == wipe.model_name
                and (not wipe.model_version or state.spec.model_version == wipe.model_version)
            )
        ]
        for rid in doomed:
            await self.runtime.undeploy(rid)
        files = await self.run_blocking(self._delete_artifacts, digests)
        await self.run_blocking(_remove_durably, journal)
        return len(doomed), files

    @property
    def _wipe_dir(self) -> Path:
        return self.config.state_dir / self.node_id / "wipes"

    @property
    def _wiped_file(self) -> Path:
        return self.config.state_dir / self.node_id / "wiped"

    def _read_wiped(self) -> set[tuple[str, str, str]]:
        """Blocking: the model versions wiped on this node (``Runtime.wiped``), kept across
        restarts: a wiped model version is revoked for good. An unreadable file is reported and
        read as empty (the orchestrator's revocation still holds); leftovers of an interrupted
        write are removed."""
        for tmp in self._wiped_file.parent.glob(".wiped-*"):
            tmp.unlink(missing_ok=True)
        try:
            rows = json.loads(self._wiped_file.read_bytes())
            return {
                (d, n, v) for d, n, v in rows if _is_sha256(d) and isinstance(n, str) and isinstance(v, str)
            }
        except FileNotFoundError:
            return set()
        except (OSError, ValueError, TypeError) as err:
            log.error(
                "%s is unreadable (%s): wiped models are not refused by this node", self._wiped_file, err
            )
            return set()

    def _remember_wiped(self, wiped: set[tuple[str, str, str]]) -> None:
        """Blocking: add ``wiped`` to the wiped file (rewritten whole, synced, renamed into place)."""
        known = self._read_wiped()
        if known >= wiped:
            return
        self._wiped_file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self._wiped_file.parent, prefix=".wiped-")
        with os.fdopen(fd, "w") as fh:
            json.dump(sorted(known | wiped), fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self._wiped_file)
        _fsync_dir(self._wiped_file.parent)

    def _journal_wipe(self, wipe_id: str, digests: list[str]) -> Path:
        """Blocking: write ``wipes/<id>`` (the digests to delete), synced, before deleting anything."""
        self._wipe_dir.mkdir(parents=True, exist_ok=True)
        safe = "".join(c for c in wipe_id if c.isalnum() or c in "-_")[:64] or "unnamed"
        path = self._wipe_dir / safe
        fd, tmp = tempfile.mkstemp(dir=self._wipe_dir, prefix=".tmp-")
        with os.fdopen(fd, "w") as fh:
            fh.write("\n".join(digests))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(self._wipe_dir)
        return path

    def _delete_artifacts(self, digests: list[str]) -> int:
        """Blocking: every cache file named by one of ``digests`` (sealed artifact, and any key or
        sidecar kept beside it), unlinked and the directory synced."""
        cache = self.runtime.cache_dir
        removed = 0
        for digest in digests:
            for path in cache.glob(f"{digest}*"):
                path.unlink(missing_ok=True)
                removed += 1
        _fsync_dir(cache)
        return removed

    def _finish_wipes(self) -> None:
        """Blocking: complete the model wipes a crash interrupted (their journals are still there)."""
        if not self._wipe_dir.is_dir():
            return
        for journal in sorted(self._wipe_dir.iterdir()):
            if journal.name.startswith(".tmp-"):
                journal.unlink(missing_ok=True)
                continue
            digests = [d for d in journal.read_text().split() if _is_sha256(d)]
            removed = self._delete_artifacts(digests)
            _remove_durably(journal)
            log.warning("finished interrupted wipe %s: %d cached artifacts deleted", journal.name, removed)

    def _unlock(self, spec: node_pb2.DeployReplica, sealed: bytes) -> bytes:
        """Blocking: the model inside a sealed artifact, with the data key released to this node;
        measured (``model.<name>``) before anything uses it."""
        assert self.responder is not None
        if not spec.wrapped_key:
            raise ArtifactError("agent.artifact.no_key", "the deployment carries no released key")
        try:
            wrapped = keyrelease.parse_wrapped(spec.wrapped_key)
            expected = key_context(self.node_id, spec.model_name, spec.model_version)
            if wrapped.context != expected:
                raise ArtifactError(
                    "attestation.key.wrong_context", f"key released for {wrapped.context!r}, not {expected!r}"
                )
            data_key = self.responder.unwrap(spec.wrapped_key)
            data = keyrelease.open_sealed(
                data_key, sealed, model_aad(spec.model_name, spec.model_version, spec.sha256)
            )
        except AttestationError as err:
            raise ArtifactError(err.reason, err.detail) from err
        digest = hashlib.sha256(data).digest()
        if digest.hex() != spec.sha256:
            raise ArtifactError(
                "agent.artifact.sha256_mismatch", "the unsealed model does not match its digest"
            )
        # The digest just checked is the model's measurement: hashing tens of MB again costs a restart.
        self.responder.measure_digest(model_component(spec.model_name), digest, spec.model_version)
        self._unprofiled[spec.sha256] = (spec.model_name, spec.model_version, data)
        return data

    # ------------------------------------------------------------ artifacts

    async def _fetch(self, spec: node_pb2.DeployReplica) -> bytes:
        """Download a sealed artifact from the orchestrator's ModelService. Once it is done, the
        channels to other endpoints that no download uses are closed: each orchestrator replica that
        led names its own, and a dead leader's would otherwise stay open for good."""
        endpoint = spec.artifact_endpoint
        channel = self._channels.get(endpoint)
        if channel is None:
            # With a node certificate, mutual TLS (the orchestrator only lets nodes download artifacts).
            tls = self.config.tls.tls if self.config.tls is not None else None
            channel = self._channels[endpoint] = grpc_aio_channel(endpoint, tls)
        self._downloading[endpoint] += 1
        try:
            if delay_ms := self.config.fault_injection.download_delay_ms:
                await asyncio.sleep(delay_ms / 1e3)
            return await download_artifact(api_pb2_grpc.ModelServiceStub(channel), spec)
        finally:
            self._downloading[endpoint] -= 1
            if self._own_channels:  # a pool shared with other agents (hollow nodes) is its owner's
                # Taken out all at once, before the first await: a download that starts meanwhile
                # opens a channel of its own rather than get one being closed.
                idle = [e for e in self._channels if e != endpoint and not self._downloading[e]]
                for channel in [self._channels.pop(e) for e in idle]:
                    await channel.close()


async def download_artifact(
    stub: api_pb2_grpc.ModelServiceStub,
    spec: node_pb2.DeployReplica,
    retry_s: float = DOWNLOAD_RETRY_S,
    backoff_s: tuple[float, float] = DOWNLOAD_BACKOFF_S,
) -> bytes:
    """The sealed artifact of ``spec``, tried again after a transient gRPC failure for ``retry_s``,
    with pauses drawn from 0 up to a doubling bound (a crowd of nodes refused together does not come
    back together). The sealed bytes are checked when they are opened: a retry cannot mix two copies."""
    deadline = time.monotonic() + retry_s
    bound = backoff_s[0]
    for attempt in itertools.count(1):
        try:
            return await _download(stub, spec)
        except grpc.aio.AioRpcError as err:
            pause = random.uniform(0, bound)  # noqa: S311 -- spreading retries, not a secret
            if err.code() not in TRANSIENT_DOWNLOAD_CODES or time.monotonic() + pause > deadline:
                raise
            log.info(
                "download of %s:%s for %s: %s (attempt %d); again in %.1f s",
                spec.model_name,
                spec.model_version,
                spec.replica_id,
                err.code().name,
                attempt,
                pause,
            )
            await asyncio.sleep(pause)
            bound = min(bound * 2, backoff_s[1])
    raise AssertionError("unreachable")


async def _download(stub: api_pb2_grpc.ModelServiceStub, spec: node_pb2.DeployReplica) -> bytes:
    """One download of a sealed artifact, its chunks checked for order and size."""
    data = bytearray()
    request = api_pb2.DownloadModelRequest(name=spec.model_name, version=spec.model_version)
    size = None
    async for chunk in stub.Download(request, timeout=DOWNLOAD_TIMEOUT_S):
        size = chunk.size if size is None else size
        # Sealing adds a nonce and a tag: a sealed artifact is a little larger than its model.
        if chunk.offset != len(data) or chunk.size != size or not spec.size < size <= spec.size + 1024:
            raise ValueError("artifact stream out of order or of unexpected size")
        data.extend(chunk.data)
    if len(data) != size:
        raise ValueError(f"artifact stream ended at {len(data)} of {size} bytes")
    return bytes(data)


class FaultInjectedBackend(Backend):
    """A backend whose served inferences take longer, by the node's ``fault_injection`` config.

    Only the runtime's (serving) view of a backend is wrapped: the node's profiles are measured on
    the real backend, so the scheduler sees the slowdown only through the latency it observes.
    """

    def __init__(self, inner: Backend, faults: FaultInjection) -> None:
        self.inner = inner
        self.kind = inner.kind  # type: ignore[misc]
        self._faults = faults
        self._delay_s = faults.inference_delay_ms / 1e3
        self._jitter_s = faults.inference_jitter_ms / 1e3
        self._rng = random.Random()  # noqa: S311 -- timing noise, not a secret

    @property
    def capabilities(self) -> Capabilities:
        return self.inner.capabilities

    def load(self, model: ModelArtifact) -> ModelHandle:
        return self.inner.load(model)

    def infer(self, handle: ModelHandle, inputs: Any) -> Any:
        if self._faults.applies_to(handle.name, handle.version):
            time.sleep(self._delay_s + self._jitter_s * self._rng.random())
        return self.inner.infer(handle, inputs)

    def unload(self, handle: ModelHandle) -> None:
        self.inner.unload(handle)

    def close(self) -> None:
        """The agent closes the real backend itself."""

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)
