"""The append-only audit log: one JSON line per mutating call and per denial, fsync-ed before the
call's answer leaves the process.

Each line: ``ts`` (UTC, ISO 8601), ``who`` (certificate subject, or ``anonymous``), ``role``,
``team``, ``serial`` (hex), ``peer``, ``method`` (full gRPC method), ``target`` (``deployment/NAME``,
``model/NAME``, ``node/ID`` or ``""``), ``result`` (``OK`` or the status code name) and ``reason``
(the denial's reason id and detail). Never a secret: requests are not logged, only their target.

The file is opened with ``O_APPEND`` for every write batch, so a rotated file (renamed away by
logrotate or the operator) is followed without a restart. Writes and fsyncs run on the log's own
thread, in order.
"""

from __future__ import annotations

import asyncio
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from edgeward.security.files import tighten
from edgeward.security.identity import Identity


@dataclass(frozen=True, slots=True)
class AuditEntry:
    ts: str
    who: str
    role: str
    team: str
    serial: str
    peer: str
    method: str
    target: str
    result: str
    reason: str = ""

    @classmethod
    def make(
        cls,
        identity: Identity | None,
        peer: str,
        method: str,
        target: str,
        result: str,
        reason: str = "",
    ) -> AuditEntry:
        return cls(
            ts=datetime.now(UTC).isoformat(timespec="milliseconds"),
            who=identity.common_name if identity else "anonymous",
            role=str(identity.role) if identity else "",
            team=(identity.team or "") if identity else "",
            serial=f"{identity.serial:x}" if identity else "",
            peer=bounded(peer, MAX_FIELD),
            method=bounded(method, MAX_FIELD),
            target=bounded(target, MAX_FIELD),
            result=result,
            reason=bounded(reason, MAX_REASON),
        )


MAX_FIELD = 256  # peer, method, target: a caller's names are echoed, never at any length
MAX_REASON = 1024


def bounded(text: str, most: int) -> str:
    """``text``, cut to ``most`` characters (saying how long it was): one refused call with a name of
    megabytes must not write megabytes to the log."""
    return text if len(text) <= most else f"{text[:most]}...[{len(text)} characters]"


class AuditLog:
    """``await log.record(entry)`` returns once the line is on disk."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(
            parents=True, exist_ok=True, mode=0o700
        )  # a configured parent is left as it is
        tighten(self.path)  # written 0600 since it exists; an older release may have left it readable
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="edgeward-audit")
        self.written = 0

    async def record(self, entry: AuditEntry) -> None:
        await asyncio.get_running_loop().run_in_executor(self._pool, self._append, _line(entry))

    def record_blocking(self, entry: AuditEntry) -> None:
        """`record` for a thread that is not an event loop's: returns once the line is on disk,
        written by the same one writer as every other line."""
        self._pool.submit(self._append, _line(entry)).result()

    def _append(self, line: bytes) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        self.written += 1  # on the one writer thread

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def _line(entry: AuditEntry) -> bytes:
    return (json.dumps(asdict(entry), sort_keys=True, ensure_ascii=True) + "\n").encode()


def read_audit(path: Path | str) -> list[dict[str, Any]]:
    """Every entry of an audit log file (for tools and tests)."""
    text = Path(path).read_text() if Path(path).exists() else ""
    complete = text[: text.rfind("\n") + 1]  # a line being appended right now is not read yet
    return [json.loads(line) for line in complete.splitlines() if line.strip()]
