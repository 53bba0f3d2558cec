"""Pure-Python TPM 2.0 structures: round trips, strict parsing, and agreement with tpm2-pytss."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from simulated_tpm import SimulatedTpmAttester

from attestation import tpm_wire
from attestation.errors import EvidenceMalformed


def test_quote_round_trip():
    selection = tpm_wire.marshal_pcr_selection(tpm_wire.ALG_SHA256, [16, 23])
    raw = tpm_wire.marshal_attest(
        tpm_wire.ST_ATTEST_QUOTE,
        signer=b"\x00\x0b" + bytes(32),
        extra_data=b"n" * 32,
        clock=7,
        pcr_selection=selection,
        pcr_digest=b"d" * 32,
    )
    attest = tpm_wire.parse_attest(raw)
    assert attest.pcr_select == ((tpm_wire.ALG_SHA256, (16, 23)),)
    assert (attest.extra_data, attest.pcr_digest, attest.clock) == (b"n" * 32, b"d" * 32, 7)


@pytest.mark.parametrize("cut", [1, 10, 40, 80])
def test_truncated_structures_raise_a_typed_error(cut):
    signer = SimulatedTpmAttester()
    signer.open([16, 23])
    quote = signer.quote(b"n" * 32, [16, 23])
    for parse, raw in (
        (tpm_wire.parse_attest, quote.attest),
        (tpm_wire.parse_signature, quote.signature),
        (tpm_wire.parse_public, signer.ak_public),
    ):
        with pytest.raises(EvidenceMalformed) as err:
            parse(raw[:-cut] if cut < len(raw) else b"")
        assert err.value.reason == "attestation.quote.malformed"
    with pytest.raises(EvidenceMalformed):
        tpm_wire.parse_attest(quote.attest + b"\x00")  # trailing bytes


def test_public_area_and_name_match_tpm2_pytss():
    tss = pytest.importorskip("tpm2_pytss")
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    raw = tpm_wire.marshal_public_ecc(key, attributes=0x00050072)
    theirs, _ = tss.TPMT_PUBLIC.unmarshal(raw)
    ours = tpm_wire.parse_public(raw)
    assert bytes(theirs.get_name()) == ours.name
    assert ours.key.public_numbers() == key.public_numbers()


def test_kdfa_matches_tpm2_pytss():
    utils = pytest.importorskip("tpm2_pytss.utils")
    assert tpm_wire.kdfa(tpm_wire.ALG_SHA256, b"k" * 32, b"STORAGE", b"u", b"v", 128) == utils._kdfa(
        tpm_wire.ALG_SHA256, b"k" * 32, b"STORAGE", b"u", b"v", 128
    )
