"""TLS material as a value object, the gRPC credentials made from it, and a CRL that follows its file.

Reading the files is a separate, explicit step (`TlsFiles.read`), so configs that name them are
validated without IO.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509

from edgeward.security.errors import PkiError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """The CA bundle, this process's certificate and key, and (servers) the CRL, as paths."""

    ca_file: Path
    cert_file: Path
    key_file: Path
    crl_file: Path | None = None

    def __post_init__(self) -> None:
        for name in ("ca_file", "cert_file", "key_file", "crl_file"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, Path(value))

    def read(self) -> tuple[bytes, bytes, bytes]:
        """(CA bundle, certificate chain, private key) as PEM bytes."""
        try:
            return self.ca_file.read_bytes(), self.cert_file.read_bytes(), self.key_file.read_bytes()
        except OSError as err:
            raise PkiError("security.tls.unreadable", str(err)) from err

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> TlsFiles | None:
        """``EDGEWARD_CA``/``EDGEWARD_CERT``/``EDGEWARD_KEY`` (all three, or none: plaintext)."""
        env = os.environ if environ is None else environ
        values = [env.get(k) or None for k in ("EDGEWARD_CA", "EDGEWARD_CERT", "EDGEWARD_KEY")]
        if not any(values):
            return None
        if not all(values):
            raise PkiError(
                "security.tls.incomplete", "set EDGEWARD_CA, EDGEWARD_CERT and EDGEWARD_KEY together"
            )
        return cls(*(Path(v) for v in values if v))

    # ------------------------------------------------------------ gRPC

    def server_credentials(self) -> grpc.ServerCredentials:
        """Mutual TLS: clients must present a certificate from the fleet CA."""
        ca, cert, key = self.read()
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        ca, cert, key = self.read()
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)

    # ------------------------------------------------------------ ssl (MQTT broker)

    def server_context(self) -> ssl.SSLContext:
        """A server context that requires a client certificate from the CA and checks the CRL."""
        try:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(self.ca_file))
            context.load_cert_chain(str(self.cert_file), str(self.key_file))
            if self.crl_file is not None:
                context.load_verify_locations(cafile=str(self.crl_file))
                context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
        except OSError as err:  # missing files, bad PEM (ssl.SSLError)
            raise PkiError("security.tls.unusable", str(err)) from err
        context.verify_mode = ssl.CERT_REQUIRED
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        return context


#: The largest response the orchestrator's API sends and its clients take: a List of a large fleet.
#: A node listed with its replicas is about 600 bytes, so 10,000 nodes are 5.8 MB, past gRPC's
#: default of 4 MB a message; requests stay capped by the server's ``max_grpc_message``.
MAX_RESPONSE_BYTES = 64 * 1024 * 1024


def _options(server_name: str | None, max_receive: int | None) -> list[tuple[str, str | int]]:
    options: list[tuple[str, str | int]] = []
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    if max_receive is not None:
        options.append(("grpc.max_receive_message_length", max_receive))
    return options


def grpc_channel(
    target: str, tls: TlsFiles | None, server_name: str | None = None, *, max_receive: int | None = None
) -> grpc.Channel:
    """A synchronous channel: mutual TLS with ``tls``, plaintext without. ``server_name``: the name
    the server's certificate must carry, if not the host dialled (a node id, for a node's API).
    ``max_receive``: the largest message taken (default gRPC's, 4 MB)."""
    options = _options(server_name, max_receive)
    if tls is None:
        return grpc.insecure_channel(target, options=options)
    return grpc.secure_channel(target, tls.channel_credentials(), options=options)


def grpc_aio_channel(
    target: str, tls: TlsFiles | None, server_name: str | None = None, *, max_receive: int | None = None
) -> grpc.aio.Channel:
    """An asyncio channel: mutual TLS with ``tls``, plaintext without (the rest as above)."""
    options = _options(server_name, max_receive)
    if tls is None:
        return grpc.aio.insecure_channel(target, options=options)
    return grpc.aio.secure_channel(target, tls.channel_credentials(), options=options)


class RevocationList:
    """The serials a CRL file revokes, re-read whenever the file changes (checked at most once a second).

    A CRL that cannot be read, is not signed by the CA, or was issued before the one in force (a
    replayed copy would undo revocations) keeps the last good list and is logged; a missing file at
    start is an error (the caller asked for revocation checks).
    """

    def __init__(self, crl_file: Path, ca_file: Path, *, min_interval_s: float = 1.0) -> None:
        self.crl_file = Path(crl_file)
        self._ca = _load_ca(Path(ca_file))
        self._min_interval_s = min_interval_s
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._checked = 0.0
        self._revoked: frozenset[int] = frozenset()
        self._issued: dt.datetime | None = None  # lastUpdate of the CRL in force
        self._load(force=True)

    def is_revoked(self, serial: int, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        if now - self._checked >= self._min_interval_s:
            self._checked = now
            self._load()
        return serial in self._revoked

    @property
    def revoked(self) -> frozenset[int]:
        return self._revoked

    def refresh(self, now: float | None = None) -> frozenset[int]:
        """The revoked serials, re-reading the file if it changed (at most once per interval)."""
        self.is_revoked(-1, now)
        return self._revoked

    def _load(self, force: bool = False) -> None:
        with self._lock:
            try:
                st = self.crl_file.stat()
            except OSError as err:
                if force:
                    raise PkiError("security.crl.unreadable", str(err)) from err
                log.warning("cannot read the CRL %s (%s); keeping the last one", self.crl_file, err)
                return
            stamp = (st.st_mtime_ns, st.st_size)
            if stamp == self._stamp:
                return
            try:
                crl = x509.load_pem_x509_crl(self.crl_file.read_bytes())
                if not any(crl.is_signature_valid(ca.public_key()) for ca in self._ca):  # type: ignore[arg-type]
                    raise ValueError("not signed by the fleet CA")
                if self._issued is not None and crl.last_update_utc < self._issued:
                    # A CRL from before the one in force (a replayed copy) would undo revocations.
                    self._stamp = stamp
                    raise ValueError(
                        f"issued {crl.last_update_utc:%Y-%m-%d %H:%M:%S}, before the one in force"
                    )
            except (OSError, ValueError) as err:
                if force:
                    raise PkiError("security.crl.bad", f"{self.crl_file}: {err}") from err
                log.warning("ignoring CRL %s (%s); keeping the last one", self.crl_file, err)
                return
            self._revoked = frozenset(r.serial_number for r in crl)
            self._issued = crl.last_update_utc
            self._stamp = stamp
            log.info("CRL %s: %d revoked certificate(s)", self.crl_file, len(self._revoked))


def _load_ca(path: Path) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(path.read_bytes())
    except (OSError, ValueError) as err:
        raise PkiError("security.tls.bad_ca", f"{path}: {err}") from err
