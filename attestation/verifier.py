"""Appraisal of attestation evidence, in a fixed order that stops at the first unrecoverable failure.

1. The AK is the one enrolled for this node (and, for a TPM, bound to its EK at enrollment).
2. The quote's signature verifies with that AK.
3. The nonce is one this verifier issued to this node, not yet used and not expired.
   Failing any of 1-3 raises :class:`EvidenceRejected`: nothing proves the evidence came from the
   node just now, so it must not change what the verifier believes about the node.
4. The quoted PCR selection is the challenged one, and the digest of the reported PCR values is
   the quote's PCR digest.
5. Every event is well-formed, and replaying the event log from all-zero PCRs reproduces
   those values.
6. Every event matches the reference values (all reasons are collected, with their severity).
7. The binding key, if any, is certified by the AK over the same nonce and is bound to the
   quoted platform PCR value (key release needs it).
Failing 4-5 yields a contraindicated result with that single reason; 6-7 add reasons.

This module is pure (no clock, no state): :class:`attestation.service.AttestationVerifierService`
owns nonces, enrollments and results and calls :meth:`Appraiser.appraise`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from google.protobuf.message import DecodeError

from edgeward.v1 import attestation_pb2 as pb

from . import tpm_wire
from .attesters.software import software_name
from .errors import BadSignature, EvidenceMalformed, EvidenceRejected, UnknownAttestationKey
from .eventlog import EVENT_DOMAIN, ZERO, MeasurementEvent, PcrLayout
from .keyrelease import x25519_binding_problem
from .reference import CheckContext, ReferenceValues, reason
from .results import RESULT_SCHEMA, TIER_OF_KIND, ResultSigner, status_of

MESSAGE_SCHEMA = 1
PCR_BANK = "sha256"
_BINDING_REQUIRED = (
    tpm_wire.DECRYPT | tpm_wire.FIXED_TPM | tpm_wire.FIXED_PARENT | tpm_wire.SENSITIVE_DATA_ORIGIN
)
_BINDING_FORBIDDEN = (
    tpm_wire.USER_WITH_AUTH | tpm_wire.ADMIN_WITH_POLICY | tpm_wire.RESTRICTED | tpm_wire.SIGN
)


@dataclass(frozen=True)
class EvidenceLimits:
    """Caps on what a node may send; anything larger is refused before it is looked at."""

    max_bytes: int = 128 * 1024
    max_events: int = 1024
    max_blob: int = 2048  # one quote, signature or public key
    max_component: int = 128
    max_description: int = 256


def parse_attester_message(payload: bytes, limits: EvidenceLimits) -> pb.AttesterMessage:
    if len(payload) > limits.max_bytes:
        raise EvidenceMalformed(
            "attestation.evidence.too_large", f"{len(payload)} bytes > {limits.max_bytes}"
        )
    message = pb.AttesterMessage()
    try:
        message.ParseFromString(payload)
    except (DecodeError, RuntimeError, ValueError) as err:
        raise EvidenceMalformed(detail=str(err)[:200]) from err
    if message.schema != MESSAGE_SCHEMA:
        raise EvidenceMalformed("attestation.evidence.unknown_schema", f"schema {message.schema}")
    if message.WhichOneof("body") is None:
        raise EvidenceMalformed(detail="empty message")
    return message


def check_evidence_shape(evidence: pb.AttestationEvidence, limits: EvidenceLimits) -> None:
    """Structural caps, so later steps never meet absurd sizes."""
    if len(evidence.events) > limits.max_events:
        raise EvidenceMalformed("attestation.evidence.too_large", f"{len(evidence.events)} events")
    for blob in (
        evidence.ak_public,
        evidence.quote.attest,
        evidence.quote.signature,
        evidence.binding.public,
        evidence.binding.certify.attest,
        evidence.binding.certify.signature,
    ):
        if len(blob) > limits.max_blob:
            raise EvidenceMalformed("attestation.evidence.too_large", f"a field of {len(blob)} bytes")
    if not evidence.quote.attest or not evidence.quote.signature:
        raise EvidenceMalformed(detail="no quote")
    if len(evidence.pcrs) > 24:
        raise EvidenceMalformed(detail=f"{len(evidence.pcrs)} PCR values")


# ------------------------------------------------------------------------------ known attesters


@dataclass
class KnownAttester:
    """An enrolled node's AK, parsed once and cached: key parsing is the slow part of a verify."""

    enrollment: pb.Enrollment
    ak: tpm_wire.PublicArea | Ed25519PublicKey
    ak_public: bytes
    tier: str
    revoked: bool = False
    certified_binding: bytes = b""  # binding public whose AK certification was already checked

    @classmethod
    def from_enrollment(cls, enrollment: pb.Enrollment) -> KnownAttester:
        if enrollment.kind == pb.ATTESTER_KIND_SOFTWARE:
            try:
                ak: tpm_wire.PublicArea | Ed25519PublicKey = Ed25519PublicKey.from_public_bytes(
                    enrollment.ak_public
                )
            except ValueError as err:
                raise EvidenceMalformed("attestation.ak.malformed", str(err)) from err
        elif enrollment.kind == pb.ATTESTER_KIND_TPM2:
            ak = tpm_wire.parse_public(enrollment.ak_public)
            _ = ak.key  # parse the key now, not on the first verification
        else:
            raise EvidenceMalformed("attestation.ak.malformed", f"attester kind {enrollment.kind}")
        return cls(enrollment, ak, enrollment.ak_public, TIER_OF_KIND[enrollment.kind])

    def check_signed(self, signed: pb.SignedAttest) -> tpm_wire.Attest:
        """The parsed TPMS_ATTEST if its signature verifies with the AK."""
        attest = tpm_wire.parse_attest(signed.attest)
        if isinstance(self.ak, Ed25519PublicKey):
            # libsodium, not OpenSSL: the same check (RFC 8032 with a canonical S; libsodium also
            # refuses small-order keys), about twice as fast here (70 against 130 us), and this is
            # every renewal of every software-tier node (10,000 nodes at 30 s: 333 a second).
            # Imported here, not with the module: agents import this module too (the message
            # schema), and every module an agent loads must belong to its measured dependencies.
            import nacl.bindings
            import nacl.exceptions

            if len(signed.signature) != nacl.bindings.crypto_sign_BYTES:
                raise BadSignature(detail=f"Ed25519 signature of {len(signed.signature)} bytes, not 64")
            try:
                nacl.bindings.crypto_sign_open(signed.signature + signed.attest, self.ak_public)
            except nacl.exceptions.BadSignatureError as err:
                raise BadSignature(detail="Ed25519 signature does not verify with the enrolled AK") from err
            return attest
        signature = tpm_wire.parse_signature(signed.signature)
        if not self.ak.verify(signature, signed.attest):
            raise BadSignature(detail="TPM signature does not verify with the enrolled AK")
        return attest


@dataclass(frozen=True)
class IssuedChallenge:
    node_id: str
    pcrs: tuple[int, ...]
    expires_ms: int


#: (nonce, node id) -> the challenge it answers; consumes the nonce; raises StaleNonce.
TakeNonce = Callable[[bytes, str], IssuedChallenge]


class Appraisal:
    """A result, and the verifier's signature over it made when it is first read.

    A fleet renews every node's result each challenge interval (10,000 nodes at 30 s: 333 a
    second), and most are superseded before anyone asks for them signed. The result is serialised
    now, so the signature covers it as it is now; Ed25519 signatures are deterministic, so signing
    later gives the bytes that signing at once would have."""

    __slots__ = ("_serialized", "_signed", "_signer", "result")

    def __init__(self, result: pb.AttestationResult, signer: ResultSigner) -> None:
        self.result = result
        self._serialized = result.SerializeToString(deterministic=True)
        self._signer = signer
        self._signed: pb.SignedAttestationResult | None = None

    @property
    def signed(self) -> pb.SignedAttestationResult:
        # Two threads reading it at once both sign: the same bytes, so either may stay.
        if self._signed is None:
            self._signed = self._signer.sign_serialized(self._serialized)
        return self._signed


# ------------------------------------------------------------------------------ appraiser


@dataclass
class Appraiser:
    reference: ReferenceValues
    signer: ResultSigner
    layout: PcrLayout = field(default_factory=PcrLayout)
    result_ttl_ms: int = 90_000
    limits: EvidenceLimits = field(default_factory=EvidenceLimits)

    def appraise(
        self,
        node_id: str,
        evidence: pb.AttestationEvidence,
        known: KnownAttester | None,
        take_nonce: TakeNonce,
        now_ms: int,
        evidence_sha256: bytes,
    ) -> Appraisal:
        # 1. AK known, bound to this node
        if known is None:
            raise UnknownAttestationKey(detail=f"node {node_id!r} is not enrolled")
        if known.revoked:
            raise UnknownAttestationKey("attestation.ak.revoked", f"node {node_id!r} was revoked")
        if evidence.kind != known.enrollment.kind or evidence.ak_public != known.ak_public:
            raise UnknownAttestationKey("attestation.ak.mismatch", "evidence names another AK than enrolled")
        # 2. signature
        quote = known.check_signed(evidence.quote)
        if quote.type != tpm_wire.ST_ATTEST_QUOTE:
            raise tpm_wire.TpmStructureError(detail="the signed structure is not a quote")
        # 3. nonce: single use, unexpired, issued to this node
        issued = take_nonce(quote.extra_data, node_id)
        # From here the evidence is fresh and authentic: failures become results.
        reasons = self._check(evidence, known, quote, issued)
        binding = b""
        if evidence.HasField("binding") and not any(
            r.severity == pb.REASON_SEVERITY_CONTRAINDICATED for r in reasons
        ):
            why = self._check_binding(evidence, known, quote.extra_data)
            if why is None:
                binding = evidence.binding.public
            else:
                reasons.append(reason("attestation.binding.invalid", "binding", why))
        return self.sign(node_id, known, reasons, now_ms, evidence_sha256, binding)

    def sign(
        self,
        node_id: str,
        known: KnownAttester,
        reasons: list[pb.Reason],
        now_ms: int,
        evidence_sha256: bytes = b"",
        binding: bytes = b"",
    ) -> Appraisal:
        status = status_of(reasons)
        result = pb.AttestationResult(
            schema=RESULT_SCHEMA,
            node_id=node_id,
            status=status,
            tier=known.tier,
            reasons=reasons,
            issued_unix_ms=now_ms,
            expires_unix_ms=now_ms + self.result_ttl_ms,
            reference_version=self.reference.version,
            evidence_sha256=evidence_sha256,
            binding_public=binding if status != pb.ATTESTATION_STATUS_CONTRAINDICATED else b"",
        )
        return Appraisal(result, self.signer)

    def _check(
        self,
        evidence: pb.AttestationEvidence,
        known: KnownAttester,
        quote: tpm_wire.Attest,
        issued: IssuedChallenge,
    ) -> list[pb.Reason]:
        # 4. PCR selection and digest
        if quote.pcr_select != ((tpm_wire.ALG_SHA256, issued.pcrs),):
            return [
                reason(
                    "attestation.pcr.selection_mismatch",
                    "quote",
                    f"quoted {quote.pcr_select}, challenged sha256 {list(issued.pcrs)}",
                )
            ]
        indices = tuple(v.index for v in evidence.pcrs)
        if (
            evidence.pcr_bank != PCR_BANK
            or indices != issued.pcrs
            or any(len(v.digest) != 32 for v in evidence.pcrs)
        ):
            return [
                reason(
                    "attestation.pcr.selection_mismatch",
                    "evidence",
                    f"reported PCRs {list(indices)} do not match the quoted {list(issued.pcrs)}",
                )
            ]
        values = [v.digest for v in evidence.pcrs]
        if tpm_wire.pcr_digest(values) != quote.pcr_digest:
            return [
                reason(
                    "attestation.pcr.digest_mismatch",
                    "quote",
                    "the reported PCR values are not the ones the TPM quoted",
                )
            ]
        # 5. event log replay (also checks the shape of each event, touching its fields once)
        replayed = dict.fromkeys(issued.pcrs, ZERO)
        sha256 = hashlib.sha256
        events = []
        limits = self.limits
        for e in evidence.events:
            event = MeasurementEvent(e.pcr, e.component, e.digest, e.description)
            pcr, component, digest, description = event
            if (
                len(digest) != 32
                or not component
                or len(component) > limits.max_component
                or len(description) > limits.max_description
            ):
                return [reason("attestation.log.malformed", component[:64], "event fields out of bounds")]
            current = replayed.get(pcr)
            if current is None:
                return [
                    reason(
                        "attestation.log.unquoted_pcr",
                        component,
                        f"event {component} extends PCR {pcr}, which was not quoted",
                    )
                ]
            replayed[pcr] = sha256(
                current
                + sha256(EVENT_DOMAIN + component.encode() + b"\x00" + digest + description.encode()).digest()
            ).digest()
            events.append(event)
        pcrs = dict(zip(issued.pcrs, values, strict=True))
        for index, value in pcrs.items():
            if replayed[index] != value:
                return [
                    reason(
                        "attestation.log.replay_mismatch",
                        f"pcr{index}",
                        f"replaying the event log does not reproduce PCR {index}",
                    )
                ]
        # 6. reference values and policy
        compiled = self.reference.compiled
        reasons = compiled.check.why_not(CheckContext(events, pcrs, compiled))
        if known.tier == "tpm2" and not known.enrollment.ek_certified:
            reasons.append(
                reason(
                    "attestation.ek.uncertified",
                    "ek",
                    "the endorsement key has no certificate from a trusted CA",
                    pb.REASON_SEVERITY_WARNING,
                )
            )
        return reasons

    def _check_binding(
        self, evidence: pb.AttestationEvidence, known: KnownAttester, nonce: bytes
    ) -> str | None:
        """Why the binding key cannot be used for key release, or None when it can."""
        binding = evidence.binding
        # That the AK certified this key is a fact about the key, checked once per key; the
        # policy below is checked against every quote.
        fresh = binding.public != known.certified_binding
        certify = None
        if fresh:
            try:
                certify = known.check_signed(binding.certify)
            except EvidenceRejected as err:
                return f"certification: {err}"
            if certify.type != tpm_wire.ST_ATTEST_CERTIFY or certify.extra_data != nonce:
                return "certification is not over this challenge"
        if known.enrollment.kind == pb.ATTESTER_KIND_SOFTWARE:
            if certify is not None:
                if len(binding.public) != 32 or certify.certified_name != software_name(binding.public):
                    return "certified name does not match the X25519 key"
                problem = x25519_binding_problem(binding.public)
                if problem is not None:  # certified by the node's own key: a node can certify anything
                    return problem
                known.certified_binding = binding.public
            return None
        try:
            public = tpm_wire.parse_public(binding.public)
        except EvidenceRejected as err:
            return f"binding key: {err}"
        if certify is not None and certify.certified_name != public.name:
            return "certified name does not match the binding key"
        if public.type != tpm_wire.ALG_ECC or public.curve != tpm_wire.ECC_NIST_P256:
            return "binding key is not ECC P-256"
        if (
            public.attributes & _BINDING_REQUIRED != _BINDING_REQUIRED
            or public.attributes & _BINDING_FORBIDDEN
        ):
            return f"binding key attributes {public.attributes:#x} allow use outside the PCR policy"
        platform = self.layout.platform
        value = next((v.digest for v in evidence.pcrs if v.index == platform), None)
        if value is None:
            return f"platform PCR {platform} was not quoted"
        if public.auth_policy != tpm_wire.policy_pcr_digest([platform], [value]):
            return f"binding key policy is not PolicyPCR(PCR {platform} = quoted value)"
        known.certified_binding = binding.public
        return None
