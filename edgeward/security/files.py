"""Files that hold secrets: private from their creation on, and tightened when an older release
left them readable (an upgrade fixes the modes of an existing state directory).

Servers also run under ``umask 077`` (`private_umask`), so whatever a library creates beside these
(SQLite's -wal/-shm files take the database file's mode) is private too.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

DIR_MODE = 0o700
FILE_MODE = 0o600


def private_umask() -> int:
    """Set the process umask to 077 (servers call it at start); returns the previous one."""
    return os.umask(0o077)


def private_dir(path: Path | str) -> Path:
    """Create ``path`` (and parents) as 0700, or tighten it to 0700 if it exists."""
    path = Path(path)
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    _tighten(path, DIR_MODE)
    return path


def private_file(path: Path | str) -> Path:
    """Make sure ``path`` exists as 0600 (an empty file if missing) before a library opens it."""
    path = Path(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, FILE_MODE)
    os.close(fd)
    _tighten(path, FILE_MODE)
    return path


def tighten(path: Path | str) -> None:
    """0600 for an existing file, 0700 for a directory; nothing if it does not exist."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return
    _tighten(path, DIR_MODE if stat.S_ISDIR(mode) else FILE_MODE)


def _tighten(path: Path, mode: int) -> None:
    if stat.S_IMODE(path.stat().st_mode) & ~mode:
        os.chmod(path, mode)


def write_private(path: Path, data: bytes) -> None:
    """Write a secret file that is 0600 from its creation on (replacing an older one atomically). The
    temporary name is unique, so processes writing the same file at once never meet on it; the
    directory is synced after the rename, so the new name survives a crash."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _sync_dir(path.parent)


def _sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (flock) on ``path``, created 0600 if missing, across processes."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock
