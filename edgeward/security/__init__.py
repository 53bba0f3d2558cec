"""Identity, transport security and authorization for edgeward.

- `edgeward.security.pki`: the fleet CA, certificates for every role, the CRL (``edgeward pki``);
- `edgeward.security.tls`: TLS material as value objects, gRPC credentials, a CRL that reloads;
- `edgeward.security.authz`: roles, per-method rules, ownership, the gRPC authorization interceptor;
- `edgeward.security.mqtt_acl`: the per-node topic ACL (embedded broker and generated Mosquitto config);
- `edgeward.security.audit`: the append-only audit log;
- `edgeward.security.tokens`: operator-approved one-time enrollment tokens.
"""

from edgeward.security.errors import SecurityError
from edgeward.security.identity import Identity, Role

__all__ = ["Identity", "Role", "SecurityError"]
