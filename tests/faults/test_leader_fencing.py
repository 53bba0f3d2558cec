"""Fencing of the leader lease: a replica cut off from PostgreSQL stops acting as leader before its
lease ends, another replica takes over after it, and the ex-leader's late write is refused by the
token check. Two orchestrator replicas in this process; the first reaches PostgreSQL through a TCP
relay that the test black-holes (bytes are held, connections stay open: the replica's queries hang,
as on a real partition, instead of failing fast)."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest
import sqlalchemy as sa

from orchestrator.config import OrchestratorConfig
from orchestrator.errors import NotLeader
from orchestrator.server import Orchestrator
from orchestrator.store import SqlStore

pytestmark = [pytest.mark.faults, pytest.mark.broker]

TTL_S = 3.0


class BlackholeRelay:
    """Loopback TCP relay to ``upstream``; ``cut()`` stops every byte both ways (and of new
    connections) without closing anything."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self.open = asyncio.Event()
        self.open.set()
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def cut(self) -> None:
        self.open.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self._writers += [writer, up_writer]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    await self.open.wait()
                    dst.write(data)
                    await dst.drain()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for w in self._writers:
            w.close()
        self._writers.clear()
        self.open.set()


def config(tmp_path, name: str, url: str, mosquitto, topic_prefix: str) -> OrchestratorConfig:
    return OrchestratorConfig(
        state_dir=tmp_path / "shared-state",
        grpc_bind="127.0.0.1:0",
        broker={"url": str(mosquitto), "topic_prefix": topic_prefix},
        state={"url": url, "lease_ttl_s": TTL_S, "connect_timeout_s": 2},
    )


async def until(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


def lease_row(store: SqlStore) -> tuple[str, int, int, int]:
    with store.engine.connect() as conn:
        row = conn.execute(
            sa.text(
                "SELECT holder, token, expires_ms, (extract(epoch from clock_timestamp()) * 1000)::bigint "
                "FROM leases WHERE name = 'leader'"
            )
        ).one()
    return row[0], int(row[1]), int(row[2]), int(row[3])


async def test_a_replica_cut_off_from_postgres_steps_down_before_its_lease_ends(
    tmp_path, postgres_server, postgres_url, mosquitto, topic_prefix
):
    relay = BlackholeRelay(postgres_server.port)
    await relay.start()
    via_relay = postgres_url.replace(f":{postgres_server.port}/", f":{relay.port}/")
    assert via_relay != postgres_url
    try:
        async with Orchestrator(config(tmp_path, "a", via_relay, mosquitto, topic_prefix)) as a:
            await until(lambda: a.leading, 20, "replica a leading")
            async with Orchestrator(config(tmp_path, "b", postgres_url, mosquitto, topic_prefix)) as b:
                assert not b.leading
                old = a.election.lease
                assert old is not None
                relay.cut()
                cut_at = time.monotonic()
                await until(lambda: not a.leading, 3 * TTL_S, "replica a stepping down")
                stepped_down_ms = int(time.time() * 1000)
                stepped_after = time.monotonic() - cut_at
                holder, token, expires_ms, _ = lease_row(b.store)
                assert (holder, token) == (a.replica_id, old.token), "nobody took over yet"
                # Same machine, same clock: a gave up before the database would have let b in.
                assert stepped_down_ms < expires_ms, (stepped_down_ms, expires_ms)
                assert stepped_after < TTL_S
                await until(lambda: b.leading, 3 * TTL_S, "replica b taking over")
                holder, token, expires_ms, db_now = lease_row(b.store)
                assert (holder, token) == (b.replica_id, old.token + 1)
                await asyncio.wait_for(b.reconciler.wait_passes(1), 30)  # b's singleton loops run
                # a's late write with its old term is refused, and it keeps not leading.
                with pytest.raises(NotLeader):
                    b.store.fenced(old, b.store.put_rollout, "nothing", "{}", 1)
                assert not a.leading
                await relay.close()  # a's hung queries fail now, so that it can stop
    finally:
        await relay.close()
