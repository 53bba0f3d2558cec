"""TPM 2.0 wire structures the verifier needs, in pure Python (TPM 2.0 Part 2, big-endian).

The verifier runs on the orchestrator, which has no TPM and should not need the TSS libraries,
and it must be fast: parsing a quote here is a few struct calls. Only what attestation uses is
covered: TPMS_ATTEST (quote and certify), TPMT_SIGNATURE (ECDSA, RSASSA, RSAPSS), TPMT_PUBLIC
(RSA and ECC keys), TPML_PCR_SELECTION, object names, the PolicyPCR digest, KDFa and
MakeCredential for an RSA endorsement key. Every parser checks bounds and consumes its input
exactly; anything else raises :class:`TpmStructureError`.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

try:  # CFB, which TPM 2.0 parameter encryption uses, moved to the "decrepit" module in cryptography 47
    from cryptography.hazmat.decrepit.ciphers.modes import CFB
except ImportError:  # pragma: no cover - older cryptography
    from cryptography.hazmat.primitives.ciphers.modes import CFB

from .errors import EvidenceMalformed

TPM_GENERATED_VALUE = 0xFF544347
ST_ATTEST_CERTIFY = 0x8017
ST_ATTEST_QUOTE = 0x8018

ALG_RSA = 0x0001
ALG_SHA1 = 0x0004
ALG_AES = 0x0006
ALG_SHA256 = 0x000B
ALG_SHA384 = 0x000C
ALG_SHA512 = 0x000D
ALG_NULL = 0x0010
ALG_RSASSA = 0x0014
ALG_RSAPSS = 0x0016
ALG_OAEP = 0x0017
ALG_ECDSA = 0x0018
ALG_ECDH = 0x0019
ALG_ECDAA = 0x001A
ALG_ECC = 0x0023
ALG_CFB = 0x0043
ECC_NIST_P256 = 0x0003
ECC_NIST_P384 = 0x0004
CC_POLICY_PCR = 0x0000017F

# TPMA_OBJECT bits
FIXED_TPM = 0x00000002
FIXED_PARENT = 0x00000010
SENSITIVE_DATA_ORIGIN = 0x00000020
USER_WITH_AUTH = 0x00000040
ADMIN_WITH_POLICY = 0x00000080
RESTRICTED = 0x00010000
DECRYPT = 0x00020000
SIGN = 0x00040000

HASHES = {ALG_SHA1: "sha1", ALG_SHA256: "sha256", ALG_SHA384: "sha384", ALG_SHA512: "sha512"}
_CRYPTO_HASH: dict[int, Callable[[], hashes.HashAlgorithm]] = {
    ALG_SHA1: hashes.SHA1,
    ALG_SHA256: hashes.SHA256,
    ALG_SHA384: hashes.SHA384,
    ALG_SHA512: hashes.SHA512,
}
_CURVES = {ECC_NIST_P256: (ec.SECP256R1, 32), ECC_NIST_P384: (ec.SECP384R1, 48)}
_CURVE_IDS = {"secp256r1": ECC_NIST_P256, "secp384r1": ECC_NIST_P384}
MAX_PCR = 24


class TpmStructureError(EvidenceMalformed):
    reason = "attestation.quote.malformed"


# ------------------------------------------------------------------------------ reading


class _Reader:
    __slots__ = ("buf", "pos")

    def __init__(self, buf: bytes) -> None:
        self.buf = buf
        self.pos = 0

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.buf):
            raise TpmStructureError(detail=f"truncated: need {n} bytes at offset {self.pos}")
        out = self.buf[self.pos : end]
        self.pos = end
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def u32(self) -> int:
        return int.from_bytes(self.take(4), "big")

    def u64(self) -> int:
        return int.from_bytes(self.take(8), "big")

    def tpm2b(self) -> bytes:
        return self.take(self.u16())

    def done(self, what: str) -> None:
        if self.pos != len(self.buf):
            raise TpmStructureError(detail=f"{len(self.buf) - self.pos} trailing bytes after {what}")


def tpm2b(data: bytes) -> bytes:
    return len(data).to_bytes(2, "big") + data


# ------------------------------------------------------------------------------ PCR selection


def marshal_pcr_selection(hash_alg: int, pcrs: Iterable[int]) -> bytes:
    """TPML_PCR_SELECTION with one bank (3-byte select, as PC-client TPMs use)."""
    bitmap = bytearray(3)
    for index in pcrs:
        if not 0 <= index < MAX_PCR:
            raise ValueError(f"PCR index {index} out of range")
        bitmap[index // 8] |= 1 << (index % 8)
    return struct.pack(">IHB", 1, hash_alg, 3) + bytes(bitmap)


def _read_pcr_selection(r: _Reader) -> tuple[tuple[int, tuple[int, ...]], ...]:
    count = r.u32()
    if count > 16:
        raise TpmStructureError(detail=f"{count} PCR banks")
    banks = []
    for _ in range(count):
        alg = r.u16()
        size = r.u8()
        if size > 8:
            raise TpmStructureError(detail=f"PCR select of {size} bytes")
        bitmap = r.take(size)
        pcrs = tuple(i for i in range(size * 8) if bitmap[i // 8] & (1 << (i % 8)))
        banks.append((alg, pcrs))
    return tuple(banks)


# ------------------------------------------------------------------------------ TPMS_ATTEST


@dataclass(frozen=True, slots=True)
class Attest:
    """A parsed TPMS_ATTEST; ``raw`` is exactly the signed bytes."""

    raw: bytes
    type: int
    qualified_signer: bytes
    extra_data: bytes
    clock: int
    reset_count: int
    restart_count: int
    safe: bool
    firmware_version: int
    # quote
    pcr_select: tuple[tuple[int, tuple[int, ...]], ...] = ()
    pcr_digest: bytes = b""
    # certify
    certified_name: bytes = b""
    certified_qualified_name: bytes = b""


def parse_attest(raw: bytes) -> Attest:
    r = _Reader(raw)
    magic = r.u32()
    if magic != TPM_GENERATED_VALUE:
        raise TpmStructureError(detail=f"magic {magic:#x} is not TPM_GENERATED_VALUE")
    kind = r.u16()
    signer = r.tpm2b()
    extra = r.tpm2b()
    clock, resets, restarts, safe = r.u64(), r.u32(), r.u32(), r.u8()
    firmware = r.u64()
    if kind == ST_ATTEST_QUOTE:
        select = _read_pcr_selection(r)
        digest = r.tpm2b()
        r.done("TPMS_ATTEST")
        return Attest(
            raw,
            kind,
            signer,
            extra,
            clock,
            resets,
            restarts,
            bool(safe),
            firmware,
            pcr_select=select,
            pcr_digest=digest,
        )
    if kind == ST_ATTEST_CERTIFY:
        name = r.tpm2b()
        qualified = r.tpm2b()
        r.done("TPMS_ATTEST")
        return Attest(
            raw,
            kind,
            signer,
            extra,
            clock,
            resets,
            restarts,
            bool(safe),
            firmware,
            certified_name=name,
            certified_qualified_name=qualified,
        )
    raise TpmStructureError(detail=f"attestation type {kind:#x} is neither quote nor certify")


def marshal_attest(
    kind: int,
    *,
    signer: bytes,
    extra_data: bytes,
    clock: int = 0,
    reset_count: int = 0,
    restart_count: int = 0,
    safe: bool = True,
    firmware_version: int = 0,
    pcr_selection: bytes = b"",
    pcr_digest: bytes = b"",
    certified_name: bytes = b"",
) -> bytes:
    """A TPMS_ATTEST as a TPM builds it (used by the software attester and test signers)."""
    head = struct.pack(">IH", TPM_GENERATED_VALUE, kind) + tpm2b(signer) + tpm2b(extra_data)
    head += struct.pack(">QIIBQ", clock, reset_count, restart_count, int(safe), firmware_version)
    if kind == ST_ATTEST_QUOTE:
        return head + pcr_selection + tpm2b(pcr_digest)
    if kind == ST_ATTEST_CERTIFY:
        return head + tpm2b(certified_name) + tpm2b(certified_name)
    raise ValueError(f"attestation type {kind:#x}")


# ------------------------------------------------------------------------------ TPMT_SIGNATURE


@dataclass(frozen=True, slots=True)
class Signature:
    alg: int
    hash_alg: int
    value: bytes  # DER for ECDSA, raw for RSA


def parse_signature(raw: bytes) -> Signature:
    r = _Reader(raw)
    alg = r.u16()
    if alg == ALG_ECDSA:
        hash_alg = r.u16()
        sig_r = int.from_bytes(r.tpm2b(), "big")
        sig_s = int.from_bytes(r.tpm2b(), "big")
        r.done("TPMT_SIGNATURE")
        return Signature(alg, hash_alg, encode_dss_signature(sig_r, sig_s))
    if alg in (ALG_RSASSA, ALG_RSAPSS):
        hash_alg = r.u16()
        value = r.tpm2b()
        r.done("TPMT_SIGNATURE")
        return Signature(alg, hash_alg, value)
    raise TpmStructureError(detail=f"signature algorithm {alg:#x} not supported")


def marshal_signature(alg: int, hash_alg: int, value: bytes | tuple[int, int]) -> bytes:
    head = struct.pack(">HH", alg, hash_alg)
    if alg == ALG_ECDSA:
        assert isinstance(value, tuple)
        size = (max(value[0].bit_length(), value[1].bit_length(), 256) + 7) // 8
        return head + tpm2b(value[0].to_bytes(size, "big")) + tpm2b(value[1].to_bytes(size, "big"))
    assert isinstance(value, bytes)
    return head + tpm2b(value)


# ------------------------------------------------------------------------------ TPMT_PUBLIC


@dataclass(frozen=True)
class PublicArea:
    """A parsed TPMT_PUBLIC (RSA or ECC); ``raw`` is its marshaled form (what the name hashes)."""

    raw: bytes
    type: int
    name_alg: int
    attributes: int
    auth_policy: bytes
    scheme: int
    scheme_hash: int
    curve: int = 0
    rsa_bits: int = 0
    rsa_exponent: int = 0
    symmetric: tuple[int, int, int] = (ALG_NULL, 0, 0)
    unique: tuple[bytes, ...] = ()

    @cached_property
    def name(self) -> bytes:
        return name_of(self.name_alg, self.raw)

    @cached_property
    def key(self) -> ec.EllipticCurvePublicKey | rsa.RSAPublicKey:
        """The cryptography public key (cached: parsing keys is the slow part of verification)."""
        try:
            if self.type == ALG_ECC:
                curve, _ = _CURVES[self.curve]
                x, y = (int.from_bytes(v, "big") for v in self.unique)
                return ec.EllipticCurvePublicNumbers(x, y, curve()).public_key()
            n = int.from_bytes(self.unique[0], "big")
            return rsa.RSAPublicNumbers(self.rsa_exponent or 65537, n).public_key()
        except (KeyError, ValueError) as err:
            raise TpmStructureError(detail=f"public key does not load: {err}") from err

    def verify(self, signature: Signature, message: bytes) -> bool:
        """True if ``signature`` over ``message`` verifies with this key."""
        from cryptography.exceptions import InvalidSignature

        hash_cls = _CRYPTO_HASH.get(signature.hash_alg)
        if hash_cls is None:
            return False
        key = self.key
        try:
            if signature.alg == ALG_ECDSA and isinstance(key, ec.EllipticCurvePublicKey):
                key.verify(signature.value, message, ec.ECDSA(hash_cls()))
            elif signature.alg == ALG_RSASSA and isinstance(key, rsa.RSAPublicKey):
                key.verify(signature.value, message, padding.PKCS1v15(), hash_cls())
            elif signature.alg == ALG_RSAPSS and isinstance(key, rsa.RSAPublicKey):
                key.verify(
                    signature.value,
                    message,
                    padding.PSS(padding.MGF1(hash_cls()), padding.PSS.AUTO),
                    hash_cls(),
                )
            else:
                return False
        except InvalidSignature:
            return False
        return True


def _read_symmetric(r: _Reader) -> tuple[int, int, int]:
    alg = r.u16()
    if alg == ALG_NULL:
        return (alg, 0, 0)
    return (alg, r.u16(), r.u16())


def _read_scheme(r: _Reader) -> tuple[int, int]:
    scheme = r.u16()
    if scheme == ALG_NULL:
        return scheme, ALG_NULL
    hash_alg = r.u16()
    if scheme == ALG_ECDAA:
        r.u16()  # count
    return scheme, hash_alg


def parse_public(raw: bytes) -> PublicArea:
    """Parse a TPM2B_PUBLIC (size-prefixed) or a bare TPMT_PUBLIC."""
    if len(raw) >= 2 and int.from_bytes(raw[:2], "big") == len(raw) - 2:
        raw = raw[2:]
    r = _Reader(raw)
    kind, name_alg, attributes = r.u16(), r.u16(), r.u32()
    policy = r.tpm2b()
    symmetric = _read_symmetric(r)
    scheme, scheme_hash = _read_scheme(r)
    if kind == ALG_RSA:
        bits, exponent = r.u16(), r.u32()
        modulus = r.tpm2b()
        r.done("TPMT_PUBLIC")
        return PublicArea(
            raw,
            kind,
            name_alg,
            attributes,
            policy,
            scheme,
            scheme_hash,
            rsa_bits=bits,
            rsa_exponent=exponent,
            symmetric=symmetric,
            unique=(modulus,),
        )
    if kind == ALG_ECC:
        curve = r.u16()
        if r.u16() != ALG_NULL:  # kdf scheme
            r.u16()
        x, y = r.tpm2b(), r.tpm2b()
        r.done("TPMT_PUBLIC")
        return PublicArea(
            raw,
            kind,
            name_alg,
            attributes,
            policy,
            scheme,
            scheme_hash,
            curve=curve,
            symmetric=symmetric,
            unique=(x, y),
        )
    raise TpmStructureError(detail=f"public area type {kind:#x} not supported")


def marshal_public_ecc(
    key: ec.EllipticCurvePublicKey,
    *,
    attributes: int,
    scheme: int = ALG_ECDSA,
    scheme_hash: int = ALG_SHA256,
    auth_policy: bytes = b"",
) -> bytes:
    """TPMT_PUBLIC of an ECC key (used by test signers and the benchmark)."""
    curve = _CURVE_IDS[key.curve.name]
    size = _CURVES[curve][1]
    nums = key.public_numbers()
    body = struct.pack(">HHI", ALG_ECC, ALG_SHA256, attributes) + tpm2b(auth_policy)
    body += struct.pack(">H", ALG_NULL)
    body += struct.pack(">HH", scheme, scheme_hash) if scheme != ALG_NULL else struct.pack(">H", ALG_NULL)
    body += struct.pack(">HH", curve, ALG_NULL)
    return body + tpm2b(nums.x.to_bytes(size, "big")) + tpm2b(nums.y.to_bytes(size, "big"))


def marshal_public_rsa(
    key: rsa.RSAPublicKey, *, attributes: int, scheme: int = ALG_RSASSA, scheme_hash: int = ALG_SHA256
) -> bytes:
    nums = key.public_numbers()
    body = struct.pack(">HHI", ALG_RSA, ALG_SHA256, attributes) + tpm2b(b"")
    body += struct.pack(">HHH", ALG_NULL, scheme, scheme_hash)
    body += struct.pack(">HI", key.key_size, 0 if nums.e == 65537 else nums.e)
    return body + tpm2b(nums.n.to_bytes(key.key_size // 8, "big"))


def name_of(name_alg: int, public_raw: bytes) -> bytes:
    """TPM object name: nameAlg || H_nameAlg(TPMT_PUBLIC)."""
    algorithm = HASHES.get(name_alg)
    if algorithm is None:
        raise TpmStructureError(detail=f"name algorithm {name_alg:#x} not supported")
    return name_alg.to_bytes(2, "big") + hashlib.new(algorithm, public_raw).digest()


# ------------------------------------------------------------------------------ policies


def pcr_digest(values: Sequence[bytes], hash_name: str = "sha256") -> bytes:
    """Digest of PCR values concatenated in selection order (quote pcrDigest, PolicyPCR)."""
    h = hashlib.new(hash_name)
    for value in values:
        h.update(value)
    return h.digest()


def policy_pcr_digest(pcrs: Sequence[int], values: Sequence[bytes], hash_alg: int = ALG_SHA256) -> bytes:
    """The policy digest of a fresh session after ``TPM2_PolicyPCR(pcrs, H(values))``."""
    name = HASHES[hash_alg]
    size = hashlib.new(name).digest_size
    data = bytes(size) + CC_POLICY_PCR.to_bytes(4, "big") + marshal_pcr_selection(hash_alg, pcrs)
    return hashlib.new(name, data + pcr_digest(values, name)).digest()


# ------------------------------------------------------------------------------ MakeCredential


def kdfa(hash_alg: int, key: bytes, label: bytes, context_u: bytes, context_v: bytes, bits: int) -> bytes:
    """KDFa of TPM 2.0 Part 1 (SP800-108 counter mode with HMAC)."""
    name = HASHES[hash_alg]
    if not label.endswith(b"\x00"):
        label += b"\x00"
    out = b""
    counter = 0
    while len(out) * 8 < bits:
        counter += 1
        out += hmac.new(
            key, counter.to_bytes(4, "big") + label + context_u + context_v + bits.to_bytes(4, "big"), name
        ).digest()
    return out[: bits // 8]


def make_credential(ek: PublicArea, secret: bytes, object_name: bytes) -> tuple[bytes, bytes]:
    """TPM2_MakeCredential in software for an RSA endorsement key.

    Returns (TPM2B_ID_OBJECT, TPM2B_ENCRYPTED_SECRET). Only the TPM holding ``ek`` can recover
    ``secret``, and its TPM2_ActivateCredential releases it only for the object named
    ``object_name`` loaded on the same TPM: that is what binds the AK to the EK.
    """
    import os

    if ek.type != ALG_RSA:
        raise TpmStructureError("attestation.ek.unsupported", "only RSA endorsement keys are supported")
    sym_alg, sym_bits, sym_mode = ek.symmetric
    if sym_alg != ALG_AES or sym_mode != ALG_CFB:
        raise TpmStructureError("attestation.ek.unsupported", "EK symmetric scheme is not AES-CFB")
    name = HASHES[ek.name_alg]
    digest_size = hashlib.new(name).digest_size
    seed = os.urandom(digest_size)
    hash_cls = _CRYPTO_HASH[ek.name_alg]
    key = ek.key
    assert isinstance(key, rsa.RSAPublicKey)
    encrypted_seed = key.encrypt(seed, padding.OAEP(padding.MGF1(hash_cls()), hash_cls(), b"IDENTITY\x00"))
    sym_key = kdfa(ek.name_alg, seed, b"STORAGE", object_name, b"", sym_bits)
    encryptor = Cipher(algorithms.AES(sym_key), CFB(bytes(16))).encryptor()
    enc_identity = encryptor.update(tpm2b(secret)) + encryptor.finalize()
    hmac_key = kdfa(ek.name_alg, seed, b"INTEGRITY", b"", b"", digest_size * 8)
    outer = hmac.new(hmac_key, enc_identity + object_name, name).digest()
    return tpm2b(tpm2b(outer) + enc_identity), tpm2b(encrypted_seed)
