"""Errors of the catalog; each carries a reason id that the CLI shows as it is."""

from __future__ import annotations

from ..errors import AlreadyExists, InvalidModel, OrchestratorError


class CatalogError(OrchestratorError):
    """A catalog operation that cannot be done in the current state (FAILED_PRECONDITION)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


class SignatureRefused(InvalidModel):
    """A push whose publisher signature is missing, malformed, untrusted or does not verify."""


class VersionExists(AlreadyExists):
    """A push of a version that is already published (versions are immutable)."""

    def __init__(self, name: str, version: str) -> None:
        super().__init__("model", f"{name}:{version}")
        self.reason = "model.push.version_exists"

    def __str__(self) -> str:
        return f"{self.reason}: {self.name} is already published; versions are immutable, push a new one"
