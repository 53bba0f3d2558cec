"""Third-party scheduler plugins from the ``edgeward.scheduler_plugins`` entry-point group: a real
distribution (a dist-info directory and its modules on sys.path), enabled by name in a profile."""

from __future__ import annotations

import logging
import textwrap

import pytest
from pydantic import ValidationError

from orchestrator.config import OrchestratorConfig
from orchestrator.scheduler import FILTERS, SCORERS, FleetSnapshot, NodeInfo, PlacementRequest, Scheduler
from orchestrator.scheduler import plugins as plugin_registry
from orchestrator.scheduler.settings import SchedulerConfig

MODULES = {
    "acme_prefer.py": """
        import numpy as np
        from orchestrator.scheduler import ScorePlugin

        class PreferZoneB(ScorePlugin):
            name = "acme-prefer-b"

            def score(self, req, shape, plan, nodes, fit):
                col, code = plan.snapshot.label_code("zone", "b") or (0, -2)
                return np.where(plan.snapshot.labels[nodes, col] == code, 100.0, 0.0)
    """,
    "acme_broken.py": """
        import acme_dependency_that_is_not_installed  # noqa: F401
    """,
    "acme_flaky.py": """
        from orchestrator.scheduler import FilterPlugin

        class Flaky(FilterPlugin):
            name = "acme-flaky"

            def filter(self, req, shape, plan, nodes):
                raise RuntimeError("lost its licence server")
    """,
    "acme_misnamed.py": """
        from orchestrator.scheduler import ScorePlugin

        class Misnamed(ScorePlugin):
            name = "something-else"

            def score(self, req, shape, plan, nodes, fit):
                return 0.0
    """,
}
ENTRY_POINTS = """
[edgeward.scheduler_plugins]
acme-prefer-b = acme_prefer:PreferZoneB
acme-broken = acme_broken:Plugin
acme-flaky = acme_flaky:Flaky
acme-misnamed = acme_misnamed:Misnamed
"""
NAMES = ("acme-prefer-b", "acme-broken", "acme-flaky", "acme-misnamed")


@pytest.fixture
def acme_distribution(tmp_path, monkeypatch):
    """Install 'acme-scheduling' the way pip lays it out: modules plus a dist-info directory."""
    for name, source in MODULES.items():
        (tmp_path / name).write_text(textwrap.dedent(source))
    info = tmp_path / "acme_scheduling-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-scheduling\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(ENTRY_POINTS)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    for name in NAMES:
        FILTERS.pop(name, None)
        SCORERS.pop(name, None)
        plugin_registry._loaded.pop(name, None)
        plugin_registry._failed.pop(name, None)
    for module in ("acme_prefer", "acme_broken", "acme_flaky", "acme_misnamed"):
        monkeypatch.delitem(__import__("sys").modules, module, raising=False)


def _nodes():
    return [
        NodeInfo(
            id=nid,
            online=True,
            cordoned=False,
            labels={"zone": zone},
            accelerators={"cpu-litert": frozenset({"INT8"})},
            max_replicas=4,
            memory_bytes=0,
            active_w=5.0,
            attestation_tier="software",
        )
        for nid, zone in (("n1", "b"), ("n2", "a"), ("n3", "a"))
    ]


REQ = PlacementRequest(
    deployment="d",
    accelerators=frozenset(),
    dtypes=frozenset({"INT8"}),
    memory_bytes=0,
    selector={},
    attestation_tier="software",
)


def test_a_plugin_from_an_entry_point_is_enabled_by_name_and_broken_ones_are_reported(
    acme_distribution, caplog
):
    config = OrchestratorConfig(
        scheduler={
            "profile": "acme",
            "profiles": {
                "acme": {
                    "weights": {
                        "acme-prefer-b": 10,
                        "acme-broken": 1,
                        "acme-misnamed": 1,
                        "no-such-plugin": 1,
                        "spread": 1,
                    }
                }
            },
        }
    )
    with caplog.at_level(logging.ERROR):
        scheduler = Scheduler.from_config(config.scheduler)
    assert scheduler.profile.weights == {"acme-prefer-b": 10, "spread": 1}
    assert set(scheduler.disabled) == {"acme-broken", "acme-misnamed", "no-such-plugin"}
    assert "ModuleNotFoundError" in scheduler.disabled["acme-broken"]
    assert "acme_dependency_that_is_not_installed" in scheduler.disabled["acme-broken"]
    assert "calls itself 'something-else'" in scheduler.disabled["acme-misnamed"]
    assert scheduler.disabled["no-such-plugin"].startswith("scheduler.plugin.unknown")
    assert "acme-broken" in caplog.text and "ModuleNotFoundError" in caplog.text
    # The third-party score decides: n1 is the only node in zone b (ties would go to n3).
    assert scheduler.plan(FleetSnapshot.from_node_infos(_nodes())).place(REQ).node_id == "n1"
    # Loading again is a no-op that still reports the failures.
    assert Scheduler.from_config(config.scheduler).disabled == scheduler.disabled


def test_a_plugin_that_raises_while_placing_rules_nodes_out_with_a_reason(acme_distribution, caplog):
    config = SchedulerConfig(profile="flaky", profiles={"flaky": {"filters": ["ready", "acme-flaky"]}})
    scheduler = Scheduler.from_config(config)
    assert scheduler.disabled == {}
    with caplog.at_level(logging.ERROR):
        result = scheduler.plan(FleetSnapshot.from_node_infos(_nodes())).place(REQ)
    assert result.reasons == {"scheduler.plugin.failed": 3}
    assert "lost its licence server" in caplog.text


def test_a_plugin_in_the_wrong_stage_is_disabled(acme_distribution):
    config = SchedulerConfig(
        profile="x", profiles={"x": {"filters": ["ready", "acme-prefer-b"], "weights": {}}}
    )
    scheduler = Scheduler.from_config(config)
    assert scheduler.profile.filters == ("ready",)
    assert scheduler.disabled["acme-prefer-b"].startswith("scheduler.plugin.wrong_stage")


def test_scheduler_config_is_validated_without_loading_plugins():
    with pytest.raises(ValidationError, match="unknown profile 'nope'"):
        SchedulerConfig(profile="nope")
    with pytest.raises(ValidationError, match="recover_ratio"):
        SchedulerConfig(rescheduling={"breach_ratio": 1.0, "recover_ratio": 1.2})
    with pytest.raises(ValidationError, match="max_unavailable"):
        SchedulerConfig(rescheduling={"max_unavailable": "120%"})
    with pytest.raises(ValidationError, match="extra"):
        SchedulerConfig(rescheduling={"sustain_s": 30})
    assert (
        SchedulerConfig(rescheduling={"max_unavailable": "25%"}).rescheduling.slo_policy().breach_windows == 3
    )
