"""The summary `edgeward up` prints labels an accelerator simulated on the node where it is, not
wherever its kind is simulated somewhere in the fleet."""

from __future__ import annotations

from orchestrator.up import _print_summary


def node(node_id: str, *accelerators: tuple[str, bool]) -> dict:
    return {
        "id": node_id,
        "status": "online",
        "hardware_profile": "p",
        "accelerators": [{"kind": k, "simulated": sim} for k, sim in accelerators],
        "replicas": 1,
        "j_per_inference": None,
        "energy_source": "modelled",
    }


def deployment(name: str, node_id: str, kind: str) -> dict:
    return {
        "name": name,
        "running": 1,
        "replicas": 1,
        "phases": {"Running": 1},
        "placements": [{"node": node_id, "accelerator": kind, "reason": "scheduler.bound", "message": "m"}],
    }


def test_a_kind_real_on_one_node_and_simulated_on_another_is_labelled_per_node(capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # one table row a line
    report = {
        "nodes": [
            node("node-1", ("cpu-litert", False)),
            node("node-2", ("fpga-pynq", True), ("cpu-litert", True)),
        ],
        "deployments": [
            deployment("real", "node-1", "cpu-litert"),
            deployment("sim", "node-2", "cpu-litert"),
        ],
        "use_cases": {},
        "accelerator_kinds": {"cpu-litert": 2},
        "moves": [],
        "energy": {},
        "latency_ms": {"p50": 1.0, "p95": 2.0},
        "inferences": 2,
        "errors": 0,
    }
    _print_summary(report)
    rows = {
        line.split("│")[1].strip(): line
        for line in capsys.readouterr().out.splitlines()
        if "scheduler.bound" in line
    }
    assert "(simulated)" not in rows["real"]
    assert "cpu-litert (simulated)" in rows["sim"]
