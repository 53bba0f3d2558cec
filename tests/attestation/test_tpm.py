"""End to end against real software TPMs (swtpm): enrollment bound to the EK certificate,
attestation, tampering, key release and the hardware lock."""

from __future__ import annotations

import hashlib
import shutil
import subprocess

import pytest
from conftest import AGENT_CODE, MODEL, attest, enroll, measure_platform, reference_values, sha

from attestation import keyrelease, tpm_wire
from attestation.errors import EnrollmentError, KeyReleaseError, TpmError
from attestation.service import AttestationState
from edgeward.v1 import attestation_pb2 as pb

pytestmark = pytest.mark.tpm

CONTRAINDICATED = pb.ATTESTATION_STATUS_CONTRAINDICATED


def reasons(outcome) -> list[str]:
    assert outcome.result is not None, outcome.rejected
    return [r.id for r in outcome.result.reasons]


@pytest.mark.parametrize("ak_algorithm", ["ecc256", "rsa2048"])
def test_happy_path_enroll_attest_release_decrypt(tpm_node, tpm_verifier, ak_algorithm):
    node = tpm_node(ak_algorithm=ak_algorithm)
    measure_platform(node)
    enroll(tpm_verifier, node)
    record = tpm_verifier.enrollments()[0]
    assert record.kind == pb.ATTESTER_KIND_TPM2 and record.ek_certified

    node.measure("model.vib-cnn", MODEL, "vib-cnn 1.0.0")
    outcome = attest(tpm_verifier, node)
    assert outcome.result.status == pb.ATTESTATION_STATUS_AFFIRMING, outcome.result.reasons
    assert outcome.result.tier == "tpm2"
    assert tpm_verifier.tier("node-a") == "tpm2"
    assert tpm_verifier.state("node-a") == AttestationState.AFFIRMING

    # The orchestrator stores the model sealed under its data key and releases the key wrapped.
    data_key = keyrelease.new_data_key()
    sealed = keyrelease.seal(data_key, MODEL, b"vib-cnn/1.0.0")
    wrapped = tpm_verifier.release_key("node-a", data_key, "node-a/vib-cnn/1.0.0")
    plaintext = keyrelease.open_sealed(node.unwrap(wrapped), sealed, b"vib-cnn/1.0.0")
    assert hashlib.sha256(plaintext).hexdigest() == sha(MODEL)


def test_enrollment_needs_a_trusted_ek_certificate(tpm_node, verifier):
    node = tpm_node()
    outcome = verifier.receive("node-a", node.enrollment_request())  # verifier trusts no EK CA
    assert isinstance(outcome.rejected, EnrollmentError)
    assert outcome.rejected.reason == "attestation.ek.untrusted"


def test_enrollment_credential_activates_only_on_the_ek_tpm(tpm_node, tpm_verifier):
    node_a = tpm_node("node-a", chip=0)
    node_b = tpm_node("node-a", chip=1)  # another chip claiming the same AK and EK
    outcome = tpm_verifier.receive("node-a", node_a.enrollment_request())
    # B cannot activate a credential made for A's EK.
    with pytest.raises(TpmError) as excinfo:
        node_b.handle(outcome.reply)
    assert excinfo.value.reason == "attestation.enroll.activation_failed"


def test_modified_agent_file_is_contraindicated(tpm_node, tpm_verifier):
    node = tpm_node()
    measure_platform(node, code=AGENT_CODE + b"# injected\n")
    enroll(tpm_verifier, node)
    outcome = attest(tpm_verifier, node)
    assert outcome.result.status == CONTRAINDICATED
    assert reasons(outcome) == ["reference.digest.mismatch"]
    assert outcome.result.reasons[0].subject == "agent.code"
    assert tpm_verifier.tier("node-a") == "none"


def test_modified_model_file_is_contraindicated(tpm_node, tpm_verifier):
    node = tpm_node()
    measure_platform(node)
    enroll(tpm_verifier, node)
    node.measure("model.vib-cnn", MODEL[:-1] + b"!")
    outcome = attest(tpm_verifier, node)
    assert reasons(outcome) == ["reference.digest.mismatch"]
    assert outcome.result.reasons[0].subject == "model.vib-cnn"


def test_replayed_quote_and_stale_nonce_are_rejected(tpm_node, tpm_verifier, clock):
    node = tpm_node()
    measure_platform(node)
    enroll(tpm_verifier, node)
    evidence = node.handle(tpm_verifier.challenge("node-a"))
    assert tpm_verifier.receive("node-a", evidence).result.status == pb.ATTESTATION_STATUS_AFFIRMING
    assert tpm_verifier.receive("node-a", evidence).rejected.reason == "attestation.nonce.reused"

    late = node.handle(tpm_verifier.challenge("node-a"))
    clock.advance(tpm_verifier.config.challenge_ttl_s + 1)
    assert tpm_verifier.receive("node-a", late).rejected.reason == "attestation.nonce.expired"


def test_quote_signed_by_another_ak_is_rejected(tpm_node, tpm_verifier):
    node_a = tpm_node("node-a", chip=0)
    node_b = tpm_node("node-b", chip=1)
    for node in (node_a, node_b):
        measure_platform(node)
        enroll(tpm_verifier, node)
    challenge = tpm_verifier.challenge("node-a")
    good = pb.AttesterMessage.FromString(node_a.handle(challenge))
    forged = pb.AttesterMessage()
    forged.CopyFrom(good)
    # B's TPM answers A's challenge; the forger keeps A's AK public in the evidence.
    nonce = pb.VerifierMessage.FromString(challenge).challenge.nonce
    forged.evidence.quote.CopyFrom(node_b.attester.quote(nonce, (16, 23)))
    outcome = tpm_verifier.receive("node-a", forged.SerializeToString())
    assert outcome.rejected.reason == "attestation.quote.bad_signature"
    assert tpm_verifier.state("node-a") == AttestationState.ENROLLED  # unauthenticated: no state change


def test_event_log_that_does_not_replay_is_contraindicated(tpm_node, tpm_verifier):
    node = tpm_node()
    measure_platform(node)
    enroll(tpm_verifier, node)
    message = pb.AttesterMessage.FromString(node.handle(tpm_verifier.challenge("node-a")))
    del message.evidence.events[2]  # hide the bitstream that was loaded
    outcome = tpm_verifier.receive("node-a", message.SerializeToString())
    assert reasons(outcome) == ["attestation.log.replay_mismatch"]
    assert outcome.result.reasons[0].subject == "pcr16"


def test_pcr_outside_reference_values_is_contraindicated(tpm_node, tpm_verifier):
    golden = tpm_node("golden")
    measure_platform(golden)
    golden_pcr16 = golden.attester.read_pcrs([16])[16].hex()
    tpm_verifier.reference = reference_values(pcrs={16: [golden_pcr16]})

    node = tpm_node("node-a", chip=1)
    # Same components, all with good digests, measured in another order: the PCR differs.
    node.measure("agent.config", b"node_id: node-a\n")
    node.measure("agent.code", AGENT_CODE)
    node.measure("accelerator.fpga-pynq.bitstream", b"\x00fpga overlay bitstream\xff" * 64)
    enroll(tpm_verifier, node)
    outcome = attest(tpm_verifier, node)
    assert reasons(outcome) == ["reference.pcr.unexpected"]


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"\xff\x00garbage", "attestation.evidence.malformed"),
        (b"", "attestation.evidence.unknown_schema"),
        (b"x" * 200_000, "attestation.evidence.too_large"),
    ],
    ids=["garbage", "empty", "oversized"],
)
def test_garbage_evidence_is_rejected(tpm_node, tpm_verifier, payload, reason):
    node = tpm_node()
    enroll(tpm_verifier, node)
    assert tpm_verifier.receive("node-a", payload).rejected.reason == reason


def test_truncated_evidence_is_rejected(tpm_node, tpm_verifier):
    node = tpm_node()
    measure_platform(node)
    enroll(tpm_verifier, node)
    evidence = node.handle(tpm_verifier.challenge("node-a"))
    truncated = tpm_verifier.receive("node-a", evidence[: len(evidence) // 2]).rejected
    assert truncated.reason == "attestation.evidence.malformed"
    message = pb.AttesterMessage.FromString(evidence)
    message.evidence.quote.attest = message.evidence.quote.attest[:-5]  # a cut TPMS_ATTEST
    assert (
        tpm_verifier.receive("node-a", message.SerializeToString()).rejected.reason
        == "attestation.quote.malformed"
    )


def test_wrapped_key_is_locked_to_the_node_and_its_measured_state(tpm_node, tpm_verifier):
    node_a = tpm_node("node-a", chip=0)
    node_b = tpm_node("node-b", chip=1)
    for node in (node_a, node_b):
        measure_platform(node)
        enroll(tpm_verifier, node)
        assert attest(tpm_verifier, node).result.status == pb.ATTESTATION_STATUS_AFFIRMING
    data_key = keyrelease.new_data_key()
    wrapped_a = tpm_verifier.release_key("node-a", data_key, "node-a/vib-cnn/1.0.0")
    assert node_a.unwrap(wrapped_a) == data_key

    # A copy of A's wrapped key on B: B's TPM holds no such key.
    with pytest.raises(KeyReleaseError) as other:
        node_b.unwrap(wrapped_a)
    assert other.value.reason == "attestation.key.unwrap_failed"
    # Even with A's key blob files, B's TPM cannot load a key its seed did not make.
    node_b.attester._binding = node_a.attester._binding
    with pytest.raises(KeyReleaseError) as cloned:
        node_b.unwrap(wrapped_a)
    assert cloned.value.reason == "attestation.key.unwrap_failed"

    # A measures something new into the platform PCR: the TPM refuses the policy.
    node_a.measure("accelerator.fpga-pynq.bitstream", b"another bitstream")
    with pytest.raises(KeyReleaseError) as extended:
        node_a.unwrap(wrapped_a)
    assert extended.value.reason == "attestation.key.policy_failed"


def test_key_release_needs_an_affirming_result(tpm_node, tpm_verifier):
    node = tpm_node()
    measure_platform(node, code=b"tampered")
    enroll(tpm_verifier, node)
    attest(tpm_verifier, node)
    with pytest.raises(KeyReleaseError) as refused:
        tpm_verifier.release_key("node-a", keyrelease.new_data_key(), "node-a/m/1")
    assert refused.value.reason == "attestation.key.not_attested"


def test_policy_digest_matches_the_tpm(tpm_node):
    """The verifier's software PolicyPCR digest equals what the TPM computes in a trial session."""
    node = tpm_node()
    measure_platform(node)
    binding = node.attester.binding(b"n" * 32, 16)
    public = tpm_wire.parse_public(binding.public)
    value = node.attester.read_pcrs([16])[16]
    assert public.auth_policy == tpm_wire.policy_pcr_digest([16], [value])


def test_ek_is_recreated_from_the_template_when_not_persistent(swtpm_factory, tpm_node, tpm_verifier):
    """On TPMs without a persistent EK, the EK made from the TCG template matches its certificate."""
    if not shutil.which("tpm2_evictcontrol"):
        pytest.skip("tpm2-tools not installed: apt-get install tpm2-tools")
    tpm = swtpm_factory(0)
    evict = subprocess.run(
        ["tpm2_evictcontrol", "-T", tpm.tcti, "-C", "o", "-c", "0x81010001"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert evict.returncode == 0, evict.stderr
    node = tpm_node(tpm=tpm)
    measure_platform(node)
    enroll(tpm_verifier, node)
    assert tpm_verifier.enrollments()[0].ek_certified
    assert attest(tpm_verifier, node).result.status == pb.ATTESTATION_STATUS_AFFIRMING
