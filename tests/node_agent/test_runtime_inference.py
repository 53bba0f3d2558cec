"""The agent runtime's inference accounting and its threads, on the real LiteRT backend: a caller's
bad input is not the model's error, a node takes a bounded number of inferences at once, and
inference runs on threads of its own, never ahead of the node's control work."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from accelerators.base import InvalidInput, ModelArtifact
from accelerators.cpu_litert import CpuLitertBackend, CpuLitertConfig
from node_agent.agent import NodeAgent
from node_agent.config import AgentConfig
from node_agent.inference_server import Overloaded
from node_agent.runtime import Runtime

MODEL = (
    Path(__file__).resolve().parents[2] / "usecases" / "industrial" / "models" / "vibration_cnn_f32.tflite"
)


def _pool_runner(pool: ThreadPoolExecutor):
    async def run(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(pool, partial(fn, *args))

    return run


async def test_bad_input_is_not_a_model_error_and_inferences_in_flight_are_bounded(tmp_path: Path) -> None:
    backend = CpuLitertBackend(CpuLitertConfig(energy_counter=None))
    handle = backend.load(ModelArtifact.from_bytes("m", "1", MODEL.read_bytes()))
    control, inference = ThreadPoolExecutor(1), ThreadPoolExecutor(1)
    release = threading.Event()
    runtime = Runtime(
        {"cpu-litert": backend},
        tmp_path / "models",
        _pool_runner(control),
        lambda: None,
        lambda spec, sealed: sealed,
        run_inference=_pool_runner(inference),
        max_in_flight=2,
    )
    try:
        spec = handle.inputs[0]
        good = {spec.name: np.zeros(spec.shape, np.float32)}
        await runtime.infer(backend, handle, good)
        with pytest.raises(InvalidInput):  # a caller's wrong shape (could fail another's canary)
            await runtime.infer(backend, handle, {spec.name: np.zeros((1, 3), np.float32)})
        snapshot = runtime.stats[("m", "1")].snapshot()
        assert (snapshot.count, snapshot.errors) == (1, 0)
        # Both inference slots held (the one inference thread blocked): the next is refused at once,
        # and the control threads are free meanwhile.
        inference.submit(release.wait)
        held = [asyncio.create_task(runtime.infer(backend, handle, good)) for _ in range(2)]
        await asyncio.sleep(0.05)
        with pytest.raises(Overloaded):
            await runtime.infer(backend, handle, good)
        assert await _pool_runner(control)(lambda: "control work runs") == "control work runs"
        release.set()
        await asyncio.gather(*held)
    finally:
        release.set()
        control.shutdown(wait=True)
        inference.shutdown(wait=True)
        backend.close()


async def test_an_agent_runs_inference_on_other_threads_than_its_control_work(tmp_path: Path) -> None:
    agent = NodeAgent(AgentConfig(node_id="n1", state_dir=tmp_path))
    try:
        inference = await agent.run_inference(lambda: threading.current_thread().name)
        control = await agent.run_blocking(lambda: threading.current_thread().name)
        assert inference.startswith("agent-n1-infer") and not control.startswith("agent-n1-infer")
    finally:
        agent._infer_pool.shutdown(wait=True)
        agent._pool.shutdown(wait=True)
        agent._profile_pool.shutdown(wait=True)
