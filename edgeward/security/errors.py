"""The one base exception of `edgeward.security` and its structured subclasses."""

from __future__ import annotations


class SecurityError(Exception):
    """Base of every error raised by `edgeward.security`; ``reason`` is a machine-readable id."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class PkiError(SecurityError):
    """The CA directory, a certificate request or a revocation is unusable."""


class IdentityError(SecurityError):
    """A peer certificate does not carry a usable edgeward identity."""


class TokenError(SecurityError):
    """An enrollment token is unknown, used, expired or for another node."""
