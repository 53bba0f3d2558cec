"""``edgeward up`` as a user runs it: all three use cases deployed on a heterogeneous fleet (the
automotive multi-exit model split across the ASIC board and the microserver), traffic through each,
and the report with per-use-case inferences, latency, the multi-exit model's exit distribution,
where each replica runs and why, and the fleet's energy against round-robin."""

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
    # The bound only stops a hang (pytest's own 300 s would leave the processes behind).
    done = subprocess.run(argv, capture_output=True, text=True, timeout=280, check=False)
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

    # Three accelerator kinds, each running a replica the scheduler chose (no manifest names one).
    assert set(r["accelerator_kinds"]) == {"cpu-litert", "fpga-pynq", "asic-edgetpu"}, r["accelerator_kinds"]
    assert all(n >= 1 for n in r["accelerator_kinds"].values())
    accelerators = {n["id"]: {a["kind"]: a["simulated"] for a in n["accelerators"]} for n in r["nodes"]}
    assert {
        kind: sim for accs in accelerators.values() for kind, sim in accs.items() if kind != "cpu-litert"
    } == {
        "fpga-pynq": True,
        "asic-edgetpu": True,
    }, "the FPGA and ASIC are simulated here, and say so"
    # So are the ARM boards' CPUs (timed by their cost model); the x86 microserver's is this machine's.
    assert {n["hardware_profile"]: accelerators[n["id"]]["cpu-litert"] for n in r["nodes"]} == {
        "x86-n100": False,
        "pynq-z2": True,
        "coral-devboard": True,
    }
    for d in r["deployments"]:
        for p in d["placements"]:
            assert p["accelerator"] in accelerators[p["node"]], p
            assert p["reason"] in ("scheduler.bound", "reschedule.energy"), p  # placed, or moved for energy
            assert p["message"].split()[0] == ("score" if p["reason"] == "scheduler.bound" else "moved"), p
    assert all(m["kind"].startswith("reschedule.energy") for m in r["moves"]), r["moves"]
    for n in r["nodes"]:
        assert n["energy_source"] == "modelled"  # no RAPL here; where there is, it says measured
        assert n["inferences"] > 0 and n["j_per_inference"] > 0, n
    e = r["energy"]
    assert e["source"] == "modelled" and e["j_per_inference"] > 0 and e["inferences"] > 0
    assert e["energy_aware_j_per_inference"] > 0 and e["round_robin_j_per_inference"] > 0
    assert e["round_robin_vs_energy_aware"] == pytest.approx(
        e["round_robin_j_per_inference"] / e["energy_aware_j_per_inference"]
    )
    assert set(e["policies"]) == {"energy-aware", "round-robin", "energy-aware-cold-start"}
    assert e["cold_start_j_per_inference"] == e["policies"]["energy-aware-cold-start"]["j_per_inference"] > 0
    assert e["board_cpus"] == "modelled"
    assert all(p["unplaced"] == 0 for p in e["policies"].values())
    assert "fleet energy (modelled)" in done.stdout and "round-robin" in done.stdout
