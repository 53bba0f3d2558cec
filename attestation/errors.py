"""The attestation package's exception tree.

Every error carries ``reason``, a stable ``component.sub.event`` id that the orchestrator reports
and tests assert exactly, and ``detail``, free text for people. Third-party exceptions (protobuf,
cryptography, tpm2-pytss) are converted where they enter this package, with ``raise ... from``.

    AttestationError
    ├── EvidenceRejected          evidence refused before it could produce a result
    │   ├── EvidenceMalformed     does not parse, wrong schema, caps exceeded, wrong node
    │   ├── UnknownAttestationKey the node is not enrolled, or the AK differs from the enrolled one
    │   ├── BadSignature          the quote is not signed by the enrolled AK
    │   └── StaleNonce            nonce unknown, reused, expired or issued to another node
    ├── ChallengeMalformed        (node side) a challenge the responder cannot answer
    ├── EnrollmentError           an enrollment request or answer was refused
    ├── ReferenceValuesError      reference values / policy file invalid
    ├── KeyReleaseError           a model key cannot be released, wrapped or unwrapped
    ├── TpmError                  the TPM refused or failed a command
    └── IllegalTransition         a lifecycle moved along an edge its table does not have (a bug)
"""

from __future__ import annotations


class AttestationError(Exception):
    """Base of every error the attestation package raises on purpose."""

    reason: str = "attestation.error"

    def __init__(self, reason: str | None = None, detail: str = "") -> None:
        if reason is not None:
            self.reason = reason
        self.detail = detail
        super().__init__(f"{self.reason}: {detail}" if detail else self.reason)


class EvidenceRejected(AttestationError):
    """Evidence refused before its freshness was established: it changes no stored result.

    Unauthenticated input must not be able to quarantine a node; a node whose evidence keeps
    being rejected loses its result when it expires.
    """

    reason = "attestation.evidence.rejected"


class EvidenceMalformed(EvidenceRejected):
    reason = "attestation.evidence.malformed"


class UnknownAttestationKey(EvidenceRejected):
    reason = "attestation.ak.unknown"


class BadSignature(EvidenceRejected):
    reason = "attestation.quote.bad_signature"


class StaleNonce(EvidenceRejected):
    reason = "attestation.nonce.unknown"


class ChallengeMalformed(AttestationError):
    reason = "attestation.challenge.malformed"


class EnrollmentError(AttestationError):
    reason = "attestation.enroll.refused"


class ReferenceValuesError(AttestationError):
    reason = "reference.file.invalid"


class KeyReleaseError(AttestationError):
    reason = "attestation.key.refused"


class TpmError(AttestationError):
    """A TPM command failed; ``rc`` is the TSS2 response code when there is one."""

    reason = "attestation.tpm.failed"

    def __init__(self, reason: str | None = None, detail: str = "", rc: int | None = None) -> None:
        super().__init__(reason, detail)
        self.rc = rc


class IllegalTransition(AttestationError):
    reason = "attestation.lifecycle.illegal_transition"
