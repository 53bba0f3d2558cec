"""Publisher signatures: Ed25519 over a canonical digest of a model version.

The digest covers what a deployment relies on: ``sha256("edgeward/v1 model signature\\0" +
canonical JSON)`` where the canonical JSON is the object ``{name, version, sha256, size, use_case,
description, labels, parent_version, owner_team}`` with sorted keys, no whitespace, UTF-8. Backend
profiles are left out: the scheduler fills them in after publication. A publisher key is named by
its key id, the first 16 hex digits of the sha256 of its raw 32-byte public key.

Trusted public keys come from the config (files and/or a directory); loading them is the only IO,
done once at start (:meth:`PublisherTrust.load`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgeward.v1 import api_pb2

from .config import CatalogConfig
from .errors import CatalogError, SignatureRefused

log = logging.getLogger(__name__)

DOMAIN = b"edgeward/v1 model signature\x00"
SIGNED_FIELDS = (
    "name",
    "version",
    "sha256",
    "size",
    "use_case",
    "description",
    "labels",
    "parent_version",
    "owner_team",
)


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def canonical_digest(meta: api_pb2.ModelMetadata) -> bytes:
    """The 32 bytes a publisher signs for ``meta`` (see the module docstring)."""
    doc = {
        "name": meta.name,
        "version": meta.version,
        "sha256": meta.sha256,
        "size": meta.size,
        "use_case": meta.use_case,
        "description": meta.description,
        "labels": dict(sorted(meta.labels.items())),
        "parent_version": meta.parent_version,
        "owner_team": meta.owner_team,
    }
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(DOMAIN + text.encode()).digest()


@dataclass(frozen=True)
class PublisherKey:
    """An Ed25519 publisher key pair (the private half is a secret: never log it)."""

    private: Ed25519PrivateKey = field(repr=False)

    @classmethod
    def generate(cls) -> PublisherKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, path: Path) -> PublisherKey:
        """Blocking: read a PEM (PKCS#8) private key."""
        try:
            key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as err:
            raise CatalogError("catalog.key.unreadable", f"{path}: {err}") from err
        if not isinstance(key, Ed25519PrivateKey):
            raise CatalogError("catalog.key.not_ed25519", f"{path} is not an Ed25519 private key")
        return cls(key)

    @classmethod
    def load_or_create(cls, directory: Path, name: str) -> tuple[PublisherKey, Path]:
        """Blocking: the key pair ``directory/name.{key,pub}``, generated on first use; and the
        path of its public half."""
        private = Path(directory) / f"{name}.key"
        if private.exists():
            return cls.load(private), private.with_suffix(".pub")
        key = cls.generate()
        return key, key.write(directory, name)[1]

    @property
    def public(self) -> Ed25519PublicKey:
        return self.private.public_key()

    @property
    def key_id(self) -> str:
        return key_id(self.public)

    def public_pem(self) -> bytes:
        return self.public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def write(self, directory: Path, name: str = "publisher") -> tuple[Path, Path]:
        """Blocking: write ``name.key`` (mode 0600, created so) and ``name.pub``; refuses to overwrite."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        private, public = directory / f"{name}.key", directory / f"{name}.pub"
        pem = self.private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        try:
            fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError as err:
            raise CatalogError("catalog.key.exists", f"{private} exists; not overwritten") from err
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
        public.write_bytes(self.public_pem())
        return private, public

    def sign(self, meta: api_pb2.ModelMetadata) -> api_pb2.PublisherSignature:
        return api_pb2.PublisherSignature(
            key_id=self.key_id, signature=self.private.sign(canonical_digest(meta))
        )


def sign_metadata(meta: api_pb2.ModelMetadata, key: PublisherKey) -> api_pb2.ModelMetadata:
    """Set ``meta.signature`` (after every other field is final) and return ``meta``."""
    meta.ClearField("signature")
    meta.signature.CopyFrom(key.sign(meta))
    return meta


class PublisherTrust:
    """The trusted publisher keys, by key id, and whether a push must be signed."""

    def __init__(self, keys: list[Ed25519PublicKey], require_signatures: bool = True) -> None:
        self.keys = {key_id(k): k for k in keys}
        self.require_signatures = require_signatures

    @classmethod
    def load(cls, config: CatalogConfig) -> PublisherTrust:
        """Blocking: read the configured public keys (an unreadable one stops the start)."""
        paths = list(config.trusted_publishers)
        if config.trusted_publishers_dir is not None:
            directory = config.trusted_publishers_dir
            if not directory.is_dir():
                raise CatalogError(
                    "catalog.trust.no_dir", f"trusted_publishers_dir {directory} is not a directory"
                )
            paths += sorted(p for p in directory.iterdir() if p.suffix in (".pub", ".pem"))
        keys = []
        for path in paths:
            try:
                key = serialization.load_pem_public_key(Path(path).read_bytes())
            except (OSError, ValueError) as err:
                raise CatalogError("catalog.trust.unreadable", f"{path}: {err}") from err
            if not isinstance(key, Ed25519PublicKey):
                raise CatalogError("catalog.trust.not_ed25519", f"{path} is not an Ed25519 public key")
            keys.append(key)
        trust = cls(keys, config.require_signatures)
        log.info(
            "catalog: %d trusted publisher key(s) %s; signatures %s",
            len(trust.keys),
            ", ".join(sorted(trust.keys)),
            "required" if trust.require_signatures else "optional",
        )
        return trust

    def verify(self, meta: api_pb2.ModelMetadata) -> str:
        """The key id of the trusted publisher that signed ``meta``; "" when unsigned and allowed.
        A signature that is present is always checked, required or not."""
        sig = meta.signature
        if not sig.key_id and not sig.signature:
            if self.require_signatures:
                raise SignatureRefused(
                    "model.push.unsigned",
                    "metadata.signature is missing; sign with `edgeward models push --key KEY`",
                )
            return ""
        if len(sig.signature) != 64:
            raise SignatureRefused(
                "model.push.signature_malformed",
                f"metadata.signature.signature must be 64 bytes, got {len(sig.signature)}",
            )
        key = self.keys.get(sig.key_id)
        if key is None:
            raise SignatureRefused(
                "model.push.publisher_untrusted",
                f"metadata.signature.key_id {sig.key_id[:32]!r} is not a trusted publisher key",
            )
        try:
            key.verify(sig.signature, canonical_digest(meta))
        except InvalidSignature as err:
            raise SignatureRefused(
                "model.push.signature_invalid",
                f"metadata.signature does not verify with publisher key {sig.key_id}: "
                "the artifact digest or the metadata differ from what was signed",
            ) from err
        return sig.key_id
