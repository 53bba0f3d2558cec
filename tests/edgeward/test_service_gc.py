"""The service commands run with the collector's thresholds raised (edgeward/cli.py, SERVICES)."""

from __future__ import annotations

import gc

import pytest

from edgeward.cli import SERVICE_GC_THRESHOLDS, main


@pytest.fixture
def thresholds():
    before = gc.get_threshold()
    gc.set_threshold(700, 10, 10)  # Python's defaults
    yield
    gc.set_threshold(*before)


def test_a_service_command_raises_the_collection_thresholds(thresholds, tmp_path, capsys):
    assert main(["orchestrator", "-c", str(tmp_path / "missing.yaml")]) != 0  # stops at its config
    assert gc.get_threshold() == SERVICE_GC_THRESHOLDS


def test_a_client_command_keeps_them(thresholds, tmp_path, capsys):
    assert main(["apply", "-f", str(tmp_path / "missing.yaml")]) != 0
    assert gc.get_threshold() == (700, 10, 10)
