"""The Attestation tab against a real verifier's AttestationService beside the orchestrator's API.

``attested_fleet`` runs its own verifier (frozen clock, one node running unknown agent code)
rather than the orchestrator's, so what the tab shows, and when a node fails, is fixed.
"""

from __future__ import annotations

from datetime import datetime

import pytest
from tui_support import event_ids, eventually, rows

from orchestrator.tui import ConsoleApp
from orchestrator.tui.model import Severity
from orchestrator.tui.screens import ConfirmScreen

pytestmark = [pytest.mark.broker]
FIXED_TIME = datetime(2026, 1, 1, 9, 30, 0)


async def test_attestation_tab_alerts_and_reattest(attested_fleet):
    app = ConsoleApp(attested_fleet.address, clock=lambda: FIXED_TIME)
    async with app.run_test(size=(80, 24)) as pilot:
        await eventually(lambda: app.connected and len(app.state.attestations) == 2, what="attestations")
        await eventually(lambda: len(app.state.nodes) == 2, what="nodes")
        await pilot.press("5")
        shown = rows(app, "attestations")
        assert shown["n1"] == {
            "NODE": "n1",
            "STATE": "affirming",
            "TIER": "software",
            "EXPIRES": "in 1m30s",  # the verifier's default result TTL, 90 s
            "REASONS": "",
        }
        assert shown["n2"]["STATE"] == "contraindicated"
        assert "reference." in shown["n2"]["REASONS"]
        alerts = [e for e in app.state.events if e.id == "attestation.contraindicated"]
        assert [(e.subject, e.severity) for e in alerts] == [("n2", Severity.ERROR)]

        # n1 loads something the reference values do not know: its next attestation fails, live
        attested_fleet.responders["n1"].measure("agent.plugin", b"not in the reference values")
        await pilot.press("t")  # n1 is the highlighted row
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("y")
        await eventually(
            lambda: rows(app, "attestations")["n1"]["STATE"] == "contraindicated", what="n1 fails"
        )
        assert "operator.node.attest" in event_ids(app)
        assert [e.subject for e in app.state.events if e.id == "attestation.contraindicated"] == ["n2", "n1"]
