"""Property test over the verifier's state machine: random interleavings of challenges, answers
(on time, late, replayed), tampering, clock jumps and expiry sweeps. Invariants: a node's tier
is that of its latest result exactly while that result is affirming and unexpired; a nonce
yields at most one result; refused evidence never changes the state."""

from __future__ import annotations

import hashlib

from conftest import AGENT_CODE, AGENT_CONFIG, Clock, reference_values
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from simulated_tpm import SimulatedTpmAttester

from attestation.responder import AttestationResponder
from attestation.service import AttestationState, AttestationVerifierService, VerifierConfig
from edgeward.v1 import attestation_pb2 as pb

NODES = ("n0", "n1")


class VerifierLifecycle(RuleBasedStateMachine):
    @initialize()
    def setup(self) -> None:
        self.clock = Clock()
        self.service = AttestationVerifierService(VerifierConfig(), reference_values(), clock=self.clock)
        self.nodes: dict[str, AttestationResponder] = {}
        for node_id in NODES:
            attester = SimulatedTpmAttester()
            node = AttestationResponder(node_id, attester)
            node.open()
            node.measure("agent.code", AGENT_CODE)
            node.measure("agent.config", AGENT_CONFIG)
            self.service.register(attester.enrollment(node_id))
            self.nodes[node_id] = node
        self.tampered: set[str] = set()
        self.latest: dict[str, tuple[int, int]] = {}  # node -> (status, expires ms)
        self.issued: list[tuple[str, bytes, int]] = []  # (node, challenge, expires ms), to draw from
        # The model of every nonce: "outstanding", or the reason id an answer to it now gets.
        self.fate: dict[bytes, str] = {}
        self.expiries: dict[bytes, int] = {}
        self.spent_at: dict[bytes, int] = {}  # when a nonce stopped being answerable
        self.queues: dict[str, list[bytes]] = {n: [] for n in NODES}

    def now_ms(self) -> int:
        return int(self.clock.now * 1000)

    @rule(node_id=st.sampled_from(NODES))
    def challenge(self, node_id: str) -> None:
        message = self.service.challenge(node_id)
        challenge = pb.VerifierMessage.FromString(message).challenge
        self.issued = [*self.issued, (node_id, message, challenge.expires_unix_ms)][-12:]
        self.fate[challenge.nonce] = "outstanding"
        self.expiries[challenge.nonce] = challenge.expires_unix_ms
        queue = self.queues[node_id]
        queue.append(challenge.nonce)
        if len(queue) > self.service.config.max_outstanding_per_node:
            oldest = queue.pop(0)
            self.fate[oldest] = "attestation.nonce.superseded"
            self.spent_at[oldest] = self.now_ms()

    @precondition(lambda self: self.issued)
    @rule(data=st.data())
    def answer(self, data: st.DataObject) -> None:
        node_id, message, expires = data.draw(st.sampled_from(self.issued))
        nonce = pb.VerifierMessage.FromString(message).challenge.nonce
        before = self.service.state(node_id)
        outcome = self.service.receive(node_id, self.nodes[node_id].handle(message))
        fate = self.fate[nonce]
        if fate == "outstanding":
            self.fate[nonce] = "attestation.nonce.reused"  # any answer uses the nonce up
            self.spent_at[nonce] = self.now_ms()
            self.queues[node_id].remove(nonce)
            fate = "attestation.nonce.expired" if self.now_ms() > expires else "ok"
        if fate == "ok":
            assert outcome.result is not None
            expected = (
                pb.ATTESTATION_STATUS_CONTRAINDICATED
                if node_id in self.tampered
                else pb.ATTESTATION_STATUS_AFFIRMING
            )
            assert outcome.result.status == expected
            self.latest[node_id] = (expected, outcome.result.expires_unix_ms)
        else:
            assert outcome.rejected is not None and outcome.rejected.reason == fate
            assert self.service.state(node_id) in (
                before,
                AttestationState.EXPIRED,
            )  # refusals change nothing

    @rule(node_id=st.sampled_from(NODES))
    def tamper(self, node_id: str) -> None:
        self.nodes[node_id].measure("agent.code", hashlib.sha256(node_id.encode()).digest() + b"evil")
        self.tampered.add(node_id)

    @rule(seconds=st.floats(min_value=0, max_value=120))
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @rule()
    def sweep(self) -> None:
        for queue in self.queues.values():
            for nonce in [n for n in queue if self.now_ms() > self.expiries[n]]:
                queue.remove(nonce)
                self.fate[nonce] = "attestation.nonce.expired"
                self.spent_at[nonce] = self.now_ms()
        # A sweep forgets nonces spent longer ago than the verifier's memory: they become unknown.
        memory_ms = int(self.service.config.nonce_memory_s * 1000)
        for nonce, at in list(self.spent_at.items()):
            if self.now_ms() > at + memory_ms:
                self.fate[nonce] = "attestation.nonce.unknown"
                del self.spent_at[nonce]
        expired = set(self.service.expire())
        for node_id in expired:
            assert node_id in self.latest and self.now_ms() >= self.latest[node_id][1]
        assert len(expired) == len(set(expired))

    @invariant()
    def tier_follows_the_latest_unexpired_affirming_result(self) -> None:
        if not hasattr(self, "service"):
            return
        tiers = self.service.tiers([*NODES, "never-seen"])
        assert tiers.pop("never-seen") == "none"
        for node_id in NODES:
            status, expires = self.latest.get(node_id, (None, 0))
            valid = status == pb.ATTESTATION_STATUS_AFFIRMING and self.now_ms() < expires
            assert self.service.tier(node_id) == tiers[node_id] == ("tpm2" if valid else "none")
            assert (self.service.result(node_id) is not None) == (
                status is not None and self.now_ms() < expires
            )
            if status is not None and self.now_ms() >= expires:
                assert self.service.state(node_id) == AttestationState.EXPIRED


TestVerifierLifecycle = VerifierLifecycle.TestCase
TestVerifierLifecycle.settings = settings(max_examples=150, stateful_step_count=30, deadline=None)
