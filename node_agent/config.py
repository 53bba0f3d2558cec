"""Node agent configuration (``edgeward agent -c node.yaml``): typed, unknown keys rejected."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from attestation.attesters import AttesterConfig, SoftwareAttesterConfig
from edgeward.mqtt.topics import validate_node_id
from edgeward.security.config import AgentTlsConfig, is_loopback, with_broker_tls
from edgeward.validation import problems
from edgeward.wire import MAX_HELLO_ACCELERATORS


class AgentConfigError(Exception):
    pass


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AgentBrokerConfig(_Strict):
    url: str = Field("mqtt://127.0.0.1:1883", description="mqtt://host:port or mqtts://host:port.")
    ca_file: Path | None = Field(None, description="CA bundle for mqtts://.")
    cert_file: Path | None = Field(None, description="This node's client certificate (mTLS).")
    key_file: Path | None = Field(None, description="This node's client key (mTLS).")
    topic_prefix: str = Field("edgeward/v1", description="Prefix of every edgeward topic.")
    max_payload: Annotated[int, Field(ge=1024, le=64 * 1024 * 1024)] = Field(
        256 * 1024, description="Commands larger than this are dropped and counted."
    )
    nats: bool = Field(
        False,
        description="The broker is NATS's MQTT gateway, which cannot carry '.' in a topic ('/' becomes '.'): "
        "node_id and topic_prefix are checked for it when the config is loaded.",
    )


class PowerProfile(_Strict):
    idle_w: Annotated[float, Field(ge=0)] = Field(2.0, description="Board power when idle, watts.")
    active_w: Annotated[float, Field(gt=0)] = Field(6.0, description="Board power at full load, watts.")


class AcceleratorConfig(_Strict):
    kind: str = Field("cpu-litert", description="Registered backend kind.")
    options: dict[str, Any] = Field(default_factory=dict, description="Backend-specific settings.")


class FaultInjection(_Strict):
    """Deliberate faults, for tests and demos of rescheduling; everything defaults to off.

    The delay is added to every served inference on the node's accelerators (inside the time the
    node measures and reports), not to the node's own model profiles: it stands for an accelerator
    that slowed down after the node was profiled (thermal throttling, a noisy neighbour). The
    answers' acknowledgement delay stands for a broker that acknowledges late (as an overloaded one
    does); the download delay for a slow link to the artifact server (a load that takes seconds).
    """

    inference_delay_ms: Annotated[float, Field(ge=0, le=60_000)] = Field(
        0.0, description="Fault injection: fixed delay added to every served inference, milliseconds."
    )
    inference_jitter_ms: Annotated[float, Field(ge=0, le=60_000)] = Field(
        0.0, description="Fault injection: uniform random delay of 0..this added on top, milliseconds."
    )
    answer_ack_delay_ms: Annotated[float, Field(ge=0, le=600_000)] = Field(
        0.0,
        description="Fault injection: the node's answers to commands (evidence, events such as "
        "command acknowledgements) wait this much longer for the broker's PUBACK, milliseconds.",
    )
    download_delay_ms: Annotated[float, Field(ge=0, le=600_000)] = Field(
        0.0,
        description="Fault injection: each artifact download starts this much later (a slow link to "
        "the artifact server), milliseconds.",
    )
    models: list[Annotated[str, Field(min_length=1, pattern=r"^[^:\s]+(:[^:\s]+)?$")]] = Field(
        default_factory=list,
        description="Fault injection: only inferences of these models are slowed, each 'name' (every "
        "version) or 'name:version'; empty slows every model.",
    )

    def applies_to(self, name: str, version: str) -> bool:
        """Whether an inference of ``name``:``version`` gets the delay."""
        return not self.models or name in self.models or f"{name}:{version}" in self.models


class AgentConfig(_Strict):
    """Settings of one node agent."""

    node_id: str = Field(description="Unique node id: lowercase letters, digits, '.', '_' or '-'.")
    labels: dict[str, str] = Field(default_factory=dict, description="Labels the scheduler can select on.")
    hardware_profile: str = Field("generic", description="Name of the board's hardware profile.")
    broker: AgentBrokerConfig = Field(default_factory=AgentBrokerConfig)
    accelerators: list[AcceleratorConfig] = Field(
        default_factory=lambda: [AcceleratorConfig()],
        min_length=1,
        max_length=MAX_HELLO_ACCELERATORS,
        description=f"Backends to bring up (at most {MAX_HELLO_ACCELERATORS}: the orchestrator refuses a hello with more).",
    )
    power: PowerProfile = Field(default_factory=PowerProfile)
    memory_bytes: Annotated[int, Field(ge=0)] = Field(512 * 1024**2, description="Memory offered to models.")
    max_replicas: Annotated[int, Field(ge=1, le=1024)] = Field(8, description="Most replicas this node runs.")
    heartbeat_s: Annotated[float, Field(gt=0, le=300)] = Field(
        5.0, description="Interval of status and telemetry messages."
    )
    inference_bind: str = Field(
        "127.0.0.1:0",
        description="host:port of the inference server; port 0 picks one. Outside loopback it needs 'tls' "
        "(the API then speaks mutual TLS with the node's certificate).",
    )
    state_dir: Path = Field(Path("state/agent"), description="Local cache of sealed model artifacts.")
    attestation: AttesterConfig = Field(
        default_factory=SoftwareAttesterConfig,
        description="The node's attester: 'software' (default; a weaker tier) or 'tpm2' with its TCTI. "
        "Its key_dir defaults to <state_dir>/<node_id>/attestation.",
    )
    enrollment_token: SecretStr | None = Field(
        None,
        description="The operator's one-time approval of this node ('edgeward pki token NODE'), presented at "
        "its first enrollment; unneeded once enrolled, or for a TPM whose EK certificate the orchestrator "
        "trusts (policy token-or-ek). Never logged; measured as '**********'.",
    )
    profile_alternatives: bool = Field(
        True,
        description="Profile each model this node runs also on its other accelerators that can run it, "
        "once, off the serving path, so the scheduler can compare them by measurement (energy moves).",
    )
    fault_injection: FaultInjection = Field(
        default_factory=FaultInjection,
        description="Deliberate faults for tests and demos (off by default); see FaultInjection.",
    )
    telemetry_buffer: Annotated[int, Field(ge=1, le=100_000)] = Field(
        512,
        description="Telemetry samples kept while the broker is unreachable (oldest dropped first, "
        "counted) and replayed on reconnect.",
    )
    telemetry_replay_rate: Annotated[float, Field(gt=0, le=10_000)] = Field(
        20.0,
        description="Buffered samples replayed per second after a reconnect (below the orchestrator's "
        "per-node rate limit).",
    )
    attestation_lease_s: Annotated[float, Field(gt=0, le=86_400)] = Field(
        90.0,
        description="Edge autonomy: models keep serving without the orchestrator for this long after "
        "the node last answered an attestation challenge; keep it at or below the verifier's "
        "result_ttl_s. Then they stop (reason agent.attestation.expired) until it is attested again.",
    )

    @model_validator(mode="before")
    @classmethod
    def _attestation_defaults(cls, data: Any) -> Any:
        """Default the attester to ``software`` and its key directory to one per node under state_dir
        (several agents may share a state_dir; they must never share keys)."""
        if not isinstance(data, dict):
            return data
        att = data.get("attestation") or {}
        if isinstance(att, BaseModel):
            att = {k: getattr(att, k) for k in att.model_fields_set | {"kind"}}
        if isinstance(att, dict):
            att = {"kind": "software", **att}
            if "key_dir" not in att:
                state_dir = Path(data.get("state_dir") or "state/agent")
                att["key_dir"] = state_dir / str(data.get("node_id", "")) / "attestation"
        return {**data, "attestation": att}

    tls: AgentTlsConfig | None = Field(
        None,
        description="This node's certificate (docs/security.md): MQTT defaults to mqtts://127.0.0.1:8883 with it "
        "(plaintext mqtt:// is refused) and artifact downloads use mutual TLS. Unset: plaintext (local demo).",
    )

    @model_validator(mode="before")
    @classmethod
    def _broker_tls(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("tls") is None:
            return data
        tls = data["tls"]
        if isinstance(tls, dict):
            tls = AgentTlsConfig.model_validate(tls)
        broker = data.get("broker")
        if isinstance(broker, BaseModel):
            broker = broker.model_dump(exclude_unset=True)
        return {**data, "broker": with_broker_tls(broker, tls, "mqtts://127.0.0.1:8883")}

    @model_validator(mode="after")
    def _plaintext_on_loopback_only(self) -> AgentConfig:
        if self.tls is None and not is_loopback(self.inference_bind):
            raise ValueError(
                f"inference_bind: {self.inference_bind!r} is not a loopback address; without 'tls' the "
                "inference API is plaintext and unauthenticated, for the local demo only (docs/security.md)"
            )
        return self

    @field_validator("node_id")
    @classmethod
    def _node_id(cls, value: str) -> str:
        validate_node_id(value)
        return value

    @model_validator(mode="after")
    def _no_dots_for_nats(self) -> AgentConfig:
        if self.broker.nats:
            for field, value in (
                ("node_id", self.node_id),
                ("broker.topic_prefix", self.broker.topic_prefix),
            ):
                if "." in value:
                    raise ValueError(
                        f"{field}: {value!r} has a '.', which NATS's MQTT gateway cannot carry in a topic "
                        "(broker.nats: it maps '/' to '.'); use '-' or '_'"
                    )
        return self


def load_agent_config(path: Path, *, broker_url: str | None = None) -> AgentConfig:
    """The agent config at ``path``; ``broker_url`` (a command-line flag) replaces ``broker.url``
    before the whole is validated, so it passes every check the file's would (TLS, NATS names)."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise AgentConfigError(f"cannot read {path}: {err}") from err
    if not isinstance(data, dict):
        raise AgentConfigError(f"{path}: top level must be a mapping")
    if broker_url:
        if not isinstance(data.get("broker", {}), dict):
            raise AgentConfigError(f"{path}: broker must be a mapping")
        data["broker"] = {**data.get("broker", {}), "url": broker_url}
    try:
        return AgentConfig.model_validate(data)
    except ValidationError as err:
        raise AgentConfigError(f"{path}: " + problems(err)) from err
