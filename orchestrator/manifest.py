"""Deployment manifests: Kubernetes-shaped YAML/JSON, validated at the API boundary.

Validation is pure (no IO, no store look-ups) and reports every problem with its field path, e.g.
``spec.replicas: Input should be greater than or equal to 0``. Whether the model exists is
checked afterwards by the service, which answers NOT_FOUND.
"""

from __future__ import annotations

import itertools
import json
import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .errors import InvalidManifest
from .strict_yaml import MAX_DEPTH, YamlRefused, load_yaml

MAX_MANIFEST_BYTES = 64 * 1024
NAME_RE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
# What new input may say (a push, an Apply): bounded parts, ASCII digits only (``\d`` also takes
# other scripts' digits, which int() reads); the store orders versions by their numbers, and a version
# of 4,401 digits made that fail for its model. What was stored before these bounds (read back from
# the store, named by a wipe) only has to match SEMVER_STORED_RE: a stored deployment the store
# could not read back would stop every reconcile pass and List.
SEMVER_RE = re.compile(
    r"(0|[1-9][0-9]{0,8})\.(0|[1-9][0-9]{0,8})\.(0|[1-9][0-9]{0,8})(?:-[0-9A-Za-z.-]{1,32})?"
)
SEMVER_STORED_RE = re.compile(r"(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-[0-9A-Za-z.-]+)?")
#: The validation context of new input (parse_manifest): the bounds above apply.
INPUT = {"input": True}
LABEL_RE = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_./]{0,61}[A-Za-z0-9])?")
_MEMORY_RE = re.compile(r"(\d+)(Ki|Mi|Gi)?")  # new input: ASCII digits only (checked apart)
MAX_MEMORY_BYTES = 2**50  # 1 PiB: no edge node has it; a byte count far beyond broke uint64 fields
_MEMORY_UNITS = {None: 1, "Ki": 1024, "Mi": 1024**2, "Gi": 1024**3}


def _is_input(info: ValidationInfo) -> bool:
    return bool(info.context and info.context.get("input"))


def _bytes(match: re.Match[str]) -> int:
    digits = match.group(1).lstrip("0") or "0"
    if len(digits) > 16:  # int() of thousands of digits is slow, and refused past 4,300
        return MAX_MEMORY_BYTES + 1
    return min(int(digits) * _MEMORY_UNITS[match.group(2)], MAX_MEMORY_BYTES + 1)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, strict=False, frozen=True)


def _check_labels(value: dict[str, str]) -> dict[str, str]:
    for key, val in value.items():
        if not LABEL_RE.fullmatch(key):
            raise ValueError(f"label key {key!r} is not a valid label")
        if val and not LABEL_RE.fullmatch(val):
            raise ValueError(f"label value {val!r} for {key!r} is not a valid label")
    return value


class Metadata(_Strict):
    name: StrictStr = Field(description="Deployment name: lowercase letters, digits and '-', at most 63.")
    labels: dict[str, str] = Field(default_factory=dict, description="Free-form labels.")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not NAME_RE.fullmatch(value):
            raise ValueError("must be a DNS-1123 label (lowercase alphanumerics and '-', 1-63 chars)")
        return value

    _labels = field_validator("labels")(classmethod(lambda cls, v: _check_labels(v)))


class ModelRefSpec(_Strict):
    name: StrictStr = Field(description="Model name in the catalog.")
    version: StrictStr = Field(description="Semantic version of the model, e.g. 1.0.0.")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not NAME_RE.fullmatch(value):
            raise ValueError("must be a DNS-1123 label")
        return value

    @field_validator("version")
    @classmethod
    def _version(cls, value: str, info: ValidationInfo) -> str:
        if not (SEMVER_RE if _is_input(info) else SEMVER_STORED_RE).fullmatch(value):
            raise ValueError(
                "must be a semantic version such as 1.0.0 (parts of at most 9 digits, a pre-release of "
                "at most 32 characters)"
            )
        return value


class RequirementsSpec(_Strict):
    accelerators: list[str] = Field(
        default_factory=list, description="Acceptable accelerator backend kinds; empty means any."
    )
    max_latency_ms: Annotated[float, Field(ge=0, le=600_000)] = Field(
        0.0, alias="maxLatencyMs", description="Latency SLO on p95 in milliseconds; 0 means none."
    )
    memory: str = Field("0", description="Memory the replica needs, e.g. 64Mi.")
    attestation: Literal["none", "software", "tpm2"] = Field(
        "none", description="Minimum attestation tier a node must hold."
    )

    @field_validator("memory")
    @classmethod
    def _memory(cls, value: str, info: ValidationInfo) -> str:
        match = _MEMORY_RE.fullmatch(str(value))
        if not match:
            raise ValueError("must be a byte count with optional Ki/Mi/Gi suffix, e.g. 64Mi")
        if _is_input(info) and not match.group(1).isascii():
            raise ValueError("must be written with the digits 0-9")
        if _is_input(info) and (len(match.group(1)) > 16 or _bytes(match) > MAX_MEMORY_BYTES):
            raise ValueError(f"must be at most {MAX_MEMORY_BYTES} bytes (1 PiB)")
        return str(value)

    @property
    def memory_bytes(self) -> int:
        """The byte count, at most ``MAX_MEMORY_BYTES + 1`` (what a manifest stored before the bound
        says beyond it: no node has it, and a uint64 field takes it)."""
        match = _MEMORY_RE.fullmatch(self.memory)
        assert match is not None
        return _bytes(match)


class SelectorSpec(_Strict):
    match_labels: dict[str, str] = Field(
        default_factory=dict, alias="matchLabels", description="Node labels that must all match."
    )
    _labels = field_validator("match_labels")(classmethod(lambda cls, v: _check_labels(v)))


class MultiExitSpec(_Strict):
    """This deployment is one stage of a multi-exit model that nodes serve under ``pipeline``.

    Each stage is its own deployment, placed by the scheduler like any other (selectors put early
    stages on low-power nodes and later ones on stronger nodes); the orchestrator wires the
    running stages together (``orchestrator.multiexit``).
    """

    pipeline: StrictStr = Field(
        description="Name clients call on the node inference API for the whole model."
    )
    stage: Annotated[int, Field(ge=1, le=16, strict=True)] = Field(
        description="1-based position in the model."
    )
    threshold: Annotated[float, Field(gt=0, le=1)] | None = Field(
        None, description="Exit when the top probability reaches this; unset on the last stage."
    )

    @field_validator("pipeline")
    @classmethod
    def _pipeline(cls, value: str) -> str:
        if not NAME_RE.fullmatch(value):
            raise ValueError("must be a DNS-1123 label")
        return value


_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def duration_s(value: str) -> float:
    """Seconds of a validated duration such as ``30s``, ``500ms``, ``2m``."""
    match = _DURATION_RE.fullmatch(value)
    assert match is not None
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


def _check_duration(value: object, most_s: float) -> str:
    text = str(value)
    if not _DURATION_RE.fullmatch(text):
        raise ValueError("must be a duration such as 500ms, 30s, 2m or 1h")
    if duration_s(text) > most_s:
        raise ValueError(f"must be at most {most_s:.0f}s")
    return text


class GatesSpec(_Strict):
    """Health gates a rollout step must pass while it is observed (docs/lifecycle.md, Rollouts)."""

    max_error_rate: Annotated[float, Field(ge=0, le=1)] = Field(
        0.05,
        alias="maxErrorRate",
        description="Largest share of failed inferences of the new version during a step.",
    )
    max_latency_ms: Annotated[float, Field(ge=0, le=600_000)] = Field(
        0.0,
        alias="maxLatencyMs",
        description="Largest p95 latency of the new version; 0: the deployment's requirements.maxLatencyMs "
        "(no latency gate when both are 0).",
    )
    max_confidence_drop: Annotated[float, Field(ge=0, le=1)] = Field(
        0.2,
        alias="maxConfidenceDrop",
        description="Accuracy proxy: largest drop of the share of confident outputs (top-1 probability "
        ">= 0.8) of the new version below the stable version's, over the same window.",
    )
    min_inferences: Annotated[int, Field(ge=1, le=1_000_000, strict=True)] = Field(
        20,
        alias="minInferences",
        description="Inferences of the new version a step needs before its gates can pass.",
    )
    progress_deadline: str = Field(
        "10m",
        alias="progressDeadline",
        description="A step still short of minInferences this long after its replicas run pauses the "
        "rollout (reason rollout.gate.no_data).",
    )

    @field_validator("progress_deadline", mode="before")
    @classmethod
    def _deadline(cls, value: object) -> str:
        return _check_duration(value, 86_400)

    @property
    def progress_deadline_s(self) -> float:
        return duration_s(self.progress_deadline)


class StrategySpec(_Strict):
    """How a new generation replaces the running one: in canary steps or in rolling batches."""

    type: Literal["rolling", "canary"] = Field(
        description="canary: the new version takes `steps` percent of the replicas in turn; rolling: "
        "maxUnavailable replicas (at least 1) at a time."
    )
    steps: list[Annotated[int, Field(ge=1, le=100, strict=True)]] | None = Field(
        None,
        description="canary only: increasing percentages of the replicas on the new version, ending at "
        "100 (default [10, 50, 100]).",
    )
    pause: str = Field("30s", description="How long each step is observed through the gates.")
    max_unavailable: Annotated[int, Field(ge=0, le=10_000, strict=True)] = Field(
        1,
        alias="maxUnavailable",
        description="How many replicas below spec.replicas may be running during the update.",
    )
    gates: GatesSpec = Field(default_factory=GatesSpec)

    @field_validator("pause", mode="before")
    @classmethod
    def _pause(cls, value: object) -> str:
        return _check_duration(value, 86_400)

    @field_validator("steps")
    @classmethod
    def _steps(cls, value: list[int] | None) -> list[int] | None:
        if value is None:
            return None
        if not value or any(b <= a for a, b in itertools.pairwise(value)):
            raise ValueError("must be strictly increasing percentages")
        if value[-1] != 100:
            raise ValueError("must end at 100")
        return value

    @model_validator(mode="after")
    def _steps_for_canary(self) -> StrategySpec:
        if self.type == "rolling" and self.steps is not None:
            raise ValueError("steps are for type canary; a rolling update replaces maxUnavailable at a time")
        return self

    @property
    def pause_s(self) -> float:
        return duration_s(self.pause)

    @property
    def canary_steps(self) -> list[int]:
        return self.steps or [10, 50, 100]


class DeploymentSpecModel(_Strict):
    model: ModelRefSpec
    replicas: Annotated[int, Field(ge=0, le=10_000, strict=True)] = Field(
        description="Desired number of replicas."
    )
    requirements: RequirementsSpec = Field(default_factory=RequirementsSpec)
    selector: SelectorSpec = Field(default_factory=SelectorSpec)
    multi_exit: MultiExitSpec | None = Field(
        None, alias="multiExit", description="Set when the model is one stage of a multi-exit model."
    )
    strategy: StrategySpec | None = Field(
        None,
        description="How a changed template is rolled out (orchestrator.rollout); unset: every replica "
        "is replaced at once, without gates.",
    )


class DeploymentManifest(_Strict):
    api_version: Literal["edgeward/v1"] = Field(alias="apiVersion")
    kind: Literal["Deployment"]
    metadata: Metadata
    spec: DeploymentSpecModel


def _path(loc: tuple[Any, ...]) -> str:
    aliases = {
        "api_version": "apiVersion",
        "max_latency_ms": "maxLatencyMs",
        "match_labels": "matchLabels",
        "multi_exit": "multiExit",
        "max_unavailable": "maxUnavailable",
        "max_error_rate": "maxErrorRate",
        "max_confidence_drop": "maxConfidenceDrop",
        "min_inferences": "minInferences",
        "progress_deadline": "progressDeadline",
    }
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            name = aliases.get(str(item), str(item))
            parts.append(("." if parts else "") + name)
    return "".join(parts) or "(root)"


def parse_manifest(text: str | bytes) -> DeploymentManifest:
    """Parse and validate one manifest document (YAML or JSON) from an untrusted caller.

    The size is checked before anything is parsed; the YAML is plain data only, at most
    ``MAX_DEPTH`` levels deep (`orchestrator.strict_yaml`). CPU-bound: the API runs it off the loop.
    """
    if len(text) > MAX_MANIFEST_BYTES or (
        isinstance(text, str)
        and len(text) * 4 > MAX_MANIFEST_BYTES
        and len(text.encode()) > MAX_MANIFEST_BYTES
    ):
        raise InvalidManifest([("(root)", f"manifest.too_large: larger than {MAX_MANIFEST_BYTES} bytes")])
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as err:
            raise InvalidManifest([("(root)", "manifest.not_utf8: manifest is not UTF-8 text")]) from err
    try:
        data = load_yaml(text, max_depth=MAX_DEPTH)
    except YamlRefused as err:
        raise InvalidManifest([(err.path, str(err))]) from err
    if not isinstance(data, dict):
        raise InvalidManifest(
            [("(root)", "manifest must be a mapping with apiVersion, kind, metadata, spec")]
        )
    try:
        return DeploymentManifest.model_validate(data, context=INPUT)
    except ValidationError as err:
        raise InvalidManifest([(_path(e["loc"]), e["msg"]) for e in err.errors()]) from err


def manifest_to_json(manifest: DeploymentManifest) -> str:
    return json.dumps(manifest.model_dump(by_alias=True, mode="json"), sort_keys=True)
