"""A hollow fleet stops promptly even when its broker has stopped answering: every agent says
goodbye at once and waits for the broker's acknowledgement at most GOODBYE_S, not for the
session's PUBACK timeout."""

from __future__ import annotations

import os
import signal
import time

import pytest

from node_agent.agent import GOODBYE_S
from node_agent.hollow import STOP_BOUND_S, HollowFleetSpec, hollow_fleet

pytestmark = [pytest.mark.broker, pytest.mark.timeout(120)]

PUBACK_TIMEOUT_S = 10.0  # MqttSession's default: what each goodbye waited for before


async def test_a_fleet_stops_within_its_bound_while_the_broker_is_frozen(mosquitto_factory, tmp_path):
    assert GOODBYE_S < STOP_BOUND_S <= PUBACK_TIMEOUT_S
    broker = mosquitto_factory()
    assert broker.proc is not None
    spec = HollowFleetSpec(
        nodes=20, broker_url=str(broker.url), state_dir=tmp_path / "hollow", heartbeat_s=60
    )
    frozen = False
    try:
        async with hollow_fleet(spec) as agents:
            assert all(a._mqtt is not None and a._mqtt.connected for a in agents)
            os.kill(broker.proc.pid, signal.SIGSTOP)  # accepts nothing more, acknowledges nothing
            frozen = True
            t0 = time.monotonic()
        stopped_in = time.monotonic() - t0
    finally:
        if frozen:
            os.kill(broker.proc.pid, signal.SIGCONT)
    # Each goodbye ends at GOODBYE_S, the session's close after its grace: the whole fleet well
    # within STOP_BOUND_S, and before a single goodbye would have timed out before.
    assert stopped_in < PUBACK_TIMEOUT_S
