"""Wake-ups between replicas on PostgreSQL: LISTEN/NOTIFY (docs/scale-out.md, "Change feed").

A transaction that changes what another replica must act on sends a NOTIFY on one of ``CHANNELS``
(PostgreSQL delivers it when, and only if, the transaction commits, in commit order): a change of
the store's feed of deployments (``DEPLOYMENTS``), a shared-ingest merge that changed a node's
status (``STATES``), and a rollout action asked of a replica that does not lead (``ACTIONS``,
for the leader to take); the payload is the writing replica's id. :class:`Listener` holds one connection of its
own that LISTENs on them and calls the replica back for each.

A notification only says "read now": what changed is always read from the tables, by the same
readers that otherwise poll. So a lost notification costs latency, never a change: while the
listener is not connected the readers poll at their fast rate, and after it (re)connects every
callback is called once, for whatever committed while nobody listened.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any

import sqlalchemy as sa

log = logging.getLogger(__name__)

DEPLOYMENTS = "edgeward_deployments"
STATES = "edgeward_states"
ACTIONS = "edgeward_rollout_actions"
CHANNELS = (DEPLOYMENTS, STATES, ACTIONS)
RETRY_S = (0.2, 0.5, 1.0, 2.0, 5.0)  # reconnect backoff; the last repeats
# A listener checks its session with a round trip every PING_S: a connection that hangs without a
# reset (a dead peer, a network cut) stops counting as listening within PING_S + PING_TIMEOUT_S,
# not when the TCP keepalives give up. Notifications that arrive meanwhile wait in psycopg's backlog.
PING_S = 5.0
PING_TIMEOUT_S = 5.0

# The payload: the writing replica's id (it has read its own change already).
NOTIFY_DEPLOYMENTS = sa.text(f"SELECT pg_notify('{DEPLOYMENTS}', :writer)")
NOTIFY_ACTIONS = sa.text(f"SELECT pg_notify('{ACTIONS}', :writer)")


class Listener:
    """LISTEN on ``CHANNELS`` over a connection to ``url``'s database; ``on[channel](payload)`` per
    notification, on the event loop. :attr:`connected` says whether notifications flow now (the
    readers poll slowly only then)."""

    def __init__(
        self,
        engine: sa.Engine,
        on: Mapping[str, Callable[[str], None]],
        connect_timeout_s: float = 10.0,
        *,
        ping_s: float = PING_S,
        ping_timeout_s: float = PING_TIMEOUT_S,
    ) -> None:
        """``connect_timeout_s``: as the store's (``state.connect_timeout_s``); keepalive settings in
        the store's URL win over the listener's own."""
        self._engine = engine
        self._on = dict(on)
        self._connect_timeout_s = connect_timeout_s
        self._ping_s, self._ping_timeout_s = ping_s, ping_timeout_s
        self.connected = False
        self.counts = {"notifications": 0, "connects": 0}

    def _connect_kwargs(self) -> dict[str, Any]:
        _, params = self._engine.dialect.create_connect_args(self._engine.url)
        params.setdefault("connect_timeout", max(1, round(self._connect_timeout_s)))
        # Keepalives: a connection whose peer vanished without a reset is noticed within a minute.
        for key, value in {"keepalives": 1, "keepalives_idle": 20, "keepalives_interval": 5,
                           "keepalives_count": 4}.items():  # fmt: skip
            params.setdefault(key, value)
        params["application_name"] = "edgeward-listen"
        return dict(params)

    async def run(self) -> None:
        import psycopg

        failures = 0
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(autocommit=True, **self._connect_kwargs())
                async with conn:
                    for channel in CHANNELS:
                        await conn.execute(f"LISTEN {channel}")
                    self.connected = True
                    self.counts["connects"] += 1
                    failures = 0
                    self._catch_up()
                    while True:
                        async for notify in conn.notifies(timeout=self._ping_s):
                            self.counts["notifications"] += 1
                            callback = self._on.get(notify.channel)
                            if callback is not None:
                                callback(notify.payload)
                        try:
                            async with asyncio.timeout(self._ping_timeout_s):
                                await conn.execute("SELECT 1")
                        except TimeoutError:
                            await conn.close()  # without a word to a server that does not answer
                            raise OSError(f"no answer to a ping within {self._ping_timeout_s:g} s") from None
            except (psycopg.Error, OSError) as err:
                log.warning("not listening for other replicas' changes (polling meanwhile): %s", err)
            except Exception:  # never expected; the readers poll meanwhile, and this tries again
                log.exception("not listening for other replicas' changes (polling meanwhile)")
            finally:
                self.connected = False
            await asyncio.sleep(RETRY_S[min(failures, len(RETRY_S) - 1)])
            failures += 1

    def _catch_up(self) -> None:
        """What committed while nobody listened: every reader reads once."""
        for callback in self._on.values():
            callback("")
