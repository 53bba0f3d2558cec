"""Wake-ups between replicas (orchestrator/sql/notify.py) on a real PostgreSQL: a change of the
deployments' feed and a merge that changes a node's status are notified at commit, a merge that only
repeats a status is not, and a listener whose connection the server ends comes back and asks every
reader to read once (what committed meanwhile is never lost)."""

from __future__ import annotations

import asyncio

import pytest
import sqlalchemy as sa
from test_node_states import status

from orchestrator.manifest import parse_manifest
from orchestrator.node_states import Merge, NodeStates
from orchestrator.sql.notify import DEPLOYMENTS, STATES, Listener
from orchestrator.store import SqlStore

MANIFEST = """\
apiVersion: edgeward/v1
kind: Deployment
metadata: {name: web}
spec:
  model: {name: m, version: 1.0.0}
  replicas: 1
"""


class Heard:
    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []
        self.changed = asyncio.Event()

    def on(self, channel: str):
        def callback(payload: str) -> None:
            self.events.append((channel, payload))
            self.changed.set()

        return callback

    async def next(self, timeout: float = 30.0) -> tuple[str, str]:
        while not self.events:
            self.changed.clear()
            await asyncio.wait_for(self.changed.wait(), timeout)
        return self.events.pop(0)


@pytest.fixture
async def listened(tmp_path, postgres_url):
    """Two replicas' stores on one database; the second one listens: (first store, listener, heard)."""
    a = SqlStore(tmp_path / "a", postgres_url)
    b = SqlStore(tmp_path / "b", postgres_url)
    heard = Heard()
    listener = Listener(b.engine, {DEPLOYMENTS: heard.on(DEPLOYMENTS), STATES: heard.on(STATES)})
    task = asyncio.create_task(listener.run())
    try:
        # Connecting calls every reader once (the catch-up): both channels, empty payload.
        assert sorted([await heard.next(), await heard.next()]) == [(DEPLOYMENTS, ""), (STATES, "")]
        assert listener.connected
        yield a, listener, heard
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        a.close()
        b.close()
    assert not listener.connected


async def test_another_replicas_writes_are_notified_at_commit(listened):
    a, _, heard = listened
    a.writer = "replica-a"
    states = NodeStates(a.engine)
    try:
        a.put_deployment(parse_manifest(MANIFEST), 1000)
        assert await heard.next() == (DEPLOYMENTS, "replica-a")
        # A merge that changes n1's status names its writer; the same status again, or a heartbeat
        # that repeats it, changes nothing and says nothing.
        states.merge("replica-a", 1, Merge({"n1": status("n1", 1, 1)}, {}, ["n1"]))
        assert await heard.next() == (STATES, "replica-a")
        states.merge("replica-a", 2, Merge({"n1": status("n1", 1, 2)}, {}, ["n1"]))
        states.merge("replica-a", 3, Merge({}, {}, ["n1"]))  # liveness only
        # A marker after them: PostgreSQL delivers notifications in commit order, so any of the two
        # merges would have come before it.
        a.put_deployment(parse_manifest(MANIFEST.replace("replicas: 1", "replicas: 2")), 2000)
        assert await heard.next() == (DEPLOYMENTS, "replica-a")
        assert heard.events == []
    finally:
        states.close()


async def test_a_rolled_back_write_is_not_notified(listened):
    a, _, heard = listened
    with a.engine.connect() as conn:  # a NOTIFY in a transaction that does not commit
        conn.execute(sa.text(f"SELECT pg_notify('{DEPLOYMENTS}', 'lost')"))
        conn.rollback()
    a.put_deployment(parse_manifest(MANIFEST), 1000)
    assert await heard.next() == (DEPLOYMENTS, "")
    assert heard.events == []


async def test_a_listener_cut_off_reconnects_and_catches_up(listened):
    a, listener, heard = listened
    with a.engine.connect() as conn:  # the server ends the listening session (a failover, a kill)
        ended = conn.execute(
            sa.text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = 'edgeward-listen' AND datname = current_database()"
            )
        ).all()
    assert ended == [(True,)]
    # Back, and every reader asked to read once, for what committed while nobody listened.
    assert sorted([await heard.next(), await heard.next()]) == [(DEPLOYMENTS, ""), (STATES, "")]
    assert listener.connected and listener.counts["connects"] == 2
    a.put_deployment(parse_manifest(MANIFEST), 1000)
    assert await heard.next() == (DEPLOYMENTS, "")


def test_the_listener_connects_as_the_store_says():
    """The store's connect timeout bounds the listener's connect too; keepalives set in the URL win
    over the listener's own; the session is named for what it does."""
    from orchestrator.sql.engine import parse_postgres_url, postgres_engine

    def kwargs(url: str, timeout: float) -> dict:
        engine = postgres_engine(parse_postgres_url(url), 1, timeout)
        try:
            return Listener(engine, {}, timeout)._connect_kwargs()
        finally:
            engine.dispose()

    plain = kwargs("postgresql://edgeward@127.0.0.1:5432/edgeward", 3.0)
    assert (plain["connect_timeout"], plain["keepalives_idle"]) == (3, 20)
    assert plain["application_name"] == "edgeward-listen"
    tuned = kwargs("postgresql://edgeward@127.0.0.1:5432/edgeward?keepalives_idle=7&connect_timeout=2", 30.0)
    assert (tuned["connect_timeout"], tuned["keepalives_idle"], tuned["keepalives_count"]) == ("2", "7", 4)


class FreezingRelay:
    """A TCP relay to PostgreSQL that can stop relaying without closing anything: a network cut
    that sends no reset, which only a round trip (or, much later, TCP keepalives) notices."""

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self.frozen = False
        self._server: asyncio.Server | None = None
        self._relays: set[asyncio.Task] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for relay in self._relays:
            relay.cancel()
        await asyncio.gather(*self._relays, return_exceptions=True)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._relays.add(task)
        up_reader, up_writer = await asyncio.open_connection(*self._target)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            while data := await src.read(65536):
                while self.frozen:
                    await asyncio.sleep(0.05)
                dst.write(data)
                await dst.drain()
            dst.close()

        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer), return_exceptions=True)
        finally:
            writer.close()
            up_writer.close()


async def test_a_listener_whose_connection_hangs_notices_and_comes_back(tmp_path, postgres_url):
    """No reset, no error: the session just stops answering. The listener's ping finds it out (it
    stops counting as listening, so the readers poll fast), and it connects again once it can."""
    from sqlalchemy.engine import make_url

    from orchestrator.sql.engine import parse_postgres_url, postgres_engine

    a = SqlStore(tmp_path / "a", postgres_url)
    target = make_url(postgres_url)
    relay = FreezingRelay(target.host or "127.0.0.1", target.port or 5432)
    port = await relay.start()
    via_relay = target.set(port=port).render_as_string(hide_password=False)
    engine = postgres_engine(parse_postgres_url(via_relay), 1, 2.0)
    heard = Heard()
    listener = Listener(
        engine,
        {DEPLOYMENTS: heard.on(DEPLOYMENTS), STATES: heard.on(STATES)},
        2.0,
        ping_s=0.2,
        ping_timeout_s=0.5,
    )
    task = asyncio.create_task(listener.run())
    try:
        assert sorted([await heard.next(), await heard.next()]) == [(DEPLOYMENTS, ""), (STATES, "")]
        assert listener.connected
        relay.frozen = True
        async with asyncio.timeout(30):
            while listener.connected:
                await asyncio.sleep(0.05)
        a.put_deployment(parse_manifest(MANIFEST), 1000)  # committed while nobody can listen
        relay.frozen = False
        # Back, and every reader asked to read once, for what committed meanwhile.
        assert sorted([await heard.next(), await heard.next()]) == [(DEPLOYMENTS, ""), (STATES, "")]
        assert listener.connected and listener.counts["connects"] == 2
        a.put_deployment(parse_manifest(MANIFEST.replace("replicas: 1", "replicas: 2")), 2000)
        assert await heard.next() == (DEPLOYMENTS, "")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await relay.close()
        engine.dispose()
        a.close()
