"""Placement: filter -> score -> bind, as small named plugins, vectorised over a fleet snapshot.

``Scheduler(profile).plan(FleetSnapshot.from_node_infos(nodes)).place(request)`` is the path;
``Scheduler.place(request, nodes)`` keeps the older per-call form working.
"""

from .framework import DEFAULT_PROFILE, PROFILES, Scheduler, SchedulerProfile
from .placement import (
    TIERS,
    Code,
    FilterStatus,
    NodeInfo,
    Placement,
    PlacementRequest,
    SchedulerError,
    Unschedulable,
)
from .plan import PlacementPlan, RequestShape, Reservation
from .plugins import FILTERS, SCORERS, FilterPlugin, ScorePlugin, load_entry_points, register
from .snapshot import FleetSnapshot, NodeClass, PerformanceTable, Prediction

__all__ = [
    "DEFAULT_PROFILE",
    "FILTERS",
    "PROFILES",
    "SCORERS",
    "TIERS",
    "Code",
    "FilterPlugin",
    "FilterStatus",
    "FleetSnapshot",
    "NodeClass",
    "NodeInfo",
    "PerformanceTable",
    "Placement",
    "PlacementPlan",
    "PlacementRequest",
    "Prediction",
    "RequestShape",
    "Reservation",
    "Scheduler",
    "SchedulerError",
    "SchedulerProfile",
    "ScorePlugin",
    "Unschedulable",
    "load_entry_points",
    "register",
]
