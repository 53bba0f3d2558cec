"""Manifest validation: every bad manifest is refused with the field path and the reason."""

import pytest

from orchestrator.errors import InvalidManifest
from orchestrator.manifest import parse_manifest

GOOD = """
apiVersion: edgeward/v1
kind: Deployment
metadata: {name: vib, labels: {usecase: industrial}}
spec:
  model: {name: vibration-cnn, version: 1.0.0}
  replicas: 2
  requirements: {accelerators: [cpu-litert], maxLatencyMs: 40, memory: 16Mi, attestation: software}
  selector: {matchLabels: {zone: edge-a}}
"""


def test_good_manifest_parses_with_units_and_aliases():
    m = parse_manifest(GOOD)
    assert m.metadata.name == "vib"
    assert m.spec.replicas == 2
    assert m.spec.requirements.memory_bytes == 16 * 1024 * 1024
    assert m.spec.requirements.max_latency_ms == 40
    assert m.spec.selector.match_labels == {"zone": "edge-a"}


def _without(text: str, line_start: str) -> str:
    return "\n".join(line for line in text.splitlines() if not line.strip().startswith(line_start))


@pytest.mark.parametrize(
    ("text", "path", "reason"),
    [
        (_without(GOOD, "replicas:"), "spec.replicas", "Field required"),
        (_without(GOOD, "model:"), "spec.model", "Field required"),
        (_without(GOOD, "apiVersion"), "apiVersion", "Field required"),
        (GOOD.replace("replicas: 2", "replicas: -1"), "spec.replicas", "greater than or equal to 0"),
        (GOOD.replace("replicas: 2", "replicas: two"), "spec.replicas", "valid integer"),
        (GOOD.replace("replicas: 2", "replicas: '2'"), "spec.replicas", "valid integer"),
        (GOOD.replace("replicas: 2", "replicas: 2.5"), "spec.replicas", "valid integer"),
        (GOOD.replace("kind: Deployment", "kind: Pod"), "kind", "'Deployment'"),
        (GOOD.replace("apiVersion: edgeward/v1", "apiVersion: v2"), "apiVersion", "'edgeward/v1'"),
        (GOOD.replace("name: vib,", "name: Vib_1,"), "metadata.name", "DNS-1123"),
        (GOOD.replace("version: 1.0.0", "version: latest"), "spec.model.version", "semantic version"),
        (GOOD.replace("memory: 16Mi", "memory: lots"), "spec.requirements.memory", "byte count"),
        (
            GOOD.replace("maxLatencyMs: 40", "maxLatencyMs: -3"),
            "spec.requirements.maxLatencyMs",
            "greater than",
        ),
        (
            GOOD.replace("attestation: software", "attestation: trusted"),
            "spec.requirements.attestation",
            "'tpm2'",
        ),
        (GOOD.replace("replicas: 2", "replicas: 2\n  colour: blue"), "spec.colour", "Extra inputs"),
        (
            GOOD.replace("accelerators: [cpu-litert]", "accelerators: cpu"),
            "spec.requirements.accelerators",
            "valid list",
        ),
        ("- just\n- a list\n", "(root)", "mapping"),
        ("spec: [unclosed", "(root)", "not valid YAML"),
        ("", "(root)", "mapping"),
        (b"\xff\xfe\x00garbage", "(root)", "UTF-8"),
        ("a: " + "x" * 70_000, "(root)", "larger than"),
    ],
)
def test_bad_manifest_names_field_and_reason(text, path, reason):
    with pytest.raises(InvalidManifest) as info:
        parse_manifest(text)
    paths = dict(info.value.errors)
    assert path in paths, info.value.errors
    assert reason in paths[path]


def test_every_problem_is_reported_at_once():
    text = GOOD.replace("replicas: 2", "replicas: -1").replace("kind: Deployment", "kind: Job")
    with pytest.raises(InvalidManifest) as info:
        parse_manifest(text)
    assert {p for p, _ in info.value.errors} == {"spec.replicas", "kind"}


def test_bounds_of_new_input_do_not_make_a_stored_manifest_unreadable(tmp_path):
    """Versions and memory are bounded for what comes in (Apply); a deployment stored before the
    bounds must still read back, or every reconcile pass, List and Watch of every tenant fails."""
    from orchestrator.manifest import MAX_MEMORY_BYTES, DeploymentManifest, manifest_to_json
    from orchestrator.store import SqlStore

    legacy = (
        "apiVersion: edgeward/v1\nkind: Deployment\nmetadata: {name: old}\n"
        "spec:\n  model: {name: m, version: 1.0.2026120601}\n  replicas: 1\n"
        f"  requirements: {{memory: '{'9' * 5000}'}}\n"
    )
    with pytest.raises(InvalidManifest) as refused:
        parse_manifest(legacy)
    paths = {path for path, _ in refused.value.errors}
    assert paths == {"spec.model.version", "spec.requirements.memory"}
    stored = DeploymentManifest.model_validate(
        {
            "apiVersion": "edgeward/v1",
            "kind": "Deployment",
            "metadata": {"name": "old"},
            "spec": {
                "model": {"name": "m", "version": "1.0.2026120601"},
                "replicas": 1,
                "requirements": {"memory": "9" * 5000},
            },
        }
    )
    assert stored.spec.requirements.memory_bytes == MAX_MEMORY_BYTES + 1
    store = SqlStore(tmp_path / "orch")
    try:
        store.put_deployment(stored, 1)
        [record] = store.list_deployments()
        assert record.manifest.spec.model.version == "1.0.2026120601"
        assert DeploymentManifest.model_validate_json(manifest_to_json(stored)) == stored
    finally:
        store.close()


def test_memory_in_other_scripts_digits_is_refused_as_input_and_read_back_when_stored():
    from orchestrator.manifest import DeploymentManifest

    text = (
        "apiVersion: edgeward/v1\nkind: Deployment\nmetadata: {name: d}\n"
        "spec:\n  model: {name: m, version: 1.0.0}\n  replicas: 1\n  requirements: {memory: '\u0666\u0664Mi'}\n"
    )
    with pytest.raises(InvalidManifest) as refused:
        parse_manifest(text)
    assert [path for path, _ in refused.value.errors] == ["spec.requirements.memory"]
    stored = DeploymentManifest.model_validate_json(
        parse_manifest(text.replace("\u0666\u0664", "64"))
        .model_dump_json(by_alias=True)
        .replace('"64Mi"', '"\u0666\u0664Mi"')
    )
    assert stored.spec.requirements.memory_bytes == 64 * 1024**2
