"""Multi-exit models end to end: the automotive sign classifier's three stages deployed as their own
replicas on real agents (real broker, real LiteRT), wired by the orchestrator, served under one
name over the node inference API, split across nodes, and defended against slowdown traffic."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import Api, eventually

from edgeward.oip import grpc_predict_v2_pb2 as oip
from edgeward.oip import grpc_predict_v2_pb2_grpc as oip_grpc
from node_agent.agent import NodeAgent
from orchestrator.server import Orchestrator
from usecases import model_card
from usecases.automotive.multi_exit import MultiExitClassifier
from usecases.workloads import workload

pytestmark = [pytest.mark.broker]

DATA = Path(__file__).resolve().parents[2] / "usecases" / "automotive" / "data"
PIPELINE = "sign-classifier"


def stage_manifests(selectors: dict[int, str] | None = None) -> list[str]:
    """The committed automotive manifests, with the demo's zone selectors replaced."""
    out = []
    for part in workload("automotive").parts:
        text = part.manifest
        stage = part.multi_exit["stage"]
        for zone in ("edge-a", "edge-c"):
            text = text.replace(f"    matchLabels: {{zone: {zone}}}\n", "")
        if selectors:
            text = text.replace(
                "  selector:\n", f"  selector:\n    matchLabels: {{zone: {selectors[stage]}}}\n"
            )
        else:
            text = text.replace("  selector:\n", "")
        out.append(text)
    return out


@pytest.fixture
def cluster(fleet) -> Callable:
    """``await cluster(nodes, slowdown=...)``: the ``fleet`` fixture (agents n1 in zone a, n2 in
    zone b, ...) with that slowdown config and the automotive stages pushed."""

    async def start(nodes: int, slowdown: dict | None = None) -> tuple[Orchestrator, list[NodeAgent], Api]:
        orch, agents, api = await fleet(nodes, slowdown=slowdown)
        for part in workload("automotive").parts:
            await api.push(part.model_file, part.model_name, part.model_version)
        return orch, agents, api

    return start


async def serving(agent: NodeAgent, stub: oip_grpc.GRPCInferenceServiceStub) -> None:
    async def ready() -> bool:
        try:
            return (await stub.ModelReady(oip.ModelReadyRequest(name=PIPELINE))).ready
        except grpc.aio.AioRpcError:
            return False

    await eventually(ready, what=f"{PIPELINE} served on {agent.node_id}")


def request(image: np.ndarray, source: str = "", rid: str = "") -> oip.ModelInferRequest:
    x = image.astype(np.float32).reshape(1, 32, 32, 3) / 255.0
    req = oip.ModelInferRequest(
        model_name=PIPELINE,
        id=rid,
        inputs=[oip.ModelInferRequest.InferInputTensor(name="image", datatype="FP32", shape=[1, 32, 32, 3])],
        raw_input_contents=[x.tobytes()],
    )
    if source:
        req.parameters["source"].string_param = source
    return req


def answer(resp: oip.ModelInferResponse) -> tuple[int, int, bool]:
    """(class, exit, forced) of a multi-exit answer."""
    outputs = {t.name: raw for t, raw in zip(resp.outputs, resp.raw_output_contents, strict=True)}
    probs = np.frombuffer(outputs["exit_probs"], "<f4")
    exit_index = int(np.frombuffer(outputs["exit"], "<i4")[0])
    assert exit_index == resp.parameters["exit"].int64_param
    return int(np.argmax(probs)), exit_index, resp.parameters["forced_exit"].bool_param


async def test_partitioned_model_answers_like_the_reference_and_hands_off(cluster):
    orch, (n1, n2), api = await cluster(2)
    for text in stage_manifests({1: "a", 2: "b", 3: "b"}):
        await api.apply(text)
    images = np.concatenate([np.load(DATA / "clean_inputs.npy"), np.load(DATA / "slowdown_inputs.npy")])
    reference = MultiExitClassifier.from_card("int8")
    expected = [reference.classify(x.astype(np.float32) / 255.0) for x in images]
    async with grpc.aio.insecure_channel(n2.inference_endpoint) as channel:
        await serving(n2, oip_grpc.GRPCInferenceServiceStub(channel))  # the later stages are wired too
    async with grpc.aio.insecure_channel(n1.inference_endpoint) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        await serving(n1, stub)
        got = [answer(await stub.ModelInfer(request(x, "cam-1"), timeout=60)) for x in images]
    # Stage 1 on n1; stages 2 and 3 on n2, reached over n2's inference API with rescaled int8 features.
    assert [(c, e) for c, e, _ in got] == [(d.class_index, d.exit_index) for d in expected]
    exits = np.bincount([e for _, e, _ in got], minlength=4)[1:]
    assert exits[0] > 0 and exits[1:].sum() > 0
    assert n1.runtime.stats[("sign-stage1", "1.0.0")].count == len(images)
    assert ("sign-stage2", "1.0.0") not in n1.runtime.stats
    assert n2.runtime.stats[("sign-stage2", "1.0.0")].count == exits[1:].sum()
    assert n2.runtime.stats[("sign-stage3", "1.0.0")].count == exits[2]
    # n1 counts the requests that entered there, by source and exit; n2 counts none.
    (stats,) = n1.pipelines.exit_stats()
    assert (stats.model_name, stats.source, list(stats.exits)) == (PIPELINE, "cam-1", exits.tolist())
    assert n2.pipelines.exit_stats() == []


async def test_slowdown_traffic_raises_an_alert_and_is_mitigated(cluster):
    budget_ms, rate = 1e-3, 2.0  # a budget no second stage fits in: a forced exit is deterministic
    orch, (n1,), api = await cluster(
        1,
        slowdown={
            "learn_requests": 100,
            "mitigation": {"rate_limit_rps": rate, "latency_budget_ms": budget_ms},
        },
    )
    for text in stage_manifests():
        await api.apply(text)
    clean = np.load(DATA / "clean_inputs.npy")
    attack = np.load(DATA / "slowdown_inputs.npy")
    # The perturbations that do slow the model down: no confident first exit.
    reference = MultiExitClassifier.from_card("int8")
    attack = attack[[reference.classify(x.astype(np.float32) / 255.0).exit_index > 1 for x in attack]]
    assert len(attack) > 0
    refused: dict[str, int] = {"cam-1": 0, "cam-2": 0}
    answers: dict[str, list[tuple[int, int, bool]]] = {"cam-1": [], "cam-2": []}
    failures: list[tuple[grpc.StatusCode, str]] = []

    async def send(stub: oip_grpc.GRPCInferenceServiceStub, source: str, images: np.ndarray, stop) -> None:
        i = 0
        while not stop.is_set():
            try:
                resp = await stub.ModelInfer(request(images[i % len(images)], source), timeout=60)
                answers[source].append(answer(resp))
            except grpc.aio.AioRpcError as err:
                failures.append((err.code(), err.details() or ""))
                refused[source] += 1
            i += 1
            await asyncio.sleep(0.004)

    def alerts(kind: str) -> list:
        return [e for e in orch.events.since(0) if e.kind == kind]

    async with grpc.aio.insecure_channel(n1.inference_endpoint) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        await serving(n1, stub)
        stop_clean, stop_attack = asyncio.Event(), asyncio.Event()
        clean_task = asyncio.create_task(send(stub, "cam-1", clean, stop_clean))
        try:

            async def armed() -> bool:
                return PIPELINE in orch.slowdown.detectors

            await eventually(armed, what="the detector learned the clean rate")
            tested = len(answers["cam-1"])

            async def more_clean_windows() -> bool:
                return len(answers["cam-1"]) > tested + 150

            await eventually(more_clean_windows, what="clean traffic after arming")
            answered = len(answers["cam-1"])

            async def seen_by_the_detector() -> bool:  # windowed and observed in one step
                return orch.telemetry.exits.windowed(("n1", PIPELINE, "cam-1")) >= answered

            await eventually(seen_by_the_detector, what="the detector saw every clean request answered")
            assert alerts("alert.slowdown") == [], "clean traffic alone raised an alert"
            baseline = orch.slowdown.detectors[PIPELINE].baseline
            card = model_card("automotive")["slowdown"]["int8"]["clean"]["exit_distribution"]
            assert baseline > 1 - card[-1] - 0.1  # the clean crops leave early about as on the card

            attack_task = asyncio.create_task(send(stub, "cam-2", attack, stop_attack))
            try:

                async def alerted() -> bool:
                    return bool(alerts("alert.slowdown"))

                await eventually(alerted, what="alert.slowdown")
                (alert,) = alerts("alert.slowdown")
                assert alert.subject == "node/n1"
                assert (alert.attributes["node"], alert.attributes["model"], alert.attributes["source"]) == (
                    "n1",
                    PIPELINE,
                    "cam-2",
                )
                assert float(alert.attributes["early_fraction"]) < baseline
                (applied,) = alerts("mitigation.applied")
                assert applied.attributes["source"] == "cam-2" and applied.attributes["node"] == "n1"

                async def enforced() -> bool:
                    return ("sign-classifier", "cam-2") in n1.pipelines.mitigations and refused["cam-2"] > 20

                await eventually(enforced, what="the rate limit refusing cam-2")
                since, window_start = len(answers["cam-2"]), time.monotonic()
                await asyncio.sleep(2.0)
            finally:
                stop_attack.set()
                await attack_task
                window_end = time.monotonic()
        finally:
            stop_clean.set()
            await clean_task
    mitigated = answers["cam-2"][since:]
    # Admitted attack requests now stop at exit 1 (forced by the budget), at about the limited rate.
    assert mitigated and all(e == 1 and forced for _, e, forced in mitigated)
    window_s = window_end - window_start  # 2 s or more, as busy as the machine is
    assert len(mitigated) <= rate * window_s + 2
    # The clean source on the same node is neither limited nor forced.
    # Refused with a clear status naming the source and the model.
    assert {code for code, _ in failures} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert all(f"source 'cam-2' of model {PIPELINE!r} is limited to" in d for _, d in failures)
    assert refused["cam-1"] == 0 and not any(forced for _, _, forced in answers["cam-1"])
    assert [a.attributes["source"] for a in alerts("alert.slowdown")] == ["cam-2"]
    stats = {s.source: s for s in n1.pipelines.exit_stats()}
    assert stats["cam-2"].refused == refused["cam-2"] and stats["cam-2"].forced > 0
    assert stats["cam-1"].forced == 0 and stats["cam-1"].refused == 0
