"""Attestation results: status from reasons, and the verifier's Ed25519 signature over them.

A relying party (the dispatcher, an operator's tool, another orchestrator) checks a
``SignedAttestationResult`` with :func:`open_signed_result` and the verifier's public key, then
reads status, tier, reasons and expiry from the decoded ``AttestationResult``.
"""

from __future__ import annotations

import hashlib
import stat
from collections.abc import Iterable
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
)

from edgeward.security.files import locked, write_private
from edgeward.v1 import attestation_pb2 as pb

from .errors import AttestationError

RESULT_SCHEMA = 1
AFFIRMING = pb.ATTESTATION_STATUS_AFFIRMING
WARNING = pb.ATTESTATION_STATUS_WARNING
CONTRAINDICATED = pb.ATTESTATION_STATUS_CONTRAINDICATED
TIER_OF_KIND = {pb.ATTESTER_KIND_SOFTWARE: "software", pb.ATTESTER_KIND_TPM2: "tpm2"}


def status_of(reasons: Iterable[pb.Reason]) -> pb.AttestationStatus:
    status = AFFIRMING
    for r in reasons:
        if r.severity == pb.REASON_SEVERITY_CONTRAINDICATED:
            return CONTRAINDICATED
        status = WARNING
    return status


def key_id(public: Ed25519PublicKey) -> str:
    return hashlib.sha256(public.public_bytes(Encoding.Raw, PublicFormat.Raw)).hexdigest()[:32]


class ResultSigner:
    """Signs attestation results with the verifier's Ed25519 key."""

    def __init__(self, key: Ed25519PrivateKey | None = None) -> None:
        self._key = key or Ed25519PrivateKey.generate()
        self.public_key = self._key.public_key()
        self.key_id = key_id(self.public_key)

    def sign(self, result: pb.AttestationResult) -> pb.SignedAttestationResult:
        return self.sign_serialized(result.SerializeToString(deterministic=True))

    def sign_serialized(self, data: bytes) -> pb.SignedAttestationResult:
        """Sign a result serialised with ``deterministic=True``."""
        return pb.SignedAttestationResult(
            result=data, signature=self._key.sign(data), verifier_key_id=self.key_id
        )

    @classmethod
    def from_file(cls, path: Path) -> ResultSigner:
        """Load the key from a PEM file, creating it (mode 0600) if it does not exist."""
        path = Path(path)
        if not path.exists():
            # Replicas sharing the directory may start together: one creates the key, all load it.
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            with locked(path.parent / f".{path.name}.lock"):
                if not path.exists():
                    key = Ed25519PrivateKey.generate()
                    write_private(path, key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
                    return cls(key)
        loaded = load_pem_private_key(read_private(path), password=None)
        if not isinstance(loaded, Ed25519PrivateKey):
            raise AttestationError("attestation.verifier.bad_key", f"{path} is not an Ed25519 key")
        return cls(loaded)


def open_signed_result(signed: pb.SignedAttestationResult, public: Ed25519PublicKey) -> pb.AttestationResult:
    """The result inside ``signed`` if the verifier's signature holds."""
    try:
        public.verify(signed.signature, signed.result)
    except InvalidSignature as err:
        raise AttestationError("attestation.result.bad_signature", "not signed by this verifier") from err
    result = pb.AttestationResult()
    result.ParseFromString(signed.result)
    return result


def read_private(path: Path) -> bytes:
    """Read a secret file, refusing one that group or others can read or write."""
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise AttestationError(
            "attestation.key.file_permissions", f"{path} must be mode 0600, is {mode & 0o777:o}"
        )
    return path.read_bytes()
