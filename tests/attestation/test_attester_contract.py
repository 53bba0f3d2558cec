"""One contract, every attester: what the responder and the verifier rely on."""

from __future__ import annotations

import pytest
from conftest import AGENT_CODE, Swtpm
from simulated_tpm import SimulatedTpmAttester

from attestation import attesters, keyrelease, tpm_wire
from attestation.attesters.base import Attester
from attestation.errors import KeyReleaseError
from attestation.eventlog import ZERO, PcrLayout, event_hash, extend
from attestation.verifier import KnownAttester
from edgeward.v1 import attestation_pb2 as pb

LAYOUT = PcrLayout()


@pytest.fixture(params=["software", "simulated-tpm", pytest.param("tpm2", marks=pytest.mark.tpm)])
def make_attester(request, tmp_path):
    """``make_attester()``: open attesters of one kind, each on its own (software) TPM."""
    opened: list[Attester] = []

    def make() -> Attester:
        index = len(opened)
        if request.param == "software":
            attester = attesters.create(attesters.SoftwareAttesterConfig(key_dir=tmp_path / f"k{index}"))
        elif request.param == "simulated-tpm":
            attester = SimulatedTpmAttester()
        else:
            tpm: Swtpm = request.getfixturevalue("swtpm_factory")(index % 2)
            attester = attesters.create(
                attesters.Tpm2AttesterConfig(tcti=tpm.tcti, key_dir=tmp_path / f"k{index}")
            )
        attester.open(LAYOUT.pcrs)
        opened.append(attester)
        return attester

    yield make
    for attester in opened:
        attester.close()


def known(attester: Attester) -> KnownAttester:
    ek_certified = attester.kind == pb.ATTESTER_KIND_TPM2
    return KnownAttester.from_enrollment(
        pb.Enrollment(
            node_id="n", kind=attester.kind, ak_public=attester.ak_public, ek_certified=ek_certified
        )
    )


def test_pcrs_start_at_zero_and_extend_like_the_log(make_attester):
    attester = make_attester()
    assert attester.read_pcrs(LAYOUT.pcrs) == dict.fromkeys(LAYOUT.pcrs, ZERO)
    value = event_hash("agent.code", bytes(32), "")
    attester.extend(16, value)
    assert attester.read_pcrs([16, 23]) == {16: extend(ZERO, value), 23: ZERO}


def test_quote_verifies_with_the_ak_and_carries_the_nonce(make_attester):
    attester = make_attester()
    attester.extend(23, b"m" * 32)
    quote = attester.quote(b"q" * 32, [16, 23])
    attest = known(attester).check_signed(quote)
    values = attester.read_pcrs([16, 23])
    assert attest.type == tpm_wire.ST_ATTEST_QUOTE and attest.extra_data == b"q" * 32
    assert attest.pcr_digest == tpm_wire.pcr_digest([values[16], values[23]])


def test_binding_key_is_certified_and_rotates_with_the_platform_pcr(make_attester):
    attester = make_attester()
    first = attester.binding(b"a" * 32, 16)
    assert attester.binding(b"b" * 32, 16).public == first.public
    certify = known(attester).check_signed(first.certify)
    assert certify.type == tpm_wire.ST_ATTEST_CERTIFY and certify.extra_data == b"a" * 32
    attester.extend(16, event_hash("agent.code", bytes(32), ""))
    assert attester.binding(b"c" * 32, 16).public != first.public


def test_unwrap_only_here_and_only_in_the_bound_state(make_attester):
    attester, other = make_attester(), make_attester()
    binding = attester.binding(b"a" * 32, 16)
    other.binding(b"a" * 32, 16)
    data_key = keyrelease.new_data_key()
    wrapped = keyrelease.wrap_key(data_key, attester.kind, binding.public, "n/m/1")
    assert keyrelease.unwrap_with_shared_secret(wrapped, attester.shared_secret(wrapped, 16)) == data_key
    with pytest.raises(KeyReleaseError) as elsewhere:
        other.shared_secret(wrapped, 16)
    assert elsewhere.value.reason == "attestation.key.unwrap_failed"
    attester.extend(16, event_hash("agent.code", AGENT_CODE, ""))
    with pytest.raises(KeyReleaseError) as moved_on:
        attester.shared_secret(wrapped, 16)
    assert moved_on.value.reason == "attestation.key.policy_failed"
