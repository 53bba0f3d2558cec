"""The fleet CA: one directory holding the CA, every certificate it issued, and its CRL.

Layout (``edgeward pki init DIR``)::

    DIR/ca.crt  ca.key             the CA (EC P-256; the key is written 0600)
    DIR/crl.pem                    the current CRL, re-signed on every revocation and by ``pki crl``
    DIR/index.json                 what was issued: serial, role, name, team, expiry, revocation
    DIR/{role}/{name}.crt|.key     issued certificates and their keys (keys 0600)

Private keys are created with mode 0600 from the start (never chmod-ed afterwards) and never logged.
Orchestrator and broker certificates are TLS servers (SAN DNS/IP from ``hosts``) and also clients
(the orchestrator is an MQTT client). Node certificates are clients and servers too (the node's
inference API): their SAN carries the node id as a DNS name, which peers check (a multi-exit hand-off
dials the endpoint with the node id as the expected server name), plus any ``hosts`` for stock
clients that check the address they dial. Operators and teams are clients only.
"""

from __future__ import annotations

import builtins
import datetime as dt
import ipaddress
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgeward.security.errors import IdentityError, PkiError
from edgeward.security.files import write_private
from edgeward.security.identity import Identity, Role

log = logging.getLogger(__name__)

CA_DAYS = 3650
LEAF_DAYS = 365
CRL_DAYS = 90
DEFAULT_HOSTS = ("127.0.0.1", "localhost")
_SERVER_ROLES = (Role.ORCHESTRATOR, Role.BROKER)
_HOST_ROLES = (*_SERVER_ROLES, Role.NODE)


@dataclass(frozen=True, slots=True)
class IssuedCert:
    """One row of ``index.json``."""

    serial: str  # hex
    role: str
    name: str
    team: str | None
    not_after: str  # ISO 8601, UTC
    cert_file: str  # relative to the CA directory
    revoked_at: str | None = None

    @property
    def subject(self) -> str:
        return Identity(Role(self.role), self.name, self.team).common_name


@dataclass(frozen=True, slots=True)
class IssuedFiles:
    cert_file: Path
    key_file: Path
    serial: int


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _write_public(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


class FleetCA:
    """A CA directory made by `FleetCA.init`; ``FleetCA(dir)`` opens it (no IO until used)."""

    def __init__(self, directory: Path | str) -> None:
        self.dir = Path(directory)

    @property
    def ca_file(self) -> Path:
        return self.dir / "ca.crt"

    @property
    def crl_file(self) -> Path:
        return self.dir / "crl.pem"

    @property
    def _index_file(self) -> Path:
        return self.dir / "index.json"

    # ------------------------------------------------------------ create

    @classmethod
    def init(cls, directory: Path | str, name: str = "edgeward fleet CA", days: int = CA_DAYS) -> FleetCA:
        """Create a new CA in ``directory`` (which must not hold one already)."""
        ca = cls(directory)
        if ca.ca_file.exists():
            raise PkiError("security.pki.exists", f"{ca.ca_file} exists; a fleet has one CA")
        ca.dir.mkdir(parents=True, exist_ok=True)
        key = _new_key()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        write_private(ca.dir / "ca.key", _key_pem(key))
        _write_public(ca.ca_file, cert.public_bytes(serialization.Encoding.PEM))
        ca._write_index([])
        ca.write_crl()
        log.info("fleet CA created in %s", ca.dir)
        return ca

    # ------------------------------------------------------------ issue

    def issue(
        self,
        identity: Identity,
        *,
        hosts: Iterable[str] = (),
        days: int = LEAF_DAYS,
        replace: bool = False,
    ) -> IssuedFiles:
        """Issue a key and certificate for ``identity`` into ``{role}/{name}.crt|.key``.

        ``replace`` re-issues (rotation): the new certificate gets a new serial; the old one stays
        valid until it expires or is revoked.
        """
        if not 1 <= days <= CA_DAYS:
            raise PkiError("security.pki.bad_days", f"days must be within 1..{CA_DAYS}")
        ca_key, ca_cert = self._load_ca()
        stem = identity.name if identity.role is not Role.TEAM else f"{identity.team}.{identity.name}"
        out = self.dir / str(identity.role)
        cert_file, key_file = out / f"{stem}.crt", out / f"{stem}.key"
        if cert_file.exists() and not replace:
            raise PkiError("security.pki.exists", f"{cert_file} exists; pass replace to rotate it")
        hosts = list(hosts) or (list(DEFAULT_HOSTS) if identity.role in _SERVER_ROLES else [])
        if hosts and identity.role not in _HOST_ROLES:
            raise PkiError(
                "security.pki.bad_hosts", f"host names are for orchestrator/broker/node, not {identity.role}"
            )
        if identity.role is Role.NODE:
            hosts = [identity.name, *(h for h in hosts if h != identity.name)]
        key = _new_key()
        now = _now()
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
        if identity.role in _HOST_ROLES:
            usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.COMMON_NAME, identity.common_name),
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, str(identity.role)),
            ]
        )
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=True,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(identity.uri), *(_san(h) for h in hosts)]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
            )
        )
        cert = builder.sign(ca_key, hashes.SHA256())
        out.mkdir(exist_ok=True)
        write_private(key_file, _key_pem(key))
        _write_public(cert_file, cert.public_bytes(serialization.Encoding.PEM))
        row = IssuedCert(
            serial=f"{cert.serial_number:x}",
            role=str(identity.role),
            name=identity.name,
            team=identity.team,
            not_after=cert.not_valid_after_utc.isoformat(),
            cert_file=str(cert_file.relative_to(self.dir)),
        )
        self._write_index([*self.list(), row])
        log.info("issued %s certificate %s (serial %s)", identity.role, identity.common_name, row.serial)
        return IssuedFiles(cert_file, key_file, cert.serial_number)

    # ------------------------------------------------------------ revoke

    def revoke(self, who: str) -> list[IssuedCert]:
        """Revoke by serial (hex) or by subject (``node-1``, ``team:smart-home:ci``, ``operator:alice``):
        every live certificate of that subject. Re-signs the CRL."""
        rows = self.list()
        hits = [r for r in rows if r.revoked_at is None and who in (r.serial, r.subject)]
        if not hits:
            raise PkiError("security.pki.unknown", f"no unrevoked certificate with serial or subject {who!r}")
        stamp = _now().isoformat()
        serials = {r.serial for r in hits}
        updated = [
            IssuedCert(**{**asdict(r), "revoked_at": stamp}) if r.serial in serials else r for r in rows
        ]
        self._write_index(updated)
        self.write_crl()
        for row in hits:
            log.info("revoked %s (serial %s)", row.subject, row.serial)
        return [r for r in updated if r.serial in serials]

    def write_crl(self, days: int = CRL_DAYS) -> Path:
        """(Re-)sign the CRL with every revoked serial; run it before ``next_update`` passes."""
        ca_key, ca_cert = self._load_ca()
        now = _now()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(ca_cert.subject)
            .last_update(now - dt.timedelta(minutes=5))
            .next_update(now + dt.timedelta(days=days))
        )
        for row in self.list():
            if row.revoked_at is not None:
                builder = builder.add_revoked_certificate(
                    x509.RevokedCertificateBuilder()
                    .serial_number(int(row.serial, 16))
                    .revocation_date(dt.datetime.fromisoformat(row.revoked_at))
                    .build()
                )
        crl = builder.sign(ca_key, hashes.SHA256())
        _write_public(self.crl_file, crl.public_bytes(serialization.Encoding.PEM))
        return self.crl_file

    # ------------------------------------------------------------ read

    def list(self) -> list[IssuedCert]:
        try:
            rows = json.loads(self._index_file.read_text())
        except FileNotFoundError as err:
            raise PkiError(
                "security.pki.missing", f"{self.dir} holds no fleet CA (edgeward pki init)"
            ) from err
        except (OSError, ValueError) as err:
            raise PkiError("security.pki.bad_index", f"{self._index_file}: {err}") from err
        return [IssuedCert(**row) for row in rows]

    def files(self, subject: str) -> IssuedFiles:
        """The certificate and key files of the newest live certificate of ``subject``."""
        live = [r for r in self.list() if r.subject == subject and r.revoked_at is None]
        if not live:
            raise PkiError("security.pki.unknown", f"no live certificate for {subject!r}")
        row = live[-1]
        cert_file = self.dir / row.cert_file
        return IssuedFiles(cert_file, cert_file.with_suffix(".key"), int(row.serial, 16))

    def _load_ca(self) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        try:
            key = serialization.load_pem_private_key((self.dir / "ca.key").read_bytes(), password=None)
            cert = x509.load_pem_x509_certificate(self.ca_file.read_bytes())
        except FileNotFoundError as err:
            raise PkiError(
                "security.pki.missing", f"{self.dir} holds no fleet CA (edgeward pki init)"
            ) from err
        except (OSError, ValueError) as err:
            raise PkiError("security.pki.bad_ca", f"{self.dir}: {err}") from err
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise PkiError("security.pki.bad_ca", "the CA key is not an EC key")
        return key, cert

    def _write_index(self, rows: builtins.list[IssuedCert]) -> None:
        _write_public(self._index_file, (json.dumps([asdict(r) for r in rows], indent=1) + "\n").encode())


def parse_subject(role: str, name: str, team: str | None = None) -> Identity:
    """An `Identity` from CLI words, refused with the field and reason when malformed."""
    try:
        parsed = Role(role)
    except ValueError as err:
        raise PkiError("security.pki.bad_role", f"role must be one of {', '.join(Role)}") from err
    try:
        return Identity(parsed, name, team)
    except IdentityError as err:
        raise PkiError(err.reason, err.detail) from err
