"""Enrollment: how the verifier comes to trust a node's attestation key (AK).

tpm2: the node sends its AK public area, its EK public area and the EK certificate. The verifier

1. checks the AK is a restricted signing key that cannot leave its TPM (fixedTPM, fixedParent,
   sensitiveDataOrigin), and the EK is an RSA restricted decryption key;
2. validates the EK certificate chain up to a CA in its trust bundle, and that the certificate
   is for this EK (without a certificate the node enrolls only if the policy allows it, and its
   results then carry the warning ``attestation.ek.uncertified``);
3. sends MakeCredential(EK, AK name, secret): only the TPM holding the EK can recover the secret,
   and its ActivateCredential does so only for the AK loaded on the same TPM. The node's answer
   is the secret.

software: the node sends its raw Ed25519 AK and signs a fresh nonce with it (proof of possession;
nothing ties the key to hardware, hence the ``software`` tier).

The first enrollment of a node id wins; a different AK for that id is refused until the operator
forgets the node. Before that first enrollment the operator must have approved the node
(:class:`EnrollmentApproval`, the orchestrator's ``attestation.enrollment`` policy):

* ``token``: the request carries a one-time token minted for this node id (:mod:`.tokens`);
* ``ek``: the node is a TPM whose EK certificate chains to a trusted CA (software nodes never enroll);
* ``token-or-ek`` (the orchestrator's default): either of the two.

A token is checked when the request arrives and redeemed only once the node has proven its AK, so
a failed proof does not burn it. Re-enrolling the AK a node id is already enrolled with needs no
approval (nothing new is trusted).
"""

from __future__ import annotations

import enum
import hmac
import os
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding

from edgeward.v1 import attestation_pb2 as pb

from . import tpm_wire
from .attesters.base import enrollment_message
from .errors import EnrollmentError, EvidenceRejected
from .tokens import TokenClaim, TokenStore

_AK_REQUIRED = (
    tpm_wire.RESTRICTED
    | tpm_wire.SIGN
    | tpm_wire.FIXED_TPM
    | tpm_wire.FIXED_PARENT
    | tpm_wire.SENSITIVE_DATA_ORIGIN
)
_EK_REQUIRED = tpm_wire.RESTRICTED | tpm_wire.DECRYPT | tpm_wire.FIXED_TPM | tpm_wire.FIXED_PARENT
_MAX_CHAIN = 4


def load_ca_bundle(path: Path) -> list[x509.Certificate]:
    """Trusted EK roots and intermediates from a PEM bundle (a separate, explicit step)."""
    try:
        return x509.load_pem_x509_certificates(Path(path).read_bytes())
    except (OSError, ValueError) as err:
        raise EnrollmentError("attestation.ek.bad_ca_bundle", f"{path}: {err}") from err


def _same_key(cert_key: object, ek: tpm_wire.PublicArea) -> bool:
    key = ek.key
    if isinstance(cert_key, rsa.RSAPublicKey) and isinstance(key, rsa.RSAPublicKey):
        return cert_key.public_numbers() == key.public_numbers()
    if isinstance(cert_key, ec.EllipticCurvePublicKey) and isinstance(key, ec.EllipticCurvePublicKey):
        return cert_key.public_numbers() == key.public_numbers()
    return False


def validate_ek_certificate(
    ek: tpm_wire.PublicArea,
    chain: Iterable[bytes],
    trusted: list[x509.Certificate],
    now: datetime | None = None,
) -> None:
    """Check that the DER ``chain`` (leaf first) certifies ``ek`` and ends at a ``trusted`` CA.

    EK certificates carry TPM-specific critical extensions (a subjectAltName with the TPM
    manufacturer and an empty subject) that web PKI validators reject, so the chain is walked
    here: issuer/subject and signature of each link, validity periods, CA flags of issuers.
    """
    now = now or datetime.now(UTC)
    try:
        certs = [x509.load_der_x509_certificate(der) for der in chain]
    except ValueError as err:
        raise EnrollmentError("attestation.ek.bad_certificate", str(err)) from err
    if not certs:
        raise EnrollmentError("attestation.ek.no_certificate", "the node sent no EK certificate")
    leaf = certs[0]
    if not _same_key(leaf.public_key(), ek):
        raise EnrollmentError("attestation.ek.bad_certificate", "the certificate is for another key")
    pool = certs[1:] + list(trusted)
    trusted_der = {c.public_bytes(encoding=Encoding.DER) for c in trusted}
    current = leaf
    for _ in range(_MAX_CHAIN + 1):
        if not current.not_valid_before_utc <= now <= current.not_valid_after_utc:
            raise EnrollmentError(
                "attestation.ek.untrusted", f"{current.subject.rfc4514_string()} is not valid now"
            )
        if current is not leaf and current.public_bytes(encoding=Encoding.DER) in trusted_der:
            return
        issuer = _issuer_of(current, pool)
        if issuer is None:
            raise EnrollmentError(
                "attestation.ek.untrusted",
                f"no trusted issuer for {current.subject.rfc4514_string() or 'the EK certificate'}",
            )
        try:
            constraints = issuer.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            constraints = None
        if constraints is None or not constraints.ca:
            raise EnrollmentError(
                "attestation.ek.untrusted", f"{issuer.subject.rfc4514_string()} is not a CA"
            )
        current = issuer
    raise EnrollmentError("attestation.ek.untrusted", "certificate chain too long")


def _issuer_of(cert: x509.Certificate, pool: list[x509.Certificate]) -> x509.Certificate | None:
    for candidate in pool:
        try:
            cert.verify_directly_issued_by(candidate)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return candidate
    return None


class EnrollmentPolicy(enum.StrEnum):
    """What approves the first enrollment of a node id."""

    TOKEN = "token"  # noqa: S105 (a policy name, not a secret)
    EK = "ek"
    TOKEN_OR_EK = "token-or-ek"  # noqa: S105


@dataclass(frozen=True)
class EnrollmentApproval:
    """The operator's approval of new nodes: a policy and the one-time tokens (file IO on check)."""

    policy: EnrollmentPolicy
    tokens: TokenStore

    def approve(self, request: pb.EnrollmentRequest, ek_certified: bool) -> TokenClaim | None:
        """The token to redeem once the AK is proven (None: the EK certificate approves the node)."""
        if ek_certified and self.policy in (EnrollmentPolicy.EK, EnrollmentPolicy.TOKEN_OR_EK):
            return None
        if self.policy == EnrollmentPolicy.EK:
            raise EnrollmentError(
                "enrollment.ek.required",
                "policy 'ek' admits only TPM nodes with an EK certificate from a trusted CA",
            )
        if not request.enrollment_token:
            alternative = (
                " and no EK certificate from a trusted CA"
                if self.policy == EnrollmentPolicy.TOKEN_OR_EK
                else ""
            )
            raise EnrollmentError(
                "enrollment.token.missing",
                f"node {request.node_id!r} presented no enrollment token{alternative} (policy '{self.policy}'); "
                f"the operator approves it with 'edgeward pki token {request.node_id}'",
            )
        return self.tokens.check(request.node_id, request.enrollment_token)


@dataclass
class PendingEnrollment:
    request: pb.EnrollmentRequest
    expected_proof: bytes  # tpm2: the credential secret
    nonce: bytes  # software: what the AK must sign
    expires_ms: int
    ek_certified: bool
    token: TokenClaim | None = None  # redeemed when the proof succeeds


def begin(
    request: pb.EnrollmentRequest,
    *,
    trusted: list[x509.Certificate],
    require_ek_certificate: bool,
    now_ms: int,
    ttl_ms: int,
    approval: EnrollmentApproval | None = None,
) -> tuple[PendingEnrollment, pb.EnrollmentChallenge]:
    """Check an enrollment request and make the challenge that proves the AK's origin.

    ``approval``: who may enroll (None: the caller approved the node already, e.g. a re-enrollment
    of its known AK, or a verifier used as a library without an approval step).
    """
    expires = now_ms + ttl_ms
    if request.kind == pb.ATTESTER_KIND_SOFTWARE:
        try:
            Ed25519PublicKey.from_public_bytes(request.ak_public)
        except ValueError as err:
            raise EnrollmentError("attestation.ak.malformed", str(err)) from err
        claim = approval.approve(request, ek_certified=False) if approval is not None else None
        nonce = os.urandom(32)
        pending = PendingEnrollment(request, b"", nonce, expires, ek_certified=False, token=claim)
        return pending, pb.EnrollmentChallenge(node_id=request.node_id, nonce=nonce, expires_unix_ms=expires)
    if request.kind != pb.ATTESTER_KIND_TPM2:
        raise EnrollmentError("attestation.enroll.unknown_kind", f"attester kind {request.kind}")
    try:
        ak = tpm_wire.parse_public(request.ak_public)
        ek = tpm_wire.parse_public(request.ek_public)
    except EvidenceRejected as err:
        raise EnrollmentError("attestation.ak.malformed", err.detail) from err
    if ak.attributes & _AK_REQUIRED != _AK_REQUIRED or ak.attributes & tpm_wire.DECRYPT:
        raise EnrollmentError(
            "attestation.ak.bad_attributes",
            f"AK attributes {ak.attributes:#x}: not a restricted, TPM-bound signing key",
        )
    if ek.attributes & _EK_REQUIRED != _EK_REQUIRED:
        raise EnrollmentError("attestation.ek.bad_attributes", f"EK attributes {ek.attributes:#x}")
    certified = False
    if request.ek_certificates:
        validate_ek_certificate(ek, request.ek_certificates, trusted)
        certified = True
    elif require_ek_certificate:
        raise EnrollmentError("attestation.ek.no_certificate", "the node sent no EK certificate")
    claim = approval.approve(request, ek_certified=certified) if approval is not None else None
    secret = os.urandom(32)
    try:
        blob, encrypted = tpm_wire.make_credential(ek, secret, ak.name)
    except EvidenceRejected as err:
        raise EnrollmentError(err.reason, err.detail) from err
    pending = PendingEnrollment(request, secret, b"", expires, ek_certified=certified, token=claim)
    return pending, pb.EnrollmentChallenge(
        node_id=request.node_id, credential_blob=blob, encrypted_secret=encrypted, expires_unix_ms=expires
    )


def finish(pending: PendingEnrollment, answer: pb.EnrollmentAnswer, now_ms: int) -> pb.Enrollment:
    """The enrollment record, if ``answer`` proves the AK; redeems the request's token (file IO)."""
    request = pending.request
    if now_ms > pending.expires_ms:
        raise EnrollmentError("attestation.enroll.expired", "the enrollment challenge expired")
    if request.kind == pb.ATTESTER_KIND_SOFTWARE:
        try:
            Ed25519PublicKey.from_public_bytes(request.ak_public).verify(
                answer.proof, enrollment_message(request.node_id, pending.nonce)
            )
        except InvalidSignature as err:
            raise EnrollmentError("attestation.enroll.bad_proof", "the AK did not sign the nonce") from err
    elif not hmac.compare_digest(answer.proof, pending.expected_proof):
        raise EnrollmentError("attestation.enroll.bad_proof", "the TPM did not activate the credential")
    if pending.token is not None:
        pending.token.redeem()  # raises enrollment.token.used when another enrollment spent it first
    return pb.Enrollment(
        node_id=request.node_id,
        kind=request.kind,
        ak_public=request.ak_public,
        ek_public=request.ek_public,
        ek_certified=pending.ek_certified,
        enrolled_unix_ms=now_ms,
    )
