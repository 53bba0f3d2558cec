"""The command-line client against a live orchestrator."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import threading

import pytest
from conftest import eventually, manifest

from edgeward.cli import main

pytestmark = [pytest.mark.broker]


async def run_cli(*argv: str) -> tuple[int, str]:
    """Run the (blocking) CLI on its own thread while this loop keeps serving the orchestrator."""
    out = io.StringIO()
    result: list[int] = []

    def target() -> None:
        with contextlib.redirect_stdout(out):
            result.append(main(list(argv)))

    thread = threading.Thread(target=target)
    thread.start()
    while thread.is_alive():
        await asyncio.sleep(0.02)
    thread.join()
    return result[0], out.getvalue()


async def test_explain_get_and_delete(fleet, tmp_path):
    orch, agents, api = await fleet(nodes=2)
    await api.push()
    path = tmp_path / "d.yaml"
    path.write_text(manifest(replicas=1, extra="  selector: {matchLabels: {zone: mars}}\n"))
    code, out = await run_cli("apply", "-f", str(path), "--server", orch.address, "--json")
    assert code == 0
    assert json.loads(out) == [{"name": "vib", "result": "created"}]

    async def explained() -> bool:
        code, out = await run_cli("explain", "deployment/vib", "--server", orch.address, "--json")
        replicas = json.loads(out)["replicas"]
        # the first reconcile pass may not have created the replica yet
        return code == 0 and bool(replicas) and replicas[0]["reason"] == "scheduler.filter.selector"

    await eventually(explained, what="explanation")
    code, out = await run_cli("get", "nodes", "--server", orch.address, "--json")
    assert code == 0
    assert {n["id"] for n in json.loads(out)} == {"n1", "n2"}
    assert {n["attestation_tier"] for n in json.loads(out)} == {"software"}
    bad = tmp_path / "bad.yaml"
    bad.write_text(manifest(replicas=-2))
    code, _ = await run_cli("apply", "-f", str(bad), "--server", orch.address)
    assert code == 1
    code, out = await run_cli("delete", "deployment/vib", "--server", orch.address, "--json")
    assert code == 0
    assert json.loads(out)["name"] == "vib"
