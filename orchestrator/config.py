"""Orchestrator configuration: typed, unknown keys rejected, validated without IO."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

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
