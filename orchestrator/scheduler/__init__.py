"""Placement: filter -> score -> bind, as small named plugins (see :mod:`.framework`)."""

from .framework import (
    FILTERS,
    SCORERS,
    NodeInfo,
    Placement,
    PlacementRequest,
    Scheduler,
    Unschedulable,
)

__all__ = ["FILTERS", "SCORERS", "NodeInfo", "Placement", "PlacementRequest", "Scheduler", "Unschedulable"]
