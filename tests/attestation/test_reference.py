"""Reference values as data: strict YAML, named composable checks that explain themselves."""

from __future__ import annotations

import pytest

from attestation.errors import ReferenceValuesError
from attestation.eventlog import MeasurementEvent
from attestation.reference import CHECKS, AllOf, CheckContext, ReferenceValues

GOOD = "a" * 64
OTHER = "b" * 64

YAML = f"""
apiVersion: edgeward/v1
kind: ReferenceValues
version: 4
required: [agent.code]
components:
  agent.code: {{digests: [{GOOD}]}}
  model.*: {{digests: [{OTHER}], on_mismatch: warning}}
pcrs:
  16: [{GOOD}]
"""


def ctx(ref: ReferenceValues, *events: tuple[str, str], pcr16: str = GOOD) -> CheckContext:
    log = [MeasurementEvent(16, c, bytes.fromhex(d), "") for c, d in events]
    return CheckContext(log, {16: bytes.fromhex(pcr16)}, ref.compiled)


def test_round_trip_and_lookup():
    ref = ReferenceValues.from_yaml(YAML)
    assert ref.version == 4
    assert ReferenceValues.from_yaml(ref.to_yaml()) == ref
    assert ref.lookup("model.vib-cnn")[0] == {bytes.fromhex(OTHER)}
    assert ref.lookup("agent.other") is None


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        (YAML + "extra: 1\n", "extra"),
        (YAML.replace("version: 4", "version: 0"), "version"),
        (YAML.replace(f"[{GOOD}]}}", "[XYZ]}"), "digests"),
        (YAML + "checks: [no_such_check]\n", "unknown checks"),
        ("- just a list\n", "mapping"),
        ("key: [unclosed\n", "reference values"),
    ],
    ids=["unknown-key", "version", "digest", "check", "list", "yaml"],
)
def test_invalid_files_are_refused(text, fragment):
    with pytest.raises(ReferenceValuesError) as err:
        ReferenceValues.from_yaml(text)
    assert err.value.reason == "reference.file.invalid"
    assert fragment in str(err.value)


def test_each_check_explains_itself():
    ref = ReferenceValues.from_yaml(YAML)
    context = ctx(ref, ("agent.config", GOOD), ("model.x", GOOD), pcr16=OTHER)
    why = {name: [(r.id, r.subject) for r in check.why_not(context)] for name, check in CHECKS.items()}
    assert why == {
        "known_components": [("reference.component.unknown", "agent.config")],
        "digests_match": [("reference.digest.mismatch", "model.x")],
        "required_components": [("reference.component.missing", "agent.code")],
        "pcr_values": [("reference.pcr.unexpected", "pcr16")],
    }
    assert all(r.message for r in AllOf(CHECKS.values()).why_not(context))
    assert ref.why_not(ctx(ref, ("agent.code", GOOD), ("model.x", OTHER))) == []


def test_checks_are_chosen_by_name():
    ref = ReferenceValues.from_yaml(YAML + "checks: [digests_match]\n")
    assert ref.why_not(ctx(ref, ("agent.config", GOOD), pcr16=OTHER)) == []


def test_allow_only_widens():
    ref = ReferenceValues.from_yaml(YAML)
    wider = ref.allow("model.vib-cnn", GOOD)
    assert wider.lookup("model.vib-cnn")[0] == {bytes.fromhex(GOOD), bytes.fromhex(OTHER)}
    assert wider.lookup("model.vib-cnn")[1] == ref.lookup("model.x")[1]  # severity kept
    assert ref.lookup("model.vib-cnn")[0] == {bytes.fromhex(OTHER)}  # the original is unchanged


def test_reference_values_from_a_known_good_node():
    events = [
        MeasurementEvent(16, "agent.code", bytes.fromhex(GOOD), ""),
        MeasurementEvent(23, "model.m", bytes.fromhex(OTHER), ""),
    ]
    ref = ReferenceValues.from_events(events, version=2, pin_pcrs={16: bytes.fromhex(OTHER)})
    assert ref.required == ["agent.code"]
    assert ref.why_not(ctx(ref, ("agent.code", GOOD), ("model.m", OTHER), pcr16=OTHER)) == []
    assert [r.id for r in ref.why_not(ctx(ref, ("agent.code", GOOD)))] == ["reference.pcr.unexpected"]
