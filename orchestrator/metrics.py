"""Prometheus text exposition of the fleet on ``GET /metrics`` (a tiny asyncio HTTP server).

Energy and power carry a ``source`` label, ``measured`` or ``modelled``, exactly as the nodes
report them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)

MAX_REQUEST = 8192


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(families: list[tuple[str, str, str, list[tuple[dict[str, str], float]]]]) -> bytes:
    """families: (name, type, help, [(labels, value)])."""
    lines = []
    for name, kind, help_text, samples in families:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            label_text = ",".join(f'{k}="{_esc(v)}"' for k, v in sorted(labels.items()))
            lines.append(f"{name}{{{label_text}}} {value!r}" if label_text else f"{name} {value!r}")
    return ("\n".join(lines) + "\n").encode()


class MetricsServer:
    def __init__(self, collect: Callable[[], bytes], bind: str) -> None:
        self._collect = collect
        self._bind = bind
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        host, _, port = self._bind.rpartition(":")
        self._server = await asyncio.start_server(self._handle, host, int(port))
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
            if len(head) > MAX_REQUEST:
                raise ValueError("request too large")
            method, path = head.split(b" ", 2)[:2]
            if method != b"GET":
                status, body, ctype = b"405 Method Not Allowed", b"only GET\n", b"text/plain"
            elif path.split(b"?")[0] != b"/metrics":
                status, body, ctype = b"404 Not Found", b"see /metrics\n", b"text/plain"
            else:
                status, body, ctype = b"200 OK", self._collect(), b"text/plain; version=0.0.4"
            writer.write(
                b"HTTP/1.1 "
                + status
                + b"\r\nContent-Type: "
                + ctype
                + b"\r\nContent-Length: "
                + str(len(body)).encode()
                + b"\r\nConnection: close\r\n\r\n"
                + body
            )
            await writer.drain()
        except (
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            TimeoutError,
            ValueError,
            ConnectionError,
        ):
            pass  # a broken or hostile request: close the connection, nothing else
        finally:
            writer.close()
