"""``edgeward up`` as a user runs it: all three use cases deployed (the automotive multi-exit model
split across the low-power board and the microserver), traffic through each, and the report with
per-use-case inferences, latency and the multi-exit model's exit distribution."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from usecases import CASES

pytestmark = [pytest.mark.slow]


def test_up_deploys_all_use_cases_and_reports_exits(tmp_path):
    report = tmp_path / "report.json"
    argv = [
        sys.executable,
        "-m",
        "edgeward",
        "up",
        "--nodes",
        "3",
        "--duration",
        "3",
        "--report",
        str(report),
    ]
    argv += ["--state-dir", str(tmp_path / "state")]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    r = json.loads(report.read_text())
    assert sorted(r["use_cases"]) == sorted(CASES)
    assert {d["name"]: d["running"] == d["replicas"] for d in r["deployments"]} == {
        d["name"]: True for d in r["deployments"]
    }
    for case, u in r["use_cases"].items():
        assert u["inferences"] > 0, case
        assert 0 < u["latency_ms"]["p50"] <= u["latency_ms"]["p95"], case
    auto = r["use_cases"]["automotive"]
    assert auto["model"] == "sign-classifier" and auto["deployments"] == [
        "sign-stage1",
        "sign-stage2",
        "sign-stage3",
    ]
    assert sum(auto["exits"].values()) == auto["inferences"]
    assert abs(sum(auto["exit_distribution"].values()) - 1) < 1e-3
    assert auto["exit_distribution"]["1"] > 0 and auto["exit_distribution"]["2"] > 0  # handed off too
    assert "exit 1:" in done.stdout and "sign-classifier" in done.stdout
    assert r["errors"] == 0
