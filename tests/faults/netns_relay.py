"""Run inside a network namespace by test_partition.py: relays a Unix socket (file system paths
cross namespaces) or a TCP address to a TCP address in this namespace. The test reaches the
orchestrator's gRPC API through a Unix socket, so nothing is bound in the host's network
namespace; the edge node downloads artifacts through the namespace's veth address, while the
orchestrator itself binds loopback only (plaintext is allowed nowhere else).

    python netns_relay.py unix:/path/to/socket HOST PORT
    python netns_relay.py LISTEN_HOST:LISTEN_PORT HOST PORT
"""

from __future__ import annotations

import asyncio
import contextlib
import sys


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            writer.close()


async def main(listen: str, host: str, port: int) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(host, port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    if listen.startswith("unix:"):
        server = await asyncio.start_unix_server(handle, listen.removeprefix("unix:"))
    else:
        listen_host, listen_port = listen.rsplit(":", 1)
        server = await asyncio.start_server(handle, listen_host, int(listen_port))
    print("relay ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
