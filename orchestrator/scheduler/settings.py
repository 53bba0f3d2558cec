"""The orchestrator config's ``scheduler`` section: which profile places replicas, the profiles an
operator defines, and when running replicas move. Validated without IO: plugin names are checked
when the scheduler is built (:meth:`Scheduler.from_config`), after third-party plugins load."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .correction import CorrectionPolicy
from .energy import EnergyPolicy
from .profiles import PROFILES  # the built-in profiles; no third-party plugin is loaded here
from .rescheduling import _PERCENT, SloPolicy


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ProfileSpec(_Strict):
    """A scheduler profile by plugin names (built-in, or from the ``edgeward.scheduler_plugins``
    entry-point group)."""

    filters: tuple[str, ...] | None = Field(
        None, description="Filter plugins in the order they explain; unset: the built-in default list."
    )
    weights: dict[str, Annotated[float, Field(ge=0)]] | None = Field(
        None, description="Score plugin -> weight; unset: the built-in default weights."
    )


class ReschedulingConfig(_Strict):
    """Moving running replicas: off nodes that keep missing their deployment's latency SLO, and to
    places that measurably cost much less energy per inference."""

    slo_violation: bool = Field(True, description="Move replicas whose p95 latency stays over the SLO.")
    breach_windows: Annotated[int, Field(ge=1, le=1000)] = Field(
        3, description="Consecutive telemetry windows over the SLO that make a violation sustained."
    )
    breach_ratio: Annotated[float, Field(gt=0, le=10)] = Field(
        1.0, description="A window is over when its p95 exceeds SLO x this."
    )
    recover_ratio: Annotated[float, Field(gt=0, le=10)] = Field(
        0.8, description="A violation ends at a window whose p95 is at or under SLO x this (hysteresis)."
    )
    cooldown_s: Annotated[float, Field(ge=0, le=86_400)] = Field(
        120.0, description="A replica just moved is not moved again for this long."
    )
    max_unavailable: int | str = Field(
        1,
        description="Disruption budget per deployment: replicas (or a percentage of the desired count, "
        "'25%', rounded up) that may be down at once; voluntary moves only spend what is left.",
    )
    max_moves_per_minute: Annotated[int, Field(ge=0, le=100_000)] = Field(
        30, description="Global cap on voluntary moves (SLO repairs, energy moves) in any sliding minute."
    )
    energy: bool = Field(
        True,
        description="Move running replicas where measured profiles show a large, sustained energy saving "
        "(make before break, within max_unavailable, cooldown_s and max_moves_per_minute; never onto a "
        "node predicted over SLO x recover_ratio).",
    )
    energy_min_saving: Annotated[float, Field(gt=0, lt=1)] = Field(
        0.3,
        description="Least share of a replica's joules per inference a move must save (hysteresis: a move "
        "back would cost more).",
    )
    energy_sustain_s: Annotated[float, Field(ge=0, le=86_400)] = Field(
        30.0, description="How long a saving must hold before the replica moves."
    )
    latency_smoothing: Annotated[float, Field(gt=0, le=1)] = Field(
        0.5, description="Weight of new telemetry windows in each node's latency correction."
    )
    max_latency_scale: Annotated[float, Field(ge=1, le=10_000)] = Field(
        100.0, description="Largest observed/predicted latency ratio a node's correction takes."
    )

    @model_validator(mode="after")
    def _consistent(self) -> ReschedulingConfig:
        if self.recover_ratio > self.breach_ratio:
            raise ValueError("recover_ratio must not exceed breach_ratio")
        budget = self.max_unavailable
        if isinstance(budget, str):
            match = _PERCENT.fullmatch(budget)
            if match is None or int(match.group(1)) > 100:
                raise ValueError(f"max_unavailable must be a count or 0-100%, got {budget!r}")
        elif budget < 0:
            raise ValueError("max_unavailable must not be negative")
        return self

    def slo_policy(self) -> SloPolicy:
        return SloPolicy(
            breach_ratio=self.breach_ratio,
            recover_ratio=self.recover_ratio,
            breach_windows=self.breach_windows,
            cooldown_s=self.cooldown_s,
        )

    def energy_policy(self) -> EnergyPolicy:
        return EnergyPolicy(
            min_saving=self.energy_min_saving,
            sustain_s=self.energy_sustain_s,
            slo_headroom=self.recover_ratio,
        )

    def correction_policy(self) -> CorrectionPolicy:
        return CorrectionPolicy(smoothing=self.latency_smoothing, max_scale=self.max_latency_scale)


class SchedulerConfig(_Strict):
    """The ``scheduler`` section of the orchestrator config."""

    profile: str = Field(
        "energy-aware", description="Profile that places replicas: a built-in one or one of `profiles`."
    )
    profiles: dict[str, ProfileSpec] = Field(
        default_factory=dict, description="Operator-defined profiles by name (may shadow a built-in one)."
    )
    rescheduling: ReschedulingConfig = Field(default_factory=ReschedulingConfig)

    @model_validator(mode="after")
    def _profile_known(self) -> SchedulerConfig:
        if self.profile not in self.profiles and self.profile not in PROFILES:
            known = sorted({*PROFILES, *self.profiles})
            raise ValueError(f"unknown profile {self.profile!r}; known: {known}")
        return self
