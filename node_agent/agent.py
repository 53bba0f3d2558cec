"""The node agent: announces the node, attests it, executes the orchestrator's commands, serves
inference and reports status and telemetry over MQTT.

Topics (under ``{prefix}/nodes/{node_id}/``): ``hello`` and ``status`` are retained; the broker
publishes the last will ``status = OFFLINE`` if the agent dies. Commands arrive on ``cmd`` with
QoS 1; each carries a ``command_id``, and a repeated id is acknowledged without being executed
again.

Attestation (docs/attestation.md): before connecting, the agent opens its attester (``software``
or ``tpm2``) and measures its code (``agent.code``), its config (``agent.config``) and its
accelerators' bitstreams/firmware. ``attest`` commands carry the verifier's messages (an empty one
asks the node to enroll); the answers go out on ``evidence``. A model arrives sealed, with its
data key wrapped to this node's attested binding key: the agent unwraps it, decrypts the model,
checks its digest and measures it (``model.<name>``) before loading it. ``wipe`` (quarantine)
unloads every model, deletes the cache and confirms with the event ``agent.wipe.done``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import grpc

from accelerators import registry
from accelerators.base import Backend
from attestation import attesters, keyrelease
from attestation.artifacts import (
    AGENT_CODE,
    AGENT_CODE_PACKAGES,
    AGENT_CONFIG,
    code_digest,
    key_context,
    model_aad,
    model_component,
)
from attestation.errors import AttestationError
from attestation.responder import AttestationResponder
from edgeward import __version__
from edgeward.mqtt.session import BrokerURL, MqttConnectError, MqttSession, Will
from edgeward.mqtt.topics import TopicKind, node_topic
from edgeward.v1 import api_pb2, api_pb2_grpc, node_pb2
from edgeward.wire import DropCounter, WireError, decode_command, node_message, now_ms

from .config import AgentConfig
from .runtime import ArtifactError, Runtime

log = logging.getLogger(__name__)

SEEN_COMMANDS = 4096
DOWNLOAD_TIMEOUT_S = 60.0
CONNECT_BACKOFF_S = (0.5, 15.0)  # first and largest delay between broker connection attempts


class NodeAgent:
    """``async with NodeAgent(config) as agent:`` runs the node until the block is left."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.node_id = config.node_id
        self.drops = DropCounter()
        self.boot_ms = now_ms()
        self.inference_port = 0
        self._pool = ThreadPoolExecutor(2, thread_name_prefix=f"agent-{self.node_id}")
        self._backends: dict[str, Backend] = {}
        self._availability: dict[str, str] = {}
        self._seen: OrderedDict[str, node_pb2.CommandAck] = OrderedDict()
        self._status_seq = 0
        self._status_dirty = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._mqtt: MqttSession | None = None
        self._server: grpc.aio.Server | None = None
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._started = time.monotonic()
        self.runtime: Runtime
        self.responder: AttestationResponder | None = None

    async def run_blocking(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, partial(fn, *args))

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
        for acc in cfg.accelerators:
            options = {"power": {"idle_w": cfg.power.idle_w, "active_w": cfg.power.active_w}, **acc.options}
            try:
                self._backends[acc.kind] = await self.run_blocking(registry.create, acc.kind, options)
                self._availability[acc.kind] = "ok"
            except Exception as err:  # a missing vendor library disables that backend only
                self._availability[acc.kind] = f"unavailable: {err}"
                log.warning("accelerator %s unavailable: %s", acc.kind, err)
        responder = AttestationResponder(self.node_id, attesters.create(cfg.attestation))
        await self.run_blocking(responder.open)
        self.responder = responder
        await self.run_blocking(self._measure_platform)
        self.runtime = Runtime(
            self._backends,
            cfg.state_dir / self.node_id / "models",
            self.run_blocking,
            self._status_changed,
            self._unlock,
        )
        from .inference_server import serve

        self._server, self.inference_port = await serve(self.runtime, cfg.inference_bind)
        await self._connect()
        await self._announce()
        self._tasks += [
            asyncio.create_task(self._commands(), name=f"{self.node_id}-commands"),
            asyncio.create_task(self._heartbeat(), name=f"{self.node_id}-heartbeat"),
            asyncio.create_task(self._status_writer(), name=f"{self.node_id}-status"),
        ]
        log.info(
            "node %s up: inference on %s, broker %s", self.node_id, self.inference_endpoint, cfg.broker.url
        )

    async def _connect(self) -> None:
        """Connect to the broker, retrying with backoff: a device may boot before its broker.
        Once connected, the session reconnects by itself and ``_heartbeat`` re-announces."""
        b = self.config.broker
        url = BrokerURL.parse(b.url, ca_file=b.ca_file, cert_file=b.cert_file, key_file=b.key_file)
        offline = node_message(self.node_id, status=node_pb2.Status(state=node_pb2.NODE_STATE_OFFLINE))
        delay = CONNECT_BACKOFF_S[0]
        while True:
            session = MqttSession(
                url,
                f"edgeward-node-{self.node_id}",
                will=Will(self._topic(TopicKind.STATUS), offline.SerializeToString(), qos=1, retain=True),
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

    async def _stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self._mqtt is not None:
            try:
                offline = node_message(
                    self.node_id, status=node_pb2.Status(state=node_pb2.NODE_STATE_OFFLINE)
                )
                await self._mqtt.publish(
                    self._topic(TopicKind.STATUS), offline.SerializeToString(), qos=1, retain=True
                )
            except Exception as err:
                log.debug("could not publish offline status: %s", err)
            await self._mqtt.__aexit__(None, None, None)
            self._mqtt = None
        if self._server is not None:
            await self._server.stop(grace=0.5)
            self._server = None
        if hasattr(self, "runtime"):
            await self.runtime.close()
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
        for backend in self._backends.values():
            await self.run_blocking(backend.close)
        if self.responder is not None:
            await self.run_blocking(self.responder.close)
            self.responder = None
        self._pool.shutdown(wait=True)

    def drop_counts(self) -> dict[str, int]:
        """Refused commands by reason, including those the session dropped for size."""
        return self.drops.with_oversize(self._mqtt.stats.dropped_oversize if self._mqtt is not None else 0)

    @property
    def inference_endpoint(self) -> str:
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
        )

    def status(self) -> node_pb2.Status:
        self._status_seq += 1
        return node_pb2.Status(
            state=node_pb2.NODE_STATE_ONLINE,
            status_seq=self._status_seq,
            replicas=[s.report() for s in self.runtime.replicas.values()],
        )

    async def _publish(self, kind: TopicKind, *, qos: int = 0, retain: bool = False, **body: Any) -> None:
        assert self._mqtt is not None
        payload = node_message(self.node_id, **body).SerializeToString()
        await self._mqtt.publish(self._topic(kind), payload, qos=qos, retain=retain)

    async def _announce(self) -> None:
        await self._publish(TopicKind.HELLO, qos=1, retain=True, hello=self.hello())
        await self._publish(TopicKind.STATUS, qos=1, retain=True, status=self.status())

    def _status_changed(self) -> None:
        self._status_dirty.set()

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
                    reconnects = self._mqtt.stats.reconnects
                    await self._announce()  # the broker may have lost our retained messages
                else:
                    self._status_dirty.set()
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
                )
                await self._publish(TopicKind.TELEMETRY, telemetry=telemetry)
            except asyncio.CancelledError:
                raise
            except Exception as err:
                log.warning("heartbeat failed: %s", err)

    # ------------------------------------------------------------ commands

    async def _commands(self) -> None:
        assert self._mqtt is not None
        async for message in self._mqtt.messages():
            try:
                cmd = decode_command(
                    message.payload, node_id=self.node_id, max_payload=self.config.broker.max_payload
                )
            except WireError as err:
                self.drops.drop(err)
                log.debug("dropped command: %s", err)
                continue
            ack = self._seen.get(cmd.command_id)
            if ack is not None:
                duplicate = node_pb2.CommandAck(
                    command_id=cmd.command_id, ok=ack.ok, reason=ack.reason, duplicate=True
                )
                await self._ack(duplicate)
                continue
            ack = await self._execute(cmd)
            self._seen[cmd.command_id] = ack
            while len(self._seen) > SEEN_COMMANDS:
                self._seen.popitem(last=False)
            await self._ack(ack)

    async def _execute(self, cmd: node_pb2.Command) -> node_pb2.CommandAck:
        body = cmd.WhichOneof("body")
        try:
            if body == "deploy":
                self.runtime.deploy(cmd.deploy, self._fetch)
            elif body == "undeploy":
                await self.runtime.undeploy(cmd.undeploy.replica_id)
            elif body == "sync":
                await self.runtime.sync(list(cmd.sync.replicas), self._fetch)
            elif body == "attest":
                await self._attest(cmd.attest.message)
            elif body == "wipe":
                await self._wipe(cmd.wipe.reason)
        except AttestationError as err:
            log.warning("command %s (%s) refused: %s", cmd.command_id, body, err)
            return node_pb2.CommandAck(command_id=cmd.command_id, ok=False, reason=err.reason)
        except Exception as err:
            log.exception("command %s (%s) failed", cmd.command_id, body)
            return node_pb2.CommandAck(
                command_id=cmd.command_id, ok=False, reason=f"agent.command.failed: {err}"
            )
        return node_pb2.CommandAck(command_id=cmd.command_id, ok=True)

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
        self.responder.measure_digest(AGENT_CODE, code_digest(), ",".join(AGENT_CODE_PACKAGES))
        self.responder.measure(AGENT_CONFIG, self.config.model_dump_json().encode(), "AgentConfig")
        for kind in sorted(self._backends):
            measurements = getattr(self._backends[kind], "measurements", None)
            for component, digest in sorted((measurements() if measurements else {}).items()):
                self.responder.measure_digest(component, bytes.fromhex(digest), kind)

    async def _attest(self, message: bytes) -> None:
        """Answer the verifier: enroll when asked with an empty message, else answer its challenge."""
        assert self.responder is not None
        if message:
            payload = await self.run_blocking(self.responder.handle, message)
        else:
            payload = await self.run_blocking(self.responder.enrollment_request)
        await self._publish(TopicKind.EVIDENCE, qos=1, evidence=node_pb2.Evidence(payload=payload))

    async def _wipe(self, reason: str) -> None:
        replicas, files = await self.runtime.wipe()
        log.warning(
            "wiped on the orchestrator's order (%s): %d replicas, %d cached artifacts",
            reason,
            replicas,
            files,
        )
        event = node_pb2.Event(
            id="agent.wipe.done",
            severity=node_pb2.SEVERITY_WARNING,
            message=f"{replicas} replicas unloaded, {files} cached artifacts deleted",
            attributes={"reason": reason, "replicas": str(replicas), "files": str(files)},
        )
        await self._publish(TopicKind.EVENTS, qos=1, event=event)

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
        if hashlib.sha256(data).hexdigest() != spec.sha256:
            raise ArtifactError(
                "agent.artifact.sha256_mismatch", "the unsealed model does not match its digest"
            )
        self.responder.measure(model_component(spec.model_name), data, spec.model_version)
        return data

    # ------------------------------------------------------------ artifacts

    async def _fetch(self, spec: node_pb2.DeployReplica) -> bytes:
        """Download a sealed artifact from the orchestrator's ModelService."""
        channel = self._channels.get(spec.artifact_endpoint)
        if channel is None:
            channel = self._channels[spec.artifact_endpoint] = grpc.aio.insecure_channel(
                spec.artifact_endpoint
            )
        stub = api_pb2_grpc.ModelServiceStub(channel)
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
