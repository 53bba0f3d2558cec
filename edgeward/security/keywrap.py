"""Model data keys at rest: wrapped under a key-encryption key (KEK) that never enters the database.

A store row holds ``ewk1 | len(id) | kek id | nonce | AES-256-GCM(kek, data key)``, with the model's
name and version (and the KEK id) as associated data, so a database copy, a backup or a dump of the
WAL gives no usable key, and a wrapped key cannot be moved to another model's row. The KEK comes
from a `KekProvider`:

- ``file`` (default): `FileKeyring`, one 32-byte key per file ``<id>.key`` (0600) in a 0700
  directory (default ``<state_dir>/kek``; put it on another volume, or use another provider, so a
  copy of the state directory is not enough), and a file ``active`` naming the key that wraps;
- any other name: a factory registered under the entry point group ``edgeward.kek_providers``
  (``factory(options: dict, state_dir: Path) -> KekProvider``) for a KMS, PKCS#11 token or TPM:
  the provider only has to wrap and unwrap 32 bytes with associated data.

Rotation (`rotate`, ``edgeward keys rotate``): a new KEK becomes active, every row wrapped under
another KEK is re-wrapped in one transaction (compare-and-swap per row, so a concurrent revocation
wins), and with ``retire`` the KEKs no row uses any more are deleted. Running processes pick up the
new active KEK at their next wrap and keep old ones they already read for unwrapping.
Rows written before keys were wrapped (raw 32-byte keys) are wrapped when a store opens
(`wrap_legacy_keys`).
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from edgeward.security.errors import SecurityError
from edgeward.security.files import locked, private_dir, tighten, write_private

log = logging.getLogger(__name__)

MAGIC = b"ewk1"
_NONCE = 12
_RAW_KEY_BYTES = 32
_AAD = b"edgeward/v1 data key\x00"
ENTRY_POINT_GROUP = "edgeward.kek_providers"


class KeyWrapError(SecurityError):
    """A KEK is missing or unusable, or a wrapped key does not open."""


class KeyEncryptionKey(Protocol):
    """One KEK: wraps and unwraps short secrets with associated data, never reveals itself."""

    @property
    def key_id(self) -> str: ...
    def wrap(self, secret: bytes, aad: bytes) -> bytes: ...
    def unwrap(self, wrapped: bytes, aad: bytes) -> bytes: ...


class KekProvider(Protocol):
    """Where KEKs live: the active one wraps, any known id unwraps, `create` starts a rotation."""

    def active(self) -> KeyEncryptionKey: ...
    def get(self, key_id: str) -> KeyEncryptionKey: ...
    def create(self) -> KeyEncryptionKey: ...
    def activate(self, key_id: str) -> None: ...
    def ids(self) -> list[str]: ...
    def retire(self, key_id: str) -> None: ...


@dataclass(frozen=True)
class AesKek:
    """A KEK held in memory (read from a `FileKeyring` file)."""

    key_id: str
    key: bytes

    def __repr__(self) -> str:
        return f"AesKek({self.key_id!r})"

    def wrap(self, secret: bytes, aad: bytes) -> bytes:
        nonce = os.urandom(_NONCE)
        return nonce + AESGCM(self.key).encrypt(nonce, secret, aad)

    def unwrap(self, wrapped: bytes, aad: bytes) -> bytes:
        try:
            return AESGCM(self.key).decrypt(wrapped[:_NONCE], wrapped[_NONCE:], aad)
        except (InvalidTag, ValueError) as err:
            raise KeyWrapError(
                "security.kek.unwrap_failed", f"a key wrapped under {self.key_id} does not open"
            ) from err


class FileKeyring:
    """KEKs in files of one private directory (see the module docstring)."""

    def __init__(self, directory: Path | str) -> None:
        self.dir = Path(directory)
        self._lock = threading.Lock()
        self._keys: dict[str, AesKek] = {}

    @classmethod
    def open(cls, directory: Path | str) -> FileKeyring:
        """Open the keyring, creating the directory and a first KEK if there is none."""
        ring = cls(directory)
        private_dir(ring.dir)
        # Several processes (orchestrator replicas sharing the directory) may open it for the first
        # time together: the first KEK is created under an exclusive lock, so exactly one is made.
        with locked(ring.dir / ".lock"):
            for path in ring.dir.iterdir():
                tighten(path)
            if not (ring.dir / "active").exists():
                ring.activate(ring.create().key_id)
        ring.active()
        return ring

    def ids(self) -> list[str]:
        return sorted(p.stem for p in self.dir.glob("*.key"))

    def active(self) -> KeyEncryptionKey:
        try:
            key_id = (self.dir / "active").read_text().strip()
        except OSError as err:
            raise KeyWrapError("security.kek.missing", f"no active KEK in {self.dir}: {err}") from err
        return self.get(key_id)

    def get(self, key_id: str) -> KeyEncryptionKey:
        with self._lock:
            kek = self._keys.get(key_id)
            if kek is not None:
                return kek
            if not key_id.isalnum():
                raise KeyWrapError("security.kek.bad_id", f"bad KEK id {key_id[:40]!r}")
            path = self.dir / f"{key_id}.key"
            try:
                key = path.read_bytes()
            except OSError as err:
                raise KeyWrapError("security.kek.missing", f"KEK {key_id} is not in {self.dir}") from err
            if len(key) != 32:
                raise KeyWrapError("security.kek.bad_key", f"{path} does not hold a 32-byte key")
            kek = self._keys[key_id] = AesKek(key_id, key)
            return kek

    def create(self) -> KeyEncryptionKey:
        key_id = secrets.token_hex(8)
        write_private(self.dir / f"{key_id}.key", AESGCM.generate_key(bit_length=256))
        log.info("new key-encryption key %s in %s", key_id, self.dir)
        return self.get(key_id)

    def activate(self, key_id: str) -> None:
        self.get(key_id)
        write_private(self.dir / "active", key_id.encode() + b"\n")

    def retire(self, key_id: str) -> None:
        if key_id == self.active().key_id:
            raise KeyWrapError("security.kek.active", f"KEK {key_id} is the active one")
        (self.dir / f"{key_id}.key").unlink(missing_ok=True)
        with self._lock:
            self._keys.pop(key_id, None)
        log.info("retired key-encryption key %s", key_id)


def open_provider(name: str, options: dict[str, Any], state_dir: Path) -> KekProvider:
    """The KEK provider ``name`` (``file`` or a registered entry point)."""
    if name == "file":
        return FileKeyring.open(Path(options.get("dir") or Path(state_dir) / "kek"))
    from importlib.metadata import entry_points

    found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
    if not found:
        raise KeyWrapError(
            "security.kek.unknown_provider", f"no KEK provider {name!r} (entry points {ENTRY_POINT_GROUP})"
        )
    provider: KekProvider = found[0].load()(options, Path(state_dir))
    return provider


class DataKeys:
    """What a store calls at its boundary: `wrap` before a data key is written, `unwrap` after it is
    read. An empty value (a revoked, destroyed key) stays empty."""

    def __init__(self, provider: KekProvider) -> None:
        self.provider = provider

    @staticmethod
    def _aad(name: str, version: str, key_id: str) -> bytes:
        return _AAD + f"{name}\x00{version}\x00{key_id}".encode()

    def wrap(self, data_key: bytes, name: str, version: str) -> bytes:
        if not data_key:
            return b""
        kek = self.provider.active()
        kid = kek.key_id.encode()
        return MAGIC + bytes([len(kid)]) + kid + kek.wrap(data_key, self._aad(name, version, kek.key_id))

    def unwrap(self, stored: bytes, name: str, version: str) -> bytes:
        if not stored:
            return b""
        key_id = key_id_of(stored)
        if key_id is None:
            raise KeyWrapError("security.kek.unwrapped", f"the data key of {name}:{version} is not wrapped")
        body = stored[len(MAGIC) + 1 + len(key_id) :]
        return self.provider.get(key_id).unwrap(body, self._aad(name, version, key_id))


def key_id_of(stored: bytes) -> str | None:
    """The KEK id a stored value is wrapped under; None for a raw (legacy) key or an empty one."""
    if not stored.startswith(MAGIC) or len(stored) < len(MAGIC) + 1:
        return None
    size = stored[len(MAGIC)]
    return stored[len(MAGIC) + 1 : len(MAGIC) + 1 + size].decode("ascii", "replace")


class WrappedKeyStore(Protocol):
    """The two store calls rotation and migration need (SQLite and PostgreSQL stores alike)."""

    def data_keys(self) -> list[tuple[str, str, bytes]]: ...
    def replace_data_keys(self, rows: Iterable[tuple[str, str, bytes, bytes]]) -> int: ...


def _rewrap(store: WrappedKeyStore, keys: DataKeys, stale: Any) -> int:
    """Re-wrap under the active KEK every stored key for which ``stale(stored)`` holds."""
    active = keys.provider.active().key_id
    changes = []
    for name, version, stored in store.data_keys():
        if not stored or not stale(stored, active):
            continue
        plain = stored if key_id_of(stored) is None else keys.unwrap(stored, name, version)
        changes.append((name, version, stored, keys.wrap(plain, name, version)))
    return store.replace_data_keys(changes) if changes else 0


def wrap_legacy_keys(store: WrappedKeyStore, keys: DataKeys) -> int:
    """Wrap the raw data keys a store wrote before keys were wrapped; returns how many."""
    count = _rewrap(
        store, keys, lambda stored, _active: key_id_of(stored) is None and len(stored) == _RAW_KEY_BYTES
    )
    if count:
        log.warning("wrapped %d data key(s) that were stored raw under the active KEK", count)
    return count


@dataclass(frozen=True)
class Rotation:
    new_key_id: str
    rewrapped: int
    retired: tuple[str, ...]


def rotate(store: WrappedKeyStore, keys: DataKeys, *, retire: bool = False) -> Rotation:
    """Make a new KEK active and re-wrap every stored key under it; with ``retire``, delete the
    KEKs that no stored key uses afterwards."""
    provider = keys.provider
    new = provider.create()
    provider.activate(new.key_id)
    count = _rewrap(store, keys, lambda stored, active: key_id_of(stored) != active)
    retired: list[str] = []
    if retire:
        count += _rewrap(store, keys, lambda stored, active: key_id_of(stored) != active)  # written meanwhile
        in_use = {key_id_of(stored) for _n, _v, stored in store.data_keys() if stored}
        for key_id in provider.ids():
            if key_id != new.key_id and key_id not in in_use:
                provider.retire(key_id)
                retired.append(key_id)
    return Rotation(new.key_id, count, tuple(retired))
