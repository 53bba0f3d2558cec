"""The contract every attester implements (the node side of the RATS attester role).

An attester owns the node's attestation key (AK), its PCRs (real or emulated), and its binding
key (the key model keys are wrapped to). It is synchronous and blocking: the agent calls it
through its executor helper, and :class:`attestation.responder.AttestationResponder`, which
holds the measurement log, serialises the calls.

Lifecycle: construct from config (no IO) -> ``open()`` (touches files and the TPM) -> calls ->
``close()``. ``open()`` leaves the PCRs of the layout at all-zero, so the responder's log and the
PCRs start together.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import ClassVar

from edgeward.v1 import attestation_pb2 as pb

ENROLL_DOMAIN = b"edgeward/v1 enroll\x00"
BINDING_DOMAIN = b"edgeward/v1 binding\x00"


def enrollment_message(node_id: str, nonce: bytes) -> bytes:
    """What a software AK signs to prove possession during enrollment."""
    return ENROLL_DOMAIN + node_id.encode() + b"\x00" + nonce


class Attester(abc.ABC):
    kind: ClassVar[pb.AttesterKind]
    name: ClassVar[str]  # registry name: "software", "tpm2"

    @abc.abstractmethod
    def open(self, pcrs: Sequence[int]) -> None:
        """Load or create the keys and bring ``pcrs`` to all-zero."""

    @abc.abstractmethod
    def close(self) -> None: ...

    @property
    @abc.abstractmethod
    def ak_public(self) -> bytes:
        """The AK public part as it travels in evidence (TPM2B_PUBLIC or raw Ed25519)."""

    @abc.abstractmethod
    def enrollment_request(self, node_id: str) -> pb.EnrollmentRequest: ...

    @abc.abstractmethod
    def answer_enrollment(self, challenge: pb.EnrollmentChallenge) -> bytes:
        """The proof that the AK is ours (and, with a TPM, lives beside the EK)."""

    @abc.abstractmethod
    def extend(self, pcr: int, value: bytes) -> None:
        """Extend the sha256 bank of ``pcr`` with the 32-byte ``value``."""

    @abc.abstractmethod
    def read_pcrs(self, pcrs: Sequence[int]) -> dict[int, bytes]: ...

    @abc.abstractmethod
    def quote(self, nonce: bytes, pcrs: Sequence[int]) -> pb.SignedAttest:
        """A TPMS_ATTEST quote over the sha256 bank of ``pcrs`` with ``nonce`` as extraData."""

    @abc.abstractmethod
    def binding(self, nonce: bytes, platform_pcr: int) -> pb.Binding:
        """The binding key for the current value of ``platform_pcr`` (rotated when that value
        changed since it was made), certified by the AK over ``nonce``."""

    @abc.abstractmethod
    def shared_secret(self, wrapped: pb.WrappedKey, platform_pcr: int) -> bytes:
        """ECDH of the binding key with ``wrapped.ephemeral_public``; refused when the platform
        PCR no longer holds the value the binding key was made for."""

    def __enter__(self) -> Attester:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
