"""Rollouts through real agents, a real broker and real LiteRT: a canary of a slow version rolls
back by itself, a good version completes, operators pause, resume and undo.

Every version is the industrial model (rebuilt with a new description field, so a new digest: the
same network, republished). The bad version is made slow through the agents' labelled fault knob
(``fault_injection`` restricted to ``vib-cnn:2.0.0``), not by a heavier network: how fast a real
network runs depends on the machine and its load, and on a quiet machine a heavy model can stay
under the SLO. With identical networks the accuracy gate cannot fire either: only the latency gate
can, whatever the machine's speed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter

import flatbuffers
import grpc
import numpy as np
import pytest
from ai_edge_litert import schema_py_generated as schema
from conftest import MODEL_INT8, eventually, manifest, quiet_for

from accelerators.tflite_model import inspect_tflite
from edgeward.oip import grpc_predict_v2_pb2 as oip
from edgeward.oip import grpc_predict_v2_pb2_grpc as oip_grpc
from edgeward.v1 import api_pb2, api_pb2_grpc, events_pb2, events_pb2_grpc, node_pb2
from usecases.industrial.generator import make_dataset

pytestmark = [pytest.mark.broker]

#: The industrial int8 model's input, which every version here takes.
INPUT = inspect_tflite(MODEL_INT8.read_bytes()).inputs[0]
assert INPUT.quantization is not None
INPUT_SCALE, INPUT_ZERO_POINT = INPUT.quantization.scale, INPUT.quantization.zero_point
SLO_MS = 10.0
#: The delay the fault knob adds to every inference of the bad version: four times its SLO, so its
#: p95 is over the SLO however fast the machine is.
BAD_DELAY_MS = 4 * SLO_MS
#: The slow version, for the fault knob.
SLOW = {"inference_delay_ms": BAD_DELAY_MS, "models": ["vib-cnn:2.0.0"]}
#: The SLO in the test where every gate must pass: the traffic's own request timeout. A p95 over it
#: would mean requests timing out (which the error gate judges); a tighter figure would only say how
#: loaded the machine is.
GOOD_SLO_MS = 5000.0
RUNNING = node_pb2.REPLICA_PHASE_RUNNING
LIVE = (
    node_pb2.REPLICA_PHASE_PENDING,
    node_pb2.REPLICA_PHASE_DISPATCHED,
    node_pb2.REPLICA_PHASE_LOADING,
    RUNNING,
)


def rebuilt(data: bytes, note: str) -> bytes:
    """The same network with another description: a new artifact (digest) of an identical model."""
    model = schema.ModelT.InitFromObj(schema.Model.GetRootAs(data, 0))
    model.description = note
    builder = flatbuffers.Builder(len(data) + 1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def strategy(
    steps: str = "[25, 100]", pause: str = "2s", min_inferences: int = 10, slo_ms: float = SLO_MS
) -> str:
    return (
        f"  requirements: {{maxLatencyMs: {slo_ms:g}}}\n"
        f"  strategy: {{type: canary, steps: {steps}, pause: {pause}, maxUnavailable: 1, "
        f"gates: {{minInferences: {min_inferences}}}}}\n"
    )


class Traffic:
    """Real inference requests for ``vib-cnn`` (any version) to every node, from the use case's
    generator; the node picks among the versions it runs."""

    def __init__(self, endpoints: list[str]) -> None:
        x, _ = make_dataset(4, seed=11)
        q = np.clip(np.round(x / INPUT_SCALE) + INPUT_ZERO_POINT, -128, 127).astype(np.int8)
        self._inputs = [row[None] for row in q]
        self._endpoints = endpoints
        self._task: asyncio.Task | None = None
        self.answered = 0
        self.failures: Counter[str] = Counter()  # gRPC status of failed requests

    async def __aenter__(self) -> Traffic:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _run(self) -> None:
        channels = [grpc.aio.insecure_channel(e) for e in self._endpoints]
        stubs = [oip_grpc.GRPCInferenceServiceStub(c) for c in channels]
        try:
            i = 0
            while True:
                x = self._inputs[i % len(self._inputs)]
                request = oip.ModelInferRequest(
                    model_name="vib-cnn",
                    inputs=[
                        oip.ModelInferRequest.InferInputTensor(
                            name=INPUT.name, datatype="INT8", shape=x.shape
                        )
                    ],
                    raw_input_contents=[x.tobytes()],
                )
                results = await asyncio.gather(
                    *(s.ModelInfer(request, timeout=GOOD_SLO_MS / 1e3) for s in stubs), return_exceptions=True
                )
                self.answered += sum(not isinstance(r, BaseException) for r in results)
                self.failures.update(r.code().name for r in results if isinstance(r, grpc.aio.AioRpcError))
                i += 1
                await asyncio.sleep(0.02)
        finally:
            for channel in channels:
                await channel.close()


async def live_versions(api) -> list[str]:
    dep = await api.deployment("vib")
    return sorted(r.model_version for r in dep.status.replica_list if r.phase in LIVE)


async def rollout_status(channel: grpc.aio.Channel) -> api_pb2.RolloutStatus:
    stub = api_pb2_grpc.RolloutServiceStub(channel)
    return await stub.Status(api_pb2.RolloutRequest(deployment="vib"))


async def rollout_events(channel: grpc.aio.Channel) -> list[events_pb2.Notification]:
    stub = events_pb2_grpc.EventServiceStub(channel)
    flt = events_pb2.EventFilter(kind_prefix="rollout.", subject_prefix="deployment/vib")
    return list((await stub.List(events_pb2.ListEventsRequest(filter=flt, limit=100))).events)


async def test_bad_canary_rolls_back_by_itself(fleet):
    orch, agents, api = await fleet(nodes=2, fault_injection=SLOW)
    base = MODEL_INT8.read_bytes()
    await api.push(data=base, version="1.0.0")
    await api.push(data=rebuilt(base, "vibration cnn, republished 2.0.0"), version="2.0.0")
    await api.apply(manifest(replicas=4, extra=strategy()))
    channel = grpc.aio.insecure_channel(orch.address)
    try:
        await eventually(lambda: _running(api, 4, "1.0.0"), what="4 replicas of 1.0.0")
        started = time.monotonic()
        canaries_seen, fewest_running = 0, 4
        async with Traffic([a.inference_endpoint for a in agents]) as traffic:
            await api.apply(manifest(replicas=4, version="2.0.0", extra=strategy()))

            async def rolled_back() -> bool:
                nonlocal canaries_seen, fewest_running
                dep = await api.deployment("vib")
                live = [r for r in dep.status.replica_list if r.phase in LIVE]
                canaries_seen = max(canaries_seen, sum(r.model_version == "2.0.0" for r in live))
                fewest_running = min(fewest_running, sum(r.phase == RUNNING for r in live))
                return dep.status.rollout.state == api_pb2.ROLLOUT_STATE_ROLLED_BACK

            await eventually(rolled_back, timeout=25, what="the canary rolled back")
            await eventually(lambda: _running(api, 4, "1.0.0"), timeout=15, what="4 replicas of 1.0.0 again")
        assert traffic.answered > 0, traffic.failures
        elapsed = time.monotonic() - started
        status = await rollout_status(channel)
        assert status.reason == "rollout.gate.latency", status
        assert status.history[-1].verdict == "failed"
        assert status.history[-1].figures["p95_ms"] >= BAD_DELAY_MS, "the measured p95 of 2.0.0 has the delay"
        assert status.history[-1].figures["inferences"] >= 10
        assert (status.from_model, status.to_model) == ("vib-cnn:1.0.0", "vib-cnn:2.0.0")
        dep = await api.deployment("vib")
        assert dep.spec.model.version == "1.0.0", "the deployment is back on the last good version"
        assert dep.generation == status.rollback_generation == 3
        assert canaries_seen == 1, "step 1 of [25, 100] runs one canary of four"
        assert fewest_running >= 3, "maxUnavailable 1"
        kinds = [e.kind for e in await rollout_events(channel)]
        assert kinds[0] == "rollout.started" and "rollout.rollback" in kinds
        assert "rollout.completed" not in kinds
        print(f"rolled back {elapsed:.1f} s after the apply")
    finally:
        await channel.close()


async def test_good_version_completes_and_operator_can_pause_resume_and_undo(fleet):
    orch, agents, api = await fleet(nodes=2)
    base = MODEL_INT8.read_bytes()
    await api.push(data=base, version="1.0.0")
    await api.push(data=rebuilt(base, "vibration cnn, republished 1.1.0"), version="1.1.0")
    await api.push(data=rebuilt(base, "vibration cnn, republished 1.2.0"), version="1.2.0")
    await api.apply(
        manifest(replicas=4, extra=strategy(steps="[25, 50, 100]", pause="1s", slo_ms=GOOD_SLO_MS))
    )
    channel = grpc.aio.insecure_channel(orch.address)
    stub = api_pb2_grpc.RolloutServiceStub(channel)
    try:
        await eventually(lambda: _running(api, 4, "1.0.0"), what="4 replicas of 1.0.0")
        async with Traffic([a.inference_endpoint for a in agents]):
            await api.apply(
                manifest(
                    replicas=4,
                    version="1.1.0",
                    extra=strategy(steps="[25, 50, 100]", pause="1s", slo_ms=GOOD_SLO_MS),
                )
            )
            await eventually(
                lambda: _rollout_at(channel, api_pb2.ROLLOUT_STATE_PROGRESSING, step=2), what="step 2"
            )
            paused = await stub.Pause(api_pb2.RolloutRequest(deployment="vib", reason="hold for a look"))
            assert (paused.state, paused.reason) == (api_pb2.ROLLOUT_STATE_PAUSED, "rollout.paused.operator")
            await quiet_for(orch, 1.5)  # past the 1 s pause, then passes: a paused rollout does not advance
            held = await rollout_status(channel)
            assert (held.state, held.step) == (api_pb2.ROLLOUT_STATE_PAUSED, 2)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Pause(api_pb2.RolloutRequest(deployment="vib"))
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            await stub.Resume(api_pb2.RolloutRequest(deployment="vib"))
            await eventually(
                lambda: _rollout_at(channel, api_pb2.ROLLOUT_STATE_COMPLETED), timeout=25, what="completed"
            )
            await eventually(lambda: _running(api, 4, "1.1.0"), timeout=15, what="4 replicas of 1.1.0")
            done = await rollout_status(channel)
            assert [h.verdict for h in done.history] == ["passed", "passed", "passed"]
            assert all(h.figures["inferences"] >= 10 for h in done.history)
            assert all(h.figures["error_rate"] == 0 for h in done.history)
            assert all(h.figures["p95_ms"] <= GOOD_SLO_MS for h in done.history)
            # The accuracy proxy was measured against the stable version while both ran.
            assert "stable_confident_share" in done.history[0].figures

            # Undo a rollout in progress: straight back to 1.1.0, whose replicas never stopped.
            await api.apply(
                manifest(
                    replicas=4,
                    version="1.2.0",
                    extra=strategy(steps="[25, 50, 100]", pause="30s", slo_ms=GOOD_SLO_MS),
                )
            )
            await eventually(
                lambda: _rollout_at(channel, api_pb2.ROLLOUT_STATE_PROGRESSING, observing=True),
                what="observing",
            )
            stable_ids = {
                r.id
                for r in (await api.deployment("vib")).status.replica_list
                if r.model_version == "1.1.0" and r.phase == RUNNING
            }
            undone = await stub.Undo(api_pb2.RolloutRequest(deployment="vib", reason="wrong build"))
            assert (undone.state, undone.reason, undone.message) == (
                api_pb2.ROLLOUT_STATE_ROLLED_BACK,
                "rollout.undo",
                "wrong build",
            )
            await eventually(
                lambda: _running(api, 4, "1.1.0"), timeout=15, what="4 replicas of 1.1.0 after undo"
            )
            after = {r.id for r in (await api.deployment("vib")).status.replica_list if r.phase == RUNNING}
            assert stable_ids <= after, "the stable replicas kept running through the undo"
        kinds = [e.kind for e in await rollout_events(channel)]
        for kind in (
            "rollout.started",
            "rollout.progress",
            "rollout.paused",
            "rollout.completed",
            "rollout.rollback",
        ):
            assert kind in kinds
    finally:
        await channel.close()


async def _running(api, n: int, version: str) -> bool:
    dep = await api.deployment("vib")
    live = [r for r in dep.status.replica_list if r.phase in LIVE]
    return len(live) == n and all(r.phase == RUNNING and r.model_version == version for r in live)


async def _rollout_at(channel, state: int, step: int = 0, observing: bool = False) -> bool:
    try:
        status = await rollout_status(channel)
    except grpc.aio.AioRpcError:  # no rollout yet
        return False
    return (
        status.state == state
        and (not step or status.step == step)
        and (not observing or status.observing_since_unix_ms > 0)
    )
