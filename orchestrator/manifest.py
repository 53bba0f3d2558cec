"""Deployment manifests: Kubernetes-shaped YAML/JSON, validated at the API boundary.

Validation is pure (no IO, no store look-ups) and reports every problem with its field path, e.g.
``spec.replicas: Input should be greater than or equal to 0``. Whether the model exists is
checked afterwards by the service, which answers NOT_FOUND.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import InvalidManifest

MAX_MANIFEST_BYTES = 64 * 1024
NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
SEMVER_RE = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-[0-9A-Za-z.-]+)?$")
LABEL_RE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_./]{0,61}[A-Za-z0-9])?$")
_MEMORY_RE = re.compile(r"^(\d+)(Ki|Mi|Gi)?$")
_MEMORY_UNITS = {None: 1, "Ki": 1024, "Mi": 1024**2, "Gi": 1024**3}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, strict=False, frozen=True)


def _check_labels(value: dict[str, str]) -> dict[str, str]:
    for key, val in value.items():
        if not LABEL_RE.match(key):
            raise ValueError(f"label key {key!r} is not a valid label")
        if val and not LABEL_RE.match(val):
            raise ValueError(f"label value {val!r} for {key!r} is not a valid label")
    return value


class Metadata(_Strict):
    name: str = Field(description="Deployment name: lowercase letters, digits and '-', at most 63.")
    labels: dict[str, str] = Field(default_factory=dict, description="Free-form labels.")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not NAME_RE.match(value):
            raise ValueError("must be a DNS-1123 label (lowercase alphanumerics and '-', 1-63 chars)")
        return value

    _labels = field_validator("labels")(classmethod(lambda cls, v: _check_labels(v)))


class ModelRefSpec(_Strict):
    name: str = Field(description="Model name in the catalog.")
    version: str = Field(description="Semantic version of the model, e.g. 1.0.0.")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not NAME_RE.match(value):
            raise ValueError("must be a DNS-1123 label")
        return value

    @field_validator("version")
    @classmethod
    def _version(cls, value: str) -> str:
        if not SEMVER_RE.match(value):
            raise ValueError("must be a semantic version such as 1.0.0")
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
    def _memory(cls, value: str) -> str:
        if not _MEMORY_RE.match(str(value)):
            raise ValueError("must be a byte count with optional Ki/Mi/Gi suffix, e.g. 64Mi")
        return str(value)

    @property
    def memory_bytes(self) -> int:
        match = _MEMORY_RE.match(self.memory)
        assert match is not None
        return int(match.group(1)) * _MEMORY_UNITS[match.group(2)]


class SelectorSpec(_Strict):
    match_labels: dict[str, str] = Field(
        default_factory=dict, alias="matchLabels", description="Node labels that must all match."
    )
    _labels = field_validator("match_labels")(classmethod(lambda cls, v: _check_labels(v)))


class DeploymentSpecModel(_Strict):
    model: ModelRefSpec
    replicas: Annotated[int, Field(ge=0, le=10_000, strict=True)] = Field(
        description="Desired number of replicas."
    )
    requirements: RequirementsSpec = Field(default_factory=RequirementsSpec)
    selector: SelectorSpec = Field(default_factory=SelectorSpec)


class DeploymentManifest(_Strict):
    api_version: Literal["edgeward/v1"] = Field(alias="apiVersion")
    kind: Literal["Deployment"]
    metadata: Metadata
    spec: DeploymentSpecModel


def _path(loc: tuple[Any, ...]) -> str:
    aliases = {"api_version": "apiVersion", "max_latency_ms": "maxLatencyMs", "match_labels": "matchLabels"}
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            name = aliases.get(str(item), str(item))
            parts.append(("." if parts else "") + name)
    return "".join(parts) or "(root)"


def parse_manifest(text: str | bytes) -> DeploymentManifest:
    """Parse and validate one manifest document (YAML or JSON)."""
    if isinstance(text, bytes):
        if len(text) > MAX_MANIFEST_BYTES:
            raise InvalidManifest([("(root)", f"manifest larger than {MAX_MANIFEST_BYTES} bytes")])
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as err:
            raise InvalidManifest([("(root)", "manifest is not UTF-8 text")]) from err
    if len(text.encode("utf-8")) > MAX_MANIFEST_BYTES:
        raise InvalidManifest([("(root)", f"manifest larger than {MAX_MANIFEST_BYTES} bytes")])
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise InvalidManifest([("(root)", f"not valid YAML: {str(err).splitlines()[0]}")]) from err
    if not isinstance(data, dict):
        raise InvalidManifest(
            [("(root)", "manifest must be a mapping with apiVersion, kind, metadata, spec")]
        )
    try:
        return DeploymentManifest.model_validate(data)
    except ValidationError as err:
        raise InvalidManifest([(_path(e["loc"]), e["msg"]) for e in err.errors()]) from err


def manifest_to_json(manifest: DeploymentManifest) -> str:
    return json.dumps(manifest.model_dump(by_alias=True, mode="json"), sort_keys=True)
