"""A TPM-format attester in software, a test double for tests and benchmarks only (it lives under
tests/, outside every installed package).

:class:`SimulatedTpmAttester` produces byte-for-byte the structures a TPM does (TPM2B_PUBLIC,
TPMS_ATTEST, TPMT_SIGNATURE with ECDSA P-256 or RSASSA-2048, a PolicyPCR-bound P-256 binding key
certified over the nonce), signed with keys held in memory. The verifier cannot tell it from a
TPM, which is the point for measuring the verifier and for fast property tests, and exactly why
it must never run on a node: it is not registered as an attester and has no EK, so it can only
be trusted through ``AttestationVerifierService.register`` with a hand-made enrollment.
"""

from __future__ import annotations

from collections.abc import Sequence

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from attestation import tpm_wire
from attestation.attesters.base import Attester
from attestation.attesters.tpm2 import AK_ATTRIBUTES, BINDING_ATTRIBUTES
from attestation.errors import KeyReleaseError
from attestation.eventlog import ZERO, extend
from edgeward.v1 import attestation_pb2 as pb


class SimulatedTpmAttester(Attester):
    kind = pb.ATTESTER_KIND_TPM2
    name = "simulated-tpm"

    def __init__(self, ak_algorithm: str = "ecc256") -> None:
        self.ak_algorithm = ak_algorithm
        if ak_algorithm == "ecc256":
            self._ak: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey = ec.generate_private_key(ec.SECP256R1())
            public = tpm_wire.marshal_public_ecc(self._ak.public_key(), attributes=AK_ATTRIBUTES)
        else:
            self._ak = rsa.generate_private_key(65537, 2048)
            public = tpm_wire.marshal_public_rsa(self._ak.public_key(), attributes=AK_ATTRIBUTES)
        self._ak_public = tpm_wire.tpm2b(public)
        self._ak_name = tpm_wire.name_of(tpm_wire.ALG_SHA256, public)
        self._pcrs: dict[int, bytes] = {}
        self._binding: tuple[ec.EllipticCurvePrivateKey, bytes, bytes] | None = None
        self.clock = 0

    def enrollment(self, node_id: str) -> pb.Enrollment:
        """A hand-made enrollment record (there is no EK to activate a credential with)."""
        return pb.Enrollment(node_id=node_id, kind=self.kind, ak_public=self._ak_public, ek_certified=True)

    def open(self, pcrs: Sequence[int]) -> None:
        self._pcrs = dict.fromkeys(pcrs, ZERO)

    def close(self) -> None:
        pass

    @property
    def ak_public(self) -> bytes:
        return self._ak_public

    def enrollment_request(self, node_id: str) -> pb.EnrollmentRequest:
        raise NotImplementedError("a simulated TPM has no EK; register its enrollment() instead")

    def answer_enrollment(self, challenge: pb.EnrollmentChallenge) -> bytes:
        raise NotImplementedError

    def extend(self, pcr: int, value: bytes) -> None:
        self._pcrs[pcr] = extend(self._pcrs.get(pcr, ZERO), value)

    def read_pcrs(self, pcrs: Sequence[int]) -> dict[int, bytes]:
        return {i: self._pcrs.get(i, ZERO) for i in pcrs}

    def _sign(self, attest: bytes) -> bytes:
        if isinstance(self._ak, ec.EllipticCurvePrivateKey):
            r, s = decode_dss_signature(self._ak.sign(attest, ec.ECDSA(hashes.SHA256())))
            return tpm_wire.marshal_signature(tpm_wire.ALG_ECDSA, tpm_wire.ALG_SHA256, (r, s))
        value = self._ak.sign(attest, padding.PKCS1v15(), hashes.SHA256())
        return tpm_wire.marshal_signature(tpm_wire.ALG_RSASSA, tpm_wire.ALG_SHA256, value)

    def _attest(self, kind: int, nonce: bytes, **fields: bytes) -> pb.SignedAttest:
        self.clock += 1
        attest = tpm_wire.marshal_attest(
            kind, signer=self._ak_name, extra_data=nonce, clock=self.clock, **fields
        )  # type: ignore[arg-type]
        return pb.SignedAttest(attest=attest, signature=self._sign(attest))

    def quote(self, nonce: bytes, pcrs: Sequence[int]) -> pb.SignedAttest:
        ordered = sorted(pcrs)
        values = self.read_pcrs(ordered)
        return self._attest(
            tpm_wire.ST_ATTEST_QUOTE,
            nonce,
            pcr_selection=tpm_wire.marshal_pcr_selection(tpm_wire.ALG_SHA256, ordered),
            pcr_digest=tpm_wire.pcr_digest([values[i] for i in ordered]),
        )

    def binding(self, nonce: bytes, platform_pcr: int) -> pb.Binding:
        state = self._pcrs.get(platform_pcr, ZERO)
        if self._binding is None or self._binding[2] != state:
            key = ec.generate_private_key(ec.SECP256R1())
            policy = tpm_wire.policy_pcr_digest([platform_pcr], [state])
            public = tpm_wire.marshal_public_ecc(
                key.public_key(), attributes=BINDING_ATTRIBUTES, scheme=tpm_wire.ALG_ECDH, auth_policy=policy
            )
            self._binding = (key, public, state)
        _, public, _ = self._binding
        certify = self._attest(
            tpm_wire.ST_ATTEST_CERTIFY, nonce, certified_name=tpm_wire.name_of(tpm_wire.ALG_SHA256, public)
        )
        return pb.Binding(public=tpm_wire.tpm2b(public), certify=certify)

    def shared_secret(self, wrapped: pb.WrappedKey, platform_pcr: int) -> bytes:
        if self._binding is None or wrapped.binding_public != tpm_wire.tpm2b(self._binding[1]):
            raise KeyReleaseError("attestation.key.unwrap_failed", "wrapped to another binding key")
        if self._pcrs.get(platform_pcr, ZERO) != self._binding[2]:
            raise KeyReleaseError("attestation.key.policy_failed", "platform PCR changed")
        peer = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), wrapped.ephemeral_public)
        return self._binding[0].exchange(ec.ECDH(), peer)
