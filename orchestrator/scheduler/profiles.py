"""Scheduler profiles: named sets of enabled plugins (filters in the order they explain, weighted
scores), and the built-in ones. The config (:mod:`.settings`) checks profile names against
:data:`PROFILES`; the framework builds a scheduler from one."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .plugins import FILTERS, SCORERS

DEFAULT_FILTERS = ("ready", "selector", "attestation", "accelerator", "capacity")
#: Spread first (availability), then the SLO, then energy; zone spread and load break the rest.
DEFAULT_WEIGHTS = {"spread": 6.0, "latency": 4.0, "energy": 2.0, "zone-spread": 1.0, "least-loaded": 1.0}


class SchedulerProfile(BaseModel):
    """A named set of enabled plugins: filters, in the order they explain, and weighted scores."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="Name of the profile, as deployments and the config refer to it.")
    filters: tuple[str, ...] = Field(
        default=DEFAULT_FILTERS,
        description="Filter plugins; a rejected node is counted under the first that fails.",
    )
    weights: dict[str, Annotated[float, Field(ge=0)]] = Field(
        default_factory=lambda: dict(DEFAULT_WEIGHTS),
        description="Score plugin -> weight; the node with the highest weighted mean score wins.",
    )

    @model_validator(mode="after")
    def _known_plugins(self) -> SchedulerProfile:
        unknown = [n for n in self.filters if n not in FILTERS]
        unknown += [n for n in self.weights if n not in SCORERS]
        if unknown:
            raise ValueError(f"unknown scheduler plugins: {unknown}")
        if len(set(self.filters)) != len(self.filters):
            raise ValueError(f"a filter is listed twice: {list(self.filters)}")
        return self


PROFILES = {
    "energy-aware": SchedulerProfile(name="energy-aware"),
    "round-robin": SchedulerProfile(name="round-robin", weights={"round-robin": 1.0}),
}
DEFAULT_PROFILE = "energy-aware"
