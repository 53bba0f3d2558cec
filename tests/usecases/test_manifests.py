"""The use cases' deployment manifests: valid, consistent with the model cards, and what `edgeward up`
deploys (all three use cases, the automotive model as one deployment per stage)."""

from __future__ import annotations

import pytest

from orchestrator.manifest import parse_manifest
from usecases import CASES, model_card
from usecases.workloads import manifests, workloads


def test_up_deploys_all_three_use_cases():
    found = {w.case: w for w in workloads()}
    assert sorted(found) == sorted(CASES)
    assert [w.multi_exit for w in (found["industrial"], found["smart_home"])] == [False, False]
    auto = found["automotive"]
    assert auto.multi_exit and auto.target == "sign-classifier"
    assert auto.entry.deployment == "sign-stage1"
    for w in found.values():
        for part in w.parts:
            assert part.model_file.is_file()
            x = w.make_inputs(3, 7)
            assert len(x) == 3 and x.dtype.name == "float32"


@pytest.mark.parametrize("case", CASES)
def test_manifests_parse(case):
    for text in manifests(case):
        parse_manifest(text)


def test_automotive_stages_carry_the_card_thresholds():
    card = model_card("automotive")
    specs = [parse_manifest(text).spec for text in manifests("automotive")]
    by_stage = {s.multi_exit.stage: s for s in specs}
    assert sorted(by_stage) == [e["exit"] for e in card["exits"]]
    for e in card["exits"]:
        assert by_stage[e["exit"]].multi_exit.threshold == e["threshold"]
    assert {s.multi_exit.pipeline for s in specs} == {"sign-classifier"}
    # Partitioned: the first stage on the low-power zone, the later ones together on the strong one.
    zones = {k: s.selector.match_labels["zone"] for k, s in by_stage.items()}
    assert zones[1] != zones[2] == zones[3]


def test_multi_exit_spec_is_validated_with_field_paths():
    from orchestrator.errors import InvalidManifest

    bad = (
        manifests("automotive")[0]
        .replace("stage: 1", "stage: 0")
        .replace("threshold: 0.98", "threshold: 1.5")
    )
    with pytest.raises(InvalidManifest) as err:
        parse_manifest(bad)
    paths = [p for p, _ in err.value.errors]
    assert paths == ["spec.multiExit.stage", "spec.multiExit.threshold"]
