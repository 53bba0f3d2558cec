"""Fuzzing the loaders: deployment manifests (only InvalidManifest, with field paths), the
orchestrator and agent config files (only their ConfigError types), and the .tflite container
checks (only AcceleratorError subclasses, here InvalidModel)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import yaml
from fuzz_budget import FUZZ, mutated
from hypothesis import given
from hypothesis import strategies as st

from accelerators.base import AcceleratorError
from accelerators.tflite_model import inspect_tflite, inspect_tflite_isolated
from node_agent.config import AgentConfigError, load_agent_config
from orchestrator.config import ConfigError, load_config
from orchestrator.errors import InvalidManifest
from orchestrator.manifest import parse_manifest
from usecases import model_path

MANIFEST = """apiVersion: edgeward/v1
kind: Deployment
metadata: {name: vib, labels: {usecase: industrial}}
spec:
  model: {name: vib-cnn, version: 1.0.0}
  replicas: 3
  requirements: {accelerators: [cpu-litert], maxLatencyMs: 50, memory: 16Mi, attestation: software}
  selector: {matchLabels: {zone: edge-a}}
"""
ORCHESTRATOR = """state_dir: state/orchestrator
grpc_bind: 127.0.0.1:50051
broker: {url: null, embedded_port: 0, topic_prefix: edgeward/v1, max_payload: 262144, node_rate: 50}
node_timeout_s: 15
attestation: {challenge_interval_s: 30, verifier: {result_ttl_s: 90}}
"""
AGENT = """node_id: node-1
labels: {zone: edge-a}
broker: {url: "mqtt://127.0.0.1:1883"}
accelerators: [{kind: cpu-litert, options: {num_threads: 1}}]
power: {idle_w: 2.7, active_w: 6.4}
heartbeat_s: 5
telemetry_buffer: 512
attestation_lease_s: 90
"""
TFLITE = model_path("industrial", "int8").read_bytes()

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20), st.binary(max_size=8)
)
yaml_values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=20,
)


def _tree_edits(seed_text: str):
    """The seed document with one value anywhere in it replaced by an arbitrary YAML value."""
    seed = yaml.safe_load(seed_text)

    @st.composite
    def edit(draw: st.DrawFn) -> str:
        doc = yaml.safe_load(seed_text)
        node = doc
        while isinstance(node, dict) and node:
            key = draw(st.sampled_from(sorted(node, key=str)))
            if not isinstance(node[key], dict) or draw(st.booleans()):
                node[key] = draw(yaml_values)
                break
            node = node[key]
        return yaml.safe_dump(doc)

    assert seed is not None
    return edit()


def _texts(seed_text: str):
    return st.one_of(
        st.text(max_size=300),
        mutated(seed_text.encode()).map(lambda b: b.decode("utf-8", "replace")),
        _tree_edits(seed_text),
    )


@FUZZ
@given(text=st.one_of(_texts(MANIFEST), st.binary(max_size=200)))
def test_manifest_loader_raises_only_invalid_manifest(text):
    try:
        parse_manifest(text)
    except InvalidManifest as err:
        assert err.errors and all(path and reason for path, reason in err.errors)  # noqa: PT017


@FUZZ
@given(text=_texts(ORCHESTRATOR))
def test_orchestrator_config_loader_raises_only_config_error(text):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "orchestrator.yaml"
        path.write_text(text, errors="replace")
        try:
            load_config(path)
        except ConfigError as err:
            assert str(err)  # noqa: PT017


@FUZZ
@given(text=_texts(AGENT))
def test_agent_config_loader_raises_only_agent_config_error(text):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "node.yaml"
        path.write_text(text, errors="replace")
        try:
            load_agent_config(path)
        except AgentConfigError as err:
            assert str(err)  # noqa: PT017


@FUZZ
@given(
    data=st.one_of(
        mutated(TFLITE), st.binary(max_size=64), st.binary(max_size=8).map(lambda b: b[:4] + b"TFL3" + b)
    )
)
def test_tflite_checks_raise_only_accelerator_errors(data):
    """As a push inspects: in a child process, since a crafted file can crash the TFLite runtime (a
    segmentation fault here once took the whole test run with it); refused, never a crash here."""
    try:
        info = inspect_tflite_isolated(data)
    except AcceleratorError as err:
        assert err.event_id  # noqa: PT017
    else:
        assert info.size == len(data)


def test_seed_documents_load():
    """The seeds are valid, so the mutations start from documents that get deep into validation."""
    parse_manifest(MANIFEST)
    inspect_tflite(TFLITE)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "o.yaml").write_text(ORCHESTRATOR)
        (Path(tmp) / "n.yaml").write_text(AGENT)
        load_config(Path(tmp) / "o.yaml")
        load_agent_config(Path(tmp) / "n.yaml")
