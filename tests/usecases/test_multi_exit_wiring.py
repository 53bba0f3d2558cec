"""The automotive multi-exit model's moving parts below the end-to-end tests: the int8 hand-off
between stages (real LiteRT outputs) and the orchestrator's wiring plan of running stages."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from accelerators.base import ModelArtifact
from accelerators.cpu_litert import CpuLitertBackend, CpuLitertConfig
from edgeward.security.authz import MODEL
from edgeward.v1 import node_pb2
from node_agent.multiexit import dequantize, requantize, stage_outputs
from orchestrator.fleet import Fleet
from orchestrator.manifest import parse_manifest
from orchestrator.multiexit import PipelineRouter, plan
from orchestrator.phases import Phase
from orchestrator.store import DeploymentRecord, ReplicaChange, ReplicaRecord, SqlStore
from usecases import model_path
from usecases.automotive.generator import Sign, preprocess, synthesize
from usecases.workloads import manifests


@pytest.fixture
def stages():
    backend = CpuLitertBackend(CpuLitertConfig(energy_counter=None))
    handles = [
        backend.load(
            ModelArtifact.from_bytes(f"s{k}", "1", model_path("automotive", "int8", stage=k).read_bytes())
        )
        for k in (1, 2)
    ]
    yield backend, handles
    backend.close()


def test_int8_hand_off_rescales_features_between_stages(stages):
    backend, (s1, s2) = stages
    _, features = stage_outputs(s1.outputs)
    target = s2.inputs[0]
    assert features is not None and features.quantization != target.quantization  # 0.119045 vs 0.118743
    image = preprocess(synthesize(Sign.STOP, 0.8, np.random.default_rng(3)))
    q1 = backend.infer(s1, [image[None]]).outputs[features.name]
    q2 = requantize(q1, features.quantization, target)
    assert q2.dtype == np.int8 and q2.shape == tuple(target.shape)
    real = dequantize(q1, features)
    inside = real < (127 - target.quantization.zero_point) * target.quantization.scale  # not clipped
    # Each element keeps its real value within half a step of the target scale ...
    error = np.abs(dequantize(q2, target) - real)[inside]
    assert error.max() <= target.quantization.scale / 2 + 1e-6
    # Handing the integers on unchanged would be off by up to
    # 255 * (0.119045 - 0.118743), more than half a step at the top of the range.
    every = np.arange(-128, 128, dtype=np.int8)
    naive = np.abs(dequantize(every, target) - dequantize(every, features))
    assert naive.max() > target.quantization.scale / 2
    rescaled = requantize(every, features.quantization, target)
    t = target.quantization
    top = dequantize(every, features) <= (127 - t.zero_point) * t.scale  # representable, not clipped
    assert (np.abs(dequantize(rescaled, target) - dequantize(every, features))[top]).max() <= (
        target.quantization.scale / 2 + 1e-6
    )
    # The second stage runs on it.
    assert backend.infer(s2, [q2]).outputs


def _records(selector_nodes: dict[str, list[str]], phase: Phase = Phase.RUNNING):
    deps, reps = [], []
    for text in manifests("automotive"):
        m = parse_manifest(text)
        deps.append(DeploymentRecord(m.metadata.name, 1, m, 0, 0))
        for i, node in enumerate(selector_nodes.get(m.metadata.name, [])):
            reps.append(
                ReplicaRecord(
                    f"{m.metadata.name}-{i}",
                    m.metadata.name,
                    1,
                    m.spec.model.name,
                    "1.0.0",
                    phase,
                    0,
                    node_id=node,
                )
            )
    return deps, reps


def test_plan_wires_local_stages_and_hands_off_to_the_stronger_node():
    endpoints = {"low": "127.0.0.1:1001", "big": "127.0.0.1:1002"}
    deps, reps = _records({"sign-stage1": ["low"], "sign-stage2": ["big"], "sign-stage3": ["big"]})
    wanted, problems = plan(deps, reps, endpoints)
    assert problems == {}
    (low,) = wanted["low"]
    assert low.name == "sign-classifier"
    assert [(s.model_name, s.endpoint) for s in low.stages] == [
        ("sign-stage1", ""),
        ("sign-stage2", endpoints["big"]),
        ("sign-stage3", endpoints["big"]),
    ]
    assert [s.threshold for s in low.stages] == [0.98, 0.69, 0.0]
    assert [s.endpoint for s in wanted["big"][0].stages] == [endpoints["low"], "", ""]


def test_plan_refuses_incomplete_models_with_a_reason():
    endpoints = {"a": "127.0.0.1:1"}
    deps, reps = _records({"sign-stage1": ["a"], "sign-stage2": ["a"]})
    wanted, problems = plan(deps, reps, endpoints)
    assert wanted == {} and problems == {"sign-classifier": "stage 3 (sign-stage3) has no running replica"}
    deps, reps = _records({"sign-stage1": ["a"], "sign-stage2": ["a"], "sign-stage3": ["a"]}, Phase.LOADING)
    assert plan(deps, reps, endpoints)[0] == {}
    deps, reps = _records({"sign-stage1": ["a"], "sign-stage2": ["a"], "sign-stage3": ["a"]})
    assert plan(deps[1:], reps, endpoints)[1] == {"sign-classifier": "stages [2, 3] are not 1..2"}


class _CountingStore(SqlStore):
    """A real store that remembers which replicas were listed (None: all of them)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.listed: list[str | None] = []

    def list_replicas(self, deployment=None):
        self.listed.append(deployment)
        return super().list_replicas(deployment)


def test_the_wiring_pass_reads_only_the_stage_deployments_replicas(tmp_path):
    """Twice a second the router reads what it wires: every replica of the fleet took the store's
    thread for a tenth of a second at 10,000 replicas, nearly all of deployments without stages."""
    store = _CountingStore(tmp_path)
    try:
        deps, reps = _records({"sign-stage1": ["a"], "sign-stage2": ["b"], "sign-stage3": ["b"]})
        (industrial,) = [parse_manifest(text) for text in manifests("industrial")]
        for manifest in [d.manifest for d in deps] + [industrial]:
            store.put_deployment(manifest, 0)
        plain = [
            ReplicaRecord(
                f"vib-{i}", industrial.metadata.name, 1, "vibration", "1.0.0", Phase.RUNNING, 0, node_id="a"
            )
            for i in range(50)
        ]
        store.apply_replica_changes(ReplicaChange(r) for r in reps + plain)
        store.claim_owner(MODEL, "sign-classifier", "team/automotive")  # the first stage's Apply claims it
        store.claim_owner(MODEL, "sign-stage2", "team/automotive")
        fleet = Fleet()
        for node, port in (("a", 1001), ("b", 1002)):
            fleet.view(node).hello = node_pb2.Hello(inference_endpoint=f"127.0.0.1:{port}")
        sent: dict[str, node_pb2.Command] = {}

        async def publish(node: str, cmd: node_pb2.Command) -> None:
            sent[node] = cmd

        async def db(fn):
            return fn()

        asyncio.run(PipelineRouter(store, db, fleet, publish).sync())
        assert sorted(store.listed) == ["sign-stage1", "sign-stage2", "sign-stage3"]  # never None
        assert sorted(sent) == ["a", "b"]
        (pipeline,) = sent["a"].pipelines.pipelines
        assert [s.endpoint for s in pipeline.stages] == ["", "127.0.0.1:1002", "127.0.0.1:1002"]
        assert pipeline.owner_team == "automotive"  # nodes serve it to that team only (and operators)
        assert [s.owner_team for s in pipeline.stages] == ["", "automotive", ""]
    finally:
        store.close()
