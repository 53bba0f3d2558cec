"""One-time enrollment tokens: the operator's approval of one node id.

``edgeward pki token NODE --ttl 1h`` mints a token bound to ``NODE`` and prints it once; the
operator hands it to that device (``enrollment_token`` in node.yaml). The node presents it in its
first ``EnrollmentRequest``; the verifier checks it when the request arrives and redeems it when the
node has proven its attestation key. A token is good for one successful enrollment, of that node id
only, until it expires.

At rest only the token's sha256 is kept, one small file per token under
``<orchestrator state_dir>/attestation/tokens/``::

    pending/<sha256 hex>.json   {"node_id", "created_unix_ms", "expires_unix_ms"}   (0600)
    used/<sha256 hex>.json      the same record, moved there when the token was redeemed

Every change is a write to a temporary file, fsync, rename, fsync of the directory, so a crash
leaves a token either whole or absent; redeeming is one ``rename`` from ``pending/`` to ``used/``,
which exactly one of any number of concurrent redeemers wins. The CLI mints while the orchestrator
runs: the orchestrator reads these files when a token is presented, it caches nothing.

A token has 256 random bits, so an unsalted sha256 is a sufficient one-way function: the files
alone let nobody enroll. Tokens never appear in logs or in the error details below.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from edgeward.mqtt.topics import NODE_ID_PATTERN

from .errors import EnrollmentError

log = logging.getLogger(__name__)

PREFIX = "ewt1_"
TOKEN_RE = re.compile(r"ewt1_[A-Za-z0-9_-]{43}")
MAX_TOKEN_CHARS = 128
MAX_TTL_S = 30 * 86400
#: Redeemed and expired records are kept this long, so that a late attempt reads "used" or
#: "expired" rather than "unknown"; ``prune`` deletes them afterwards.
KEEP_S = 7 * 86400


def digest_of(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class IssuedToken:
    """A freshly minted token: ``token`` is shown to the operator once and never stored."""

    token: str = field(repr=False)
    node_id: str
    expires_unix_ms: int
    digest: str


@dataclass(frozen=True)
class TokenRecord:
    """What the store knows about a token (never the token itself)."""

    digest: str
    node_id: str
    created_unix_ms: int
    expires_unix_ms: int
    used_unix_ms: int | None = None


@dataclass(frozen=True)
class TokenClaim:
    """A token that was valid for ``node_id`` when its request arrived; ``redeem`` spends it."""

    store: TokenStore = field(repr=False)
    node_id: str
    digest: str

    def redeem(self) -> None:
        self.store.redeem(self.node_id, self.digest)


class TokenStore:
    """The enrollment tokens of one orchestrator (a directory; see the module docstring).

    Every method does file IO: call it off the event loop.
    """

    def __init__(self, directory: Path, clock: Callable[[], float] = time.time) -> None:
        self.directory = Path(directory)
        self._pending = self.directory / "pending"
        self._used = self.directory / "used"
        self._clock = clock
        self._synced = _GroupSync((self._used, self._pending))

    @classmethod
    def in_state_dir(cls, state_dir: Path, clock: Callable[[], float] = time.time) -> TokenStore:
        """The store of the orchestrator whose ``state_dir`` this is."""
        return cls(Path(state_dir) / "attestation" / "tokens", clock)

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    # ------------------------------------------------------------ operator side

    def mint(self, node_id: str, ttl_s: float = 3600.0) -> IssuedToken:
        """A new token for ``node_id``, valid for ``ttl_s`` seconds and one enrollment."""
        return self.mint_many([node_id], ttl_s)[0]

    def mint_many(self, node_ids: Sequence[str], ttl_s: float = 3600.0) -> list[IssuedToken]:
        """One new token per node id (in order), written as one batch: every file is written and
        flushed, then all are renamed into ``pending/`` and the directory is synced once (a crash
        leaves each token whole or absent, as with :meth:`mint`). Minting a fleet's tokens one at a
        time costs a directory sync (and a scan of the directory, for pruning) per node."""
        for node_id in node_ids:
            if not isinstance(node_id, str) or NODE_ID_PATTERN.fullmatch(node_id) is None:
                raise EnrollmentError(
                    "enrollment.token.bad_request", f"node id must match {NODE_ID_PATTERN.pattern}"
                )
        if not 0 < ttl_s <= MAX_TTL_S:
            raise EnrollmentError("enrollment.token.bad_request", f"ttl must be in (0, {MAX_TTL_S}] seconds")
        now = self._now_ms()
        issued = []
        for node_id in node_ids:
            token = PREFIX + base64.urlsafe_b64encode(os.urandom(32)).rstrip(b"=").decode()
            issued.append(IssuedToken(token, node_id, now + int(ttl_s * 1000), digest_of(token)))
        self._ensure_dirs()
        written = [
            self._write_record(
                self._pending / f"{t.digest}.json",
                TokenRecord(t.digest, t.node_id, now, t.expires_unix_ms),
                sync=len(issued) == 1,
            )
            for t in issued
        ]
        if len(issued) > 1:
            _sync_filesystem(self._pending)  # one flush for the batch, not one per file
        for tmp, path in written:
            os.rename(tmp, path)
        _fsync_dir(self._pending)
        self.prune()
        return issued

    def list(self) -> list[TokenRecord]:
        """Every pending and used token still on record, oldest first."""
        out = []
        for folder, used in ((self._pending, False), (self._used, True)):
            if not folder.is_dir():
                continue
            for path in folder.glob("*.json"):
                record = self._read(path, used)
                if record is not None:
                    out.append(record)
        return sorted(out, key=lambda r: r.created_unix_ms)

    def revoke(self, node_id: str) -> int:
        """Delete every pending token of ``node_id``; how many there were."""
        gone = 0
        for record in self.list():
            if record.used_unix_ms is None and record.node_id == node_id:
                with contextlib.suppress(FileNotFoundError):
                    (self._pending / f"{record.digest}.json").unlink()
                    gone += 1
        if gone:
            _fsync_dir(self._pending)
        return gone

    def prune(self) -> int:
        """Forget records that expired, or were redeemed, more than ``KEEP_S`` ago."""
        horizon = self._now_ms() - KEEP_S * 1000
        gone = 0
        for record in self.list():
            when = record.expires_unix_ms if record.used_unix_ms is None else record.used_unix_ms
            if when < horizon:
                folder = self._pending if record.used_unix_ms is None else self._used
                with contextlib.suppress(FileNotFoundError):
                    (folder / f"{record.digest}.json").unlink()
                    gone += 1
        return gone

    # ------------------------------------------------------------ verifier side

    def check(self, node_id: str, token: str) -> TokenClaim:
        """The claim of ``token`` for ``node_id``; EnrollmentError (enrollment.token.*) if it is none."""
        if not token:
            raise EnrollmentError(
                "enrollment.token.missing", f"node {node_id!r} presented no enrollment token"
            )
        if len(token) > MAX_TOKEN_CHARS or TOKEN_RE.fullmatch(token) is None:
            raise EnrollmentError("enrollment.token.unknown", "not a token this orchestrator issued")
        digest = digest_of(token)
        record = self._read(self._pending / f"{digest}.json", used=False)
        if record is None:
            used = self._read(self._used / f"{digest}.json", used=True)
            if used is not None:
                raise EnrollmentError("enrollment.token.used", "the token was already used for an enrollment")
            raise EnrollmentError("enrollment.token.unknown", "not a token this orchestrator issued")
        if record.node_id != node_id:
            raise EnrollmentError(
                "enrollment.token.wrong_node", f"the token was not issued for node {node_id!r}"
            )
        now = self._now_ms()
        if now > record.expires_unix_ms:
            raise EnrollmentError(
                "enrollment.token.expired",
                f"the token expired {(now - record.expires_unix_ms) / 1000:.0f} s ago",
            )
        return TokenClaim(self, node_id, digest)

    def redeem(self, node_id: str, digest: str) -> None:
        """Spend the token (atomically: of concurrent redeemers exactly one succeeds)."""
        source = self._pending / f"{digest}.json"
        record = self._read(source, used=False)
        if record is None:
            raise EnrollmentError("enrollment.token.used", "the token was already used for an enrollment")
        if record.node_id != node_id:
            raise EnrollmentError(
                "enrollment.token.wrong_node", f"the token was not issued for node {node_id!r}"
            )
        if self._now_ms() > record.expires_unix_ms:
            raise EnrollmentError("enrollment.token.expired", "the token expired during the enrollment")
        self._ensure_dirs()
        target = self._used / source.name
        try:
            os.rename(source, target)
        except FileNotFoundError as err:
            raise EnrollmentError(
                "enrollment.token.used", "the token was already used for an enrollment"
            ) from err
        now = self._clock()
        os.utime(target, (now, now))  # the redemption time
        self._synced.sync()

    # ------------------------------------------------------------ files

    def _ensure_dirs(self) -> None:
        for folder in (self._pending, self._used):
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)

    @staticmethod
    def _write_record(path: Path, record: TokenRecord, *, sync: bool) -> tuple[Path, Path]:
        """Write ``record`` to a temporary file beside ``path`` (flushed to disk with ``sync``);
        (tmp, path): the caller flushes a batch, renames, and syncs the directory."""
        body = {
            "node_id": record.node_id,
            "created_unix_ms": record.created_unix_ms,
            "expires_unix_ms": record.expires_unix_ms,
        }
        tmp = path.with_name(f".{path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, json.dumps(body).encode())
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        return tmp, path

    @staticmethod
    def _read(path: Path, used: bool) -> TokenRecord | None:
        try:
            raw = path.read_bytes()
            stat = path.stat() if used else None
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            body = json.loads(raw)
            return TokenRecord(
                path.stem,
                str(body["node_id"]),
                int(body["created_unix_ms"]),
                int(body["expires_unix_ms"]),
                None if stat is None else int(stat.st_mtime * 1000),
            )
        except (ValueError, KeyError, TypeError) as err:
            log.warning(
                "enrollment token record %s is unreadable (%s): ignored", path.name, type(err).__name__
            )
            return None


class _GroupSync:
    """Directory syncs shared by the threads that need one at the same time (a group commit): a
    caller returns once a sync that started after its call has finished. Enrolling a fleet redeems
    thousands of tokens; a sync of both directories each cost two journal commits per node."""

    def __init__(self, directories: tuple[Path, ...]) -> None:
        self._directories = directories
        self._cond = threading.Condition()
        self._asked = 0  # sync requests so far
        self._done = 0  # requests covered by a finished sync
        self._running = False

    def sync(self) -> None:
        with self._cond:
            self._asked += 1
            ticket = self._asked
            while self._done < ticket:
                if self._running:
                    self._cond.wait()
                    continue
                self._running = True
                covers = self._asked  # every request made before this sync starts
                self._cond.release()
                try:
                    for directory in self._directories:
                        _fsync_dir(directory)
                finally:
                    self._cond.acquire()
                    self._running = False
                    self._cond.notify_all()
                self._done = max(self._done, covers)


def _sync_filesystem(path: Path) -> None:
    """Flush every written file of the file system holding ``path`` (Linux ``syncfs``; elsewhere
    ``sync``): one flush for a batch of files instead of an fsync each."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        syncfs = getattr(libc, "syncfs", None)
        if syncfs is None or syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
