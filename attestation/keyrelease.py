"""Hardware-locked models: artifact encryption and data keys wrapped to a node's binding key.

* Each model version has its own random 256-bit data key; the artifact is stored and shipped as
  ``seal(data_key, artifact, aad)`` (AES-256-GCM, 12-byte nonce prefixed).
* The data key leaves the orchestrator only wrapped to the binding key of one attested node
  (``wrap_key``), HPKE-style: an ephemeral key pair, ECDH with the binding key (X25519 for the
  software attester, NIST P-256 for the TPM, whose private half never leaves the TPM and is
  usable only under the PCR policy it was created with), HKDF-SHA256 over the shared secret and
  both public keys and the context, then AES-256-GCM with the context as associated data.
* The node computes the same shared secret (``X25519`` in software, ``TPM2_ECDH_ZGen`` in the
  TPM) and calls ``unwrap_with_shared_secret``. Another node, or the same TPM after its
  platform PCR changed, cannot compute it, so a copied artifact and wrapped key are useless there.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from edgeward.v1 import attestation_pb2 as pb

from . import tpm_wire
from .errors import KeyReleaseError

WRAP_SCHEMA = 1
_INFO = b"edgeward/v1 key release\x00"
_NONCE = 12


def new_data_key() -> bytes:
    return AESGCM.generate_key(bit_length=256)


def seal(data_key: bytes, plaintext: bytes, aad: bytes = b"") -> bytes:
    """AES-256-GCM encryption of a model artifact; the 12-byte nonce is prefixed."""
    nonce = os.urandom(_NONCE)
    return nonce + AESGCM(data_key).encrypt(nonce, plaintext, aad)


def open_sealed(data_key: bytes, blob: bytes, aad: bytes = b"") -> bytes:
    if len(blob) < _NONCE + 16:
        raise KeyReleaseError("attestation.key.decrypt_failed", "sealed blob too short")
    try:
        return AESGCM(data_key).decrypt(blob[:_NONCE], blob[_NONCE:], aad)
    except InvalidTag as err:
        raise KeyReleaseError("attestation.key.decrypt_failed", "wrong key or tampered artifact") from err


def _kek(shared: bytes, ephemeral: bytes, binding: bytes, context: str) -> bytes:
    info = _INFO + len(ephemeral).to_bytes(2, "big") + ephemeral + len(binding).to_bytes(2, "big") + binding
    return HKDF(hashes.SHA256(), 32, salt=None, info=info + context.encode()).derive(shared)


def _x25519(secret: bytes, public: bytes) -> bytes:
    """libsodium's X25519 (RFC 7748; it clamps the scalar as OpenSSL does; 48 against 68 us here for
    a key pair and an exchange): the shared secret, or KeyReleaseError for a public key that is not
    32 bytes or is of small order (the all-zero secret, RFC 7748 section 6.1). Imported here, not with
    the module: agents unwrap with this module and load only what their measured dependencies hold."""
    import nacl.bindings
    import nacl.exceptions

    if len(public) != nacl.bindings.crypto_scalarmult_BYTES:
        raise KeyReleaseError("attestation.key.bad_binding", f"X25519 key of {len(public)} bytes")
    try:
        return nacl.bindings.crypto_scalarmult(secret, public)
    except nacl.exceptions.RuntimeError as err:
        raise KeyReleaseError("attestation.key.bad_binding", "X25519 key of small order") from err


def _x25519_public(secret: bytes) -> bytes:
    import nacl.bindings  # as in _x25519

    return nacl.bindings.crypto_scalarmult_base(secret)


def x25519_binding_problem(public: bytes) -> str | None:
    """Why ``public`` cannot be a binding key to wrap data keys to, or None. A node whose attester
    certifies such a key must not pass as having a binding key: each wrap to it would fail. One
    exchange with any fixed scalar finds every key of small order (X25519 clamps scalars to
    multiples of the cofactor)."""
    try:
        _x25519(bytes(range(32)), public)
    except KeyReleaseError as err:
        return f"not a usable X25519 public key: {err.detail or err}"
    return None


def wrap_key(data_key: bytes, kind: pb.AttesterKind, binding_public: bytes, context: str) -> pb.WrappedKey:
    """Wrap ``data_key`` to a node's binding key (raw X25519, or the TPM key's TPM2B_PUBLIC).
    A key that cannot be wrapped to is a ``KeyReleaseError`` (``attestation.key.bad_binding``),
    whatever is wrong with it: a caller placing thousands of replicas must be able to skip one node."""
    if kind == pb.ATTESTER_KIND_SOFTWARE:
        secret = os.urandom(32)
        shared = _x25519(secret, binding_public)
        eph_raw = _x25519_public(secret)
    elif kind == pb.ATTESTER_KIND_TPM2:
        try:
            key = tpm_wire.parse_public(binding_public).key
        except tpm_wire.TpmStructureError as err:
            raise KeyReleaseError("attestation.key.bad_binding", str(err)) from err
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise KeyReleaseError("attestation.key.bad_binding", "TPM binding key is not an ECC key")
        eph_ec = ec.generate_private_key(key.curve)
        try:
            shared = eph_ec.exchange(ec.ECDH(), key)
        except ValueError as err:
            raise KeyReleaseError("attestation.key.bad_binding", str(err)) from err
        eph_raw = eph_ec.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    else:
        raise KeyReleaseError("attestation.key.bad_binding", f"attester kind {kind}")
    nonce = os.urandom(_NONCE)
    sealed = AESGCM(_kek(shared, eph_raw, binding_public, context)).encrypt(nonce, data_key, context.encode())
    return pb.WrappedKey(
        schema=WRAP_SCHEMA,
        kind=kind,
        ephemeral_public=eph_raw,
        binding_public=binding_public,
        ciphertext=nonce + sealed,
        context=context,
    )


def parse_wrapped(data: bytes) -> pb.WrappedKey:
    wrapped = pb.WrappedKey()
    try:
        wrapped.ParseFromString(data)
    except Exception as err:  # protobuf raises DecodeError or RuntimeError depending on backend
        raise KeyReleaseError("attestation.key.malformed", str(err)[:200]) from err
    if wrapped.schema != WRAP_SCHEMA or len(wrapped.ciphertext) < _NONCE + 16:
        raise KeyReleaseError("attestation.key.malformed", f"schema {wrapped.schema}")
    return wrapped


def unwrap_with_shared_secret(wrapped: pb.WrappedKey, shared: bytes) -> bytes:
    kek = _kek(shared, wrapped.ephemeral_public, wrapped.binding_public, wrapped.context)
    try:
        return AESGCM(kek).decrypt(
            wrapped.ciphertext[:_NONCE], wrapped.ciphertext[_NONCE:], wrapped.context.encode()
        )
    except InvalidTag as err:
        raise KeyReleaseError("attestation.key.unwrap_failed", "not wrapped to this node's key") from err
