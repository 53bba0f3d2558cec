"""Everything a gRPC server of the orchestrator needs for security, opened and closed as one.

``guard = await ApiGuard.open(config.security, state_dir, owners, exists, checks)`` reads the TLS files and
the CRL (``owners``: where ownership is kept, the orchestrator's store); ``grpc.aio.server(interceptors=guard.interceptors)``;
``guard.add_port(server, bind)`` binds with mutual TLS; ``guard.close()`` at shutdown.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

import grpc

from edgeward.security.audit import AuditLog
from edgeward.security.authz import Authorizer, AuthzInterceptor, Owners, RequestCheck
from edgeward.security.config import SecurityConfig
from edgeward.security.tls import RevocationList

log = logging.getLogger(__name__)


class ApiGuard:
    def __init__(
        self,
        config: SecurityConfig,
        audit: AuditLog,
        authz: Authorizer,
        checks: Mapping[str, RequestCheck] | None = None,
    ) -> None:
        self.config = config
        self.audit = audit
        self.authz = authz
        self.interceptor = AuthzInterceptor(authz, audit, checks)
        self.credentials = config.tls.server_credentials()  # the API's, and the artifact server's

    @property
    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        return [self.interceptor]

    @classmethod
    async def open(
        cls,
        config: SecurityConfig,
        state_dir: Path,
        owners: Owners,
        exists: Callable[[str, str], Awaitable[bool]] | None = None,
        checks: Mapping[str, RequestCheck] | None = None,
    ) -> ApiGuard:
        revocations = RevocationList(config.crl_file, config.ca_file) if config.crl_file is not None else None
        if revocations is None:
            log.warning(
                "certificate revocation is off: security.crl_file is not set, so a revoked certificate "
                "is still accepted (set pki_dir, or crl_file to the CRL 'edgeward pki crl' writes)"
            )
        audit = AuditLog(config.audit_log or Path(state_dir) / "security" / "audit.jsonl")
        try:
            return cls(config, audit, Authorizer(owners, revocations=revocations, exists=exists), checks)
        except BaseException:
            audit.close()
            raise

    def add_port(self, server: grpc.aio.Server, bind: str) -> int:
        port = server.add_secure_port(bind, self.credentials)
        log.info("gRPC API on %s: mutual TLS, audit log %s", bind, self.audit.path)
        return port

    def close(self) -> None:
        self.audit.close()
