"""Who a certificate speaks for: a role, a name and, for teams, the team.

The fleet CA writes the identity twice into every certificate it issues:

- a SAN URI ``edgeward://role/{role}/{scope}`` (scope: the team for teams, the node id for nodes, the
  name otherwise), which is what edgeward itself reads;
- the subject CN, which Mosquitto uses as the username (``use_identity_as_username``): a node's CN is
  its node id, every other CN is ``{role}:{name}`` (``team:{team}:{name}`` for teams). A ``:`` is never
  part of a node id, so no other certificate can pass for a node in the broker's topic ACL.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import NameOID

from edgeward.mqtt.topics import NODE_ID_PATTERN
from edgeward.security.errors import IdentityError

URI_PREFIX = "edgeward://role/"
NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")


class Role(enum.StrEnum):
    OPERATOR = "operator"
    TEAM = "team"
    NODE = "node"
    ORCHESTRATOR = "orchestrator"
    BROKER = "broker"


@dataclass(frozen=True, slots=True)
class Identity:
    """An authenticated peer. ``team`` is set for (and only for) the team role."""

    role: Role
    name: str
    team: str | None = None
    serial: int = 0

    def __post_init__(self) -> None:
        pattern = NODE_ID_PATTERN if self.role is Role.NODE else NAME_PATTERN
        if not isinstance(self.name, str) or pattern.fullmatch(self.name) is None:
            raise IdentityError(
                "security.identity.bad_name", f"{self.role} name must match {pattern.pattern}"
            )
        if (self.role is Role.TEAM) != (self.team is not None):
            raise IdentityError("security.identity.bad_team", "a team is given for, and only for, role team")
        if self.team is not None and NAME_PATTERN.fullmatch(self.team) is None:
            raise IdentityError("security.identity.bad_team", f"team must match {NAME_PATTERN.pattern}")

    @property
    def common_name(self) -> str:
        if self.role is Role.NODE:
            return self.name
        if self.role is Role.TEAM:
            return f"team:{self.team}:{self.name}"
        return f"{self.role}:{self.name}"

    @property
    def uri(self) -> str:
        scope = self.team if self.role is Role.TEAM else self.name
        return f"{URI_PREFIX}{self.role}/{scope}"

    @property
    def owner(self) -> str:
        """The owner recorded on what this identity creates: ``team/NAME`` or ``operator``."""
        return f"team/{self.team}" if self.role is Role.TEAM else str(self.role)

    def __str__(self) -> str:
        return self.common_name

    @classmethod
    def from_certificate(cls, cert: x509.Certificate) -> Identity:
        """The identity the fleet CA wrote into ``cert`` (the caller has verified the chain)."""
        try:
            sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound as err:
            raise IdentityError("security.identity.missing", "no subjectAltName") from err
        uris = [
            u for u in sans.get_values_for_type(x509.UniformResourceIdentifier) if u.startswith(URI_PREFIX)
        ]
        if len(uris) != 1:
            raise IdentityError(
                "security.identity.missing", f"expected one {URI_PREFIX} URI, found {len(uris)}"
            )
        role_text, _, scope = uris[0].removeprefix(URI_PREFIX).partition("/")
        try:
            role = Role(role_text)
        except ValueError as err:
            raise IdentityError("security.identity.bad_role", f"unknown role {role_text!r}") from err
        cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        cn = str(cns[0].value) if len(cns) == 1 else ""
        if role is Role.TEAM:
            head, _, name = cn.rpartition(":")
            identity = cls(role, name, team=scope, serial=cert.serial_number)
            if head != f"team:{scope}":
                raise IdentityError("security.identity.mismatch", "CN and SAN name different teams")
        else:
            identity = cls(role, scope, serial=cert.serial_number)
        if identity.common_name != cn:
            raise IdentityError("security.identity.mismatch", f"CN {cn!r} does not match {identity.uri}")
        return identity

    @classmethod
    def from_pem(cls, pem: bytes) -> Identity:
        try:
            cert = x509.load_pem_x509_certificate(pem)
        except ValueError as err:
            raise IdentityError("security.identity.bad_certificate", str(err)) from err
        return cls.from_certificate(cert)
