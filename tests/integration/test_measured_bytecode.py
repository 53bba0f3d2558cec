"""Issue #15, 5: the agent.code measurement covers what runs. A swapped ``__pycache__/*.pyc`` whose
header matches its source (so the interpreter loads it) used to run unmeasured and attest AFFIRMING.

A real orchestrator (embedded broker, built-in reference values of this installation) and a real
agent process started from a faithful copy of the agent's packages, one of whose bytecode caches is
replaced by the bytecode of a modified source that leaves a marker file when it runs. Never may the
modified code run and the node be affirmed: either the agent does not load the swapped cache (it
keeps bytecode out of the package trees), or its measurement sees it and the verifier refuses."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import shutil
import subprocess
import sys
from importlib._bootstrap_external import _code_to_timestamp_pyc  # type: ignore[attr-defined]
from pathlib import Path

import pytest
import yaml

from attestation.artifacts import AGENT_CODE_PACKAGES, package_dir
from attestation.service import AttestationState
from attestation.tokens import TokenStore
from orchestrator.config import BrokerConfig, OrchestratorConfig
from orchestrator.server import Orchestrator

pytestmark = [pytest.mark.broker, pytest.mark.slow]


def swap_bytecode(source: Path, marker: Path) -> None:
    """Write the bytecode cache of ``source`` from a modified source that touches ``marker``, with
    the header of the real source (mtime and size): the interpreter takes it as up to date."""
    code = compile(
        source.read_text() + f"\nimport pathlib as _p\n_p.Path({str(marker)!r}).touch()\n",
        str(source),
        "exec",
    )
    stat = source.stat()
    # Beside the source, where the interpreter looks by default (not this process's cache_from_source:
    # an in-process agent of an earlier test may have moved this process's caches elsewhere).
    cache = source.parent / "__pycache__" / f"{source.stem}.{sys.implementation.cache_tag}.pyc"
    cache.parent.mkdir(exist_ok=True)
    cache.write_bytes(_code_to_timestamp_pyc(code, int(stat.st_mtime), stat.st_size))


async def attest_copy(tmp_path: Path, topic_prefix: str, copy: Path) -> AttestationState | None:
    """Start a real agent process from ``copy`` (first on its PYTHONPATH) against a real orchestrator
    with the built-in reference values of this installation; the attestation state it reaches."""
    config = OrchestratorConfig(
        state_dir=tmp_path / "orch",
        grpc_bind="127.0.0.1:0",
        node_timeout_s=5.0,
        broker=BrokerConfig(topic_prefix=topic_prefix),
        catalog={"require_signatures": False},
    )
    async with Orchestrator(config) as orch:
        node_yaml = tmp_path / "node.yaml"
        node_yaml.write_text(
            yaml.safe_dump(
                {
                    "node_id": "n1",
                    "heartbeat_s": 0.5,
                    "state_dir": str(tmp_path / "agent"),
                    "broker": {"url": orch.broker_url, "topic_prefix": topic_prefix},
                    "enrollment_token": TokenStore.in_state_dir(config.state_dir).mint("n1").token,
                }
            )
        )
        env = {
            **os.environ,
            "PYTHONPATH": str(copy),
            "EDGEWARD_DIE_WITH_PARENT": str(os.getpid()),
            "EDGEWARD_BYTECODE_DIR": str(tmp_path / "bytecode"),
        }
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        log = tmp_path / "agent.log"
        with log.open("wb") as out:
            agent = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "edgeward",
                "agent",
                "-c",
                str(node_yaml),
                cwd=copy,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        try:
            state = None
            async with asyncio.timeout(60):
                while state not in (AttestationState.AFFIRMING, AttestationState.CONTRAINDICATED):
                    assert agent.returncode is None, log.read_text()
                    await asyncio.sleep(0.1)
                    state = orch.verifier.service.state("n1")
        finally:
            agent.terminate()  # its goodbye goes through our broker: the loop keeps running meanwhile
            async with asyncio.timeout(20):
                await agent.wait()
    return state


def faithful_copy(tmp_path: Path) -> Path:
    copy = tmp_path / "install"
    for name in AGENT_CODE_PACKAGES:
        shutil.copytree(package_dir(name), copy / name, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


@pytest.mark.parametrize(
    "module",
    [
        "node_agent/runtime.py",  # imported once the agent runs
        "edgeward/cli.py",  # imported by `python -m edgeward` before anything of the agent
    ],
)
async def test_swapped_bytecode_never_runs_on_an_affirmed_node(
    tmp_path: Path, topic_prefix: str, module: str
):
    copy = faithful_copy(tmp_path)
    marker = tmp_path / "swapped-bytecode-ran"
    swap_bytecode(copy / module, marker)
    state = await attest_copy(tmp_path, topic_prefix, copy)
    ran = marker.exists()
    assert not (ran and state is AttestationState.AFFIRMING), "modified bytecode ran on an affirmed node"
    if module == "edgeward/cli.py":  # it runs before the agent can keep caches out: measured, refused
        assert ran and state is AttestationState.CONTRAINDICATED
    else:  # never loaded: the agent compiled its measured source instead
        assert not ran and state is AttestationState.AFFIRMING


@pytest.mark.parametrize("module", ["sitecustomize", "typing_extensions"])
async def test_code_outside_the_measured_packages_never_runs_on_an_affirmed_node(
    tmp_path: Path, topic_prefix: str, module: str
):
    """Code the agent process runs from outside the measured package trees: ``sitecustomize`` (run by
    the interpreter at start from anywhere on its path) and a module that a measured dependency
    imports but that is not measured itself (``typing_extensions``, imported by pydantic), here found
    first on the agent's path. Either must change what the node reports."""
    copy = faithful_copy(tmp_path)
    marker = tmp_path / "unmeasured-code-ran"
    original = ""
    if module != "sitecustomize":
        spec = importlib.util.find_spec(module)
        assert spec is not None and spec.origin is not None
        original = Path(spec.origin).read_text()
    (copy / f"{module}.py").write_text(
        f"{original}\nimport pathlib as _p\n_p.Path({str(marker)!r}).touch()\n"
    )
    state = await attest_copy(tmp_path, topic_prefix, copy)
    assert marker.exists(), "the planted code did not run: the test proves nothing"
    assert state is AttestationState.CONTRAINDICATED, "unmeasured code ran on an affirmed node"
