"""The catalog as the orchestrator runs it: publisher trust, wipes and the misuse monitor, and the
one periodic loop that drives the last two."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from edgeward.v1 import node_pb2

from ..events import EventBus
from ..fleet import Fleet
from ..store import Store
from ..telemetry import TelemetryStore
from .config import CatalogConfig
from .misuse import InvocationMonitor
from .signing import PublisherTrust
from .wipe import Quarantine, SendWipe, WipeController

log = logging.getLogger(__name__)

TICK_S = 1.0


class Catalog:
    def __init__(
        self,
        config: CatalogConfig,
        trust: PublisherTrust,
        *,
        store: Store,
        db: Callable[..., Awaitable],
        fleet: Fleet,
        telemetry: TelemetryStore,
        events: EventBus,
        send_wipe: SendWipe,
        quarantine: Quarantine,
        revoke_keys: Callable[[str, list[str]], None],
        released_to: Callable[[str, list[str]], set[str]],
        on_change: Callable[[], None],
    ) -> None:
        self.config = config
        self.trust = trust
        self.telemetry = telemetry
        self.monitor = InvocationMonitor(config.misuse, events.publish)
        self.wipes = WipeController(
            config,
            store=store,
            db=db,
            fleet=fleet,
            telemetry_models=telemetry.models,
            send=send_wipe,
            quarantine=quarantine,
            revoke_keys=revoke_keys,
            released_to=released_to,
            events=events,
            monitor=self.monitor,
            on_change=on_change,
        )

    def inferences(self, node_id: str) -> dict[tuple[str, str], int]:
        return {(m.model_name, m.model_version): m.inferences for m in self.telemetry.models(node_id)}

    async def wipe_confirmed(self, node_id: str, event: node_pb2.Event) -> None:
        await self.wipes.confirmed(node_id, event)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            try:
                await self.wipes.tick()
                self.monitor.tick(
                    time.monotonic(), {n: self.telemetry.models(n) for n in self.telemetry.nodes}
                )
            except asyncio.CancelledError:
                raise
            except Exception:  # one bad pass must not stop wipe tracking
                log.exception("catalog pass failed")
