"""The software attester: for development machines without a TPM.

The AK is an Ed25519 key in a file readable by its owner only (0600); PCRs are emulated in
memory (sha256 extend, all-zero at ``open``); quotes and certifications use the TPMS_ATTEST
layout of a real TPM, signed with Ed25519, so the verifier runs the same checks. The binding
key is an X25519 key, also in a 0600 file, remade whenever the platform PCR changes.

Nothing here resists an attacker on the node: anyone who can read the key files can forge
evidence. That is why every result for a software attester is tier ``software``, and a
deployment that needs more asks for ``tpm2``.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from cryptography.hazmat.primitives.asymmetric import ed25519, x25519
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
)
from pydantic import BaseModel, ConfigDict, Field

from edgeward.v1 import attestation_pb2 as pb

from .. import tpm_wire
from ..errors import AttestationError, KeyReleaseError
from ..eventlog import ZERO, extend
from ..results import read_private, write_private
from .base import Attester, enrollment_message


class SoftwareAttesterConfig(BaseModel):
    """Settings of the software attester."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["software"] = Field("software", description="Attester kind.")
    key_dir: Path = Field(Path("state/attestation"), description="Directory of the AK and binding key files.")


def software_name(public_raw: bytes) -> bytes:
    """A TPM-style name (sha256 alg id + digest) for a raw software public key."""
    return tpm_wire.ALG_SHA256.to_bytes(2, "big") + hashlib.sha256(public_raw).digest()


def _raw(key: ed25519.Ed25519PublicKey | x25519.X25519PublicKey) -> bytes:
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


class SoftwareAttester(Attester):
    kind = pb.ATTESTER_KIND_SOFTWARE
    name = "software"

    def __init__(self, config: SoftwareAttesterConfig) -> None:
        self.config = config
        self._ak: ed25519.Ed25519PrivateKey | None = None
        self._ak_public = b""
        self._pcrs: dict[int, bytes] = {}
        self._binding: x25519.X25519PrivateKey | None = None
        self._binding_state = b""  # platform PCR value the binding key was made for

    # ------------------------------------------------------------ lifecycle

    def open(self, pcrs: Sequence[int]) -> None:
        key_dir = self.config.key_dir
        key_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = key_dir / "ak.ed25519.pem"
        if path.exists():
            key = load_pem_private_key(read_private(path), password=None)
            if not isinstance(key, ed25519.Ed25519PrivateKey):
                raise AttestationError("attestation.ak.bad_key", f"{path} is not an Ed25519 key")
            self._ak = key
        else:
            self._ak = ed25519.Ed25519PrivateKey.generate()
            write_private(path, self._ak.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
        self._ak_public = _raw(self._ak.public_key())
        self._load_binding()
        self._pcrs = dict.fromkeys(pcrs, ZERO)

    def close(self) -> None:
        self._ak = None
        self._binding = None

    @property
    def ak_public(self) -> bytes:
        return self._ak_public

    def _signer(self) -> ed25519.Ed25519PrivateKey:
        if self._ak is None:
            raise AttestationError("attestation.attester.closed", "open() the attester first")
        return self._ak

    # ------------------------------------------------------------ enrollment

    def enrollment_request(self, node_id: str) -> pb.EnrollmentRequest:
        return pb.EnrollmentRequest(node_id=node_id, kind=self.kind, ak_public=self._ak_public)

    def answer_enrollment(self, challenge: pb.EnrollmentChallenge) -> bytes:
        return self._signer().sign(enrollment_message(challenge.node_id, challenge.nonce))

    # ------------------------------------------------------------ PCRs and quotes

    def extend(self, pcr: int, value: bytes) -> None:
        self._pcrs[pcr] = extend(self._pcrs.get(pcr, ZERO), value)

    def read_pcrs(self, pcrs: Sequence[int]) -> dict[int, bytes]:
        return {i: self._pcrs.get(i, ZERO) for i in pcrs}

    def _attest(self, kind: int, nonce: bytes, **fields: object) -> pb.SignedAttest:
        attest = tpm_wire.marshal_attest(
            kind,
            signer=software_name(self._ak_public),
            extra_data=nonce,
            clock=time.monotonic_ns() // 1_000_000,
            **fields,  # type: ignore[arg-type]
        )
        return pb.SignedAttest(attest=attest, signature=self._signer().sign(attest))

    def quote(self, nonce: bytes, pcrs: Sequence[int]) -> pb.SignedAttest:
        ordered = sorted(pcrs)
        values = self.read_pcrs(ordered)
        return self._attest(
            tpm_wire.ST_ATTEST_QUOTE,
            nonce,
            pcr_selection=tpm_wire.marshal_pcr_selection(tpm_wire.ALG_SHA256, ordered),
            pcr_digest=tpm_wire.pcr_digest([values[i] for i in ordered]),
        )

    # ------------------------------------------------------------ binding key

    def _binding_paths(self) -> tuple[Path, Path]:
        return self.config.key_dir / "binding.x25519.pem", self.config.key_dir / "binding.state"

    def _load_binding(self) -> None:
        key_path, state_path = self._binding_paths()
        if key_path.exists() and state_path.exists():
            key = load_pem_private_key(read_private(key_path), password=None)
            if isinstance(key, x25519.X25519PrivateKey):
                self._binding = key
                self._binding_state = bytes.fromhex(state_path.read_text().strip())

    def binding(self, nonce: bytes, platform_pcr: int) -> pb.Binding:
        state = self._pcrs.get(platform_pcr, ZERO)
        if self._binding is None or self._binding_state != state:
            self._binding = x25519.X25519PrivateKey.generate()
            self._binding_state = state
            key_path, state_path = self._binding_paths()
            write_private(
                key_path, self._binding.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
            )
            write_private(state_path, state.hex().encode())
        public = _raw(self._binding.public_key())
        certify = self._attest(tpm_wire.ST_ATTEST_CERTIFY, nonce, certified_name=software_name(public))
        return pb.Binding(public=public, certify=certify)

    def shared_secret(self, wrapped: pb.WrappedKey, platform_pcr: int) -> bytes:
        if self._binding is None or wrapped.binding_public != _raw(self._binding.public_key()):
            raise KeyReleaseError("attestation.key.unwrap_failed", "wrapped to another binding key")
        if self._pcrs.get(platform_pcr, ZERO) != self._binding_state:
            raise KeyReleaseError(
                "attestation.key.policy_failed", f"PCR {platform_pcr} changed since the binding key was made"
            )
        try:
            peer = x25519.X25519PublicKey.from_public_bytes(wrapped.ephemeral_public)
            return self._binding.exchange(peer)
        except ValueError as err:
            raise KeyReleaseError("attestation.key.malformed", str(err)) from err
