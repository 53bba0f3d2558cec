"""A TCP/Unix-socket relay run inside a network namespace (tests/faults/test_partition.py,
bench/cache_restart.py). File system paths cross namespaces, so a test reaches a process in a
namespace through a Unix socket and nothing is bound in the host's network namespace; a process
in one namespace reaches another through the veth address the test gave it.

    python netns_relay.py LISTEN UPSTREAM [DELAY_S]

LISTEN and UPSTREAM are each ``unix:PATH`` or ``HOST:PORT``; DELAY_S (default 0) delays every
chunk each way, a delay line for links shaped without netem.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys


async def relay(listen: str, upstream: str, delay_s: float = 0.0) -> None:
    """Copy bytes both ways between each connection to ``listen`` and a new one to ``upstream``
    (each ``unix:PATH`` or ``HOST:PORT``), each chunk ``delay_s`` after it arrived (a delay line:
    it delays, it does not throttle)."""
    loop = asyncio.get_running_loop()

    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if upstream.startswith("unix:"):
            return await asyncio.open_unix_connection(upstream.removeprefix("unix:"))
        host, port = upstream.rsplit(":", 1)
        return await asyncio.open_connection(host, int(port))

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def send() -> None:
            while data := (item := await line.get())[1]:
                await asyncio.sleep(max(0.0, item[0] - loop.time()))
                writer.write(data)
                await writer.drain()

        sender = asyncio.create_task(send())
        try:
            while data := await reader.read(1 << 16):
                line.put_nowait((loop.time() + delay_s, data))
        except OSError:
            pass
        finally:
            line.put_nowait((0.0, b""))
            with contextlib.suppress(OSError):
                await sender
                writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await connect()
        except OSError:
            writer.close()
            return
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    if listen.startswith("unix:"):
        server = await asyncio.start_unix_server(handle, listen.removeprefix("unix:"))
    else:
        host, port = listen.rsplit(":", 1)
        server = await asyncio.start_server(handle, host, int(port))
    print("relay ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(relay(sys.argv[1], sys.argv[2], float(sys.argv[3]) if len(sys.argv) > 3 else 0.0))
