"""The ``security`` section of the orchestrator config and the ``tls`` section of the node config.

Validated without IO; the files are read when the servers start. Give ``pki_dir`` (the fleet CA
directory, ``edgeward pki init``) and every path defaults to its layout; give files to override.
"""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from edgeward.security.tls import TlsFiles

log = logging.getLogger(__name__)

PLAINTEXT_WARNING = (
    "PLAINTEXT MODE: the gRPC API and MQTT are neither encrypted nor authenticated; anyone who can "
    "reach %s can control this fleet. This is for the local demo only; production sets "
    "'security' (docs/security.md)."
)


class SecurityConfig(BaseModel):
    """Mutual TLS for the gRPC API and MQTT, authorization by role, and the audit log."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    pki_dir: Path | None = Field(
        None, description="Fleet CA directory; the file paths below default to its layout."
    )
    identity: str = Field(
        "main", description="Name of this orchestrator's certificate: <pki_dir>/orchestrator/<identity>.crt."
    )
    ca_file: Path = Field(description="CA bundle that client and broker certificates must chain to.")
    cert_file: Path = Field(description="This orchestrator's certificate (gRPC server, MQTT client).")
    key_file: Path = Field(description="Its private key (keep it 0600).")
    crl_file: Path | None = Field(
        None, description="CRL; revoked client certificates are refused (re-read when the file changes)."
    )
    audit_log: Path | None = Field(
        None, description="Append-only audit log (JSON lines); default <state_dir>/security/audit.jsonl."
    )

    @model_validator(mode="before")
    @classmethod
    def _from_pki_dir(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not data.get("pki_dir"):
            return data
        pki = Path(data["pki_dir"])
        name = data.get("identity") or "main"
        defaults = {
            "ca_file": pki / "ca.crt",
            "cert_file": pki / "orchestrator" / f"{name}.crt",
            "key_file": pki / "orchestrator" / f"{name}.key",
            "crl_file": pki / "crl.pem",
        }
        return {**defaults, **{k: v for k, v in data.items() if v is not None}}

    @property
    def tls(self) -> TlsFiles:
        return TlsFiles(self.ca_file, self.cert_file, self.key_file, self.crl_file)


class AgentTlsConfig(BaseModel):
    """This node's certificate (CN = node id): MQTT, artifact downloads, and the node's inference API
    (served with mutual TLS: callers need a team, operator or node certificate of the fleet CA)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ca_file: Path = Field(description="The fleet CA certificate.")
    cert_file: Path = Field(description="This node's certificate (edgeward pki issue node NODE_ID).")
    key_file: Path = Field(description="Its private key (keep it 0600).")
    crl_file: Path | None = Field(
        None, description="The fleet CRL: revoked callers of the inference API are refused and cut off."
    )

    @property
    def tls(self) -> TlsFiles:
        return TlsFiles(self.ca_file, self.cert_file, self.key_file, self.crl_file)


def with_broker_tls(broker: Any, tls: SecurityConfig | AgentTlsConfig | None, url_default: str | None) -> Any:
    """A broker section (raw config data) completed from the TLS section: the CA, certificate and key
    default to it, and a ``mqtt://`` URL is refused (pydantic reports it under ``broker.url``)."""
    if tls is None or not isinstance(broker, dict | type(None)):
        return broker
    broker = dict(broker or {})
    if broker.get("url") is None and url_default is not None:
        broker["url"] = url_default
    url = broker.get("url")
    if isinstance(url, str) and url.startswith("mqtt://"):
        raise ValueError("broker.url: plaintext mqtt:// is refused when TLS is configured; use mqtts://")
    for name in ("ca_file", "cert_file", "key_file"):
        if broker.get(name) is None:
            broker[name] = getattr(tls, name)
    return broker


def is_loopback(bind: str) -> bool:
    """Whether a ``host:port`` or host is a loopback address (``localhost`` counts)."""
    host = bind.rsplit(":", 1)[0] if ":" in bind and not bind.endswith("]") else bind
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
