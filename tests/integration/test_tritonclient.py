"""A stock Triton client (``tritonclient[grpc]``, unchanged) against a real node serving every use
case's model and the multi-exit ``sign-classifier``: repository index, readiness, metadata and an
inference for each, as a generic client finds them.

tritonclient pins a protobuf older than edgeward's, so it runs in a virtualenv of its own, made
once per machine by the fixture below (``TRITONCLIENT`` pins the version) and reused; the probe
script talks to the node over loopback and prints what it saw as JSON.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import venv
from pathlib import Path

import pytest
from conftest import eventually

from edgeward.v1 import node_pb2
from usecases.workloads import workloads

pytestmark = [pytest.mark.broker, pytest.mark.slow]

TRITONCLIENT = "tritonclient[grpc]==2.73.0"
PIPELINE = "sign-classifier"
PROBE = Path(__file__).with_name("tritonclient_probe.py")


@pytest.fixture(scope="session")
def triton_python() -> Path:
    """The interpreter of a virtualenv holding ``TRITONCLIENT`` (created on first use)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgeward-tests"
    home = cache / ("venv-" + TRITONCLIENT.replace("[", "-").replace("]", "").replace("==", "-"))
    python = home / "bin" / "python"
    done = home / ".installed"
    if not done.exists():
        venv.create(home, with_pip=True, clear=True)
        pip = subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", TRITONCLIENT],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        if pip.returncode != 0:
            tail = (pip.stderr or pip.stdout).strip().splitlines()[-1:]
            pytest.skip(f"cannot install {TRITONCLIENT} into {home}: {tail}")
        done.write_text(TRITONCLIENT + "\n")
    return python


def _no_selector(manifest: str) -> str:
    """One node here: the demo's zone selectors go."""
    lines = manifest.splitlines(keepends=True)
    out = []
    skip = False
    for line in lines:
        if line.startswith("  selector:"):
            skip = True
            continue
        if skip and line.startswith("    "):
            continue
        skip = False
        out.append(line)
    return "".join(out)


@pytest.mark.parametrize("mqtt_url", ["embedded"], indirect=True)
async def test_tritonclient_lists_describes_and_runs_every_served_model(fleet, triton_python):
    _, (node,), api = await fleet(nodes=1)
    work = workloads()
    expected = {PIPELINE}
    for w in work:
        for part in w.parts:
            await api.push(part.model_file, part.model_name, part.model_version)
            await api.apply(_no_selector(part.manifest))
            expected.add(part.model_name)

    async def all_running() -> bool:
        deps = [await api.deployment(p.deployment) for w in work for p in w.parts]
        return all(
            d.status.running == d.spec.replicas
            and all(r.phase == node_pb2.REPLICA_PHASE_RUNNING for r in d.status.replica_list)
            for d in deps
        )

    await eventually(all_running, timeout=60, what="every use-case replica running")

    async def pipeline_ready() -> bool:
        pipeline = node.pipelines.get(PIPELINE)
        return pipeline is not None and node.pipelines.ready(pipeline)

    await eventually(pipeline_ready, timeout=30, what=f"{PIPELINE} wired on the node")

    proc = await asyncio.create_subprocess_exec(
        str(triton_python),
        str(PROBE),
        node.inference_endpoint,
        PIPELINE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert proc.returncode == 0, err.decode()[-3000:]
    seen = json.loads(out)

    assert seen["live"] and seen["ready"]
    assert "model_repository" in seen["server"]["extensions"]
    assert seen["unknown_model_ready"] is False, "an unknown model is not ready, and no error (as Triton)"
    assert set(seen["models"]) == expected, "the repository index lists every served model"
    for name, model in seen["models"].items():
        assert model["state"] == "READY" and model["ready"], name
        assert model["metadata"]["name"] == name and model["metadata"]["versions"] == [model["version"]]
        assert model["outputs"], name
        assert set(model["outputs"]) == {o["name"] for o in model["metadata"]["outputs"]}
    multi = seen["models"][PIPELINE]
    assert multi["metadata"]["platform"] == "edgeward-multi-exit"
    assert [o["name"] for o in multi["metadata"]["outputs"]] == ["exit_probs", "exit"]
    (exit_index,) = multi["outputs"]["exit"]
    assert 1 <= exit_index <= 3 and int(multi["parameters"]["exit"]["int64_param"]) == exit_index
    assert abs(sum(multi["outputs"]["exit_probs"][0]) - 1) <= 2 / 256  # dequantized int8 probabilities
    # The float parameter arrived (double_param) and was read: stage 9 is refused by name.
    assert seen["double_stage"] != "accepted"
    assert seen["double_stage"]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "9 is not a stage" in seen["double_stage"]["message"]
    # The node counted what the stock client sent, per source, under the multi-exit model.
    assert any(s.source == "tritonclient" for s in node.pipelines.exit_stats())
