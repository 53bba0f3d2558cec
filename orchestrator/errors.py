"""The orchestrator's exception tree. gRPC handlers map these to status codes in one place."""

from __future__ import annotations


class OrchestratorError(Exception):
    """Base of every error the orchestrator raises on purpose."""


class InvalidArgument(OrchestratorError):
    """A request the API refuses; ``errors`` holds ``(field_path, reason)`` pairs."""

    def __init__(self, errors: list[tuple[str, str]]) -> None:
        self.errors = errors
        super().__init__("; ".join(f"{path}: {reason}" for path, reason in errors))


class InvalidManifest(InvalidArgument):
    """A manifest failed validation."""


class NotFound(OrchestratorError):
    def __init__(self, kind: str, name: str) -> None:
        super().__init__(f"{kind} {name!r} not found")
        self.kind = kind
        self.name = name


class AlreadyExists(OrchestratorError):
    def __init__(self, kind: str, name: str) -> None:
        super().__init__(f"{kind} {name!r} already exists")
        self.kind = kind
        self.name = name


class InvalidModel(OrchestratorError):
    """A pushed model artifact was refused (bad metadata, digest mismatch, not a .tflite)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


class Busy(OrchestratorError):
    """A request would take more than the orchestrator keeps for such requests at once (a push's
    bytes in memory); the caller may retry once others finished (RESOURCE_EXHAUSTED)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


class QuotaExceeded(OrchestratorError):
    """A team's request would take it beyond its quota (config team_quota): RESOURCE_EXHAUSTED."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


class IllegalTransition(OrchestratorError):
    """A lifecycle moved along an edge its transition table does not have: a bug."""


class StoreError(OrchestratorError):
    """The store cannot be opened or used as asked (an unknown schema, a foreign database)."""


class NotLeader(StoreError):
    """A singleton write whose leader lease is no longer the store's: refused by the fencing check.
    The replica that made it lost its lease (paused, cut off from the database) and must stop
    acting as leader; another replica holds the lease."""

    def __init__(self, holder: str, token: int) -> None:
        super().__init__(f"leader lease {token} of {holder} is no longer held: write refused")
        self.holder = holder
        self.token = token


class RevisionGone(OrchestratorError):
    """A Watch asked to resume from a revision the change feed no longer keeps."""

    def __init__(self, revision: int, oldest: int) -> None:
        super().__init__(
            f"revision {revision} is no longer kept (oldest kept: {oldest}); watch again without a revision"
        )
        self.revision = revision
        self.oldest = oldest
