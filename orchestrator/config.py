"""Orchestrator configuration: typed, unknown keys rejected, validated without IO."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from attestation.service import VerifierConfig

from .errors import OrchestratorError


class ConfigError(OrchestratorError):
    pass


class BrokerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str | None = Field(
        None,
        description="External broker, mqtt://host:port or mqtts://host:port. "
        "Unset: start the embedded broker in-process.",
    )
    embedded_bind: str = Field("127.0.0.1", description="Address of the embedded broker's listener.")
    embedded_port: Annotated[int, Field(ge=0, le=65535)] = Field(
        0, description="Port of the embedded broker; 0 picks a free one."
    )
    ca_file: Path | None = Field(None, description="CA bundle for mqtts://.")
    cert_file: Path | None = Field(None, description="Client certificate for mqtts:// (mTLS).")
    key_file: Path | None = Field(None, description="Client key for mqtts:// (mTLS).")
    topic_prefix: str = Field("edgeward/v1", description="Prefix of every edgeward topic.")
    max_payload: Annotated[int, Field(ge=1024, le=64 * 1024 * 1024)] = Field(
        256 * 1024, description="Payloads larger than this are dropped and counted."
    )


class AttestationConfig(BaseModel):
    """The verifier the orchestrator runs (always on: no valid attestation result, no model)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    reference: Path | None = Field(
        None,
        description="Reference values (YAML, kind: ReferenceValues). Unset: the built-in policy, which "
        "pins the agent code to this release's and models to the catalog, and leaves config and "
        "accelerators unpinned (docs/attestation.md).",
    )
    challenge_interval_s: Annotated[float, Field(gt=0, le=3600)] = Field(
        30.0, description="How often every online node is re-attested (also on connect and on demand)."
    )
    ek_ca_file: Path | None = Field(
        None, description="PEM bundle of the CAs that issue TPM endorsement key certificates."
    )
    signing_key: Path | None = Field(
        None,
        description="Ed25519 key (PEM) that signs results; default <state_dir>/attestation/verifier.pem.",
    )
    verifier: VerifierConfig = Field(
        default_factory=VerifierConfig,
        description="Verifier settings: result_ttl_s, challenge_ttl_s, require_ek_certificate, PCRs, caps.",
    )

    @model_validator(mode="after")
    def _renewed_in_time(self) -> AttestationConfig:
        if self.challenge_interval_s >= self.verifier.result_ttl_s:
            raise ValueError(
                f"challenge_interval_s ({self.challenge_interval_s}) must be below verifier.result_ttl_s "
                f"({self.verifier.result_ttl_s}), or every result expires before it is renewed"
            )
        return self


class OrchestratorConfig(BaseModel):
    """Settings of one orchestrator process."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    state_dir: Path = Field(Path("state/orchestrator"), description="Where the store and artifacts live.")
    grpc_bind: str = Field("127.0.0.1:50051", description="host:port of the gRPC API; port 0 picks one.")
    advertise: str | None = Field(
        None, description="host:port that nodes use to download artifacts; defaults to the bound address."
    )
    broker: BrokerConfig = Field(default_factory=BrokerConfig)
    node_timeout_s: Annotated[float, Field(gt=0, le=3600)] = Field(
        15.0, description="A node silent for this long is considered lost."
    )
    reconcile_interval_s: Annotated[float, Field(gt=0, le=60)] = Field(
        1.0, description="Period of the reconcile loop (it also runs on every relevant event)."
    )
    dispatch_timeout_s: Annotated[float, Field(gt=0, le=3600)] = Field(
        60.0, description="A dispatched replica the node never reports is failed after this long."
    )
    resend_interval_s: Annotated[float, Field(gt=0, le=600)] = Field(
        5.0, description="How often an unacknowledged command is sent again."
    )
    metrics_bind: str | None = Field(
        None, description="host:port of the Prometheus /metrics endpoint; unset: no endpoint."
    )
    max_grpc_message: Annotated[int, Field(ge=1024 * 1024, le=512 * 1024 * 1024)] = Field(
        64 * 1024 * 1024, description="Largest gRPC message accepted (model pushes are streamed in chunks)."
    )
    attestation: AttestationConfig = Field(default_factory=AttestationConfig)


def load_config(path: Path | None, **overrides: object) -> OrchestratorConfig:
    data: dict = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise ConfigError(f"cannot read {path}: {err}") from err
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return OrchestratorConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(
            "invalid orchestrator config: "
            + "; ".join(".".join(map(str, e["loc"])) + ": " + e["msg"] for e in err.errors())
        ) from err
