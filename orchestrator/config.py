"""Orchestrator configuration: typed, unknown keys rejected, validated without IO."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

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

from attestation.enrollment import EnrollmentPolicy
from attestation.service import VerifierConfig
from edgeward.security.config import SecurityConfig, is_loopback, with_broker_tls
from edgeward.validation import problems

from .catalog.config import CatalogConfig
from .errors import OrchestratorError
from .scheduler.settings import SchedulerConfig


class ConfigError(OrchestratorError):
    pass


class JetStreamConfig(BaseModel):
    """The NATS JetStream stream that replicas share the fleet's statuses and telemetry through
    (``broker.ingest: jetstream``; docs/scale-out.md, "Ingest")."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    urls: list[str] = Field(
        min_length=1,
        description="nats://host:port (or tls://) of the NATS servers' client ports; the client fails over "
        "between them.",
    )
    stream_replicas: Annotated[int, Field(ge=1, le=5)] = Field(
        3, description="Copies JetStream keeps of the stream (3 on a three-server cluster; 1 on one server)."
    )
    ack_wait_s: Annotated[float, Field(ge=1, le=300)] = Field(
        5.0,
        description="A message that a replica took and did not acknowledge (it died before its merge into "
        "the store committed) goes to another replica after this long.",
    )
    max_age_s: Annotated[float, Field(ge=60, le=7 * 86400)] = Field(
        3600.0, description="Messages that no replica took for this long (all of them down) are dropped."
    )

    @field_validator("urls")
    @classmethod
    def _nats_urls(cls, urls: list[str]) -> list[str]:
        for url in urls:
            scheme, sep, rest = url.partition("://")
            if scheme not in ("nats", "tls") or not sep or not rest or "@" in rest:
                raise ValueError(
                    f"{url!r}: expected nats://host:port or tls://host:port (credentials are not taken "
                    "in the URL)"
                )
        return urls


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
    event_topic_levels: bool = Field(
        False,
        description="Publish each event on {prefix}/events/<kind with '/' for '.'> (events/rollout/progress) "
        "instead of {prefix}/events/<kind>: NATS's MQTT gateway refuses '.' in topics.",
    )
    ingest: Literal["all", "shared", "jetstream"] = Field(
        "all",
        description="Who hears the nodes' statuses and telemetry (the heartbeat stream): 'all' (every replica "
        "hears every node: one replica, the default), 'shared' (MQTT shared subscriptions "
        "$share/edgeward/...: each message reaches one replica; Mosquitto, EMQX, ...) or 'jetstream' (a "
        "JetStream stream and durable consumer that the replicas share: NATS). Shared ingest needs "
        "PostgreSQL (state.url): replicas merge what they hear into it (docs/scale-out.md).",
    )
    jetstream: JetStreamConfig | None = Field(
        None, description="The NATS JetStream source (ingest: jetstream)."
    )
    max_payload: Annotated[int, Field(ge=1024, le=64 * 1024 * 1024)] = Field(
        256 * 1024, description="Payloads larger than this are dropped and counted."
    )
    node_rate: Annotated[float, Field(gt=0, le=1_000_000)] = Field(
        50.0,
        description="Messages per second each node may publish on average; the excess is dropped and "
        "counted (wire.rate.exceeded) before it is decoded.",
    )
    node_burst: Annotated[int, Field(ge=1, le=1_000_000)] = Field(
        500, description="Messages a node may publish at once above node_rate (a reconnect's replay)."
    )
    ingest_queue: Annotated[int, Field(ge=16, le=10_000_000)] = Field(
        20_000,
        description="MQTT messages the ingest inbox holds. Beyond it QoS 0 telemetry is shed (counted in "
        "edgeward_mqtt_shed_total) and QoS 1 messages are held back at the broker (backpressure), never dropped.",
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
    enrollment: EnrollmentPolicy = Field(
        EnrollmentPolicy.TOKEN_OR_EK,
        description="What approves a node's first enrollment: 'token' (a one-time token from "
        "'edgeward pki token NODE'), 'ek' (a TPM EK certificate chaining to ek_ca_file), or 'token-or-ek'.",
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


class MitigationConfig(BaseModel):
    """What the orchestrator orders a node to do about a source that raised ``alert.slowdown``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(True, description="Send mitigations to the node (off: alert only).")
    rate_limit_rps: Annotated[float, Field(ge=0, le=1e6)] = Field(
        5.0, description="Requests per second the offending source keeps on that node; 0: no rate limit."
    )
    latency_budget_ms: Annotated[float, Field(ge=0, le=60_000)] = Field(
        1.0,
        description="Deadline-aware forced exit for the offending source: the node stops at the most "
        "confident exit reached before the next stage would overrun this budget; 0: no forced exit.",
    )


class SlowdownConfig(BaseModel):
    """The slowdown-attack detector on multi-exit models (orchestrator/detectors.py)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(True, description="Watch the early-exit fraction of every multi-exit model.")
    learn_requests: Annotated[int, Field(ge=20, le=10_000_000)] = Field(
        200, description="Requests of a model, fleet-wide, from which its clean early-exit rate is learned."
    )
    collapse: Annotated[float, Field(gt=0, lt=1)] = Field(
        0.4, description="Relative drop of the early-exit rate to detect (0.4: to 60 % of the clean rate)."
    )
    threshold: Annotated[float, Field(gt=0, le=1000)] = Field(
        12.0, description="CUSUM alarm level; sets the false-alert rate (bench/slowdown_detection.py)."
    )
    min_requests: Annotated[int, Field(ge=1, le=100_000)] = Field(
        5, description="Telemetry windows with fewer requests of a stream are not tested."
    )
    baselines: dict[
        Annotated[str, Field(min_length=1, max_length=253)], Annotated[float, Field(gt=0, lt=1)]
    ] = Field(
        default_factory=dict,
        description="Clean early-exit rates the operator pins, per multi-exit model (its model card's, "
        "e.g. {sign: 0.7}): the detector is armed with it at once instead of learning it from the "
        "first learn_requests requests, which whoever sends them sets (docs/security.md).",
    )
    mitigation: MitigationConfig = Field(default_factory=MitigationConfig)


class KeyEncryptionConfig(BaseModel):
    """Where the key-encryption key of the model data keys lives (`edgeward.security.keywrap`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    provider: str = Field(
        "file",
        description="'file' (a 0600 key file per KEK in a 0700 directory) or a provider registered under "
        "the entry point group edgeward.kek_providers (a KMS, PKCS#11 token or TPM).",
    )
    dir: Path | None = Field(
        None,
        description="file provider: the KEK directory; default <state_dir>/kek (better: another volume).",
    )
    options: dict[str, Any] = Field(default_factory=dict, description="Settings of another provider.")

    def open(self, state_dir: Path) -> Any:
        """The `DataKeys` of this configuration (reads or creates the KEK: IO)."""
        from edgeward.security.keywrap import DataKeys, open_provider

        options = {**self.options, "dir": self.dir} if self.provider == "file" else dict(self.options)
        return DataKeys(open_provider(self.provider, options, state_dir))


class StateConfig(BaseModel):
    """Where the store lives: SQLite under ``state_dir`` (the default) or PostgreSQL, which several
    orchestrator replicas can share (docs/scale-out.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: SecretStr | None = Field(
        None,
        description="PostgreSQL store: postgresql://user@host:port/dbname (the password can come from "
        "PGPASSWORD or a libpq passfile rather than this file; it is never logged). Unset: SQLite under "
        "state_dir.",
    )
    pool_size: Annotated[int, Field(ge=1, le=100)] = Field(
        5, description="PostgreSQL connections this process keeps open at most."
    )
    connect_timeout_s: Annotated[float, Field(gt=0, le=300)] = Field(
        10.0, description="How long to wait for a PostgreSQL connection (at start and from the pool)."
    )
    lease_ttl_s: Annotated[float, Field(ge=0.5, le=60)] = Field(
        3.0,
        description="PostgreSQL: how long the leader lease of the replicas lasts without a renewal; a "
        "replica whose leader died takes over after about this long (docs/scale-out.md).",
    )

    @field_validator("url")
    @classmethod
    def _postgres_url(cls, url: SecretStr | None) -> SecretStr | None:
        if url is not None:
            from .sql.engine import parse_postgres_url  # SQLAlchemy only where a store is configured

            parse_postgres_url(url.get_secret_value())  # the error never repeats the URL
        return url


class TeamQuotaConfig(BaseModel):
    """What one team (a team certificate's callers) may hold at once; operators are not limited."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    deployments: Annotated[int, Field(ge=0, le=1_000_000)] = Field(
        200, description="Deployments a team may hold; an Apply that would create one more is refused."
    )
    replicas: Annotated[int, Field(ge=0, le=10_000_000)] = Field(
        20_000,
        description="Replicas the deployments of a team may ask for in all; an Apply that would take "
        "the sum beyond it is refused (one team's three Applies made 30,000 replicas, and every "
        "reconcile pass of the fleet slower).",
    )


class OrchestratorConfig(BaseModel):
    """Settings of one orchestrator process."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    state_dir: Path = Field(
        Path("state/orchestrator"),
        description="Where the SQLite store and its artifacts live (unless state.url), and the verifier's "
        "signing key and enrollment tokens.",
    )
    state: StateConfig = Field(
        default_factory=StateConfig, description="The store's engine: SQLite (default) or PostgreSQL."
    )
    grpc_bind: str = Field("127.0.0.1:50051", description="host:port of the gRPC API; port 0 picks one.")
    artifact_bind: str | None = Field(
        None,
        description="host:port of the artifact server, which serves nodes their sealed model artifacts on "
        "threads of its own (so a busy control loop does not hold a fleet's downloads); port 0 picks one. "
        "Unset: the gRPC API's host, a free port.",
    )
    advertise: str | None = Field(
        None,
        description="host:port that nodes use to download artifacts; defaults to the artifact server's "
        "bound address.",
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
        5.0,
        description="How long a command the node has not acted on waits, from when the broker took "
        "it, before it is sent again; each further resend of the same replica's command waits twice "
        "as long, up to 4x.",
    )
    metrics_bind: str | None = Field(
        None,
        description="host:port of the Prometheus /metrics endpoint; unset: no endpoint. Outside loopback it "
        "needs 'security' and serves HTTPS to operator and orchestrator certificates of the fleet CA.",
    )
    max_grpc_message: Annotated[int, Field(ge=1024 * 1024, le=512 * 1024 * 1024)] = Field(
        4 * 1024 * 1024,
        description="Largest gRPC request message accepted (model pushes stream 256 KiB chunks); "
        "larger ones are refused before they are decoded.",
    )
    attestation: AttestationConfig = Field(default_factory=AttestationConfig)
    key_encryption: KeyEncryptionConfig = Field(
        default_factory=KeyEncryptionConfig,
        description="Key-encryption key of the model data keys stored in the database (docs/security.md).",
    )
    slowdown: SlowdownConfig = Field(
        default_factory=SlowdownConfig, description="Slowdown-attack detection and mitigation."
    )
    catalog: CatalogConfig = Field(
        default_factory=CatalogConfig,
        description="Model catalog: trusted publisher keys, require_signatures, wipe deadline, misuse alerts "
        "(docs/lifecycle.md).",
    )
    scheduler: SchedulerConfig = Field(
        default_factory=SchedulerConfig,
        description="Placement profile, operator-defined profiles, SLO rescheduling (docs/scheduler.md).",
    )
    team_quota: TeamQuotaConfig = Field(
        default_factory=TeamQuotaConfig,
        description='Deployments and replicas one team may hold (docs/security.md, "Limits on input").',
    )
    security: SecurityConfig | None = Field(
        None,
        description="Mutual TLS (gRPC and MQTT), roles and the audit log (docs/security.md). Unset: plaintext, "
        "allowed on loopback addresses only (the local demo), and said so loudly at startup.",
    )

    @model_validator(mode="before")
    @classmethod
    def _broker_tls(cls, data: object) -> object:
        """With ``security``, an external broker is mqtts:// and uses the orchestrator's certificate."""
        if isinstance(data, dict) and data.get("security") is not None:
            security = data["security"]
            if isinstance(security, dict):
                security = SecurityConfig.model_validate(security)
            broker = data.get("broker")
            if isinstance(broker, BaseModel):
                broker = broker.model_dump(exclude_unset=True)
            if broker is None or isinstance(broker, dict):
                url_given = broker is not None and broker.get("url") is not None
                completed = with_broker_tls(broker, security, None)
                # The embedded broker (no url) is configured from ``security`` when it starts.
                if url_given:
                    data = {**data, "broker": completed}
        return data

    @model_validator(mode="after")
    def _plaintext_on_loopback_only(self) -> OrchestratorConfig:
        if self.security is None:
            for field, bind in (
                ("grpc_bind", self.grpc_bind),
                ("artifact_bind", self.artifact_bind),
                ("broker.embedded_bind", self.broker.embedded_bind),
                ("metrics_bind", self.metrics_bind),
            ):
                if bind is None:
                    continue
                if not is_loopback(bind):
                    raise ValueError(
                        f"{field}: {bind!r} is not a loopback address; plaintext is for the local "
                        "demo only (set 'security', docs/security.md)"
                    )
        return self

    @model_validator(mode="after")
    def _shared_ingest(self) -> OrchestratorConfig:
        b = self.broker
        if b.ingest != "all" and self.state.url is None:
            raise ValueError(
                f"broker.ingest: {b.ingest!r} needs state.url (PostgreSQL): the replicas sharing the ingest "
                "merge what they hear into the store they share (docs/scale-out.md)"
            )
        if b.ingest == "shared" and b.url is None:
            raise ValueError(
                "broker.ingest: 'shared' needs an external broker with shared subscriptions (broker.url); "
                "the embedded broker has none"
            )
        if (b.ingest == "jetstream") != (b.jetstream is not None):
            raise ValueError("broker.jetstream: set it with broker.ingest: 'jetstream', and only then")
        if (b.ingest == "jetstream" or b.event_topic_levels) and "." in b.topic_prefix:
            raise ValueError(
                f"broker.topic_prefix: {b.topic_prefix!r} has a '.', which NATS (ingest: jetstream, "
                "event_topic_levels) cannot carry in a topic: NATS maps '/' to '.'"
            )
        return self


def load_config(
    path: Path | None, *, broker: dict[str, object] | None = None, **overrides: object
) -> OrchestratorConfig:
    """The config at ``path`` (or the defaults) with top-level ``overrides`` and ``broker`` fields
    (command-line flags) applied before it is validated as a whole: a flag passes every check the
    file does (an ``mqtt://`` URL with ``security`` set is refused either way)."""
    data: dict = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise ConfigError(f"cannot read {path}: {err}") from err
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    data.update({k: v for k, v in overrides.items() if v is not None})
    if broker := {k: v for k, v in (broker or {}).items() if v is not None}:
        if not isinstance(data.get("broker", {}), dict):
            raise ConfigError(f"{path}: broker must be a mapping")
        data["broker"] = {**data.get("broker", {}), **broker}
    try:
        return OrchestratorConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError("invalid orchestrator config: " + problems(err)) from err
