"""Identity, transport security and authorization for edgeward.

- `edgeward.security.pki`: the fleet CA, certificates for every role, the CRL (``edgeward pki``);
- `edgeward.security.tls`: TLS material as value objects, gRPC credentials, a CRL that reloads;
- `edgeward.security.authz`: roles, per-method rules, ownership, the gRPC authorization interceptor;
- `edgeward.security.mqtt_acl`: the per-node topic ACL (embedded broker and generated Mosquitto config);
- `edgeward.security.audit`: the append-only audit log;
- `edgeward.security.tokens`: operator-approved one-time enrollment tokens.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from edgeward.security.errors import SecurityError

if TYPE_CHECKING:
    from edgeward.security.identity import Identity, Role

__all__ = ["Identity", "Role", "SecurityError"]


def __getattr__(name: str) -> Any:
    # Identity needs cryptography's x509 (a tenth of a second to import): only load it when asked,
    # so a store or a config that only uses edgeward.security.files does not pay for it.
    if name in ("Identity", "Role"):
        from edgeward.security import identity

        return getattr(identity, name)
    raise AttributeError(name)
