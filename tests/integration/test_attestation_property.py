"""Property: under random interleavings of apply, attest, tamper, silence and clock jumps, no
replica is ever Running on a node that does not hold a valid affirming attestation result.

The control plane is real (SQLite store, reconciler, vectorised scheduler, FleetVerifier over the
attestation service, software attesters, sealed models, real key release and unwrap); only the
wire is short-circuited: commands go straight to a small in-test node that does what the agent
does with them (answer challenges with its responder, unwrap the released key and open the
sealed model before reporting Running, drop everything on wipe). Every step ends with reconcile
passes, after which the invariant is checked exactly: nothing else runs in between.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from attestation import keyrelease
from attestation.artifacts import (
    AGENT_CODE,
    AGENT_CODE_PACKAGES,
    AGENT_DEPENDENCIES,
    AGENT_DEPS,
    code_digest,
    deps_digest,
    measured_digest,
    model_aad,
    model_component,
)
from attestation.attesters import create as create_attester
from attestation.attesters.software import SoftwareAttesterConfig
from attestation.errors import AttestationError
from attestation.responder import AttestationResponder
from attestation.service import AttestationVerifierService
from edgeward.v1 import api_pb2, node_pb2
from edgeward.wire import node_message
from orchestrator.catalog.publish import seal_artifact
from orchestrator.config import AttestationConfig, OrchestratorConfig
from orchestrator.fleet import Fleet
from orchestrator.manifest import parse_manifest
from orchestrator.phases import Phase
from orchestrator.reconciler import Reconciler
from orchestrator.scheduler import Scheduler
from orchestrator.store import ModelRecord, SqlStore
from orchestrator.verifier import FleetVerifier, builtin_reference
from usecases import model_path

NODES = ("n1", "n2", "n3")
MODEL = model_path("industrial", "int8").read_bytes()
SHA = hashlib.sha256(MODEL).hexdigest()


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


class Node:
    """What the agent does with each command, minus MQTT."""

    def __init__(self, node_id: str, key_dir: Path) -> None:
        self.id = node_id
        self.responder = AttestationResponder(
            node_id, create_attester(SoftwareAttesterConfig(key_dir=key_dir))
        )
        self.responder.open()
        # As the agent measures itself (NodeAgent._measure_platform), so that the built-in policy affirms.
        self.responder.measure_digest(
            AGENT_CODE, measured_digest(code_digest(), AGENT_CODE_PACKAGES), ",".join(AGENT_CODE_PACKAGES)
        )
        self.responder.measure_digest(
            AGENT_DEPS, measured_digest(deps_digest(), AGENT_DEPENDENCIES), ",".join(AGENT_DEPENDENCIES)
        )
        self.responder.measure("agent.config", node_id.encode(), "config")
        self.running: dict[str, node_pb2.DeployReplica] = {}
        self.failed: dict[str, tuple[node_pb2.DeployReplica, str]] = {}
        self.silent = False
        self.seq = 0
        self.outbox: list[bytes] = []  # evidence to deliver to the verifier

    def command(self, cmd: node_pb2.Command, sealed_blob: bytes) -> None:
        body = cmd.WhichOneof("body")
        if body == "attest" and not self.silent:
            message = cmd.attest.message
            self.outbox.append(
                self.responder.handle(message) if message else self.responder.enrollment_request()
            )
        elif body == "deploy":
            self._deploy(cmd.deploy, sealed_blob)
        elif body == "sync":
            wanted = {d.replica_id for d in cmd.sync.replicas}
            self.running = {k: v for k, v in self.running.items() if k in wanted}
            for d in cmd.sync.replicas:
                self._deploy(d, sealed_blob)
        elif body == "undeploy":
            self.running.pop(cmd.undeploy.replica_id, None)
            self.failed.pop(cmd.undeploy.replica_id, None)
        elif body == "wipe":
            self.running.clear()
            self.failed.clear()

    def _deploy(self, spec: node_pb2.DeployReplica, sealed_blob: bytes) -> None:
        # As the agent: no key, no model; the key must unwrap here and open the sealed artifact.
        # After a measurement changed, the binding key's policy refuses: the replica fails.
        try:
            key = self.responder.unwrap(spec.wrapped_key)
        except AttestationError as err:
            self.failed[spec.replica_id] = (spec, err.reason)
            return
        data = keyrelease.open_sealed(
            key, sealed_blob, model_aad(spec.model_name, spec.model_version, spec.sha256)
        )
        assert hashlib.sha256(data).hexdigest() == spec.sha256
        self.responder.measure(model_component(spec.model_name), data, spec.model_version)
        self.running[spec.replica_id] = spec

    def status(self) -> node_pb2.NodeMessage:
        self.seq += 1
        reports = [
            node_pb2.ReplicaReport(
                replica_id=r,
                deployment=s.deployment,
                model_name=s.model_name,
                model_version=s.model_version,
                phase=node_pb2.REPLICA_PHASE_RUNNING,
            )
            for r, s in self.running.items()
        ] + [
            node_pb2.ReplicaReport(
                replica_id=r,
                deployment=s.deployment,
                model_name=s.model_name,
                model_version=s.model_version,
                phase=node_pb2.REPLICA_PHASE_FAILED,
                reason=why,
            )
            for r, (s, why) in self.failed.items()
        ]
        return node_message(
            self.id,
            status=node_pb2.Status(state=node_pb2.NODE_STATE_ONLINE, status_seq=self.seq, replicas=reports),
        )

    def hello(self) -> node_pb2.NodeMessage:
        acc = node_pb2.Accelerator(
            kind="cpu-litert", dtypes=["FP32", "INT8"], availability="ok", active_w=5.0
        )
        return node_message(
            self.id,
            hello=node_pb2.Hello(
                accelerators=[acc],
                max_replicas=4,
                memory_bytes=1 << 30,
                boot_unix_ms=1,
                inference_endpoint="127.0.0.1:1",
            ),
        )


@settings(
    max_examples=40,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
class AttestationGate(RuleBasedStateMachine):
    @initialize()
    def setup(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="edgeward-prop-"))
        self.loop = asyncio.new_event_loop()
        self.clock = Clock()
        self.store = SqlStore(self.tmp / "orch")
        self.fleet = Fleet()
        self.sent: list[node_pb2.Command] = []

        async def publish(node_id: str, cmd: node_pb2.Command) -> None:
            self.sent.append(cmd)

        async def db(fn, *args):
            return fn(*args)

        att = AttestationConfig()
        service = AttestationVerifierService(att.verifier, builtin_reference(), clock=self.clock)
        self.verifier = FleetVerifier(
            att,
            service,
            fleet=self.fleet,
            publish=publish,
            db=db,
            store=self.store,
            node_timeout_s=3600,
            on_change=lambda: None,
        )
        config = OrchestratorConfig(state_dir=self.tmp / "orch", node_timeout_s=3600, resend_interval_s=0.001)
        self.reconciler = Reconciler(
            self.store,
            db,
            self.fleet,
            Scheduler(),
            publish,
            config,
            artifact_endpoint=lambda: "127.0.0.1:1",
            on_change=lambda _: None,
            trust=self.verifier,
        )
        record = ModelRecord(
            "vib-cnn",
            "1.0.0",
            SHA,
            len(MODEL),
            api_pb2.Model(
                name="vib-cnn", version="1.0.0", sha256=SHA, size=len(MODEL), dtypes=["INT8"]
            ).SerializeToString(),
            1,
        )
        blob, sealed = seal_artifact(MODEL, model_aad("vib-cnn", "1.0.0", SHA))
        self.store.put_model(record, blob, sealed)
        self.sealed_blob = blob
        self.verifier.allow_model("vib-cnn", SHA)
        self.nodes = {n: Node(n, self.tmp / n) for n in NODES}
        for node in self.nodes.values():
            self.fleet.apply(node.hello())
            self.fleet.apply(node.status())
            self.verifier.hello(node.id)  # as ingest does, then the node's wire step
            self.run(self.verifier.node_connected(node.id))
        self.settle()

    def teardown(self) -> None:
        for node in getattr(self, "nodes", {}).values():
            node.responder.close()
        if hasattr(self, "store"):
            self.store.close()
            self.loop.close()
            shutil.rmtree(self.tmp, ignore_errors=True)

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    def settle(self) -> None:
        """Deliver commands and evidence until quiet, with reconcile passes in between."""
        for _ in range(12):
            moved = False
            sent, self.sent = self.sent, []
            for cmd in sent:
                self.nodes[cmd.node_id].command(cmd, self.sealed_blob)
                moved = True
            for node in self.nodes.values():
                outbox, node.outbox = node.outbox, []
                for payload in outbox:
                    self.run(self.verifier.evidence(node.id, payload))
                    moved = True
                self.fleet.apply(node.status())
            self.run(self.reconciler.reconcile_once())
            if not moved and not self.sent:
                break

    # ------------------------------------------------------------ events

    @rule(replicas=st.integers(0, 4), tier=st.sampled_from(["none", "software"]))
    def apply(self, replicas: int, tier: str) -> None:
        text = (
            f"apiVersion: edgeward/v1\nkind: Deployment\nmetadata: {{name: vib}}\nspec:\n"
            f"  model: {{name: vib-cnn, version: 1.0.0}}\n  replicas: {replicas}\n"
            f"  requirements: {{attestation: {tier}}}\n"
        )
        self.store.put_deployment(parse_manifest(text), 1)
        self.settle()

    @rule(node_id=st.sampled_from(NODES))
    def attest(self, node_id: str) -> None:
        self.run(self.verifier.attest(node_id))
        self.settle()

    @rule(node_id=st.sampled_from(NODES))
    def tamper(self, node_id: str) -> None:
        self.nodes[node_id].responder.measure_digest(
            "agent.code", hashlib.sha256(node_id.encode()).digest(), "x"
        )
        self.settle()

    @rule(node_id=st.sampled_from(NODES), silent=st.booleans())
    def silence(self, node_id: str, silent: bool) -> None:
        self.nodes[node_id].silent = silent

    @rule(seconds=st.floats(0, 120))
    def advance(self, seconds: float) -> None:
        self.clock.now += seconds
        self.run(self.verifier.tick())
        self.run(self.verifier.challenges_sent())
        self.settle()

    # ------------------------------------------------------------ the property

    @invariant()
    def no_running_replica_without_an_affirming_result(self) -> None:
        if not hasattr(self, "store"):
            return
        for rep in self.store.list_replicas():
            if rep.phase == Phase.RUNNING:
                assert self.verifier.service.tier(rep.node_id) != "none", (
                    f"{rep.id} Running on {rep.node_id} whose attestation is {self.verifier.service.state(rep.node_id)}"
                )

    @invariant()
    def nodes_serve_only_with_an_affirming_result(self) -> None:
        for node in getattr(self, "nodes", {}).values():
            if node.running:
                assert self.verifier.service.tier(node.id) != "none", (
                    f"{node.id} serves without a valid result"
                )


TestAttestationGate = AttestationGate.TestCase


class Courier:
    """Carries a FleetVerifier's commands to an in-test node and its evidence back."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.outbox: list[node_pb2.Command] = []
        self.verifier: FleetVerifier | None = None  # set once built (it needs ``publish``)

    async def publish(self, node_id: str, cmd: node_pb2.Command) -> None:
        self.outbox.append(cmd)

    async def deliver(self) -> None:
        assert self.verifier is not None
        while self.outbox:
            self.node.command(self.outbox.pop(0), b"")
            for payload in self.node.outbox:
                await self.verifier.evidence(self.node.id, payload)
            self.node.outbox.clear()


def inline_verifier(
    att: AttestationConfig, clock: Clock, fleet: Fleet, store: SqlStore, publish, on_change=lambda: None
) -> FleetVerifier:
    """A FleetVerifier whose store calls run inline, on a verifier service with this clock."""

    async def db(fn, *args):
        return fn(*args)

    service = AttestationVerifierService(att.verifier, builtin_reference(), clock=clock)
    return FleetVerifier(
        att,
        service,
        fleet=fleet,
        publish=publish,
        db=db,
        store=store,
        node_timeout_s=3600,
        on_change=on_change,
    )


def test_a_node_affirmed_again_while_expired_nodes_are_quarantined_is_left_alone(tmp_path: Path) -> None:
    """Two results expire together; while the wipe of the first is being sent, the second node is
    attested again. The pass goes on: the first is quarantined, the second (affirming) is not. (At
    10,000 nodes this interleaving raised a KeyError that ended the pass, leaving later expired
    nodes unquarantined.)"""
    loop = asyncio.new_event_loop()
    clock = Clock()
    store = SqlStore(tmp_path / "orch")
    fleet = Fleet()
    nodes = {n: Node(n, tmp_path / n) for n in ("n1", "n2")}
    outbox: list[node_pb2.Command] = []
    reattested: list[str] = []

    async def publish(node_id: str, cmd: node_pb2.Command) -> None:
        outbox.append(cmd)
        if cmd.WhichOneof("body") == "wipe" and not reattested:
            other = "n2" if node_id == "n1" else "n1"
            reattested.append(other)
            await verifier.attest(other)
            await deliver()

    async def deliver() -> None:
        while outbox:
            cmd = outbox.pop(0)
            node = nodes[cmd.node_id]
            node.command(cmd, b"")
            for payload in node.outbox:
                await verifier.evidence(node.id, payload)
            node.outbox.clear()

    att = AttestationConfig()
    verifier = inline_verifier(att, clock, fleet, store, publish)
    service = verifier.service
    try:
        for node in nodes.values():
            fleet.apply(node.hello())
            fleet.apply(node.status())
            verifier.hello(node.id)
            loop.run_until_complete(verifier.node_connected(node.id))
            loop.run_until_complete(deliver())
            loop.run_until_complete(verifier.attest(node.id))  # enrolled above, attested now
            loop.run_until_complete(deliver())
        assert {service.tier(n) for n in nodes} == {"software"}, [
            (n, service.state(n), verifier.quarantined) for n in nodes
        ]
        clock.now += att.verifier.result_ttl_s + 1
        loop.run_until_complete(verifier.tick())
        (first,) = set(nodes) - set(reattested)
        assert set(verifier.quarantined) == {first}
        assert service.tier(reattested[0]) == "software"
    finally:
        for node in nodes.values():
            node.responder.close()
        store.close()
        loop.close()


@dataclass
class OneNode:
    """One in-test node beside a FleetVerifier whose commands are collected in ``sent``."""

    loop: asyncio.AbstractEventLoop
    fleet: Fleet
    node: Node
    verifier: FleetVerifier
    sent: list[node_pb2.Command]

    def run(self, coro) -> None:
        self.loop.run_until_complete(coro)


@pytest.fixture
def one_node(tmp_path: Path) -> Iterator[OneNode]:
    loop = asyncio.new_event_loop()
    store = SqlStore(tmp_path / "orch")
    fleet = Fleet()
    sent: list[node_pb2.Command] = []

    async def publish(node_id: str, cmd: node_pb2.Command) -> None:
        sent.append(cmd)

    setup = OneNode(
        loop,
        fleet,
        Node("n1", tmp_path / "n1"),
        inline_verifier(AttestationConfig(), Clock(), fleet, store, publish),
        sent,
    )
    try:
        yield setup
    finally:
        setup.node.responder.close()
        store.close()
        loop.close()


def test_a_tick_between_a_hello_and_its_step_asks_the_node_to_enroll_once(one_node: OneNode) -> None:
    """Ingest applies a hello (the node is online) and runs its wire step only after the store wrote
    the batch's inventories; a verifier tick in between found the node due and asked it to enroll,
    and the step asked again: two requests, two challenges, the first answer refused as a bad
    proof (2 % of a 10,000-node onboarding). The hello queues the node at once; it is asked once."""
    s, node, verifier = one_node, one_node.node, one_node.verifier
    s.fleet.apply(node.hello())
    s.fleet.apply(node.status())
    verifier.hello(node.id)
    s.run(verifier.tick())
    s.run(verifier.node_connected(node.id))
    s.run(verifier.challenges_sent())
    asks = [c for c in s.sent if c.WhichOneof("body") == "attest" and not c.attest.message]
    assert len(asks) == 1, s.sent
    assert verifier.window.busy(node.id)


def test_a_node_that_said_hello_and_no_status_yet_is_asked_to_enroll(one_node: OneNode) -> None:
    """The exchange goes out on the hello alone (the node's status may come after): queued nodes are
    dropped only once they are offline or silent, not for a status they have not sent yet."""
    s, node, verifier = one_node, one_node.node, one_node.verifier
    s.fleet.apply(node.hello())
    verifier.hello(node.id)
    s.run(verifier.node_connected(node.id))
    s.run(verifier.challenges_sent())
    assert [c.WhichOneof("body") for c in s.sent] == ["attest"]
    s.fleet.apply(node_message(node.id, status=node_pb2.Status(state=node_pb2.NODE_STATE_OFFLINE)))
    verifier.hello(node.id)  # queued again, but offline by the time the window has room
    s.run(verifier.node_connected(node.id))
    s.run(verifier.challenges_sent())
    assert len(s.sent) == 1 and not verifier.window.busy(node.id)


def test_only_a_change_of_trust_wakes_the_reconciler(tmp_path: Path) -> None:
    """A renewal that leaves the node's tier as it was wakes no reconcile pass: at 10,000 nodes the
    renewals (hundreds a second) kept the passes over every replica running back to back. The first
    result, a renewal after the result expired and a refusal each wake it."""
    loop = asyncio.new_event_loop()
    clock = Clock()
    store = SqlStore(tmp_path / "orch")
    fleet = Fleet()
    node = Node("n1", tmp_path / "n1")
    courier = Courier(node)
    deliver = courier.deliver
    woken: list[float] = []
    att = AttestationConfig()
    verifier = inline_verifier(
        att, clock, fleet, store, courier.publish, on_change=lambda: woken.append(clock.now)
    )
    courier.verifier = verifier
    try:
        fleet.apply(node.hello())
        fleet.apply(node.status())
        verifier.hello(node.id)
        loop.run_until_complete(verifier.node_connected(node.id))
        loop.run_until_complete(deliver())
        loop.run_until_complete(verifier.attest(node.id))
        loop.run_until_complete(deliver())
        assert verifier.service.tier(node.id) == "software" and len(woken) == 1  # trusted: news
        for _ in range(3):  # renewals: the same tier, no news
            clock.now += 10
            loop.run_until_complete(verifier.attest(node.id))
            loop.run_until_complete(deliver())
        assert len(woken) == 1
        clock.now += att.verifier.result_ttl_s + 1  # expired (read as "none"), then renewed
        loop.run_until_complete(verifier.attest(node.id))
        loop.run_until_complete(deliver())
        assert verifier.service.tier(node.id) == "software" and len(woken) == 2
        node.responder.measure_digest("agent.code", hashlib.sha256(b"other code").digest(), "x")  # tampered
        loop.run_until_complete(verifier.attest(node.id))
        loop.run_until_complete(deliver())
        assert verifier.service.tier(node.id) == "none" and len(woken) >= 3
    finally:
        node.responder.close()
        store.close()
        loop.close()
