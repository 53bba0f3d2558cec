"""Lifecycle of a model version: published -> deprecated -> revoked (revoked is final)."""

from __future__ import annotations

import enum

from edgeward.v1 import api_pb2

from .errors import CatalogError


class ModelState(enum.StrEnum):
    PUBLISHED = "published"
    DEPRECATED = "deprecated"
    REVOKED = "revoked"

    def to_pb(self) -> api_pb2.ModelState:
        return _PB[self]


_PB = {
    ModelState.PUBLISHED: api_pb2.MODEL_STATE_PUBLISHED,
    ModelState.DEPRECATED: api_pb2.MODEL_STATE_DEPRECATED,
    ModelState.REVOKED: api_pb2.MODEL_STATE_REVOKED,
}

ALLOWED: dict[ModelState, frozenset[ModelState]] = {
    ModelState.PUBLISHED: frozenset({ModelState.DEPRECATED, ModelState.REVOKED}),
    ModelState.DEPRECATED: frozenset({ModelState.REVOKED}),
    ModelState.REVOKED: frozenset(),
}


def check_transition(name: str, old: ModelState, new: ModelState) -> None:
    """Refuse a change the table does not allow (an operator request, so an error, not a bug)."""
    if new not in ALLOWED[old]:
        raise CatalogError(f"model.state.{old.value}", f"{name} is {old.value}; it cannot become {new.value}")
