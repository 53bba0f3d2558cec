"""Fuzzing the attestation parsers: the verifier's evidence/event-log handling (``receive`` never
raises for bad input: it rejects with a reason), the TPM structure parsers (only
TpmStructureError), and the node's parser of verifier messages (only AttestationError)."""

from __future__ import annotations

import hashlib

import pytest
from fuzz_budget import FUZZ, mutated
from hypothesis import given
from hypothesis import strategies as st
from simulated_tpm import SimulatedTpmAttester

from attestation import attesters, tpm_wire
from attestation.errors import AttestationError
from attestation.reference import ReferenceValues
from attestation.responder import AttestationResponder
from attestation.service import AttestationVerifierService, VerifierConfig

CODE, CONFIG = b"agent code", b"node_id: fuzz-1\n"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def enrolled(tmp_path_factory):
    """A verifier and an enrolled software-attested node that measured its platform."""
    reference = ReferenceValues.model_validate(
        {
            "version": 1,
            "required": ["agent.code", "agent.config"],
            "components": {
                "agent.code": {"digests": [_sha(CODE)]},
                "agent.config": {"digests": [_sha(CONFIG)]},
            },
        }
    )
    verifier = AttestationVerifierService(VerifierConfig(), reference)
    config = attesters.SoftwareAttesterConfig(key_dir=tmp_path_factory.mktemp("fuzz-keys"))
    node = AttestationResponder("fuzz-1", attesters.create(config))
    node.open()
    node.measure("agent.code", CODE)
    node.measure("agent.config", CONFIG)
    outcome = verifier.receive(node.node_id, node.enrollment_request())
    outcome = verifier.receive(node.node_id, node.handle(outcome.reply))
    assert outcome.enrolled is not None
    good = verifier.receive(node.node_id, node.handle(verifier.challenge(node.node_id)))
    assert good.result is not None and good.rejected is None, "the seed evidence is accepted"
    yield verifier, node
    node.close()


@FUZZ
@given(data=st.data())
def test_verifier_rejects_mutated_evidence_without_raising(enrolled, data):
    verifier, node = enrolled
    evidence = node.handle(verifier.challenge(node.node_id))
    payload = data.draw(st.one_of(mutated(evidence), st.binary(max_size=256)))
    outcome = verifier.receive(node.node_id, payload)  # never raises for bad input
    assert outcome.rejected is not None or outcome.result is not None
    if outcome.rejected is not None:
        assert outcome.rejected.reason.startswith("attestation.")


@FUZZ
@given(data=st.data())
def test_enrollment_parser_rejects_mutated_requests_without_raising(enrolled, data):
    verifier, node = enrolled
    payload = data.draw(mutated(node.enrollment_request()))
    verifier.receive("fuzz-2", payload)  # never raises; a reply only for a well-formed request


# Well-formed TPM structures to mutate: mutations then reach past the first checks.
_SEEDS = {
    tpm_wire.parse_attest: tpm_wire.marshal_attest(
        tpm_wire.ST_ATTEST_QUOTE,
        signer=b"\x00\x0b" + b"\x22" * 32,
        extra_data=b"\x33" * 32,
        pcr_selection=tpm_wire.marshal_pcr_selection(tpm_wire.ALG_SHA256, (0, 16)),
        pcr_digest=b"\x11" * 32,
    ),
    tpm_wire.parse_signature: tpm_wire.marshal_signature(
        tpm_wire.ALG_ECDSA, tpm_wire.ALG_SHA256, (2**200, 3**120)
    ),
    tpm_wire.parse_public: SimulatedTpmAttester().ak_public[2:],  # TPM2B_PUBLIC without its size
}


@pytest.mark.parametrize("parser", list(_SEEDS), ids=lambda f: f.__name__)
def test_seed_structures_parse(parser):
    parser(_SEEDS[parser])


@FUZZ
@given(data=st.data(), parser=st.sampled_from(list(_SEEDS)))
def test_tpm_structure_parsers_raise_only_tpm_structure_errors(data, parser):
    payload = data.draw(st.one_of(st.binary(max_size=300), mutated(_SEEDS[parser])))
    try:
        parser(payload)
    except tpm_wire.TpmStructureError as err:
        reason = err.reason
    else:
        reason = "parsed"
    assert reason in ("attestation.quote.malformed", "parsed")


@FUZZ
@given(payload=st.one_of(st.binary(max_size=512), st.binary(min_size=4000, max_size=5000)))
def test_node_parser_of_verifier_messages_raises_only_attestation_errors(enrolled, payload):
    _, node = enrolled
    try:
        node.handle(payload)
    except AttestationError as err:
        reason = err.reason
    else:
        reason = "answered"
    assert reason.startswith("attestation.") or reason == "answered"
