"""The verifier's checks, each failure with its exact reason id, against the software attester and
a TPM-format simulated attester (fast; the same checks run against swtpm in test_tpm.py)."""

from __future__ import annotations

import pytest
from conftest import (
    AGENT_CODE,
    BITSTREAM,
    MODEL,
    Clock,
    attest,
    enroll,
    measure_platform,
    reference_values,
    sha,
)
from simulated_tpm import SimulatedTpmAttester

from attestation import keyrelease, tpm_wire
from attestation.attesters.software import software_name
from attestation.errors import EnrollmentError, EvidenceRejected, KeyReleaseError
from attestation.responder import AttestationResponder
from attestation.results import open_signed_result
from attestation.service import AttestationState, AttestationVerifierService, VerifierConfig
from edgeward.v1 import attestation_pb2 as pb

AFFIRMING = pb.ATTESTATION_STATUS_AFFIRMING
WARNING = pb.ATTESTATION_STATUS_WARNING
CONTRAINDICATED = pb.ATTESTATION_STATUS_CONTRAINDICATED


@pytest.fixture(params=["software", "simulated-tpm"])
def make_node(request, software_node, verifier):
    """``make_node(node_id)``: an open, enrolled responder of the parametrised kind."""

    def make(node_id: str = "node-a", measure: bool = True) -> AttestationResponder:
        if request.param == "software":
            node = software_node(node_id)
            enroll(verifier, node)
        else:
            attester = SimulatedTpmAttester()
            node = AttestationResponder(node_id, attester)
            node.open()
            verifier.register(attester.enrollment(node_id))
        if measure:
            measure_platform(node)
        return node

    return make


def evidence_of(node: AttestationResponder, verifier: AttestationVerifierService) -> pb.AttesterMessage:
    return pb.AttesterMessage.FromString(node.handle(verifier.challenge(node.node_id)))


def rejected(verifier: AttestationVerifierService, node_id: str, message: pb.AttesterMessage | bytes) -> str:
    payload = message if isinstance(message, bytes) else message.SerializeToString()
    outcome = verifier.receive(node_id, payload)
    assert isinstance(outcome.rejected, EvidenceRejected), outcome
    return outcome.rejected.reason


def contraindicated(
    verifier: AttestationVerifierService, node_id: str, message: pb.AttesterMessage
) -> list[str]:
    outcome = verifier.receive(node_id, message.SerializeToString())
    assert outcome.rejected is None, outcome.rejected
    assert outcome.result.status == CONTRAINDICATED
    return [r.id for r in outcome.result.reasons]


def test_affirming_result_is_signed_and_expires(make_node, verifier, clock: Clock):
    node = make_node()
    node.measure("model.vib-cnn", MODEL)
    outcome = attest(verifier, node)
    assert outcome.result.status == AFFIRMING
    signed = verifier.result("node-a")
    assert open_signed_result(signed, verifier.signer.public_key) == outcome.result
    assert verifier.tier("node-a") == outcome.result.tier

    clock.advance(verifier.config.result_ttl_s)
    assert verifier.tier("node-a") == "none"
    assert verifier.result("node-a") is None
    assert verifier.state("node-a") == AttestationState.EXPIRED
    assert verifier.expire() == ["node-a"]  # reads never record the expiry; expire() does, once


def test_a_result_is_signed_when_first_read_not_when_made(make_node, verifier, monkeypatch):
    """Renewals superseded unread cost no signature; the one read is signed once, with the bytes
    signing it at once would have given (Ed25519 is deterministic)."""
    signed: list[bytes] = []
    sign = verifier.signer.sign_serialized
    monkeypatch.setattr(verifier.signer, "sign_serialized", lambda data: signed.append(data) or sign(data))
    node = make_node()
    for _ in range(3):
        assert attest(verifier, node).result.status == AFFIRMING
    assert signed == []
    first, again = verifier.result("node-a"), verifier.result("node-a")
    assert len(signed) == 1
    assert first == again
    result = open_signed_result(first, verifier.signer.public_key)
    assert verifier.signer.sign(result) == first


def test_expire_reports_each_expiry_once(make_node, verifier, clock):
    node = make_node()
    attest(verifier, node)
    clock.advance(verifier.config.result_ttl_s + 1)
    assert verifier.expire() == ["node-a"]
    assert verifier.expire() == []


def test_each_result_expires_at_its_own_time_across_renewals(make_node, verifier, clock):
    """expire() looks at the nodes only once the earliest expiry it knows has passed: a renewal moves
    a node's expiry later, and a new result never hides an earlier one."""
    ttl = verifier.config.result_ttl_s
    a, b = make_node("node-a"), make_node("node-b")
    assert verifier.expire() == []  # no result: none can expire until one comes
    attest(verifier, a)
    assert verifier.expire() == []  # nothing due: the earliest expiry is node-a's
    clock.advance(ttl / 2)
    attest(verifier, b)  # expires half a ttl after node-a
    clock.advance(ttl / 4)
    attest(verifier, a)  # renewed: now expires a quarter ttl after node-b
    clock.advance(ttl / 4)  # node-a's first result would have expired now
    assert verifier.expire() == []
    clock.advance(ttl / 2)  # node-b's expires
    assert verifier.expire() == ["node-b"]
    clock.advance(ttl / 4)
    assert verifier.expire() == ["node-a"]
    assert verifier.expire() == []


# ------------------------------------------------------------------------------ rejected


def test_evidence_for_another_node_is_rejected(make_node, verifier):
    node = make_node()
    assert rejected(verifier, "node-b", evidence_of(node, verifier)) == "attestation.evidence.wrong_node"


def test_unknown_node_is_rejected(make_node, verifier):
    node = make_node()
    verifier.forget("node-a")
    message = evidence_of(node, verifier)
    assert rejected(verifier, "node-a", message) == "attestation.ak.unknown"


def test_evidence_with_another_ak_is_rejected(make_node, verifier):
    make_node("node-a")
    node_b = make_node("node-b")
    message = pb.AttesterMessage.FromString(node_b.handle(verifier.challenge("node-b")))
    message.evidence.node_id = "node-a"
    assert rejected(verifier, "node-a", message) == "attestation.ak.mismatch"


def test_tampered_quote_fails_the_signature(make_node, verifier):
    node = make_node()
    message = evidence_of(node, verifier)
    attest_bytes = bytearray(message.evidence.quote.attest)
    attest_bytes[-1] ^= 1  # last byte of the PCR digest
    message.evidence.quote.attest = bytes(attest_bytes)
    assert rejected(verifier, "node-a", message) == "attestation.quote.bad_signature"
    assert verifier.state("node-a") == AttestationState.ENROLLED


@pytest.mark.parametrize(
    "forge",
    [lambda sig: sig[:-1], lambda sig: sig + b"\0", lambda sig: bytes([sig[0] ^ 1]) + sig[1:]],
    ids=["short", "long", "flipped"],
)
def test_a_software_quote_with_a_forged_signature_fails_the_signature(software_node, verifier, forge):
    node = software_node("node-a")
    enroll(verifier, node)
    message = evidence_of(node, verifier)
    assert len(message.evidence.quote.signature) == 64  # an Ed25519 AK
    message.evidence.quote.signature = forge(message.evidence.quote.signature)
    assert rejected(verifier, "node-a", message) == "attestation.quote.bad_signature"


def test_nonce_from_elsewhere_is_unknown(make_node, verifier, clock):
    node = make_node()
    other = AttestationVerifierService(VerifierConfig(), reference_values(), clock=clock)
    message = pb.AttesterMessage.FromString(node.handle(other.challenge("node-a")))
    assert rejected(verifier, "node-a", message) == "attestation.nonce.unknown"


def test_nonce_issued_to_another_node(make_node, verifier):
    node = make_node("node-a")
    make_node("node-b")
    challenge = pb.VerifierMessage.FromString(verifier.challenge("node-b"))
    challenge.challenge.node_id = "node-a"
    message = pb.AttesterMessage.FromString(node.handle(challenge.SerializeToString()))
    assert rejected(verifier, "node-a", message) == "attestation.nonce.wrong_node"


def test_nonce_is_single_use_and_expires(make_node, verifier, clock):
    node = make_node()
    message = evidence_of(node, verifier)
    assert verifier.receive("node-a", message.SerializeToString()).result.status == AFFIRMING
    assert rejected(verifier, "node-a", message) == "attestation.nonce.reused"
    late = evidence_of(node, verifier)
    clock.advance(verifier.config.challenge_ttl_s + 0.001)
    assert rejected(verifier, "node-a", late) == "attestation.nonce.expired"


def test_only_the_latest_challenges_are_kept(make_node, verifier):
    node = make_node()
    first = verifier.challenge("node-a")
    for _ in range(verifier.config.max_outstanding_per_node):
        verifier.challenge("node-a")
    message = pb.AttesterMessage.FromString(node.handle(first))
    assert rejected(verifier, "node-a", message) == "attestation.nonce.superseded"


def test_revoked_node_is_rejected(make_node, verifier):
    node = make_node()
    verifier.revoke("node-a")
    assert rejected(verifier, "node-a", evidence_of(node, verifier)) == "attestation.ak.revoked"
    assert verifier.state("node-a") == AttestationState.REVOKED


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"\x08\x01\x62\x05trunc", "attestation.evidence.malformed"),
        (pb.AttesterMessage(schema=2).SerializeToString(), "attestation.evidence.unknown_schema"),
        (pb.AttesterMessage(schema=1).SerializeToString(), "attestation.evidence.malformed"),
        (b"\x00" * (129 * 1024), "attestation.evidence.too_large"),
    ],
    ids=["truncated", "schema", "empty", "oversized"],
)
def test_garbage_is_rejected(make_node, verifier, payload, reason):
    make_node()
    assert rejected(verifier, "node-a", payload) == reason
    assert verifier.rejections.counts[reason] == 1
    assert verifier.snapshot("node-a").last_rejection == reason


def test_cut_quote_structure_is_malformed(make_node, verifier):
    node = make_node()
    message = evidence_of(node, verifier)
    message.evidence.quote.attest = message.evidence.quote.attest[:40]
    assert rejected(verifier, "node-a", message) == "attestation.quote.malformed"


def test_too_many_events_are_refused_unread(make_node, verifier):
    node = make_node()
    message = evidence_of(node, verifier)
    event = message.evidence.events[0]
    message.evidence.events.extend([event] * verifier.config.max_events)
    assert rejected(verifier, "node-a", message) == "attestation.evidence.too_large"


# ------------------------------------------------------------------------------ contraindicated


def test_quote_over_other_pcrs(make_node, verifier):
    node = make_node()
    challenge = pb.VerifierMessage.FromString(verifier.challenge("node-a"))
    del challenge.challenge.pcrs[:]
    challenge.challenge.pcrs.append(16)
    message = pb.AttesterMessage.FromString(node.handle(challenge.SerializeToString()))
    assert contraindicated(verifier, "node-a", message) == ["attestation.pcr.selection_mismatch"]


def test_reported_pcr_values_differ_from_the_quote(make_node, verifier):
    node = make_node()
    message = evidence_of(node, verifier)
    message.evidence.pcrs[1].digest = b"\x01" * 32
    assert contraindicated(verifier, "node-a", message) == ["attestation.pcr.digest_mismatch"]


def test_edited_log_does_not_replay(make_node, verifier):
    node = make_node()
    message = evidence_of(node, verifier)
    message.evidence.events[0].digest = bytes(32)  # claim a different agent.code digest
    assert contraindicated(verifier, "node-a", message) == ["attestation.log.replay_mismatch"]


def test_event_on_an_unquoted_pcr(make_node, verifier):
    node = make_node()
    message = evidence_of(node, verifier)
    message.evidence.events[0].pcr = 5
    assert contraindicated(verifier, "node-a", message) == ["attestation.log.unquoted_pcr"]


def test_malformed_event(make_node, verifier):
    node = make_node()
    message = evidence_of(node, verifier)
    message.evidence.events[1].digest = b"short"
    assert contraindicated(verifier, "node-a", message) == ["attestation.log.malformed"]


def test_modified_agent_code(make_node, verifier):
    node = make_node(measure=False)
    measure_platform(node, code=AGENT_CODE + b"evil()")
    outcome = attest(verifier, node)
    assert outcome.result.status == CONTRAINDICATED
    assert [(r.id, r.subject) for r in outcome.result.reasons] == [
        ("reference.digest.mismatch", "agent.code")
    ]
    assert verifier.tier("node-a") == "none"


def test_unknown_and_missing_components(make_node, verifier):
    node = make_node(measure=False)
    node.measure("agent.code", AGENT_CODE)
    node.measure("agent.debugger", b"gdbserver")
    outcome = attest(verifier, node)
    assert [(r.id, r.subject) for r in outcome.result.reasons] == [
        ("reference.component.unknown", "agent.debugger"),
        ("reference.component.missing", "agent.config"),
    ]


def test_warning_severity_gives_a_warning_and_no_tier(make_node, verifier):
    verifier.reference = reference_values(
        components={
            "agent.code": {"digests": [sha(AGENT_CODE)]},
            "agent.config": {"digests": [], "on_mismatch": "warning"},
            "accelerator.*": {"digests": [], "on_mismatch": "warning"},
        }
    )
    node = make_node()
    outcome = attest(verifier, node)
    assert outcome.result.status == WARNING
    assert {r.id for r in outcome.result.reasons} == {"reference.digest.mismatch"}
    assert verifier.state("node-a") == AttestationState.WARNING
    assert verifier.tier("node-a") == "none"


def test_pcr_golden_values(make_node, verifier):
    node = make_node()
    platform = node.attester.read_pcrs([16])[16]
    verifier.reference = reference_values(pcrs={16: [platform.hex()]})
    assert attest(verifier, node).result.status == AFFIRMING
    # A second, individually good bitstream: every event passes, the PCR no longer does.
    node.measure("accelerator.fpga-pynq.bitstream", BITSTREAM + b"v2")
    verifier.allow("accelerator.fpga-pynq.bitstream", sha(BITSTREAM + b"v2"))
    outcome = attest(verifier, node)
    assert [r.id for r in outcome.result.reasons] == ["reference.pcr.unexpected"]


def test_foreign_binding_key_is_not_released_to(make_node, verifier):
    node_a = make_node("node-a")
    node_b = make_node("node-b")
    foreign = pb.AttesterMessage.FromString(node_b.handle(verifier.challenge("node-b"))).evidence.binding
    message = evidence_of(node_a, verifier)
    message.evidence.binding.CopyFrom(foreign)
    outcome = verifier.receive("node-a", message.SerializeToString())
    assert [r.id for r in outcome.result.reasons] == ["attestation.binding.invalid"]
    assert not outcome.result.binding_public


# Points of small order on Curve25519 (RFC 7748, section 6.1; the list libsodium refuses): zero,
# one, and a point of order 8.
SMALL_ORDER = [
    bytes(32),
    (1).to_bytes(32, "little"),
    bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
]


@pytest.mark.parametrize("point", SMALL_ORDER, ids=["zero", "one", "order-8"])
def test_a_binding_key_of_small_order_is_no_binding_key(software_node, verifier, point):
    """A software node certifies its binding key with its own attestation key, so a hostile one can
    present a point of small order: every exchange with it gives the all-zero secret, and a wrap to
    it failed with a ValueError that stopped the reconcile pass at that node, every pass. Such a key
    now makes the result contraindicated, and a wrap to it is a KeyReleaseError."""
    node = software_node("node-a")
    enroll(verifier, node)
    measure_platform(node)
    attester = node.attester

    def hostile_binding(nonce: bytes, platform_pcr: int) -> pb.Binding:
        certify = attester._attest(tpm_wire.ST_ATTEST_CERTIFY, nonce, certified_name=software_name(point))
        return pb.Binding(public=point, certify=certify)

    attester.binding = hostile_binding
    outcome = verifier.receive("node-a", evidence_of(node, verifier).SerializeToString())
    assert outcome.result.status == CONTRAINDICATED
    assert [r.id for r in outcome.result.reasons] == ["attestation.binding.invalid"]
    assert "not a usable X25519 public key" in outcome.result.reasons[0].message
    assert not outcome.result.binding_public
    assert verifier.tier("node-a") == "none"
    with pytest.raises(KeyReleaseError) as refused:
        keyrelease.wrap_key(keyrelease.new_data_key(), pb.ATTESTER_KIND_SOFTWARE, point, "node-a/m/1")
    assert refused.value.reason == "attestation.key.bad_binding"


def test_a_released_key_is_wrapped_once_and_authorised_every_time(make_node, verifier, clock):
    """The envelope for (node, context, key) is made once and sent again; another context or data key
    gets its own; every release is still authorised anew."""
    node = make_node()
    attest(verifier, node)
    data_key = keyrelease.new_data_key()
    first = verifier.release_key("node-a", data_key, "node-a/m/1")
    assert verifier.release_key("node-a", data_key, "node-a/m/1") == first
    assert node.unwrap(first) == data_key
    assert verifier.release_key("node-a", data_key, "node-a/m/2") != first
    assert verifier.release_key("node-a", keyrelease.new_data_key(), "node-a/m/1") != first

    verifier.revoke("node-a")  # a cached envelope is no release: the node is refused
    with pytest.raises(KeyReleaseError) as revoked:
        verifier.release_key("node-a", data_key, "node-a/m/1")
    assert revoked.value.reason == "attestation.key.not_attested"


def test_a_cached_envelope_is_not_sent_after_the_result_expires(make_node, verifier, clock):
    node = make_node()
    attest(verifier, node)
    data_key = keyrelease.new_data_key()
    verifier.release_key("node-a", data_key, "node-a/m/1")
    clock.advance(verifier.config.result_ttl_s)  # the result expired: the envelope is not sent again
    with pytest.raises(KeyReleaseError) as expired:
        verifier.release_key("node-a", data_key, "node-a/m/1")
    assert expired.value.reason == "attestation.key.not_attested"


# ------------------------------------------------------------------------------ enrollment


def test_software_enrollment_conflict_and_bad_proof(software_node, verifier):
    node = software_node("node-a")
    enroll(verifier, node)
    impostor = software_node("node-a")
    outcome = verifier.receive("node-a", impostor.enrollment_request())
    assert isinstance(outcome.rejected, EnrollmentError)
    assert outcome.rejected.reason == "attestation.enroll.conflict"

    fresh = software_node("node-c")
    reply = verifier.receive("node-c", fresh.enrollment_request()).reply
    answer = pb.AttesterMessage.FromString(fresh.handle(reply))
    answer.enroll_answer.proof = bytes(64)
    outcome = verifier.receive("node-c", answer.SerializeToString())
    assert outcome.rejected.reason == "attestation.enroll.bad_proof"


def test_reenrolling_the_same_ak_keeps_the_state(software_node, verifier):
    node = software_node("node-a")
    enroll(verifier, node)
    measure_platform(node)
    attest(verifier, node)
    enroll(verifier, node)  # an agent restart announces itself again
    assert verifier.state("node-a") == AttestationState.AFFIRMING


def test_listeners_hear_every_change_as_it_happens(make_node, verifier, clock):
    """Quarantine starts from these notifications: a failure is reported within the receive call."""
    node = make_node()
    seen: list[int] = []
    unsubscribe = verifier.subscribe(lambda view: seen.append(view.state))
    attest(verifier, node)
    node.measure("agent.code", b"replaced at run time")
    attest(verifier, node)
    clock.advance(verifier.config.result_ttl_s)
    verifier.expire()
    unsubscribe()
    attest(verifier, node)
    assert seen == [
        pb.ATTESTATION_STATE_AFFIRMING,
        pb.ATTESTATION_STATE_CONTRAINDICATED,
        pb.ATTESTATION_STATE_EXPIRED,
    ]
